//! A shared-segment topology for direct server return and fleets: a router between the client
//! and one L2 segment (a bridge) that holds the balancer nodes and the backends.
//!
//! ```text
//!  client ns                router ns                      switch ns (br0)
//!  eth0 10.0.1.2/24 ── eth0 10.0.1.1/24   eth1 10.0.20.1/24 ── r ┐
//!  + 10.2.x.y/32                                              n<i> ┼─ eth0 10.0.20.<2+i>  node i
//!                                                             b<j> ┘─ eth0 10.0.20.<10+j> backend j
//! ```
//!
//! Nodes and backends hold the VIP on `lo`; backends answer ARP only for their own address
//! (`arp_ignore=1`, `arp_announce=2`) and route replies through the router, never through a
//! node. IPv6 beside it: client fd00:1::2, router fd00:1::1 / fd00:20::1, node i
//! fd00:20::(2+i), backend j fd00:20::(10+j) (hex), [`VIP6`] on the nodes' and backends' `lo`
//! (neighbour discovery answers only for an interface's own addresses). The router reaches the VIP through a node: a static route ([`Fleet::route_vip_via`])
//! or BGP (ECMP over the nodes that announce it). Every veth sends with checksum offload off;
//! the switch ports facing nodes have GRO on, so frames a node's XDP program redirects out of
//! its own interface are delivered.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;

use crate::netns::{NetNs, VIP, VIP6, add_host_addrs, extra_client_ip, fmt_mac, sh};

/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// The router's address on the segment.
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 20, 1);

/// The router's IPv6 address on the segment.
pub const ROUTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 1);

/// IPv6 address of node `i` on the segment.
pub fn node_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 2 + i as u16)
}

/// IPv6 address of backend `j` on the segment.
pub fn backend_ip6(j: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 0x10 + j as u16)
}

/// Address of node `i` on the segment.
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 20, 2 + i as u8)
}

/// Address of backend `j` on the segment.
pub fn backend_ip(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 20, 10 + j as u8)
}

/// The topology; namespaces go on drop.
pub struct Fleet {
    pub client: NetNs,
    pub router: NetNs,
    pub switch: NetNs,
    pub nodes: Vec<NetNs>,
    pub backends: Vec<NetNs>,
    pub extra_clients: Vec<Ipv4Addr>,
}

pub(crate) fn veth(a_ns: &NetNs, a: &str, b_ns: &NetNs, b: &str) -> anyhow::Result<()> {
    sh(&[
        "ip",
        "link",
        "add",
        a,
        "netns",
        a_ns.name(),
        "type",
        "veth",
        "peer",
        "name",
        b,
        "netns",
        b_ns.name(),
    ])?;
    Ok(())
}

impl Fleet {
    /// `nodes` balancer nodes, `backends` backends and `extra_clients` client addresses;
    /// `tag` names the namespaces (keep it short).
    pub fn new(
        tag: &str,
        nodes: usize,
        backends: usize,
        extra_clients: usize,
    ) -> anyhow::Result<Self> {
        let mut f = Fleet {
            client: NetNs::new(&format!("{tag}c"))?,
            router: NetNs::new(&format!("{tag}r"))?,
            switch: NetNs::new(&format!("{tag}s"))?,
            nodes: (0..nodes)
                .map(|i| NetNs::new(&format!("{tag}n{i}")))
                .collect::<Result<_, _>>()?,
            backends: (0..backends)
                .map(|j| NetNs::new(&format!("{tag}b{j}")))
                .collect::<Result<_, _>>()?,
            extra_clients: (0..extra_clients).map(extra_client_ip).collect(),
        };
        f.wire().context("building the fleet topology")?;
        Ok(f)
    }

