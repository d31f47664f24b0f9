//! Image garbage collection as kubelet's image GC manager does it: when the image filesystem
//! (containerd's snapshotter root) is fuller than the high threshold, unused images are
//! deleted, least recently used first, until it is under the low threshold; an image a
//! container uses, one younger than the minimum age, the pause image and the images imported
//! from the node's images directory are never deleted. The plan is a pure function.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;

use crate::runtime::Containerd;

/// kubelet's flags.
#[derive(Debug, Clone)]
pub struct GcPolicy {
    /// Usage (percent) at which GC starts (`--image-gc-high-threshold`, 85).
    pub high: u8,
    /// Usage (percent) GC brings the filesystem under (`--image-gc-low-threshold`, 80).
    pub low: u8,
    /// Images younger than this are kept (`--minimum-image-ttl-duration`, 2 min).
    pub min_age: Duration,
    /// How often usage is checked (kubelet: 5 min).
    pub period: Duration,
}

impl Default for GcPolicy {
    fn default() -> Self {
        Self {
            high: 85,
            low: 80,
            min_age: Duration::from_secs(120),
            period: Duration::from_secs(300),
        }
    }
}

/// One image (all its names share a digest) as GC sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub digest: String,
    pub names: Vec<String>,
    pub size: u64,
    pub in_use: bool,
    pub pinned: bool,
    pub first_seen: Instant,
    pub last_used: Instant,
}

/// What one GC pass will do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Images (digests) to delete, in order.
    pub delete: Vec<String>,
    /// Bytes to free to get under the low threshold.
    pub to_free: u64,
    /// Bytes the deletable images hold (less than `to_free`: GC cannot get there).
    pub eligible: u64,
}

/// The images to delete, in order, to bring `used` of `capacity` bytes under the low
/// threshold once it passed the high one (nothing when under it).
pub fn plan(
    images: &[Candidate],
    used: u64,
    capacity: u64,
    policy: &GcPolicy,
    now: Instant,
) -> Plan {
    if capacity == 0 || used * 100 < u64::from(policy.high) * capacity {
        return Plan::default();
    }
    let target = capacity * u64::from(policy.low) / 100;
    let needed = used.saturating_sub(target);
    let mut to_free = needed;
    let mut order: Vec<&Candidate> = images
        .iter()
        .filter(|c| !c.in_use && !c.pinned && now.duration_since(c.first_seen) >= policy.min_age)
        .collect();
    order.sort_by_key(|c| (c.last_used, c.first_seen));
    let eligible = order.iter().map(|c| c.size).sum();
    let mut delete = Vec::new();
    for c in order {
        if to_free == 0 {
            break;
        }
        delete.push(c.digest.clone());
        to_free = to_free.saturating_sub(c.size.max(1));
    }
    Plan {
        delete,
        to_free: needed,
        eligible,
    }
}

/// Where GC failures are reported: kubelet's Node events.
#[derive(Clone)]
pub struct NodeEvents {
    pub recorder: crate::control::recorder::Recorder,
    pub node: String,
}

impl NodeEvents {
    fn warn(&self, reason: &str, message: String) {
        // kubelet refers to its Node by name, the name standing in for the UID.
        let node = k8s_openapi::api::core::v1::Node {
            metadata: kube::api::ObjectMeta {
                name: Some(self.node.clone()),
                uid: Some(self.node.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        self.recorder.event(&node, true, reason, message);
    }
}

/// When each image was first seen and last used, kept across passes.
#[derive(Default)]
struct Seen {
    by_digest: HashMap<String, (Instant, Instant)>,
}

/// Runs image GC every `policy.period`; `pinned` names are never deleted; failures become
/// Node events when `events` is given (cluster mode).
pub fn start(
    rt: Containerd,
    policy: GcPolicy,
    pinned: Arc<HashSet<String>>,
    events: Option<NodeEvents>,
) {
    tokio::spawn(async move {
        let root = match rt.snapshotter_root().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "image GC off: containerd did not say where its snapshots are");
                return;
            }
        };
        let mut seen = Seen::default();
        loop {
            tokio::time::sleep(policy.period).await;
            if let Err(e) = pass(&rt, &root, &policy, &pinned, &mut seen, events.as_ref()).await {
                tracing::warn!(error = %e, "image GC");
                if let Some(ev) = &events {
                    ev.warn("ImageGCFailed", format!("{e:#}"));
                }
            }
        }
    });
}

