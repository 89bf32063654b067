"""Data and models of ferry's distillation benchmark (scripts/bench-distill.sh).

  distill.py prepare DIR   writes DIR/models/student.pt (BenchCNN, 3x32x32, 100 classes,
                           ~150k parameters), DIR/models/teacher.pt (the same design 1.5x
                           wider, ~330k parameters) and DIR/data/bench.safetensors (4096
                           synthetic uint8 images, labels 0-99)
  distill.py report DIR    reads the jobs' metrics.jsonl files and prints the ratios
"""
import json
import os
import statistics
import sys

import torch
from safetensors.torch import save_file

from train_throughput import BenchCNN


def prepare(d):
    os.makedirs(f"{d}/models", exist_ok=True)
    os.makedirs(f"{d}/data", exist_ok=True)
    torch.manual_seed(0)
    torch.jit.script(BenchCNN(1.0, 100)).save(f"{d}/models/student.pt")
    torch.jit.script(BenchCNN(1.5, 100)).save(f"{d}/models/teacher.pt")
    g = torch.Generator().manual_seed(0)
    save_file({"images": torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8, generator=g),
               "labels": torch.randint(0, 100, (4096,), generator=g)}, f"{d}/data/bench.safetensors")


def records(d, name):
    with open(f"{d}/runs/{name}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def report(d):
    with open(f"{d}/throughput.txt") as f:
        rounds = [line.split() for line in f if line.strip()]
    plain = [float(r[1]) for r in rounds]
    distilled = [float(r[2]) for r in rounds]
    p, q = statistics.median(plain), statistics.median(distilled)
    print("1. student throughput with the remote teacher (no cache: a round trip every step)")
    for i, (a, b) in enumerate(zip(plain, distilled), 1):
        print(f"   round {i}: without distillation {a:8.1f} samples/s, with the teacher {b:8.1f} samples/s")
    waits = [[r["distill"] for r in records(d, f"distill-{i}") if r.get("distill") and "step" not in r][-1]["teacher_wait_fraction"]
             for i in range(1, len(rounds) + 1)]
    print(f"   median: {p:.1f} vs {q:.1f}; ratio distilled/plain = {q / p:.3f} (goal >= 0.95); "
          f"time blocked on the teacher: {', '.join(f'{w * 100:.1f}%' for w in waits)}")
    print("2. bytes on the wire per sample (request + response, framing included)")
    for mode, k in [("index", 10), ("index", 0), ("tensor", 10), ("tensor", 0)]:
        s = [r["distill"] for r in records(d, f"bytes-{mode}-{k}") if r.get("distill") and "step" not in r][-1]
        per = (s["bytes_sent"] + s["bytes_received"]) / s["samples_fetched"]
        label = f"{mode} mode, {'top-10' if k else 'all 100 classes'}"
        print(f"   {label:<32} {per:10.1f} bytes/sample  (sent {s['bytes_sent']}, received {s['bytes_received']}, {s['samples_fetched']} samples)")
    print("3. the soft-label cache: epoch 2 (all hits) against epoch 1 (every sample from the teacher)")
    eps = {r["epoch"]: r["epoch_samples_per_sec"] for r in records(d, "cache") if "epoch_samples_per_sec" in r}
    hit = [r["distill"] for r in records(d, "cache") if r.get("distill") and "step" not in r][-1]["cache_hit_rate"]
    print(f"   epoch 1 {eps[1]:.1f} samples/s, epoch 2 {eps[2]:.1f} samples/s, ratio {eps[2] / eps[1]:.3f}; "
          f"cache hit rate over the job {hit:.3f}")


if __name__ == "__main__":
    {"prepare": prepare, "report": report}[sys.argv[1]](sys.argv[2])