    fn wire(&mut self) -> anyhow::Result<()> {
        let (c, r, s) = (&self.client, &self.router, &self.switch);
        veth(c, "eth0", r, "eth0")?;
        veth(r, "eth1", s, "r")?;
        s.ip(&["link", "add", "br0", "type", "bridge"])?;
        s.ip(&["link", "set", "br0", "up"])?;
        s.ip(&["link", "set", "r", "master", "br0", "up"])?;
        c.ip(&["addr", "add", "10.0.1.2/24", "dev", "eth0"])?;
        r.ip(&["addr", "add", "10.0.1.1/24", "dev", "eth0"])?;
        r.ip(&["addr", "add", &format!("{ROUTER_IP}/24"), "dev", "eth1"])?;
        c.ip(&["addr", "add", "fd00:1::2/64", "dev", "eth0", "nodad"])?;
        r.ip(&["addr", "add", "fd00:1::1/64", "dev", "eth0", "nodad"])?;
        r.ip(&[
            "addr",
            "add",
            &format!("{ROUTER_IP6}/64"),
            "dev",
            "eth1",
            "nodad",
        ])?;
        for (i, n) in self.nodes.iter().enumerate() {
            let port = format!("n{i}");
            veth(n, "eth0", s, &port)?;
            s.ip(&["link", "set", &port, "master", "br0", "up"])?;
            // The node's XDP program redirects out of its own eth0: the peer needs GRO.
            s.exec(&["ethtool", "-K", &port, "gro", "on"])?;
            n.ip(&["addr", "add", &format!("{}/24", node_ip(i)), "dev", "eth0"])?;
            n.ip(&[
                "addr",
                "add",
                &format!("{}/64", node_ip6(i)),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        for (j, b) in self.backends.iter().enumerate() {
            let port = format!("b{j}");
            veth(b, "eth0", s, &port)?;
            s.ip(&["link", "set", &port, "master", "br0", "up"])?;
            b.ip(&[
                "addr",
                "add",
                &format!("{}/24", backend_ip(j)),
                "dev",
                "eth0",
            ])?;
            b.ip(&[
                "addr",
                "add",
                &format!("{}/64", backend_ip6(j)),
                "dev",
                "eth0",
                "nodad",
            ])?;
            for k in [
                "net.ipv4.conf.all.arp_ignore=1",
                "net.ipv4.conf.eth0.arp_ignore=1",
                "net.ipv4.conf.all.arp_announce=2",
                "net.ipv4.conf.eth0.arp_announce=2",
            ] {
                b.sysctl(k)?;
            }
        }
        for ns in std::iter::once(&self.client)
            .chain(std::iter::once(&self.router))
            .chain(&self.nodes)
            .chain(&self.backends)
        {
            for dev in ["eth0", "eth1"] {
                if ns.ip(&["link", "show", dev]).is_ok() {
                    ns.ip(&["link", "set", dev, "up"])?;
                    ns.exec(&["ethtool", "-K", dev, "tx", "off"])?;
                }
            }
        }
        c.ip(&["route", "add", "default", "via", "10.0.1.1"])?;
        c.ip(&["-6", "route", "add", "default", "via", "fd00:1::1"])?;
        r.sysctl("net.ipv4.ip_forward=1")?;
        r.sysctl("net.ipv6.conf.all.forwarding=1")?;
        r.sysctl("net.ipv4.fib_multipath_hash_policy=1")?;
        for k in ["all", "default", "eth0", "eth1"] {
            r.sysctl(&format!("net.ipv4.conf.{k}.rp_filter=0"))?;
        }
        r.ip(&["route", "add", "10.2.0.0/16", "via", "10.0.1.2"])?;
        for ns in self.nodes.iter().chain(&self.backends) {
            ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            ns.ip(&["route", "add", "default", "via", &ROUTER_IP.to_string()])?;
            ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])?;
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &ROUTER_IP6.to_string(),
            ])?;
        }
        for n in &self.nodes {
            n.sysctl("net.ipv4.ip_forward=1")?;
            // The datapath's FIB lookups fail on an interface that does not forward.
            n.sysctl("net.ipv6.conf.all.forwarding=1")?;
        }
        add_host_addrs(&self.client, "eth0", &self.extra_clients)?;
        Ok(())
    }

    /// Routes the VIP at the router through node `i` alone (replacing any route).
    pub fn route_vip_via(&self, i: usize) -> anyhow::Result<()> {
        self.router.ip(&[
            "route",
            "replace",
            &format!("{VIP}/32"),
            "via",
            &node_ip(i).to_string(),
        ])?;
        Ok(())
    }

    /// The router's route to the VIP, as `ip route show` prints it.
    pub fn vip_route(&self) -> anyhow::Result<String> {
        self.router.ip(&["route", "show", &format!("{VIP}/32")])
    }

    /// The MAC of backend `j`'s eth0, as `aa:bb:..`.
    pub fn backend_mac(&self, j: usize) -> anyhow::Result<String> {
        Ok(fmt_mac(self.backends[j].mac("eth0")?))
    }
}

/// The router's BIRD: one eBGP session (AS 65000 ↔ 65001) with BFD per node, VIP routes
/// merged into one ECMP route in the router's kernel table. Stops on drop.
pub struct RouterBird {
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
    router_path: String,
}

/// The router's AS; nodes use [`NODE_AS`].
pub const ROUTER_AS: u32 = 65000;
pub const NODE_AS: u32 = 65001;

impl RouterBird {
    /// Starts BIRD in the router namespace with an IPv4 session to each node.
    pub fn start(f: &Fleet) -> anyhow::Result<Self> {
        Self::start_with(f, false)
    }

    /// As [`RouterBird::start`], plus an IPv6 session to each node (its IPv6 VIP routes
    /// merged into one ECMP route too).
    pub fn start_dual(f: &Fleet) -> anyhow::Result<Self> {
        Self::start_with(f, true)
    }

