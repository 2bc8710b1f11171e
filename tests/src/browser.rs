//! A real browser for the console tests: headless Chromium driven over WebDriver
//! (`chromedriver`, Debian `chromium-driver`) with fantoccini. The driver runs in a namespace
//! (so the browser reaches addresses there); the WebDriver client must then run on a thread in
//! the same namespace (see [`crate::netns::NetNs::run`]).

use std::{path::PathBuf, time::Duration};

use crate::{bench::Proc, netns::NetNs};

/// The WebDriver port inside the namespace.
pub const DRIVER_PORT: u16 = 9515;

/// A chromedriver in a namespace; stops (with its browsers) on drop.
pub struct Driver {
    proc: Option<Proc>,
    dir: PathBuf,
    ns: String,
}

impl Driver {
    /// Starts chromedriver in `ns`.
    pub fn start(ns: &NetNs) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(crate::netns::unique_name("chrome"));
        std::fs::create_dir_all(&dir)?;
        let proc = crate::bench::spawn_in(
            ns,
            &[
                "chromedriver",
                &format!("--port={DRIVER_PORT}"),
                "--allowed-ips=127.0.0.1",
            ],
            &dir.join("chromedriver.log"),
        )?;
        let d = Self {
            proc: Some(proc),
            dir,
            ns: ns.name().to_owned(),
        };
        let up = crate::wait_for(Duration::from_secs(10), || {
            ns.run(|| std::net::TcpStream::connect(("127.0.0.1", DRIVER_PORT)))
                .ok()
        });
        anyhow::ensure!(up.is_some(), "chromedriver did not start: {}", d.log());
        Ok(d)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("chromedriver.log")).unwrap_or_default()
    }

    /// A new browser session (its own profile: no cookies), headless. Call on a thread in the
    /// driver's namespace.
    pub async fn browser(&self) -> anyhow::Result<fantoccini::Client> {
        self.browser_with(&[]).await
    }

    /// [`Driver::browser`] with extra command-line switches (a host-resolver rule, a trusted
    /// test certificate).
    pub async fn browser_with(&self, extra: &[String]) -> anyhow::Result<fantoccini::Client> {
        let profile = self.dir.join(crate::netns::unique_name("profile"));
        let mut args: Vec<String> = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1400,1000",
        ]
        .map(String::from)
        .to_vec();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.extend_from_slice(extra);
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": args
            }),
        );
        let c = fantoccini::ClientBuilder::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
        )
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{DRIVER_PORT}"))
        .await?;
        Ok(c)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        drop(self.proc.take());
        // Browsers a failed test left open: chromedriver's children, in the namespace (found
        // by pid there and by name, so nothing else in it is touched).
        if let Ok(pids) = crate::netns::sh(&["ip", "netns", "pids", &self.ns]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.starts_with("chrom") {
                    // SAFETY: a signal to a browser process this driver started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}
