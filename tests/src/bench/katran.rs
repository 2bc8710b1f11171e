//! Katran, the reference XDP L4 balancer, as a same-run peer of the per-packet figures.
//!
//! `../shared/peers/katran` holds Katran's datapath source (`src/`, GPL-2.0, unchanged) and a
//! reference harness (`harness/`: Katran's own build recipe, `bpftool prog loadall ...
//! pinmaps`, provisioning of one VIP with three reals, the Maglev ring and the per-CPU LRU,
//! and timing through `BPF_PROG_TEST_RUN` with clb's method: repeat = 1 per run, XDP_PASS and
//! the path alternated round by round, medians, every verdict checked). The bench copies both
//! under `target/katran/` (the shared copy is read-only), builds the object with clang/llc 22
//! and runs the harness at the bench's own scale, right after clb's per-packet figures. No
//! download: without the source the peer is reported absent.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

/// Katran's figures, ns, with the XDP_PASS floor the harness measured beside each.
#[derive(Clone, Debug)]
pub struct Figures {
    pub established: f64,
    pub new_flow: f64,
    pub non_vip: f64,
    /// XDP_PASS as the harness measured it (median over the three paths' rounds).
    pub pass: f64,
}

/// The default source directory, if it is there: `../shared/peers/katran/src` beside the
/// repository.
pub fn default_src() -> Option<PathBuf> {
    let p = crate::releases::repo_root().join("../shared/peers/katran/src");
    p.join("katran/lib/bpf/balancer.bpf.c")
        .exists()
        .then(|| p.canonicalize().unwrap_or(p))
}

/// Builds Katran's object from `src` and times it at `rounds` × `runs` per round.
pub fn measure(src: &Path, rounds: usize, runs: usize) -> anyhow::Result<Figures> {
    let harness = src
        .parent()
        .map(|p| p.join("harness"))
        .filter(|h| h.join("bench.c").exists())
        .with_context(|| format!("no harness/ beside {}", src.display()))?;
    for tool in ["clang-22", "llc-22", "bpftool", "cc"] {
        ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is missing (cargo xtask setup --bench installs clang-22 and libbpf-dev)"
        );
    }
    let work = crate::releases::repo_root().join("target/katran");
    std::fs::remove_dir_all(&work).ok();
    std::fs::create_dir_all(&work)?;
    let st = Command::new("cp")
        .arg("-r")
        .arg(&harness)
        .arg(work.join("harness"))
        .status()?;
    ensure!(st.success(), "copying the Katran harness");
    // The copy keeps the read-only modes of the shared tree.
    Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(&work)
        .status()?;
    let h = work.join("harness");
    let out = Command::new("bash")
        .arg("build.sh")
        .current_dir(&h)
        .env("KATRAN_SRC", src)
        .output()
        .context("running the Katran harness's build.sh")?;
    if !out.status.success() {
        bail!(
            "building Katran failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pin = format!("/sys/fs/bpf/clb-bench-katran-{}", std::process::id());
    let out = Command::new("bash")
        .arg("run.sh")
        .args(["-r", &rounds.to_string(), "-n", &runs.to_string()])
        .current_dir(&h)
        .env("PIN", &pin)
        .output()
        .context("running the Katran harness")?;
    std::fs::remove_dir_all(&pin).ok();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "the Katran harness failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&text)
}

/// Parses the harness's three figure lines (`NAME  PATH ns   XDP_PASS PASS ns   ratio Rx`).
pub fn parse(text: &str) -> anyhow::Result<Figures> {
    let figure = |name: &str| -> anyhow::Result<(f64, f64)> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("the Katran harness printed no {name:?} line:\n{text}"))?;
        let f: Vec<&str> = line[name.len()..].split_whitespace().collect();
        match f[..] {
            [path, "ns", "XDP_PASS", pass, "ns", ..] => Ok((path.parse()?, pass.parse()?)),
            _ => bail!("unexpected Katran line {line:?}"),
        }
    };
    let (established, p1) = figure("established TCP flow (LRU hit)")?;
    let (new_flow, p2) = figure("new TCP flow (SYN, LRU miss)")?;
    let (non_vip, p3) = figure("non-VIP pass-through")?;
    let mut p = [p1, p2, p3];
    p.sort_by(f64::total_cmp);
    Ok(Figures {
        established,
        new_flow,
        non_vip,
        pass: p[1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_harness_output_parses() {
        let text = "kernel 6.18, 2 CPUs\n\
            established TCP flow (LRU hit)       117.2 ns   XDP_PASS   38.1 ns   ratio  3.07x\n\
            \x20 check: non-SYN LRU misses during it: 0 (must be 0)\n\
            new TCP flow (SYN, LRU miss)         580.0 ns   XDP_PASS   39.0 ns   ratio 14.70x\n\
            non-VIP pass-through                  67.5 ns   XDP_PASS   40.0 ns   ratio  1.69x\n";
        let f = parse(text).unwrap();
        assert_eq!(
            (f.established, f.new_flow, f.non_vip, f.pass),
            (117.2, 580.0, 67.5, 39.0)
        );
        assert!(parse("nothing").is_err());
    }

    #[test]
    #[ignore = "needs Katran's source, clang-22 and libbpf-dev (cargo xtask setup --bench), root"]
    fn katran_builds_and_is_timed_from_its_source() {
        let src = default_src().expect("../shared/peers/katran/src");
        let f = measure(&src, 3, 30).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            f.pass > 0.0 && f.established > f.pass && f.new_flow > f.established,
            "{f:?}"
        );
    }
}
