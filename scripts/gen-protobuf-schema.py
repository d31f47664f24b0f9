#!/usr/bin/env python3
"""Generates src/api/protobuf/schema.rs: the protobuf schema of every Kubernetes API message.

Field numbers and wire types come from the `k8s-pb` crate (prost types generated from
k8s.io/api's generated.proto files); JSON field names from the `k8s-openapi` crate (the same
Kubernetes minor). Both are crates.io packages: `cargo fetch` puts them in the cargo registry,
where this script finds them (or pass --k8s-pb / --k8s-openapi).

Go's pointer-ness is not in either source and decides whether a zero value sent on the wire means
"set to zero" (`replicas: 0`) or "not set": gogo-protobuf writes every non-pointer scalar, so the
decoder keeps zero integers and booleans (always right, as Go cannot tell a non-pointer zero from
unset) except for the NON_POINTER fields below, which it drops to keep objects as kube-apiserver
shows them; empty strings are dropped except for KEEP_EMPTY_STRING.

Usage: scripts/gen-protobuf-schema.py [--check]
"""

import argparse
import glob
import os
import re
import sys

OPENAPI_VERSION = "v1_35"

# Non-pointer integer/boolean fields gogo always writes (Go `json:",omitempty"` without a
# pointer): a zero there means "unset", and kube-apiserver's JSON leaves it out.
NON_POINTER = {
    "meta.v1.ObjectMeta": ["generation"],
    "core.v1.PodSpec": ["hostNetwork", "hostPID", "hostIPC"],
    "core.v1.Container": ["stdin", "stdinOnce", "tty"],
    "core.v1.EphemeralContainerCommon": ["stdin", "stdinOnce", "tty"],
    "core.v1.ContainerPort": ["hostPort", "containerPort"],
    "core.v1.Probe": [
        "initialDelaySeconds",
        "timeoutSeconds",
        "periodSeconds",
        "successThreshold",
        "failureThreshold",
    ],
    "core.v1.VolumeMount": ["readOnly"],
    "core.v1.VolumeDevice": [],
    "core.v1.PersistentVolumeClaimVolumeSource": ["readOnly"],
    "core.v1.NFSVolumeSource": ["readOnly"],
    "core.v1.HostPathVolumeSource": [],
    "core.v1.ServicePort": ["nodePort", "port"],
    "core.v1.ServiceSpec": ["healthCheckNodePort", "publishNotReadyAddresses"],
    "core.v1.NodeSpec": ["unschedulable"],
    "core.v1.ContainerStatus": ["restartCount", "ready"],
    "core.v1.ContainerStateTerminated": ["exitCode", "signal"],
    "core.v1.EndpointPort": ["port"],
    "core.v1.DaemonEndpoint": ["Port"],
    "core.v1.Event": ["count"],
    "apps.v1.DeploymentSpec": ["minReadySeconds", "paused"],
    "apps.v1.DeploymentStatus": [
        "observedGeneration",
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "availableReplicas",
        "unavailableReplicas",
    ],
    "apps.v1.ReplicaSetSpec": ["minReadySeconds"],
    "apps.v1.ReplicaSetStatus": [
        "replicas",
        "fullyLabeledReplicas",
        "readyReplicas",
        "availableReplicas",
        "observedGeneration",
    ],
    "apps.v1.DaemonSetSpec": ["minReadySeconds"],
    "apps.v1.DaemonSetStatus": [
        "currentNumberScheduled",
        "numberMisscheduled",
        "desiredNumberScheduled",
        "numberReady",
        "observedGeneration",
        "updatedNumberScheduled",
        "numberAvailable",
        "numberUnavailable",
    ],
    "apps.v1.StatefulSetSpec": ["minReadySeconds"],
    "apps.v1.StatefulSetStatus": [
        "observedGeneration",
        "replicas",
        "readyReplicas",
        "currentReplicas",
        "updatedReplicas",
        "availableReplicas",
    ],
    "apps.v1.ControllerRevision": ["revision"],
    "batch.v1.JobStatus": ["active", "succeeded", "failed"],
    "policy.v1.PodDisruptionBudgetStatus": [
        "observedGeneration",
        "disruptionsAllowed",
        "currentHealthy",
        "desiredHealthy",
        "expectedPods",
    ],
    "scheduling.v1.PriorityClass": ["value", "globalDefault"],
    "autoscaling.v1.ScaleStatus": ["replicas"],
}

