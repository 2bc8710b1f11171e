//! Packet-level tests: the real XDP program run through `BPF_PROG_TEST_RUN` on hand-built
//! frames, provisioned through the same control-plane code the daemon uses
//! ([`clb::balancer::Balancer`] over [`clb::dataplane::AyaDataplane`]).
//!
//! The program runs inside a private namespace whose routes and permanent neighbours make the
//! datapath's FIB lookup succeed: `l0` (10.0.1.1/24) faces clients (10.0.1.2 and 10.2.0.0/16
//! behind it), `l2` (10.1.0.1/24) faces backends 10.1.0.2-9 with fixed MACs
//! [`backend_mac`]. A forwarded packet therefore comes out as `XDP_REDIRECT` with the
//! next hop's MAC, ready to compare byte for byte.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use clb::{balancer::Balancer, dataplane::AyaDataplane, loader};
use clb_common::XDP_PROGRAM;

use crate::{
    netns::{NetNs, fmt_mac},
    packet::{self, CLIENT_MAC},
};

/// XDP verdicts.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Name of a verdict.
pub fn verdict_name(v: u32) -> &'static str {
    match v {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "?",
    }
}

/// MAC of backend `10.1.0.n` in the lab.
pub fn backend_mac(n: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x10, n]
}

/// Address `10.1.0.n:port` of a lab backend.
pub fn backend(n: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, n), port)
}

/// The loaded program and the control plane over its maps, inside the lab namespace.
pub struct PacketLab {
    pub ebpf: aya::Ebpf,
    pub lb: Balancer<AyaDataplane>,
    /// ifindex of `l0` (client side) and its MAC.
    pub client_if: u32,
    pub client_if_mac: [u8; 6],
    /// ifindex of `l2` (backend side) and its MAC.
    pub backend_if: u32,
    pub backend_if_mac: [u8; 6],
}

fn setup(ns: &NetNs) -> anyhow::Result<()> {
    ns.ip(&["link", "add", "l0", "type", "veth", "peer", "name", "l1"])?;
    ns.ip(&["link", "add", "l2", "type", "veth", "peer", "name", "l3"])?;
    for d in ["l0", "l1", "l2", "l3"] {
        ns.ip(&["link", "set", d, "up"])?;
    }
    ns.ip(&["addr", "add", "10.0.1.1/24", "dev", "l0"])?;
    ns.ip(&["addr", "add", "10.1.0.1/24", "dev", "l2"])?;
    ns.sysctl("net.ipv4.ip_forward=1")?;
    ns.ip(&[
        "neigh",
        "replace",
        "10.0.1.2",
        "lladdr",
        &fmt_mac(CLIENT_MAC),
        "dev",
        "l0",
        "nud",
        "permanent",
    ])?;
    ns.ip(&["route", "add", "10.2.0.0/16", "via", "10.0.1.2"])?;
    for n in 2..=9u8 {
        ns.ip(&[
            "neigh",
            "replace",
            &format!("10.1.0.{n}"),
            "lladdr",
            &fmt_mac(backend_mac(n)),
            "dev",
            "l2",
            "nud",
            "permanent",
        ])?;
    }
    Ok(())
}

/// Runs `f` with a fresh lab (namespace, program, control plane); everything is removed
/// afterwards, also when `f` panics.
pub fn with_lab<R: Send>(f: impl FnOnce(&mut PacketLab) -> R + Send) -> R {
    let ns = NetNs::new("pk").expect("lab namespace");
    setup(&ns).expect("lab setup");
    let (client_if, client_if_mac) = (ns.ifindex("l0").unwrap(), ns.mac("l0").unwrap());
    let (backend_if, backend_if_mac) = (ns.ifindex("l2").unwrap(), ns.mac("l2").unwrap());
    ns.run(move || {
        let loaded = loader::load(None).expect("loading the XDP program");
        let mut lb = Balancer::restore(loaded.dataplane).expect("control plane");
        lb.add_device(client_if).unwrap();
        lb.add_device(backend_if).unwrap();
        let mut lab = PacketLab {
            ebpf: loaded.ebpf,
            lb,
            client_if,
            client_if_mac,
            backend_if,
            backend_if_mac,
        };
        f(&mut lab)
    })
}

