//! The iptables programs, as the node's rules are loaded through them: one
//! `iptables-restore --noflush` transaction, an idempotent single rule (`-C` first), and the
//! chains a table holds. Shared by the host-gw rules and the proxy's iptables backend. Acts in
//! the caller's network namespace.

use std::io::Write;

#[derive(Debug, thiserror::Error)]
pub enum XtError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {stderr}")]
    Failed { what: String, stderr: String },
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> XtError {
    let what = what.to_string();
    move |source| XtError::Io { what, source }
}

/// Runs `iptables-restore -w --noflush` with `input` (one transaction).
pub fn restore(input: &str) -> Result<(), XtError> {
    let mut child = std::process::Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(io("running iptables-restore (is iptables installed?)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(io("writing to iptables-restore"))?;
    }
    let out = child.wait_with_output().map_err(io("iptables-restore"))?;
    if !out.status.success() {
        return Err(XtError::Failed {
            what: "iptables-restore".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Makes sure `rule` is in `table` `chain`: checked with `-C`, added with `-I` (first) or
/// `-A` (last) when missing, so it is never there twice.
pub fn ensure_rule(table: &str, chain: &str, rule: &[String], first: bool) -> Result<(), XtError> {
    let run = |op: &str| {
        std::process::Command::new("iptables")
            .args(["-w", "-t", table, op, chain])
            .args(rule)
            .output()
            .map_err(io("running iptables"))
    };
    if run("-C")?.status.success() {
        return Ok(());
    }
    let op = if first { "-I" } else { "-A" };
    let add = run(op)?;
    if !add.status.success() {
        return Err(XtError::Failed {
            what: format!("iptables -t {table} {op} {chain}"),
            stderr: String::from_utf8_lossy(&add.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Deletes every copy of `rule` from `table` `chain`.
pub fn delete_rule(table: &str, chain: &str, rule: &[String]) {
    while std::process::Command::new("iptables")
        .args(["-w", "-t", table, "-D", chain])
        .args(rule)
        .output()
        .is_ok_and(|o| o.status.success())
    {}
}

/// The chains of `table` whose names start with `prefix` (from iptables-save).
pub fn chains(table: &str, prefix: &str) -> Result<Vec<String>, XtError> {
    let out = std::process::Command::new("iptables-save")
        .args(["-t", table])
        .output()
        .map_err(io("running iptables-save"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with(prefix))
        .map(str::to_string)
        .collect())
}
