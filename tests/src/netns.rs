//! Network namespaces for tests: RAII namespaces with unique names, a topology builder
//! (client, balancer, backends on veth pairs), and running code inside a namespace.
//!
//! Everything created here is removed on drop, including when a test panics. Namespace names
//! carry the process id and a counter, so tests never collide with each other or with
//! another run.

use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs a command, failing with its stderr if it fails.
pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Feeds `ip -batch -` (one `ip` subcommand per line), for setting up many addresses fast.
pub fn ip_batch(ns: Option<&str>, lines: &[String]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("spawning ip -batch")?;
    {
        let mut stdin = child.stdin.take().context("ip stdin")?;
        for l in lines {
            writeln!(stdin, "{l}")?;
        }
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -batch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Adds each of `addrs` as a /32 on `dev` in `ns` (one `ip -batch`; none: nothing).
pub fn add_host_addrs(ns: &NetNs, dev: &str, addrs: &[Ipv4Addr]) -> anyhow::Result<()> {
    if addrs.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = addrs
        .iter()
        .map(|a| format!("addr add {a}/32 dev {dev}"))
        .collect();
    ip_batch(Some(ns.name()), &lines)
}

/// A unique name: `clb-<tag>-<pid>-<n>`, within the 15 characters an interface name allows
/// when `tag` is short (namespaces have no such limit, but short names read better).
pub fn unique_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("clb-{tag}-{}-{n}", std::process::id())
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace named uniquely after `tag`, with loopback up.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let name = unique_name(tag);
        sh(&["ip", "netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `nsenter --net=`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut v = vec!["ip", "-n", self.name.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// `ip netns exec <ns> <args>` (for tools without a namespace option: sysctl, ethtool).
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut v = vec!["ip", "netns", "exec", self.name.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key_value: &str) -> anyhow::Result<()> {
        self.exec(&["sysctl", "-q", "-w", key_value]).map(drop)
    }

    /// Runs `f` on a thread that has entered this namespace; sockets `f` creates belong to
    /// the namespace and can be used from any thread afterwards.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = self.path();
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                enter(&path).unwrap_or_else(|e| panic!("entering {path}: {e:#}"));
                f()
            });
            match h.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    /// The MAC address of `dev` in this namespace.
    pub fn mac(&self, dev: &str) -> anyhow::Result<[u8; 6]> {
        let out = self.ip(&["-br", "link", "show", "dev", dev])?;
        let mac = out
            .split_whitespace()
            .nth(2)
            .with_context(|| format!("no MAC in {out:?}"))?;
        parse_mac(mac)
    }

    /// The ifindex of `dev` in this namespace.
    pub fn ifindex(&self, dev: &str) -> anyhow::Result<u32> {
        let out = self.ip(&["-o", "link", "show", "dev", dev])?;
        let idx = out.split(':').next().context("ip link output")?;
        Ok(idx.trim().parse()?)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = sh(&["ip", "netns", "del", &self.name]) {
            eprintln!("warning: deleting namespace {}: {e:#}", self.name);
        }
    }
}

/// Loads the object with tiny maps and attaches its pass program to `dev` (native mode) in
/// the calling thread's namespace. Frames the balancer sends into this veth in native mode
/// (redirect, XDP_TX) are only delivered if its peer runs an XDP program.
pub fn attach_pass(dev: &str) -> anyhow::Result<clb::datapath::loader::Loaded> {
    let mut l = clb::datapath::loader::load_small()?;
    clb::datapath::loader::attach(
        &mut l.ebpf,
        clb_common::PASS_PROGRAM,
        dev,
        clb::datapath::loader::AttachMode::Native,
        None,
    )?;
    Ok(l)
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &str) -> anyhow::Result<()> {
    let f = File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a valid namespace fd; only this thread's namespace changes.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s:?}"))?;
    v.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s:?}"))
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The demo/test topology:
///
/// ```text
///  client ns                balancer ns                     backend ns i
///  eth0 10.0.1.2/24 ── c0 10.0.1.1/24    b<i> 10.0.<10+i>.1/24 ── eth0 10.0.<10+i>.2/24
///       fd00:1::2/64      fd00:1::1/64        fd00:<10+i>::1/64       fd00:<10+i>::2/64
///  + extra clients 10.2.x.y/32           VIP 10.0.0.100/32, fd00::100/128 on lo
///    (fd00:2::/64 routed to the client)
/// ```
///
/// Every link is dual-stack (IPv6 addresses without duplicate address detection, so they
/// work at once; IPv6 forwarding on in the balancer).
/// The balancer forwards (ip_forward=1) and has permanent neighbour entries for the client
/// and the backends, so XDP's FIB lookup succeeds from the first packet. Every veth sends with
/// checksum offload off (`tx off`): in native XDP a CHECKSUM_PARTIAL packet's partial state
/// is lost in the XDP frame.
pub struct Topology {
    /// The pass programs on the client's and backends' eth0 (see `peer_namespaces`); first,
    /// so they are detached before the namespaces go.
    _peer_programs: Vec<clb::datapath::loader::Loaded>,
    pub client: NetNs,
    pub lb: NetNs,
    pub backends: Vec<NetNs>,
    /// A second client-side link, for flood traffic (see [`Topology::with_attacker`]).
    pub attacker: Option<NetNs>,
    /// The balancer's interfaces: `c0` (client side), then `b0`, `b1`, ...
    pub lb_ifaces: Vec<String>,
    /// Extra client source addresses on the client's eth0.
    pub extra_clients: Vec<Ipv4Addr>,
}

/// The VIP of the topology.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
/// The IPv6 VIP of the topology.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
/// The client's main IPv6 address.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);

/// IPv6 address of backend `i`.
pub fn backend_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10 + i as u16, 0, 0, 0, 0, 0, 2)
}

