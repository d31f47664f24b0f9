//! Builds OCI image archives offline (`keelson image pack`): one layer from a root filesystem,
//! an image config, a manifest and an OCI layout index, all in one tarball.
//! Never talks to containerd; `image::import` loads what this writes.

use std::{collections::BTreeMap, io::Write, path::Path};

use flate2::{Compression, write::GzEncoder};
use oci_spec::image::{
    ConfigBuilder, DescriptorBuilder, Digest, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, RootFsBuilder, Sha256Digest,
};
use sha2::{Digest as _, Sha256};

use super::{Error, Result};

/// What goes into the image's config besides the filesystem.
#[derive(Debug, Clone, Default)]
pub struct ImageSettings {
    pub name: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
}

/// A file to place in a layer built in memory.
pub struct MemFile<'a> {
    pub path: &'a str,
    pub mode: u32,
    pub data: &'a [u8],
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// An uncompressed layer tarball of the directory `dir` (owners set to root, times zeroed).
pub fn layer_from_dir(dir: &Path) -> Result<Vec<u8>> {
    let what = format!("packing {}", dir.display());
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    b.follow_symlinks(false);
    b.append_dir_all(".", dir)
        .map_err(Error::io(what.clone()))?;
    b.into_inner().map_err(Error::io(what))
}

/// An uncompressed layer tarball holding `files` (parent directories added as needed).
pub fn layer_from_files(files: &[MemFile<'_>]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for f in files {
        let mut p = Path::new(f.path).parent();
        while let Some(d) = p {
            if !d.as_os_str().is_empty() {
                dirs.insert(d.to_path_buf());
            }
            p = d.parent();
        }
    }
    for d in dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, &d, std::io::empty())
            .map_err(Error::io("layer dir"))?;
    }
    for f in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(f.mode);
        h.set_size(f.data.len() as u64);
        b.append_data(&mut h, f.path, f.data)
            .map_err(Error::io(format!("layer file {}", f.path)))?;
    }
    b.into_inner().map_err(Error::io("layer"))
}

fn digest_of(s: &str) -> Result<Digest> {
    s.parse::<Digest>()
        .map_err(|e| Error::bad("digest", e.to_string()))
}

fn desc(media: MediaType, data: &[u8]) -> Result<oci_spec::image::Descriptor> {
    let hexd = hex::encode(Sha256::digest(data));
    let d: Sha256Digest = hexd
        .parse()
        .map_err(|e: oci_spec::OciSpecError| Error::bad("digest", e))?;
    DescriptorBuilder::default()
        .media_type(media)
        .digest(Digest::from(d))
        .size(data.len() as u64)
        .build()
        .map_err(|e| Error::bad("descriptor", e))
}

/// Packs one uncompressed layer tarball into a complete OCI image-layout archive.
pub fn pack_oci_archive(settings: &ImageSettings, layer_tar: &[u8]) -> Result<Vec<u8>> {
    let bad = |e: oci_spec::OciSpecError| Error::bad("image config", e);
    let diff_id = sha256_digest(layer_tar);
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(layer_tar).map_err(Error::io("gzip layer"))?;
    let layer = gz.finish().map_err(Error::io("gzip layer"))?;

    let mut cfg = ConfigBuilder::default();
    if !settings.entrypoint.is_empty() {
        cfg = cfg.entrypoint(settings.entrypoint.clone());
    }
    if !settings.cmd.is_empty() {
        cfg = cfg.cmd(settings.cmd.clone());
    }
    let mut env = settings.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    cfg = cfg.env(env);
    if let Some(wd) = &settings.working_dir {
        cfg = cfg.working_dir(wd.clone());
    }
    let config = ImageConfigurationBuilder::default()
        .architecture(oci_spec::image::Arch::Amd64)
        .os(oci_spec::image::Os::Linux)
        .config(cfg.build().map_err(bad)?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id])
                .build()
                .map_err(bad)?,
        )
        .build()
        .map_err(bad)?;
    let config_json = serde_json::to_vec(&config).map_err(|e| Error::bad("image config", e))?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(desc(MediaType::ImageConfig, &config_json)?)
        .layers(vec![desc(MediaType::ImageLayerGzip, &layer)?])
        .build()
        .map_err(bad)?;
    let manifest_json = serde_json::to_vec(&manifest).map_err(|e| Error::bad("manifest", e))?;
    let mut mdesc = desc(MediaType::ImageManifest, &manifest_json)?;
    let full = super::image::normalize_ref(&settings.name);
    let tag = full.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    let annotations: std::collections::HashMap<String, String> = [
        ("io.containerd.image.name".to_string(), full.clone()),
        (
            "org.opencontainers.image.ref.name".to_string(),
            tag.to_string(),
        ),
    ]
    .into();
    mdesc.set_annotations(Some(annotations));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![mdesc])
        .build()
        .map_err(bad)?;
    let index_json = serde_json::to_vec(&index).map_err(|e| Error::bad("index", e))?;

    let mut files: BTreeMap<String, &[u8]> = BTreeMap::new();
    let blob = |d: &str| -> Result<String> {
        let d = digest_of(d)?;
        Ok(format!("blobs/sha256/{}", d.digest()))
    };
    let (c, l, m) = (
        sha256_digest(&config_json),
        sha256_digest(&layer),
        sha256_digest(&manifest_json),
    );
    files.insert(blob(&c)?, &config_json);
    files.insert(blob(&l)?, &layer);
    files.insert(blob(&m)?, &manifest_json);
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    let mut out = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        out.append_data(&mut h, path, data)
            .map_err(Error::io(format!("archive entry {path}")))
    };
    add("oci-layout", layout)?;
    add("index.json", &index_json)?;
    for (p, d) in &files {
        add(p, d)?;
    }
    out.into_inner().map_err(Error::io("archive"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_archive_has_layout_index_and_every_blob() {
        let layer = layer_from_files(&[MemFile {
            path: "bin/hello",
            mode: 0o755,
            data: b"#!/bin/sh\necho hi\n",
        }])
        .unwrap();
        let s = ImageSettings {
            name: "keelson.local/hello:1".into(),
            cmd: vec!["/bin/hello".into()],
            ..Default::default()
        };
        let ar = pack_oci_archive(&s, &layer).unwrap();
        let mut names = vec![];
        let mut a = tar::Archive::new(&ar[..]);
        for e in a.entries().unwrap() {
            names.push(e.unwrap().path().unwrap().display().to_string());
        }
        assert!(names.contains(&"oci-layout".to_string()));
        assert!(names.contains(&"index.json".to_string()));
        assert_eq!(
            names
                .iter()
                .filter(|n| n.starts_with("blobs/sha256/"))
                .count(),
            3
        );
    }
}
