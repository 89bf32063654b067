"""ferry's cluster-mode recovery from a node fault, measured as torchrun_faults.py measures torchrun's.

  ferry_faults.py run WORK FAULT --bin DIR [--batch B] [--threads T] [--ttl-ms MS] [--timeout-s S]

WORK is a directory made by `train_throughput.py prepare WORK`; DIR holds ferryd and ferryctl
(release builds). The driver starts etcd (Debian's) on free loopback ports and 3 ferryd nodes on
127.0.0.11-13, each in its own process group as if on its own host, with the node lease TTL MS
(default 5000, ferryd's default) and one shared outputs root. It submits a job of 3 ranks on
`nodes: 3, min_nodes: 1` that trains train_throughput.py's model on its data as the torchrun peer
does (SGD lr 0.01 momentum 0.9, B samples per rank, a checkpoint every 20 steps), and after 30
steps on 3 nodes injects FAULT at T0:
  kill         kill -9 a node that neither coordinates nor hosts rank 0: ferryd and its ranks
  stop         SIGSTOP such a node (SIGCONT after the measurement)
  coordinator  kill -9 the node that coordinates the cluster (it hosts a rank too)
Before the fault it counts etcd's requests over 10 s of training (its own metrics: the
store traffic per training step, with progress written at ferryd's default rate). It
measures the seconds from T0 until the survivors complete a training step again (the first
step of the next generation, from metrics.jsonl), until the coordinator ended the generation (it
noticed), until another node coordinates (coordinator), the world size after, and the steps
lost (the step the next generation resumed from against the last step the survivors held, from
the job's events). Progress goes to stderr, the results as one JSON line to stdout; every
process it started is killed when it ends.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime

ADDRS = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
WARMUP_STEPS = 30
CHECKPOINT_EVERY = 20
TRAFFIC_WINDOW_S = 10


def log(msg):
    print(f"[ferry {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port(ip="127.0.0.1"):
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def post_job(url, spec, timeout=10):
    req = urllib.request.Request(f"{url}/v1/jobs", data=spec.encode(), method="POST",
                                 headers={"Content-Type": "application/yaml"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def etcd_requests(etcd_url):
    """Unary requests etcd has served (every get, put, txn, lease grant...), from its metrics."""
    with urllib.request.urlopen(f"{etcd_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith("grpc_server_handled_total{") and 'grpc_type="unary"' in l)


def event_time(e):
    return datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp()


class Cluster:
    """etcd and a ferryd node on each of `addrs` (three by default), each in a process group
    of its own."""

    def __init__(self, work, bindir, ttl_ms, addrs=ADDRS):
        self.work, self.procs = work, []
        self.etcd_dir = os.path.join(work, "ferry-etcd")
        shutil.rmtree(self.etcd_dir, ignore_errors=True)
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self.etcd = self.spawn(["etcd", "--data-dir", self.etcd_dir, "--name", "bench",
                                "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
                                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                                "--initial-cluster", f"bench=http://127.0.0.1:{peer}"], "ferry-etcd.log")
        self.wait(lambda: get(f"{self.etcd_url}/health")["health"] == "true", "etcd")
        self.out = os.path.join(work, "ferry-out")
        shutil.rmtree(self.out, ignore_errors=True)
        os.makedirs(self.out)
        cluster = f"bench-{uuid.uuid4().hex[:8]}"
        self.urls, self.nodes = [], []
        for i, ip in enumerate(addrs):
            port = free_port(ip)
            data = os.path.join(work, f"ferry-node{i}")
            shutil.rmtree(data, ignore_errors=True)
            env = dict(os.environ, FERRY_ROOTS__DATA=work, FERRY_ROOTS__MODELS=work, FERRY_ROOTS__OUTPUTS=self.out,
                       FERRY_NODE_TTL_MS=str(ttl_ms))
            for k in ("FERRY_TOKEN", "FERRY_CONFIG", "FERRY_ETCD", "FERRY_CLUSTER"):
                env.pop(k, None)
            self.nodes.append(self.spawn(
                [os.path.join(bindir, "ferryd"), "--etcd", self.etcd_url, "--cluster", cluster,
                 "--node-name", f"n{i}", "--data-plane-ip", ip, "--listen", f"{ip}:{port}", "--data-dir", data],
                f"ferry-node{i}.log", env))
            self.urls.append(f"http://{ip}:{port}")
        self.wait(lambda: len(get(f"{self.urls[0]}/v1/nodes")["nodes"]) == len(addrs),
                  f"{len(addrs)} registered nodes")

    def spawn(self, cmd, logname, env=None):
        with open(os.path.join(self.work, logname), "w") as logf:
            p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def wait(self, ok, what, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if ok():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"{what}: not within {timeout} s (logs in {self.work})")

    def close(self):
        for p in self.procs:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            p.wait()


def metrics_lines(path):
    try:
        with open(path) as f:
            return [json.loads(l) for l in f if l.strip()]
    except (OSError, ValueError):
        return []


def run(a):
    c = Cluster(a.work, a.bin, a.ttl_ms)
    try:
        return measure(a, c)
    finally:
        c.close()


def measure(a, c):
    name = f"faults-{uuid.uuid4().hex[:6]}"
    spec = (f"name: {name}\nmodel: {{arch: torchscript, path: models/bench.pt}}\n"
            f"data: {{train: {{path: data/bench.safetensors}}}}\n"
            f"train: {{epochs: 1000, batch_size: {a.batch}, checkpoint_every_steps: {CHECKPOINT_EVERY}, "
            f"optimizer: {{name: sgd, lr: 0.01, momentum: 0.9}}}}\n"
            f"resources: {{ranks: 3, nodes: 3, min_nodes: 1, threads: {a.threads}}}\noutput: {{dir: {name}}}\n")
    job = post_job(c.urls[0], spec)
    jid = job["id"]
    api = lambda i, path: get(f"{c.urls[i]}{path}")
    c.wait(lambda: api(0, f"/v1/jobs/{jid}")["status"]["step"] >= WARMUP_STEPS, f"{WARMUP_STEPS} steps", 300)
    # Store traffic while it trains: etcd's own count of requests over a window of steps.
    r0, s0, t = etcd_requests(c.etcd_url), api(0, f"/v1/jobs/{jid}")["status"]["step"], time.time()
    time.sleep(TRAFFIC_WINDOW_S)
    r1, s1, t = etcd_requests(c.etcd_url), api(0, f"/v1/jobs/{jid}")["status"]["step"], time.time() - t
    traffic = {"etcd_requests_per_s": round((r1 - r0) / t, 2),
               "etcd_requests_per_step": round((r1 - r0) / max(1, s1 - s0), 3), "steps_per_s": round((s1 - s0) / t, 2)}
    before = api(0, f"/v1/jobs/{jid}")
    gen0, placed = before["generation"], [p["node"] for p in before["placement"]]
    coord = api(0, "/v1/nodes").get("coordinator")
    if a.fault == "coordinator":
        victim = int(coord[1:])
    else:
        victim = next(i for i in range(3) if f"n{i}" != coord and f"n{i}" != placed[0])
    witness = next(i for i in range(3) if i != victim)
    log(f"generation {gen0} on {placed}, coordinator {coord}; {a.fault} n{victim} at step {before['status']['step']}")
    t0 = time.time()
    os.killpg(c.nodes[victim].pid, signal.SIGSTOP if a.fault == "stop" else signal.SIGKILL)

    metrics = os.path.join(c.out, name, "metrics.jsonl")
    res = {"system": "ferry", "fault": a.fault, "ttl_s": a.ttl_ms / 1000, "recovered": False,
           "seconds_to_next_step": None, "seconds_to_notice": None, "seconds_to_coordinator": None,
           "steps_lost": None, "world_after": None, "job_survived": False, **traffic}
    deadline = t0 + a.timeout_s
    while time.time() < deadline:
        if a.fault == "coordinator" and res["seconds_to_coordinator"] is None:
            try:
                now = api(witness, "/v1/nodes").get("coordinator")
                if now and now != coord:
                    res["seconds_to_coordinator"] = round(time.time() - t0, 2)
                    log(f"{now} coordinates after {res['seconds_to_coordinator']} s")
            except OSError:
                pass
        first = next((l for l in metrics_lines(metrics) if l.get("generation", 0) > gen0 and "step" in l
                      and "loss" in l), None)
        if first is not None and (a.fault != "coordinator" or res["seconds_to_coordinator"] is not None):
            res["recovered"] = res["job_survived"] = True
            res["seconds_to_next_step"] = round(first["time"] - t0, 2)
            break
        time.sleep(0.05)
    after = api(witness, f"/v1/jobs/{jid}")
    events = api(witness, f"/v1/jobs/{jid}/events?limit=10000")["events"]
    for e in events:
        e["data"] = e.get("data") or {}
    ended = next((e for e in events if e["message"].startswith(f"generation {gen0} ended")), None)
    if ended:
        res["seconds_to_notice"] = round(event_time(ended) - t0, 2)
    rescue = next((e for e in events if e["data"].get("rescue") and e["data"].get("generation") == gen0), None)
    resumed = next((e for e in events if e["message"].startswith("training resumed")
                    and e["data"].get("generation", 0) > gen0), None)
    if resumed:
        start = resumed["data"]["start_step"]
        held = rescue["data"]["step"] if rescue else None
        # With a survivor's save, what was lost is the step in flight; without, the steps since the checkpoint.
        res["steps_lost"] = max(0, held - start) if held is not None else resumed["data"]["steps_lost"]
        res["resumed_from_step"], res["survivors_held_step"] = start, held
    res["world_after"] = len(after["placement"]) or None
    if after["phase"] in ("Failed", "Cancelled"):
        res["notes"] = f"the job {after['phase']}: {after['status'].get('failure')}"
    if a.fault == "stop":
        os.killpg(c.nodes[victim].pid, signal.SIGCONT)
    log(json.dumps(res))
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("work")
    r.add_argument("fault", choices=["kill", "stop", "coordinator"])
    r.add_argument("--bin", required=True)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--ttl-ms", type=int, default=5000)
    r.add_argument("--timeout-s", type=float, default=120)
    a = p.parse_args()
    print(json.dumps(run(a)), flush=True)


if __name__ == "__main__":
    main()
