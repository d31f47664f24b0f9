//! The server's credentials, made on first start and kept in the data directory: a CA, a serving
//! certificate signed by it, the admin token and the node-join token; and the admin kubeconfig.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Errors while making or loading credentials, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Credentials the server serves and hands out.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub admin_token: String,
    /// The join (bootstrap) token: it only lets an agent ask for its node's certificate.
    pub node_token: String,
    /// The CA's private key (PEM): the server signs approved CertificateSigningRequests.
    pub ca_key_pem: String,
    /// The key service account tokens are signed with: random, apart from every other secret.
    pub sa_key: Vec<u8>,
    /// The client certificate the API server presents to kubelets (kube-apiserver's
    /// `--kubelet-client-certificate`), signed by the CA, and its key.
    pub kubelet_client_pem: String,
    pub kubelet_client_key_pem: String,
}

fn read(path: &Path) -> Result<Option<String>, PkiError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PkiError::Io {
            path: path.into(),
            source,
        }),
    }
}

/// Writes a secret file readable by root only.
pub fn write_private(path: &Path, content: &str) -> Result<(), PkiError> {
    crate::runtime::write_private(path, content.as_bytes()).map_err(|source| PkiError::Io {
        path: path.into(),
        source,
    })
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "keelson-ca");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    p
}

/// A certificate for `cn` with `sans` and `usage`, signed by the CA; (certificate, key) PEM.
fn leaf(
    ca: &KeyPair,
    cn: &str,
    sans: Vec<SanType>,
    usage: rcgen::ExtendedKeyUsagePurpose,
) -> Result<(String, String), PkiError> {
    let kp = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.subject_alt_names = sans;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![usage];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let cert = p.signed_by(&kp, &Issuer::new(ca_params(), ca))?;
    Ok((cert.pem(), kp.serialize_pem()))
}

/// Signs a certificate for `params` (subject, SANs, usages already decided by the caller)
/// and `public_key` with the CA whose key is `ca_key_pem`; PEM.
pub fn sign(
    ca_key_pem: &str,
    csr: &rcgen::CertificateSigningRequestParams,
) -> Result<String, PkiError> {
    let ca = KeyPair::from_pem(ca_key_pem)?;
    Ok(csr.signed_by(&Issuer::new(ca_params(), &ca))?.pem())
}

fn token() -> String {
    crate::runtime::random_hex(24)
}

