//! Builds the pause binary (pause/pause.rs) as a static executable that keelson embeds,
//! so that the pause image can be made offline on any host.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    println!("cargo:rerun-if-changed=pause/pause.rs");
    let status = Command::new(rustc)
        .args([
            "--edition=2024",
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "strip=symbols",
            "-C",
            "target-feature=+crt-static",
            "--crate-type=bin",
            "-o",
        ])
        .arg(out.join("pause"))
        .arg("pause/pause.rs")
        .status()
        .expect("run rustc for pause");
    assert!(status.success(), "building pause/pause.rs failed");
}
