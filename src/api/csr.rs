//! CertificateSigningRequests (`certificates.k8s.io/v1`): the requester the server records
//! (from the caller, never from the body), kube-controller-manager's auto-approval of node
//! client certificates (kubelet TLS bootstrap: `nodeclient` for callers allowed to create
//! `certificatesigningrequests/nodeclient`, `selfnodeclient` for a node renewing its own),
//! keelson's auto-approval of a node's serving certificate for its own addresses, and the
//! signing of approved requests for the `kubernetes.io` signers with the cluster CA.
//! Never talks to kubelets or the runtime.

use base64::Engine;
use rcgen::{CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose};
use serde_json::{Value, json};

use super::{ApiState, authz::Identity, handlers::ApiError};

pub const CLIENT_KUBELET: &str = "kubernetes.io/kube-apiserver-client-kubelet";
pub const KUBELET_SERVING: &str = "kubernetes.io/kubelet-serving";
pub const CLIENT: &str = "kubernetes.io/kube-apiserver-client";

fn invalid(name: &str, cause: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        format!("CertificateSigningRequest.certificates.k8s.io \"{name}\" is invalid: {cause}"),
    )
}

/// The request in `spec.request` (base64 of a PEM `CERTIFICATE REQUEST`), signature checked.
fn parse(obj: &Value) -> Result<CertificateSigningRequestParams, String> {
    let b64 = obj
        .pointer("/spec/request")
        .and_then(Value::as_str)
        .ok_or("spec.request: Required value")?;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("spec.request: Invalid value: not base64: {e}"))?;
    let pem = String::from_utf8(pem).map_err(|_| "spec.request: Invalid value: not PEM")?;
    CertificateSigningRequestParams::from_pem(&pem)
        .map_err(|e| format!("spec.request: Invalid value: {e}"))
}

/// Subject common name and organizations of a parsed request.
fn subject(p: &CertificateSigningRequestParams) -> (String, Vec<String>) {
    let mut cn = String::new();
    let mut orgs = vec![];
    for (t, v) in p.params.distinguished_name.iter() {
        let s = match v {
            rcgen::DnValue::Utf8String(s) => s.clone(),
            rcgen::DnValue::PrintableString(s) => s.as_str().to_string(),
            rcgen::DnValue::Ia5String(s) => s.as_str().to_string(),
            _ => continue,
        };
        match t {
            DnType::CommonName => cn = s,
            DnType::OrganizationName => orgs.push(s),
            _ => {}
        }
    }
    (cn, orgs)
}

