"""Generates a folder of JPEGs for the input-pipeline benchmarks: N images of mixed sizes
(160-640 x 120-480, photo-like: smooth colour fields, edges and noise, quality 90) in 10
classes, rendered on every core. Images already there are kept.
Usage: python scripts/bench_input_data.py DIR N"""

import os
import sys
from multiprocessing import Pool

import numpy as np
from PIL import Image


def render(job):
    path, w, h, c, seed = job
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([
        128 + 100 * np.sin(x * c[k, 0] / 20 + y * c[k, 1] / 25 + c[k, 2] * 6) for k in range(3)
    ], axis=-1)
    img += np.random.default_rng(seed).normal(0, 12, img.shape)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def main():
    root, n = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(n):
        d = os.path.join(root, f"class{i % 10}")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"{i:06d}.jpg")
        # Every draw is made whether or not the file exists, so image i is the same image
        # whatever N and whichever files an earlier run left.
        w, h = int(rng.integers(160, 641)), int(rng.integers(120, 481))
        c, seed = rng.random((3, 3)).astype(np.float32), int(rng.integers(1 << 62))
        if not os.path.exists(p):
            jobs.append((p, w, h, c, seed))
    if jobs:
        with Pool() as pool:
            pool.map(render, jobs, chunksize=16)


if __name__ == "__main__":
    main()
