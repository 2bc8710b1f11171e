//! Builds the XDP program (`clb-ebpf`) for `bpfel-unknown-none` and leaves the object in
//! `OUT_DIR/clb`, from where `src/lib.rs` embeds it into the `clb` binary. Also records the
//! commit the binary is built from, for `clb --version`.
use std::path::PathBuf;

use anyhow::anyhow;

include!("../clb-ebpf/build_object.rs");

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("clb-user has no parent directory"))?;
    // CLB_EBPF_DEBUG_LOG=1 builds the object with aya-log output on drops (debugging only).
    println!("cargo::rerun-if-env-changed=CLB_EBPF_DEBUG_LOG");
    let debug_log = std::env::var("CLB_EBPF_DEBUG_LOG").is_ok_and(|v| v == "1");
    build_ebpf_object(
        root,
        "clb-ebpf",
        &root.join("clb-ebpf"),
        &["clb"],
        if debug_log { &["debug-log"] } else { &[] },
    )?;
    commit_id(root);
    Ok(())
}

/// `CLB_COMMIT`: the commit of the source tree (with `-dirty` if it has uncommitted changes),
/// or "unknown" outside a git checkout.
fn commit_id(root: &std::path::Path) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let id = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(id) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty { format!("{id}-dirty") } else { id }
        }
        None => "unknown".into(),
    };
    println!("cargo::rustc-env=CLB_COMMIT={id}");
    // Rerun when HEAD moves: a checkout changes .git/HEAD, a commit the branch's ref.
    let head = root.join(".git/HEAD");
    if head.exists() {
        println!("cargo::rerun-if-changed={}", head.display());
        if let Some(r) = std::fs::read_to_string(&head)
            .ok()
            .and_then(|h| h.strip_prefix("ref: ").map(|r| r.trim().to_owned()))
        {
            let p = root.join(".git").join(r);
            if p.exists() {
                println!("cargo::rerun-if-changed={}", p.display());
            }
        }
    }
}
