//! kube-proxy's service health check server: for each LoadBalancer Service with
//! externalTrafficPolicy: Local, an HTTP listener on its `healthCheckNodePort` that answers
//! 200 when this node has local endpoints for it and 503 when it has none, so that load
//! balancers send traffic only to nodes that can serve it without a second hop.

use std::collections::{BTreeSet, HashMap};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
    task::JoinHandle,
};

use super::model::{Model, ServicePort};

/// What one listener reports.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Status {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

/// The listeners, kept in step with the model.
#[derive(Default)]
pub struct Health {
    /// Port key → (health check port, status) for the ports that have one.
    by_key: HashMap<String, (u16, Status)>,
    servers: HashMap<u16, (watch::Sender<Status>, JoinHandle<()>)>,
}

fn status_of(p: &ServicePort) -> Option<(u16, Status)> {
    let port = p.health_check_node_port?;
    let (svc, _) = p.name.split_once(':').unwrap_or((&p.name, ""));
    let (namespace, name) = svc.split_once('/').unwrap_or(("", svc));
    let local: BTreeSet<_> = p
        .external_endpoints
        .iter()
        .filter(|e| e.local)
        .map(|e| e.ip)
        .collect();
    Some((
        port,
        Status {
            namespace: namespace.into(),
            name: name.into(),
            local_endpoints: local.len(),
        },
    ))
}

impl Health {
    /// Updates for the port keys that changed (`None`: everything may have changed).
    pub fn sync(&mut self, m: &Model, keys: Option<&BTreeSet<String>>) {
        match keys {
            None => {
                self.by_key = m
                    .ports
                    .iter()
                    .filter_map(|(k, p)| Some((k.clone(), status_of(p)?)))
                    .collect();
            }
            Some(keys) => {
                for k in keys {
                    match m.ports.get(k).and_then(status_of) {
                        Some(s) => self.by_key.insert(k.clone(), s),
                        None => self.by_key.remove(k),
                    };
                }
            }
        }
        // One listener per port; a Service's ports share it (the largest count wins).
        let mut want: HashMap<u16, Status> = HashMap::new();
        for (port, st) in self.by_key.values() {
            let e = want.entry(*port).or_insert_with(|| st.clone());
            e.local_endpoints = e.local_endpoints.max(st.local_endpoints);
        }
        self.servers.retain(|port, (_, task)| {
            let keep = want.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, st) in want {
            if let Some((tx, _)) = self.servers.get(&port) {
                tx.send_if_modified(|cur| {
                    let changed = *cur != st;
                    *cur = st.clone();
                    changed
                });
                continue;
            }
            let listener = match std::net::TcpListener::bind(("0.0.0.0", port))
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std)
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(port, error = %e, "health check node port: cannot listen");
                    continue;
                }
            };
            let (tx, rx) = watch::channel(st);
            let task = tokio::spawn(serve(listener, rx));
            self.servers.insert(port, (tx, task));
        }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        for (_, task) in self.servers.values() {
            task.abort();
        }
    }
}

/// The response kube-proxy gives.
fn http(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn response(st: &Status) -> String {
    let body = serde_json::json!({
        "service": {"namespace": st.namespace, "name": st.name},
        "localEndpoints": st.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let status = if st.local_endpoints > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    http(status, &body)
}

async fn serve(listener: tokio::net::TcpListener, st: watch::Receiver<Status>) {
    answer_each(listener, move || response(&st.borrow())).await
}

/// When the proxy last synced its rules successfully.
#[derive(Clone, Default)]
pub struct LastSync(
    std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, jiff::Timestamp)>>>,
);

impl LastSync {
    pub fn mark(&self) {
        if let Ok(mut l) = self.0.lock() {
            *l = Some((std::time::Instant::now(), jiff::Timestamp::now()));
        }
    }

    /// kube-proxy's /healthz answer: 200 while the last successful sync is younger than
    /// `within`, 503 before the first one and when syncing stalled.
    fn response(&self, within: std::time::Duration) -> String {
        let last = self.0.lock().ok().and_then(|l| *l);
        let now = jiff::Timestamp::now();
        let healthy = last.is_some_and(|(t, _)| t.elapsed() <= within);
        let body = serde_json::json!({
            "lastUpdated": last.map(|(_, ts)| ts.to_string()).unwrap_or_default(),
            "currentTime": now.to_string(),
            "nodeEligible": true,
        })
        .to_string();
        http(
            if healthy {
                "200 OK"
            } else {
                "503 Service Unavailable"
            },
            &body,
        )
    }
}

/// Serves kube-proxy's /healthz (any path gets the same answer).
pub async fn serve_healthz(
    listener: tokio::net::TcpListener,
    last: LastSync,
    within: std::time::Duration,
) {
    answer_each(listener, move || last.response(within)).await
}

/// Answers every connection with `answer()` once its request head arrived.
pub async fn answer_each(
    listener: tokio::net::TcpListener,
    answer: impl Fn() -> String + Send + Sync + Clone + 'static,
) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            // Read the request head (bounded in size and time); any request gets the status.
            let mut buf = [0u8; 4096];
            let mut got = 0;
            let read = async {
                while got < buf.len() {
                    match conn.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            got += n;
                            if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), read).await;
            let resp = answer();
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_service_and_counts_local_endpoints() {
        let st = Status {
            namespace: "default".into(),
            name: "lb".into(),
            local_endpoints: 0,
        };
        let r = response(&st);
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains(r#""localEndpoints":0"#), "{r}");
        let r = response(&Status {
            local_endpoints: 2,
            ..st
        });
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains(r#""name":"lb""#) && r.contains(r#""namespace":"default""#));
    }

    #[test]
    fn healthz_follows_the_last_sync() {
        let l = LastSync::default();
        let within = std::time::Duration::from_millis(200);
        assert!(
            l.response(within).starts_with("HTTP/1.1 503"),
            "before any sync"
        );
        l.mark();
        let r = l.response(within);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("lastUpdated") && r.contains("currentTime"));
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(l.response(within).starts_with("HTTP/1.1 503"), "stalled");
    }
}
