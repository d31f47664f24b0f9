//! kube-rs (the Rust client the agent uses) against a real `keelson server` process: paginated
//! lists, watches with bookmarks, a watch from a compacted resourceVersion (410, then kube's
//! watcher recovers by listing again), optimistic-concurrency conflicts.
mod common;

use std::time::{Duration, Instant};

use common::Server;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{ListParams, PostParams, WatchEvent, WatchParams},
    runtime::{WatchStreamExt, watcher},
};

fn cm(name: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": "kr"}},
        "data": {"n": name},
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_lists_watches_recovers_and_conflicts() {
    let s = Server::start(&["--compaction-interval", "1s"]);
    let client = s.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..5 {
        cms.create(&PostParams::default(), &cm(&format!("c{i}")))
            .await
            .unwrap();
    }

    // Pages of two, chained by the continue token.
    let mut names = vec![];
    let mut lp = ListParams::default().labels("app=kr").limit(2);
    loop {
        let page = cms.list(&lp).await.unwrap();
        assert!(page.items.len() <= 2);
        names.extend(page.items.iter().map(|c| c.metadata.name.clone().unwrap()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break,
        }
    }
    assert_eq!(names, ["c0", "c1", "c2", "c3", "c4"]);

    // A stale resourceVersion is a 409 Conflict.
    let mut c0 = cms.get("c0").await.unwrap();
    let stale = c0.clone();
    c0.data
        .get_or_insert_default()
        .insert("n".into(), "changed".into());
    cms.replace("c0", &PostParams::default(), &c0)
        .await
        .unwrap();
    match cms.replace("c0", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(e)) => assert_eq!((e.code, e.reason.as_str()), (409, "Conflict")),
        other => panic!("a stale replace must conflict: {other:?}"),
    }

    // A watch from a version sees what follows it, and bookmarks while idle.
    let rv = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let wp = WatchParams::default().timeout(30);
    let mut events = cms.watch(&wp, &rv).await.unwrap().boxed();
    cms.create(&PostParams::default(), &cm("c5")).await.unwrap();
    let mut added = false;
    let mut bookmark = None;
    let t0 = Instant::now();
    while !(added && bookmark.is_some()) {
        assert!(
            t0.elapsed() < Duration::from_secs(25),
            "added {added}, bookmark {bookmark:?}"
        );
        match tokio::time::timeout(Duration::from_secs(25), events.try_next()).await {
            Ok(Ok(Some(WatchEvent::Added(c)))) => {
                assert_eq!(c.metadata.name.as_deref(), Some("c5"));
                added = true;
            }
            Ok(Ok(Some(WatchEvent::Bookmark(b)))) => bookmark = Some(b.metadata.resource_version),
            other => panic!("unexpected watch outcome: {other:?}"),
        }
    }
    let bm: i64 = bookmark.unwrap().parse().unwrap();
    assert!(
        bm > rv.parse::<i64>().unwrap(),
        "the bookmark moves past the create"
    );
    drop(events);

    // History is compacted every second: a watch from the old version gets 410 Expired as
    // its one event, the signal for clients to list again.
    for i in 6..9 {
        cms.create(&PostParams::default(), &cm(&format!("c{i}")))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut old = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(Duration::from_secs(5), old.try_next()).await {
        Ok(Ok(Some(WatchEvent::Error(e)))) => {
            assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
        }
        other => panic!("a compacted resourceVersion is 410 Gone: {other:?}"),
    }

    // kube's watcher lists and follows; every object shows up, then a new one.
    let mut w = watcher(cms.clone(), watcher::Config::default().labels("app=kr"))
        .applied_objects()
        .boxed();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 9 {
        let c = tokio::time::timeout(Duration::from_secs(10), w.try_next())
            .await
            .expect("watcher event in time")
            .unwrap()
            .unwrap();
        seen.insert(c.metadata.name.unwrap());
    }
    cms.create(&PostParams::default(), &cm("c9")).await.unwrap();
    let c = tokio::time::timeout(Duration::from_secs(10), w.try_next())
        .await
        .expect("watcher event in time")
        .unwrap()
        .unwrap();
    assert_eq!(c.metadata.name.as_deref(), Some("c9"));
}
