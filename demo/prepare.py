"""Prepares ferry's transfer-learning demo from scikit-learn's bundled handwritten digits.

Source task: digits 0-5, all ~1080 labelled images. Target task: digits 6-9 with only
SHOTS labelled images per class. Of the remaining target images, half are an unlabelled
pool (images without labels, for distillation) and half the validation set, written as an
ImageFolder of PNGs. Also exports the models with PyTorch as TorchScript:
  models/source.pt   the CNN with a 6-class head (trained by ferry on the source task)
  models/student.pt  the same CNN with a fresh 4-class head (trained by ferry on the target)
  models/tiny.pt     a much smaller CNN (~1.5k parameters) with a 4-class head: the student
                     that distillation trains from the fine-tuned CNN

Usage: prepare.py WORK_DIR [SHOTS]
"""
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits


class DigitsCNN(torch.nn.Module):
    """conv-bn-relu-pool, conv-bn-relu, global average pool; `features` is the backbone."""

    def __init__(self, classes: int):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.classifier = torch.nn.Linear(64, classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class TinyCNN(torch.nn.Module):
    """A small student: two narrow convolutions, no BatchNorm."""

    def __init__(self, classes: int):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.classifier = torch.nn.Linear(16, classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def main(work: str, shots: int):
    os.makedirs(f"{work}/data", exist_ok=True)
    os.makedirs(f"{work}/models", exist_ok=True)
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)[:, None]  # N,1,8,8
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)

    src = labels <= 5
    save_file({"images": torch.from_numpy(images[src]), "labels": torch.from_numpy(labels[src])},
              f"{work}/data/source_train.safetensors")

    tgt_idx = np.flatnonzero(labels >= 6)
    rng.shuffle(tgt_idx)
    train_idx = np.concatenate([tgt_idx[labels[tgt_idx] == d][:shots] for d in range(6, 10)])
    rest = np.setdiff1d(tgt_idx, train_idx)
    rng.shuffle(rest)
    pool_idx, val_idx = rest[: len(rest) // 2], rest[len(rest) // 2:]
    save_file({"images": torch.from_numpy(images[pool_idx])}, f"{work}/data/target_pool.safetensors")
    save_file({"images": torch.from_numpy(images[train_idx]), "labels": torch.from_numpy(labels[train_idx] - 6)},
              f"{work}/data/target_train.safetensors")
    for i in val_idx:
        d = f"{work}/data/target_val/digit{labels[i]}"
        os.makedirs(d, exist_ok=True)
        Image.fromarray(images[i, 0], mode="L").save(f"{d}/{i:04d}.png")

    torch.manual_seed(0)
    torch.jit.script(DigitsCNN(6)).save(f"{work}/models/source.pt")
    torch.jit.script(DigitsCNN(4)).save(f"{work}/models/student.pt")
    torch.jit.script(TinyCNN(4)).save(f"{work}/models/tiny.pt")
    print(f"source task: digits 0-5, {src.sum()} images; target task: digits 6-9, "
          f"{len(train_idx)} labelled ({shots} per class), {len(pool_idx)} unlabelled, {len(val_idx)} for validation")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10)
