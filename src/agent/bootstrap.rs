//! The node's own credentials, as kubelet's TLS bootstrap makes them: a client certificate for
//! `system:node:<name>` (group `system:nodes`) asked for through a CertificateSigningRequest
//! with whatever credential the agent started with — the cluster's join token, a kubeconfig,
//! or the pod's service account — and a serving certificate for the kubelet API from the
//! `kubernetes.io/kubelet-serving` signer. Both are kept in `DATA_DIR/pki` (0600) and asked for
//! again once 80 % of their lifetime has passed. Never touches containers or the network.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use base64::Engine;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::{Api, Client, api::PostParams};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use serde_json::json;

const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
const SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";
/// How long to wait for a request to be approved and signed.
const WAIT: Duration = Duration::from_secs(60);

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Credential {
    pub cert_pem: String,
    pub key_pem: String,
}

fn paths(dir: &Path, what: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{what}.crt")),
        dir.join(format!("{what}.key")),
    )
}

/// A kept certificate that names `cn`, is valid now and has more than 20 % of its lifetime
/// left.
fn load_fresh(dir: &Path, what: &str, cn: &str) -> Option<Credential> {
    let (crt, key) = paths(dir, what);
    let cert_pem = std::fs::read_to_string(crt).ok()?;
    let key_pem = std::fs::read_to_string(key).ok()?;
    let fresh = fresh_for(&cert_pem, cn, jiff::Timestamp::now().as_second())?;
    fresh.then_some(Credential { cert_pem, key_pem })
}

/// Whether `cert_pem` names `cn` and, at `now`, is inside its validity with more than a fifth
/// of it left (None: not a certificate).
pub fn fresh_for(cert_pem: &str, cn: &str, now: i64) -> Option<bool> {
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let named = cert
        .subject()
        .iter_common_name()
        .any(|a| a.as_str().ok() == Some(cn));
    let (from, to) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    let renew_at = from + (to - from) * 4 / 5;
    Some(named && now >= from - 300 && now < renew_at)
}

fn save(dir: &Path, what: &str, c: &Credential) -> anyhow::Result<()> {
    crate::runtime::private_dir(dir, 0o700).with_context(|| dir.display().to_string())?;
    let (crt, key) = paths(dir, what);
    for (path, text) in [(&key, &c.key_pem), (&crt, &c.cert_pem)] {
        crate::runtime::write_private(path, text.as_bytes())
            .with_context(|| path.display().to_string())?;
    }
    Ok(())
}

/// Asks for a certificate of `signer` for `system:node:<node>` with `sans` and `usages`, and
/// waits until it is issued (approved and signed) or refused.
async fn request(
    client: &Client,
    node: &str,
    signer: &str,
    sans: Vec<SanType>,
    usages: &[&str],
) -> anyhow::Result<Credential> {
    let kp = KeyPair::generate().context("generating a key")?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("system:node:{node}"));
    dn.push(DnType::OrganizationName, "system:nodes");
    p.distinguished_name = dn;
    p.subject_alt_names = sans;
    let csr_pem = p
        .serialize_request(&kp)
        .and_then(|r| r.pem())
        .context("making the certificate request")?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let body: CertificateSigningRequest = serde_json::from_value(json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"generateName": "node-csr-"},
        "spec": {"request": base64::engine::general_purpose::STANDARD.encode(csr_pem),
                 "signerName": signer, "usages": usages},
    }))?;
    let created = api
        .create(&PostParams::default(), &body)
        .await
        .with_context(|| format!("creating a CertificateSigningRequest for {signer}"))?;
    let name = created.metadata.name.clone().unwrap_or_default();
    let started = std::time::Instant::now();
    let mut csr = created;
    loop {
        let status = csr.status.clone().unwrap_or_default();
        for c in status.conditions.iter().flatten() {
            if matches!(c.type_.as_str(), "Denied" | "Failed") && c.status == "True" {
                bail!(
                    "CertificateSigningRequest {name} {}: {}",
                    c.type_.to_lowercase(),
                    c.message.clone().unwrap_or_default()
                );
            }
        }
        if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
            let cert_pem = String::from_utf8(cert.0).context("the issued certificate")?;
            return Ok(Credential {
                cert_pem,
                key_pem: kp.serialize_pem(),
            });
        }
        if started.elapsed() > WAIT {
            bail!(
                "CertificateSigningRequest {name} for {signer} was not issued within {} s (approve it with `kubectl certificate approve {name}`)",
                WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        csr = api
            .get(&name)
            .await
            .with_context(|| format!("reading CertificateSigningRequest {name}"))?;
    }
}

/// The node's client certificate: the kept one while fresh, else a new one through a
/// CertificateSigningRequest made with `bootstrap` (the agent's starting credential).
pub async fn client_certificate(
    bootstrap: &kube::Config,
    node: &str,
    dir: Option<&Path>,
) -> anyhow::Result<Credential> {
    let cn = format!("system:node:{node}");
    if let Some(c) = dir.and_then(|d| load_fresh(d, "node-client", &cn)) {
        return Ok(c);
    }
    let client = Client::try_from(bootstrap.clone()).context("bootstrap client")?;
    let c = request(
        &client,
        node,
        CLIENT_SIGNER,
        vec![],
        &["digital signature", "key encipherment", "client auth"],
    )
    .await
    .context("node client certificate")?;
    if let Some(d) = dir {
        save(d, "node-client", &c)?;
    }
    tracing::info!(node, "node client certificate issued");
    Ok(c)
}

