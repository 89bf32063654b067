"""The end-to-end input benchmark's peer and data (scripts/bench-input-e2e.sh, and the input
step of scripts/gpu-check.sh): training from a folder of JPEGs, augmented on the fly.

  input_e2e.py prepare DIR JPEGS MODEL SIZE
      writes DIR/models/MODEL.pt (TorchScript torchvision MODEL: resnet18 or resnet50, with as
      many classes as JPEGS has class folders) and DIR/data/decoded.safetensors: every image of
      the ImageFolder JPEGS decoded once and resized to SIZE x SIZE (uint8), with its label: the
      same job's input with nothing left to do per step
  input_e2e.py torch DIR JPEGS MODEL DEVICE SIZE EPOCHS BATCH PRECISION THREADS WORKERS
      trains the same model, from the same weights, with DataLoader over torchvision's
      ImageFolder with WORKERS worker processes (pin_memory on CUDA) and the transforms of
      ferry's `augment: imagenet`: RandomResizedCrop(SIZE), RandomHorizontalFlip, ToTensor,
      Normalize (ImageNet mean and std); shuffled; SGD(lr 0.01, momentum 0.9); forward under
      torch.autocast(PRECISION) unless fp32. THREADS is torch's intra-op threads. Prints
      samples/s over all steps and over the epochs after the first, and the fraction of the
      step time spent waiting for the next batch and copying it (its data wait).
  input_e2e.py spec NAME jpeg|tensors PREFIX MODEL DEVICE SIZE EPOCHS BATCH PRECISION THREADS WORKERS [MAX_STEPS]
      prints ferry's job spec for the same training, from PREFIX/data/jpegs (decoded and
      augmented per batch by WORKERS decode threads) or from PREFIX/data/decoded.safetensors
  input_e2e.py rates METRICS_JSONL
      prints a ferry job's samples/s over all epochs and over the epochs after the first, and
      its data part's share of step time (from its metrics.jsonl), as `torch` prints them
"""
import os
import sys
import time

import torch
from safetensors.torch import save_file

from gpu_throughput import train_step

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def model_for(name, classes):
    import torchvision
    return getattr(torchvision.models, name)(num_classes=classes)


def prepare(d, jpegs, model, size):
    import numpy as np
    from PIL import Image
    from torchvision import datasets
    os.makedirs(f"{d}/models", exist_ok=True)
    os.makedirs(f"{d}/data", exist_ok=True)
    ds = datasets.ImageFolder(jpegs)
    torch.manual_seed(0)
    torch.jit.script(model_for(model, len(ds.classes))).save(f"{d}/models/{model}.pt")
    images = torch.empty((len(ds), 3, size, size), dtype=torch.uint8)
    for i, (p, _) in enumerate(ds.samples):
        img = Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)
        images[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    save_file({"images": images, "labels": torch.tensor(ds.targets)}, f"{d}/data/decoded.safetensors")


def run(d, jpegs, model, device, size, epochs, batch, precision, threads, workers):
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    torch.set_num_threads(threads)
    dev = torch.device(device)
    ds = datasets.ImageFolder(jpegs, transform=transforms.Compose([
        transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD)]))
    scripted = torch.jit.load(f"{d}/models/{model}.pt", map_location="cpu")
    m = model_for(model, len(ds.classes))
    m.load_state_dict(scripted.state_dict())
    m = m.to(dev).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                        pin_memory=dev.type == "cuda", persistent_workers=workers > 0,
                        prefetch_factor=2 if workers > 0 else None)
    seen, busy, wait, first = 0, 0.0, 0.0, None
    for _ in range(epochs):
        t0 = time.perf_counter()
        it = iter(loader)
        while True:
            w0 = time.perf_counter()
            try:
                xb, yb = next(it)
            except StopIteration:
                break
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            wait += time.perf_counter() - w0
            train_step(m, opt, xb, yb, dtype, scaler)
            seen += len(yb)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        busy += time.perf_counter() - t0
        first = first or (seen, busy)
    steady = (seen - first[0]) / (busy - first[1]) if epochs > 1 else float("nan")
    print(f"{seen / busy:.2f} {steady:.2f} {wait / busy:.4f}")


def spec(name, form, prefix, model, device, size, epochs, batch, precision, threads, workers, max_steps=None):
    norm = f"normalize: {{mean: {MEAN}, std: {STD}}}"
    if form == "jpeg":
        data = (f"{{train: {{path: {prefix}/data/jpegs}}, image_size: {size}, augment: imagenet, "
                f"decode_threads: {workers}, {norm}}}")
    else:
        data = f"{{train: {{path: {prefix}/data/decoded.safetensors}}, {norm}}}"
    print(f"""name: {name}
model: {{arch: torchscript, path: {prefix}/models/{model}.pt}}
data: {data}
train: {{epochs: {epochs}, batch_size: {batch}, precision: {precision}, optimizer: {{name: sgd, lr: 0.01, momentum: 0.9}}{f", max_steps: {max_steps}" if max_steps else ""}}}
resources: {{device: {device}, threads: {threads}}}
output: {{dir: runs/{name}}}""")


def rates(path):
    import json
    recs = [json.loads(line) for line in open(path)]
    eps = [r["epoch_samples_per_sec"] for r in recs if "epoch_samples_per_sec" in r]
    # Equal epochs: samples/s over several is their harmonic mean.
    allr = len(eps) / sum(1 / v for v in eps)
    steady = len(eps[1:]) / sum(1 / v for v in eps[1:]) if len(eps) > 1 else float("nan")
    # The data part's share of the step, over the progress windows weighted by their steps.
    data = total = 0.0
    prev = 0
    for r in recs:
        if "step_seconds" in r:
            n, prev = r["step"] - prev, r["step"]
            data += n * r["step_seconds"]["data"]
            total += n * sum(r["step_seconds"].values())
    print(f"{allr:.2f} {steady:.2f} {data / max(total, 1e-12):.4f}")


if __name__ == "__main__":
    cmd, d = sys.argv[1], sys.argv[2]
    if cmd == "prepare":
        prepare(d, sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif cmd == "spec":
        spec(*sys.argv[2:])
    elif cmd == "rates":
        rates(d)
    else:
        a = sys.argv[3:]
        run(d, a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]), a[6], int(a[7]), int(a[8]))
