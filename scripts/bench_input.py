"""The input-pipeline benchmark's peer: PyTorch's DataLoader over torchvision's ImageFolder,
with the transforms ferry applies, measured as ferry's pipeline is (scripts/bench-input.sh).

Prints one JSON line per worker count: images per second into float, normalised batches."""

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--jitter", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--prefetch", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)
    steps = [
        transforms.RandomResizedCrop(a.image_size),
        transforms.RandomHorizontalFlip(),
    ]
    if a.jitter > 0:
        steps.append(transforms.ColorJitter(a.jitter, a.jitter, a.jitter))
    steps += [
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ]
    ds = datasets.ImageFolder(a.data, transform=transforms.Compose(steps))
    for w in [int(x) for x in a.workers.split(",")]:
        start = time.perf_counter()
        loader = DataLoader(
            ds,
            batch_size=a.batch,
            shuffle=True,
            num_workers=w,
            prefetch_factor=a.prefetch if w > 0 else None,
            persistent_workers=False,
        )
        n, first = 0, None
        for i, (x, _) in enumerate(loader):
            n += x.shape[0]
            if first is None:
                first = time.perf_counter() - start
            if i + 1 >= a.batches:
                break
        secs = time.perf_counter() - start
        del loader
        print(json.dumps({"workers": w, "images": n, "seconds": secs,
                          "images_per_sec": n / secs, "first_batch_s": first}), flush=True)


if __name__ == "__main__":
    main()
