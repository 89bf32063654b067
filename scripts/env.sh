# Source this to build ferry by hand: `. scripts/env.sh && cargo build --workspace`.
# torch-sys finds libtorch in the venv's torch wheel (LIBTORCH_USE_PYTORCH=1, python on PATH).
FERRY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FERRY_ROOT
export LIBTORCH_USE_PYTORCH=1
export PATH="$FERRY_ROOT/.venv/bin:$FERRY_ROOT/target/debug:$PATH"
export FERRY_PYTHON="$FERRY_ROOT/.venv/bin/python"
