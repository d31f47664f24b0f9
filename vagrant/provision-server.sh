#!/usr/bin/env bash
# The server VM: keelson-server.service on 0.0.0.0:6443 (certificate valid for SERVER_IP), and
# its node token and CA shared with the agents through the synced folder.
set -euo pipefail
server_ip=$1
printf 'KEELSON_SERVER_ARGS="--tls-san %s"\n' "$server_ip" > /etc/default/keelson-server
systemctl enable keelson-server
systemctl restart keelson-server
for _ in $(seq 1 60); do
  [ -f /var/lib/keelson/server/kubeconfig.yaml ] && break
  sleep 1
done
share=/keelson/vagrant/.share
mkdir -p "$share"
install -m 0600 /var/lib/keelson/server/node-token "$share/node-token"
install -m 0644 /var/lib/keelson/server/pki/ca.crt "$share/ca.crt"
# kubectl for the vagrant user and root, from the Kubernetes apt repository if reachable,
# else the server's own kubeconfig is still at /var/lib/keelson/server/kubeconfig.yaml.
if ! command -v kubectl >/dev/null; then
  v=v1.32
  apt-get install -y -q gnupg
  install -d -m 0755 /etc/apt/keyrings
  curl -fsSL "https://pkgs.k8s.io/core:/stable:/$v/deb/Release.key" |
    gpg --dearmor -o /etc/apt/keyrings/kubernetes.gpg
  echo "deb [signed-by=/etc/apt/keyrings/kubernetes.gpg] https://pkgs.k8s.io/core:/stable:/$v/deb/ /" \
    > /etc/apt/sources.list.d/kubernetes.list
  apt-get update -q && apt-get install -y -q kubectl
fi
for home in /root /home/vagrant; do
  mkdir -p "$home/.kube"
  install -m 0600 /var/lib/keelson/server/kubeconfig.yaml "$home/.kube/config"
done
chown -R vagrant: /home/vagrant/.kube
# The server VM is a node too.
printf 'KEELSON_AGENT_ARGS="--server https://%s:6443 --token-file /var/lib/keelson/server/node-token --ca-file /var/lib/keelson/server/pki/ca.crt --node-ip %s"\n' \
  "$server_ip" "$server_ip" > /etc/default/keelson-agent
systemctl enable keelson-agent
systemctl restart keelson-agent
