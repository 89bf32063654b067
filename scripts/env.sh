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
