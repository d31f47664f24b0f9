//! Images in containerd: importing OCI / docker-archive tarballs (content → snapshots → image),
//! and resolving an image reference to what a container needs (chain ID, config). Registry
//! pulls are `pull`'s; both end in the same content, snapshots and image records.

use std::collections::HashMap;

use containerd_client::{
    services::v1::{
        ApplyRequest, CreateImageRequest, DeleteImageRequest, GetImageRequest, Image, InfoRequest,
        ListImagesRequest, ReadContentRequest, UpdateImageRequest, WriteAction,
        WriteContentRequest,
        snapshots::{CommitSnapshotRequest, PrepareSnapshotRequest, StatSnapshotRequest},
    },
    types::Descriptor,
};
use futures::StreamExt;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::{Containerd, Error, Result, SNAPSHOTTER, pack::sha256_digest, random_hex};

/// Kubernetes' image-name normalization: `busybox` → `docker.io/library/busybox:latest`.
pub fn normalize_ref(r: &str) -> String {
    let (name, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    let first = name.split('/').next().unwrap_or("");
    let has_domain =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let mut full = if has_domain {
        name.to_string()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    let last = full.rsplit('/').next().unwrap_or("");
    if digest.is_none() && !last.contains(':') {
        full.push_str(":latest");
    }
    if let Some(d) = digest {
        full.push('@');
        full.push_str(d);
    }
    full
}

/// An image as `keelson image ls` shows it.
#[derive(Debug, Clone)]
pub struct ImageSummary {
    pub name: String,
    pub digest: String,
    /// Bytes of its config and layers as stored (compressed).
    pub size: u64,
}

/// What a container needs from its image.
#[derive(Debug, Clone, Default)]
pub struct ImageInfo {
    /// The normalized reference.
    pub name: String,
    /// `name@sha256:<manifest digest>`, reported as a container's imageID.
    pub image_id: String,
    /// Snapshot name of the top layer, the parent of every container's rootfs.
    pub chain_id: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

#[derive(Deserialize, Clone)]
pub(super) struct OciDescriptor {
    #[serde(rename = "mediaType", default)]
    pub(super) media_type: String,
    pub(super) digest: String,
    pub(super) size: i64,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}
#[derive(Deserialize, Clone)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}
#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<OciDescriptor>,
}

/// This node's entry of an index: its linux manifest for this architecture, or one that names
/// no platform (as containerd's platform filter keeps those).
pub(super) fn pick_platform(entries: &[OciDescriptor]) -> Option<&OciDescriptor> {
    let arch = super::pull::node_arch();
    entries.iter().find(|d| {
        d.platform
            .as_ref()
            .is_none_or(|p| p.os == "linux" && p.architecture == arch)
    })
}
#[derive(Deserialize)]
pub(super) struct OciManifest {
    pub(super) config: OciDescriptor,
    pub(super) layers: Vec<OciDescriptor>,
}
#[derive(Deserialize, Default)]
struct ImgConfigInner {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}
#[derive(Deserialize)]
pub(super) struct RootFs {
    pub(super) diff_ids: Vec<String>,
}
#[derive(Deserialize)]
pub(super) struct ImgConfig {
    #[serde(default)]
    config: Option<ImgConfigInner>,
    pub(super) rootfs: RootFs,
}
#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

pub(super) const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(super) const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(super) const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(super) const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub(super) const MT_DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// Chain IDs (snapshot names) of a list of layer diff IDs, per the OCI image spec.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

/// One image found in an archive, ready to be written to containerd.
struct Unpacked {
    names: Vec<String>,
    manifest: (String, Vec<u8>),
    config: (String, Vec<u8>),
    layers: Vec<(Descriptor, Vec<u8>)>,
    diff_ids: Vec<String>,
}

/// containerd's descriptor of a manifest entry.
pub(super) fn descriptor(d: &OciDescriptor) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: HashMap::new(),
    }
}

/// The repository of a normalized reference (without tag or digest).
pub(super) fn repository_of(name: &str) -> &str {
    let repo = name.split('@').next().unwrap_or(name);
    match repo.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => repo,
    }
}

fn desc_of(media: &str, data: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media.into(),
        digest: sha256_digest(data),
        size: data.len() as i64,
        annotations: HashMap::new(),
    }
}

