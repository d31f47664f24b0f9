//! Builds OCI image archives offline (`keelson image pack`): one layer from a root filesystem,
//! an image config, a manifest and an OCI layout index, all in one tarball; with several
//! platforms, one config and manifest per platform under a multi-platform index.
//! Never talks to containerd; `image::import` loads what this writes.

use std::{collections::BTreeMap, io::Write, path::Path};

use flate2::{Compression, write::GzEncoder};
use oci_spec::image::{
    ConfigBuilder, DescriptorBuilder, Digest, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, PlatformBuilder, RootFsBuilder, Sha256Digest,
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
    /// `os/arch` of each manifest; empty: one linux/amd64 manifest and no platform index.
    pub platforms: Vec<String>,
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

/// The config and manifest of one platform of the image (`layers` gzipped, `diff_ids` their
/// uncompressed digests); (config JSON, manifest JSON).
fn platform_manifest(
    settings: &ImageSettings,
    os: &str,
    arch: &str,
    layers: &[Vec<u8>],
    diff_ids: &[String],
) -> Result<(Vec<u8>, Vec<u8>)> {
    let bad = |e: oci_spec::OciSpecError| Error::bad("image config", e);
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
        .architecture(oci_spec::image::Arch::from(arch))
        .os(oci_spec::image::Os::from(os))
        .config(cfg.build().map_err(bad)?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(diff_ids.to_vec())
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
        .layers(
            layers
                .iter()
                .map(|l| desc(MediaType::ImageLayerGzip, l))
                .collect::<Result<Vec<_>>>()?,
        )
        .build()
        .map_err(bad)?;
    let manifest_json = serde_json::to_vec(&manifest).map_err(|e| Error::bad("manifest", e))?;
    Ok((config_json, manifest_json))
}

/// `os/arch` → (os, arch), naming the bad entry.
fn parse_platform(p: &str) -> Result<(&str, &str)> {
    match p.split_once('/') {
        Some((os, arch)) if !os.is_empty() && !arch.is_empty() && !arch.contains('/') => {
            Ok((os, arch))
        }
        _ => Err(Error::bad(
            format!("platform {p:?}"),
            "expected OS/ARCH, e.g. linux/arm64",
        )),
    }
}

/// Packs one uncompressed layer tarball into a complete OCI image-layout archive.
pub fn pack_oci_archive(settings: &ImageSettings, layer_tar: &[u8]) -> Result<Vec<u8>> {
    pack_oci_archive_layers(settings, &[layer_tar])
}

/// Packs uncompressed layer tarballs (bottom first) into a complete OCI image-layout archive.
pub fn pack_oci_archive_layers(settings: &ImageSettings, layer_tars: &[&[u8]]) -> Result<Vec<u8>> {
    let bad = |e: oci_spec::OciSpecError| Error::bad("image index", e);
    let mut diff_ids = Vec::new();
    let mut layers = Vec::new();
    for t in layer_tars {
        diff_ids.push(sha256_digest(t));
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(t).map_err(Error::io("gzip layer"))?;
        layers.push(gz.finish().map_err(Error::io("gzip layer"))?);
    }
    let (layer, diff_id) = (&layers, &diff_ids);
    let mut blobs: Vec<Vec<u8>> = layers.clone();
    let mut top = if settings.platforms.is_empty() {
        let (c, m) = platform_manifest(settings, "linux", "amd64", layer, diff_id)?;
        let d = desc(MediaType::ImageManifest, &m)?;
        blobs.extend([c, m]);
        d
    } else {
        let mut entries = Vec::new();
        for p in &settings.platforms {
            let (os, arch) = parse_platform(p)?;
            let (c, m) = platform_manifest(settings, os, arch, layer, diff_id)?;
            let mut d = desc(MediaType::ImageManifest, &m)?;
            d.set_platform(Some(
                PlatformBuilder::default()
                    .os(oci_spec::image::Os::from(os))
                    .architecture(oci_spec::image::Arch::from(arch))
                    .build()
                    .map_err(bad)?,
            ));
            entries.push(d);
            blobs.extend([c, m]);
        }
        let nested = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(entries)
            .build()
            .map_err(bad)?;
        let nested = serde_json::to_vec(&nested).map_err(|e| Error::bad("index", e))?;
        let d = desc(MediaType::ImageIndex, &nested)?;
        blobs.push(nested);
        d
    };
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
    top.set_annotations(Some(annotations));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![top])
        .build()
        .map_err(bad)?;
    let index_json = serde_json::to_vec(&index).map_err(|e| Error::bad("index", e))?;

    let mut files: BTreeMap<String, &[u8]> = BTreeMap::new();
    for b in &blobs {
        let d = digest_of(&sha256_digest(b))?;
        files.insert(format!("blobs/sha256/{}", d.digest()), b);
    }
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

    #[test]
    fn several_platforms_make_an_index_of_manifests_that_imports_back() {
        let layer = layer_from_files(&[MemFile {
            path: "a",
            mode: 0o644,
            data: b"x",
        }])
        .unwrap();
        let s = ImageSettings {
            name: "keelson.local/multi:1".into(),
            platforms: vec!["linux/amd64".into(), "linux/arm64".into()],
            ..Default::default()
        };
        let ar = pack_oci_archive(&s, &layer).unwrap();
        let mut files = std::collections::HashMap::new();
        let mut a = tar::Archive::new(&ar[..]);
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let p = e.path().unwrap().display().to_string();
            let mut d = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut d).unwrap();
            files.insert(p, d);
        }
        // Layer, two configs, two manifests and the platform index.
        assert_eq!(files.keys().filter(|n| n.starts_with("blobs/")).count(), 6);
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        assert_eq!(
            index["manifests"][0]["mediaType"],
            "application/vnd.oci.image.index.v1+json"
        );
        let bad = ImageSettings {
            platforms: vec!["arm64".into()],
            ..s
        };
        let e = pack_oci_archive(&bad, &layer).unwrap_err().to_string();
        assert!(e.contains("\"arm64\""), "{e}");
    }
}
