//! `kubectl exec`, `attach`, `run -it`, `cp` and `port-forward` in a lab, with the real
//! kubectl: WebSocket from kubectl to the API server, which checks the request and passes the
//! upgrade to the pod's kubelet (the agent), which runs the process in containerd or dials
//! inside the pod's network namespace.
mod common;

use std::{
    io::{BufRead, BufReader, Write},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{BUSYBOX, Kubectl, cluster::Cluster};
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
    command: ["sh", "-c", "echo started; while read l; do [ \"$l\" = quit ] && exit 0; echo \"echo:$l\"; done; echo stdin-closed"]
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
    // Deterministic and incompressible enough (xorshift64*), and fast in a debug build: a
    // SHA-256 chain took seconds per 10 MiB under load, long enough for a stream to idle out.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(seed).wrapping_mul(0x1000_0000_01B3);
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out
}

fn sha(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

/// A one-node lab with the test pods; `agent_args` for the agent.
fn up(hint: &str, agent_args: &[&str]) -> Cluster {
    let c = Cluster::up_with(hint, 1, &[], agent_args);
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
    c
}

#[test]
fn exec_tty_cp_and_errors_with_kubectl() {
    // A short idle timeout to see it close a stream (kubelet's default is 4 h).
    let c = up("exec", &["--streaming-connection-idle-timeout=6s"]);
    crate::scenarios!(&c;
        exec_keeps_stdout_and_stderr_apart_and_returns_the_exit_code,
        exec_i_delivers_stdin_whole_and_streams_output_while_it_flows,
        exec_it_on_a_terminal_carries_the_size_a_resize_and_the_exit_code,
        cp_copies_both_ways_byte_for_byte_and_many_short_copies_succeed,
        exec_fails_with_kubectls_usual_errors,
        an_idle_stream_is_closed_and_a_leaving_client_takes_its_process_along,
    );
}

/// exec: stdout and stderr apart, the exit code becomes kubectl's; the other container, and
/// its environment/user as the container has them.
fn exec_keeps_stdout_and_stderr_apart_and_returns_the_exit_code(c: &Cluster) {
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
}

/// exec -i: stdin arrives whole and its EOF ends the command; a command that echoes: output
/// flows while stdin still streams in (no stall both ways).
fn exec_i_delivers_stdin_whole_and_streams_output_while_it_flows(c: &Cluster) {
    let input = random(300_000, 1);
    let (code, out, err) = with_stdin(
        c,
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
    let (code, out, err) = with_stdin(c, &["exec", "-i", "box", "-c", "main", "--", "cat"], &input);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.len(), input.len());
    assert!(out == input, "cat echoed the bytes unchanged");
}

/// exec -it on a terminal: the size comes along, a resize follows, the exit code too.
fn exec_it_on_a_terminal_carries_the_size_a_resize_and_the_exit_code(c: &Cluster) {
    let mut t = Pty::spawn(
        c,
        &["exec", "-it", "box", "-c", "main", "--", "sh"],
        40,
        100,
    );
    t.send("stty size; echo sum=$((6*7))\r");
    let at = t.expect("40 100", 0);
    let at = t.expect("sum=42", at);
    t.resize(50, 120);
    std::thread::sleep(Duration::from_millis(500));
    t.send("stty size\r");
    let at = t.expect("50 120", at);
    t.send("exit 5\r");
    let _ = at;
    assert_eq!(
        t.wait(30),
        5,
        "kubectl exec -it returns the shell's exit code"
    );
}

/// cp both ways (tar through exec), byte for byte; and many short copies in a row, each
/// ending in order.
fn cp_copies_both_ways_byte_for_byte_and_many_short_copies_succeed(c: &Cluster) {
    let local = c.dir.path().join("payload.bin");
    let payload = random(3 << 20, 3);
    std::fs::write(&local, &payload).unwrap();
    c.ok(&[
        "cp",
        local.to_str().unwrap(),
        "box:/tmp/payload.bin",
        "-c",
        "main",
    ]);
    let o = c.ok(&[
        "exec",
        "box",
        "-c",
        "main",
        "--",
        "sha256sum",
        "/tmp/payload.bin",
    ]);
    assert_eq!(o.split_whitespace().next(), Some(sha(&payload).as_str()));
    let back = c.dir.path().join("back.bin");
    c.ok(&[
        "cp",
        "box:/tmp/payload.bin",
        back.to_str().unwrap(),
        "-c",
        "main",
    ]);
    assert!(
        std::fs::read(&back).unwrap() == payload,
        "the copy came back identical"
    );
    // The end of an exec is ordered: all output, then the status, then the close frame,
    // whatever the timing (a copy out of the pod once failed with kubectl's "error reading
    // from error stream"); many short copies in a row must all succeed.
    for i in 0..20 {
        let small = c.dir.path().join(format!("small-{i}"));
        let o = c.kubectl(&[
            "cp",
            "box:/etc/passwd",
            small.to_str().unwrap(),
            "-c",
            "main",
        ]);
        assert!(o.status.success(), "copy {i}: {}", text(&o.stderr));
        assert!(
            std::fs::read_to_string(&small)
                .unwrap()
                .starts_with("root:")
        );
    }
}

/// kubectl's usual errors: no such pod or container, a container not started, a completed pod,
/// no such command; and a node's own credential may not exec.
fn exec_fails_with_kubectls_usual_errors(c: &Cluster) {
    let err = |args: &[&str]| failure(c, args);
    let e = err(&["exec", "nope", "--", "true"]);
    assert!(e.contains("pods \"nope\" not found"), "{e}");
    let e = err(&["exec", "box", "-c", "nope", "--", "true"]);
    assert!(e.contains("container nope is not valid for pod box"), "{e}");
    let e = err(&["exec", "stuck", "--", "true"]);
    assert!(e.contains("container not found (\"main\")"), "{e}");
    c.until(60, "the finished pod to complete", || {
        c.jsonpath(&["get", "pod", "done"], "{.status.phase}") == "Succeeded"
    });
    let e = err(&["exec", "done", "--", "true"]);
    assert!(
        e.contains("cannot exec into a container in a completed pod"),
        "{e}"
    );
    let e = err(&["exec", "box", "-c", "main", "--", "no-such-command"]);
    assert!(e.contains("executable file not found"), "{e}");
    // A node's own credential may not exec.
    let o = c.kubectl_as(
        &c.node_kubeconfig(&c.nodes[0]),
        &["exec", "box", "--", "true"],
    );
    let e = text(&o.stderr);
    assert!(e.contains("cannot create resource \"pods/exec\""), "{e}");
}

/// An idle stream is closed (6 s here); a client that leaves takes its process along and
/// leaves no FIFO behind.
fn an_idle_stream_is_closed_and_a_leaving_client_takes_its_process_along(c: &Cluster) {
    let t0 = Instant::now();
    let e = failure(c, &["exec", "box", "-c", "side", "--", "sleep", "40"]);
    assert!(
        t0.elapsed() < Duration::from_secs(25),
        "closed when idle: {e}"
    );
    assert!(e.contains("idle"), "{e}");
    let mut k = kubectl(c)
        .args(["exec", "-i", "box", "-c", "side", "--", "sleep", "1234"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ps = || c.ok(&["exec", "box", "-c", "side", "--", "ps"]);
    c.until(20, "the exec'd sleep to run", || {
        ps().contains("sleep 1234")
    });
    k.kill().unwrap();
    k.wait().unwrap();
    c.until(20, "the exec'd sleep to go with its client", || {
        !ps().contains("sleep 1234")
    });
    let fifos = c.lab_dir().join("nodes").join(&c.nodes[0]).join("fifo");
    c.until(10, "exec FIFOs removed", || {
        std::fs::read_dir(&fifos)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("exec-"))
    });
}

/// kubectl with `args`, which must fail; its stderr.
fn failure(c: &Cluster, args: &[&str]) -> String {
    let o = c.kubectl(args);
    assert!(!o.status.success(), "{args:?} should fail");
    text(&o.stderr)
}

#[test]
fn attach_run_and_port_forward_with_kubectl() {
    let c = up("attach", &[]);
    crate::scenarios!(&c;
        port_forward_carries_four_10_mib_echoes_at_once_and_reaches_a_loopback_server,
        port_forward_to_a_service_reaches_a_pod_at_its_target_port,
        port_forward_to_a_closed_port_reports_the_pods_refusal,
        attach_shows_earlier_output_in_the_log_and_feeds_stdin,
        run_i_rm_reads_stdin_once_and_removes_the_pod,
        run_it_rm_on_a_terminal_ends_with_the_shell,
    );
}

/// port-forward: four connections at once, 10 MiB each way through an echo server; a server
/// bound to 127.0.0.1 inside the pod is reachable: the 10 MiB file it serves.
fn port_forward_carries_four_10_mib_echoes_at_once_and_reaches_a_loopback_server(c: &Cluster) {
    let payloads: Vec<Vec<u8>> = (0..4u8).map(|i| random(10 << 20, 10 + i)).collect();
    let f = Forward::start(c, "pod/box", &["9000", "8081"]);
    let runs: Vec<_> = payloads
        .into_iter()
        .map(|data| {
            let port = f.ports[0];
            std::thread::spawn(move || {
                let back = echo_through(port, data.clone());
                (sha(&data), sha(&back), back.len())
            })
        })
        .collect();
    for r in runs {
        let Ok((sent, got, n)) = r.join() else {
            panic!(
                "a forwarded connection failed; kubectl port-forward said: {}",
                f.stderr.lock().unwrap()
            );
        };
        assert_eq!(n, 10 << 20);
        assert_eq!(sent, got, "the echo came back unchanged");
    }
    // A server bound to 127.0.0.1 inside the pod is reachable: the 10 MiB file it serves.
    let body = http_get(f.ports[1], "/big");
    let want = c.ok(&["exec", "box", "-c", "main", "--", "sha256sum", "/www/big"]);
    assert_eq!(want.split_whitespace().next(), Some(sha(&body).as_str()));
    drop(f);
}

/// svc/NAME: kubectl resolves the Service to a pod and its target port.
fn port_forward_to_a_service_reaches_a_pod_at_its_target_port(c: &Cluster) {
    let f = Forward::start(c, "svc/box", &["80"]);
    assert_eq!(echo_through(f.ports[0], b"ping\n".to_vec()), b"ping\n");
    drop(f);
}

/// A closed port: kubectl reports the pod's refusal and gives up.
fn port_forward_to_a_closed_port_reports_the_pods_refusal(c: &Cluster) {
    let mut f = Forward::start(c, "pod/box", &["9999"]);
    let _ = std::net::TcpStream::connect(("127.0.0.1", f.ports[0]))
        .and_then(|mut s| std::io::Read::read(&mut s, &mut [0u8; 16]));
    let t0 = Instant::now();
    while f.child.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let e = f.stderr.lock().unwrap().clone();
    assert!(e.contains("error forwarding port 9999"), "{e}");
    assert!(e.contains("connection refused"), "{e}");
    drop(f);
}

/// attach: what the container printed before is in its log; input reaches its stdin.
fn attach_shows_earlier_output_in_the_log_and_feeds_stdin(c: &Cluster) {
    let logs = c.ok(&["logs", "talker"]);
    assert!(logs.contains("started"), "{logs}");
    let (code, out, err) = with_stdin(c, &["attach", "-i", "talker"], b"a\nb\nquit\n");
    assert_eq!(code, 0, "{err}");
    let out = text(&out);
    assert!(out.contains("echo:a") && out.contains("echo:b"), "{out}");
}

/// run -i --rm: stdin once, the pod removed after.
fn run_i_rm_reads_stdin_once_and_removes_the_pod(c: &Cluster) {
    let (code, out, err) = with_stdin(
        c,
        &[
            "run",
            "once",
            "-i",
            "--rm",
            "--restart=Never",
            "--image",
            BUSYBOX,
            "--",
            "sh",
            "-c",
            "read x; echo got:$x",
        ],
        b"hello\n",
    );
    assert_eq!(code, 0, "{err}");
    assert!(text(&out).contains("got:hello"), "{}", text(&out));
    c.until(30, "the run pod deleted", || {
        !c.kubectl(&["get", "pod", "once"]).status.success()
    });
}

/// run -it --rm on a terminal.
fn run_it_rm_on_a_terminal_ends_with_the_shell(c: &Cluster) {
    let mut t = Pty::spawn(
        c,
        &[
            "run",
            "shell",
            "-it",
            "--rm",
            "--restart=Never",
            "--image",
            BUSYBOX,
            "--",
            "sh",
        ],
        30,
        90,
    );
    t.expect("#", 0);
    t.send("echo sum=$((2+3))\r");
    let at = t.expect("sum=5", 0);
    t.send("stty size\r");
    t.expect("30 90", at);
    t.send("exit\r");
    assert_eq!(t.wait(60), 0, "run -it ends with the shell");
    c.until(30, "the shell pod deleted", || {
        !c.kubectl(&["get", "pod", "shell"]).status.success()
    });
}

/// kubectl on a pseudo-terminal of its own (its controlling terminal, so that a size change
/// reaches it as SIGWINCH), the test holding the other side.
struct Pty {
    master: std::fs::File,
    child: std::process::Child,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Pty {
    fn spawn(c: &Cluster, args: &[&str], rows: u16, cols: u16) -> Pty {
        use std::os::unix::process::CommandExt;
        let ws = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).unwrap();
        let slave = std::fs::File::from(pty.slave);
        let mut cmd = kubectl(c);
        cmd.args(args)
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let master = std::fs::File::from(pty.master);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut r = master.try_clone().unwrap();
        let s = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut r, &mut buf) {
                if n == 0 {
                    break;
                }
                s.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            master,
            child,
            seen,
        }
    }

    fn send(&mut self, s: &str) {
        self.master.write_all(s.as_bytes()).unwrap();
    }

    fn seen(&self) -> String {
        text(&self.seen.lock().unwrap())
    }

    /// Waits until the terminal showed `needle` (after `from` bytes); panics with the screen.
    fn expect(&self, needle: &str, from: usize) -> usize {
        let t0 = Instant::now();
        loop {
            let s = self.seen();
            if let Some(i) = s.get(from..).and_then(|t| t.find(needle)) {
                return from + i + needle.len();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the terminal never showed {needle:?}; it shows:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn resize(&self, rows: u16, cols: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ on our own pty master with a valid winsize.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0, "TIOCSWINSZ");
    }

    fn wait(mut self, secs: u64) -> i32 {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            if t0.elapsed() > Duration::from_secs(secs) {
                let _ = self.child.kill();
                panic!("kubectl did not end; the terminal shows:\n{}", self.seen());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `kubectl port-forward` running; the local ports it chose, in the order asked.
struct Forward {
    child: std::process::Child,
    ports: Vec<u16>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Forward {
    fn start(c: &Cluster, target: &str, remotes: &[&str]) -> Forward {
        let mut args = vec!["port-forward", target];
        let specs: Vec<String> = remotes.iter().map(|r| format!(":{r}")).collect();
        args.extend(specs.iter().map(String::as_str));
        let mut child = kubectl(c)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut e = child.stderr.take().unwrap();
        let s2 = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = std::io::Read::read(&mut e, &mut buf) {
                if n == 0 {
                    break;
                }
                s2.lock().unwrap().push_str(&text(&buf[..n]));
            }
        });
        let out = BufReader::new(child.stdout.take().unwrap());
        // "Forwarding from 127.0.0.1:41235 -> 9000", in the order asked (a Service's port
        // shows as the pod's target port).
        let mut ports = vec![];
        let mut lines = out.lines();
        while ports.len() < remotes.len() {
            let Some(Ok(l)) = lines.next() else {
                let _ = child.kill();
                panic!(
                    "port-forward ended before forwarding: {}",
                    stderr.lock().unwrap()
                );
            };
            if let Some(rest) = l.strip_prefix("Forwarding from 127.0.0.1:")
                && let Some((local, _remote)) = rest.split_once(" -> ")
            {
                ports.push(local.parse().unwrap());
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Forward {
            child,
            ports,
            stderr,
        }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `data` on a new connection to 127.0.0.1:`port` while reading what comes back until
/// the far side closes.
fn echo_through(port: u16, data: Vec<u8>) -> Vec<u8> {
    let s = connect(port);
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = vec![];
    std::io::Read::read_to_end(&mut &s, &mut back).unwrap();
    writer.join().unwrap();
    back
}

/// Connects to kubectl's local port (retried briefly: a refusal means kubectl is not
/// listening, which the panic message shows with kubectl's own words).
fn connect(port: u16) -> std::net::TcpStream {
    let t0 = Instant::now();
    loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if t0.elapsed() > Duration::from_secs(5) => {
                panic!("connecting to kubectl's port-forward at 127.0.0.1:{port}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn http_get(port: u16, path: &str) -> Vec<u8> {
    let mut s = connect(port);
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut all = vec![];
    std::io::Read::read_to_end(&mut s, &mut all).unwrap();
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    all.split_off(split + 4)
}
