//! Builds the XDP program (`clb-ebpf`) for `bpfel-unknown-none` and leaves the object in
//! `OUT_DIR/clb`, from where `src/lib.rs` embeds it into the `clb` binary.
//!
//! Cargo-in-cargo, as aya-build does it, with two differences that need control over the
//! flags: the pinned stable toolchain (`PINNED_TOOLCHAIN`) builds `core` itself
//! (`-Z build-std=core`, allowed on stable by `RUSTC_BOOTSTRAP=1`), and the object targets
//! BPF ISA v3 (`-C target-cpu=v3`, kernel >= 5.12) for the round-robin cursor's atomic
//! fetch-and-add. `cargo xtask setup` installs the toolchain and `bpf-linker`.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

const EBPF_PACKAGE: &str = "clb-ebpf";
/// The balancer, and the benchmark-only generator/sink object.
const EBPF_BINS: [&str; 2] = ["clb", "clb-gen"];
const TARGET: &str = "bpfel-unknown-none";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("clb-user has no parent directory"))?;
    let pin_file = root.join("PINNED_TOOLCHAIN");
    let ebpf_dir = root.join(EBPF_PACKAGE);
    println!("cargo::rerun-if-changed={}", pin_file.display());
    println!("cargo::rerun-if-changed={}", ebpf_dir.display());
    println!(
        "cargo::rerun-if-changed={}",
        root.join("clb-common").display()
    );
    // CLB_EBPF_DEBUG_LOG=1 builds the object with aya-log output on drops (debugging only).
    println!("cargo::rerun-if-env-changed=CLB_EBPF_DEBUG_LOG");
    let debug_log = std::env::var("CLB_EBPF_DEBUG_LOG").is_ok_and(|v| v == "1");

    let toolchain = std::fs::read_to_string(&pin_file)
        .with_context(|| format!("reading {}", pin_file.display()))?;
    let toolchain = toolchain.trim();
    if find_on_path("bpf-linker").is_none() {
        bail!(
            "bpf-linker is not on PATH: run `cargo xtask setup` (it installs the eBPF toolchain)"
        );
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let target_dir = out_dir.join("ebpf-target");
    let host_arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;

    let flags = [
        format!("--cfg=bpf_target_arch=\"{host_arch}\""),
        "-Cdebuginfo=2".to_owned(),
        // BTF for maps: `bpftool map dump` shows keys and values by field.
        "-Clink-arg=--btf".to_owned(),
        "-Ctarget-cpu=v3".to_owned(),
    ]
    .join("\x1f");

    let mut cmd = match find_on_path("rustup") {
        Some(rustup) => {
            let mut c = Command::new(rustup);
            c.args(["run", toolchain, "cargo"]);
            c
        }
        None => Command::new("cargo"),
    };
    cmd.current_dir(root)
        .args(["build", "--package", EBPF_PACKAGE, "--bins", "--release"])
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .args(if debug_log {
            &["--features", "debug-log"][..]
        } else {
            &[][..]
        })
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .env("RUSTC_BOOTSTRAP", "1")
        // The outer cargo's compiler and wrappers are for the host build, not this one.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("building the eBPF program failed ({status}); the compiler output is above");
    }
    for bin in EBPF_BINS {
        let built = target_dir.join(TARGET).join("release").join(bin);
        let dst = out_dir.join(bin);
        std::fs::copy(&built, &dst)
            .with_context(|| format!("copying {} to {}", built.display(), dst.display()))?;
    }
    Ok(())
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p: &PathBuf| Path::is_file(p))
}