# Go `*string` fields whose empty value means something (`storageClassName: ""` turns off
# dynamic provisioning).
KEEP_EMPTY_STRING = {
    "core.v1.PersistentVolumeClaimSpec": ["storageClassName"],
}

# Messages with a JSON form of their own.
SPECIAL = {
    "meta.v1.Time": "Time",
    "meta.v1.MicroTime": "MicroTime",
    "meta.v1.Duration": "Duration",
    "meta.v1.FieldsV1": "RawJson",
    "runtime.RawExtension": "RawJson",
    "apiextensions.v1.Json": "RawJson",
    "intstr.IntOrString": "IntOrString",
    "resource.Quantity": "Quantity",
    "apiextensions.v1.JsonSchemaPropsOrArray": "SchemaOrArray",
    "apiextensions.v1.JsonSchemaPropsOrBool": "SchemaOrBool",
    "apiextensions.v1.JsonSchemaPropsOrStringArray": "SchemaOrStringArray",
}

# k8s-pb module directory → API group.
GROUPS = {
    "core": "",
    "apps": "apps",
    "autoscaling": "autoscaling",
    "batch": "batch",
    "policy": "policy",
    "extensions": "extensions",
    "apiserverinternal": "internal.apiserver.k8s.io",
    "flowcontrol": "flowcontrol.apiserver.k8s.io",
    "apiextensions": "apiextensions.k8s.io",
    "apiregistration": "apiregistration.k8s.io",
    "rbac": "rbac.authorization.k8s.io",
    "meta": "meta.k8s.io",
}


def group_of(d):
    return GROUPS.get(d, d + ".k8s.io")


def norm(s):
    return re.sub(r"[^a-z0-9]", "", s.lower())


def registry_dir(crate):
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    found = sorted(glob.glob(os.path.join(home, "registry/src/*", crate)))
    if not found:
        sys.exit(f"{crate} is not in the cargo registry: run `cargo fetch` on a crate that depends on it")
    return found[-1]


def short_module(parts):
    """`api/apps/v1` → `apps.v1`; `apimachinery/pkg/apis/meta/v1` → `meta.v1`."""
    if parts[-1] in ("intstr", "runtime", "resource"):
        return parts[-1]
    return f"{parts[-2]}.{parts[-1]}"


STRUCT_RE = re.compile(r"^pub struct (\w+) \{(?:\}|\n(.*?)^\})", re.S | re.M)
FIELD_RE = re.compile(r"#\[prost\(([^\]]*)\)\]\s*pub (?:r#)?(\w+):\s*(.*?),\s*(?=#\[prost|\Z)", re.S)


def parse_k8s_pb(root):
    msgs = {}  # "apps.v1.Deployment" → {"fields": [...], "module": [...]}
    for path in glob.glob(os.path.join(root, "src/**/mod.rs"), recursive=True):
        rel = os.path.relpath(os.path.dirname(path), os.path.join(root, "src"))
        parts = rel.split(os.sep)
        text = open(path).read()
        for m in STRUCT_RE.finditer(text):
            name, body = m.group(1), m.group(2) or ""
            body = "\n".join(l for l in body.splitlines() if not l.strip().startswith("///"))
            fields = []
            for fm in FIELD_RE.finditer(body):
                attr, fname, ty = fm.group(1), fm.group(2), " ".join(fm.group(3).split())
                tag = int(re.search(r'tag = "(\d+)"', attr).group(1))
                ty = re.sub(r",\s*>", ">", ty)
                fields.append((tag, fname, attr, ty))
            if len(parts) < 2:
                continue
            msgs[f"{short_module(parts)}.{name}"] = {"fields": fields, "parts": parts, "name": name}
    return msgs