fn usages(obj: &Value) -> Vec<String> {
    obj.pointer("/spec/usages")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(|u| u.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the request has the shape the signer allows (Kubernetes' signer rules), or why not.
fn check_shape(
    signer: &str,
    p: &CertificateSigningRequestParams,
    usages: &[String],
) -> Result<(), String> {
    let (cn, orgs) = subject(p);
    let allowed: &[&str] = match signer {
        CLIENT_KUBELET => &["digital signature", "key encipherment", "client auth"],
        KUBELET_SERVING => &["digital signature", "key encipherment", "server auth"],
        CLIENT => &["digital signature", "key encipherment", "client auth"],
        _ => return Err(format!("signer {signer:?} is not served")),
    };
    if let Some(u) = usages.iter().find(|u| !allowed.contains(&u.as_str())) {
        return Err(format!("usage {u:?} is not allowed for {signer}"));
    }
    if p.params.is_ca != rcgen::IsCa::NoCa && p.params.is_ca != rcgen::IsCa::ExplicitNoCa {
        return Err("CA certificates are not issued".into());
    }
    match signer {
        CLIENT_KUBELET | KUBELET_SERVING => {
            if !cn.starts_with("system:node:") || cn.len() == "system:node:".len() {
                return Err("subject common name must begin with \"system:node:\"".into());
            }
            if orgs != ["system:nodes"] {
                return Err("subject organization must be exactly [\"system:nodes\"]".into());
            }
            let needs = if signer == CLIENT_KUBELET {
                "client auth"
            } else {
                "server auth"
            };
            if !usages.iter().any(|u| u == needs) {
                return Err(format!("usages must include {needs:?}"));
            }
            if signer == CLIENT_KUBELET && !p.params.subject_alt_names.is_empty() {
                return Err("no subject alternative names are allowed".into());
            }
            if signer == KUBELET_SERVING {
                if p.params.subject_alt_names.is_empty() {
                    return Err(
                        "at least one DNS or IP subject alternative name is required".into(),
                    );
                }
                if p.params.subject_alt_names.iter().any(|s| {
                    !matches!(s, rcgen::SanType::DnsName(_) | rcgen::SanType::IpAddress(_))
                }) {
                    return Err("only DNS and IP subject alternative names are allowed".into());
                }
            }
        }
        _ => {
            if !usages.iter().any(|u| u == "client auth") {
                return Err("usages must include \"client auth\"".into());
            }
        }
    }
    Ok(())
}

fn condition(obj: &Value, kind: &str) -> bool {
    obj.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|l| {
            l.iter()
                .any(|c| c["type"] == kind && c["status"].as_str().unwrap_or("True") == "True")
        })
}

fn add_condition(obj: &mut Value, kind: &str, reason: &str, message: &str) {
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    if !obj["status"].is_object() {
        obj["status"] = json!({});
    }
    if !obj["status"]["conditions"].is_array() {
        obj["status"]["conditions"] = json!([]);
    }
    if let Some(l) = obj["status"]["conditions"].as_array_mut() {
        l.push(
            json!({"type": kind, "status": "True", "reason": reason, "message": message,
                      "lastUpdateTime": now, "lastTransitionTime": now}),
        );
    }
}

/// A new request: the requester recorded from the caller, the request checked, then
/// auto-approval and signing where they apply.
pub async fn on_create(st: &ApiState, id: &Identity, obj: &mut Value) -> Result<(), ApiError> {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let super::authz::UserInfo {
        username: user,
        groups,
    } = id.info();
    obj["spec"]["username"] = json!(user);
    obj["spec"]["groups"] = json!(groups);
    if let Some(spec) = obj["spec"].as_object_mut() {
        spec.remove("uid");
        spec.remove("extra");
    }
    obj["status"] = json!({});
    let p = parse(obj).map_err(|e| invalid(&name, e))?;
    let signer = obj
        .pointer("/spec/signerName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if signer.is_empty() {
        return Err(invalid(&name, "spec.signerName: Required value"));
    }
    if usages(obj).is_empty() {
        return Err(invalid(&name, "spec.usages: Required value"));
    }
    if let Some(why) = auto_approval(st, id, &signer, &p, obj).await? {
        add_condition(obj, "Approved", "AutoApproved", &why);
    }
    sign_if_approved(st, obj);
    Ok(())
}

/// Why the request is approved without a person, if it is: kube-controller-manager's
/// `nodeclient` and `selfnodeclient` recognizers, and (keelson's own, as k3s signs its
/// agents' serving certificates) a node's serving certificate for its own name and addresses.
async fn auto_approval(
    st: &ApiState,
    id: &Identity,
    signer: &str,
    p: &CertificateSigningRequestParams,
    obj: &Value,
) -> Result<Option<String>, ApiError> {
    if check_shape(signer, p, &usages(obj)).is_err() {
        return Ok(None);
    }
    let (cn, _) = subject(p);
    let node = cn.strip_prefix("system:node:").unwrap_or("");
    match (signer, id) {
        (CLIENT_KUBELET, Identity::Node(n)) if n == node => Ok(Some(
            "Auto approving self kubelet client certificate after SubjectAccessReview.".into(),
        )),
        (CLIENT_KUBELET, Identity::Bootstrap | Identity::Admin) => Ok(Some(
            "Auto approving kubelet client certificate after SubjectAccessReview.".into(),
        )),
        (CLIENT_KUBELET, Identity::ServiceAccount(..) | Identity::User(_)) => {
            let a = super::rbac::Attributes {
                verb: "create".into(),
                group: "certificates.k8s.io".into(),
                resource: "certificatesigningrequests/nodeclient".into(),
                namespace: None,
                name: None,
            };
            Ok(super::rbac::allows(st, &id.info(), &a).await?.then(|| {
                "Auto approving kubelet client certificate after SubjectAccessReview.".into()
            }))
        }
        (KUBELET_SERVING, Identity::Node(n)) if n == node => {
            // Only the node's own name and the addresses its Node object reports.
            let nodes = super::registry::find("", "v1", "nodes")
                .ok_or_else(|| ApiError::internal("no nodes resource"))?;
            let Some(kv) = st
                .store
                .get(&nodes.key(None, node))
                .await
                .map_err(ApiError::internal)?
            else {
                return Ok(None);
            };
            let n: Value = serde_json::from_slice(&kv.value).map_err(ApiError::internal)?;
            let addrs: Vec<String> = n
                .pointer("/status/addresses")
                .and_then(Value::as_array)
                .map(|l| {
                    l.iter()
                        .filter_map(|a| a["address"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let ok = p.params.subject_alt_names.iter().all(|s| match s {
                rcgen::SanType::IpAddress(ip) => addrs.contains(&ip.to_string()),
                rcgen::SanType::DnsName(d) => {
                    d.as_str() == node || addrs.iter().any(|a| a == d.as_str())
                }
                _ => false,
            });
            Ok(ok.then(|| {
                "Auto approving the node's serving certificate for its own addresses.".into()
            }))
        }
        _ => Ok(None),
    }
}

/// Signs an approved request of a served signer that has no certificate yet: the subject and
/// SANs of the request, the usages of the spec, the lifetime of `spec.expirationSeconds`
/// (10 minutes at least), never past `--cluster-signing-duration` (a year by default). A
/// request the signer refuses gets `Failed`.
pub fn sign_if_approved(st: &ApiState, obj: &mut Value) {
    if !condition(obj, "Approved")
        || condition(obj, "Denied")
        || condition(obj, "Failed")
        || obj
            .pointer("/status/certificate")
            .and_then(Value::as_str)
            .is_some_and(|c| !c.is_empty())
    {
        return;
    }
    let signer = obj
        .pointer("/spec/signerName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if ![CLIENT_KUBELET, KUBELET_SERVING, CLIENT].contains(&signer.as_str()) {
        // Another signer's request: left for it.
        return;
    }
    let us = usages(obj);
    let signed = parse(obj).and_then(|mut p| {
        check_shape(&signer, &p, &us)?;
        // The request's expirationSeconds (at least 10 minutes, as the API validates), never
        // past the signer's duration.
        let max = st.signing_duration.as_secs().max(1) as i64;
        let secs = match obj
            .pointer("/spec/expirationSeconds")
            .and_then(Value::as_i64)
        {
            Some(e) => e.max(600).min(max),
            None => max,
        };
        let now = jiff::Timestamp::now().as_second();
        let t = |s: i64| {
            time::OffsetDateTime::from_unix_timestamp(s).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        };
        // Backdated for clocks a little behind (kube's signer: 5 minutes), by at most a
        // tenth of the lifetime, so 80 % of it still lies ahead.
        p.params.not_before = t(now - (secs / 10).min(300));
        p.params.not_after = t(now + secs);
        p.params.is_ca = rcgen::IsCa::NoCa;
        p.params.key_usages = us
            .iter()
            .filter_map(|u| match u.as_str() {
                "digital signature" => Some(KeyUsagePurpose::DigitalSignature),
                "key encipherment" => Some(KeyUsagePurpose::KeyEncipherment),
                _ => None,
            })
            .collect();
        p.params.extended_key_usages = us
            .iter()
            .filter_map(|u| match u.as_str() {
                "client auth" => Some(ExtendedKeyUsagePurpose::ClientAuth),
                "server auth" => Some(ExtendedKeyUsagePurpose::ServerAuth),
                _ => None,
            })
            .collect();
        p.params.serial_number = Some(rcgen::SerialNumber::from_slice(
            &hex::decode(crate::runtime::random_hex(16)).unwrap_or_default(),
        ));
        super::pki::sign(&st.ca_key_pem, &p).map_err(|e| e.to_string())
    });
    match signed {
        Ok(pem) => {
            if !obj["status"].is_object() {
                obj["status"] = json!({});
            }
            obj["status"]["certificate"] =
                json!(base64::engine::general_purpose::STANDARD.encode(pem));
        }
        Err(why) => add_condition(obj, "Failed", "SignerValidationFailure", &why),
    }
}

/// `PUT .../certificatesigningrequests/NAME/approval`: the Approved/Denied conditions of the
/// body replace the object's, then an approved request is signed.
pub fn approve(st: &ApiState, cur: &Value, body: &Value) -> Result<Value, ApiError> {
    let mut new = cur.clone();
    let conds: Vec<Value> = body
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for c in &conds {
        let t = c["type"].as_str().unwrap_or("");
        if !matches!(t, "Approved" | "Denied" | "Failed") {
            return Err(invalid(
                cur.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
                format!("status.conditions[].type: Unsupported value: {t:?}"),
            ));
        }
    }
    if !new["status"].is_object() {
        new["status"] = json!({});
    }
    new["status"]["conditions"] = Value::Array(conds);
    if condition(&new, "Approved") && condition(&new, "Denied") {
        return Err(invalid(
            cur.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or(""),
            "status.conditions: Approved and Denied conditions are mutually exclusive",
        ));
    }
    sign_if_approved(st, &mut new);
    Ok(new)
}

/// How long finished and pending requests are kept (kube-controller-manager's csrcleaner).
const KEEP_FINISHED: i64 = 3600;
const KEEP_PENDING: i64 = 24 * 3600;

/// Whether a request is old enough to go at `now`: issued, denied or failed ones after an
/// hour, pending ones after a day.
fn expired(obj: &Value, now: i64) -> bool {
    let created = obj
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .map_or(now, |t| t.as_second());
    let finished = condition(obj, "Denied")
        || condition(obj, "Failed")
        || obj
            .pointer("/status/certificate")
            .and_then(Value::as_str)
            .is_some_and(|c| !c.is_empty());
    now - created
        > if finished {
            KEEP_FINISHED
        } else {
            KEEP_PENDING
        }
}

/// Deletes old CertificateSigningRequests every ten minutes (agents renew theirs, so they
/// would pile up otherwise).
pub async fn cleaner(store: std::sync::Arc<dyn crate::store::Store>) {
    let Some(r) = super::registry::find("certificates.k8s.io", "v1", "certificatesigningrequests")
    else {
        return;
    };
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(600)).await;
        let Ok(page) = store.list(&r.prefix(), None, 0).await else {
            continue;
        };
        let now = jiff::Timestamp::now().as_second();
        for kv in page.items {
            if serde_json::from_slice::<Value>(&kv.value).is_ok_and(|o| expired(&o, now)) {
                let _ = store
                    .delete(
                        &kv.key,
                        crate::store::Precondition::ModRevision(kv.mod_revision),
                    )
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_requests_go_after_an_hour_pending_ones_after_a_day() {
        let at = |secs_ago: i64, status: Value| {
            let created = jiff::Timestamp::from_second(1_000_000 - secs_ago)
                .unwrap()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string();
            json!({"metadata": {"creationTimestamp": created}, "status": status})
        };
        let issued = json!({"certificate": "eA=="});
        assert!(!expired(&at(3000, issued.clone()), 1_000_000));
        assert!(expired(&at(4000, issued), 1_000_000));
        let denied = json!({"conditions": [{"type": "Denied", "status": "True"}]});
        assert!(expired(&at(4000, denied), 1_000_000));
        assert!(!expired(&at(4000, json!({})), 1_000_000));
        assert!(expired(&at(90_000, json!({})), 1_000_000));
    }
}
