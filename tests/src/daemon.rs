//! The `clb` daemon and CLI as processes, for end-to-end tests and the demo.
//!
//! The daemon runs in the balancer namespace through `nsenter --net` (only the network
//! namespace changes), so its bpffs pins live in the host's mount namespace and survive a
//! restart, as they would on a real machine. Its pins, config, socket and log live in
//! directories unique to the test; all are removed, and the datapath torn down, on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use crate::{netns::Topology, wait_for};

/// The `clb` binary: `$CLB_BIN`, else next to the test executable's `deps/` directory.
pub fn clb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CLB_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join("clb");
    assert!(
        p.exists(),
        "{} not found: build it first (`cargo build -p clb-user`, done by `cargo xtask test`) or set CLB_BIN",
        p.display()
    );
    p
}

/// Output of one CLI call.
#[derive(Debug)]
pub struct CliOut {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for CliOut {
    fn from(o: Output) -> Self {
        Self {
            ok: o.status.success(),
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// A clb daemon in a topology's balancer namespace.
pub struct Daemon {
    child: Option<Child>,
    /// Config file, socket and log.
    pub dir: PathBuf,
    /// Pin directory.
    pub bpffs: PathBuf,
    pub api: PathBuf,
    pub config: PathBuf,
    netns_path: String,
    ifaces: String,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    /// RLIMIT_NOFILE (soft and hard) the daemon starts with, as `ulimit -n N` leaves it.
    nofile: Option<u64>,
    runs: u32,
    /// The `clb` binary this daemon runs and its CLI calls use: [`clb_bin`] unless set by
    /// [`Daemon::use_bin`] (an earlier release, for the upgrade tests).
    bin: Option<PathBuf>,
}

impl Daemon {
    /// Writes `config` (TOML) and starts the daemon on every balancer interface of `topo`.
    pub fn start(topo: &Topology, config: &str) -> Self {
        Self::start_with(topo, config, &[])
    }

    /// [`Daemon::start`] with extra daemon flags.
    pub fn start_with(topo: &Topology, config: &str, extra: &[&str]) -> Self {
        Self::start_on(&topo.lb, &topo.iface_list(), config, extra)
    }

    /// A daemon in namespace `ns` on interfaces `ifaces` (`a,b,...`), with extra flags.
    pub fn start_on(ns: &crate::netns::NetNs, ifaces: &str, config: &str, extra: &[&str]) -> Self {
        Self::start_env(ns, ifaces, config, extra, &[])
    }

    /// [`Daemon::start_on`] with extra environment variables.
    pub fn start_env(
        ns: &crate::netns::NetNs,
        ifaces: &str,
        config: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut d = Self::prepare(ns, ifaces, config, extra, env);
        d.spawn();
        d
    }

    /// The daemon's directory and config, not started yet.
    fn prepare(
        ns: &crate::netns::NetNs,
        ifaces: &str,
        config: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let name = crate::netns::unique_name("d");
        let dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&dir).expect("daemon dir");
        let cfg = dir.join("clb.toml");
        fs::write(&cfg, config).expect("writing config");
        Daemon {
            child: None,
            bpffs: PathBuf::from("/sys/fs/bpf").join(&name),
            api: dir.join("api.sock"),
            config: cfg,
            dir,
            netns_path: ns.path(),
            ifaces: ifaces.to_owned(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            nofile: None,
            runs: 0,
            bin: None,
        }
    }

    /// [`Daemon::start`] with the open-files limit (soft and hard) at `nofile`, as a shell's
    /// `ulimit -n` leaves it.
    pub fn start_nofile(topo: &Topology, config: &str, nofile: u64) -> Self {
        let mut d = Self::prepare(&topo.lb, &topo.iface_list(), config, &[], &[]);
        d.nofile = Some(nofile);
        d.spawn();
        d
    }

    /// A daemon like [`Daemon::start`] run by the binary `bin` (an earlier release).
    pub fn start_bin(topo: &Topology, config: &str, bin: &Path) -> Self {
        let mut d = Self::prepare(&topo.lb, &topo.iface_list(), config, &[], &[]);
        d.bin = Some(bin.to_owned());
        d.spawn();
        d
    }

    /// From the next [`Daemon::spawn`] on, runs `bin` (`None`: this build's [`clb_bin`]).
    pub fn use_bin(&mut self, bin: Option<&Path>) {
        self.bin = bin.map(Path::to_owned);
    }

    /// The binary this daemon runs.
    pub fn bin(&self) -> PathBuf {
        self.bin.clone().unwrap_or_else(clb_bin)
    }

    /// `nsenter --net=NS clb --api SOCKET daemon ...` with this daemon's binary, arguments and
    /// environment.
    fn command(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path))
            .arg(self.bin())
            .arg("--api")
            .arg(&self.api)
            .arg("daemon")
            .arg("--config")
            .arg(&self.config)
            .arg("--iface")
            .arg(&self.ifaces)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts (or restarts) the daemon process and waits until its API answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.runs += 1;
        let log =
            fs::File::create(self.dir.join(format!("daemon-{}.log", self.runs))).expect("log file");
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        if let Some(n) = self.nofile {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe; it only touches the child's limits.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd.spawn().expect("spawning the clb daemon");
        self.child = Some(child);
        let ready = wait_for(Duration::from_secs(20), || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("daemon exited ({st}) during start:\n{}", self.log());
            }
            self.clb(&["status"]).ok.then_some(())
        });
        if ready.is_none() {
            panic!("daemon API did not come up within 20 s:\n{}", self.log());
        }
    }

