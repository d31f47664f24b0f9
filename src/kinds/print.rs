//! kubectl's pod table (`NAME READY STATUS RESTARTS AGE IP`), with STATUS computed as
//! kubectl's printPod does. Pure formatting.

use k8s_openapi::api::core::v1::Pod;

/// kubectl's STATUS column for a pod.
pub fn pod_status(p: &Pod) -> String {
    let st = p.status.clone().unwrap_or_default();
    let mut reason = st
        .reason
        .clone()
        .or(st.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    let inits = st.init_container_statuses.clone().unwrap_or_default();
    let n_init = p
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .map_or(0, Vec::len);
    let mut initializing = false;
    for (i, c) in inits.iter().enumerate() {
        let s = c.state.clone().unwrap_or_default();
        if let Some(t) = &s.terminated {
            if t.exit_code == 0 {
                continue;
            }
            reason = match (&t.reason, t.signal) {
                (Some(r), _) if !r.is_empty() => format!("Init:{r}"),
                (_, Some(sig)) if sig != 0 => format!("Init:Signal:{sig}"),
                _ => format!("Init:ExitCode:{}", t.exit_code),
            };
        } else if let Some(w) = s
            .waiting
            .as_ref()
            .filter(|w| w.reason.as_deref().is_some_and(|r| r != "PodInitializing"))
        {
            reason = format!("Init:{}", w.reason.clone().unwrap_or_default());
        } else {
            reason = format!("Init:{i}/{n_init}");
        }
        initializing = true;
        break;
    }
    if !initializing {
        let mut has_running = false;
        for c in st.container_statuses.iter().flatten().rev() {
            let s = c.state.clone().unwrap_or_default();
            if let Some(r) = s
                .waiting
                .as_ref()
                .and_then(|w| w.reason.clone())
                .filter(|r| !r.is_empty())
            {
                reason = r;
            } else if let Some(t) = &s.terminated {
                reason = match (&t.reason, t.signal) {
                    (Some(r), _) if !r.is_empty() => r.clone(),
                    (_, Some(sig)) if sig != 0 => format!("Signal:{sig}"),
                    _ => format!("ExitCode:{}", t.exit_code),
                };
            } else if s.running.is_some() && c.ready {
                has_running = true;
            }
        }
        if reason == "Completed" && has_running {
            let ready = st
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            reason = if ready {
                "Running".into()
            } else {
                "NotReady".into()
            };
        }
    }
    if p.metadata.deletion_timestamp.is_some()
        && !matches!(st.phase.as_deref(), Some("Succeeded" | "Failed"))
    {
        reason = "Terminating".into();
    }
    reason
}

/// kubectl's AGE column: the time since `t`, coarsened as kubectl prints it.
pub fn age_since(t: Option<jiff::Timestamp>) -> String {
    let Some(t) = t else {
        return "<unknown>".into();
    };
    age_of_secs(jiff::Timestamp::now().duration_since(t).as_secs().max(0))
}

/// A duration the way kubectl prints ages: `42s`, `5m`, `3h`, `12d`.
pub fn age_of_secs(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3600 * 2 => format!("{}m", s / 60),
        s if s < 86400 * 2 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn age(p: &Pod) -> String {
    age_since(
        p.status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0),
    )
}

/// kubectl's READY (`ready/total`) and RESTARTS columns of a pod.
pub fn ready_and_restarts(p: &Pod) -> (String, i32) {
    let cs = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref());
    let total = p.spec.as_ref().map_or(0, |s| s.containers.len());
    let ready = cs.map_or(0, |cs| cs.iter().filter(|c| c.ready).count());
    let restarts = cs.map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum());
    (format!("{ready}/{total}"), restarts)
}

/// The table for a list of pods.
pub fn table(pods: &[Pod]) -> String {
    let mut rows = vec![[
        "NAMESPACE".to_string(),
        "NAME".into(),
        "READY".into(),
        "STATUS".into(),
        "RESTARTS".into(),
        "AGE".into(),
        "IP".into(),
    ]];
    for p in pods {
        let (ready, restarts) = ready_and_restarts(p);
        rows.push([
            p.metadata.namespace.clone().unwrap_or_default(),
            p.metadata.name.clone().unwrap_or_default(),
            ready,
            pod_status(p),
            restarts.to_string(),
            age(p),
            p.status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or_else(|| "<none>".into()),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn status_shows_the_waiting_reason_of_a_crash_looping_container() {
        let p = pod(
            "metadata: {name: p}\nspec: {containers: [{name: c}]}\nstatus:\n  phase: Running\n  containerStatuses:\n  - {name: c, image: i, imageID: '', ready: false, restartCount: 3, state: {waiting: {reason: CrashLoopBackOff}}}\n",
        );
        assert_eq!(pod_status(&p), "CrashLoopBackOff");
    }

    #[test]
    fn status_shows_init_progress() {
        let p = pod(
            "metadata: {name: p}\nspec: {initContainers: [{name: a}, {name: b}], containers: [{name: c}]}\nstatus:\n  phase: Pending\n  initContainerStatuses:\n  - {name: a, image: i, imageID: '', ready: false, restartCount: 0, state: {terminated: {exitCode: 0}}}\n  - {name: b, image: i, imageID: '', ready: false, restartCount: 0, state: {running: {}}}\n",
        );
        assert_eq!(pod_status(&p), "Init:1/2");
    }

    #[test]
    fn table_has_kubectls_columns() {
        let p = pod(
            "metadata: {name: p, namespace: default}\nspec: {containers: [{name: c}]}\nstatus: {phase: Running, podIP: 10.0.0.2}\n",
        );
        let t = table(&[p]);
        assert!(t.starts_with("NAMESPACE   NAME   READY   STATUS"), "{t}");
        assert!(t.contains("10.0.0.2"));
    }
}