/// A certificate's validity (not before, not after), in Unix seconds.
pub fn validity(cert_pem: &str) -> Option<(i64, i64)> {
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

/// When a certificate is due for renewal (80 % of its lifetime), in Unix seconds.
pub fn renew_at(cert_pem: &str) -> Option<i64> {
    let (from, to) = validity(cert_pem)?;
    Some(from + (to - from) * 4 / 5)
}

/// Sleeps until `cert` is due, then renews it with `request` (retrying every 30 s on
/// failure) and hands the new one to `install`; for ever.
async fn keep_renewed<F, Fut>(
    what: &str,
    mut cert: Credential,
    mut request: F,
    install: impl Fn(&Credential),
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Credential>>,
{
    loop {
        let due = renew_at(&cert.cert_pem).unwrap_or(0);
        // At least a few seconds apart, whatever the certificate says (no hot loop).
        let wait = (due - jiff::Timestamp::now().as_second()).max(5) as u64;
        tokio::time::sleep(Duration::from_secs(wait)).await;
        match request().await {
            Ok(c) => {
                install(&c);
                tracing::info!(certificate = what, "certificate renewed");
                cert = c;
            }
            Err(e) => {
                tracing::warn!(certificate = what, error = %format!("{e:#}"), "renewing the certificate; trying again in 30 s");
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    }
}

/// Renews the node's client certificate (as the node itself: `selfnodeclient`) while the
/// agent runs; the switch presents the new one on new connections.
pub async fn rotate_client(
    client: Client,
    node: String,
    dir: Option<PathBuf>,
    switch: std::sync::Arc<crate::tls::CertSwitch>,
    cert: Credential,
) {
    let request = || {
        request(
            &client,
            &node,
            CLIENT_SIGNER,
            vec![],
            &["digital signature", "key encipherment", "client auth"],
        )
    };
    keep_renewed("node client", cert, request, |c| {
        if let Some(d) = &dir
            && let Err(e) = save(d, "node-client", c)
        {
            tracing::warn!(error = %format!("{e:#}"), "keeping the node client certificate");
        }
        if let Err(e) = switch.set(&c.cert_pem, &c.key_pem) {
            tracing::warn!(error = %format!("{e:#}"), "the renewed node client certificate");
        }
    })
    .await
}

/// Keeps the kubelet API's serving certificate issued and renewed: a kept fresh one is
/// served already; otherwise (and at 80 % of each one's life) a new one is asked for.
pub async fn rotate_serving(
    client: Client,
    node: String,
    ip: std::net::IpAddr,
    dir: PathBuf,
    switch: std::sync::Arc<crate::tls::CertSwitch>,
    kept: Option<Credential>,
) {
    let cert = match kept {
        Some(c) => c,
        None => match serving_certificate(&client, &node, ip, &dir).await {
            Some(c) => {
                if let Err(e) = switch.set(&c.cert_pem, &c.key_pem) {
                    tracing::warn!(error = %format!("{e:#}"), "the issued kubelet serving certificate");
                }
                c
            }
            None => return,
        },
    };
    let request = || async {
        serving_certificate(&client, &node, ip, &dir)
            .await
            .ok_or_else(|| anyhow::anyhow!("no kubelet serving certificate issued"))
    };
    keep_renewed("kubelet serving", cert, request, |c| {
        if let Err(e) = switch.set(&c.cert_pem, &c.key_pem) {
            tracing::warn!(error = %format!("{e:#}"), "the renewed kubelet serving certificate");
        }
    })
    .await
}

/// The kept kubelet serving certificate, while fresh.
pub fn kept_serving(dir: &Path, node: &str) -> Option<Credential> {
    load_fresh(dir, "kubelet-serving", &format!("system:node:{node}"))
}

/// A kubelet serving certificate for the node's name and `ip` from the `kubelet-serving`
/// signer, asked for once the Node reports that address (approvers check it), and kept (None
/// if it is not issued: a self-signed one stays, which API servers that check kubelet
/// certificates refuse).
pub async fn serving_certificate(
    client: &Client,
    node: &str,
    ip: std::net::IpAddr,
    dir: &Path,
) -> Option<Credential> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let started = std::time::Instant::now();
    loop {
        let shown = nodes.get_opt(node).await.ok().flatten().is_some_and(|n| {
            n.status
                .and_then(|s| s.addresses)
                .into_iter()
                .flatten()
                .any(|a| a.address == ip.to_string())
        });
        if shown || started.elapsed() > WAIT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut sans = vec![SanType::IpAddress(ip)];
    if let Ok(n) = node.to_string().try_into() {
        sans.push(SanType::DnsName(n));
    }
    match request(
        client,
        node,
        SERVING_SIGNER,
        sans,
        &["digital signature", "key encipherment", "server auth"],
    )
    .await
    {
        Ok(c) => {
            if let Err(e) = save(dir, "kubelet-serving", &c) {
                tracing::warn!(error = %format!("{e:#}"), "keeping the kubelet serving certificate");
            }
            tracing::info!(node, "kubelet serving certificate issued");
            Some(c)
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no kubelet serving certificate from the cluster: serving a self-signed one");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_renewed_after_four_fifths_of_their_life() {
        let kp = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "system:node:n1");
        p.not_before = time::OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(1_001_000).unwrap();
        let pem = p.self_signed(&kp).unwrap().pem();
        assert_eq!(fresh_for(&pem, "system:node:n1", 1_000_100), Some(true));
        assert_eq!(fresh_for(&pem, "system:node:n1", 1_000_850), Some(false));
        assert_eq!(fresh_for(&pem, "system:node:n2", 1_000_100), Some(false));
        assert_eq!(fresh_for("junk", "system:node:n1", 0), None);
    }
}
