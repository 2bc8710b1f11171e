//! Earlier releases of clb, built from the repository's own history for the upgrade tests.
//!
//! `RELEASES` (the repository's top) names each landed release and its commit. A release's
//! `clb` binary is built once, from a git worktree of that commit, and cached with its own
//! cargo target directory under `target/releases/NAME/` (a debug build of `clb-user` only,
//! the eBPF object included: what the old side of an upgrade needs, about 3.5 minutes on two
//! cores the first time).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// One landed release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// `vMAJOR.MINOR.PATCH`.
    pub name: String,
    /// Full commit id.
    pub commit: String,
}

/// The workspace root (the repository).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Parses the text of `RELEASES`: `NAME COMMIT DATE` lines, `#` comments, oldest first.
pub fn parse(text: &str) -> anyhow::Result<Vec<Release>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [name, commit, _date] = f[..] else {
            bail!(
                "RELEASES line {}: want NAME COMMIT DATE, got {line:?}",
                i + 1
            );
        };
        if !name.starts_with('v')
            || commit.len() != 40
            || !commit.bytes().all(|b| b.is_ascii_hexdigit())
        {
            bail!("RELEASES line {}: bad name or commit id in {line:?}", i + 1);
        }
        out.push(Release {
            name: name.to_owned(),
            commit: commit.to_owned(),
        });
    }
    if out.is_empty() {
        bail!("RELEASES names no release");
    }
    Ok(out)
}

/// The releases `RELEASES` names, oldest first.
pub fn releases() -> Vec<Release> {
    let p = repo_root().join("RELEASES");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    parse(&text).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The release named `name`.
pub fn release(name: &str) -> Release {
    releases()
        .into_iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("RELEASES names no {name}"))
}

/// The `clb` binary of `r`, built (once) from its commit.
pub fn clb_of(r: &Release) -> anyhow::Result<PathBuf> {
    let root = repo_root();
    let dir = root.join("target/releases").join(&r.name);
    let bin = dir.join("clb");
    let stamp = dir.join("commit");
    if bin.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == r.commit) {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("src");
    let git = |args: &[&str]| -> anyhow::Result<String> {
        let o = Command::new("git")
            .current_dir(&root)
            .args(args)
            .output()
            .context("running git")?;
        if !o.status.success() {
            bail!(
                "git {args:?}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    git(&["cat-file", "-e", &format!("{}^{{commit}}", r.commit)]).with_context(|| {
        format!(
            "{} ({}) is not in this repository's history (a shallow clone?)",
            r.name, r.commit
        )
    })?;
    // A worktree from an earlier run whose target/ was removed is pruned first.
    git(&["worktree", "prune"])?;
    let src_ok = src.join("Cargo.toml").exists()
        && Command::new("git")
            .current_dir(&src)
            .args(["rev-parse", "HEAD"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == r.commit);
    if !src_ok {
        if src.exists() {
            git(&["worktree", "remove", "--force", &src.to_string_lossy()]).ok();
            std::fs::remove_dir_all(&src).ok();
        }
        git(&[
            "worktree",
            "add",
            "--detach",
            &src.to_string_lossy(),
            &r.commit,
        ])?;
    }
    let tc = std::fs::read_to_string(src.join("PINNED_TOOLCHAIN"))
        .context("the release's PINNED_TOOLCHAIN")?
        .trim()
        .to_owned();
    let log_path = dir.join("build.log");
    let log = std::fs::File::create(&log_path)?;
    eprintln!(
        "building clb {} ({}) for the upgrade test; log in {}",
        r.name,
        &r.commit[..12],
        log_path.display()
    );
    let t0 = std::time::Instant::now();
    let mut cmd = Command::new("cargo");
    // The outer cargo's environment (this test runs under it) must not leak into the build.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if (k.starts_with("CARGO") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k == "RUSTDOC"
            || k == "RUSTUP_TOOLCHAIN"
            || k == "RUSTFLAGS"
        {
            cmd.env_remove(&*k);
        }
    }
    let st = cmd
        .arg(format!("+{tc}"))
        .args(["build", "--locked", "-p", "clb-user", "--bin", "clb"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running cargo")?;
    if !st.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        bail!(
            "building clb {} failed ({st}):\n{}",
            r.name,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    std::fs::copy(dir.join("target/debug/clb"), &bin)?;
    std::fs::write(&stamp, &r.commit)?;
    eprintln!(
        "built clb {} in {:.0} s",
        r.name,
        t0.elapsed().as_secs_f64()
    );
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_releases_file_parses_and_names_commits_in_order() {
        let r = releases();
        assert!(r.len() >= 3);
        assert_eq!(r[0].name, "v0.1.0");
        let bad = parse("v0.4.0 abc 2026-12-03\n");
        assert!(bad.is_err());
        assert!(parse("# nothing\n").is_err());
    }

    /// `v1.2.3` → (1, 2, 3).
    fn version(name: &str) -> (u32, u32, u32) {
        let v: Vec<u32> = name[1..].split('.').map(|p| p.parse().unwrap()).collect();
        (v[0], v[1], v[2])
    }

    #[test]
    fn every_table_of_every_release_is_in_the_registry_with_the_release_that_introduced_it() {
        let root = repo_root();
        let mut seen = std::collections::BTreeMap::new();
        for r in releases() {
            let o = Command::new("git")
                .current_dir(&root)
                .args(["show", &format!("{}:clb-common/src/lib.rs", r.commit)])
                .output()
                .expect("git show");
            assert!(o.status.success(), "{} not in this clone's history", r.name);
            let text = String::from_utf8_lossy(&o.stdout);
            for part in text
                .split("\"CLB_")
                .skip(1)
                .filter_map(|t| t.split('"').next())
                .map(|t| format!("CLB_{t}"))
            {
                let part = part.as_str();
                let is_pin = part.starts_with("CLB_")
                    && clb_common::layouts::split_version(part).is_some()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
                if is_pin {
                    seen.entry(part.to_owned()).or_insert(r.name.clone());
                }
            }
        }
        assert!(seen.contains_key("CLB_CONN_V1"));
        for (pin, first) in &seen {
            let l = clb_common::layouts::layout(pin)
                .unwrap_or_else(|| panic!("{pin} (from {first}) is not in the registry"));
            assert_eq!(l.since, first, "{pin}: first released in {first}");
        }
        for l in clb_common::layouts::LAYOUTS {
            if !seen.contains_key(l.pin) {
                assert_eq!(l.since, clb_common::layouts::THIS_RELEASE, "{}", l.pin);
                assert!(
                    version(l.since) > version(&releases().last().unwrap().name),
                    "{}",
                    l.pin
                );
            }
        }
    }
}
