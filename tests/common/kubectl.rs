//! The real kubectl against whatever a test started (a `keelson server`, a `keelson lab`):
//! one implementation of "run kubectl, it must succeed, read a field, wait for a condition".

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

pub trait Kubectl {
    /// The admin kubeconfig.
    fn kubeconfig(&self) -> PathBuf;
    /// kubectl's `$HOME` (its cache), private to the test.
    fn home(&self) -> PathBuf;
    /// The network namespace kubectl runs in, when the server listens inside one.
    fn netns(&self) -> Option<String> {
        None
    }
    /// What a failure message adds: the logs' tails.
    fn diagnostics(&self) -> String {
        String::new()
    }

    fn kubectl_command(&self, kubeconfig: &Path) -> Command {
        let mut c = match self.netns() {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("kubectl");
                c
            }
            None => Command::new("kubectl"),
        };
        c.env("KUBECONFIG", kubeconfig).env("HOME", self.home());
        c
    }

    /// kubectl with another kubeconfig (another user).
    fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        self.kubectl_command(kubeconfig)
            .args(args)
            .output()
            .expect("kubectl is installed")
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.kubeconfig(), args)
    }

    /// kubectl that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.kubectl(args);
        assert!(
            o.status.success(),
            "kubectl {args:?}: {}{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.diagnostics()
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// kubectl that must fail; its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let o = self.kubectl(args);
        assert!(
            !o.status.success(),
            "kubectl {args:?} should fail: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).to_string()
    }

    /// `kubectl apply -f -` with `yaml` on stdin, which must succeed; its stdout.
    fn apply(&self, yaml: &str) -> String {
        let mut child = self
            .kubectl_command(&self.kubeconfig())
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl is installed");
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(yaml.as_bytes()).unwrap();
        }
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "kubectl apply: {}{}\n{yaml}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.diagnostics()
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// `kubectl ARGS -o jsonpath=PATH`.
    fn jsonpath(&self, args: &[&str], path: &str) -> String {
        let p = format!("jsonpath={path}");
        let mut a = args.to_vec();
        a.extend(["-o", p.as_str()]);
        self.ok(&a)
    }

    /// `kubectl get KIND NAME -o jsonpath=PATH`.
    fn field(&self, kind: &str, name: &str, path: &str) -> String {
        self.jsonpath(&["get", kind, name], path)
    }

    /// The words of a jsonpath answer, sorted (lists whose order the API does not promise).
    fn sorted_words(&self, args: &[&str], path: &str) -> Vec<String> {
        let mut w: Vec<String> = self
            .jsonpath(args, path)
            .split_whitespace()
            .map(String::from)
            .collect();
        w.sort();
        w
    }

    /// Waits until `f` holds, up to `secs`; panics naming `what`, with the diagnostics.
    fn until(&self, secs: u64, what: &str, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "timed out after {secs} s waiting for {what}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The last `n` lines of `text`, each cut at 400 bytes.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut s = String::new();
    for l in &lines[lines.len().saturating_sub(n)..] {
        let mut end = l.len().min(400);
        while !l.is_char_boundary(end) {
            end -= 1;
        }
        s += &l[..end];
        s.push('\n');
    }
    s
}
