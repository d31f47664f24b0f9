//! The embedded store loses no acknowledged write when its process is killed with SIGKILL in
//! the middle of a stream of writes.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use keelson::store::{Precondition, Store, embedded::Embedded};

/// Not a test on its own: the writer process the durability test starts and kills.
#[test]
fn child_writer() {
    let Ok(path) = std::env::var("KEELSON_STORE_CHILD") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = Embedded::open(std::path::Path::new(&path)).unwrap();
        // Concurrent writers, so that group commits are in flight when the kill lands.
        let mut tasks = vec![];
        for w in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let key = format!("/registry/pods/w{w}/p{i}");
                    let kv = s
                        .put(
                            &key,
                            format!("value-{i}").into_bytes(),
                            Precondition::Absent,
                        )
                        .await
                        .unwrap();
                    println!("ACK {key} {}", kv.mod_revision);
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

#[test]
fn sigkill_during_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env("KEELSON_STORE_CHILD", &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut acked = vec![];
    let mut lines = BufReader::new(out).lines();
    while acked.len() < 400 {
        let Some(Ok(line)) = lines.next() else { break };
        if let Some(rest) = line.strip_prefix("ACK ") {
            let (key, rev) = rest.split_once(' ').unwrap();
            acked.push((key.to_string(), rev.parse::<i64>().unwrap()));
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    // Anything acknowledged before the kill (and printed after it) is readable.
    for line in lines.map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("ACK ") {
            let (key, rev) = rest.split_once(' ').unwrap();
            acked.push((key.to_string(), rev.parse().unwrap()));
        }
    }
    assert!(
        acked.len() >= 400,
        "the writer acknowledged {} writes",
        acked.len()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = Embedded::open(&path).unwrap();
        for (key, rev) in &acked {
            let kv = s
                .get(key)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("acknowledged {key} lost"));
            assert_eq!(kv.mod_revision, *rev);
        }
        let max = acked.iter().map(|(_, r)| *r).max().unwrap();
        assert!(s.revision().await.unwrap() >= max);
        // The store keeps working after recovery.
        let kv = s
            .put("/after", b"x".to_vec(), Precondition::Absent)
            .await
            .unwrap();
        assert!(kv.mod_revision > max);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {}).await;
    });
}
