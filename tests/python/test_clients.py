"""The official Python client (kubernetes on PyPI) against a keelson cluster, as a user of it
writes code: typed objects without apiVersion/kind, create/read/list/patch/replace/delete,
create_from_yaml, watches from a resourceVersion, delete_collection, pagination, exec with
every stream combination in str and bytes mode, and port-forward.

Run by tests/clients.rs with KUBECONFIG (a keelson lab) and KT_IMAGE (the lab's busybox).
"""

import os
import socket
import time

import pytest
from kubernetes import client, config, utils, watch
from kubernetes.client.rest import ApiException
from kubernetes.stream import portforward, stream

NS = "pyclient"
IMAGE = os.environ["KT_IMAGE"]


def until(what, f, secs=60):
    t0 = time.time()
    while time.time() - t0 < secs:
        v = f()
        if v:
            return v
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def api():
    config.load_kube_config(os.environ["KUBECONFIG"])
    c = client.ApiClient()
    try:
        client.CoreV1Api(c).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=NS))
        )
    except ApiException as e:
        # A rerun against the same cluster.
        assert e.status == 409, e
    yield c


@pytest.fixture(scope="session")
def core(api):
    return client.CoreV1Api(api)


@pytest.fixture(scope="session")
def box(core):
    """A pod serving HTTP on 8080 and echoing on 9000."""
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="box", labels={"app": "box"}),
        spec=client.V1PodSpec(
            termination_grace_period_seconds=1,
            containers=[
                client.V1Container(
                    name="main",
                    image=IMAGE,
                    command=[
                        "sh",
                        "-c",
                        "mkdir -p /www && echo hello-from-box > /www/index.html && "
                        "httpd -p 8080 -h /www && exec nc -ll -p 9000 -e cat",
                    ],
                    readiness_probe=client.V1Probe(
                        tcp_socket=client.V1TCPSocketAction(port=9000), period_seconds=1
                    ),
                )
            ],
        ),
    )
    try:
        core.create_namespaced_pod(NS, pod)
    except ApiException as e:
        assert e.status == 409, e

    def ready():
        p = core.read_namespaced_pod("box", NS)
        conds = (p.status and p.status.conditions) or []
        return any(c.type == "Ready" and c.status == "True" for c in conds)

    until("the box pod to be ready", ready, 90)
    return "box"


def test_typed_objects_need_no_apiversion_or_kind(core, api):
    cm = core.create_namespaced_config_map(
        NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="plain"), data={"a": "1"})
    )
    assert cm.kind == "ConfigMap" and cm.api_version == "v1"
    assert core.read_namespaced_config_map("plain", NS).data == {"a": "1"}
    secret = core.create_namespaced_secret(
        NS, client.V1Secret(metadata=client.V1ObjectMeta(name="plain"), string_data={"k": "v"})
    )
    assert secret.type == "Opaque"
    svc = core.create_namespaced_service(
        NS,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="plain"),
            spec=client.V1ServiceSpec(
                selector={"app": "box"}, ports=[client.V1ServicePort(port=80, target_port=8080)]
            ),
        ),
    )
    # Defaulted status comes back, as from kube-apiserver.
    assert svc.status is not None and svc.status.load_balancer is not None
    assert svc.spec.cluster_ip
    apps = client.AppsV1Api(api)
    dep = apps.create_namespaced_deployment(
        NS,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="plain"),
            spec=client.V1DeploymentSpec(
                replicas=0,
                selector=client.V1LabelSelector(match_labels={"app": "plain"}),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels={"app": "plain"}),
                    spec=client.V1PodSpec(
                        termination_grace_period_seconds=1,
                        containers=[client.V1Container(name="c", image=IMAGE, command=["sleep", "3600"])],
                    ),
                ),
            ),
        ),
    )
    assert dep.kind == "Deployment" and dep.spec.strategy.type == "RollingUpdate"
    # A kind that disagrees with the URL is still refused.
    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map(NS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}})
    assert e.value.status == 400


