//! Decoding of Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`).
//!
//! kubectl's `create deployment|namespace|configmap|secret|service` generators send their objects
//! as protobuf: the magic `k8s\0` followed by a `runtime.Unknown` envelope whose `raw` field holds
//! the object. This module turns such a body into the JSON object the rest of the server works on,
//! driven by a small schema of the message types those objects use (field number → JSON name and
//! wire type). Zero values of Go's non-pointer fields are left out as Go's JSON `omitempty` does;
//! pointer fields keep an explicit zero (`replicas: 0`).
//!
//! A field the schema does not know is an error naming the message and field number, unless it
//! carries an empty payload (the zero value of a nested struct): nothing the client sent is dropped.

use base64::Engine;
use serde_json::{Map, Value};

/// What one field holds on the wire and how it appears in JSON.
#[derive(Clone, Copy)]
enum Ty {
    /// A string, left out when empty.
    Str,
    /// An integer (varint), left out when zero.
    Int,
    /// An integer behind a Go pointer: kept when zero.
    OptInt,
    /// A boolean, left out when false.
    Bool,
    /// A boolean behind a Go pointer: kept when false.
    OptBool,
    /// A nested message.
    Msg(&'static Desc),
    /// A nested message whose fields are inlined into the parent (Go embedded structs).
    Inline(&'static Desc),
    /// `map<string,string>`.
    MapStr,
    /// `map<string,bytes>`: values base64 in JSON.
    MapBytes,
    /// `map<string,Quantity>`.
    MapQty,
    /// `metav1.Time`: RFC 3339 in JSON, the zero time left out.
    Time,
    /// `intstr.IntOrString`.
    IntOrStr,
    /// `resource.Quantity`.
    Qty,
    /// `bytes`: base64 in JSON, left out when empty.
    Bytes,
}

struct Field {
    tag: u32,
    name: &'static str,
    ty: Ty,
    repeated: bool,
}

struct Desc {
    name: &'static str,
    fields: &'static [Field],
}

const fn f(tag: u32, name: &'static str, ty: Ty) -> Field {
    Field {
        tag,
        name,
        ty,
        repeated: false,
    }
}

const fn r(tag: u32, name: &'static str, ty: Ty) -> Field {
    Field {
        tag,
        name,
        ty,
        repeated: true,
    }
}

use Ty::*;

static OBJECT_META: Desc = Desc {
    name: "ObjectMeta",
    fields: &[
        f(1, "name", Str),
        f(2, "generateName", Str),
        f(3, "namespace", Str),
        f(4, "selfLink", Str),
        f(5, "uid", Str),
        f(6, "resourceVersion", Str),
        f(7, "generation", Int),
        f(8, "creationTimestamp", Time),
        f(9, "deletionTimestamp", Time),
        f(10, "deletionGracePeriodSeconds", OptInt),
        f(11, "labels", MapStr),
        f(12, "annotations", MapStr),
        r(13, "ownerReferences", Msg(&OWNER_REF)),
        r(14, "finalizers", Str),
    ],
};

static OWNER_REF: Desc = Desc {
    name: "OwnerReference",
    fields: &[
        f(1, "kind", Str),
        f(3, "name", Str),
        f(4, "uid", Str),
        f(5, "apiVersion", Str),
        f(6, "controller", OptBool),
        f(7, "blockOwnerDeletion", OptBool),
    ],
};

static LABEL_SELECTOR: Desc = Desc {
    name: "LabelSelector",
    fields: &[
        f(1, "matchLabels", MapStr),
        r(2, "matchExpressions", Msg(&LABEL_REQ)),
    ],
};

static LABEL_REQ: Desc = Desc {
    name: "LabelSelectorRequirement",
    fields: &[f(1, "key", Str), f(2, "operator", Str), r(3, "values", Str)],
};

static DEPLOYMENT: Desc = Desc {
    name: "Deployment",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        f(2, "spec", Msg(&DEPLOYMENT_SPEC)),
        f(3, "status", Msg(&EMPTY_STATUS)),
    ],
};

/// Status sent on create is ignored by the server anyway; generators send it empty.
static EMPTY_STATUS: Desc = Desc {
    name: "Status",
    fields: &[],
};

static DEPLOYMENT_SPEC: Desc = Desc {
    name: "DeploymentSpec",
    fields: &[
        f(1, "replicas", OptInt),
        f(2, "selector", Msg(&LABEL_SELECTOR)),
        f(3, "template", Msg(&POD_TEMPLATE)),
        f(4, "strategy", Msg(&DEPLOYMENT_STRATEGY)),
        f(5, "minReadySeconds", Int),
        f(6, "revisionHistoryLimit", OptInt),
        f(7, "paused", Bool),
        f(9, "progressDeadlineSeconds", OptInt),
    ],
};

static DEPLOYMENT_STRATEGY: Desc = Desc {
    name: "DeploymentStrategy",
    fields: &[
        f(1, "type", Str),
        f(2, "rollingUpdate", Msg(&ROLLING_UPDATE)),
    ],
};

static ROLLING_UPDATE: Desc = Desc {
    name: "RollingUpdateDeployment",
    fields: &[f(1, "maxUnavailable", IntOrStr), f(2, "maxSurge", IntOrStr)],
};

static POD_TEMPLATE: Desc = Desc {
    name: "PodTemplateSpec",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        f(2, "spec", Msg(&POD_SPEC)),
    ],
};

