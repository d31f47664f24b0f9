#!/usr/bin/env bash
# An agent VM: joins the server with the node token the server VM shared.
set -euo pipefail
server_ip=$1
node_ip=$2
share=/keelson/vagrant/.share
for _ in $(seq 1 60); do
  [ -f "$share/node-token" ] && break
  sleep 1
done
if [ ! -f "$share/node-token" ]; then
  echo "no node token in $share: provision the server first (vagrant up server)" >&2
  exit 1
fi
install -m 0600 "$share/node-token" /etc/keelson/node-token
install -m 0644 "$share/ca.crt" /etc/keelson/ca.crt
printf 'KEELSON_AGENT_ARGS="--server https://%s:6443 --token-file /etc/keelson/node-token --ca-file /etc/keelson/ca.crt --node-ip %s"\n' \
  "$server_ip" "$node_ip" > /etc/default/keelson-agent
systemctl enable keelson-agent
systemctl restart keelson-agent
