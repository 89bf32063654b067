#!/usr/bin/env bash
# Sets up everything ferry needs on a fresh Debian machine, idempotently:
# system packages, the Python venv with the pinned torch wheel (ferryd links its libtorch),
# and a debug build of the workspace. Re-running skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# System packages: a C++ compiler for the TorchScript shim, Python's venv, promtool for
# checking the metrics exposition in tests, etcd for the etcd store's tests, and protoc (with
# its well-known types) for etcd-client's build script.
need=()
command -v g++ >/dev/null || need+=(g++)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v promtool >/dev/null || need+=(prometheus)
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/*.proto) come with libprotobuf-dev, which
# --no-install-recommends leaves out; etcd-client's protos import them.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  log "installing system packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Python venv with the pinned wheels; a stamp records which requirements it holds.
stamp=.venv/.ferry-requirements
if [ ! -x .venv/bin/python ] || ! cmp -s scripts/requirements.txt "$stamp"; then
  log "installing Python packages into .venv (torch 2.11.0 is ~4.6 GB; a few minutes)"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements.txt
  cp scripts/requirements.txt "$stamp"
fi

# A second venv for checking the Helm chart (tests/chart/check_chart.py): helm-python-sdk,
# kubernetes-validate and checkov, whose pins must not touch .venv. FERRY_CHART_VENV=0 skips
# it (the image build does).
stamp=.venv-chart/.ferry-requirements
if [ "${FERRY_CHART_VENV:-1}" != 0 ] && { [ ! -x .venv-chart/bin/python ] || ! cmp -s scripts/requirements-chart.txt "$stamp"; }; then
  log "installing the chart checks' Python packages into .venv-chart"
  [ -x .venv-chart/bin/python ] || python3 -m venv .venv-chart
  .venv-chart/bin/pip install -q --disable-pip-version-check -r scripts/requirements-chart.txt
  cp scripts/requirements-chart.txt "$stamp"
fi

# A third venv for the API fuzzer (schemathesis) that a test runs against a live daemon.
stamp=.venv-api/.ferry-requirements
if [ ! -x .venv-api/bin/python ] || ! cmp -s scripts/requirements-api.txt "$stamp"; then
  log "installing the API fuzzer (schemathesis) into .venv-api"
  [ -x .venv-api/bin/python ] || python3 -m venv .venv-api
  .venv-api/bin/pip install -q --disable-pip-version-check -r scripts/requirements-api.txt
  cp scripts/requirements-api.txt "$stamp"
fi

log "building ferry (first build: ~5 minutes on 2 cores)"
cargo build --workspace --quiet
log "set-up done: binaries in target/debug (ferryd, ferryctl)"