static POD_SPEC: Desc = Desc {
    name: "PodSpec",
    fields: &[
        r(1, "volumes", Msg(&VOLUME)),
        r(2, "containers", Msg(&CONTAINER)),
        f(3, "restartPolicy", Str),
        f(4, "terminationGracePeriodSeconds", OptInt),
        f(5, "activeDeadlineSeconds", OptInt),
        f(6, "dnsPolicy", Str),
        f(7, "nodeSelector", MapStr),
        f(8, "serviceAccountName", Str),
        f(9, "serviceAccount", Str),
        f(10, "nodeName", Str),
        f(11, "hostNetwork", Bool),
        f(12, "hostPID", Bool),
        f(13, "hostIPC", Bool),
        f(16, "hostname", Str),
        f(17, "subdomain", Str),
        f(19, "schedulerName", Str),
        r(20, "initContainers", Msg(&CONTAINER)),
        f(21, "automountServiceAccountToken", OptBool),
        r(22, "tolerations", Msg(&TOLERATION)),
        f(24, "priorityClassName", Str),
        f(25, "priority", OptInt),
        f(30, "enableServiceLinks", OptBool),
    ],
};

static TOLERATION: Desc = Desc {
    name: "Toleration",
    fields: &[
        f(1, "key", Str),
        f(2, "operator", Str),
        f(3, "value", Str),
        f(4, "effect", Str),
        f(5, "tolerationSeconds", OptInt),
    ],
};

static VOLUME: Desc = Desc {
    name: "Volume",
    fields: &[f(1, "name", Str), f(2, "", Inline(&VOLUME_SOURCE))],
};

static VOLUME_SOURCE: Desc = Desc {
    name: "VolumeSource",
    fields: &[
        f(1, "hostPath", Msg(&HOST_PATH)),
        f(2, "emptyDir", Msg(&EMPTY_DIR)),
        f(6, "secret", Msg(&SECRET_VOLUME)),
        f(19, "configMap", Msg(&CONFIGMAP_VOLUME)),
    ],
};

static HOST_PATH: Desc = Desc {
    name: "HostPathVolumeSource",
    fields: &[f(1, "path", Str), f(2, "type", Str)],
};

static EMPTY_DIR: Desc = Desc {
    name: "EmptyDirVolumeSource",
    fields: &[f(1, "medium", Str), f(2, "sizeLimit", Qty)],
};

static SECRET_VOLUME: Desc = Desc {
    name: "SecretVolumeSource",
    fields: &[
        f(1, "secretName", Str),
        r(2, "items", Msg(&KEY_TO_PATH)),
        f(3, "defaultMode", OptInt),
        f(4, "optional", OptBool),
    ],
};

static CONFIGMAP_VOLUME: Desc = Desc {
    name: "ConfigMapVolumeSource",
    fields: &[
        f(1, "", Inline(&LOCAL_REF)),
        r(2, "items", Msg(&KEY_TO_PATH)),
        f(3, "defaultMode", OptInt),
        f(4, "optional", OptBool),
    ],
};

static KEY_TO_PATH: Desc = Desc {
    name: "KeyToPath",
    fields: &[f(1, "key", Str), f(2, "path", Str), f(3, "mode", OptInt)],
};