def resolve(parts, ty):
    """A Rust type path relative to module `parts` → the message key it names."""
    ty = re.sub(r"::prost::alloc::boxed::Box<(.*)>", r"\1", ty).strip()
    segs = ty.split("::")
    here = list(parts)
    while segs and segs[0] == "super":
        here.pop()
        segs.pop(0)
    full = here + segs[:-1]
    return f"{short_module(full)}.{segs[-1]}" if len(segs) > 1 else f"{short_module(parts)}.{segs[-1]}"


def parse_openapi(root):
    """`apps.v1` + normalized struct name → {normalized field name: JSON name}."""
    out = {}
    base = os.path.join(root, "src", OPENAPI_VERSION)
    for path in glob.glob(os.path.join(base, "**/*.rs"), recursive=True):
        if os.path.basename(path) == "mod.rs":
            continue
        parts = os.path.relpath(os.path.dirname(path), base).split(os.sep)
        if len(parts) < 2:
            continue
        text = open(path).read()
        sm = re.search(r"^pub struct (\w+)", text, re.M)
        if not sm:
            continue
        names = re.findall(r'"([^"]+)" => Field::Key_\w+', text)
        out[(short_module(parts), norm(sm.group(1)))] = {norm(n): n for n in names}
    return out


def message_path(ty):
    """The message type named by a field's Rust type, without its Option/Vec wrapper."""
    inner = re.sub(r"^::core::option::Option<(.*)>$", r"\1", ty)
    return re.sub(r"^::prost::alloc::vec::Vec<(.*)>$", r"\1", inner)


def flattens(pb, key, names):
    """Whether every field of message `key` (through its own embedded structs) is in `names`."""
    m = pb[key]
    if not m["fields"]:
        return False
    for _, fname, attr, ty in m["fields"]:
        if norm(fname) in names:
            continue
        if not attr.startswith("message") or "repeated" in attr:
            return False
        if not flattens(pb, resolve(m["parts"], message_path(ty)), names):
            return False
    return True


def camel(snake):
    first, *rest = snake.split("_")
    return first + "".join(p[:1].upper() + p[1:] for p in rest)