    fn start_with(f: &Fleet, v6: bool) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(crate::netns::unique_name("rbird"));
        std::fs::create_dir_all(&dir)?;
        let mut conf = format!(
            "router id {ROUTER_IP};\nlog \"{}\" all;\nprotocol device {{ scan time 10; }}\nprotocol kernel {{\n  ipv4 {{ import none; export all; }};\n  merge paths on;\n}}\nprotocol bfd {{\n  interface \"*\" {{ interval 100 ms; multiplier 3; }};\n}}\ntemplate bgp node {{\n  local as {ROUTER_AS};\n  hold time 9;\n  connect retry time 1;\n  error wait time 1, 10;\n  bfd on;\n  ipv4 {{ import all; export none; }};\n}}\n",
            dir.join("bird.log").display()
        );
        for i in 0..f.nodes.len() {
            conf += &format!(
                "protocol bgp n{i} from node {{ neighbor {} as {NODE_AS}; }}\n",
                node_ip(i)
            );
        }
        if v6 {
            conf += "protocol kernel {\n  ipv6 { import none; export all; };\n  merge paths on;\n}\ntemplate bgp node6 {\n  local as 65000;\n  hold time 9;\n  connect retry time 1;\n  error wait time 1, 10;\n  bfd on;\n  ipv6 { import all; export none; };\n}\n";
            for i in 0..f.nodes.len() {
                conf += &format!(
                    "protocol bgp n{i}v6 from node6 {{ neighbor {} as {NODE_AS}; }}\n",
                    node_ip6(i)
                );
            }
        }
        std::fs::write(dir.join("bird.conf"), conf)?;
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net={}", f.router.path()))
            .arg("bird")
            .arg("-f")
            .arg("-c")
            .arg(dir.join("bird.conf"))
            .arg("-s")
            .arg(dir.join("bird.ctl"))
            .arg("-P")
            .arg(dir.join("bird.pid"))
            .env(
                "PATH",
                format!(
                    "/usr/sbin:/sbin:{}",
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr"))?)
            .spawn()
            .context(
                "starting the router's BIRD (is bird2 installed? `cargo xtask setup --test`)",
            )?;
        let b = Self {
            child: Some(child),
            dir,
            router_path: f.router.path(),
        };
        let up = crate::wait_for(std::time::Duration::from_secs(5), || {
            b.dir.join("bird.ctl").exists().then_some(())
        });
        anyhow::ensure!(up.is_some(), "the router's BIRD did not start: {}", b.log());
        Ok(b)
    }

    /// `birdc` on the router.
    pub fn birdc(&self, args: &[&str]) -> String {
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.router_path))
            .arg("/usr/sbin/birdc")
            .arg("-s")
            .arg(self.dir.join("bird.ctl"))
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// BIRD's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default()
            + &std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }
}

impl Drop for RouterBird {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let gone = crate::wait_for(std::time::Duration::from_secs(3), || {
                c.try_wait().ok().flatten()
            });
            if gone.is_none() {
                c.kill().ok();
                c.wait().ok();
            }
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

impl Fleet {
    /// The nodes the router's route to the VIP goes through now (ECMP next hops).
    pub fn vip_nexthops(&self) -> Vec<Ipv4Addr> {
        let r = self.vip_route().unwrap_or_default();
        let mut v: Vec<Ipv4Addr> = r
            .split("via ")
            .skip(1)
            .filter_map(|t| t.split_whitespace().next()?.parse().ok())
            .collect();
        v.sort();
        v
    }

    /// The router's next hops for the IPv6 VIP, as addresses (global or link-local, as the
    /// router's kernel holds them).
    pub fn vip6_nexthops(&self) -> Vec<Ipv6Addr> {
        let r = self
            .router
            .ip(&["-6", "route", "show", &format!("{VIP6}/128")])
            .unwrap_or_default();
        let mut v: Vec<Ipv6Addr> = r
            .split("via ")
            .skip(1)
            .filter_map(|t| t.split_whitespace().next()?.parse().ok())
            .collect();
        v.sort();
        v
    }

    /// The shared config of every node with an IPv6 session beside the IPv4 one.
    pub fn node_config_dual(listeners: &str) -> String {
        format!(
            "[bgp]\nlocal_as = {NODE_AS}\nbfd_interval_ms = 100\nbfd_multiplier = 3\n[[bgp.peer]]\naddress = \"{ROUTER_IP}\"\nremote_as = {ROUTER_AS}\n[[bgp.peer]]\naddress = \"{ROUTER_IP6}\"\nremote_as = {ROUTER_AS}\n\n{listeners}"
        )
    }

    /// The shared config of every node: `[bgp]` towards the router (no router id: each node
    /// takes its own address), then `listeners` (TOML).
    pub fn node_config(listeners: &str) -> String {
        format!(
            "[bgp]\nlocal_as = {NODE_AS}\nbfd_interval_ms = 100\nbfd_multiplier = 3\n[[bgp.peer]]\naddress = \"{ROUTER_IP}\"\nremote_as = {ROUTER_AS}\n\n{listeners}"
        )
    }
}