/// Reads every entry of a tarball into memory.
fn read_archive(what: &str, bytes: &[u8]) -> Result<HashMap<String, Vec<u8>>> {
    let mut files = HashMap::new();
    let mut ar = tar::Archive::new(bytes);
    let entries = ar
        .entries()
        .map_err(|e| Error::bad(what, format!("not a tar archive: {e}")))?;
    for e in entries {
        let mut e = e.map_err(|e| Error::bad(what, format!("corrupt tar entry: {e}")))?;
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = e
            .path()
            .map_err(|e| Error::bad(what, e))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data)
            .map_err(|e| Error::bad(what, format!("reading {path}: {e}")))?;
        files.insert(path, data);
    }
    Ok(files)
}

fn parse_archive(what: &str, bytes: &[u8]) -> Result<Vec<Unpacked>> {
    let a = Archive {
        what,
        files: read_archive(what, bytes)?,
    };
    let out = if let Some(index) = a.files.get("index.json") {
        a.oci_images(index)?
    } else if let Some(mj) = a.files.get("manifest.json") {
        a.docker_images(mj)?
    } else {
        return Err(Error::bad(
            what,
            "neither an OCI layout (index.json) nor a docker archive (manifest.json)",
        ));
    };
    for u in &out {
        if u.diff_ids.len() != u.layers.len() {
            return Err(Error::bad(
                what,
                "config diff_ids and manifest layers differ in number",
            ));
        }
        if u.names.is_empty() {
            return Err(Error::bad(
                what,
                "image has no name (io.containerd.image.name / RepoTags)",
            ));
        }
    }
    Ok(out)
}

/// An image archive's files by path; `what` names it in errors.
struct Archive<'a> {
    what: &'a str,
    files: HashMap<String, Vec<u8>>,
}

impl Archive<'_> {
    fn get(&self, p: &str) -> Result<&Vec<u8>> {
        self.files
            .get(p)
            .ok_or_else(|| Error::bad(self.what, format!("missing entry {p}")))
    }

    /// A blob of the OCI layout, checked against its digest.
    fn blob(&self, digest: &str) -> Result<&Vec<u8>> {
        let hexd = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| Error::bad(self.what, format!("unsupported digest {digest}")))?;
        let data = self.get(&format!("blobs/sha256/{hexd}"))?;
        if sha256_digest(data) != digest {
            return Err(Error::bad(
                self.what,
                format!("blob {digest} does not match its digest"),
            ));
        }
        Ok(data)
    }

    /// Parses `data` (the file or blob `p`) as `T`.
    fn json<T: serde::de::DeserializeOwned>(&self, p: &str, data: &[u8]) -> Result<T> {
        serde_json::from_slice(data).map_err(|e| Error::bad(self.what, format!("{p}: {e}")))
    }

    /// An OCI layout: each manifest of index.json (an index followed one level, to
    /// linux/amd64).
    fn oci_images(&self, index: &[u8]) -> Result<Vec<Unpacked>> {
        let index: OciIndex = self.json("index.json", index)?;
        let mut out = Vec::new();
        for mut m in index.manifests {
            let name = m
                .annotations
                .get("io.containerd.image.name")
                .or_else(|| m.annotations.get("org.opencontainers.image.ref.name"))
                .cloned();
            if m.media_type == MT_OCI_INDEX || m.media_type == MT_DOCKER_LIST {
                let inner: OciIndex = self.json(&m.digest, self.blob(&m.digest)?)?;
                m = pick_platform(&inner.manifests).cloned().ok_or_else(|| {
                    let arch = super::pull::node_arch();
                    Error::bad(self.what, format!("no linux/{arch} manifest"))
                })?;
            }
            let mbytes = self.blob(&m.digest)?.clone();
            let man: OciManifest = self.json(&format!("manifest {}", m.digest), &mbytes)?;
            let cbytes = self.blob(&man.config.digest)?.clone();
            let cfg: ImgConfig = self.json("config", &cbytes)?;
            let mut layers = Vec::new();
            for l in &man.layers {
                let data = self.blob(&l.digest)?.clone();
                layers.push((
                    Descriptor {
                        media_type: l.media_type.clone(),
                        digest: l.digest.clone(),
                        size: l.size,
                        annotations: HashMap::new(),
                    },
                    data,
                ));
            }
            out.push(Unpacked {
                names: name.map(|n| vec![normalize_ref(&n)]).unwrap_or_default(),
                manifest: (m.media_type.clone(), mbytes),
                config: (man.config.media_type.clone(), cbytes),
                layers,
                diff_ids: cfg.rootfs.diff_ids,
            });
        }
        Ok(out)
    }

    /// A `docker save` archive: manifest.json's images, each given a Docker manifest.
    fn docker_images(&self, mj: &[u8]) -> Result<Vec<Unpacked>> {
        let list: Vec<DockerManifest> = self.json("manifest.json", mj)?;
        let mut out = Vec::new();
        for dm in list {
            let cbytes = self.get(&dm.config)?.clone();
            let cfg: ImgConfig = self.json(&dm.config, &cbytes)?;
            let mut layers = Vec::new();
            for l in &dm.layers {
                let data = self.get(l)?.clone();
                layers.push((desc_of(MT_DOCKER_LAYER, &data), data));
            }
            let cdesc = desc_of(MT_DOCKER_CONFIG, &cbytes);
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MT_DOCKER_MANIFEST,
                "config": {"mediaType": MT_DOCKER_CONFIG, "digest": cdesc.digest, "size": cdesc.size},
                "layers": layers.iter().map(|(d, _)| serde_json::json!({
                    "mediaType": d.media_type, "digest": d.digest, "size": d.size})).collect::<Vec<_>>(),
            });
            let mbytes = serde_json::to_vec(&manifest).map_err(|e| Error::bad(self.what, e))?;
            out.push(Unpacked {
                names: dm
                    .repo_tags
                    .unwrap_or_default()
                    .iter()
                    .map(|n| normalize_ref(n))
                    .collect(),
                manifest: (MT_DOCKER_MANIFEST.into(), mbytes),
                config: (MT_DOCKER_CONFIG.into(), cbytes),
                layers,
                diff_ids: cfg.rootfs.diff_ids,
            });
        }
        Ok(out)
    }
}

