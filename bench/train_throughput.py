"""The peer of ferry's training-throughput benchmark, and its data.

  train_throughput.py prepare DIR [cnn|mlp]
                                    writes DIR/models/bench.pt (TorchScript BenchCNN, or with mlp
                                    BenchMLP; 3x32x32 in, 10 classes) and DIR/data/bench.safetensors
                                    (4096 synthetic uint8 images)
  train_throughput.py torch DIR EPOCHS BATCH THREADS
                                    trains the same model on the same data with a plain PyTorch
                                    loop (SGD, momentum 0.9, sequential batches as in ferry's job
                                    with shuffle: false) and prints samples/s over the training steps
  torchrun --nproc-per-node N train_throughput.py ddp DIR EPOCHS BATCH THREADS
                                    the same with DistributedDataParallel over Gloo: rank r takes
                                    its contiguous part of each global batch of N*BATCH samples (as
                                    ferry does); rank 0 prints global samples/s over the steps
Both peers run the TorchScript graph op by op, as ferry does by default (model.jit_optimize:
false), so the comparison is of the two runtimes, not of two ways of executing the graph
(scripts/bench-jit.sh measures that).
"""
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file


class BenchCNN(torch.nn.Module):
    """5 conv-BN-ReLU blocks (32-128 channels times `width`) and a linear head."""

    def __init__(self, width: float = 1.0, classes: int = 10):
        super().__init__()
        c = [int(w * width) for w in (32, 32, 64, 64, 128)]

        def block(i, o):
            return [torch.nn.Conv2d(i, o, 3, padding=1, bias=False), torch.nn.BatchNorm2d(o), torch.nn.ReLU()]
        self.features = torch.nn.Sequential(
            *block(3, c[0]), *block(c[0], c[1]), torch.nn.MaxPool2d(2),
            *block(c[1], c[2]), *block(c[2], c[3]), torch.nn.MaxPool2d(2),
            *block(c[3], c[4]), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.classifier = torch.nn.Linear(c[4], classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class BenchMLP(torch.nn.Module):
    """Two hidden layers of 2048 on the flattened image: ~10.5M parameters (42 MB of fp32
    gradients) against little compute, so that gradient communication is a large part of a step."""

    def __init__(self, hidden: int = 2048, classes: int = 10):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


def prepare(d, model="cnn"):
    os.makedirs(f"{d}/models", exist_ok=True)
    os.makedirs(f"{d}/data", exist_ok=True)
    torch.manual_seed(0)
    torch.jit.script(BenchMLP() if model == "mlp" else BenchCNN()).save(f"{d}/models/bench.pt")
    g = torch.Generator().manual_seed(0)
    save_file({"images": torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, generator=g),
               "labels": torch.randint(0, 10, (4096,), generator=g)}, f"{d}/data/bench.safetensors")


def set_threads(threads):
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def load(d):
    """The TorchScript model in d (training mode, run op by op) and the data: images as floats in
    [0, 1], labels."""
    torch._C._set_graph_executor_optimize(False)
    model = torch.jit.load(f"{d}/models/bench.pt")
    model.train()
    data = load_file(f"{d}/data/bench.safetensors")
    return model, data["images"].float() / 255.0, data["labels"]


def run_torch(d, epochs, batch, threads):
    set_threads(threads)
    model, x, y = load(d)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n, seen, busy = len(y), 0, 0.0
    for _ in range(epochs):
        for i in range(0, n, batch):
            t0 = time.perf_counter()
            idx = torch.arange(i, min(i + batch, n))
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            busy += time.perf_counter() - t0
            seen += len(idx)
    print(f"{seen / busy:.2f}")


def run_ddp(d, epochs, batch, threads):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    set_threads(threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, x, y = load(d)
    model = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n, seen, busy = len(y), 0, 0.0
    dist.barrier()
    for _ in range(epochs):
        for i in range(0, n, batch * world):
            t0 = time.perf_counter()
            g = min(batch * world, n - i)
            lo = i + rank * g // world
            idx = torch.arange(lo, i + (rank + 1) * g // world)
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            busy += time.perf_counter() - t0
            seen += g
    if rank == 0:
        print(f"{seen / busy:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "cnn")
    elif sys.argv[1] == "ddp":
        run_ddp(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        run_torch(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
