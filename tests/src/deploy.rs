//! The README's "Deploying on real NICs" topologies, built from links and addresses alone —
//! no route, sysctl or VIP that the README does not set itself — and the README's command
//! blocks, read from README.md and run line by line on the router, every backend and clb.
//!
//! ```text
//! two-armed NAT:
//!  client eth0 203.0.113.10 ── eth0 203.0.113.1 router eth1 192.0.2.1 ── eth0 192.0.2.10 clb
//!  clb eth1 10.0.10.1 ── switch (br0) ── eth0 10.0.10.<2+j> backend j   (+ 2001:db8:… beside)
//! one-armed DSR:
//!  client eth0 203.0.113.10 ── eth0 203.0.113.1 router eth1 198.51.100.1 ── switch (br0)
//!  switch ── eth0 198.51.100.10 clb, eth0 198.51.100.<11+j> backend j
//! ```
//!
//! What the harness adds beyond the README is what a real network already has: the client's
//! own addresses and default route, forwarding on the router, and the veth specifics (checksum
//! offload off; GRO on the peers of clb's interfaces, so that frames its XDP program sends on
//! are delivered).

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context as _, bail};

use crate::{
    daemon::Daemon,
    fleet::veth,
    netns::{NetNs, add_host_addrs},
};

/// The client's address on its side of the router.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The client's IPv6 address.
pub const CLIENT6: &str = "2001:db8:c::10";

/// Extra client address `n` (0-based), on the client's link.
pub fn extra_client(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 20 + n as u8)
}

/// The commands of one README block, by where they run.
#[derive(Debug, Default, Clone)]
pub struct Steps {
    pub router: Vec<String>,
    pub backend: Vec<String>,
    pub clb: Vec<String>,
}

/// The `sh` blocks of README.md's "Deploying on real NICs" section, in order.
pub fn readme_blocks() -> anyhow::Result<Vec<Steps>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let start = text
        .find("\n## Deploying on real NICs\n")
        .context("README.md has no \"Deploying on real NICs\" section")?;
    let rest = &text[start + 1..];
    let section = &rest[..rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3)];
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(l) = lines.next() {
        if l.trim() != "```sh" {
            continue;
        }
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        blocks.push(parse_block(&body)?);
    }
    Ok(blocks)
}

fn parse_block(lines: &[&str]) -> anyhow::Result<Steps> {
    let mut s = Steps::default();
    let mut at: Option<&mut Vec<String>> = None;
    for l in lines {
        let l = l.trim();
        if let Some(c) = l.strip_prefix('#') {
            let c = c.trim();
            if c.starts_with("on the router") {
                at = Some(&mut s.router);
            } else if c.starts_with("on each backend") {
                at = Some(&mut s.backend);
            } else if c.starts_with("on clb") {
                at = Some(&mut s.clb);
            }
            continue;
        }
        if l.is_empty() {
            continue;
        }
        match at.as_mut() {
            Some(v) => v.push(l.to_owned()),
            None => bail!("README command {l:?} comes before any '# on …' heading"),
        }
    }
    Ok(s)
}

