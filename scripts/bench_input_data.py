"""Generates a folder of JPEGs for the input-pipeline benchmark: N images of mixed sizes
(160-640 x 120-480, photo-like: smooth colour fields, edges and noise, quality 90) in 10
classes. Usage: python scripts/bench_input_data.py DIR N"""

import os
import sys

import numpy as np
from PIL import Image


def main():
    root, n = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    for i in range(n):
        d = os.path.join(root, f"class{i % 10}")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"{i:06d}.jpg")
        if os.path.exists(p):
            continue
        w, h = int(rng.integers(160, 641)), int(rng.integers(120, 481))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        c = rng.random((3, 3)).astype(np.float32)
        img = np.stack([
            128 + 100 * np.sin(x * c[k, 0] / 20 + y * c[k, 1] / 25 + c[k, 2] * 6) for k in range(3)
        ], axis=-1)
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(p, quality=90)


if __name__ == "__main__":
    main()
