//! The storage suite every `Store` engine must pass (embedded now, etcd with issue 3's etcd
//! backend): revisions, preconditions, ranges with pagination, watch from a revision with
//! history and live events, compaction.

use std::time::Duration;

use super::{Error, EventKind, Precondition, Store};

async fn next(rx: &mut tokio::sync::mpsc::Receiver<super::Event>) -> super::Event {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("watch event in time")
        .expect("watch open")
}

pub async fn run_all(s: &impl Store) {
    revisions_and_preconditions(s).await;
    ranges_and_pages(s).await;
    watches_replay_history_then_follow(s).await;
    compaction_forgets_history(s).await;
    concurrent_writers_get_distinct_revisions(s).await;
}

async fn revisions_and_preconditions(s: &impl Store) {
    let r0 = s.revision().await.unwrap();
    let a = s
        .put("/t/a", b"1".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    assert_eq!(a.create_revision, r0 + 1);
    assert_eq!(a.mod_revision, r0 + 1);
    assert!(matches!(
        s.put("/t/a", b"x".to_vec(), Precondition::Absent).await,
        Err(Error::AlreadyExists(_))
    ));
    let stale = a.mod_revision;
    let a2 = s
        .put("/t/a", b"2".to_vec(), Precondition::ModRevision(stale))
        .await
        .unwrap();
    assert_eq!(
        (a2.create_revision, a2.mod_revision),
        (a.create_revision, r0 + 2)
    );
    match s
        .put("/t/a", b"3".to_vec(), Precondition::ModRevision(stale))
        .await
    {
        Err(Error::Conflict {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (stale, a2.mod_revision)),
        other => panic!("stale write must conflict: {other:?}"),
    }
    assert!(matches!(
        s.put("/t/none", b"x".to_vec(), Precondition::Exists).await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(s.get("/t/a").await.unwrap().unwrap().value, b"2");
    assert_eq!(
        s.revision().await.unwrap(),
        r0 + 2,
        "failed writes take no revision"
    );
    let gone = s
        .delete("/t/a", Precondition::ModRevision(a2.mod_revision))
        .await
        .unwrap();
    assert_eq!(gone.value, b"2");
    assert_eq!(gone.mod_revision, r0 + 3);
    assert!(s.get("/t/a").await.unwrap().is_none());
    assert!(matches!(
        s.delete("/t/a", Precondition::None).await,
        Err(Error::NotFound(_))
    ));
    let again = s
        .put("/t/a", b"new".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    assert_eq!(
        again.create_revision, again.mod_revision,
        "a re-created key has a new create revision"
    );
}

async fn ranges_and_pages(s: &impl Store) {
    for i in 0..25 {
        s.put(
            &format!("/r/ns1/k{i:02}"),
            vec![i as u8],
            Precondition::None,
        )
        .await
        .unwrap();
    }
    s.put("/r/ns2/x", b"x".to_vec(), Precondition::None)
        .await
        .unwrap();
    s.put("/r/ns10", b"y".to_vec(), Precondition::None)
        .await
        .unwrap();
    let all = s.list("/r/ns1/", None, 0).await.unwrap();
    assert_eq!(
        all.items.len(),
        25,
        "the prefix is exact: /r/ns10 and /r/ns2/ are not in it"
    );
    assert!(!all.more);
    assert_eq!(all.revision, s.revision().await.unwrap());
    let mut seen = vec![];
    let mut after: Option<String> = None;
    loop {
        let page = s.list("/r/ns1/", after.as_deref(), 10).await.unwrap();
        seen.extend(page.items.iter().map(|kv| kv.key.clone()));
        after = page.items.last().map(|kv| kv.key.clone());
        if !page.more {
            break;
        }
    }
    assert_eq!(
        seen,
        all.items
            .iter()
            .map(|kv| kv.key.clone())
            .collect::<Vec<_>>()
    );
}

async fn watches_replay_history_then_follow(s: &impl Store) {
    let start = s
        .put("/w/a", b"1".to_vec(), Precondition::None)
        .await
        .unwrap()
        .mod_revision;
    s.put("/w/b", b"2".to_vec(), Precondition::None)
        .await
        .unwrap();
    s.put("/other/c", b"3".to_vec(), Precondition::None)
        .await
        .unwrap();
    let mut rx = s.watch("/w/", start - 1).await.unwrap();
    let e1 = next(&mut rx).await;
    assert_eq!(
        (e1.kind, e1.kv.key.as_str(), e1.revision()),
        (EventKind::Put, "/w/a", start)
    );
    let e2 = next(&mut rx).await;
    assert_eq!(e2.kv.key, "/w/b");
    // Live events, in order, with the previous value.
    let u = s
        .put("/w/a", b"1b".to_vec(), Precondition::None)
        .await
        .unwrap();
    s.delete("/w/b", Precondition::None).await.unwrap();
    let e3 = next(&mut rx).await;
    assert_eq!(
        (
            e3.kv.mod_revision,
            e3.prev.as_ref().unwrap().value.as_slice()
        ),
        (u.mod_revision, &b"1"[..])
    );
    let e4 = next(&mut rx).await;
    assert_eq!(
        (e4.kind, e4.kv.key.as_str(), e4.kv.value.as_slice()),
        (EventKind::Delete, "/w/b", &b"2"[..])
    );
    // A watch from now sees only what comes next.
    let now = s.revision().await.unwrap();
    let mut rx2 = s.watch("/w/", now).await.unwrap();
    let c = s
        .put("/w/c", b"c".to_vec(), Precondition::None)
        .await
        .unwrap();
    assert_eq!(next(&mut rx2).await.revision(), c.mod_revision);
    assert!(matches!(
        s.watch("/w/", now + 100).await,
        Err(Error::FutureRevision { .. })
    ));
}

async fn compaction_forgets_history(s: &impl Store) {
    let a = s
        .put("/c/a", b"1".to_vec(), Precondition::None)
        .await
        .unwrap()
        .mod_revision;
    let b = s
        .put("/c/a", b"2".to_vec(), Precondition::None)
        .await
        .unwrap()
        .mod_revision;
    s.compact(b).await.unwrap();
    assert_eq!(s.compacted().await.unwrap(), b);
    match s.watch("/c/", a).await {
        Err(Error::Compacted {
            requested,
            compacted,
        }) => assert_eq!((requested, compacted), (a, b)),
        other => panic!("a watch below the compacted revision is Gone: {other:?}"),
    }
    let mut rx = s.watch("/c/", b).await.unwrap();
    let c = s
        .put("/c/a", b"3".to_vec(), Precondition::None)
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await.revision(), c.mod_revision);
    assert_eq!(
        s.get("/c/a").await.unwrap().unwrap().value,
        b"3",
        "data is kept, only history goes"
    );
}

async fn concurrent_writers_get_distinct_revisions(s: &impl Store) {
    let keys: Vec<String> = (0..64).map(|i| format!("/p/{i}")).collect();
    let futs = keys.iter().map(|k| s.put(k, vec![1], Precondition::Absent));
    let results = futures::future::join_all(futs).await;
    let mut revs: Vec<i64> = results
        .into_iter()
        .map(|r| r.unwrap().mod_revision)
        .collect();
    revs.sort();
    revs.dedup();
    assert_eq!(revs.len(), 64);
    // Racing creates of one key: exactly one wins.
    let racing = (0..16).map(|_| s.put("/p/one", vec![2], Precondition::Absent));
    let ok = futures::future::join_all(racing)
        .await
        .into_iter()
        .filter(|r| r.is_ok())
        .count();
    assert_eq!(ok, 1);
}