    /// Starts the daemon and kills it (`kill -9`) as soon as `now()` holds, polled every 5 ms
    /// for at most `timeout`. Returns whether it was killed (false: it came up, or exited, or
    /// `now` never held; it is stopped then too).
    pub fn spawn_and_kill_when(&mut self, timeout: Duration, now: impl Fn(&Self) -> bool) -> bool {
        assert!(self.child.is_none(), "daemon already running");
        self.runs += 1;
        let log =
            fs::File::create(self.dir.join(format!("daemon-{}.log", self.runs))).expect("log file");
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawning the clb daemon");
        let end = std::time::Instant::now() + timeout;
        let mut killed = false;
        while std::time::Instant::now() < end {
            if now(self) {
                killed = child.try_wait().ok().flatten().is_none();
                break;
            }
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().ok();
        child.wait().ok();
        killed
    }

    /// The daemon's pid (`nsenter` without `--fork` execs it in place), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Open file descriptors of the running daemon.
    pub fn open_fds(&self) -> usize {
        self.pid()
            .and_then(|p| fs::read_dir(format!("/proc/{p}/fd")).ok())
            .map_or(0, |d| d.count())
    }

    /// The daemon's log (all runs).
    pub fn log(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.runs {
            if let Ok(s) = fs::read_to_string(self.dir.join(format!("daemon-{i}.log"))) {
                out.push_str(&format!("--- run {i} ---\n{s}"));
            }
        }
        out
    }

    /// `kill -9`: the daemon dies without cleaning anything up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// SIGTERM and wait (at most 10 s, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let done = wait_for(Duration::from_secs(10), || c.try_wait().ok().flatten());
            if done.is_none() {
                c.kill().ok();
                c.wait().ok();
            }
        }
    }

    /// Runs `clb --api <socket> <args>`.
    pub fn clb(&self, args: &[&str]) -> CliOut {
        Command::new(self.bin())
            .arg("--api")
            .arg(&self.api)
            .args(args)
            .output()
            .expect("running clb")
            .into()
    }

    /// Runs the CLI and returns stdout; panics with stderr and the daemon log on failure.
    pub fn clb_ok(&self, args: &[&str]) -> String {
        let o = self.clb(args);
        assert!(o.ok, "clb {args:?} failed: {}\n{}", o.stderr, self.log());
        o.stdout
    }

    /// Runs the CLI with `--json` and parses the output.
    pub fn clb_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.clb_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("clb {a:?}: bad JSON ({e}): {out}"))
    }

    /// Runs another `clb daemon` in this daemon's namespace with `args` (after `daemon`),
    /// expecting it to exit (a refusal) within `timeout`; kills it and panics if it does not.
    pub fn run_other(&self, api: &Path, args: &[&str], timeout: Duration) -> CliOut {
        self.run_other_wrapped(&[], api, args, timeout)
    }

    /// [`Daemon::run_other`] with the command prefixed by `wrap` (e.g.
    /// [`crate::cgroup::MemCgroup::wrap`]).
    pub fn run_other_wrapped(
        &self,
        wrap: &[String],
        api: &Path,
        args: &[&str],
        timeout: Duration,
    ) -> CliOut {
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg("nsenter");
                c
            }
            None => Command::new("nsenter"),
        };
        let mut child = cmd
            .arg(format!("--net={}", self.netns_path))
            .arg(clb_bin())
            .arg("--api")
            .arg(api)
            .arg("daemon")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning a second daemon");
        let done = wait_for(timeout, || child.try_wait().ok().flatten());
        if done.is_none() {
            child.kill().ok();
            child.wait().ok();
            panic!("the other daemon {args:?} did not exit within {timeout:?}");
        }
        child.wait_with_output().expect("daemon output").into()
    }

    /// Starts this daemon's binary ([`Daemon::bin`]) with this daemon's arguments while it is
    /// stopped, expecting it to refuse (exit) within `timeout`; kills it and panics if not.
    pub fn run_refused(&self, timeout: Duration) -> CliOut {
        assert!(self.child.is_none(), "the daemon runs");
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the daemon");
        let done = wait_for(timeout, || child.try_wait().ok().flatten());
        if done.is_none() {
            child.kill().ok();
            child.wait().ok();
            panic!("{} did not exit within {timeout:?}", self.bin().display());
        }
        child.wait_with_output().expect("daemon output").into()
    }

    /// This daemon's `--iface` list.
    pub fn ifaces(&self) -> &str {
        &self.ifaces
    }

    /// The config file's current text.
    pub fn config_text(&self) -> String {
        fs::read_to_string(&self.config).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("daemon log:\n{}", self.log());
        }
        self.stop();
        if self.bpffs.exists() {
            let out = Command::new(clb_bin())
                .arg("teardown")
                .arg("--bpffs")
                .arg(&self.bpffs)
                .output();
            if let Ok(o) = out
                && !o.status.success()
            {
                eprintln!("warning: teardown: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
        fs::remove_dir_all(&self.dir).ok();
    }
}

/// A config file with one listener `name` on `vip` (protocol `proto`) over backends
/// `backend_ip(0..n):port`. `extra` is TOML added to the listener's table: settings, then
/// optionally a `[listener.health_check]` table.
pub fn one_listener_config(
    name: &str,
    vip: std::net::SocketAddrV4,
    proto: &str,
    n: usize,
    port: u16,
    extra: &str,
) -> String {
    let mut s =
        format!("[[listener]]\nname = \"{name}\"\nvip = \"{vip}\"\nproto = \"{proto}\"\n{extra}\n");
    for i in 0..n {
        s += &format!(
            "[[listener.backend]]\naddr = \"{}:{port}\"\n",
            crate::netns::backend_ip(i)
        );
    }
    s
}