/// (used, capacity) bytes of the filesystem holding `path`.
fn usage(path: &Path) -> std::io::Result<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    let frag = s.fragment_size() as u64;
    let capacity = s.blocks() as u64 * frag;
    let available = s.blocks_available() as u64 * frag;
    Ok((capacity.saturating_sub(available), capacity))
}

async fn pass(
    rt: &Containerd,
    root: &Path,
    policy: &GcPolicy,
    pinned: &HashSet<String>,
    seen: &mut Seen,
    events: Option<&NodeEvents>,
) -> anyhow::Result<()> {
    let now = Instant::now();
    let in_use = rt.container_images().await?;
    let mut images: HashMap<String, Candidate> = HashMap::new();
    for i in rt.list_images().await? {
        let (first, last) = *seen.by_digest.entry(i.digest.clone()).or_insert((now, now));
        let c = images.entry(i.digest.clone()).or_insert(Candidate {
            digest: i.digest.clone(),
            names: vec![],
            size: i.size,
            in_use: false,
            pinned: false,
            first_seen: first,
            last_used: last,
        });
        c.in_use |= in_use.contains(&i.name);
        c.pinned |= pinned.contains(&i.name);
        c.names.push(i.name);
    }
    for c in images.values_mut().filter(|c| c.in_use) {
        c.last_used = now;
        if let Some(e) = seen.by_digest.get_mut(&c.digest) {
            e.1 = now;
        }
    }
    seen.by_digest.retain(|d, _| images.contains_key(d));
    let (used, capacity) = usage(root)?;
    let list: Vec<Candidate> = images.values().cloned().collect();
    let p = plan(&list, used, capacity, policy, now);
    if p.eligible < p.to_free {
        let msg = format!(
            "Failed to garbage collect required amount of images. Attempted to free {} bytes, but only found {} bytes eligible to free.",
            p.to_free, p.eligible
        );
        tracing::warn!("{msg}");
        if let Some(ev) = events {
            ev.warn("FreeDiskSpaceFailed", msg);
        }
    }
    let chosen = p.delete;
    if chosen.is_empty() {
        return Ok(());
    }
    let mut freed = 0;
    for d in &chosen {
        let c = &images[d];
        for (i, name) in c.names.iter().enumerate() {
            // The last name's removal waits for containerd's GC, so usage is current.
            rt.remove_image_sync(name, i + 1 == c.names.len()).await?;
        }
        freed += c.size;
        tracing::info!(image = ?c.names, bytes = c.size, "image GC removed an unused image");
    }
    let (after, _) = usage(root)?;
    tracing::info!(used = after, capacity, freed, "image GC pass done");
    seen.by_digest.retain(|d, _| !chosen.contains(d));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(digest: &str, size: u64, age_s: u64, used_s_ago: u64, now: Instant) -> Candidate {
        Candidate {
            digest: digest.into(),
            names: vec![format!("reg/{digest}:1")],
            size,
            in_use: false,
            pinned: false,
            first_seen: now - Duration::from_secs(age_s),
            last_used: now - Duration::from_secs(used_s_ago),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn least_recently_used_unused_images_go_until_under_the_low_threshold() {
        tokio::time::advance(Duration::from_secs(3600)).await;
        let now = Instant::now();
        let p = GcPolicy::default();
        let mut images = vec![
            img("old", 10, 1000, 900, now),
            img("older", 10, 1000, 950, now),
            img("recent", 10, 1000, 10, now),
            img("young", 50, 60, 60, now),
            img("used", 50, 1000, 1000, now),
            img("pause", 50, 1000, 1000, now),
        ];
        images[4].in_use = true;
        images[5].pinned = true;
        // Under the high threshold: nothing.
        assert_eq!(plan(&images, 84, 100, &p, now), Plan::default());
        // At 90 %: 10 bytes to free to reach 80 %, the least recently used first.
        assert_eq!(plan(&images, 90, 100, &p, now).delete, vec!["older"]);
        // At 100 %: 20 bytes; never the used, pinned or young ones even when short.
        assert_eq!(
            plan(&images, 100, 100, &p, now).delete,
            vec!["older", "old"]
        );
        assert!(
            plan(&images, 100, 1000, &p, now).delete.is_empty(),
            "10 % used is below the threshold"
        );
        // Everything used: 200 bytes wanted, only the three old unused ones (30) eligible —
        // what kubelet reports as FreeDiskSpaceFailed.
        let all = plan(&images, 1000, 1000, &p, now);
        assert_eq!(all.delete, vec!["older", "old", "recent"]);
        assert_eq!((all.to_free, all.eligible), (200, 30));
    }
}
