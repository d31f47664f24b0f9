#!/usr/bin/env bash
# Installs what keelson needs on Debian 12 (idempotent). Used by test.sh, demo.sh and CI.
# With --test, also what only the tests use (systemd-analyze, ruby -c, shellcheck, openssl, and the
# Python/JavaScript clients and Helm through scripts/clients.sh).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(containerd runc iptables nftables busybox-static etcd-server containernetworking-plugins
      protobuf-compiler libprotobuf-dev conntrack curl jq iproute2 gcc docker-registry skopeo)
if [ "${1:-}" = --test ]; then
  pkgs+=(systemd ruby shellcheck openssl python3-venv apache2-utils bind9-dnsutils dnsperf)
  # Node and npm for the JavaScript client's tests: whichever the machine has, else Debian's.
  command -v npm >/dev/null 2>&1 || pkgs+=(nodejs npm)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { echo "keelson: a Rust toolchain (cargo >= 1.89) is required" >&2; exit 1; }
if [ "${1:-}" = --test ]; then
  bash "$(dirname "$0")/clients.sh"
fi
