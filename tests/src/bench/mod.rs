//! `cargo xtask bench`: clb against the kernel's NAT (nftables DNAT + conntrack, standing in for
//! IPVS, which this kernel lacks), HAProxy and nginx stream, measured side by side in one run.
//!
//! Absolute numbers drift by tens of percent between runs on a shared 2-core VM, so every
//! comparison is a ratio of figures taken in the same run, interleaved where possible, and the
//! report says what bottleneck each figure hit.

pub mod conns;
pub mod memory;
pub mod perpacket;
pub mod rate;
pub mod report;

/// Scale of a run.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// Per-packet: A/B rounds, runs per round, and the "large table" size.
    pub rounds: usize,
    pub runs_per_round: usize,
    pub large_table: usize,
    /// Packet rate: packets per measurement, distinct sources, ports per source (new flows).
    pub packets: u64,
    pub sources: u32,
    pub syn_ports: u32,
    /// Repetitions of each packet-rate measurement (median reported).
    pub rate_reps: usize,
    /// Connections/requests: seconds per peer and client threads.
    pub conn_secs: f64,
    pub conn_threads: usize,
    /// Sweep: entries to sweep.
    pub sweep_entries: usize,
}

impl Scale {
    /// The full run (under 10 minutes).
    pub const FULL: Scale = Scale {
        rounds: 31,
        runs_per_round: 300,
        large_table: 1 << 20,
        packets: 4_000_000,
        sources: 65_536,
        syn_ports: 16,
        rate_reps: 3,
        conn_secs: 5.0,
        conn_threads: 4,
        sweep_entries: 1 << 20,
    };
    /// `--quick` (under 2 minutes).
    pub const QUICK: Scale = Scale {
        rounds: 11,
        runs_per_round: 150,
        large_table: 1 << 20,
        packets: 1_000_000,
        sources: 65_536,
        syn_ports: 16,
        rate_reps: 1,
        conn_secs: 2.0,
        conn_threads: 4,
        sweep_entries: 1 << 20,
    };
    /// The smoke test's scale: checks the machinery, says nothing about speed.
    pub const TINY: Scale = Scale {
        rounds: 3,
        runs_per_round: 10,
        large_table: 1000,
        packets: 3000,
        sources: 256,
        syn_ports: 4,
        rate_reps: 1,
        conn_secs: 0.5,
        conn_threads: 2,
        sweep_entries: 5000,
    };
}

/// Median of `v` (sorts it).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::Ebpf;
use clb::{
    balancer::Balancer,
    dataplane::AyaDataplane,
    loader::{self, AttachMode, Loaded},
    model::{BackendSpec, CheckKind, HealthCheckSpec, ListenerSpec, Proto},
};
use clb_common::{
    CONN_OPEN, ConnKey, ConnValue, SessionKey, SessionValue, XDP_PROGRAM, ip_to_be, port_to_be,
};

use crate::netns::Topology;

/// A listener without health checks (the benchmarks' backends are sinks or fixed servers)
/// over `backends`, weight 10 each.
pub fn listener(
    name: &str,
    vip: SocketAddrV4,
    proto: Proto,
    persist: u32,
    backends: &[SocketAddrV4],
) -> ListenerSpec {
    let mut l = ListenerSpec::new(name, vip, proto);
    l.persist = persist;
    l.health_check = HealthCheckSpec {
        kind: CheckKind::None,
        ..Default::default()
    };
    l.backends = backends
        .iter()
        .map(|a| BackendSpec {
            addr: *a,
            weight: 10,
        })
        .collect();
    l
}

/// clb in the topology's balancer namespace: loaded, configured with `listeners` through the
/// control plane, attached natively to every balancer interface. Drop both to stop it.
pub fn start_clb(
    topo: &Topology,
    listeners: Vec<ListenerSpec>,
) -> anyhow::Result<(Box<Ebpf>, Box<Balancer<AyaDataplane>>)> {
    let ifaces = topo.lb_ifaces.clone();
    topo.lb.run(move || {
        let Loaded {
            mut ebpf,
            dataplane,
            ..
        } = loader::load(None)?;
        let mut lb = Balancer::restore(dataplane)?;
        lb.apply(listeners)?;
        for dev in &ifaces {
            let idx = loader::attach(&mut ebpf, XDP_PROGRAM, dev, AttachMode::Native, None)?;
            lb.add_device(idx)?;
        }
        Ok((Box::new(ebpf), Box::new(lb)))
    })
}

/// Table entries for `n` distinct clients (172.16.0.0 + i, port 7) of listener `lid` on
/// backend `bid`, last seen at `last_seen_ns`: connections and sessions.
pub fn entries(
    n: usize,
    lid: u16,
    bid: u32,
    proto: u8,
    last_seen_ns: u64,
) -> (
    Vec<ConnKey>,
    Vec<ConnValue>,
    Vec<SessionKey>,
    Vec<SessionValue>,
) {
    let ck: Vec<ConnKey> = (0..n)
        .map(|k| ConnKey {
            client: ip_to_be(Ipv4Addr::from(0xac10_0000u32 + k as u32).octets()),
            client_port: port_to_be(7),
            listener: lid,
            proto,
            _pad: [0; 3],
        })
        .collect();
    let cv = vec![
        ConnValue {
            last_seen_ns,
            backend: bid,
            state: CONN_OPEN,
            _pad: [0; 3]
        };
        n
    ];
    let sk = ck
        .iter()
        .map(|k| SessionKey {
            client: k.client,
            listener: lid,
            _pad: 0,
        })
        .collect();
    let sv = vec![
        SessionValue {
            last_seen_ns,
            backend: bid,
            _pad: 0
        };
        n
    ];
    (ck, cv, sk, sv)
}
