//! `kubectl exec`, `attach`, `run -it`, `cp` and `port-forward` in a lab, with the real
//! kubectl: WebSocket from kubectl to the API server, which checks the request and passes the
//! upgrade to the pod's kubelet (the agent), which runs the process in containerd or dials
//! inside the pod's network namespace.
mod common;

use std::{
    io::Write,
    process::{Command, Stdio},
};

use common::{BUSYBOX, cluster::Cluster};
use sha2::Digest;

fn pod() -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: box
  labels: {{app: box}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {BUSYBOX}
    command: ["sh", "-c", "mkdir -p /www && dd if=/dev/urandom of=/www/big bs=1048576 count=10 2>/dev/null && httpd -p 127.0.0.1:8081 -h /www && echo ready && exec nc -ll -p 9000 -e cat"]
    readinessProbe:
      tcpSocket: {{port: 9000}}
      periodSeconds: 1
  - name: side
    image: {BUSYBOX}
    command: ["sleep", "3600"]
---
apiVersion: v1
kind: Pod
metadata:
  name: talker
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {BUSYBOX}
    stdin: true
    command: ["sh", "-c", "echo started; while read l; do echo \"echo:$l\"; done; echo stdin-closed"]
---
apiVersion: v1
kind: Pod
metadata:
  name: stuck
spec:
  containers:
  - name: main
    image: keelson.local/not-there:1
---
apiVersion: v1
kind: Pod
metadata:
  name: done
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: {BUSYBOX}
    command: ["true"]
---
apiVersion: v1
kind: Service
metadata:
  name: box
spec:
  selector: {{app: box}}
  ports:
  - port: 80
    targetPort: 9000
"#
    )
}

fn kubectl(c: &Cluster) -> Command {
    let mut k = Command::new("kubectl");
    k.env("KUBECONFIG", c.kubeconfig())
        .env("HOME", c.dir.path());
    k
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// kubectl with `input` on stdin; (exit code, stdout, stderr).
fn with_stdin(c: &Cluster, args: &[&str], input: &[u8]) -> (i32, Vec<u8>, String) {
    let mut child = kubectl(c)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = child.stdin.take().unwrap();
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = w.write_all(&data);
    });
    let o = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    (o.status.code().unwrap_or(-1), o.stdout, text(&o.stderr))
}

fn random(n: usize, seed: u8) -> Vec<u8> {
    // Deterministic, incompressible enough: a hash chain.
    let mut out = Vec::with_capacity(n + 32);
    let mut h = sha2::Sha256::digest([seed]);
    while out.len() < n {
        out.extend_from_slice(&h);
        h = sha2::Sha256::digest(h);
    }
    out.truncate(n);
    out
}

fn sha(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

#[test]
fn exec_cp_attach_and_port_forward_with_kubectl() {
    let c = Cluster::up_with(
        "streams",
        1,
        &[],
        &["--streaming-connection-idle-timeout=6s"],
    );
    c.apply(&pod());
    c.until(90, "box and talker running", || {
        c.jsonpath(
            &["get", "pods", "box", "talker"],
            "{.items[*].status.phase}",
        ) == "Running Running"
            && c.jsonpath(
                &["get", "pod", "box"],
                "{.status.conditions[?(@.type==\"Ready\")].status}",
            ) == "True"
    });

    // exec: stdout and stderr apart, the exit code becomes kubectl's.
    let o = c.kubectl(&[
        "exec",
        "box",
        "-c",
        "main",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "out\n");
    assert!(text(&o.stderr).contains("err\n"), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("command terminated with exit code 3"),
        "{}",
        text(&o.stderr)
    );
    // The other container, and its environment/user as the container has them.
    let o = c.kubectl(&[
        "exec",
        "box",
        "-c",
        "side",
        "--",
        "sh",
        "-c",
        "echo $PATH; id -u",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).ends_with("0\n"), "{}", text(&o.stdout));

    // exec -i: stdin arrives whole and its EOF ends the command.
    let input = random(300_000, 1);
    let (code, out, err) = with_stdin(
        &c,
        &["exec", "-i", "box", "-c", "main", "--", "sha256sum"],
        &input,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        text(&out).split_whitespace().next(),
        Some(sha(&input).as_str())
    );
    // A command that echoes: output flows while stdin still streams in (no stall both ways).
    let input = random(2_000_000, 2);
    let (code, out, err) = with_stdin(
        &c,
        &["exec", "-i", "box", "-c", "main", "--", "cat"],
        &input,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.len(), input.len());
    assert!(out == input, "cat echoed the bytes unchanged");
}