/// Loads the credentials in `dir`, making whatever is missing. `names` and `ips` become the
/// serving certificate's subject alternative names (a new certificate is made when they change).
pub fn ensure(dir: &Path, names: &[String], ips: &[IpAddr]) -> Result<Pki, PkiError> {
    crate::runtime::private_dir(dir, 0o700).map_err(|source| PkiError::Io {
        path: dir.into(),
        source,
    })?;
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    // A new CA (none, or half of one, was there) invalidates every certificate signed before.
    let (ca_pem, ca_kp, new_ca) = match (read(&ca_crt)?, read(&ca_key)?) {
        (Some(c), Some(k)) => {
            let kp = KeyPair::from_pem(&k).map_err(|e| PkiError::Invalid {
                path: ca_key.clone(),
                message: e.to_string(),
            })?;
            (c, kp, false)
        }
        // Written after the certificates it signs: a crash in between leaves no CA, and the
        // next start makes everything again.
        _ => {
            let kp = KeyPair::generate()?;
            let cert = ca_params().self_signed(&kp)?;
            (cert.pem(), kp, true)
        }
    };
    let (crt, key, sans_file) = (
        dir.join("server.crt"),
        dir.join("server.key"),
        dir.join("server.sans"),
    );
    let mut sans: Vec<String> = names.to_vec();
    sans.extend(ips.iter().map(|i| i.to_string()));
    let want = sans.join(",");
    let (cert_pem, key_pem) = match (read(&crt)?, read(&key)?, read(&sans_file)?) {
        (Some(c), Some(k), Some(s)) if s == want && !new_ca => (c, k),
        _ => {
            let sans = names
                .iter()
                .filter_map(|n| n.clone().try_into().ok().map(SanType::DnsName))
                .chain(ips.iter().map(|i| SanType::IpAddress(*i)))
                .collect();
            let (cert, key_pem) = leaf(
                &ca_kp,
                "keelson-apiserver",
                sans,
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            )?;
            write_private(&key, &key_pem)?;
            write_private(&crt, &cert)?;
            write_private(&sans_file, &want)?;
            (cert, key_pem)
        }
    };
    let (kc_crt, kc_key) = (
        dir.join("kubelet-client.crt"),
        dir.join("kubelet-client.key"),
    );
    let (kubelet_client_pem, kubelet_client_key_pem) = match (read(&kc_crt)?, read(&kc_key)?) {
        (Some(c), Some(k)) if !new_ca => (c, k),
        _ => {
            let (cert, key_pem) = leaf(
                &ca_kp,
                "kube-apiserver-kubelet-client",
                vec![],
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            )?;
            write_private(&kc_key, &key_pem)?;
            write_private(&kc_crt, &cert)?;
            (cert, key_pem)
        }
    };
    if new_ca {
        write_private(&ca_key, &ca_kp.serialize_pem())?;
        write_private(&ca_crt, &ca_pem)?;
    }
    let token_file = |name: &str| -> Result<String, PkiError> {
        let path = dir.join(name);
        match read(&path)? {
            Some(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
            _ => {
                let t = token();
                write_private(&path, &t)?;
                Ok(t)
            }
        }
    };
    Ok(Pki {
        ca_pem,
        cert_pem,
        key_pem,
        admin_token: token_file("admin-token")?,
        node_token: token_file("node-token")?,
        ca_key_pem: ca_kp.serialize_pem(),
        sa_key: hex::decode(token_file("sa.key")?).map_err(|e| PkiError::Invalid {
            path: dir.join("sa.key"),
            message: e.to_string(),
        })?,
        kubelet_client_pem,
        kubelet_client_key_pem,
    })
}

/// An admin kubeconfig for `server` (https://host:port).
pub fn kubeconfig(server: &str, ca_pem: &str, token: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: keelson\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: keelson\n  context:\n    cluster: keelson\n    user: admin\ncurrent-context: keelson\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_made_once_and_reused() {
        let d = tempfile::tempdir().unwrap();
        let ips = ["127.0.0.1".parse().unwrap()];
        let a = ensure(d.path(), &["localhost".into()], &ips).unwrap();
        let b = ensure(d.path(), &["localhost".into()], &ips).unwrap();
        assert_eq!(a.ca_pem, b.ca_pem);
        assert_eq!(a.cert_pem, b.cert_pem);
        assert_eq!(a.admin_token, b.admin_token);
        assert_ne!(a.admin_token, a.node_token);
        let mode = std::fs::metadata(d.path().join("ca.key"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        // New names → a new serving certificate from the same CA.
        let c = ensure(d.path(), &["localhost".into(), "kubernetes".into()], &ips).unwrap();
        assert_eq!(c.ca_pem, a.ca_pem);
        assert_ne!(c.cert_pem, a.cert_pem);
    }

    #[test]
    fn a_new_ca_reissues_the_certificates_it_signs() {
        let d = tempfile::tempdir().unwrap();
        let ips = ["127.0.0.1".parse().unwrap()];
        let a = ensure(d.path(), &["localhost".into()], &ips).unwrap();
        std::fs::remove_file(d.path().join("ca.key")).unwrap();
        let b = ensure(d.path(), &["localhost".into()], &ips).unwrap();
        assert_ne!(b.ca_pem, a.ca_pem);
        assert_ne!(b.cert_pem, a.cert_pem);
        assert_ne!(b.kubelet_client_pem, a.kubelet_client_pem);
        assert_eq!(b.admin_token, a.admin_token);
        for leaf in ["server.crt", "kubelet-client.crt"] {
            let out = std::process::Command::new("openssl")
                .args(["verify", "-CAfile", "ca.crt", leaf])
                .current_dir(d.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{leaf}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}
