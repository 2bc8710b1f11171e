//! clb's task runner. It is built with whatever Rust toolchain runs `cargo xtask` (the
//! machine's default) and drives everything else with the pinned toolchain in
//! `PINNED_TOOLCHAIN`, which `setup` installs first (`RUSTUP_AUTO_INSTALL=0` machines never
//! install it on their own).
//!
//! - `setup`  installs what building needs (`--test`: and testing, `--bench`: and the full
//!   bench), skipping what is already there. Every other task installs only its own.
//! - `build`  builds the workspace (and the embedded XDP object).
//! - `run`    with `--iface`: the daemon on real NICs; without: the demo in namespaces.
//! - `test`   unit, packet (BPF_PROG_TEST_RUN) and namespace end-to-end tests.
//! - `bench`  benchmarks against nftables, haproxy and nginx.
//! - `lint`   rustfmt check and clippy for the user-space crates and, separately, the eBPF crates.
//! - `fuzz`   the datapath fuzzer (10^7 frames by default), then the HTTP fuzzer (10^6 inputs).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain, bpf-linker and the system packages building needs (idempotent).
    Setup {
        /// Also what the tests need (namespaces' tools, BIRD, curl/openssl/h2load, Chromium
        /// for the console tests, promtool, and the peers the bench smoke test runs).
        #[arg(long)]
        test: bool,
        /// Also what the full bench needs (the tests' packages and clang-22 with libbpf-dev
        /// to build Katran).
        #[arg(long)]
        bench: bool,
    },
    /// Build the workspace.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run clb: on `--iface` NICs with `--config`, or the demo topology when no NIC is named.
    Run {
        /// Interfaces to load onto (comma separated). Without: the demo in namespaces.
        #[arg(long)]
        iface: Option<String>,
        /// Config file for the daemon (with --iface).
        #[arg(long, default_value = "/etc/clb/clb.toml")]
        config: PathBuf,
        /// XDP mode (with --iface): native, generic or auto.
        #[arg(long, default_value = "native")]
        xdp_mode: String,
        /// Demo: leave the topology running for exploration until Ctrl-C.
        #[arg(long)]
        keep: bool,
        /// Demo of a fleet: N nodes announcing the VIP over BGP to a router doing ECMP,
        /// backends answering directly (DSR); a node dies and comes back.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(2..=8))]
        fleet: Option<u8>,
        /// Extra arguments for the daemon (after --).
        #[arg(last = true)]
        rest: Vec<String>,
    },
    /// Run every test (one thread: tests share kernel state).
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
        /// Also upgrade from every release in RELEASES, not only the last (builds each one
        /// once, minutes each; cached under target/releases/).
        #[arg(long)]
        upgrades: bool,
    },
    /// Run the benchmarks.
    Bench {
        /// Short run for smoke checks (< 2 minutes).
        #[arg(long)]
        quick: bool,
        /// Only these sections, comma-separated (perpacket, rate, conns, dsr, flood, l7, memory).
        #[arg(long, value_name = "SECTIONS")]
        only: Option<String>,
        /// Katran's source for the same-run per-packet peer (default
        /// ../shared/peers/katran/src if present; absent: reported so, no download).
        #[arg(long, value_name = "DIR")]
        katran_src: Option<PathBuf>,
    },
    /// rustfmt --check, clippy (user space), clippy (eBPF crate).
    Lint,
    /// Fuzz the datapath through BPF_PROG_TEST_RUN (every invariant checked per frame), then
    /// the HTTP proxy (HTTP/1.1 and HTTP/2 inputs).
    Fuzz {
        /// Frames to run.
        #[arg(long, default_value_t = 10_000_000)]
        frames: u64,
        /// HTTP inputs to run (0: none).
        #[arg(long, default_value_t = 1_000_000)]
        http_inputs: u64,
        /// Seed (default: the time).
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = root()?;
    std::env::set_current_dir(&root)?;
    match cli.cmd {
        Cmd::Setup { test, bench } => {
            let need = if bench {
                Need::BenchFull
            } else if test {
                Need::Test
            } else {
                Need::Build
            };
            setup(&root, true, need)
        }
        Cmd::Build { release } => {
            setup(&root, false, Need::Build)?;
            let mut args = vec![
                "build",
                "--workspace",
                "--exclude",
                "clb-ebpf",
                "--exclude",
                "clb-gen",
                "--bins",
                "--tests",
            ];
            if release {
                args.push("--release");
            }
            cargo(&root, &args)
        }
        Cmd::Run {
            iface,
            config,
            xdp_mode,
            keep,
            fleet,
            rest,
        } => {
            if fleet.is_some() && iface.is_some() {
                bail!("--fleet runs the demo in namespaces; it takes no --iface");
            }
            setup(
                &root,
                false,
                if iface.is_some() {
                    Need::Build
                } else {
                    Need::Demo
                },
            )?;
            match iface {
                Some(iface) => {
                    cargo(
                        &root,
                        &["build", "--release", "-p", "clb-user", "--bin", "clb"],
                    )?;
                    let clb = root.join("target/release/clb");
                    let mut cmd = Command::new(&clb);
                    cmd.args([
                        "daemon",
                        "--iface",
                        &iface,
                        "--xdp-mode",
                        &xdp_mode,
                        "--config",
                    ])
                    .arg(&config)
                    .args(&rest);
                    println!("xtask: running {cmd:?}");
                    run_foreground(cmd)
                }
                None => {
                    cargo(
                        &root,
                        &["build", "-p", "clb-user", "-p", "clb-tests", "--bins"],
                    )?;
                    let mut cmd = Command::new(root.join("target/debug/clb-demo"));
                    cmd.env("CLB_BIN", root.join("target/debug/clb"));
                    if keep {
                        cmd.arg("--keep");
                    }
                    if let Some(n) = fleet {
                        cmd.arg("--fleet").arg(n.to_string());
                    }
                    run_foreground(cmd)
                }
            }
        }
        Cmd::Test { filter, upgrades } => {
            // The benchmark's smoke test runs against the peers too.
            setup(&root, false, Need::Test)?;
            let t0 = Instant::now();
            cargo(&root, &["build", "-p", "clb-user", "--bin", "clb"])?;
            let mut args = vec![
                "test",
                "--workspace",
                "--exclude",
                "clb-ebpf",
                "--exclude",
                "clb-gen",
            ];
            if let Some(f) = filter.as_deref() {
                args.push(f);
            }
            args.extend(["--", "--test-threads=1"]);
            if upgrades {
                args.push("--include-ignored");
            }
            let clb = root.join("target/debug/clb");
            let r = cargo_env(&root, &args, &[("CLB_BIN", clb.as_os_str())]);
            println!("xtask: test took {:.1} s", t0.elapsed().as_secs_f64());
            r
        }
        Cmd::Bench {
            quick,
            only,
            katran_src,
        } => {
            setup(
                &root,
                false,
                if quick { Need::Test } else { Need::BenchFull },
            )?;
            cargo(
                &root,
                &[
                    "build",
                    "--release",
                    "-p",
                    "clb-user",
                    "-p",
                    "clb-tests",
                    "--bins",
                ],
            )?;
            let mut cmd = Command::new(root.join("target/release/clb-bench"));
            cmd.env("CLB_BIN", root.join("target/release/clb"))
                .arg("--out")
                .arg(root.join("target/bench"));
            if quick {
                cmd.arg("--quick");
            }
            if let Some(k) = katran_src {
                cmd.arg("--katran-src").arg(k);
            }
            if let Some(only) = only {
                cmd.arg("--only").arg(only);
            }
            run_foreground(cmd)
        }
        Cmd::Fuzz {
            frames,
            http_inputs,
            seed,
        } => {
            setup(&root, false, Need::Build)?;
            cargo(
                &root,
                &["build", "--release", "-p", "clb-tests", "--bin", "clb-fuzz"],
            )?;
            let mut cmd = Command::new(root.join("target/release/clb-fuzz"));
            cmd.arg("--frames").arg(frames.to_string());
            cmd.arg("--http-inputs").arg(http_inputs.to_string());
            if let Some(s) = seed {
                cmd.arg("--seed").arg(s.to_string());
            }
            run_foreground(cmd)
        }
        Cmd::Lint => {
            setup(&root, false, Need::Build)?;
            cargo(&root, &["fmt", "--all", "--", "--check"])?;
            cargo(
                &root,
                &[
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "clb-ebpf",
                    "--exclude",
                    "clb-gen",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
            )?;
            // The eBPF crate on its own, for its target: the `user` feature of clb-common never
            // leaks std into it this way.
            let host_arch = std::env::consts::ARCH;
            let flags = format!("--cfg=bpf_target_arch=\"{host_arch}\"\x1f-Ctarget-cpu=v3");
            cargo_env(
                &root,
                &[
                    "clippy",
                    "-p",
                    "clb-ebpf",
                    "-p",
                    "clb-gen",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--target-dir",
                    "target/ebpf-clippy",
                    "--",
                    "-D",
                    "warnings",
                ],
                &[
                    ("RUSTC_BOOTSTRAP", "1".as_ref()),
                    ("CARGO_ENCODED_RUSTFLAGS", flags.as_ref()),
                ],
            )
        }
    }
}

fn root() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(dir
        .parent()
        .context("xtask has no parent directory")?
        .to_owned())
}

