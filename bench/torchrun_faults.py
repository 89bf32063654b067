"""torchrun elastic's recovery from a node fault, the peer of ferry's cluster-mode recovery.

  torchrun_faults.py run WORK FAULT [--steps N] [--batch B] [--threads T] [--timeout-s S]

WORK is a directory made by `train_throughput.py prepare WORK`. The driver starts 3 "nodes" on
loopback, 127.0.0.11-13, each a torchrun agent in its own process group running one worker:
`--nnodes 1:3 --nproc-per-node 1 --max-restarts 3`, c10d rendezvous with its store in node 0's
agent, torchrun's defaults otherwise. The workers (this script's `worker` role) train
train_throughput.py's model on its data with DDP over Gloo (process-group timeout 60 s; Gloo's
default is 30 min), SGD lr 0.01 momentum 0.9, B samples per rank, DistributedSampler, until N
steps. Rank 0 checkpoints every 20 steps to WORK/torchrun-ckpt.pt and a new worker resumes from
it, as a torchrun user must; every rank appends a line per step to WORK/torchrun-steps.jsonl.

After 30 steps on 3 nodes the driver injects FAULT at T0:
  kill    kill -9 node 2: its agent and its worker
  stop    SIGSTOP node 2 (SIGCONT after the measurement)
  store   kill -9 node 0, whose agent hosts the rendezvous store
and measures, for kill and stop, the seconds from T0 to the survivors' first training step (of
which: until the new workers started, and their start-up with the checkpoint load), the world
size after, and the steps lost (the last step before T0 minus the step resumed from); for store,
whether a step completes 30 s or more after T0, and when and how the surviving agents exit. It
gives up S seconds after T0. Progress goes to stderr, the results as one JSON line to stdout. A
run starts without a checkpoint, leaves the agents' logs in WORK/torchrun-node{0,1,2}.log and
kills every process it started when it ends.
"""
import time

STARTED_T = time.time()  # before the imports: a new worker's start-up includes importing torch

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import uuid
from datetime import timedelta

import torch

from train_throughput import load, set_threads

ADDRS = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
WARMUP_STEPS = 30  # steps on 3 nodes before the fault
CHECKPOINT_EVERY = 20
GLOO_TIMEOUT_S = 60
SURVIVAL_S = 30  # the store fault: the job survived if a new worker completes a step this late