static LOCAL_REF: Desc = Desc {
    name: "LocalObjectReference",
    fields: &[f(1, "name", Str)],
};

static CONTAINER: Desc = Desc {
    name: "Container",
    fields: &[
        f(1, "name", Str),
        f(2, "image", Str),
        r(3, "command", Str),
        r(4, "args", Str),
        f(5, "workingDir", Str),
        r(6, "ports", Msg(&CONTAINER_PORT)),
        r(7, "env", Msg(&ENV_VAR)),
        f(8, "resources", Msg(&RESOURCES)),
        r(9, "volumeMounts", Msg(&VOLUME_MOUNT)),
        f(13, "terminationMessagePath", Str),
        f(14, "imagePullPolicy", Str),
        f(16, "stdin", Bool),
        f(17, "stdinOnce", Bool),
        f(18, "tty", Bool),
        r(19, "envFrom", Msg(&ENV_FROM)),
        f(20, "terminationMessagePolicy", Str),
    ],
};

static CONTAINER_PORT: Desc = Desc {
    name: "ContainerPort",
    fields: &[
        f(1, "name", Str),
        f(2, "hostPort", Int),
        f(3, "containerPort", Int),
        f(4, "protocol", Str),
        f(5, "hostIP", Str),
    ],
};

static ENV_VAR: Desc = Desc {
    name: "EnvVar",
    fields: &[
        f(1, "name", Str),
        f(2, "value", Str),
        f(3, "valueFrom", Msg(&ENV_SOURCE)),
    ],
};

static ENV_SOURCE: Desc = Desc {
    name: "EnvVarSource",
    fields: &[
        f(1, "fieldRef", Msg(&FIELD_SELECTOR)),
        f(3, "configMapKeyRef", Msg(&KEY_SELECTOR)),
        f(4, "secretKeyRef", Msg(&KEY_SELECTOR)),
    ],
};

static FIELD_SELECTOR: Desc = Desc {
    name: "ObjectFieldSelector",
    fields: &[f(1, "apiVersion", Str), f(2, "fieldPath", Str)],
};

static KEY_SELECTOR: Desc = Desc {
    name: "KeySelector",
    fields: &[
        f(1, "", Inline(&LOCAL_REF)),
        f(2, "key", Str),
        f(3, "optional", OptBool),
    ],
};

static ENV_FROM: Desc = Desc {
    name: "EnvFromSource",
    fields: &[
        f(1, "prefix", Str),
        f(2, "configMapRef", Msg(&ENV_FROM_REF)),
        f(3, "secretRef", Msg(&ENV_FROM_REF)),
    ],
};

static ENV_FROM_REF: Desc = Desc {
    name: "EnvSource",
    fields: &[f(1, "", Inline(&LOCAL_REF)), f(2, "optional", OptBool)],
};

static RESOURCES: Desc = Desc {
    name: "ResourceRequirements",
    fields: &[f(1, "limits", MapQty), f(2, "requests", MapQty)],
};

static VOLUME_MOUNT: Desc = Desc {
    name: "VolumeMount",
    fields: &[
        f(1, "name", Str),
        f(2, "readOnly", Bool),
        f(3, "mountPath", Str),
        f(4, "subPath", Str),
    ],
};

static NAMESPACE: Desc = Desc {
    name: "Namespace",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        f(2, "spec", Msg(&NAMESPACE_SPEC)),
        f(3, "status", Msg(&EMPTY_STATUS)),
    ],
};

static NAMESPACE_SPEC: Desc = Desc {
    name: "NamespaceSpec",
    fields: &[r(1, "finalizers", Str)],
};

static CONFIGMAP: Desc = Desc {
    name: "ConfigMap",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        f(2, "data", MapStr),
        f(3, "binaryData", MapBytes),
        f(4, "immutable", OptBool),
    ],
};

static SECRET: Desc = Desc {
    name: "Secret",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        f(2, "data", MapBytes),
        f(3, "type", Str),
        f(4, "stringData", MapStr),
        f(5, "immutable", OptBool),
    ],
};

static SERVICE: Desc = Desc {
    name: "Service",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        f(2, "spec", Msg(&SERVICE_SPEC)),
        f(3, "status", Msg(&EMPTY_STATUS)),
    ],
};

