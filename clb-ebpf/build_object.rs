// Builds an eBPF crate's binaries for `bpfel-unknown-none` and copies them into `OUT_DIR`.
// Included (`include!`) by the build scripts that embed eBPF objects: `clb-user/build.rs`
// (the balancer) and `tests/build.rs` (the test traffic generator), so both build alike.
//
// Cargo-in-cargo, as aya-build does it, with two differences that need control over the
// flags: the pinned stable toolchain (`PINNED_TOOLCHAIN`) builds `core` itself
// (`-Z build-std=core`, allowed on stable by `RUSTC_BOOTSTRAP=1`), and the object targets
// BPF ISA v3 (`-C target-cpu=v3`, kernel >= 5.12) for the round-robin cursor's atomic
// fetch-and-add. `cargo xtask setup` installs the toolchain and `bpf-linker`.

/// Builds `bins` of the eBPF package `package` (in the workspace at `root`) with `features`
/// and copies each to `out_dir/<bin>`.
fn build_ebpf_object(
    root: &std::path::Path,
    package: &str,
    package_dir: &std::path::Path,
    bins: &[&str],
    features: &[&str],
) -> anyhow::Result<()> {
    use anyhow::{Context as _, bail};
    use std::{path::PathBuf, process::Command};

    const TARGET: &str = "bpfel-unknown-none";
    let pin_file = root.join("PINNED_TOOLCHAIN");
    println!("cargo::rerun-if-changed={}", pin_file.display());
    println!("cargo::rerun-if-changed={}", package_dir.display());
    println!(
        "cargo::rerun-if-changed={}",
        root.join("clb-common").display()
    );
    let toolchain = std::fs::read_to_string(&pin_file)
        .with_context(|| format!("reading {}", pin_file.display()))?;
    let toolchain = toolchain.trim();
    let find_on_path = |name: &str| -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p: &PathBuf| p.is_file())
    };
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
        .args(["build", "--package", package, "--bins", "--release"])
        .args(["--target", TARGET, "-Z", "build-std=core"])
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
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("building the eBPF program {package} failed ({status}); the compiler output is above");
    }
    for bin in bins {
        let built = target_dir.join(TARGET).join("release").join(bin);
        let dst = out_dir.join(bin);
        std::fs::copy(&built, &dst)
            .with_context(|| format!("copying {} to {}", built.display(), dst.display()))?;
    }
    Ok(())
}
