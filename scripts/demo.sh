#!/usr/bin/env bash
# keelson's demo on a fresh Debian 12 machine (as root): installs what is needed, builds keelson,
# and runs the standalone agent with a demo web pod, all inside a network namespace of its own
# (no route out; the host's network is never touched). Ctrl-C stops it and removes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "the demo needs root (containerd, network namespaces)" >&2; exit 1; }
bash scripts/deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release
BIN=$PWD/target/release/keelson
DEMO=${KEELSON_DEMO_DIR:-/var/lib/keelson-demo}
NETNS=keelson-demo
mkdir -p "$DEMO"/{manifests,data/images,logs,containerd}

cat > "$DEMO/containerd.toml" <<TOML
version = 2
root = "$DEMO/containerd/root"
state = "$DEMO/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$DEMO/containerd.sock"
[ttrpc]
  address = "$DEMO/containerd.sock.ttrpc"
[debug]
  address = "$DEMO/containerd-debug.sock"
TOML

cleanup() {
  set +e
  trap - EXIT INT TERM
  echo; echo "stopping the demo..."
  [ -n "${AGENT:-}" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null || true
  for id in $(ctr -a "$DEMO/containerd.sock" -n k8s.keelson.io containers ls -q 2>/dev/null); do
    ctr -a "$DEMO/containerd.sock" -n k8s.keelson.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
  done
  sleep 1
  for id in $(ctr -a "$DEMO/containerd.sock" -n k8s.keelson.io containers ls -q 2>/dev/null); do
    ctr -a "$DEMO/containerd.sock" -n k8s.keelson.io tasks delete -f "$id" >/dev/null 2>&1 || true
    ctr -a "$DEMO/containerd.sock" -n k8s.keelson.io containers delete "$id" >/dev/null 2>&1 || true
  done
  [ -n "${CONTAINERD:-}" ] && kill "$CONTAINERD" 2>/dev/null && wait "$CONTAINERD" 2>/dev/null || true
  ip netns delete "$NETNS" 2>/dev/null || true
  echo "demo stopped and cleaned up"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

containerd --config "$DEMO/containerd.toml" >"$DEMO/containerd.log" 2>&1 &
CONTAINERD=$!
ip netns delete "$NETNS" 2>/dev/null || true
ip netns add "$NETNS"
ip -n "$NETNS" link set lo up

# A busybox image, packed offline from Debian's busybox-static.
ROOTFS=$DEMO/busybox-rootfs
mkdir -p "$ROOTFS"/{bin,tmp,www,etc}
cp /bin/busybox "$ROOTFS/bin/busybox"
for a in sh httpd echo cat sleep hostname wget; do ln -sf busybox "$ROOTFS/bin/$a"; done
"$BIN" image pack --rootfs "$ROOTFS" --name keelson.local/busybox:1 --cmd sh -o "$DEMO/data/images/busybox.tar"

cat > "$DEMO/manifests/web.yaml" <<'YAML'
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
spec:
  containers:
  - name: httpd
    image: keelson.local/busybox:1
    command: ["sh", "-c", "echo \"hello from $(hostname), served by keelson\" > /www/index.html; exec httpd -f -v -p 80 -h /www"]
    ports: [{name: http, containerPort: 80}]
    readinessProbe:
      httpGet: {path: /, port: http}
      periodSeconds: 2
    livenessProbe:
      tcpSocket: {port: 80}
    resources:
      limits: {memory: 32Mi, cpu: 200m}
YAML

nsenter --net="/run/netns/$NETNS" "$BIN" agent --standalone --node-name demo --pod-cidr 10.89.0.0/24 \
  --manifests "$DEMO/manifests" --containerd "$DEMO/containerd.sock" \
  --data-dir "$DEMO/data" --log-dir "$DEMO/logs" 2>"$DEMO/agent.log" &
AGENT=$!
echo "waiting for the web pod to be Ready..."
for _ in $(seq 1 120); do
  "$BIN" pods --data-dir "$DEMO/data" 2>/dev/null | grep -q "web-demo.*1/1.*Running" && break
  sleep 0.5
done
"$BIN" pods --data-dir "$DEMO/data"
IP=$("$BIN" pods --data-dir "$DEMO/data" --json | jq -r '.items[0].status.podIP')
echo; echo "GET http://$IP/ from the node's network namespace:"
ip netns exec "$NETNS" /bin/busybox wget -qO- "http://$IP/"
echo
echo "The agent runs; try: $BIN pods --data-dir $DEMO/data"
echo "  $BIN logs web-demo httpd --data-dir $DEMO/data     (container log)"
echo "  edit $DEMO/manifests/web.yaml and watch the pod be replaced"
echo "Ctrl-C stops the demo and removes everything it made."
wait "$AGENT"