/// An extra IPv6 client address `fd00:2::n` (add it to the client's eth0 first, with
/// `nodad`); routed to the client by the balancer.
pub fn extra_client_ip6(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, n)
}
/// The client's main address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// The balancer's address on the client side.
pub const LB_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);

/// Address of backend `i`.
pub fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 10 + i as u8, 2)
}

/// The `n`th extra client address (10.2.0.1, 10.2.0.2, ...; up to 65 000).
pub fn extra_client_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 2, (n / 250) as u8, (n % 250) as u8 + 1)
}

impl Topology {
    /// Builds the topology with `backends` backend namespaces and `extra_clients` extra
    /// client addresses. `tag` names the namespaces (keep it short).
    pub fn new(tag: &str, backends: usize, extra_clients: usize) -> anyhow::Result<Self> {
        Self::build(tag, backends, extra_clients, true, false)
    }

    /// [`Topology::new`] plus an attacker namespace on its own link to the balancer
    /// (`eth0` 10.0.2.2/24 ↔ `a0` 10.0.2.1/24; 100.64.0.0/10, the spoofed sources, routed
    /// there): flood traffic and its answers do not share the real clients' link, as on a
    /// real NIC with its own queues and rings they would not compete for one 256-slot ring.
    pub fn with_attacker(tag: &str, backends: usize, extra_clients: usize) -> anyhow::Result<Self> {
        Self::build(tag, backends, extra_clients, true, true)
    }

    /// [`Topology::new`] without the pass programs on the client's and backends' eth0, for
    /// callers that attach their own (the benchmarks' sinks).
    pub fn bare(tag: &str, backends: usize, extra_clients: usize) -> anyhow::Result<Self> {
        Self::build(tag, backends, extra_clients, false, false)
    }

