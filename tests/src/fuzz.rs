//! The datapath fuzzer: frames generated from valid ones of every kind and mutated, run
//! through `BPF_PROG_TEST_RUN` against a configuration with entries in every table, each
//! checked against invariants:
//!
//! - the verdict is never `XDP_ABORTED`, and exactly one verdict counter moves;
//! - `XDP_PASS` leaves the frame unchanged;
//! - `XDP_DROP` moves exactly one drop-reason counter; other verdicts move none;
//! - a redirected frame is IPv4 with a TTL one lower, valid IP and L4 checksums when the input
//!   had them, and goes to a configured backend (NAT: its address and port; DSR: the VIP, to
//!   the backend's MAC; an ICMP error: the backend's address) or back from a VIP (reply path);
//! - an `XDP_TX` frame is a TCP RST from a VIP to the sender, with valid checksums;
//! - at the end, the verdict counters add up to the frames sent.
//!
//! A frame breaking an invariant is printed as hex and written to `tests/fuzz-fixtures/`, from
//! where `fuzz_smoke` replays it on every test run.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Instant,
};

use clb::control::model::{BackendSpec, Forward, Kind, ListenerSpec, Proto, Sched};
use clb_common::counter;

use crate::{
    lab::{
        PacketLab, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, backend, backend_mac,
        verdict_name,
    },
    packet::{ACK, FrameSpec, SYN, hexdump, icmp_error, parse, verify_checksums},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);

/// The listeners the fuzzer runs against: every scheduler, forwarding mode, persistence and
/// protocol, two listeners sharing backends, two VIPs.
pub fn listeners() -> Vec<ListenerSpec> {
    let l = |name: &str, vip: Ipv4Addr, port: u16, proto: Proto, persist: u32, bs: &[(u8, u16)]| {
        let mut s = ListenerSpec::new(name, SocketAddrV4::new(vip, port), proto);
        s.persist = persist;
        s.health_check =
            clb::control::model::HealthCheckSpec::of(clb::control::model::CheckKind::None);
        s.backends = bs
            .iter()
            .map(|(n, p)| BackendSpec {
                addr: backend(*n, *p),
                weight: 10,
            })
            .collect();
        s
    };
    let mut sticky = l("sticky", VIP, 81, Proto::Tcp, 60, &[(2, 8080), (3, 8080)]);
    let mut dsr = l("dsr", VIP, 82, Proto::Tcp, 0, &[(4, 82), (7, 82)]);
    if let (Kind::L4(s), Kind::L4(d)) = (&mut sticky.kind, &mut dsr.kind) {
        s.sched = Sched::Maglev;
        s.persist_mask = Some(24);
        d.forward = Forward::Dsr;
    }
    vec![
        l("web", VIP, 80, Proto::Tcp, 0, &[(2, 8080), (3, 8080)]),
        sticky,
        dsr,
        l("dns", VIP, 53, Proto::Udp, 30, &[(5, 5353), (6, 5353)]),
        l("other", VIP2, 80, Proto::Tcp, 0, &[(8, 80)]),
    ]
}

/// A (VIP, port, proto) → backends index of the configuration, for checking outputs.
struct Config {
    /// NAT backends: address:port.
    nat_backends: HashSet<SocketAddrV4>,
    /// DSR backends: (address, MAC) — the frame keeps the VIP as destination.
    dsr_macs: HashSet<[u8; 6]>,
    /// VIP:port of every L4 listener.
    vips: HashSet<SocketAddrV4>,
    backend_ips: HashSet<Ipv4Addr>,
}

