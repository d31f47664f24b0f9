#!/usr/bin/env bash
# Every VM: containerd, runc and the tools the agent uses, from Debian; keelson from the host's
# release build (synced to /keelson); kubectl-free (the server VM gets kubectl below).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q containerd runc iptables nftables conntrack iproute2 busybox-static \
  ca-certificates curl
systemctl enable --now containerd
bin=/keelson/target/release/keelson
if [ ! -x "$bin" ]; then
  echo "no $bin: run 'cargo build --release' on the host, then 'vagrant provision'" >&2
  exit 1
fi
install -m 0755 "$bin" /usr/local/bin/keelson
install -m 0644 /keelson/systemd/keelson-server.service /keelson/systemd/keelson-agent.service \
  /etc/systemd/system/
mkdir -p /etc/keelson /var/lib/keelson/images
# A busybox image for workloads, packed offline from Debian's busybox-static.
if [ ! -f /var/lib/keelson/images/busybox.tar ]; then
  root=$(mktemp -d)
  mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/www"
  cp /bin/busybox "$root/bin/busybox"
  for a in sh httpd echo cat sleep hostname wget ls ps env nc date; do
    ln -s busybox "$root/bin/$a"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
  echo 'root:x:0:' > "$root/etc/group"
  keelson image pack --rootfs "$root" --name keelson.local/busybox:1 --cmd sh \
    -o /var/lib/keelson/images/busybox.tar
  rm -rf "$root"
fi
systemctl daemon-reload
