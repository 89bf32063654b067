#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs the whole test suite: formatting, lints,
# unit tests and the process-level tests (real ferryd and ferryctl processes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/env.sh

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> ferryctl and ferry-cluster never link libtorch; ferryctl never links etcd" >&2
for crate in ferry-ctl ferry-cluster; do
  if cargo tree -p "$crate" -e normal --prefix none | grep -qE '^(tch|torch-sys) '; then
    echo "$crate depends on libtorch: it must not" >&2
    exit 1
  fi
done
if cargo tree -p ferry-ctl -e normal --prefix none | grep -qE '^etcd-client '; then
  echo "ferry-ctl depends on etcd-client: it must not (only the daemon enables ferry-cluster's etcd feature)" >&2
  exit 1
fi
echo "==> cargo test" >&2
cargo test --workspace