impl Config {
    fn of(ls: &[ListenerSpec]) -> Self {
        let mut c = Config {
            nat_backends: HashSet::new(),
            dsr_macs: HashSet::new(),
            vips: HashSet::new(),
            backend_ips: HashSet::new(),
        };
        for l in ls {
            c.vips.insert(l.vip);
            let dsr = l.l4().is_some_and(|k| k.forward == Forward::Dsr);
            for b in &l.backends {
                c.backend_ips.insert(*b.addr.ip());
                if dsr {
                    c.dsr_macs.insert(backend_mac(b.addr.ip().octets()[3]));
                } else {
                    c.nat_backends.insert(b.addr);
                }
            }
        }
        c
    }
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct FuzzReport {
    pub frames: u64,
    pub seconds: f64,
    /// Frames per verdict: aborted, drop, pass, tx, redirect.
    pub verdicts: [u64; 5],
    /// Invariant violations (description and the input frame).
    pub failures: Vec<(String, Vec<u8>)>,
}

impl FuzzReport {
    pub fn frames_per_sec(&self) -> f64 {
        self.frames as f64 / self.seconds.max(1e-9)
    }
}

/// A flow the fuzzer saw forwarded, to build replies and ICMP errors about.
#[derive(Clone, Copy)]
struct Seen {
    client: SocketAddrV4,
    vip: SocketAddrV4,
    backend: SocketAddrV4,
    proto: u8,
}

struct Gen {
    rng: fastrand::Rng,
    seen: Vec<Seen>,
}

impl Gen {
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.rng.usize(..v.len())]
    }

    fn source(&mut self) -> Ipv4Addr {
        match self.rng.u8(..20) {
            0 => Ipv4Addr::new(0, self.rng.u8(..), 1, 2),
            1 => Ipv4Addr::new(127, 0, 0, self.rng.u8(..)),
            2 => Ipv4Addr::new(224 + self.rng.u8(..16), 1, 2, 3),
            3 => Ipv4Addr::new(240 + self.rng.u8(..16), 1, 2, 3),
            4 => Ipv4Addr::BROADCAST,
            5 => self.pick(&[VIP, VIP2]),
            6 => Ipv4Addr::new(10, 1, 0, self.rng.u8(2..10)),
            7 => Ipv4Addr::new(10, 0, 1, 1),
            8 => Ipv4Addr::new(10, 0, 1, 2),
            _ => Ipv4Addr::new(10, 2, self.rng.u8(..4), self.rng.u8(1..250)),
        }
    }

    fn ttl(&mut self) -> u8 {
        self.pick(&[0, 1, 2, 64, 64, 64, 255])
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.rng.usize(..=max);
        (0..n).map(|_| self.rng.u8(..)).collect()
    }

    /// A valid frame of some kind.
    fn frame(&mut self) -> Vec<u8> {
        let vip_ports: [(Ipv4Addr, u16, u8); 7] = [
            (VIP, 80, 6),
            (VIP, 81, 6),
            (VIP, 82, 6),
            (VIP, 53, 17),
            (VIP2, 80, 6),
            (VIP, 443, 6),
            (VIP, 80, 17),
        ];
        match self.rng.u8(..100) {
            // Client → VIP, TCP with any flags, options, payload.
            0..=44 => {
                let (vip, port, _) = self.pick(&vip_ports);
                let src = SocketAddrV4::new(self.source(), self.rng.u16(1..));
                let flags = if self.rng.bool() {
                    self.pick(&[
                        SYN,
                        ACK,
                        SYN | ACK,
                        ACK | 0x08,
                        0x01 | ACK,
                        0x04,
                        0x04 | ACK,
                    ])
                } else {
                    self.rng.u8(..)
                };
                let mut s = FrameSpec::tcp(src, SocketAddrV4::new(vip, port), flags);
                s.seq = self.rng.u32(..);
                s.ack = self.rng.u32(..);
                s.ttl = self.ttl();
                s.payload = self.bytes(64);
                if self.rng.u8(..10) == 0 {
                    s.ip_options = self.bytes(40);
                }
                if self.rng.u8(..20) == 0 {
                    s.frag = self.pick(&[0x2000, 0x0010, 0x2010, 0x4000, 0x8000]);
                }
                s.build()
            }
            // Client → VIP, UDP.
            45..=59 => {
                let (vip, port, _) = self.pick(&vip_ports);
                let src = SocketAddrV4::new(self.source(), self.rng.u16(1..));
                let payload = self.bytes(64);
                let mut s = FrameSpec::udp(src, SocketAddrV4::new(vip, port), &payload);
                s.ttl = self.ttl();
                s.udp_no_checksum = self.rng.u8(..4) == 0;
                s.build()
            }
            // Backend → client: replies to seen flows, or to anyone.
            60..=79 => {
                let (bsrc, client, proto) = match (self.seen.is_empty(), self.rng.bool()) {
                    (false, true) => {
                        let f = self.pick(&self.seen.clone());
                        (f.backend, f.client, f.proto)
                    }
                    _ => (
                        backend(self.rng.u8(2..10), self.pick(&[8080, 5353, 80, 82])),
                        SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, 1), self.rng.u16(1..)),
                        self.pick(&[6, 17]),
                    ),
                };
                let mut s = if proto == 6 {
                    let mut s = FrameSpec::tcp(bsrc, client, self.rng.u8(..));
                    s.seq = self.rng.u32(..);
                    s.payload = self.bytes(32);
                    s
                } else {
                    FrameSpec::udp(bsrc, client, &self.bytes(32))
                };
                s.src_mac = backend_mac(bsrc.ip().octets()[3]);
                s.ttl = self.ttl();
                s.build()
            }
            // ICMP to a VIP: errors quoting seen flows (or made-up ones), echo, any type.
            80..=91 => {
                let (vip, client, proto) = match (self.seen.is_empty(), self.rng.bool()) {
                    (false, true) => {
                        let f = self.pick(&self.seen.clone());
                        (f.vip, f.client, f.proto)
                    }
                    _ => (
                        SocketAddrV4::new(VIP, self.pick(&[80, 81, 53, 82])),
                        SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, 1), self.rng.u16(1..)),
                        6,
                    ),
                };
                let quoted = if proto == 6 {
                    FrameSpec::tcp(vip, client, ACK)
                        .payload(&self.bytes(32))
                        .build()
                } else {
                    FrameSpec::udp(vip, client, &self.bytes(32)).build()
                };
                let any = self.rng.u8(..);
                let kind = self.pick(&[3, 3, 11, 12, 0, 8, any]);
                let quote = self.rng.usize(..=quoted.len());
                let mut f = icmp_error(
                    Ipv4Addr::new(10, 2, 0, 254),
                    *vip.ip(),
                    kind,
                    self.rng.u8(..16),
                    self.rng.u16(..),
                    &quoted,
                    quote,
                );
                f[22] = self.ttl();
                fix_ip_checksum(&mut f);
                f
            }
            // Other IP protocols to a VIP.
            92..=95 => {
                let mut s = FrameSpec::tcp(
                    SocketAddrV4::new(self.source(), 1),
                    SocketAddrV4::new(VIP, 0),
                    0,
                );
                let any = self.rng.u8(..);
                s.proto = self.pick(&[4, 47, 132, 41, 50, any]);
                s.payload = self.bytes(64);
                s.build()
            }
            // Not IPv4 at all.
            _ => {
                let mut f = vec![0u8; 14];
                f[12..14].copy_from_slice(&self.pick(&[
                    [0x08, 0x06],
                    [0x86, 0xdd],
                    [0x81, 0x00],
                    [0x88, 0xcc],
                ]));
                f.extend(self.bytes(80));
                f
            }
        }
    }

    /// Mutates a frame: bit flips, byte sets, truncation, extension, zeroed ranges.
    fn mutate(&mut self, f: &mut Vec<u8>) {
        for _ in 0..self.rng.usize(1..=6) {
            match self.rng.u8(..6) {
                0 if !f.is_empty() => {
                    let i = self.rng.usize(..f.len());
                    f[i] ^= 1 << self.rng.u8(..8);
                }
                1 if !f.is_empty() => {
                    // Mostly in the headers, where it matters.
                    let i = self.rng.usize(..f.len().min(80));
                    f[i] = self.rng.u8(..);
                }
                2 => {
                    let n = self.rng.usize(..=f.len());
                    f.truncate(n);
                }
                3 => f.extend(self.bytes(16)),
                4 if f.len() > 2 => {
                    let a = self.rng.usize(..f.len());
                    let b = (a + self.rng.usize(1..8)).min(f.len());
                    f[a..b].fill(0);
                }
                _ => {
                    if f.len() > 34 {
                        // A plausible field: total length, IHL, TCP data offset.
                        match self.rng.u8(..3) {
                            0 => f[16..18].copy_from_slice(&self.rng.u16(..).to_be_bytes()),
                            1 => f[14] = 0x40 | self.rng.u8(..16),
                            _ => {
                                if f.len() > 46 {
                                    f[46] = self.rng.u8(..);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn fix_ip_checksum(f: &mut [u8]) {
    if f.len() < 34 {
        return;
    }
    f[24] = 0;
    f[25] = 0;
    let ihl = usize::from(f[14] & 0x0f) * 4;
    if f.len() < 14 + ihl {
        return;
    }
    let c = crate::packet::checksum(&f[14..14 + ihl]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

fn drops(c: &[u64]) -> u64 {
    (0..c.len() as u32)
        .filter(|i| counter::is_drop_reason(*i))
        .map(|i| c[i as usize])
        .sum()
}

const VERDICT_COUNTERS: [u32; 5] = [
    counter::VERDICT_ABORTED,
    counter::VERDICT_DROP,
    counter::VERDICT_PASS,
    counter::VERDICT_TX,
    counter::VERDICT_REDIRECT,
];

/// Checks one frame's outcome; `Err(why)` on a broken invariant.
fn check(
    cfg: &Config,
    input: &[u8],
    verdict: u32,
    out: &[u8],
    before: &[u64],
    after: &[u64],
) -> Result<(), String> {
    if verdict == XDP_ABORTED {
        return Err("XDP_ABORTED".into());
    }
    let moved: Vec<(u32, u64)> = VERDICT_COUNTERS
        .iter()
        .enumerate()
        .map(|(v, i)| (v as u32, after[*i as usize] - before[*i as usize]))
        .filter(|(_, d)| *d != 0)
        .collect();
    if moved != [(verdict, 1)] {
        return Err(format!(
            "verdict counters moved {moved:?} for {}",
            verdict_name(verdict)
        ));
    }
    let dropped = drops(after) - drops(before);
    match verdict {
        XDP_DROP if dropped != 1 => {
            return Err(format!("XDP_DROP moved {dropped} drop-reason counters"));
        }
        XDP_PASS | XDP_TX | XDP_REDIRECT if dropped != 0 => {
            return Err(format!(
                "{} moved {dropped} drop-reason counters",
                verdict_name(verdict)
            ));
        }
        _ => {}
    }
    let valid_in =
        input.len() >= 34 && input[12..14] == [0x08, 0x00] && verify_checksums(input).is_ok();
    let handed_up = [
        counter::FWD_STACK_NO_NEIGH,
        counter::FWD_STACK_FRAG,
        counter::FWD_STACK_NO_DEV,
    ]
    .iter()
    .map(|i| after[*i as usize] - before[*i as usize])
    .sum::<u64>();
    match verdict {
        // A frame passed changed is one NATed for the stack to finish (neighbour resolution,
        // fragmentation, an egress outside the devmap): that must be counted.
        XDP_PASS if out != input && handed_up != 1 => {
            Err("XDP_PASS changed the frame without handing it to the stack".into())
        }
        XDP_TX => {
            let p = parse(out).map_err(|e| format!("TX frame unparsable: {e}"))?;
            verify_checksums(out).map_err(|e| format!("TX frame: {e}"))?;
            if p.tcp_flags & 0x04 == 0 {
                return Err("TX frame is not an RST".into());
            }
            if !cfg.vips.contains(&p.src) {
                return Err(format!("RST from {} (not a VIP)", p.src));
            }
            Ok(())
        }
        XDP_REDIRECT => {
            if out.len() < 34 || out[12..14] != [0x08, 0x00] {
                return Err("redirected frame is not IPv4".into());
            }
            if out[22].checked_add(1) != Some(input[22]) {
                return Err(format!("TTL {} → {}", input[22], out[22]));
            }
            if valid_in {
                verify_checksums(out).map_err(|e| format!("redirected with {e}"))?;
            }
            let dst_ip = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
            let src_ip = Ipv4Addr::new(out[26], out[27], out[28], out[29]);
            let dst_mac: [u8; 6] = out[0..6].try_into().expect("6 bytes");
            let proto = out[23];
            if proto == 1 {
                return if cfg.backend_ips.contains(&dst_ip) || cfg.dsr_macs.contains(&dst_mac) {
                    Ok(())
                } else {
                    Err(format!("ICMP redirected to {dst_ip}"))
                };
            }
            let p = parse(out).map_err(|e| format!("redirected frame unparsable: {e}"))?;
            if cfg.nat_backends.contains(&p.dst) {
                return Ok(());
            }
            if cfg.vips.contains(&p.dst) && cfg.dsr_macs.contains(&dst_mac) {
                return Ok(());
            }
            if cfg.vips.contains(&p.src) {
                return Ok(()); // reply path
            }
            Err(format!(
                "redirected {src_ip}:{} → {dst_ip}:{}: neither to a backend nor from a VIP",
                p.src.port(),
                p.dst.port()
            ))
        }
        _ => Ok(()),
    }
}

/// Runs `frames` frames (seeded by `seed`) through the lab's program; writes failing inputs
/// under `failures_dir` (if given).
pub fn run(lab: &mut PacketLab, frames: u64, seed: u64, failures_dir: Option<&Path>) -> FuzzReport {
    let ls = listeners();
    lab.apply(ls.clone());
    let cfg = Config::of(&ls);
    let mut g = Gen {
        rng: fastrand::Rng::with_seed(seed),
        seen: Vec::new(),
    };
    // Entries in every table: verified flows, half-open ones, persisted and pending clients.
    for i in 0..200u16 {
        let c = SocketAddrV4::new(Ipv4Addr::new(10, 2, 1, (i % 250) as u8 + 1), 20000 + i);
        for port in [80, 81, 82] {
            let vip = SocketAddrV4::new(VIP, port);
            lab.run(&FrameSpec::tcp(c, vip, SYN).build());
            if i % 2 == 0 {
                lab.run(&FrameSpec::tcp(c, vip, ACK).build());
            }
        }
        lab.run(&FrameSpec::udp(c, SocketAddrV4::new(VIP, 53), b"q").build());
    }
    let mut report = FuzzReport::default();
    let mut before = lab.counters();
    let start_counts = before;
    let t0 = Instant::now();
    for n in 0..frames {
        let mut f = g.frame();
        if g.rng.bool() {
            g.mutate(&mut f);
        }
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (no NIC delivers
        // one): pad those.
        if f.len() < 14 {
            f.resize(14, 0);
        }
        let (verdict, out) = lab.run(&f);
        let after = lab.counters();
        if let Some(slot) = report.verdicts.get_mut(verdict as usize) {
            *slot += 1;
        }
        if let Err(why) = check(&cfg, &f, verdict, &out, &before, &after) {
            eprintln!(
                "fuzz frame {n} (seed {seed}) broke an invariant: {why}\n verdict {}\n input:\n{}\n output:\n{}",
                verdict_name(verdict),
                hexdump(&f),
                hexdump(&out)
            );
            if let Some(dir) = failures_dir {
                std::fs::create_dir_all(dir).ok();
                let hex: String = f.iter().map(|b| format!("{b:02x}")).collect();
                std::fs::write(dir.join(format!("seed{seed}-frame{n}.hex")), hex).ok();
            }
            report.failures.push((why, f.clone()));
        }
        // Remember forwarded new flows to build replies and ICMP errors about.
        if verdict == XDP_REDIRECT
            && let (Ok(i), Ok(o)) = (parse(&f), parse(&out))
            && cfg.vips.contains(&i.dst)
            && cfg.nat_backends.contains(&o.dst)
        {
            let s = Seen {
                client: i.src,
                vip: i.dst,
                backend: o.dst,
                proto: i.proto,
            };
            if g.seen.len() < 512 {
                g.seen.push(s);
            } else {
                let k = g.rng.usize(..512);
                g.seen[k] = s;
            }
        }
        before = after;
        report.frames += 1;
    }
    report.seconds = t0.elapsed().as_secs_f64();
    let total: u64 = VERDICT_COUNTERS
        .iter()
        .map(|i| before[*i as usize] - start_counts[*i as usize])
        .sum();
    if total != report.frames {
        report.failures.push((
            format!(
                "verdict counters add up to {total}, {} frames were sent",
                report.frames
            ),
            Vec::new(),
        ));
    }
    report
}

/// Checks a saved failing frame against the invariants (replay).
pub fn replay(lab: &mut PacketLab, frame: &[u8]) -> Result<(), String> {
    let ls = listeners();
    lab.apply(ls.clone());
    let cfg = Config::of(&ls);
    let before = lab.counters();
    let (verdict, out) = lab.run(frame);
    let after = lab.counters();
    check(&cfg, frame, verdict, &out, &before, &after)
}