fn toolchain(root: &Path) -> anyhow::Result<String> {
    let p = root.join("PINNED_TOOLCHAIN");
    Ok(std::fs::read_to_string(&p)
        .with_context(|| format!("reading {}", p.display()))?
        .trim()
        .to_owned())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

/// PATH with `$CARGO_HOME/bin` (bpf-linker lives there) added in front if it is missing.
/// An unchanged PATH keeps cargo's build cache valid.
fn path_env() -> OsString {
    let bin = cargo_home().join("bin");
    let current: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if current.contains(&bin) {
        return std::env::join_paths(current).unwrap_or_default();
    }
    std::env::join_paths(std::iter::once(bin).chain(current)).unwrap_or_default()
}

/// A cargo command on the pinned toolchain, cleaned of the outer cargo's environment.
fn cargo_cmd(root: &Path, args: &[&str]) -> anyhow::Result<Command> {
    let tc = toolchain(root)?;
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{tc}"))
        .args(args)
        .current_dir(root)
        .env("PATH", path_env())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("CARGO");
    Ok(cmd)
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    cargo_env(root, args, &[])
}

fn cargo_env(root: &Path, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> anyhow::Result<()> {
    let mut cmd = cargo_cmd(root, args)?;
    for (k, v) in env {
        cmd.env(k, v);
    }
    status(cmd)
}

fn status(mut cmd: Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    check(st, &cmd)
}

fn check(st: ExitStatus, cmd: &Command) -> anyhow::Result<()> {
    if !st.success() {
        bail!(
            "{:?} {:?} failed: {st}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// Runs a long-lived child (demo, daemon, bench) with Ctrl-C going to it alone: xtask waits
/// while the child cleans up after itself.
fn run_foreground(mut cmd: Command) -> anyhow::Result<()> {
    // SAFETY: ignoring SIGINT in this process; the child resets it to the default on exec.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    cmd.env("PATH", path_env());
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    check(st, &cmd)
}

// ---- setup ----------------------------------------------------------------------------------

/// Debian packages the build needs: LLVM 22 for bpf-linker.
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Packages the demo in namespaces needs: ip, ethtool, nsenter, BIRD (the fleet demo
/// announces VIPs over BGP through it).
const DEMO_PACKAGES: &[&str] = &["iproute2", "ethtool", "util-linux", "bird2"];
/// Packages the tests need beyond the demo's: bpftool, promtool, Chromium and its WebDriver
/// (the console's browser tests), and the HTTPS listeners' clients no one here wrote: curl,
/// openssl, h2load (`nghttp2-client`) and Debian's WebSocket library for `/usr/bin/python3`.
const TEST_PACKAGES: &[&str] = &[
    "curl",
    "openssl",
    "nghttp2-client",
    "python3-websockets",
    "bpftool",
    "prometheus",
    "chromium",
    "chromium-driver",
];
/// Benchmark peers.
const BENCH_PACKAGES: &[&str] = &["nftables", "haproxy", "nginx", "libnginx-mod-stream"];
/// What building Katran (the full bench's same-run peer) needs: its recipe's clang and llc 22
/// (llc comes with LLVM 22, a build package) and libbpf for its harness.
const KATRAN_PACKAGES: &[&str] = &["clang-22", "libbpf-dev"];
/// bpf-linker release used (built against Debian's LLVM 22, matching rustc 1.98's LLVM).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What a task needs installed; each level includes the ones before it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Need {
    /// Building (and `run --iface`, lint, fuzz): the toolchain, LLVM, bpf-linker.
    Build,
    /// The demo in namespaces.
    Demo,
    /// The tests (and the quick bench): the clients, the browser, the peers of the smoke test.
    Test,
    /// The full bench: Katran's build tools too.
    BenchFull,
}

/// The Debian packages `need` installs.
fn packages(need: Need) -> Vec<&'static str> {
    let mut pkgs: Vec<&str> = BUILD_PACKAGES.to_vec();
    if need >= Need::Demo {
        pkgs.extend(DEMO_PACKAGES);
    }
    if need >= Need::Test {
        pkgs.extend(TEST_PACKAGES);
        pkgs.extend(BENCH_PACKAGES);
    }
    if need >= Need::BenchFull {
        pkgs.extend(KATRAN_PACKAGES);
    }
    pkgs
}

/// Installs what `need` asks for that is missing.
fn setup(root: &Path, verbose: bool, need: Need) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let tc = toolchain(root)?;
    let mut did = Vec::new();
    if verbose {
        println!("xtask setup: checking toolchain {tc}, bpf-linker, system packages");
    }
    // 1. The pinned toolchain with its own library source (for -Z build-std=core).
    let need_components = ["rust-src", "clippy", "rustfmt"];
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", &tc])
        .output();
    let have: Vec<String> = match &installed {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
        Ok(_) => Vec::new(),
        Err(e) => bail!("rustup is not available ({e}); clb builds with rustup's toolchain {tc}"),
    };
    let missing: Vec<&str> = need_components
        .iter()
        .copied()
        .filter(|c| {
            !have
                .iter()
                .any(|h| h.starts_with(&format!("{c}-")) || h == c)
        })
        .collect();
    if have.is_empty() || !missing.is_empty() {
        println!("xtask setup: installing Rust {tc} with rust-src, clippy, rustfmt");
        let mut cmd = Command::new("rustup");
        cmd.args([
            "toolchain",
            "install",
            &tc,
            "--profile",
            "minimal",
            "--component",
            "rust-src,clippy,rustfmt",
        ]);
        status(cmd).with_context(|| {
            format!("installing Rust {tc} failed: clb needs rustup's {tc} with rust-src (no other route is used)")
        })?;
        did.push(format!("rust {tc}"));
    }
    // 2. System packages.
    let missing: Vec<&str> = packages(need)
        .into_iter()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !missing.is_empty() {
        require_root(&format!("install {}", missing.join(" ")))?;
        if Command::new("apt-get").arg("--version").output().is_err() {
            bail!(
                "apt-get is not available; install these packages by hand: {}",
                missing.join(" ")
            );
        }
        println!("xtask setup: apt-get install {}", missing.join(" "));
        let mut up = Command::new("apt-get");
        up.args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        status(up).context("apt-get update")?;
        let mut inst = Command::new("apt-get");
        inst.args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        status(inst).with_context(|| format!("apt-get install {}", missing.join(" ")))?;
        did.push(format!("packages {}", missing.join(" ")));
    }
    // 3. bpf-linker, built against the LLVM of the pinned rustc.
    let llvm = rustc_llvm_major(&tc)?;
    if !bpf_linker_ok(llvm) {
        println!(
            "xtask setup: building bpf-linker {BPF_LINKER_VERSION} against Debian's LLVM {llvm} (a few minutes)"
        );
        let llvm_prefix = format!("/usr/lib/llvm-{llvm}");
        if !Path::new(&llvm_prefix).join("bin/llvm-config").exists() {
            bail!(
                "{llvm_prefix}/bin/llvm-config is missing: install llvm-{llvm}-dev (rustc {tc} uses LLVM {llvm})"
            );
        }
        let mut path = OsString::from(format!("{llvm_prefix}/bin:"));
        path.push(path_env());
        let mut cmd = Command::new("cargo");
        cmd.arg(format!("+{tc}"))
            .args([
                "install",
                "--force",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm}"),
            ])
            .env("PATH", path)
            .env("LLVM_PREFIX", &llvm_prefix)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO");
        status(cmd).context("building bpf-linker")?;
        did.push(format!("bpf-linker {BPF_LINKER_VERSION} (LLVM {llvm})"));
    }
    if verbose || !did.is_empty() {
        if did.is_empty() {
            println!(
                "xtask setup: everything present, nothing installed ({:.1} s)",
                t0.elapsed().as_secs_f64()
            );
        } else {
            println!(
                "xtask setup: installed {} in {:.1} s",
                did.join(", "),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("setup must run as root to {what} (try: sudo cargo xtask setup)");
    }
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
        .unwrap_or(false)
}

/// The LLVM major version of the pinned rustc (`rustc -vV`, line `LLVM version`).
fn rustc_llvm_major(tc: &str) -> anyhow::Result<u32> {
    let o = Command::new("rustc")
        .arg(format!("+{tc}"))
        .arg("-vV")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .context("running rustc -vV")?;
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("no LLVM version in rustc +{tc} -vV: {text}"))
}

/// Whether bpf-linker is installed and linked against LLVM `llvm` or newer.
fn bpf_linker_ok(llvm: u32) -> bool {
    let bin = cargo_home().join("bin/bpf-linker");
    if !bin.exists() {
        return false;
    }
    let Ok(o) = Command::new("ldd").arg(&bin).output() else {
        return false;
    };
    String::from_utf8_lossy(&o.stdout).lines().any(|l| {
        l.trim()
            .strip_prefix("libLLVM.so.")
            .or_else(|| l.trim().strip_prefix("libLLVM-"))
            .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|m| m.parse::<u32>().ok())
            .is_some_and(|m| m >= llvm)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Building (the documented install path, `cargo xtask build --release`) installs no
    /// browser, no Prometheus and no peer; the tests get all of them.
    #[test]
    fn building_installs_only_what_building_needs() {
        let build = packages(Need::Build);
        for p in TEST_PACKAGES
            .iter()
            .chain(DEMO_PACKAGES)
            .chain(BENCH_PACKAGES)
            .chain(KATRAN_PACKAGES)
        {
            assert!(!build.contains(p), "build installs {p}");
        }
        assert!(!packages(Need::Demo).contains(&"chromium"));
        let test = packages(Need::Test);
        for p in ["chromium", "prometheus", "bird2", "haproxy", "llvm-22-dev"] {
            assert!(test.contains(&p), "tests lack {p}");
        }
        assert!(!test.contains(&"clang-22"));
        assert!(packages(Need::BenchFull).contains(&"clang-22"));
    }
}
