//! Registry pulls into containerd, as containerd's own pull does them: the reference resolved
//! through the node's mirrors, an index narrowed to this node's platform, the layers streamed
//! in parallel into the content store (containerd checks each digest and size at commit, and
//! an interrupted transfer resumes from what the store already holds), unpacked into the
//! snapshotter, and the image record pointing at content that carries containerd's GC labels.
//! The registry protocol is `oci-client`'s.

use std::{collections::HashMap, time::Duration};

use containerd_client::{
    services::v1::{AbortRequest, InfoRequest, WriteAction, WriteContentRequest},
    types::Descriptor,
};
use futures::{SinkExt, StreamExt, TryStreamExt};
use oci_client::{
    Client, Reference,
    client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol},
    errors::OciDistributionError,
    manifest::OciDescriptor as ClientDescriptor,
    secrets::RegistryAuth,
};
use serde::Deserialize;

use super::{
    Containerd, Error, Result,
    image::{self, normalize_ref},
    pack::sha256_digest,
    registries::{Credential, Endpoint, Registries},
};

/// How to pull: the node's registry configuration, the credentials that match the image
/// (the pod's pull secrets), and how long a transfer may make no progress.
#[derive(Debug, Clone, Copy)]
pub struct PullOptions<'a> {
    pub registries: &'a Registries,
    pub credentials: &'a [Credential],
    pub progress_deadline: Duration,
    /// Layers fetched at once.
    pub parallel_layers: usize,
}

/// A pulled image.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The normalized reference.
    pub name: String,
    /// The digest the reference resolved to (an index's when the image has one).
    pub digest: String,
    /// Bytes of the platform manifest's config and layers, as the registry stores them.
    pub size: u64,
}

/// Media types a pull accepts for the top of an image.
const ACCEPT: &[&str] = &[
    image::MT_OCI_INDEX,
    image::MT_DOCKER_LIST,
    image::MT_OCI_MANIFEST,
    image::MT_DOCKER_MANIFEST,
];
/// Layer media types containerd's differ applies.
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    image::MT_DOCKER_LAYER,
];

/// The top of an image: an index (with `manifests`) or a manifest.
#[derive(Deserialize)]
struct Top {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<image::OciDescriptor>>,
}

/// This node's platform in OCI words.
pub fn node_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// An image reference split as the distribution grammar does it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]` (`docker.io` for short names).
    pub registry: String,
    /// The path on the registry (`library/nginx`).
    pub repository: String,
    pub tag: Option<String>,
    /// `algorithm:hex`.
    pub digest: Option<String>,
}

/// One path component of a repository: `[a-z0-9]+` joined by `.`, `_`, `__` or dashes.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `host[:port]`: labels of letters, digits and inner dashes, a numeric port.
fn valid_domain(d: &str) -> bool {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
    };
    host.split('.').all(label_ok)
        && port
            .is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|x| x.is_ascii_digit()))
}

/// An image reference (normalized as Kubernetes does) split into registry, repository, tag
/// and digest, or why it is not a valid image name. Hand-written after the distribution
/// grammar: the regular expression `oci-spec` parses with costs ~15 MiB of heap once compiled,
/// more than the rest of the agent.
pub fn parse_reference(reference: &str) -> Result<ImageRef> {
    let invalid = |reason: &str| Error::InvalidImageName {
        reference: reference.to_string(),
        reason: reason.to_string(),
    };
    if reference.is_empty() {
        return Err(invalid("empty"));
    }
    if reference.len() > 4096 || reference.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(invalid("invalid reference format"));
    }
    let full = normalize_ref(reference);
    let (rest, digest) = match full.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (full.as_str(), None),
    };
    if let Some(d) = digest {
        let (alg, hex) = d
            .split_once(':')
            .ok_or_else(|| invalid("digest without an algorithm"))?;
        let hex_ok = hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let len_ok = match alg {
            "sha256" => hex.len() == 64,
            "sha512" => hex.len() == 128,
            _ => hex.len() >= 32,
        };
        if alg.is_empty() || !hex_ok || !len_ok {
            return Err(invalid("invalid digest"));
        }
    }
    let (domain, path) = rest
        .split_once('/')
        .ok_or_else(|| invalid("no repository"))?;
    let (path, tag) = match path.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, Some(t)),
        _ => (path, None),
    };
    if let Some(t) = tag {
        let b = t.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'));
        if !ok {
            return Err(invalid("invalid tag"));
        }
    }
    if !valid_domain(domain) {
        return Err(invalid("invalid registry host"));
    }
    if path.len() > 255 || !path.split('/').all(valid_component) {
        return Err(invalid(
            "repository name must be lowercase letters, digits and separators",
        ));
    }
    Ok(ImageRef {
        registry: domain.to_string(),
        repository: path.to_string(),
        tag: tag.map(str::to_string),
        digest: digest.map(str::to_string),
    })
}

fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Another part of the process may have installed one already: either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Why a pull failed, in the registry's words (what kubelet shows in `Failed to pull image`).
fn describe(e: &OciDistributionError) -> String {
    match e {
        OciDistributionError::UnauthorizedError { url } => {
            format!("unauthorized: authentication required (401 Unauthorized from {url})")
        }
        OciDistributionError::AuthenticationFailure(r) => {
            format!("unauthorized: authentication failed: {}", r.trim())
        }
        OciDistributionError::ImageManifestNotFoundError(r) => format!("not found: {r}"),
        OciDistributionError::RegistryError { envelope, url } => {
            use oci_client::errors::OciErrorCode as C;
            let words: Vec<String> = envelope.errors.iter().map(|e| e.message.clone()).collect();
            let text = words.join("; ");
            let what = envelope.errors.iter().find_map(|e| match e.code {
                C::ManifestUnknown | C::NameUnknown | C::BlobUnknown | C::NotFound => {
                    Some("not found")
                }
                C::Unauthorized | C::Denied => Some("unauthorized"),
                _ => None,
            });
            match what {
                Some(w) => format!("{w}: {text} ({url})"),
                None => format!("{text} ({url})"),
            }
        }
        OciDistributionError::ServerError { code, url, message } => {
            let what = match code {
                404 => "not found: ",
                401 => "unauthorized: ",
                _ => "",
            };
            format!("{what}{code} from {url}: {}", message.trim())
        }
        other => error_chain(other),
    }
}

/// An error and its sources joined (`error sending request: … : tcp connect error: …`).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}

fn pull_error(reference: &str, reason: impl Into<String>) -> Error {
    Error::Pull {
        reference: reference.to_string(),
        reason: reason.into(),
    }
}

/// An oci-client for one endpoint, with the node's TLS settings for it.
fn client_for(ep: &Endpoint, registries: &Registries, registry: &str) -> Result<Client> {
    install_crypto();
    let mut cfg = ClientConfig {
        protocol: if ep.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        connect_timeout: Some(Duration::from_secs(10)),
        max_concurrent_download: 4,
        ..Default::default()
    };
    if let Some(tls) = registries.tls(&ep.host, registry) {
        cfg.accept_invalid_certificates = tls.insecure_skip_verify;
        if let Some(ca) = &tls.ca_file {
            let data = std::fs::read(ca).map_err(Error::io(format!("{}", ca.display())))?;
            cfg.extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
    }
    Client::try_from(cfg).map_err(|e| pull_error(&ep.host, error_chain(&e)))
}

fn registry_auth(c: Option<&Credential>) -> RegistryAuth {
    match c {
        None => RegistryAuth::Anonymous,
        Some(Credential::Basic { username, password }) => {
            RegistryAuth::Basic(username.clone(), password.clone())
        }
        Some(Credential::Bearer(t)) => RegistryAuth::Bearer(t.clone()),
    }
}

/// A manifest or index as fetched.
struct Blob {
    media_type: String,
    digest: String,
    bytes: Vec<u8>,
}

impl Blob {
    fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.bytes.len() as i64,
            annotations: HashMap::new(),
        }
    }
}

/// The manifest for this node, and the index it came through.
struct Resolved {
    manifest: Blob,
    index: Option<Blob>,
}

/// `s`, or `default` when it is empty (a manifest that leaves out its media type).
fn or_default(s: &str, default: &str) -> String {
    if s.is_empty() { default } else { s }.to_string()
}

/// One endpoint and credential a pull runs against.
struct Source<'a> {
    client: Client,
    auth: RegistryAuth,
    /// The image on this endpoint (tag or digest).
    reference: Reference,
    /// The normalized name the image record gets.
    name: &'a str,
    deadline: Duration,
}

