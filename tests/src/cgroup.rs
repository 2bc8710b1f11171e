//! A memory cgroup for one test, under the test process's own (cgroup v1 `memory` or v2):
//! processes started through [`MemCgroup::wrap`] run with their memory — BPF maps included,
//! which the kernel charges to the creating process's cgroup — limited.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

/// A memory cgroup, removed on drop (once its processes have exited).
pub struct MemCgroup {
    dir: PathBuf,
    v2: bool,
}

/// Our own memory cgroup's directory and whether it is cgroup v2.
fn own() -> anyhow::Result<(PathBuf, bool)> {
    let me = std::fs::read_to_string("/proc/self/cgroup")?;
    for line in me.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        if ctrls.split(',').any(|c| c == "memory") {
            let d = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
            if d.join("memory.limit_in_bytes").exists() {
                return Ok((d, false));
            }
        }
    }
    for line in me.lines() {
        if let Some(path) = line.strip_prefix("0::") {
            let d = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
            let ctl = std::fs::read_to_string(d.join("cgroup.subtree_control")).unwrap_or_default();
            if ctl.split_whitespace().any(|c| c == "memory") {
                return Ok((d, true));
            }
        }
    }
    anyhow::bail!(
        "no memory cgroup controller for this process (cgroup v1 `memory` or v2 with memory delegated); the test needs one to make the kernel refuse memory"
    )
}

impl MemCgroup {
    /// A new cgroup limited to `bytes`.
    pub fn new(bytes: u64) -> anyhow::Result<Self> {
        let (parent, v2) = own()?;
        let dir = parent.join(crate::netns::unique_name("mem"));
        std::fs::create_dir(&dir)?;
        let cg = Self { dir, v2 };
        let file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::write(cg.dir.join(file), bytes.to_string())?;
        Ok(cg)
    }

    /// A command prefix that moves the process into this cgroup and then runs the rest of the
    /// command line: `sh -c 'echo $$ > …/cgroup.procs && exec "$@"' sh`.
    pub fn wrap(&self) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            format!(
                "echo $$ > '{}' && exec \"$@\"",
                self.dir.join("cgroup.procs").display()
            ),
            "sh".into(),
        ]
    }

    pub fn is_v2(&self) -> bool {
        self.v2
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // The processes are gone; their exit may take a moment to leave the cgroup.
        let gone = crate::wait_for(Duration::from_secs(5), || {
            std::fs::remove_dir(&self.dir).ok()
        });
        if gone.is_none() {
            eprintln!("warning: could not remove cgroup {}", self.dir.display());
        }
    }
}