def test_crud_of_configmaps_secrets_services_deployments_and_pods(core, api, box):
    apps = client.AppsV1Api(api)
    core.create_namespaced_config_map(
        NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="crud"), data={"v": "1"})
    )
    core.patch_namespaced_config_map("crud", NS, {"data": {"w": "2"}})
    cm = core.read_namespaced_config_map("crud", NS)
    assert cm.data == {"v": "1", "w": "2"}
    cm.data = {"only": "this"}
    core.replace_namespaced_config_map("crud", NS, cm)
    assert core.read_namespaced_config_map("crud", NS).data == {"only": "this"}
    # A stale resourceVersion conflicts.
    with pytest.raises(ApiException) as e:
        core.replace_namespaced_config_map("crud", NS, cm)
    assert e.value.status == 409
    core.delete_namespaced_config_map("crud", NS)
    with pytest.raises(ApiException) as e:
        core.read_namespaced_config_map("crud", NS)
    assert e.value.status == 404

    core.create_namespaced_secret(
        NS, client.V1Secret(metadata=client.V1ObjectMeta(name="crud"), data={"k": "dg=="})
    )
    core.patch_namespaced_secret("crud", NS, {"metadata": {"labels": {"x": "y"}}})
    s = core.read_namespaced_secret("crud", NS)
    assert s.metadata.labels == {"x": "y"} and s.data == {"k": "dg=="}
    core.delete_namespaced_secret("crud", NS)

    svc = core.read_namespaced_service("plain", NS)
    svc.spec.ports[0].port = 81
    core.replace_namespaced_service("plain", NS, svc)
    assert core.read_namespaced_service("plain", NS).spec.ports[0].port == 81
    core.patch_namespaced_service("plain", NS, {"metadata": {"annotations": {"a": "b"}}})
    assert [s.metadata.name for s in core.list_namespaced_service(NS).items] == ["plain"]

    apps.patch_namespaced_deployment("plain", NS, {"spec": {"replicas": 1}})
    until(
        "the deployment's pod to be ready",
        lambda: (apps.read_namespaced_deployment_status("plain", NS).status.ready_replicas or 0) == 1,
        90,
    )
    d = apps.read_namespaced_deployment("plain", NS)
    d.spec.replicas = 0
    apps.replace_namespaced_deployment("plain", NS, d)
    apps.delete_namespaced_deployment("plain", NS)

    pods = core.list_namespaced_pod(NS, label_selector="app=box").items
    assert [p.metadata.name for p in pods] == ["box"]
    core.patch_namespaced_pod("box", NS, {"metadata": {"labels": {"patched": "yes"}}})
    assert core.read_namespaced_pod("box", NS).metadata.labels["patched"] == "yes"
    log = core.read_namespaced_pod_log("box", NS)
    assert log == ""


def test_create_from_yaml(api, tmp_path):
    f = tmp_path / "app.yaml"
    f.write_text(
        f"""apiVersion: v1
kind: ConfigMap
metadata: {{name: from-yaml}}
data: {{k: v}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: from-yaml}}
spec:
  replicas: 0
  selector: {{matchLabels: {{app: from-yaml}}}}
  template:
    metadata: {{labels: {{app: from-yaml}}}}
    spec:
      containers: [{{name: c, image: {IMAGE}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: from-yaml}}
spec:
  selector: {{app: from-yaml}}
  ports: [{{port: 80}}]
"""
    )
    created = utils.create_from_yaml(api, str(f), namespace=NS)
    kinds = sorted(o.kind for group in created for o in group)
    assert kinds == ["ConfigMap", "Deployment", "Service"]


def test_watch_from_a_resource_version(core):
    rv = core.list_namespaced_config_map(NS).metadata.resource_version
    core.create_namespaced_config_map(
        NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="watched"))
    )
    w = watch.Watch()
    seen = []
    for ev in w.stream(core.list_namespaced_config_map, NS, resource_version=rv, timeout_seconds=10):
        seen.append((ev["type"], ev["object"].metadata.name))
        if ev["object"].metadata.name == "watched":
            w.stop()
    assert ("ADDED", "watched") in seen


def test_delete_collection_and_pagination(core):
    for i in range(12):
        core.create_namespaced_config_map(
            NS,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name=f"page-{i:02}", labels={"batch": "a" if i < 9 else "b"})
            ),
        )
    names, token, pages = [], None, 0
    while True:
        kw = {"_continue": token} if token else {}
        page = core.list_namespaced_config_map(NS, label_selector="batch", limit=5, **kw)
        pages += 1
        names += [c.metadata.name for c in page.items]
        token = page.metadata._continue
        if not token:
            break
    assert names == [f"page-{i:02}" for i in range(12)] and pages == 3
    core.delete_collection_namespaced_config_map(NS, label_selector="batch=a")
    left = [c.metadata.name for c in core.list_namespaced_config_map(NS, label_selector="batch").items]
    assert left == ["page-09", "page-10", "page-11"]
    core.delete_collection_namespaced_config_map(NS, label_selector="batch", body=client.V1DeleteOptions(grace_period_seconds=0))
    assert core.list_namespaced_config_map(NS, label_selector="batch").items == []


SCRIPT = "echo to-out; echo to-err >&2"