def worker(a):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler
    set_threads(a.threads)
    dist.init_process_group("gloo", timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    rank, world = dist.get_rank(), dist.get_world_size()
    model, x, y = load(a.work)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    checkpoint, step = f"{a.work}/torchrun-ckpt.pt", 0
    if os.path.exists(checkpoint):
        state = torch.load(checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    model = DistributedDataParallel(model)  # broadcasts rank 0's weights
    resumed_from, first = step, {"started_t": STARTED_T, "loaded_t": time.time()}
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    sampler = DistributedSampler(range(len(y)), num_replicas=world, rank=rank, shuffle=True, seed=0)
    # The place in the epoch to resume at; exact while the world size stays the same.
    epoch, skip = divmod(step, math.ceil(len(sampler) / a.batch))
    log = open(f"{a.work}/torchrun-steps.jsonl", "a")
    while step < a.steps:
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        for i in range(skip * a.batch, len(order), a.batch):
            b = order[i:i + a.batch]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
            step += 1
            log.write(json.dumps({"t": time.time(), "step": step, "restart": restart, "world": world,
                                  "rank": rank, "resumed_from": resumed_from, **first}) + "\n")
            log.flush()
            first = {}
            if rank == 0 and step % CHECKPOINT_EVERY == 0:
                state = {"model": model.module.state_dict(), "optimizer": opt.state_dict(), "step": step}
                torch.save(state, checkpoint + ".tmp")
                os.replace(checkpoint + ".tmp", checkpoint)
            if step == a.steps:
                break
        epoch, skip = epoch + 1, 0
    dist.destroy_process_group()


def children(pid):
    """The pids of pid's child processes."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # it exited meanwhile
            continue
        if int(stat[stat.rindex(")") + 1:].split()[1]) == pid:
            kids.append(int(entry))
    return kids


class Node:
    """One torchrun agent, started in a session of its own. torchrun starts each worker in a
    session of its own too, so signalling the node means signalling both process groups."""

    def __init__(self, i, cmd, env, log_path):
        self.i, self.addr, self.exit_t = i, ADDRS[i], None
        with open(log_path, "w") as log:
            self.agent = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    def send(self, sig):
        """Sends sig to the agent's process group and its workers'. The agent is stopped first, so
        that it cannot start a worker between the listing and the signal."""
        if self.agent.poll() is not None:
            return  # it was killed with its workers, or it stopped them before it exited
        os.killpg(self.agent.pid, signal.SIGSTOP)
        for pgid in [self.agent.pid, *children(self.agent.pid)]:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass

    def exited(self):
        """Whether the agent has exited; notes when it was first seen so."""
        if self.exit_t is None and self.agent.poll() is not None:
            self.exit_t = time.time()
        return self.exit_t is not None


class StepLog:
    """The lines the workers append to WORK/torchrun-steps.jsonl, read as they come."""

    def __init__(self, path):
        self.file, self.partial, self.lines = open(path), "", []

    def poll(self):
        """The lines completed since the last call."""
        new = []
        while chunk := self.file.readline():
            self.partial += chunk
            if self.partial.endswith("\n"):
                new.append(json.loads(self.partial))
                self.partial = ""
        self.lines += new
        return new


def say(msg):
    print(f"[torchrun_faults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_nodes(a, work, nodes):
    """Starts the 3 agents, appending each to nodes at once so that the clean-up sees it."""
    port, run_id = free_port(ADDRS[0]), f"torchrun-faults-{uuid.uuid4().hex[:8]}"
    # LOGLEVEL=INFO: the agents' logs then show when each noticed the fault and each rendezvous.
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "LOGLEVEL": "INFO"}
    say(f"torch {torch.__version__}; 3 agents, rendezvous {run_id} on {ADDRS[0]}:{port} (c10d, "
        f"hosted by node 0); Gloo process-group timeout {GLOO_TIMEOUT_S} s, torchrun defaults "
        f"otherwise; batch {a.batch} per rank, {a.threads} thread(s) per worker")
    for i, addr in enumerate(ADDRS):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:3", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{ADDRS[0]}:{port}", "--rdzv-id", run_id,
               # On loopback every agent takes the endpoint for its own address and would race to
               # host the store; as on real hosts, only node 0 hosts it.
               "--rdzv-conf", f"is_host={i == 0}", "--max-restarts", "3", "--local-addr", addr,
               os.path.abspath(__file__), "worker", work, "--steps", str(a.steps),
               "--batch", str(a.batch), "--threads", str(a.threads)]
        nodes.append(Node(i, cmd, env, f"{work}/torchrun-node{i}.log"))


def measure(a, nodes, steps):
    deadline, on_3 = time.time() + a.timeout_s, set()
    while len(on_3) < WARMUP_STEPS:
        on_3.update(r["step"] for r in steps.poll() if r["world"] == 3)
        if time.time() > deadline or all(n.exited() for n in nodes):
            raise SystemExit(f"no {WARMUP_STEPS} steps on 3 nodes within {a.timeout_s} s; see the node logs")
        time.sleep(0.1)
    steps.poll()
    restart_0 = max(r["restart"] for r in steps.lines)
    victim = nodes[0] if a.fault == "store" else nodes[2]
    survivors = [n for n in nodes if n is not victim]
    sig = signal.SIGSTOP if a.fault == "stop" else signal.SIGKILL
    say(f"step {steps.lines[-1]['step']} on 3 nodes; {sig.name} to node {victim.i} ({victim.addr})"
        + (", which hosts the store" if a.fault == "store" else ""))
    t0 = time.time()
    victim.send(sig)

    # The new generation: workers that the survivors' agents restarted after T0.
    first = last = None
    while time.time() < t0 + a.timeout_s and not all(n.exited() for n in survivors):
        for r in steps.poll():
            if r["restart"] > restart_0:
                first, last = first or r, r
        if first and (a.fault != "store" or last["t"] >= t0 + SURVIVAL_S):
            break
        time.sleep(0.05)
    if a.fault == "stop":
        victim.send(signal.SIGCONT)

    notes = [f"{sig.name} to node {victim.i} ({victim.addr}); torchrun {torch.__version__} defaults "
             f"except --max-restarts 3; Gloo process-group timeout {GLOO_TIMEOUT_S} s"]
    if first is not None:
        # Each agent counts its own restarts: more than one on a node means that attempts failed
        # before training again, each spending one of --max-restarts.
        restarts, wait_until = {}, time.time() + 5
        while len(restarts) < first["world"] and time.time() < wait_until:
            steps.poll()
            restarts = {r["rank"]: r["restart"] for r in steps.lines if r["restart"] > restart_0}
            time.sleep(0.05)
        notes.append("restart counts of the new workers, by rank: " + ", ".join(
            f"{rank}: {n}" for rank, n in sorted(restarts.items())) + f" (at T0: {restart_0})")
    survived = last is not None and (a.fault != "store" or last["t"] >= t0 + SURVIVAL_S)
    exits = [n for n in survivors if n.exit_t is not None]
    if exits:
        notes.append("surviving agents exited: " + ", ".join(
            f"node {n.i} with code {n.agent.returncode} {n.exit_t - t0:.1f} s after T0" for n in exits))
    if not survived and len(exits) == len(survivors) and all(n.agent.returncode != 0 for n in exits):
        notes.append("job lost")
    elif first is None:
        notes.append(f"did not recover within {a.timeout_s} s")
    result = {"fault": a.fault, "recovered": survived, "seconds_to_next_step": None,
              "seconds_until_new_workers": None, "seconds_loading": None, "steps_lost": None,
              "world_after": None, "job_survived": survived}
    if first is not None:
        last_before = max(r["step"] for r in steps.lines if r["restart"] <= restart_0)
        result.update(seconds_to_next_step=round(first["t"] - t0, 2),
                      seconds_until_new_workers=round(first["started_t"] - t0, 2),
                      seconds_loading=round(first["loaded_t"] - first["started_t"], 2),
                      steps_lost=last_before - first["resumed_from"], world_after=first["world"])
        say(f"training again {result['seconds_to_next_step']} s after T0 on {first['world']} nodes: new "
            f"workers started at {result['seconds_until_new_workers']} s, up with the checkpoint "
            f"{result['seconds_loading']} s later, first step {first['t'] - first['loaded_t']:.2f} s "
            f"later; resumed from step {first['resumed_from']}, the last before T0 was {last_before}")
    for note in notes[1:]:
        say(note)
    result["notes"] = "; ".join(notes)
    return result


def run(a):
    work = os.path.abspath(a.work)
    for name in ("torchrun-ckpt.pt", "torchrun-ckpt.pt.tmp"):
        if os.path.exists(f"{work}/{name}"):
            os.remove(f"{work}/{name}")
    open(f"{work}/torchrun-steps.jsonl", "w").close()
    steps = StepLog(f"{work}/torchrun-steps.jsonl")
    # A SIGTERM to the driver unwinds like Ctrl-C, through the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    nodes = []
    try:
        start_nodes(a, work, nodes)
        result = measure(a, nodes, steps)
    finally:
        for n in nodes:
            n.send(signal.SIGKILL)
        for n in nodes:
            n.agent.wait()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role", required=True)
    for role in ("run", "worker"):
        s = sub.add_parser(role)
        s.add_argument("work")
        if role == "run":
            s.add_argument("fault", choices=["kill", "stop", "store"])
            s.add_argument("--timeout-s", type=float, default=240)
        s.add_argument("--steps", type=int, default=100000)
        s.add_argument("--batch", type=int, default=32)
        s.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    (run if args.role == "run" else worker)(args)