static SERVICE_SPEC: Desc = Desc {
    name: "ServiceSpec",
    fields: &[
        r(1, "ports", Msg(&SERVICE_PORT)),
        f(2, "selector", MapStr),
        f(3, "clusterIP", Str),
        f(4, "type", Str),
        r(5, "externalIPs", Str),
        f(7, "sessionAffinity", Str),
        f(8, "loadBalancerIP", Str),
        f(10, "externalName", Str),
        f(11, "externalTrafficPolicy", Str),
        f(12, "healthCheckNodePort", Int),
        f(13, "publishNotReadyAddresses", Bool),
        f(17, "ipFamilyPolicy", Str),
        r(18, "clusterIPs", Str),
        r(19, "ipFamilies", Str),
        f(22, "internalTrafficPolicy", Str),
    ],
};

static SERVICE_PORT: Desc = Desc {
    name: "ServicePort",
    fields: &[
        f(1, "name", Str),
        f(2, "protocol", Str),
        f(3, "port", Int),
        f(4, "targetPort", IntOrStr),
        f(5, "nodePort", Int),
        f(6, "appProtocol", Str),
    ],
};

static CSR: Desc = Desc {
    name: "CertificateSigningRequest",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        f(2, "spec", Msg(&CSR_SPEC)),
        f(3, "status", Msg(&CSR_STATUS)),
    ],
};

static CSR_SPEC: Desc = Desc {
    name: "CertificateSigningRequestSpec",
    fields: &[
        f(1, "request", Bytes),
        f(2, "username", Str),
        f(3, "uid", Str),
        r(4, "groups", Str),
        r(5, "usages", Str),
        f(7, "signerName", Str),
        f(8, "expirationSeconds", OptInt),
    ],
};

static CSR_STATUS: Desc = Desc {
    name: "CertificateSigningRequestStatus",
    fields: &[
        r(1, "conditions", Msg(&CSR_CONDITION)),
        f(2, "certificate", Bytes),
    ],
};

static CSR_CONDITION: Desc = Desc {
    name: "CertificateSigningRequestCondition",
    fields: &[
        f(1, "type", Str),
        f(2, "reason", Str),
        f(3, "message", Str),
        f(4, "lastUpdateTime", Time),
        f(5, "lastTransitionTime", Time),
        f(6, "status", Str),
    ],
};

static DELETE_OPTIONS: Desc = Desc {
    name: "DeleteOptions",
    fields: &[
        f(1, "gracePeriodSeconds", OptInt),
        f(2, "preconditions", Msg(&PRECONDITIONS)),
        f(3, "orphanDependents", OptBool),
        f(4, "propagationPolicy", Str),
        r(5, "dryRun", Str),
        f(
            6,
            "ignoreStoreReadErrorWithClusterBreakingPotential",
            OptBool,
        ),
    ],
};

static PRECONDITIONS: Desc = Desc {
    name: "Preconditions",
    fields: &[f(1, "uid", Str), f(2, "resourceVersion", Str)],
};

static POLICY_RULE: Desc = Desc {
    name: "PolicyRule",
    fields: &[
        r(1, "verbs", Str),
        r(2, "apiGroups", Str),
        r(3, "resources", Str),
        r(4, "resourceNames", Str),
        r(5, "nonResourceURLs", Str),
    ],
};

static ROLE: Desc = Desc {
    name: "Role",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        r(2, "rules", Msg(&POLICY_RULE)),
    ],
};

static CLUSTER_ROLE: Desc = Desc {
    name: "ClusterRole",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        r(2, "rules", Msg(&POLICY_RULE)),
        f(3, "aggregationRule", Msg(&AGGREGATION_RULE)),
    ],
};

static AGGREGATION_RULE: Desc = Desc {
    name: "AggregationRule",
    fields: &[r(1, "clusterRoleSelectors", Msg(&LABEL_SELECTOR))],
};

static ROLE_BINDING: Desc = Desc {
    name: "RoleBinding",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        r(2, "subjects", Msg(&SUBJECT)),
        f(3, "roleRef", Msg(&ROLE_REF)),
    ],
};

static SUBJECT: Desc = Desc {
    name: "Subject",
    fields: &[
        f(1, "kind", Str),
        f(2, "apiGroup", Str),
        f(3, "name", Str),
        f(4, "namespace", Str),
    ],
};

