//! Pod IP address management on disk: one file per allocated address under the state
//! directory, created atomically (`O_EXCL`), so a restart never hands out an address twice.
//! Never touches the kernel; `net::pod` plumbs the address it returns.

use std::{
    fs,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("pod CIDR {0} has no room for pods (need at least a /30)")]
    TooSmall(Ipv4Net),
    #[error("pod CIDR {0} is exhausted")]
    Exhausted(Ipv4Net),
    #[error("IPAM state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Allocator for one pod CIDR. The first host address is the bridge's (the pods' gateway).
#[derive(Debug, Clone)]
pub struct Ipam {
    cidr: Ipv4Net,
    dir: PathBuf,
}

impl Ipam {
    pub fn new(cidr: Ipv4Net, state_dir: &Path) -> Result<Self, IpamError> {
        if cidr.prefix_len() > 30 {
            return Err(IpamError::TooSmall(cidr));
        }
        let dir = state_dir.join(cidr.to_string().replace('/', "_"));
        fs::create_dir_all(&dir).map_err(|source| IpamError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { cidr, dir })
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    /// The bridge address, gateway of every pod.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()) + 1)
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IpamError + '_ {
        move |source| IpamError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Allocates an address for `owner` (a pod UID). Returns the existing one if `owner`
    /// already holds an address. Scans round-robin from the last allocation, as host-local does.
    pub fn allocate(&self, owner: &str) -> Result<Ipv4Addr, IpamError> {
        if let Some(ip) = self.owned_by(owner)? {
            return Ok(ip);
        }
        let first = u32::from(self.cidr.network()) + 2;
        let last = u32::from(self.cidr.broadcast()) - 1;
        let n = last - first + 1;
        let last_file = self.dir.join("last_reserved_ip");
        let start = fs::read_to_string(&last_file)
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .filter(|v| (first..=last).contains(v))
            .map(|v| v + 1 - first)
            .unwrap_or(0);
        // The owner is written to a private file first, which is then linked to the address's
        // name: an allocation appears whole or not at all (a reader that saw an empty owner
        // once released a just-made allocation, and the address went to two pods).
        static STAGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n_staged = STAGED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let staged = self
            .dir
            .join(format!(".staged.{}.{n_staged}", std::process::id()));
        {
            let mut f = fs::File::create(&staged).map_err(Self::io(&staged))?;
            f.write_all(owner.as_bytes()).map_err(Self::io(&staged))?;
            f.sync_all().map_err(Self::io(&staged))?;
        }
        let mut result = Err(IpamError::Exhausted(self.cidr));
        for i in 0..n {
            let ip = Ipv4Addr::from(first + (start + i) % n);
            let path = self.dir.join(ip.to_string());
            match fs::hard_link(&staged, &path) {
                Ok(()) => {
                    let _ = fs::write(&last_file, ip.to_string());
                    result = Ok(ip);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    result = Err(Self::io(&path)(e));
                    break;
                }
            }
        }
        let _ = fs::remove_file(&staged);
        result
    }

    /// Every allocation as (address, owner).
    pub fn allocations(&self) -> Result<Vec<(Ipv4Addr, String)>, IpamError> {
        let mut out = vec![];
        for e in fs::read_dir(&self.dir).map_err(Self::io(&self.dir))? {
            let e = e.map_err(Self::io(&self.dir))?;
            let Some(ip) = e
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let owner = fs::read_to_string(e.path()).unwrap_or_default();
            out.push((ip, owner));
        }
        out.sort();
        Ok(out)
    }

    /// The address held by `owner`, if any.
    pub fn owned_by(&self, owner: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        Ok(self
            .allocations()?
            .into_iter()
            .find(|(_, o)| o == owner)
            .map(|(ip, _)| ip))
    }

    /// Releases whatever `owner` holds (nothing for an empty owner).
    pub fn release_owner(&self, owner: &str) -> Result<(), IpamError> {
        if owner.is_empty() {
            return Ok(());
        }
        for (ip, o) in self.allocations()? {
            if o == owner {
                let p = self.dir.join(ip.to_string());
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Self::io(&p)(e)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(cidr: &str) -> (tempfile::TempDir, Ipam) {
        let d = tempfile::tempdir().unwrap();
        let i = Ipam::new(cidr.parse().unwrap(), d.path()).unwrap();
        (d, i)
    }

    #[test]
    fn addresses_start_after_the_gateway_and_are_never_handed_out_twice() {
        let (_d, i) = ipam("10.1.0.0/29");
        assert_eq!(i.gateway(), Ipv4Addr::new(10, 1, 0, 1));
        let a = i.allocate("a").unwrap();
        let b = i.allocate("b").unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(b, Ipv4Addr::new(10, 1, 0, 3));
        assert_eq!(
            i.allocate("a").unwrap(),
            a,
            "same owner gets its address back"
        );
    }

    #[test]
    fn a_fresh_allocator_on_the_same_directory_sees_earlier_allocations() {
        let d = tempfile::tempdir().unwrap();
        let cidr: Ipv4Net = "10.1.0.0/29".parse().unwrap();
        let a = Ipam::new(cidr, d.path()).unwrap().allocate("a").unwrap();
        let again = Ipam::new(cidr, d.path()).unwrap();
        let b = again.allocate("b").unwrap();
        assert_ne!(a, b);
        assert_eq!(again.owned_by("a").unwrap(), Some(a));
    }

    #[test]
    fn concurrent_allocations_are_unique_and_never_seen_without_their_owner() {
        let (_d, ipam) = ipam("10.9.0.0/24");
        let ipam = std::sync::Arc::new(ipam);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (ipam, stop) = (ipam.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut empty = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    empty += ipam
                        .allocations()
                        .unwrap()
                        .iter()
                        .filter(|(_, o)| o.is_empty())
                        .count();
                }
                empty
            })
        };
        let writers: Vec<_> = (0..6)
            .map(|t| {
                let ipam = ipam.clone();
                std::thread::spawn(move || {
                    (0..30)
                        .map(|i| ipam.allocate(&format!("pod-{t}-{i}")).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<Ipv4Addr> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            reader.join().unwrap(),
            0,
            "an allocation seen without its owner"
        );
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 180, "every address handed out once");
        assert_eq!(
            ipam.allocations().unwrap().len(),
            180,
            "no staged file counted"
        );
        // An empty owner releases nothing.
        ipam.release_owner("").unwrap();
        assert_eq!(ipam.allocations().unwrap().len(), 180);
    }

    #[test]
    fn exhaustion_is_an_error_and_release_frees_the_address() {
        let (_d, i) = ipam("10.1.0.0/30");
        i.allocate("a").unwrap();
        assert!(matches!(i.allocate("b"), Err(IpamError::Exhausted(_))));
        i.release_owner("a").unwrap();
        assert_eq!(i.allocate("b").unwrap(), Ipv4Addr::new(10, 1, 0, 2));
    }

    #[test]
    fn release_moves_on_round_robin_instead_of_reusing_at_once() {
        let (_d, i) = ipam("10.1.0.0/28");
        let a = i.allocate("a").unwrap();
        i.release_owner("a").unwrap();
        let b = i.allocate("b").unwrap();
        assert_ne!(a, b);
    }
}