def by_norm(table):
    """Keys `module.GoName` → `module.normalizedname`, as the k8s-pb names (NfsVolumeSource) differ."""
    out = {}
    for k, v in table.items():
        module, name = k.rsplit(".", 1)
        out[f"{module}.{norm(name)}"] = v
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k8s-pb", default=None)
    ap.add_argument("--k8s-openapi", default=None)
    ap.add_argument("--check", action="store_true", help="fail if the committed file differs")
    args = ap.parse_args()
    pb = parse_k8s_pb(args.k8s_pb or registry_dir("k8s-pb-0.9.0"))
    oa = parse_openapi(args.k8s_openapi or registry_dir("k8s-openapi-0.29.0"))

    non_pointer, keep_empty, special_of = by_norm(NON_POINTER), by_norm(KEEP_EMPTY_STRING), by_norm(SPECIAL)
    nkey = lambda k: f"{k.rsplit('.', 1)[0]}.{norm(k.rsplit('.', 1)[1])}"
    known = {nkey(x) for x in pb}
    for table in (non_pointer, keep_empty, special_of):
        for k in table:
            if k not in known:
                sys.exit(f"{k} (in this script's lists) is not a k8s-pb message")
    keys = sorted(pb)
    index = {k: i for i, k in enumerate(keys)}
    scalar = {"string": "Str", "int32": "I32", "int64": "I64", "bool": "Bool", "double": "F64"}
    warnings = []
    lines = []
    for k in keys:
        m = pb[k]
        module = k.rsplit(".", 1)[0]
        names = oa.get((module, norm(m["name"])))
        special = special_of.get(nkey(k))
        if special is None and names is None and [f[1] for f in m["fields"]] == ["items"]:
            special = "List"  # a Go slice type (ExtraValue, …): a JSON array of its items
        fields = []
        for tag, fname, attr, ty in m["fields"]:
            kind = attr.split(",")[0].strip()
            inner_key = resolve(m["parts"], message_path(ty)) if kind == "message" else None
            card = "One"
            if "repeated" in attr:
                card = "Rep"
            if kind.startswith("bytes"):
                t = "Bytes"
            elif kind.startswith("btree_map"):
                vt = re.search(r'btree_map = "string, (\w+)"', attr).group(1)
                if vt == "message":
                    inner = re.search(r"BTreeMap<[^,]+,\s*(.*)>$", ty).group(1)
                    t = f"Msg({index[resolve(m['parts'], inner)]})"
                else:
                    t = {"string": "Str", "bytes": "Bytes"}[vt]
                card = "Map"
            elif kind == "message":
                t = f"Msg({index[inner_key]})"
            else:
                t = scalar[kind]
            json = None
            if names is not None:
                json = names.get(norm(fname))
                if json is None and card == "One" and inner_key and flattens(pb, inner_key, names):
                    card = "Inline"  # a Go embedded struct: its fields are the parent's in JSON
                    json = fname
                elif json is None and not special:
                    warnings.append(f"{k}.{fname}: not in k8s-openapi, JSON name guessed")
            if json is None:
                json = camel(fname)
            keep = True
            if t == "Str":
                keep = json in keep_empty.get(nkey(k), [])
            elif t in ("I32", "I64", "Bool", "F64"):
                keep = json not in non_pointer.get(nkey(k), [])
            elif t == "Bytes":
                keep = False
            fields.append(f"F({tag}, {json!r}, {t}, {card}, {str(keep).lower()})".replace("'", '"'))
        lines.append(
            f'    M {{ name: "{k}", special: {special or "No"}, fields: &[{", ".join(fields)}] }},'
        )

    roots = []
    for k in keys:
        module, name = k.rsplit(".", 1)
        d, v = module.split(".") if "." in module else (module, "")
        if not v:
            continue
        gv = f"{group_of(d)}/{v}" if group_of(d) else v
        roots.append((gv, norm(name), index[k]))
    out = [
        "// @generated by scripts/gen-protobuf-schema.py from the k8s-pb 0.9 and k8s-openapi 0.29",
        "// crates (Kubernetes 1.35); do not edit. Regenerate after bumping either crate.",
        "",
        "use super::{Card::*, F, M, Special::*, Ty::*};",
        "",
        "#[rustfmt::skip]",
        "pub(super) static MESSAGES: &[M] = &[",
        *lines,
        "];",
        "",
        "/// `apiextensions.k8s.io/v1` JSONSchemaProps, which the JSONSchemaPropsOr* forms hold.",
        f"pub(super) const JSON_SCHEMA_PROPS: u16 = {index['apiextensions.v1.JsonSchemaProps']};",
        "",
        "/// `(group/version, lower-case kind without punctuation, message)`, sorted.",
        "#[rustfmt::skip]",
        "pub(super) static ROOTS: &[(&str, &str, u16)] = &[",
        *[f'    ("{gv}", "{kind}", {i}),' for gv, kind, i in sorted(roots)],
        "];",
        "",
    ]
    text = "\n".join(out)
    target = os.path.join(os.path.dirname(__file__), "..", "src/api/protobuf/schema.rs")
    for w in warnings:
        print("warning:", w, file=sys.stderr)
    if args.check:
        if open(target).read() != text:
            sys.exit(f"{target} is stale: run scripts/gen-protobuf-schema.py")
        return
    with open(target, "w") as f:
        f.write(text)
    print(f"{len(keys)} messages, {sum(len(pb[k]['fields']) for k in keys)} fields → {target}")


if __name__ == "__main__":
    main()
