#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs keelson's whole test suite (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "keelson tests need root (containerd, network namespaces)" >&2; exit 1; }
bash scripts/deps.sh --test
if [ -f "$HOME/.cargo/env" ]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi
bash scripts/check-layers.sh
cargo build --all-targets
cargo test -- --test-threads=2
# The protobuf schema is generated from the k8s-pb and k8s-openapi crates the build fetched.
python3 scripts/gen-protobuf-schema.py --check
# The lean node build (agent and proxy only) must keep building; last, as it replaces
# target/debug/keelson, which the tests run.
cargo build --no-default-features --features agent --bin keelson