@pytest.mark.parametrize("stdout", [True, False])
@pytest.mark.parametrize("stderr", [True, False])
@pytest.mark.parametrize("binary", [False, True])
def test_exec_output_streams(core, box, stdout, stderr, binary):
    if not stdout and not stderr:
        # kube-apiserver's rule: an exec needs at least one stream.
        with pytest.raises(ApiException) as e:
            stream(core.connect_get_namespaced_pod_exec, box, NS, command=["true"],
                   stdout=False, stderr=False, stdin=False, tty=False)
        assert "at least 1 of stdin, stdout, stderr" in str(e.value)
        return
    out = stream(
        core.connect_get_namespaced_pod_exec,
        box,
        NS,
        command=["sh", "-c", SCRIPT],
        stdout=stdout,
        stderr=stderr,
        stdin=False,
        tty=False,
        binary=binary,
    )
    if binary:
        assert isinstance(out, bytes)
        out = out.decode()
    assert ("to-out" in out) == stdout, out
    assert ("to-err" in out) == stderr, out


@pytest.mark.parametrize("binary", [False, True])
def test_exec_on_a_terminal(core, box, binary):
    out = stream(
        core.connect_get_namespaced_pod_exec,
        box,
        NS,
        command=["sh", "-c", SCRIPT + "; [ -t 1 ] && echo is-a-tty"],
        stdout=True,
        stderr=False,
        stdin=False,
        tty=True,
        binary=binary,
    )
    if binary:
        out = out.decode()
    assert "to-out" in out and "to-err" in out and "is-a-tty" in out, out


@pytest.mark.parametrize("tty", [False, True])
@pytest.mark.parametrize("binary", [False, True])
def test_exec_with_stdin(core, box, tty, binary):
    resp = stream(
        core.connect_get_namespaced_pod_exec,
        box,
        NS,
        command=["sh"],
        stdin=True,
        stdout=True,
        stderr=not tty,
        tty=tty,
        binary=binary,
        _preload_content=False,
    )
    # Text frames (str) and binary frames (bytes) both reach the process.
    resp.write_stdin(b"echo from-stdin-$((40+2))\n" if binary else "echo from-stdin-$((40+2))\n")
    got = ""
    t0 = time.time()
    while "from-stdin-42" not in got and time.time() - t0 < 20:
        resp.update(timeout=1)
        if resp.peek_stdout():
            chunk = resp.read_stdout()
            got += chunk.decode() if isinstance(chunk, bytes) else chunk
    assert "from-stdin-42" in got, got
    resp.write_stdin(b"exit 3\n" if binary else "exit 3\n")
    t0 = time.time()
    while resp.is_open() and time.time() - t0 < 20:
        resp.update(timeout=1)
    assert resp.returncode == 3
    resp.close()


def test_port_forward_carries_data_both_ways(core, box):
    # One WebSocket per connection (kubelet's channel protocol): it ends with the connection.
    pf = portforward(core.connect_get_namespaced_pod_portforward, box, NS, ports="8080")
    http = pf.socket(8080)
    http.setblocking(True)
    http.settimeout(20)
    http.sendall(b"GET /index.html HTTP/1.0\r\nHost: box\r\n\r\n")
    reply = b""
    while True:
        chunk = http.recv(4096)
        if not chunk:
            break
        reply += chunk
    assert b"200 OK" in reply and b"hello-from-box" in reply, reply
    assert pf.error(8080) is None
    http.close()
    pf.close()
    # Two ports on one WebSocket: each has its own data and error channels.
    pf = portforward(core.connect_get_namespaced_pod_portforward, box, NS, ports="9000,8080")
    echo = pf.socket(9000)
    echo.setblocking(True)
    echo.settimeout(20)
    payload = bytes(range(256)) * 400
    echo.sendall(payload)
    back = b""
    while len(back) < len(payload):
        chunk = echo.recv(65536)
        if not chunk:
            break
        back += chunk
    assert back == payload
    web = pf.socket(8080)
    web.setblocking(True)
    web.settimeout(20)
    web.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
    got = b""
    while b"hello-from-box" not in got:
        chunk = web.recv(4096)
        if not chunk:
            break
        got += chunk
    assert b"hello-from-box" in got, got
    assert pf.error(9000) is None and pf.error(8080) is None
    echo.close()
    web.close()
    pf.close()


def test_port_forward_to_a_closed_port_reports_an_error(core, box):
    pf = portforward(core.connect_get_namespaced_pod_portforward, box, NS, ports="9999")
    s = pf.socket(9999)
    s.setblocking(True)
    s.settimeout(20)
    try:
        assert s.recv(1) == b""
    except (socket.timeout, OSError):
        pass
    err = until("the port-forward error", lambda: pf.error(9999), 20)
    assert "9999" in err and "refused" in err, err
    pf.close()
