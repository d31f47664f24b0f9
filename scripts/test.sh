#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs keelson's whole test suite (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "keelson tests need root (containerd, network namespaces)" >&2; exit 1; }
bash scripts/deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --all-targets
cargo test -- --test-threads=2