static ROLE_REF: Desc = Desc {
    name: "RoleRef",
    fields: &[f(1, "apiGroup", Str), f(2, "kind", Str), f(3, "name", Str)],
};

static SERVICE_ACCOUNT: Desc = Desc {
    name: "ServiceAccount",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        r(2, "secrets", Msg(&OBJECT_REFERENCE)),
        r(3, "imagePullSecrets", Msg(&LOCAL_REF)),
        f(4, "automountServiceAccountToken", OptBool),
    ],
};

static OBJECT_REFERENCE: Desc = Desc {
    name: "ObjectReference",
    fields: &[
        f(1, "kind", Str),
        f(2, "namespace", Str),
        f(3, "name", Str),
        f(4, "uid", Str),
        f(5, "apiVersion", Str),
        f(6, "resourceVersion", Str),
        f(7, "fieldPath", Str),
    ],
};

static TOKEN_REQUEST: Desc = Desc {
    name: "TokenRequest",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        f(2, "spec", Msg(&TOKEN_REQUEST_SPEC)),
        f(3, "status", Msg(&TOKEN_REQUEST_STATUS)),
    ],
};

static TOKEN_REQUEST_SPEC: Desc = Desc {
    name: "TokenRequestSpec",
    fields: &[
        r(1, "audiences", Str),
        f(3, "boundObjectRef", Msg(&BOUND_OBJECT_REF)),
        f(4, "expirationSeconds", OptInt),
    ],
};

static BOUND_OBJECT_REF: Desc = Desc {
    name: "BoundObjectReference",
    fields: &[
        f(1, "kind", Str),
        f(2, "apiVersion", Str),
        f(3, "name", Str),
        f(4, "uid", Str),
    ],
};

static TOKEN_REQUEST_STATUS: Desc = Desc {
    name: "TokenRequestStatus",
    fields: &[f(1, "token", Str), f(2, "expirationTimestamp", Time)],
};

static EVICTION: Desc = Desc {
    name: "Eviction",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        f(2, "deleteOptions", Msg(&DELETE_OPTIONS)),
    ],
};

static BINDING: Desc = Desc {
    name: "Binding",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        f(2, "target", Msg(&OBJECT_REFERENCE)),
    ],
};

static SCALE: Desc = Desc {
    name: "Scale",
    fields: &[
        f(1, "metadata", Msg(&OBJECT_META)),
        f(2, "spec", Msg(&SCALE_SPEC)),
        f(3, "status", Msg(&SCALE_STATUS)),
    ],
};

static SCALE_SPEC: Desc = Desc {
    name: "ScaleSpec",
    fields: &[f(1, "replicas", OptInt)],
};

static SCALE_STATUS: Desc = Desc {
    name: "ScaleStatus",
    fields: &[f(1, "replicas", Int), f(2, "selector", Str)],
};

/// The top-level kinds whose protobuf form this server decodes.
fn root(kind: &str) -> Option<&'static Desc> {
    Some(match kind {
        "Deployment" => &DEPLOYMENT,
        "Namespace" => &NAMESPACE,
        "ConfigMap" => &CONFIGMAP,
        "Secret" => &SECRET,
        "Service" => &SERVICE,
        "CertificateSigningRequest" => &CSR,
        "ServiceAccount" => &SERVICE_ACCOUNT,
        "Role" => &ROLE,
        "ClusterRole" => &CLUSTER_ROLE,
        "RoleBinding" | "ClusterRoleBinding" => &ROLE_BINDING,
        "DeleteOptions" => &DELETE_OPTIONS,
        "TokenRequest" => &TOKEN_REQUEST,
        "Eviction" => &EVICTION,
        "Binding" => &BINDING,
        "Scale" => &SCALE,
        _ => return None,
    })
}

/// A wire-level decoding error, or an unsupported field.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(String);

fn err(msg: impl Into<String>) -> Error {
    Error(msg.into())
}