impl Containerd {
    /// Imports every image of an OCI-layout or docker-archive tarball; returns the image names.
    pub async fn import_archive(&self, what: &str, bytes: &[u8]) -> Result<Vec<String>> {
        let images = parse_archive(what, bytes)?;
        let lease = self
            .lease("keelson-import", std::time::Duration::from_secs(3600))
            .await?;
        let res = self.import_under_lease(&lease, images).await;
        self.drop_lease(lease).await;
        res
    }

    async fn import_under_lease(&self, lease: &str, images: Vec<Unpacked>) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for img in images {
            let chain = chain_ids(&img.diff_ids);
            for (d, data) in &img.layers {
                self.write_blob(lease, &d.digest, data, HashMap::new())
                    .await?;
            }
            let mdigest = sha256_digest(&img.manifest.1);
            let descs: Vec<Descriptor> = img.layers.iter().map(|(d, _)| d.clone()).collect();
            self.commit_manifest(
                lease,
                (&sha256_digest(&img.config.1), &img.config.1),
                (&mdigest, &img.manifest.1),
                &descs,
                &chain,
            )
            .await?;
            let target = Descriptor {
                media_type: if img.manifest.0.is_empty() {
                    MT_OCI_MANIFEST.into()
                } else {
                    img.manifest.0.clone()
                },
                digest: mdigest,
                size: img.manifest.1.len() as i64,
                annotations: HashMap::new(),
            };
            for name in &img.names {
                self.put_image(name, target.clone()).await?;
                names.push(name.clone());
            }
        }
        Ok(names)
    }

    /// Writes a manifest's config and the manifest itself (its layers are in the store) with
    /// containerd's GC labels — the manifest holds its config and layers, the config the top
    /// snapshot — and unpacks the layers onto snapshots named by `chain`.
    pub(super) async fn commit_manifest(
        &self,
        lease: &str,
        config: (&str, &[u8]),
        manifest: (&str, &[u8]),
        layers: &[Descriptor],
        chain: &[String],
    ) -> Result<()> {
        let top = chain.last().cloned().unwrap_or_default();
        self.write_blob(
            lease,
            config.0,
            config.1,
            [(format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"), top)].into(),
        )
        .await?;
        let mut mlabels: HashMap<String, String> = [(
            "containerd.io/gc.ref.content.config".to_string(),
            config.0.to_string(),
        )]
        .into();
        for (i, d) in layers.iter().enumerate() {
            mlabels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                d.digest.clone(),
            );
        }
        self.write_blob(lease, manifest.0, manifest.1, mlabels)
            .await?;
        self.unpack(lease, layers, chain).await
    }

    pub(super) async fn put_image(&self, name: &str, target: Descriptor) -> Result<()> {
        let image = Image {
            name: name.to_string(),
            labels: HashMap::new(),
            target: Some(target),
            created_at: None,
            updated_at: None,
        };
        let created = self
            .images()
            .create(self.req(CreateImageRequest {
                image: Some(image.clone()),
                source_date_epoch: None,
            }))
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                self.images()
                    .update(self.req(UpdateImageRequest {
                        image: Some(image),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["target".into()],
                        }),
                        source_date_epoch: None,
                    }))
                    .await
                    .map_err(Error::rpc("image update"))?;
                Ok(())
            }
            Err(s) => Err(Error::Rpc {
                op: "image create",
                source: s,
            }),
        }
    }

    /// Writes one blob to the content store unless it is already there.
    pub(super) async fn write_blob(
        &self,
        lease: &str,
        digest: &str,
        data: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let exists = self
            .content()
            .info(self.req(InfoRequest {
                digest: digest.into(),
            }))
            .await
            .is_ok();
        if exists {
            return Ok(());
        }
        const CHUNK: usize = 1 << 20;
        let r#ref = format!(
            "keelson-{}-{}",
            digest.trim_start_matches("sha256:"),
            random_hex(4)
        );
        let total = data.len() as i64;
        let mut msgs = Vec::new();
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            msgs.push(WriteContentRequest {
                action: WriteAction::Write as i32,
                r#ref: r#ref.clone(),
                total,
                expected: digest.into(),
                offset: (i * CHUNK) as i64,
                data: chunk.to_vec(),
                labels: HashMap::new(),
            });
        }
        msgs.push(WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref,
            total,
            expected: digest.into(),
            offset: total,
            data: vec![],
            labels,
        });
        let resp = self
            .content()
            .write(self.req_leased(futures::stream::iter(msgs), Some(lease)))
            .await;
        let mut stream = match resp {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
            Err(s) => {
                return Err(Error::Rpc {
                    op: "content write",
                    source: s,
                });
            }
        };
        while let Some(m) = stream.next().await {
            match m {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
                Err(s) => {
                    return Err(Error::Rpc {
                        op: "content write",
                        source: s,
                    });
                }
            }
        }
        Ok(())
    }

    /// Applies each layer onto a snapshot named by its chain ID, skipping those that exist.
    async fn unpack(&self, lease: &str, layers: &[Descriptor], chain: &[String]) -> Result<()> {
        for (i, d) in layers.iter().enumerate() {
            let name = &chain[i];
            let exists = self
                .snapshots()
                .stat(self.req(StatSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: name.clone(),
                }))
                .await
                .is_ok();
            if exists {
                continue;
            }
            let key = format!("extract-{} {}", random_hex(4), name);
            let parent = if i == 0 {
                String::new()
            } else {
                chain[i - 1].clone()
            };
            let mounts = self
                .snapshots()
                .prepare(self.req_leased(
                    PrepareSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: key.clone(),
                        parent,
                        labels: HashMap::new(),
                    },
                    Some(lease),
                ))
                .await
                .map_err(Error::rpc("snapshot prepare"))?
                .into_inner()
                .mounts;
            self.diff()
                .apply(self.req_leased(
                    ApplyRequest {
                        diff: Some(d.clone()),
                        mounts,
                        payloads: HashMap::new(),
                        sync_fs: false,
                    },
                    Some(lease),
                ))
                .await
                .map_err(Error::rpc("diff apply"))?;
            let committed = self
                .snapshots()
                .commit(
                    self.req_leased(
                        CommitSnapshotRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            name: name.clone(),
                            key,
                            labels: [(
                                "containerd.io/gc.root".to_string(),
                                jiff::Timestamp::now().to_string(),
                            )]
                            .into(),
                        },
                        Some(lease),
                    ),
                )
                .await;
            match committed {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::AlreadyExists => {}
                Err(s) => {
                    return Err(Error::Rpc {
                        op: "snapshot commit",
                        source: s,
                    });
                }
            }
        }
        Ok(())
    }

    async fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let mut s = self
            .content()
            .read(self.req(ReadContentRequest {
                digest: digest.into(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(Error::rpc("content read"))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await {
            out.extend(chunk.map_err(Error::rpc("content read"))?.data);
        }
        Ok(out)
    }

    /// The manifest an image record's target names: itself, or this node's entry of an index.
    async fn platform_manifest(&self, name: &str, target: &Descriptor) -> Result<Vec<u8>> {
        let bytes = self.read_blob(&target.digest).await?;
        if target.media_type != MT_OCI_INDEX && target.media_type != MT_DOCKER_LIST {
            return Ok(bytes);
        }
        let index: OciIndex = serde_json::from_slice(&bytes)
            .map_err(|e| Error::bad(format!("index of {name}"), e))?;
        let entry = pick_platform(&index.manifests).ok_or_else(|| {
            let arch = super::pull::node_arch();
            Error::bad(name, format!("no linux/{arch} manifest in its index"))
        })?;
        self.read_blob(&entry.digest).await
    }

    /// Every image record with its digest and size (config and layers as stored).
    pub async fn list_images(&self) -> Result<Vec<ImageSummary>> {
        let images = self
            .images()
            .list(self.req(ListImagesRequest { filters: vec![] }))
            .await
            .map_err(Error::rpc("image list"))?
            .into_inner()
            .images;
        let mut out = Vec::new();
        let cached = |d: &str| self.image_sizes.lock().ok()?.get(d).copied();
        for img in images {
            let Some(target) = img.target else { continue };
            let size = match cached(&target.digest) {
                Some(s) => s,
                None => {
                    let size = match self.platform_manifest(&img.name, &target).await {
                        Ok(b) => serde_json::from_slice::<OciManifest>(&b)
                            .map(|m| {
                                m.config.size.max(0) as u64
                                    + m.layers.iter().map(|l| l.size.max(0) as u64).sum::<u64>()
                            })
                            .ok(),
                        Err(_) => None,
                    };
                    // Only a size read from the manifest is kept (a failed read is tried again).
                    if let (Some(s), Ok(mut c)) = (size, self.image_sizes.lock()) {
                        c.insert(target.digest.clone(), s);
                    }
                    size.unwrap_or(0)
                }
            };
            out.push(ImageSummary {
                name: img.name,
                digest: target.digest,
                size,
            });
        }
        if let Ok(mut c) = self.image_sizes.lock() {
            c.retain(|d, _| out.iter().any(|i| i.digest == *d));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes an image record; its content and snapshots go with containerd's GC once
    /// nothing else holds them (`sync`: the call waits for that collection).
    pub async fn remove_image_sync(&self, name: &str, sync: bool) -> Result<()> {
        match self
            .images()
            .delete(self.req(DeleteImageRequest {
                name: name.to_string(),
                sync,
                target: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => {
                Err(Error::ImageNotFound(name.to_string()))
            }
            Err(s) => Err(Error::Rpc {
                op: "image delete",
                source: s,
            }),
        }
    }

    /// The images containers are made from (their records' image names).
    pub async fn container_images(&self) -> Result<std::collections::HashSet<String>> {
        let r = self
            .containers()
            .list(
                self.req(containerd_client::services::v1::ListContainersRequest {
                    filters: vec![],
                }),
            )
            .await
            .map_err(Error::rpc("container list"))?;
        Ok(r.into_inner()
            .containers
            .into_iter()
            .map(|c| c.image)
            .collect())
    }

    /// Where the snapshotter keeps its snapshots (the image filesystem), as containerd's
    /// introspection reports it.
    pub async fn snapshotter_root(&self) -> Result<std::path::PathBuf> {
        let plugins = self
            .introspection()
            .plugins(self.req(containerd_client::services::v1::PluginsRequest {
                filters: vec![format!(
                    "type==io.containerd.snapshotter.v1,id=={SNAPSHOTTER}"
                )],
            }))
            .await
            .map_err(Error::rpc("introspection"))?
            .into_inner()
            .plugins;
        plugins
            .into_iter()
            .find_map(|p| p.exports.get("root").cloned())
            .map(std::path::PathBuf::from)
            .ok_or_else(|| {
                Error::bad(
                    "containerd",
                    format!("no root for the {SNAPSHOTTER} snapshotter"),
                )
            })
    }

    /// Looks an image up by reference (normalized as Kubernetes does).
    pub async fn image_info(&self, reference: &str) -> Result<ImageInfo> {
        let name = normalize_ref(reference);
        let img = match self
            .images()
            .get(self.req(GetImageRequest { name: name.clone() }))
            .await
        {
            Ok(r) => r.into_inner().image,
            Err(s) if s.code() == tonic::Code::NotFound => None,
            Err(s) => {
                return Err(Error::Rpc {
                    op: "image get",
                    source: s,
                });
            }
        };
        let target = img
            .and_then(|i| i.target)
            .ok_or_else(|| Error::ImageNotFound(reference.to_string()))?;
        let key = format!("{name}@{}", target.digest);
        if let Some(info) = self
            .image_cache
            .lock()
            .ok()
            .and_then(|c| c.get(&key).cloned())
        {
            return Ok(info);
        }
        let mbytes = self.platform_manifest(&name, &target).await?;
        let man: OciManifest = serde_json::from_slice(&mbytes)
            .map_err(|e| Error::bad(format!("manifest of {name}"), e))?;
        let cbytes = self.read_blob(&man.config.digest).await?;
        let cfg: ImgConfig = serde_json::from_slice(&cbytes)
            .map_err(|e| Error::bad(format!("config of {name}"), e))?;
        let chain = chain_ids(&cfg.rootfs.diff_ids);
        let inner = cfg.config.unwrap_or_default();
        let repo = repository_of(&name);
        let info = ImageInfo {
            image_id: format!("{repo}@{}", target.digest),
            name,
            chain_id: chain
                .last()
                .cloned()
                .ok_or_else(|| Error::bad(reference, "image has no layers"))?,
            entrypoint: inner.entrypoint.unwrap_or_default(),
            cmd: inner.cmd.unwrap_or_default(),
            env: inner.env.unwrap_or_default(),
            working_dir: inner.working_dir.unwrap_or_default(),
            user: inner.user.unwrap_or_default(),
        };
        if let Ok(mut c) = self.image_cache.lock() {
            c.insert(key, info.clone());
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_are_normalized_like_kubernetes() {
        assert_eq!(normalize_ref("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(normalize_ref("me/app:1"), "docker.io/me/app:1");
        assert_eq!(
            normalize_ref("keelson.local/pause:1"),
            "keelson.local/pause:1"
        );
        assert_eq!(normalize_ref("localhost:5000/x"), "localhost:5000/x:latest");
        assert_eq!(
            normalize_ref("busybox@sha256:abc"),
            "docker.io/library/busybox@sha256:abc"
        );
    }

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let d = vec!["sha256:a".to_string(), "sha256:b".to_string()];
        let c = chain_ids(&d);
        assert_eq!(c[0], "sha256:a");
        assert_eq!(
            c[1],
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest(b"sha256:a sha256:b"))
            )
        );
    }

    #[test]
    fn garbage_archive_is_a_clear_error() {
        let err = parse_archive("x.tar", b"this is not a tarball at all")
            .err()
            .unwrap();
        assert!(err.to_string().starts_with("x.tar:"), "{err}");
    }

    #[test]
    fn packed_archive_parses_back() {
        let layer = super::super::pack::layer_from_files(&[super::super::pack::MemFile {
            path: "a",
            mode: 0o644,
            data: b"x",
        }])
        .unwrap();
        let ar = super::super::pack::pack_oci_archive(
            &super::super::pack::ImageSettings {
                name: "t/x:2".into(),
                ..Default::default()
            },
            &layer,
        )
        .unwrap();
        let imgs = parse_archive("t", &ar).unwrap();
        assert_eq!(imgs.len(), 1);
        assert_eq!(imgs[0].names, vec!["docker.io/t/x:2".to_string()]);
        assert_eq!(imgs[0].diff_ids.len(), 1);
    }
}
