#!/usr/bin/env bash
# keelson's main job on a fresh Debian 12 machine (as root): installs what is needed, builds
# keelson, runs `keelson up` (API server, scheduler, controllers and the agent with its service
# proxy, on the embedded store and a private containerd) inside a network namespace of its own
# (no route out: the host's network is never touched) beside a local OCI registry (Debian's
# docker-registry), pushes the demo's image to that registry, deploys a web app of it behind a
# Service (the node pulls the image) and shows it answering through the Service. Ctrl-C stops
# it and removes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "the demo needs root (containerd, network namespaces)" >&2; exit 1; }
bash scripts/deps.sh
if [ -f "$HOME/.cargo/env" ]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi
cargo build --release
BIN=$PWD/target/release/keelson
DEMO=${KEELSON_DEMO_DIR:-/var/lib/keelson-demo}
NETNS=keelson-demo
export KUBECONFIG=$DEMO/server/kubeconfig.yaml
# nsenter, not `ip netns exec`: that one remounts /sys without the cgroup mounts runc needs.
in_ns() { nsenter --net="/run/netns/$NETNS" "$@"; }
kc() { in_ns kubectl "$@"; }

cleanup() {
  set +e
  trap - EXIT INT TERM
  echo
  echo "stopping the demo..."
  if [ -n "${UP:-}" ]; then
    kill -INT "$UP" 2>/dev/null
    wait "$UP" 2>/dev/null
  fi
  if [ -n "${REG:-}" ]; then
    kill "$REG" 2>/dev/null
    wait "$REG" 2>/dev/null
  fi
  in_ns "$BIN" down --data-dir "$DEMO" --purge
  ip netns delete "$NETNS" 2>/dev/null
  echo "demo stopped and cleaned up"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns delete "$NETNS" 2>/dev/null || true
ip netns add "$NETNS"
ip -n "$NETNS" link set lo up
mkdir -p "$DEMO/registry"

# The local registry (plain HTTP on the namespace's loopback) and the node's registries.yaml.
cat > "$DEMO/registry/config.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $DEMO/registry/storage}}
http: {addr: 127.0.0.1:5000}
EOF
# nsenter (not the in_ns function) so that $! is the daemon itself, which the cleanup signals.
nsenter --net="/run/netns/$NETNS" docker-registry serve "$DEMO/registry/config.yml" \
  >"$DEMO/registry/registry.log" 2>&1 &
REG=$!
cat > "$DEMO/registries.yaml" <<'EOF'
mirrors:
  "127.0.0.1:5000":
    endpoint: ["http://127.0.0.1:5000"]
EOF

# The node's resolver for the cluster DNS to forward to: none (the demo's namespace has no way
# out, and the machine's own resolver is never used).
echo "# keelson demo: no upstream DNS" > "$DEMO/resolv.conf"
nsenter --net="/run/netns/$NETNS" "$BIN" up --data-dir "$DEMO" --private-containerd \
  --registry-config "$DEMO/registries.yaml" --agent-arg=--resolv-conf="$DEMO/resolv.conf" &
UP=$!
for _ in $(seq 1 240); do
  kc wait --for=condition=Ready node --all --timeout=1s >/dev/null 2>&1 && break
  kill -0 "$UP" 2>/dev/null || { echo "keelson up stopped; see $DEMO/logs/keelson.log" >&2; exit 1; }
  sleep 0.5
done

echo
echo "== pushing the demo image (busybox, packed by keelson up) to the local registry as 127.0.0.1:5000/demo/web:1"
in_ns skopeo copy --quiet --dest-tls-verify=false "oci-archive:$DEMO/images/busybox.tar" docker://127.0.0.1:5000/demo/web:1

echo
echo "== deploying the demo: Deployment web (2 replicas) and Service web (NodePort)"
kc apply -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: httpd
        image: 127.0.0.1:5000/demo/web:1
        command: ["sh", "-c", "echo \"hello from $(hostname), served by keelson from an image it pulled\" > /www/index.html; exec httpd -f -p 8080 -h /www"]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe:
          httpGet: {path: /, port: http}
          periodSeconds: 2
        resources:
          limits: {memory: 32Mi, cpu: 200m}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - port: 80
    targetPort: http
YAML
kc rollout status deployment/web --timeout=120s
kc get nodes -o wide
kc get pods,services -o wide
echo "== the node pulled the image:"
kc get events --field-selector reason=Pulled -o custom-columns=MESSAGE:.message --no-headers | sort -u

CIP=$(kc get service web -o jsonpath='{.spec.clusterIP}')
PORT=$(kc get service web -o jsonpath='{.spec.ports[0].nodePort}')
NODE=$(kc get nodes -o jsonpath='{.items[0].status.addresses[?(@.type=="InternalIP")].address}')
echo
echo "== GET http://$CIP/ (the Service's ClusterIP), four times:"
for _ in 1 2 3 4; do in_ns /bin/busybox wget -qO- "http://$CIP/"; done
echo "== GET http://$NODE:$PORT/ (its NodePort):"
in_ns /bin/busybox wget -qO- "http://$NODE:$PORT/"
echo "== from inside a pod, by name: the node's cluster DNS answers web.default.svc.cluster.local"
kc exec deploy/web -- nslookup web.default.svc.cluster.local
echo "== GET http://web/ from inside a pod (the short name, through the pod's search path):"
kc exec deploy/web -- wget -qO- http://web/
echo
echo "keelson runs; in another terminal:"
echo "  nsenter --net=/run/netns/$NETNS env KUBECONFIG=$KUBECONFIG kubectl get pods -o wide"
echo "  nsenter --net=/run/netns/$NETNS env KUBECONFIG=$KUBECONFIG kubectl exec -it deploy/web -- sh"
echo "  logs: $DEMO/logs/keelson.log"
echo "Ctrl-C stops the demo and removes everything it made."
wait "$UP"