    fn build(
        tag: &str,
        backends: usize,
        extra_clients: usize,
        peer_programs: bool,
        attacker: bool,
    ) -> anyhow::Result<Self> {
        let client = NetNs::new(&format!("{tag}c"))?;
        let lb = NetNs::new(&format!("{tag}l"))?;
        let mut bns = Vec::new();
        for i in 0..backends {
            bns.push(NetNs::new(&format!("{tag}b{i}"))?);
        }
        let attacker = if attacker {
            Some(NetNs::new(&format!("{tag}a"))?)
        } else {
            None
        };
        let mut topo = Topology {
            _peer_programs: Vec::new(),
            client,
            lb,
            backends: bns,
            attacker,
            lb_ifaces: Vec::new(),
            extra_clients: (0..extra_clients).map(extra_client_ip).collect(),
        };
        topo.wire().context("building the topology")?;
        if peer_programs {
            let mut progs = Vec::new();
            for ns in topo.peer_namespaces() {
                progs.push(ns.run(|| attach_pass("eth0"))?);
            }
            topo._peer_programs = progs;
        }
        Ok(topo)
    }

    fn wire(&mut self) -> anyhow::Result<()> {
        let lb = self.lb.name().to_owned();
        let c = self.client.name().to_owned();
        sh(&[
            "ip", "link", "add", "eth0", "netns", &c, "type", "veth", "peer", "name", "c0",
            "netns", &lb,
        ])?;
        self.lb_ifaces.push("c0".into());
        self.client
            .ip(&["addr", "add", "10.0.1.2/24", "dev", "eth0"])?;
        self.lb.ip(&["addr", "add", "10.0.1.1/24", "dev", "c0"])?;
        self.client
            .ip(&["addr", "add", "fd00:1::2/64", "dev", "eth0", "nodad"])?;
        self.lb
            .ip(&["addr", "add", "fd00:1::1/64", "dev", "c0", "nodad"])?;
        for i in 0..self.backends.len() {
            self.wire_backend(i)?;
            self.lb_ifaces.push(format!("b{i}"));
        }
        if let Some(a) = &self.attacker {
            sh(&[
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                a.name(),
                "type",
                "veth",
                "peer",
                "name",
                "a0",
                "netns",
                &lb,
            ])?;
            a.ip(&["addr", "add", "10.0.2.2/24", "dev", "eth0"])?;
            self.lb.ip(&["addr", "add", "10.0.2.1/24", "dev", "a0"])?;
            self.lb_ifaces.push("a0".into());
        }
        for ns in std::iter::once(&self.client).chain(self.attacker.iter()) {
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
        }
        for dev in self.lb_ifaces.iter().filter(|d| !d.starts_with('b')) {
            self.lb.ip(&["link", "set", dev, "up"])?;
            self.lb.exec(&["ethtool", "-K", dev, "tx", "off"])?;
        }
        self.client
            .ip(&["route", "add", "default", "via", "10.0.1.1"])?;
        self.client
            .ip(&["-6", "route", "add", "default", "via", "fd00:1::1"])?;
        self.lb
            .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        self.lb
            .ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])?;
        self.lb.sysctl("net.ipv4.ip_forward=1")?;
        self.lb.sysctl("net.ipv6.conf.all.forwarding=1")?;
        self.lb
            .ip(&["route", "add", "10.2.0.0/16", "via", "10.0.1.2"])?;
        self.lb
            .ip(&["-6", "route", "add", "fd00:2::/64", "via", "fd00:1::2"])?;
        if let Some(a) = &self.attacker {
            a.ip(&["route", "add", "default", "via", "10.0.2.1"])?;
            self.lb
                .ip(&["route", "add", "100.64.0.0/10", "via", "10.0.2.2"])?;
            let amac = fmt_mac(a.mac("eth0")?);
            self.lb.ip(&[
                "neigh",
                "replace",
                "10.0.2.2",
                "lladdr",
                &amac,
                "dev",
                "a0",
                "nud",
                "permanent",
            ])?;
        }
        add_host_addrs(&self.client, "eth0", &self.extra_clients)?;
        // Permanent neighbours on the balancer: XDP's FIB lookup needs them.
        let cmac = fmt_mac(self.client.mac("eth0")?);
        self.lb.ip(&[
            "neigh",
            "replace",
            "10.0.1.2",
            "lladdr",
            &cmac,
            "dev",
            "c0",
            "nud",
            "permanent",
        ])?;
        self.lb.ip(&[
            "-6",
            "neigh",
            "replace",
            &CLIENT_IP6.to_string(),
            "lladdr",
            &cmac,
            "dev",
            "c0",
            "nud",
            "permanent",
        ])?;
        Ok(())
    }

    /// The link of backend `i`: the veth pair `b<i>` (balancer) ↔ `eth0` (backend), its
    /// addresses, the backend's default routes and the balancer's permanent neighbour entries.
    fn wire_backend(&self, i: usize) -> anyhow::Result<()> {
        let b = &self.backends[i];
        let dev = format!("b{i}");
        sh(&[
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            b.name(),
            "type",
            "veth",
            "peer",
            "name",
            &dev,
            "netns",
            self.lb.name(),
        ])?;
        b.ip(&[
            "addr",
            "add",
            &format!("{}/24", backend_ip(i)),
            "dev",
            "eth0",
        ])?;
        self.lb
            .ip(&["addr", "add", &format!("10.0.{}.1/24", 10 + i), "dev", &dev])?;
        b.ip(&[
            "addr",
            "add",
            &format!("{}/64", backend_ip6(i)),
            "dev",
            "eth0",
            "nodad",
        ])?;
        self.lb.ip(&[
            "addr",
            "add",
            &format!("fd00:{:x}::1/64", 0x10 + i),
            "dev",
            &dev,
            "nodad",
        ])?;
        b.ip(&["link", "set", "eth0", "up"])?;
        b.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
        self.lb.ip(&["link", "set", &dev, "up"])?;
        self.lb.exec(&["ethtool", "-K", &dev, "tx", "off"])?;
        b.ip(&[
            "route",
            "add",
            "default",
            "via",
            &format!("10.0.{}.1", 10 + i),
        ])?;
        b.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd00:{:x}::1", 0x10 + i),
        ])?;
        let m = fmt_mac(b.mac("eth0")?);
        for addr in [backend_ip(i).to_string(), backend_ip6(i).to_string()] {
            self.lb.ip(&[
                "neigh",
                "replace",
                &addr,
                "lladdr",
                &m,
                "dev",
                &dev,
                "nud",
                "permanent",
            ])?;
        }
        Ok(())
    }

    /// Deletes backend `i`'s link (both ends of the veth pair go) under whatever runs on it.
    pub fn delete_backend_link(&self, i: usize) -> anyhow::Result<()> {
        self.lb.ip(&["link", "del", &format!("b{i}")])?;
        Ok(())
    }

    /// Creates backend `i`'s link again after [`Topology::delete_backend_link`]: same names
    /// and addresses, new ifindexes (and the pass program on the backend's new eth0).
    pub fn recreate_backend_link(&mut self, i: usize) -> anyhow::Result<()> {
        self.wire_backend(i)?;
        if !self._peer_programs.is_empty() {
            let p = self.backends[i].run(|| attach_pass("eth0"))?;
            self._peer_programs.push(p);
        }
        Ok(())
    }

    /// Adds extra IPv6 client addresses `fd00:2::1` to `fd00:2::n` to the client's eth0 and
    /// returns them.
    pub fn add_clients6(&self, n: u16) -> anyhow::Result<Vec<Ipv6Addr>> {
        let addrs: Vec<Ipv6Addr> = (1..=n).map(extra_client_ip6).collect();
        let lines: Vec<String> = addrs
            .iter()
            .map(|a| format!("addr add {a}/128 dev eth0 nodad"))
            .collect();
        ip_batch(Some(self.client.name()), &lines)?;
        Ok(addrs)
    }

    /// The balancer interfaces as `c0,b0,b1,...` (the daemon's `--iface`).
    pub fn iface_list(&self) -> String {
        self.lb_ifaces.join(",")
    }

    /// The namespaces whose eth0 needs an XDP program so that frames the balancer sends
    /// there in native mode (redirect, XDP_TX) are delivered: the client, the attacker and
    /// the backends.
    pub fn peer_namespaces(&self) -> impl Iterator<Item = &NetNs> {
        std::iter::once(&self.client)
            .chain(self.attacker.iter())
            .chain(&self.backends)
    }
}