impl PacketLab {
    /// Runs the balancer once on `frame` as if received on `ingress`; returns the verdict and
    /// the frame as the program left it.
    pub fn run_on(&self, ingress: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        let (v, out, _) = self.run_prog(XDP_PROGRAM, ingress, frame);
        (v, out)
    }

    /// Runs program `name` (the balancer or the pass program) once on `frame`; returns the
    /// verdict, the output frame and the kernel-measured run time in ns.
    pub fn run_prog(&self, name: &str, ingress: u32, frame: &[u8]) -> (u32, Vec<u8>, u64) {
        let prog: &Xdp = self
            .ebpf
            .program(name)
            .expect("program")
            .try_into()
            .expect("xdp");
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex }: the kernel wants data = 0 and data_end = the frame's length.
        let ctx: Vec<u8> = [0u32, frame.len() as u32, 0, ingress, 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let mut out = vec![0u8; frame.len() + 512];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out, r.duration.as_nanos() as u64)
    }

    /// [`PacketLab::run_on`] on the client-side interface.
    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(self.client_if, frame)
    }

    /// Runs every fixture in order; on the first mismatch panics with the description and
    /// the input, expected and actual frames.
    pub fn check(&self, fixtures: &[Fixture]) {
        for (i, fx) in fixtures.iter().enumerate() {
            let (verdict, out) = self.run_on(fx.ingress.unwrap_or(self.client_if), &fx.input);
            let expected = fx.output.as_ref().unwrap_or(&fx.input);
            let checks_ok = !fx.verify_checksums || packet::verify_checksums(&out).is_ok();
            if verdict != fx.verdict || &out != expected || !checks_ok {
                panic!(
                    "fixture {i} \"{}\" failed\n verdict: expected {} got {}\n checksums: {:?}\n input:\n{}\n expected output:\n{}\n actual output:\n{}",
                    fx.desc,
                    verdict_name(fx.verdict),
                    verdict_name(verdict),
                    packet::verify_checksums(&out),
                    packet::hexdump(&fx.input),
                    packet::hexdump(expected),
                    packet::hexdump(&out),
                );
            }
            println!("fixture ok: {} -> {}", fx.desc, verdict_name(verdict));
        }
    }

    /// The global counter named `name` (see `clb_common::counter::NAMES`).
    pub fn counter(&self, name: &str) -> u64 {
        use clb::dataplane::Dataplane as _;
        let raw = self.lb.dataplane().counters().expect("counters");
        let i = clb_common::counter::NAMES
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("no counter {name}"));
        raw[i]
    }
}

/// One row of a fixture table: input frame, expected verdict and output frame.
pub struct Fixture {
    pub desc: &'static str,
    pub input: Vec<u8>,
    pub verdict: u32,
    /// Expected output; `None` = the input, unchanged.
    pub output: Option<Vec<u8>>,
    /// Interface the frame arrives on (default: the client side).
    pub ingress: Option<u32>,
    /// Also recompute and verify the output's checksums.
    pub verify_checksums: bool,
}

impl Fixture {
    /// A frame that must come out unchanged with `verdict`.
    pub fn unchanged(desc: &'static str, input: Vec<u8>, verdict: u32) -> Self {
        Self {
            desc,
            input,
            verdict,
            output: None,
            ingress: None,
            verify_checksums: false,
        }
    }

    /// A frame that must come out as `output` with `verdict`, checksums verified.
    pub fn rewritten(desc: &'static str, input: Vec<u8>, verdict: u32, output: Vec<u8>) -> Self {
        Self {
            desc,
            input,
            verdict,
            output: Some(output),
            ingress: None,
            verify_checksums: true,
        }
    }

    pub fn on(mut self, ingress: u32) -> Self {
        self.ingress = Some(ingress);
        self
    }
}
