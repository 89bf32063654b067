"""The PyTorch peer of the model-quality benchmark: demo/jobs/real/fine-tune.yaml's plain
fine-tuning written as the usual PyTorch loop, from the same files.

The same start (mobilenet_v2.pt with its fresh head, the ImageNet weights without their
head), the same images in the same order (ferry's sampler: SplitMix64 Fisher-Yates seeded by
(seed, epoch)), SGD(lr 0.003, momentum 0.9, weight_decay 5e-4) with ferry's per-step cosine
schedule, batch 10, 15 epochs, then the final model on the validation and test folders.
What differs from ferry is only what cannot be shared: the dropout draws of the head.

Usage: finetune_peer.py WORK_DIR SEED [THREADS]; prints one JSON line {seed, val, test}.
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

MASK = (1 << 64) - 1
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class SplitMix64:
    """ferry's sampler generator (daemon/src/train/sampler.rs), bit for bit."""

    def __init__(self, state: int):
        self.state = state & MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        zone = MASK - (MASK % n)
        while True:
            v = self.next()
            if v < zone:
                return v % n


def order(n: int, seed: int, epoch: int) -> list:
    v = list(range(n))
    rng = SplitMix64(seed ^ (((epoch + 1) * 0xD1B54A32D192ED03) & MASK))
    for i in range(n - 1, 0, -1):
        j = rng.below(i + 1)
        v[i], v[j] = v[j], v[i]
    return v


def folder(root: str):
    """An ImageFolder in ferry's order: classes sorted, then files sorted."""
    xs, ys = [], []
    for k, c in enumerate(sorted(os.listdir(root))):
        for f in sorted(os.listdir(os.path.join(root, c))):
            xs.append(np.asarray(Image.open(os.path.join(root, c, f)).convert("RGB"), dtype=np.float32) / 255.0)
            ys.append(k)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    return (x - MEAN) / STD, torch.tensor(ys)


def main(work: str, seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data = os.path.join(work, "data", "fmnist")
    xt, yt = folder(os.path.join(data, "train"))
    model = torch.jit.load(os.path.join(work, "models", "mobilenet_v2.pt"))
    state = load_file(os.path.join(work, "models", "mobilenet_v2_imagenet.safetensors"))
    own = model.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            if not name.startswith("classifier"):
                own[name].copy_(t)
    opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9, weight_decay=5e-4)
    epochs, batch = 15, 10
    steps_per_epoch = math.ceil(len(yt) / batch)
    total = epochs * steps_per_epoch
    step = 0
    for epoch in range(epochs):
        model.train()
        ix = order(len(yt), seed, epoch)
        for at in range(0, len(ix), batch):
            for g in opt.param_groups:
                g["lr"] = 0.003 * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
            b = torch.tensor(ix[at:at + batch])
            loss = F.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    out = {"seed": seed}
    for split in ("val", "test"):
        x, y = folder(os.path.join(data, split))
        with torch.no_grad():
            pred = torch.cat([model(x[i:i + 200]).argmax(1) for i in range(0, len(y), 200)])
        out[split] = (pred == y).float().mean().item()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2)