impl Containerd {
    /// Pulls `reference` (normalized as Kubernetes does) into containerd and records it as an
    /// image; tries the node's mirrors in order, then the registry, each with the matching
    /// credentials (anonymous when none).
    pub async fn pull(&self, reference: &str, opts: PullOptions<'_>) -> Result<Pulled> {
        let parsed = parse_reference(reference)?;
        let name = normalize_ref(reference);
        let registry = parsed.registry.clone();
        // Each endpoint's failure, named by its host when there were several.
        let mut failures: Vec<(String, Error)> = Vec::new();
        for ep in opts.registries.endpoints(&registry, &parsed.repository) {
            let mut creds: Vec<Option<Credential>> = Vec::new();
            if ep.is_default {
                creds.extend(opts.credentials.iter().cloned().map(Some));
            }
            if let Some(c) = opts.registries.credential(&ep.host, &registry) {
                creds.push(Some(c));
            }
            if creds.is_empty() {
                creds.push(None);
            }
            for cred in creds {
                let client = match client_for(&ep, opts.registries, &registry) {
                    Ok(c) => c,
                    Err(e) => {
                        failures.push((ep.host.clone(), e));
                        continue;
                    }
                };
                // Built from the parts: `Reference`'s parser compiles a large regex.
                let on_ep = match &parsed.digest {
                    Some(d) => {
                        Reference::with_digest(ep.host.clone(), ep.repository.clone(), d.clone())
                    }
                    None => Reference::with_tag(
                        ep.host.clone(),
                        ep.repository.clone(),
                        parsed.tag.clone().unwrap_or_else(|| "latest".into()),
                    ),
                };
                let src = Source {
                    client,
                    auth: registry_auth(cred.as_ref()),
                    reference: on_ep,
                    name: &name,
                    deadline: opts.progress_deadline,
                };
                match self.pull_from(&src, opts.parallel_layers).await {
                    Ok(p) => return Ok(p),
                    // containerd's own failure is no endpoint's: no use trying others.
                    Err(e @ Error::Rpc { .. }) => return Err(e),
                    Err(e) => {
                        tracing::debug!(endpoint = %ep.host, error = %e, "pull attempt failed");
                        failures.push((ep.host.clone(), e));
                    }
                }
            }
        }
        Err(joined_failures(&name, failures))
    }

    /// Fetches the manifest (through an index to this platform), config and layers under a
    /// lease, unpacks them and records the image.
    async fn pull_from(&self, src: &Source<'_>, parallel: usize) -> Result<Pulled> {
        let lease = self
            .lease("keelson-pull", Duration::from_secs(3600))
            .await?;
        let res = self.pull_under_lease(src, parallel, &lease).await;
        if res.is_ok() {
            self.drop_lease(lease).await;
        }
        // A failed pull keeps its lease until it expires: what was fetched stays for the next
        // attempt to resume from, and containerd collects it after.
        res
    }

