"""Data-parallel training across two "hosts" (127.0.0.11 and .12), one rank each, so that every
gradient crosses between hosts over TCP: ferry's cluster mode against torchrun + DDP over Gloo.

  cluster_throughput.py ferry WORK --bin DIR [--compression none|bf16|fp16] [--epochs E]
                        [--batch B] [--threads T]
      starts etcd and a ferryd node on each address (ferry_faults.Cluster), submits a job of
      2 ranks on 2 nodes that trains train_throughput.py's model on its data (SGD lr 0.01,
      momentum 0.9, B samples per rank, sequential batches) and prints one JSON line with the
      job's samples/s, its last loss and the links the ranks measured
  cluster_throughput.py torchrun WORK [--epochs E] [--batch B] [--threads T]
      the same with two torchrun agents (--nnodes 2, one worker each, c10d rendezvous on
      127.0.0.11, each agent on its own address) running train_throughput.py ddp

  cluster_throughput.py accuracy WORK --bin DIR [--seeds N]
      model quality with and without compression: on the same 2-node cluster, trains the demo's
      digits CNN from its initial weights on the target task (digits 6-9; WORK made by
      `demo/prepare.py WORK 100`: 100 labelled images per class) with grad_compression none,
      bf16 and fp16, seeds 0..N-1, and prints one JSON line per job with its val accuracy

WORK is otherwise a directory made by `train_throughput.py prepare WORK mlp`. Every process
started is killed when it ends.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ferry_faults import Cluster, free_port, get, post_job  # noqa: E402

HOSTS = ["127.0.0.11", "127.0.0.12"]


def ferry(a):
    c = Cluster(a.work, a.bin, 5000, HOSTS)
    try:
        name = f"xhost-{uuid.uuid4().hex[:6]}"
        spec = (f"name: {name}\nmodel: {{arch: torchscript, path: models/bench.pt}}\n"
                f"data: {{train: {{path: data/bench.safetensors}}, shuffle: false}}\n"
                f"train: {{epochs: {a.epochs}, batch_size: {a.batch}, grad_compression: {a.compression}, "
                f"optimizer: {{name: sgd, lr: 0.01, momentum: 0.9}}}}\n"
                f"resources: {{ranks: 2, nodes: 2, threads: {a.threads}}}\noutput: {{dir: {name}}}\n")
        jid = post_job(c.urls[0], spec)["id"]
        job = finish(c, jid)
        links, parts = [], {}
        for url in c.urls:
            with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if jid not in line:
                        continue
                    value = float(line.rsplit(" ", 1)[1])
                    if line.startswith("ferry_ring_link_bytes_per_second{"):
                        links.append(round(value / 1e9, 3))
                    m = re.search(r'part="(\w+)",rank="0"', line)
                    if line.startswith("ferry_rank_step_seconds{") and m:
                        parts[m[1]] = round(value * 1000, 2)
        print(json.dumps({"system": "ferry", "compression": a.compression,
                          "samples_per_sec": job["status"]["samples_per_sec"], "link_GBps": sorted(links),
                          "rank0_step_ms": parts}), flush=True)
    finally:
        c.close()


def finish(c, jid, timeout=1800):
    """Waits for job `jid` on cluster `c` to succeed and returns its record."""
    job = {}

    def done():
        nonlocal job
        job = get(f"{c.urls[0]}/v1/jobs/{jid}")
        return job["phase"] in ("Succeeded", "Failed", "Cancelled")
    c.wait(done, "the job", timeout)
    if job["phase"] != "Succeeded":
        raise SystemExit(f"ferry job {job['phase']}: {job['status'].get('failure')}")
    return job


def accuracy(a):
    c = Cluster(a.work, a.bin, 5000, HOSTS)
    try:
        for seed in range(a.seeds):
            for compression in ("none", "bf16", "fp16"):
                name = f"acc-{compression}-{seed}-{uuid.uuid4().hex[:4]}"
                spec = (f"name: {name}\nmodel: {{arch: torchscript, path: models/student.pt}}\n"
                        f"data: {{train: {{path: data/target_train.safetensors}}, val: {{path: data/target_val}}, channels: 1}}\n"
                        f"train: {{epochs: 30, batch_size: 10, seed: {seed}, grad_compression: {compression}, "
                        f"optimizer: {{name: sgd, lr: 0.02, momentum: 0.9, weight_decay: 0.0005}}, lr_schedule: {{name: cosine}}}}\n"
                        f"resources: {{ranks: 2, nodes: 2, threads: 1}}\noutput: {{dir: {name}}}\n")
                job = finish(c, post_job(c.urls[0], spec)["id"])
                print(json.dumps({"seed": seed, "compression": compression,
                                  "val_accuracy": job["status"]["val_accuracy"]}), flush=True)
    finally:
        c.close()


def torchrun(a):
    port, run_id = free_port(HOSTS[0]), f"xhost-{uuid.uuid4().hex[:8]}"
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    procs = []
    try:
        for i, addr in enumerate(HOSTS):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{HOSTS[0]}:{port}", "--rdzv-id", run_id,
                   "--rdzv-conf", f"is_host={i == 0}", "--local-addr", addr,
                   os.path.join(here, "train_throughput.py"), "ddp", a.work, str(a.epochs), str(a.batch),
                   str(a.threads)]
            log = open(os.path.join(a.work, f"torchrun-xhost{i}.log"), "w")
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE if i == 0 else log, stderr=log,
                                          env=env, start_new_session=True, text=True))
        out, _ = procs[0].communicate(timeout=1800)
        for p in procs[1:]:
            p.wait(timeout=60)
        if any(p.returncode != 0 for p in procs):
            raise SystemExit(f"torchrun failed (logs in {a.work})")
        rate = float(re.findall(r"^[0-9.]+$", out, re.M)[-1])
        print(json.dumps({"system": "torchrun", "compression": "none", "samples_per_sec": rate}), flush=True)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("system", choices=["ferry", "torchrun", "accuracy"])
    ap.add_argument("work")
    ap.add_argument("--bin")
    ap.add_argument("--compression", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    a.work = os.path.abspath(a.work)
    t0 = time.time()
    {"ferry": ferry, "torchrun": torchrun, "accuracy": accuracy}[a.system](a)
    print(f"[cluster_throughput] {a.system} took {time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
