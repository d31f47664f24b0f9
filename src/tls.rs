//! HTTPS plumbing shared by the API server and the agent's kubelet API: a rustls server
//! configuration from PEM, the accept loop (TLS, then HTTP/1.1 with upgrades), and a small
//! HTTPS client for the API server's calls to kubelets.

use std::sync::Arc;

use anyhow::Context;
use axum::Router;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn cert_and_key(
    cert_pem: &str,
    key_pem: &str,
) -> anyhow::Result<(
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("certificate")?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .context("private key")?
        .context("no private key in the key file")?;
    Ok((certs, key))
}

/// Set on each request of a connection whose client presented a certificate that chains to
/// the server's client CA (`server_config`'s `client_ca`): its subject's common name and
/// organizations, for the server to decide what that identity may do.
#[derive(Debug, Clone, Default)]
pub struct ClientCertVerified {
    pub common_name: String,
    pub organizations: Vec<String>,
}

impl ClientCertVerified {
    fn of(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let s = cert.subject();
        let text =
            |a: &x509_parser::x509::AttributeTypeAndValue| a.as_str().ok().map(str::to_string);
        Some(Self {
            common_name: s.iter_common_name().find_map(text).unwrap_or_default(),
            organizations: s.iter_organization().filter_map(text).collect(),
        })
    }
}

/// A server configuration serving `cert_pem` (chain) with `key_pem`. With `client_ca` (PEM),
/// clients may present a certificate, which must chain to it (requests of such connections
/// carry `ClientCertVerified`); clients without one are still served.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    client_ca: Option<&str>,
) -> anyhow::Result<rustls::ServerConfig> {
    let (certs, key) = cert_and_key(cert_pem, key_pem).context("serving certificate")?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut pem.as_bytes()) {
                roots
                    .add(c.context("client CA certificate")?)
                    .context("client CA certificate")?;
            }
            anyhow::ensure!(!roots.is_empty(), "no certificate in the client CA file");
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .allow_unauthenticated()
            .build()
            .context("client certificate verifier")?;
            builder.with_client_cert_verifier(v)
        }
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .context("TLS certificate")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: rustls::ServerConfig,
    app: Router,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { tracing::warn!(error = %e, "accept"); continue; }
            },
        };
        // Watch events and log lines are small writes that must go out at once (no Nagle).
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            // rustls verified any certificate the client presented against the client CA.
            let verified = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| ClientCertVerified::of(c));
            let svc = tower::ServiceExt::map_request(
                app,
                move |mut r: hyper::Request<hyper::body::Incoming>| {
                    if let Some(v) = &verified {
                        r.extensions_mut().insert(v.clone());
                    }
                    r
                },
            );
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            let io = hyper_util::rt::TokioIo::new(tls);
            if let Err(e) =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection_with_upgrades(io, svc)
                    .await
            {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

/// Accepts any server certificate: kube-apiserver's default towards kubelets (no
/// `--kubelet-certificate-authority`); the kubelet still authenticates the caller.
#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The client configuration for calls to kubelets: their self-signed certificates are not
/// checked; `identity` (certificate and key PEM) is presented when given.
pub fn kubelet_client_config(
    identity: Option<(&str, &str)>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert));
    Ok(Arc::new(match identity {
        None => b.with_no_client_auth(),
        Some((cert, key)) => {
            let (certs, key) = cert_and_key(cert, key).context("kubelet client certificate")?;
            b.with_client_auth_cert(certs, key)
                .context("kubelet client certificate")?
        }
    }))
}

/// An HTTP/1.1 connection over TLS to `addr` (a kubelet) with `cfg`
/// (`kubelet_client_config`), able to carry one upgraded request.
pub async fn connect(
    addr: std::net::SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<axum::body::Body>> {
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .with_context(|| format!("connecting to {addr}: timed out"))?
    .with_context(|| format!("connecting to {addr}"))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS to {addr}"))?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(send)
}

/// `GET https://addr/path_and_query` with a bearer token (and `cfg`'s client certificate);
/// the response streams.
pub async fn get(
    addr: std::net::SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    path_and_query: &str,
    bearer: &str,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let mut send = connect(addr, cfg).await?;
    let req = hyper::Request::get(path_and_query)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {bearer}"))
        .body(axum::body::Body::empty())
        .context("request")?;
    send.send_request(req)
        .await
        .context("request to the kubelet")
}
