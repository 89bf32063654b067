"""All-reduce bus bandwidth of torch.distributed with Gloo, the peer of ferry's ring benchmark.
Usage: allreduce_gloo.py WORLD SIZES_BYTES(comma-separated) ITERS
Prints `size_bytes seconds_per_op busbw_GBps` per size (busbw = bytes/time * 2(n-1)/n)."""
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, world, port, sizes, iters):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for size in sizes:
        buf = torch.ones(size // 4, dtype=torch.float32)
        for _ in range(2):
            dist.all_reduce(buf)
        # At least ITERS operations and about half a second, the same count on every rank.
        t0 = time.perf_counter()
        for _ in range(3):
            dist.all_reduce(buf)
        each = (time.perf_counter() - t0) / 3
        count = torch.tensor([max(iters, int(0.5 / each) + 1)], dtype=torch.float64)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        n = int(count.item())
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(buf)
        dt = (time.perf_counter() - t0) / n
        if rank == 0:
            print(f"{size} {dt:.6e} {size / dt * 2 * (world - 1) / world / 1e9:.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    world, sizes, iters = int(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(world, port, sizes, iters), nprocs=world)
