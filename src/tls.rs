//! HTTPS plumbing shared by the API server and the agent's kubelet API: a rustls server
//! configuration from PEM, the accept loop (TLS, then HTTP/1.1 with upgrades), and a small
//! HTTPS client for the API server's calls to kubelets (client certificate out, the kubelet's
//! serving certificate checked against the cluster CA and its node name).

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
        Some(pem) => builder.with_client_cert_verifier(client_verifier(pem)?),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .context("TLS certificate")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A serving certificate that can be replaced while serving (the kubelet's, once the cluster
/// issues it): every handshake takes the current one.
#[derive(Debug)]
pub struct CertSwitch(std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>);

impl CertSwitch {
    fn certified(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::sign::CertifiedKey>> {
        let (certs, key) = cert_and_key(cert_pem, key_pem)?;
        Ok(Arc::new(
            rustls::sign::CertifiedKey::from_der(certs, key, &provider())
                .context("certificate and key")?,
        ))
    }

    pub fn new(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self(std::sync::RwLock::new(Self::certified(
            cert_pem, key_pem,
        )?))))
    }

    /// Serves `cert_pem`/`key_pem` from the next handshake on.
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        let c = Self::certified(cert_pem, key_pem)?;
        if let Ok(mut cur) = self.0.write() {
            *cur = c;
        }
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for CertSwitch {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.read().ok().map(|c| c.clone())
    }
}

impl rustls::client::ResolvesClientCert for CertSwitch {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.read().ok().map(|c| c.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The certificate `switch` holds now (PEM of the leaf is not kept; its DER is).
impl CertSwitch {
    pub fn current_der(&self) -> Option<Vec<u8>> {
        self.0
            .read()
            .ok()
            .and_then(|c| c.cert.first().map(|d| d.to_vec()))
    }
}

/// Like `server_config`, serving whatever `switch` holds at each handshake.
pub fn switched_server_config(
    switch: Arc<CertSwitch>,
    client_ca: Option<&str>,
) -> anyhow::Result<rustls::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?;
    let mut cfg = match client_ca {
        None => builder.with_no_client_auth().with_cert_resolver(switch),
        Some(pem) => builder
            .with_client_cert_verifier(client_verifier(pem)?)
            .with_cert_resolver(switch),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Verifies client certificates against `pem` (a CA bundle); clients without one pass too.
fn client_verifier(
    pem: &str,
) -> anyhow::Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_bytes()) {
        roots
            .add(c.context("client CA certificate")?)
            .context("client CA certificate")?;
    }
    anyhow::ensure!(!roots.is_empty(), "no certificate in the client CA file");
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .context("client certificate verifier")
}

/// A client that has not finished its TLS handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A request whose headers have not all arrived by then ends its connection (also an idle
/// keep-alive connection: clients open a new one). hyper's default, and kube-apiserver's 32 s
/// order: shorter would cut clients that pause between requests more often than it helps.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Connections one remote address (other than loopback) may hold at once.
pub const MAX_CONNECTIONS_PER_PEER: usize = 512;

/// Open connections by remote address, released when a connection ends.
#[derive(Default)]
struct Peers(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

struct PeerSlot(Arc<Peers>, std::net::IpAddr);

impl Peers {
    /// A slot for `ip`, or None if it holds its share already (loopback is not limited: the
    /// local clients of `keelson up` and the node's own agents share it).
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<PeerSlot> {
        let mut m = self.0.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_PEER && !ip.is_loopback() {
            return None;
        }
        *n += 1;
        Some(PeerSlot(self.clone(), ip))
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.0.0.lock()
            && let Some(n) = m.get_mut(&self.1)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves. Slow or idle clients cannot
/// hold connections forever (handshake and header-read timeouts), one remote address cannot
/// take them all, and a failing accept (out of file descriptors) backs off instead of spinning.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: rustls::ServerConfig,
    app: Router,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let peers = Arc::new(Peers::default());
    tokio::pin!(shutdown);
    let mut backoff = std::time::Duration::from_millis(10);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                    continue;
                }
            },
        };
        backoff = std::time::Duration::from_millis(10);
        let Some(slot) = peers.take(peer.ip()) else {
            tracing::debug!(%peer, "too many connections from this address");
            continue;
        };
        // Watch events and log lines are small writes that must go out at once (no Nagle).
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
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
            let mut b =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            b.http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            if let Err(e) = b.serve_connection_with_upgrades(io, svc).await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

/// The client configuration for calls to kubelets: it presents `identity` (the API server's
/// kubelet-client certificate and key, PEM; no bearer credential ever goes to a kubelet) and
/// accepts only serving certificates the cluster CA (`ca_pem`) signed for the address dialled
/// (kube-apiserver's `--kubelet-certificate-authority`). `connect` also checks that the
/// certificate names the node meant.
pub fn kubelet_client_config(
    identity: (&str, &str),
    ca_pem: &str,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots
            .add(c.context("cluster CA certificate")?)
            .context("cluster CA certificate")?;
    }
    let (certs, key) =
        cert_and_key(identity.0, identity.1).context("kubelet client certificate")?;
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .context("kubelet client certificate")?,
    ))
}

/// An HTTP/1.1 connection over TLS to `addr`, the kubelet of `node`, with `cfg`
/// (`kubelet_client_config`), able to carry one upgraded request. The kubelet's certificate
/// must name `system:node:<node>` (a certificate of another node is refused).
pub async fn connect(
    addr: std::net::SocketAddr,
    node: &str,
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
    let subject = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| ClientCertVerified::of(c))
        .unwrap_or_default();
    anyhow::ensure!(
        subject.common_name == format!("system:node:{node}"),
        "TLS to {addr}: the kubelet's certificate names {:?}, not node {node:?}",
        subject.common_name
    );
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(send)
}

/// `GET https://addr/path_and_query` on node `node`'s kubelet, authenticated by `cfg`'s
/// client certificate; the response streams.
pub async fn get(
    addr: std::net::SocketAddr,
    node: &str,
    cfg: &Arc<rustls::ClientConfig>,
    path_and_query: &str,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let mut send = connect(addr, node, cfg).await?;
    let req = hyper::Request::get(path_and_query)
        .header("host", addr.to_string())
        .body(axum::body::Body::empty())
        .context("request")?;
    send.send_request(req)
        .await
        .context("request to the kubelet")
}