/// Words of a command line: blanks separate, single quotes group (as `sh` reads these lines).
pub fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut cur, mut quoted, mut any) = (String::new(), false, false);
    for ch in line.chars() {
        match ch {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// A deployment topology; namespaces go on drop.
pub struct Site {
    pub client: NetNs,
    pub router: NetNs,
    pub switch: NetNs,
    pub clb: NetNs,
    pub backends: Vec<NetNs>,
    pub extra_clients: Vec<Ipv4Addr>,
}

impl Site {
    fn new(tag: &str, backends: usize, extra_clients: usize) -> anyhow::Result<Self> {
        Ok(Site {
            client: NetNs::new(&format!("{tag}c"))?,
            router: NetNs::new(&format!("{tag}r"))?,
            switch: NetNs::new(&format!("{tag}s"))?,
            clb: NetNs::new(&format!("{tag}l"))?,
            backends: (0..backends)
                .map(|j| NetNs::new(&format!("{tag}b{j}")))
                .collect::<Result<_, _>>()?,
            extra_clients: (0..extra_clients).map(extra_client).collect(),
        })
    }

    /// Two-armed NAT: clb between the router (eth0) and the backends' segment (eth1).
    pub fn two_armed(tag: &str, backends: usize, extra_clients: usize) -> anyhow::Result<Self> {
        let s = Self::new(tag, backends, extra_clients)?;
        s.client_side()?;
        veth(&s.router, "eth1", &s.clb, "eth0")?;
        veth(&s.clb, "eth1", &s.switch, "lb")?;
        s.bridge()?;
        addrs(&s.router, "eth1", &["192.0.2.1/24", "2001:db8:f::1/64"])?;
        addrs(&s.clb, "eth0", &["192.0.2.10/24", "2001:db8:f::10/64"])?;
        addrs(&s.clb, "eth1", &["10.0.10.1/24", "2001:db8:10::1/64"])?;
        for (j, b) in s.backends.iter().enumerate() {
            s.port(b, j)?;
            addrs(
                b,
                "eth0",
                &[
                    &format!("10.0.10.{}/24", 2 + j),
                    &format!("2001:db8:10::{:x}/64", 2 + j),
                ],
            )?;
        }
        // clb's XDP program sends frames on out of eth0 and eth1: their peers need GRO.
        s.router.exec(&["ethtool", "-K", "eth1", "gro", "on"])?;
        s.switch.exec(&["ethtool", "-K", "lb", "gro", "on"])?;
        s.up()?;
        Ok(s)
    }

    /// One-armed DSR: clb, the backends and the router on one segment.
    pub fn one_armed(tag: &str, backends: usize, extra_clients: usize) -> anyhow::Result<Self> {
        let s = Self::new(tag, backends, extra_clients)?;
        s.client_side()?;
        veth(&s.router, "eth1", &s.switch, "r")?;
        veth(&s.clb, "eth0", &s.switch, "lb")?;
        s.bridge()?;
        s.switch.ip(&["link", "set", "r", "master", "br0", "up"])?;
        addrs(&s.router, "eth1", &["198.51.100.1/24"])?;
        addrs(&s.clb, "eth0", &["198.51.100.10/24"])?;
        for (j, b) in s.backends.iter().enumerate() {
            s.port(b, j)?;
            addrs(b, "eth0", &[&format!("198.51.100.{}/24", 11 + j)])?;
        }
        // clb's XDP program sends frames back out of eth0: its peer needs GRO.
        s.switch.exec(&["ethtool", "-K", "lb", "gro", "on"])?;
        s.up()?;
        Ok(s)
    }

    /// The client and its router, as any network has them.
    fn client_side(&self) -> anyhow::Result<()> {
        let (c, r) = (&self.client, &self.router);
        veth(c, "eth0", r, "eth0")?;
        addrs(
            c,
            "eth0",
            &[&format!("{CLIENT}/24"), &format!("{CLIENT6}/64")],
        )?;
        addrs(r, "eth0", &["203.0.113.1/24", "2001:db8:c::1/64"])?;
        r.sysctl("net.ipv4.ip_forward=1")?;
        r.sysctl("net.ipv6.conf.all.forwarding=1")?;
        add_host_addrs(c, "eth0", &self.extra_clients)?;
        Ok(())
    }

    fn bridge(&self) -> anyhow::Result<()> {
        let s = &self.switch;
        s.ip(&["link", "add", "br0", "type", "bridge"])?;
        s.ip(&["link", "set", "br0", "up"])?;
        s.ip(&["link", "set", "lb", "master", "br0", "up"])?;
        Ok(())
    }

    /// Backend `j`'s eth0 on the switch.
    fn port(&self, b: &NetNs, j: usize) -> anyhow::Result<()> {
        let port = format!("b{j}");
        veth(b, "eth0", &self.switch, &port)?;
        self.switch
            .ip(&["link", "set", &port, "master", "br0", "up"])?;
        Ok(())
    }

    fn up(&self) -> anyhow::Result<()> {
        for ns in [&self.client, &self.router, &self.clb]
            .into_iter()
            .chain(&self.backends)
        {
            for dev in ["eth0", "eth1"] {
                if ns.ip(&["link", "show", dev]).is_ok() {
                    ns.ip(&["link", "set", dev, "up"])?;
                    ns.exec(&["ethtool", "-K", dev, "tx", "off"])?;
                }
            }
        }
        // The default route the client has anyway.
        self.client
            .ip(&["route", "add", "default", "via", "203.0.113.1"])?;
        self.client
            .ip(&["-6", "route", "add", "default", "via", "2001:db8:c::1"])?;
        Ok(())
    }

    /// Runs `steps` as the README writes them: the router's lines, then every backend's, then
    /// clb's (`clb daemon …` started as a [`Daemon`] in clb's namespace with the flags as
    /// written, apart from `--config`: the harness gives each daemon its own file; every other
    /// `clb …` through that daemon's CLI). Returns the daemon.
    pub fn run(&self, steps: &Steps) -> anyhow::Result<Daemon> {
        for l in &steps.router {
            sh_in(&self.router, l)?;
        }
        for b in &self.backends {
            for l in &steps.backend {
                sh_in(b, l)?;
            }
        }
        let mut daemon: Option<Daemon> = None;
        for l in &steps.clb {
            let w = words(l);
            match (w.first().map(String::as_str), w.get(1).map(String::as_str)) {
                (Some("clb"), Some("daemon")) => {
                    let (ifaces, extra) = daemon_flags(&w[2..])?;
                    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                    daemon = Some(Daemon::start_on(&self.clb, &ifaces, "", &extra));
                }
                (Some("clb"), _) => {
                    let d = daemon
                        .as_ref()
                        .with_context(|| format!("{l:?} before `clb daemon`"))?;
                    let args: Vec<&str> = w[1..].iter().map(String::as_str).collect();
                    let o = d.clb(&args);
                    if !o.ok {
                        bail!("README line {l:?} failed: {}\n{}", o.stderr, d.log());
                    }
                }
                _ => sh_in(&self.clb, l)?,
            }
        }
        daemon.context("the README block starts no `clb daemon`")
    }

    /// Every address a client may send from.
    pub fn clients(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(IpAddr::V4(CLIENT)).chain(self.extra_clients.iter().map(|&a| a.into()))
    }
}

/// `--iface`'s value and the other flags of a README `clb daemon` line (without `--config
/// FILE` and a trailing `&`).
fn daemon_flags(args: &[String]) -> anyhow::Result<(String, Vec<String>)> {
    let (mut ifaces, mut extra) = (None, Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--iface" => ifaces = it.next().cloned(),
            "--config" => {
                it.next();
            }
            "&" => {}
            _ => extra.push(a.clone()),
        }
    }
    Ok((ifaces.context("`clb daemon` without --iface")?, extra))
}

fn addrs(ns: &NetNs, dev: &str, list: &[&str]) -> anyhow::Result<()> {
    for a in list {
        let mut args = vec!["addr", "add", a, "dev", dev];
        if a.contains(':') {
            args.push("nodad");
        }
        ns.ip(&args)?;
    }
    Ok(())
}

fn sh_in(ns: &NetNs, line: &str) -> anyhow::Result<()> {
    ns.exec(&["sh", "-c", line])
        .with_context(|| format!("README line {line:?} in {}", ns.name()))
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_group_single_quotes() {
        assert_eq!(
            words("clb backend add web6 '[2001:db8:10::2]:8080' x"),
            [
                "clb",
                "backend",
                "add",
                "web6",
                "[2001:db8:10::2]:8080",
                "x"
            ]
        );
    }

    #[test]
    fn the_readme_has_both_topologies_with_every_part() {
        let b = readme_blocks().unwrap();
        assert_eq!(b.len(), 2, "{b:#?}");
        for s in &b {
            assert!(!s.router.is_empty() && !s.backend.is_empty(), "{s:#?}");
            assert!(s.clb.iter().any(|l| l.starts_with("clb daemon")), "{s:#?}");
        }
    }
}
