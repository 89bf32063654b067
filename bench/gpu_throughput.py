"""The peer of ferry's GPU training benchmark (scripts/gpu-check.sh), and its data.

  gpu_throughput.py prepare DIR MODEL N SIZE
      writes DIR/models/MODEL.pt (TorchScript; MODEL: resnet50 from torchvision, 1000 classes,
      or benchcnn, the small CNN of the CPU benchmarks, for a dry run without torchvision) and
      DIR/data/synthetic.safetensors (N random uint8 images 3xSIZExSIZE, random labels)
  gpu_throughput.py torch DIR MODEL DEVICE EPOCHS BATCH PRECISION THREADS [eager|script]
      trains the same model, with the same initial weights, on the same data with a plain
      PyTorch loop: eager (default; the model rebuilt in Python and given the TorchScript
      file's weights) or the TorchScript file itself under the optimising JIT (as ferry runs
      it with model.jit_optimize: true);
      data on the device once (float in [0, 1]), sequential batches (ferry's shuffle: false),
      SGD(lr 0.01, momentum 0.9), forward under torch.autocast(PRECISION) unless fp32, fp16
      with torch.amp.GradScaler, zero_grad(set_to_none=True). Prints two numbers: samples/s
      over all training steps, and over the epochs after the first (steady state: the first
      pays for warm-up, cuDNN's algorithm search and, under the JIT, profiling runs); the
      device is synchronised at the end of each epoch (as ferry does).
"""
import sys
import time

import torch
from safetensors.torch import load_file, save_file

from train_throughput import BenchCNN


def prepare(d, model, n, size):
    import os
    os.makedirs(f"{d}/models", exist_ok=True)
    os.makedirs(f"{d}/data", exist_ok=True)
    torch.manual_seed(0)
    if model == "resnet50":
        import torchvision
        m, classes = torchvision.models.resnet50(num_classes=1000), 1000
    else:
        m, classes = BenchCNN(), 10
    torch.jit.script(m).save(f"{d}/models/{model}.pt")
    g = torch.Generator().manual_seed(0)
    save_file({"images": torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
               "labels": torch.randint(0, classes, (n,), generator=g)}, f"{d}/data/synthetic.safetensors")


def train_step(m, opt, xb, yb, dtype, scaler):
    """One step as a user writes it: forward under autocast to `dtype` (None: fp32), the
    loss in fp32, zero_grad(set_to_none=True), backward and step (through `scaler` for fp16)."""
    dev = xb.device
    with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = m(xb)
    loss = torch.nn.functional.cross_entropy(out.float(), yb)
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def eager_model(model):
    if model == "resnet50":
        import torchvision
        return torchvision.models.resnet50(num_classes=1000)
    return BenchCNN()


def run(d, model, device, epochs, batch, precision, threads, mode="eager"):
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    dev = torch.device(device)
    m = torch.jit.load(f"{d}/models/{model}.pt", map_location=dev)
    if mode == "eager":
        scripted, m = m, eager_model(model).to(dev)
        m.load_state_dict(scripted.state_dict())
    elif mode != "script":
        sys.exit(f"unknown mode {mode!r}: eager or script")
    m.train()
    data = load_file(f"{d}/data/synthetic.safetensors")
    x, y = (data["images"].float() / 255.0).to(dev), data["labels"].to(dev)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
    n, seen, busy, first = len(y), 0, 0.0, None
    for _ in range(epochs):
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            idx = torch.arange(i, min(i + batch, n), device=dev)
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            train_step(m, opt, xb, yb, dtype, scaler)
            seen += len(idx)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        busy += time.perf_counter() - t0
        first = first or (seen, busy)
    steady = (seen - first[0]) / (busy - first[1]) if epochs > 1 else float("nan")
    if scaler is not None:
        # Each skipped step halves the scale from 65536 (no growth within 2000 steps), so the
        # final scale tells how many steps were skipped, read once, outside the timing.
        print(f"fp16: final loss scale {scaler.get_scale()}", file=sys.stderr)
    print(f"{seen / busy:.2f} {steady:.2f}")


if __name__ == "__main__":
    cmd, d = sys.argv[1], sys.argv[2]
    if cmd == "prepare":
        prepare(d, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        run(d, sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7], int(sys.argv[8]),
            *sys.argv[9:10])