/// One field as read from the wire.
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, Error> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| err("truncated varint"))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(err("varint longer than 10 bytes"))
    }

    fn next(&mut self) -> Result<Option<(u32, Wire<'a>)>, Error> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let tag = u32::try_from(key >> 3).map_err(|_| err("field number out of range"))?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| err("length overflow"))?;
                let end = self
                    .pos
                    .checked_add(len)
                    .filter(|e| *e <= self.buf.len())
                    .ok_or_else(|| err("length-delimited field runs past the end"))?;
                let b = &self.buf[self.pos..end];
                self.pos = end;
                Wire::Bytes(b)
            }
            1 => {
                self.skip(8)?;
                Wire::Fixed
            }
            5 => {
                self.skip(4)?;
                Wire::Fixed
            }
            w => return Err(err(format!("unsupported wire type {w}"))),
        };
        Ok(Some((tag, wire)))
    }

    fn skip(&mut self, n: usize) -> Result<(), Error> {
        if self.pos + n > self.buf.len() {
            return Err(err("truncated fixed-width field"));
        }
        self.pos += n;
        Ok(())
    }
}

/// Decodes a `k8s\0`-prefixed body into `(apiVersion, kind, object as JSON)`.
pub fn decode_body(body: &[u8]) -> Result<Value, Error> {
    let payload = body
        .strip_prefix(b"k8s\0")
        .ok_or_else(|| err("missing the k8s protobuf magic"))?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), None);
    let mut rd = Reader::new(payload);
    while let Some((tag, w)) = rd.next()? {
        match (tag, w) {
            (1, Wire::Bytes(tm)) => {
                let mut t = Reader::new(tm);
                while let Some((tag, w)) = t.next()? {
                    match (tag, w) {
                        (1, Wire::Bytes(b)) => {
                            api_version = utf8(b, "Unknown.typeMeta.apiVersion")?
                        }
                        (2, Wire::Bytes(b)) => kind = utf8(b, "Unknown.typeMeta.kind")?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(b)) => raw = Some(b),
            (3, Wire::Bytes(b)) if !b.is_empty() => {
                return Err(err(format!(
                    "content encoding {:?} is not supported",
                    String::from_utf8_lossy(b)
                )));
            }
            _ => {}
        }
    }
    let desc = root(&kind).ok_or_else(|| {
        err(format!(
            "protobuf bodies of kind {kind:?} are not supported by this server; send the object as JSON"
        ))
    })?;
    let raw = raw.ok_or_else(|| err("the protobuf envelope has no object (Unknown.raw)"))?;
    let mut obj = message(raw, desc)?;
    obj.insert("apiVersion".into(), Value::String(api_version));
    obj.insert("kind".into(), Value::String(kind));
    Ok(Value::Object(obj))
}

fn utf8(b: &[u8], what: &str) -> Result<String, Error> {
    String::from_utf8(b.to_vec()).map_err(|_| err(format!("{what}: invalid UTF-8")))
}

fn message(buf: &[u8], desc: &Desc) -> Result<Map<String, Value>, Error> {
    let mut out = Map::new();
    let mut rd = Reader::new(buf);
    while let Some((tag, w)) = rd.next()? {
        let Some(field) = desc.fields.iter().find(|f| f.tag == tag) else {
            match w {
                Wire::Bytes([]) => continue,
                Wire::Varint(0) => continue,
                _ => {
                    return Err(err(format!(
                        "field {tag} of {} is not supported in protobuf bodies by this server; send the object as JSON",
                        desc.name
                    )));
                }
            }
        };
        let path = || format!("{}.{}", desc.name, field.name);
        let value = match (field.ty, w) {
            (Inline(inner), Wire::Bytes(b)) => {
                out.extend(message(b, inner)?);
                continue;
            }
            (Str, Wire::Bytes(b)) => Value::String(utf8(b, &path())?),
            (Int | OptInt, Wire::Varint(v)) => Value::from(v as i64),
            (Bool | OptBool, Wire::Varint(v)) => Value::Bool(v != 0),
            (Msg(inner), Wire::Bytes(b)) => Value::Object(message(b, inner)?),
            (Time, Wire::Bytes(b)) => time(b)?,
            (IntOrStr, Wire::Bytes(b)) => int_or_string(b)?,
            (Qty, Wire::Bytes(b)) => quantity(b)?,
            (Bytes, Wire::Bytes(b)) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
            (MapStr | MapBytes | MapQty, Wire::Bytes(b)) => {
                let (k, v) = map_entry(b, field.ty, &path())?;
                let m = out
                    .entry(field.name)
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(m) = m {
                    m.insert(k, v);
                }
                continue;
            }
            _ => return Err(err(format!("{}: unexpected wire type", path()))),
        };
        if field.repeated {
            let list = out
                .entry(field.name)
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(a) = list {
                a.push(value);
            }
            continue;
        }
        let omit = match (field.ty, &value) {
            (Str | Bytes, Value::String(s)) => s.is_empty(),
            (Int, Value::Number(n)) => n.as_i64() == Some(0),
            (Bool, Value::Bool(b)) => !b,
            (Time, Value::Null) => true,
            _ => false,
        };
        if !omit {
            out.insert(field.name.to_string(), value);
        }
    }
    Ok(out)
}

fn map_entry(b: &[u8], ty: Ty, path: &str) -> Result<(String, Value), Error> {
    let (mut key, mut val) = (String::new(), None);
    let mut rd = Reader::new(b);
    while let Some((tag, w)) = rd.next()? {
        match (tag, w) {
            (1, Wire::Bytes(k)) => key = utf8(k, path)?,
            (2, Wire::Bytes(v)) => {
                val = Some(match ty {
                    MapStr => Value::String(utf8(v, path)?),
                    MapBytes => Value::String(base64::engine::general_purpose::STANDARD.encode(v)),
                    _ => quantity(v)?,
                })
            }
            _ => return Err(err(format!("{path}: malformed map entry"))),
        }
    }
    let val = val.unwrap_or_else(|| match ty {
        MapQty => Value::String("0".into()),
        _ => Value::String(String::new()),
    });
    Ok((key, val))
}

/// Go's zero `time.Time` as Unix seconds: it marks an unset timestamp.
const GO_ZERO_TIME: i64 = -62_135_596_800;

fn time(b: &[u8]) -> Result<Value, Error> {
    // Go encodes the zero time as an empty message.
    if b.is_empty() {
        return Ok(Value::Null);
    }
    let (mut secs, mut nanos) = (0i64, 0i32);
    let mut rd = Reader::new(b);
    while let Some((tag, w)) = rd.next()? {
        match (tag, w) {
            (1, Wire::Varint(v)) => secs = v as i64,
            (2, Wire::Varint(v)) => nanos = v as i32,
            _ => return Err(err("Time: malformed")),
        }
    }
    if secs == GO_ZERO_TIME && nanos == 0 {
        return Ok(Value::Null);
    }
    let ts = jiff::Timestamp::new(secs, 0).map_err(|e| err(format!("Time: {e}")))?;
    Ok(Value::String(ts.to_string()))
}

fn int_or_string(b: &[u8]) -> Result<Value, Error> {
    let (mut ty, mut int, mut s) = (0u64, 0i64, String::new());
    let mut rd = Reader::new(b);
    while let Some((tag, w)) = rd.next()? {
        match (tag, w) {
            (1, Wire::Varint(v)) => ty = v,
            (2, Wire::Varint(v)) => int = i64::from(v as i32),
            (3, Wire::Bytes(v)) => s = utf8(v, "IntOrString.strVal")?,
            _ => return Err(err("IntOrString: malformed")),
        }
    }
    Ok(if ty == 1 {
        Value::String(s)
    } else {
        Value::from(int)
    })
}

fn quantity(b: &[u8]) -> Result<Value, Error> {
    let mut s = String::new();
    let mut rd = Reader::new(b);
    while let Some((tag, w)) = rd.next()? {
        if let (1, Wire::Bytes(v)) = (tag, w) {
            s = utf8(v, "Quantity")?;
        }
    }
    Ok(Value::String(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes(tag: u32, b: &[u8], out: &mut Vec<u8>) {
        varint(u64::from(tag) << 3 | 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    fn int(tag: u32, v: i64, out: &mut Vec<u8>) {
        varint(u64::from(tag) << 3, out);
        varint(v as u64, out);
    }

    fn envelope(api: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let mut tm = Vec::new();
        bytes(1, api.as_bytes(), &mut tm);
        bytes(2, kind.as_bytes(), &mut tm);
        let mut out = b"k8s\0".to_vec();
        bytes(1, &tm, &mut out);
        bytes(2, raw, &mut out);
        bytes(3, b"", &mut out);
        bytes(4, b"", &mut out);
        out
    }

    fn meta(name: &str) -> Vec<u8> {
        let mut m = Vec::new();
        bytes(1, name.as_bytes(), &mut m);
        bytes(2, b"", &mut m);
        let mut t = Vec::new();
        int(1, GO_ZERO_TIME, &mut t);
        int(2, 0, &mut t);
        bytes(8, &t, &mut m);
        let mut label = Vec::new();
        bytes(1, b"app", &mut label);
        bytes(2, name.as_bytes(), &mut label);
        bytes(11, &label, &mut m);
        m
    }

    #[test]
    fn deployment_like_kubectl_create() {
        let mut container = Vec::new();
        bytes(1, b"busybox", &mut container);
        bytes(2, b"busybox:1", &mut container);
        bytes(3, b"sleep", &mut container);
        bytes(3, b"3600", &mut container);
        bytes(8, b"", &mut container);
        let mut pspec = Vec::new();
        bytes(2, &container, &mut pspec);
        let mut tmpl = Vec::new();
        bytes(1, &meta("web"), &mut tmpl);
        bytes(2, &pspec, &mut tmpl);
        let mut sel = Vec::new();
        let mut e = Vec::new();
        bytes(1, b"app", &mut e);
        bytes(2, b"web", &mut e);
        bytes(1, &e, &mut sel);
        let mut spec = Vec::new();
        int(1, 0, &mut spec);
        bytes(2, &sel, &mut spec);
        bytes(3, &tmpl, &mut spec);
        bytes(4, b"", &mut spec);
        int(5, 0, &mut spec);
        let mut d = Vec::new();
        bytes(1, &meta("web"), &mut d);
        bytes(2, &spec, &mut d);
        bytes(3, b"", &mut d);
        let v = decode_body(&envelope("apps/v1", "Deployment", &d)).unwrap();
        assert_eq!(v["kind"], "Deployment");
        assert_eq!(v["apiVersion"], "apps/v1");
        assert_eq!(v["metadata"]["name"], "web");
        assert!(v["metadata"].get("generateName").is_none());
        assert!(v["metadata"].get("creationTimestamp").is_none());
        assert_eq!(v["spec"]["replicas"], 0, "pointer zero kept");
        assert!(v["spec"].get("minReadySeconds").is_none());
        assert_eq!(v["spec"]["selector"]["matchLabels"]["app"], "web");
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "busybox:1");
        assert_eq!(c["command"], serde_json::json!(["sleep", "3600"]));
        assert_eq!(c["resources"], serde_json::json!({}));
    }

    #[test]
    fn service_target_port_and_secret_bytes() {
        let mut tp = Vec::new();
        int(1, 0, &mut tp);
        int(2, 8080, &mut tp);
        let mut port = Vec::new();
        bytes(1, b"80-8080", &mut port);
        bytes(2, b"TCP", &mut port);
        int(3, 80, &mut port);
        bytes(4, &tp, &mut port);
        let mut spec = Vec::new();
        bytes(1, &port, &mut spec);
        bytes(4, b"ClusterIP", &mut spec);
        let mut s = Vec::new();
        bytes(1, &meta("web"), &mut s);
        bytes(2, &spec, &mut s);
        let v = decode_body(&envelope("v1", "Service", &s)).unwrap();
        assert_eq!(v["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(v["spec"]["type"], "ClusterIP");

        let mut entry = Vec::new();
        bytes(1, b"k", &mut entry);
        bytes(2, &[0, 1, 2], &mut entry);
        let mut sec = Vec::new();
        bytes(1, &meta("s"), &mut sec);
        bytes(2, &entry, &mut sec);
        bytes(3, b"Opaque", &mut sec);
        let v = decode_body(&envelope("v1", "Secret", &sec)).unwrap();
        assert_eq!(v["data"]["k"], "AAEC");
    }

    #[test]
    fn unknown_fields_and_garbage_are_errors() {
        let mut d = Vec::new();
        bytes(1, &meta("x"), &mut d);
        bytes(99, b"data", &mut d);
        let e = decode_body(&envelope("v1", "ConfigMap", &d)).unwrap_err();
        assert!(e.to_string().contains("field 99 of ConfigMap"), "{e}");
        let e = decode_body(&envelope("batch/v1", "CronJob", &d)).unwrap_err();
        assert!(e.to_string().contains("CronJob"), "{e}");
        let e = decode_body(b"k8s\0\x0a\xff").unwrap_err();
        assert!(
            e.to_string().contains("truncated") || e.to_string().contains("past"),
            "{e}"
        );
    }
}