    async fn pull_under_lease(
        &self,
        src: &Source<'_>,
        parallel: usize,
        lease: &str,
    ) -> Result<Pulled> {
        let r = self.resolve(src).await?;
        let man: image::OciManifest = serde_json::from_slice(&r.manifest.bytes)
            .map_err(|e| pull_error(src.name, format!("manifest {}: {e}", r.manifest.digest)))?;
        if let Some(l) = man
            .layers
            .iter()
            .find(|l| !LAYER_TYPES.contains(&l.media_type.as_str()))
        {
            return Err(pull_error(
                src.name,
                format!(
                    "layer {}: unsupported media type {:?}",
                    l.digest, l.media_type
                ),
            ));
        }
        // Config first (small, and it names the snapshots), then the layers in parallel.
        let cfg_bytes = self
            .fetch_small(src, &man.config.digest, man.config.size)
            .await?;
        let cfg: image::ImgConfig = serde_json::from_slice(&cfg_bytes)
            .map_err(|e| pull_error(src.name, format!("config {}: {e}", man.config.digest)))?;
        if cfg.rootfs.diff_ids.len() != man.layers.len() {
            return Err(pull_error(
                src.name,
                "config diff_ids and manifest layers differ in number",
            ));
        }
        let fetches: Vec<_> = man
            .layers
            .iter()
            .map(|l| Box::pin(self.fetch_layer(src, l, lease)))
            .collect();
        futures::stream::iter(fetches)
            .buffer_unordered(parallel.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        let descs: Vec<Descriptor> = man.layers.iter().map(image::descriptor).collect();
        self.commit_manifest(
            lease,
            (&man.config.digest, &cfg_bytes),
            (&r.manifest.digest, &r.manifest.bytes),
            &descs,
            &image::chain_ids(&cfg.rootfs.diff_ids),
        )
        .await?;
        let target = match &r.index {
            Some(index) => {
                let labels = [(
                    "containerd.io/gc.ref.content.m.0".to_string(),
                    r.manifest.digest.clone(),
                )];
                self.write_blob(lease, &index.digest, &index.bytes, labels.into())
                    .await?;
                index.descriptor()
            }
            None => r.manifest.descriptor(),
        };
        self.put_image(src.name, target.clone()).await?;
        // The image is also known by its digest, as containerd's CRI records it.
        let repo = image::repository_of(src.name);
        self.put_image(&format!("{repo}@{}", target.digest), target.clone())
            .await?;
        let size = man.config.size.max(0) as u64
            + man.layers.iter().map(|l| l.size.max(0) as u64).sum::<u64>();
        Ok(Pulled {
            name: src.name.to_string(),
            digest: target.digest,
            size,
        })
    }

    /// The reference's manifest for this node: fetched directly, or through the index it
    /// names; each checked against its digest.
    async fn resolve(&self, src: &Source<'_>) -> Result<Resolved> {
        let fail = |e: OciDistributionError| pull_error(src.name, describe(&e));
        let (top_bytes, top_digest) = src
            .client
            .pull_manifest_raw(&src.reference, &src.auth, ACCEPT)
            .await
            .map_err(fail)?;
        check_digest(src.name, &top_digest, &top_bytes)?;
        let top: Top = serde_json::from_slice(&top_bytes)
            .map_err(|e| pull_error(src.name, format!("manifest {top_digest}: {e}")))?;
        let top_blob = |default: &str| Blob {
            media_type: or_default(&top.media_type, default),
            digest: top_digest.clone(),
            bytes: top_bytes.to_vec(),
        };
        let Some(entries) = &top.manifests else {
            return Ok(Resolved {
                manifest: top_blob(image::MT_OCI_MANIFEST),
                index: None,
            });
        };
        let e = image::pick_platform(entries).ok_or_else(|| {
            pull_error(
                src.name,
                format!("no manifest for linux/{} in the image index", node_arch()),
            )
        })?;
        let r = src.reference.clone_with_digest(e.digest.clone());
        let (b, d) = src
            .client
            .pull_manifest_raw(&r, &src.auth, ACCEPT)
            .await
            .map_err(fail)?;
        check_digest(src.name, &e.digest, &b)?;
        Ok(Resolved {
            manifest: Blob {
                media_type: or_default(&e.media_type, image::MT_OCI_MANIFEST),
                digest: d,
                bytes: b.to_vec(),
            },
            index: Some(top_blob(image::MT_OCI_INDEX)),
        })
    }

    /// A small blob (an image config) read whole, its digest checked.
    async fn fetch_small(&self, src: &Source<'_>, digest: &str, size: i64) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(size.clamp(0, 1 << 20) as usize);
        let desc = ClientDescriptor {
            digest: digest.to_string(),
            size,
            ..Default::default()
        };
        tokio::time::timeout(
            src.deadline,
            src.client.pull_blob(&src.reference, &desc, &mut out),
        )
        .await
        .map_err(|_| {
            pull_error(
                src.name,
                format!("blob {digest}: no progress for {:?}", src.deadline),
            )
        })?
        .map_err(|e| pull_error(src.name, format!("blob {digest}: {}", describe(&e))))?;
        check_digest(src.name, digest, &out)?;
        Ok(out)
    }

    /// Streams one layer into the content store unless it is there already. The ingest is
    /// named after the digest, so an interrupted transfer resumes from the offset containerd
    /// holds; containerd checks size and digest at commit, and a blob that does not match is
    /// discarded.
    async fn fetch_layer(
        &self,
        src: &Source<'_>,
        l: &image::OciDescriptor,
        lease: &str,
    ) -> Result<()> {
        let have = self
            .content()
            .info(self.req(InfoRequest {
                digest: l.digest.clone(),
            }))
            .await
            .is_ok();
        if have {
            return Ok(());
        }
        let r#ref = format!("keelson-pull-{}", l.digest.replace(':', "-"));
        let (mut tx, rx) = futures::channel::mpsc::channel::<WriteContentRequest>(4);
        let closed = |_| pull_error(src.name, "containerd closed the content write");
        tx.send(write_req(WriteAction::Stat, &r#ref, l, 0, vec![]))
            .await
            .map_err(closed)?;
        let mut responses = self
            .content()
            .write(self.req_leased(rx, Some(lease)))
            .await
            .map_err(Error::rpc("content write"))?
            .into_inner();
        let held = match responses.next().await {
            Some(Ok(r)) => r.offset,
            Some(Err(s)) => return Err(Error::rpc("content write")(s)),
            None => 0,
        };
        let corrupt = std::sync::atomic::AtomicBool::new(false);
        // Responses are drained while the writes go out (each write is answered).
        let mut closer = tx.clone();
        let drain = async move {
            while let Some(r) = responses.next().await {
                if let Err(s) = r {
                    // The writes stop too (a send waiting for room would wait forever).
                    closer.close_channel();
                    return Err(Error::rpc("content commit")(s));
                }
            }
            Ok::<(), Error>(())
        };
        let send = async {
            let r = self
                .send_layer(src, l, &r#ref, held, &mut tx, &corrupt)
                .await;
            // Ending the write without a commit leaves the ingest to resume from.
            tx.close_channel();
            r
        };
        let (sent, drained) = futures::join!(send, drain);
        let res = sent.and(drained);
        let abort = || async {
            let _ = self
                .content()
                .abort(self.req(AbortRequest {
                    r#ref: r#ref.clone(),
                }))
                .await;
        };
        if res.is_err() && corrupt.load(std::sync::atomic::Ordering::Relaxed) {
            abort().await;
        }
        match &res {
            Err(Error::Rpc { source, .. }) if source.code() == tonic::Code::AlreadyExists => Ok(()),
            Err(Error::Rpc { source, .. })
                if matches!(
                    source.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
                ) =>
            {
                // A blob that does not match its digest or size: never keep it.
                abort().await;
                Err(pull_error(
                    src.name,
                    format!(
                        "layer {}: the registry sent content that does not match the digest: {}",
                        l.digest,
                        source.message()
                    ),
                ))
            }
            _ => res,
        }
    }

    /// Sends the layer's bytes from the registry to the content write `tx` (from `held` on),
    /// then the commit; `corrupt` is set when all the bytes came and did not match.
    async fn send_layer(
        &self,
        src: &Source<'_>,
        l: &image::OciDescriptor,
        r#ref: &str,
        held: i64,
        tx: &mut futures::channel::mpsc::Sender<WriteContentRequest>,
        corrupt: &std::sync::atomic::AtomicBool,
    ) -> Result<()> {
        let closed = |_| pull_error(src.name, "containerd closed the content write");
        let (mut stream, mut at) = self.layer_stream(src, l, held).await?;
        loop {
            let Ok(next) = tokio::time::timeout(src.deadline, stream.next()).await else {
                return Err(pull_error(
                    src.name,
                    format!("layer {}: no progress for {:?}", l.digest, src.deadline),
                ));
            };
            let chunk = match next {
                None => break,
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    if at >= l.size {
                        // All the bytes came and they do not match: nothing to resume from.
                        corrupt.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    return Err(pull_error(
                        src.name,
                        format!("layer {}: {}", l.digest, error_chain(&e)),
                    ));
                }
            };
            let n = chunk.len() as i64;
            tx.send(write_req(WriteAction::Write, r#ref, l, at, chunk.to_vec()))
                .await
                .map_err(closed)?;
            at += n;
        }
        tx.send(write_req(WriteAction::Commit, r#ref, l, at, vec![]))
            .await
            .map_err(closed)
    }

    /// The layer's bytes from `held` on (a range request), or whole when the registry ignores
    /// ranges; the stream and the offset it starts at.
    async fn layer_stream(
        &self,
        src: &Source<'_>,
        l: &image::OciDescriptor,
        held: i64,
    ) -> Result<(
        futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>,
        i64,
    )> {
        let desc = ClientDescriptor {
            media_type: l.media_type.clone(),
            digest: l.digest.clone(),
            size: l.size,
            ..Default::default()
        };
        let fail = |e: OciDistributionError| {
            pull_error(src.name, format!("layer {}: {}", l.digest, describe(&e)))
        };
        let open = async {
            if held > 0 && held < l.size {
                match src
                    .client
                    .pull_blob_stream_partial(&src.reference, &desc, held as u64, None)
                    .await
                    .map_err(fail)?
                {
                    oci_client::client::BlobResponse::Partial(s) => Ok((s.stream, held)),
                    oci_client::client::BlobResponse::Full(s) => Ok((s.stream, 0)),
                }
            } else {
                let s = src
                    .client
                    .pull_blob_stream(&src.reference, &desc)
                    .await
                    .map_err(fail)?;
                Ok((s.stream, 0))
            }
        };
        tokio::time::timeout(src.deadline, open)
            .await
            .map_err(|_| {
                pull_error(
                    src.name,
                    format!("layer {}: no answer for {:?}", l.digest, src.deadline),
                )
            })?
    }
}

/// One endpoint's error as it is; several named by endpoint (`host: reason; host: reason`).
fn joined_failures(name: &str, mut failures: Vec<(String, Error)>) -> Error {
    if failures.len() <= 1 {
        return failures
            .pop()
            .map(|(_, e)| e)
            .unwrap_or_else(|| pull_error(name, "no endpoint to pull from"));
    }
    let reasons: Vec<String> = failures
        .iter()
        .map(|(host, e)| match e {
            Error::Pull { reason, .. } => format!("{host}: {reason}"),
            other => format!("{host}: {other}"),
        })
        .collect();
    pull_error(name, reasons.join("; "))
}

/// One message of the content write of layer `l` under ingest `ref`.
fn write_req(
    action: WriteAction,
    r#ref: &str,
    l: &image::OciDescriptor,
    offset: i64,
    data: Vec<u8>,
) -> WriteContentRequest {
    WriteContentRequest {
        action: action as i32,
        r#ref: r#ref.to_string(),
        total: l.size,
        expected: l.digest.clone(),
        offset,
        data,
        labels: HashMap::new(),
    }
}

/// The content matches the digest the registry or the reference named.
fn check_digest(name: &str, digest: &str, data: &[u8]) -> Result<()> {
    if digest.starts_with("sha256:") && sha256_digest(data) != digest {
        return Err(pull_error(
            name,
            format!("content does not match its digest {digest}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_resolves_to_this_nodes_platform() {
        let entries: Vec<image::OciDescriptor> = serde_json::from_str(&format!(
            r#"[{{"digest":"sha256:a","size":1,"platform":{{"os":"linux","architecture":"s390x"}}}},
               {{"digest":"sha256:b","size":1,"platform":{{"os":"linux","architecture":"{}"}}}},
               {{"digest":"sha256:c","size":1,"platform":{{"os":"windows","architecture":"{}"}}}}]"#,
            node_arch(),
            node_arch()
        ))
        .unwrap();
        assert_eq!(image::pick_platform(&entries).unwrap().digest, "sha256:b");
        assert!(image::pick_platform(&entries[..1]).is_none());
    }

    #[test]
    fn malformed_references_are_invalid_image_names() {
        let r = parse_reference("busybox").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/busybox", Some("latest"))
        );
        let r = parse_reference("reg.lab:5000/a/b-c__d.e:1.0_x").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("reg.lab:5000", "a/b-c__d.e")
        );
        assert_eq!(r.tag.as_deref(), Some("1.0_x"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = parse_reference(&format!("localhost:5000/x@{d}")).unwrap();
        assert_eq!((r.tag, r.digest), (None, Some(d)));
        for bad in [
            "",
            "UPPER/case",
            "a b",
            "x:y:z",
            "busybox@sha256:short",
            "reg.lab/a//b:1",
            "reg.lab/-a:1",
            "reg.lab/a:-tag",
            "reg..lab/a:1",
            "reg.lab:port/a:1",
        ] {
            assert!(
                matches!(parse_reference(bad), Err(Error::InvalidImageName { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn registry_words_reach_the_user() {
        let e = OciDistributionError::UnauthorizedError {
            url: "http://r/v2/x/manifests/1".into(),
        };
        assert!(describe(&e).contains("401 Unauthorized"));
        let e = OciDistributionError::ServerError {
            code: 404,
            url: "u".into(),
            message: "gone".into(),
        };
        assert!(describe(&e).starts_with("not found"));
    }
}
