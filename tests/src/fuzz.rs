//! The datapath fuzzer: frames generated from valid ones of every kind and mutated, run
//! through `BPF_PROG_TEST_RUN` against a configuration with entries in every table, each
//! checked against invariants:
//!
//! - the verdict is never `XDP_ABORTED`, and exactly one verdict counter moves;
//! - `XDP_PASS` leaves the frame unchanged;
//! - `XDP_DROP` moves exactly one drop-reason counter; other verdicts move none;
//! - a redirected frame is of the input's family with a TTL (hop limit) one lower, valid IP and
//!   L4 checksums when the input had them, and goes to a configured backend (NAT: its address
//!   and port; DSR: the VIP, to the backend's MAC; an ICMP or ICMPv6 error: the backend's
//!   address) or back from a VIP (reply path);
//! - an `XDP_TX` frame is a TCP RST from a VIP to the sender, with valid checksums;
//! - no flow enters the verified tables without proof (`half_open_promote` moves only for):
//!   on a NAT listener, a client's ACK that acknowledges the backend's recorded SYN-ACK
//!   (sequence number + 1), or a backend's segment that is neither a SYN-ACK nor an RST; on
//!   a DSR listener, a client's data segment after the handshake's ACK (or after an adopted
//!   flow's first packet); UDP after the two-way exchange (not checked: UDP has no proof to
//!   check). Blind ACKs of every kind — random numbers, before any SYN-ACK, bare SYN + ACK
//!   pairs on DSR — are generated against half-open entries with and without a SYN-ACK;
//! - a backend's UDP reply over its link's MTU is generated as its stack fragments it (first
//!   fragment, then the later ones, IPv4 and IPv6): once the first left from the VIP, every
//!   later fragment of its datagram leaves from the VIP too, never with the backend's address
//!   (`XDP_PASS` would have the stack send it so);
//! - at the end, the verdict counters add up to the frames sent.
//!
//! About a third of the frames are IPv6 (extension headers within and past the parser's
//! bound, fragments, routing headers, ICMPv6 errors and neighbour discovery), against IPv6
//! listeners of every kind.
//!
//! A frame breaking an invariant is printed as hex and written to `tests/fuzz-fixtures/`, from
//! where `fuzz_smoke` replays it on every test run.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::Path,
    time::Instant,
};

use clb::control::model::{BackendSpec, Forward, Kind, ListenerSpec, Proto, Sched};
use clb_common::{
    ConnKey, ConnKey6, HALF_ADOPTED, HALF_F_ACKED, HALF_F_REPLIED, HALF_SYN, HalfOpenValue,
    counter, ip_to_be, ip6_to_be, port_to_be,
};

use crate::{
    lab::{
        PacketLab, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, backend, backend_mac,
        backend6, verdict_name,
    },
    packet::{self, ACK, FrameSpec, RST, SYN, hexdump, icmp_error, parse, verify_checksums},
    packet6::{self, Frame6Spec, icmp6_error, parse6},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const VIP6_2: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x101);

/// The backend number (and MAC suffix) of a lab backend address of either family.
fn backend_no(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    }
}

/// The listeners the fuzzer runs against: every scheduler, forwarding mode, persistence and
/// protocol, two listeners sharing backends, two VIPs.
pub fn listeners() -> Vec<ListenerSpec> {
    let l = |name: &str, vip: IpAddr, port: u16, proto: Proto, persist: u32, bs: &[(u8, u16)]| {
        let mut s = ListenerSpec::new(name, SocketAddr::new(vip, port), proto);
        s.persist = persist;
        s.health_check =
            clb::control::model::HealthCheckSpec::of(clb::control::model::CheckKind::None);
        s.backends = bs
            .iter()
            .map(|(n, p)| {
                let addr: SocketAddr = match vip {
                    IpAddr::V4(_) => backend(*n, *p).into(),
                    IpAddr::V6(_) => backend6(*n, *p).into(),
                };
                BackendSpec::new(addr, 10)
            })
            .collect();
        s
    };
    let mut out = Vec::new();
    for (sfx, vip, vip2, mask) in [
        ("", IpAddr::V4(VIP), IpAddr::V4(VIP2), 24),
        ("6", IpAddr::V6(VIP6), IpAddr::V6(VIP6_2), 64),
    ] {
        let n = |base: &str| format!("{base}{sfx}");
        let mut sticky = l(
            &n("sticky"),
            vip,
            81,
            Proto::Tcp,
            60,
            &[(2, 8080), (3, 8080)],
        );
        let mut dsr = l(&n("dsr"), vip, 82, Proto::Tcp, 0, &[(4, 82), (7, 82)]);
        if let (Kind::L4(s), Kind::L4(d)) = (&mut sticky.kind, &mut dsr.kind) {
            s.sched = Sched::Maglev;
            s.persist_mask = Some(mask);
            d.forward = Forward::Dsr;
        }
        out.extend([
            l(&n("web"), vip, 80, Proto::Tcp, 0, &[(2, 8080), (3, 8080)]),
            sticky,
            dsr,
            l(&n("dns"), vip, 53, Proto::Udp, 30, &[(5, 5353), (6, 5353)]),
            l(&n("other"), vip2, 80, Proto::Tcp, 0, &[(8, 80)]),
        ]);
    }
    out
}

/// The initial sequence number the backend's SYN-ACK of prefilled flow `i` carries.
fn prefill_isn(i: u16) -> u32 {
    0x4000_0000 | u32::from(i).wrapping_mul(7919)
}

/// The prefilled clients (flow `i`, IPv4 and IPv6).
fn prefill_client(i: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 2, 1, (i % 250) as u8 + 1), 20000 + i)
}
fn prefill_client6(i: u16) -> SocketAddrV6 {
    sa6(
        Ipv6Addr::new(0xfd00, 2, 1, 0, 0, 0, 0, (i % 250) + 1),
        20000 + i,
    )
}

/// A (VIP, port, proto) → backends index of the configuration, for checking outputs.
struct Config {
    /// NAT backends: address:port.
    nat_backends: HashSet<SocketAddr>,
    /// DSR backends' MACs — the frame keeps the VIP as destination.
    dsr_macs: HashSet<[u8; 6]>,
    /// VIP:port of every L4 listener.
    vips: HashSet<SocketAddr>,
    backend_ips: HashSet<IpAddr>,
    /// VIP:port of each TCP listener → (its id, whether it is DSR).
    tcp: std::collections::HashMap<SocketAddr, (u16, bool)>,
}

impl Config {
    /// The configuration of `ls` as applied in `lab` (listener ids are the lab's).
    fn applied(ls: &[ListenerSpec], lab: &PacketLab) -> Self {
        let mut c = Self::of(ls);
        for l in ls {
            if l.proto() == Proto::Tcp && l.l4().is_some() {
                let dsr = l.l4().is_some_and(|k| k.forward == Forward::Dsr);
                c.tcp.insert(l.vip, (lab.listener_id(&l.name), dsr));
            }
        }
        c
    }

    /// Whether `ip` is the address of a VIP.
    fn is_vip(&self, ip: IpAddr) -> bool {
        self.vips.iter().any(|v| v.ip() == ip)
    }

    fn of(ls: &[ListenerSpec]) -> Self {
        let mut c = Config {
            nat_backends: HashSet::new(),
            dsr_macs: HashSet::new(),
            vips: HashSet::new(),
            backend_ips: HashSet::new(),
            tcp: std::collections::HashMap::new(),
        };
        for l in ls {
            c.vips.insert(l.vip);
            let dsr = l.l4().is_some_and(|k| k.forward == Forward::Dsr);
            for b in &l.backends {
                c.backend_ips.insert(b.addr.ip());
                if dsr {
                    c.dsr_macs.insert(backend_mac(backend_no(b.addr.ip())));
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
    /// Of those, IPv6 frames per verdict.
    pub verdicts6: [u64; 5],
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
    client: SocketAddr,
    vip: SocketAddr,
    backend: SocketAddr,
    proto: u8,
}

struct Gen {
    rng: fastrand::Rng,
    /// Forwarded flows, IPv4 and IPv6.
    seen: [Vec<Seen>; 2],
    /// The later fragments of a fragmented reply, sent next (in order).
    queued: Vec<Vec<u8>>,
}

fn v4(a: SocketAddr) -> SocketAddrV4 {
    match a {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!("an IPv4 flow"),
    }
}

fn v6(a: SocketAddr) -> SocketAddrV6 {
    match a {
        SocketAddr::V6(a) => a,
        SocketAddr::V4(_) => unreachable!("an IPv6 flow"),
    }
}

fn sa6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
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

    /// A seen flow of family `fam` (0 IPv4, 1 IPv6), if any (half the time).
    fn seen_flow(&mut self, fam: usize) -> Option<Seen> {
        if self.seen[fam].is_empty() || self.rng.bool() {
            return None;
        }
        let i = self.rng.usize(..self.seen[fam].len());
        Some(self.seen[fam][i])
    }

    /// A valid frame of some kind: a third IPv6. The later fragments of a fragmented reply
    /// come right after its first.
    fn frame(&mut self) -> Vec<u8> {
        if !self.queued.is_empty() {
            return self.queued.remove(0);
        }
        if self.rng.u8(..3) == 0 {
            self.frame6()
        } else {
            self.frame4()
        }
    }

    /// The first of `pieces`; the others are queued to follow it.
    fn fragmented(&mut self, mut pieces: Vec<Vec<u8>>) -> Vec<u8> {
        let first = pieces.remove(0);
        self.queued = pieces;
        first
    }

    fn source6(&mut self) -> Ipv6Addr {
        match self.rng.u8(..20) {
            0 => Ipv6Addr::UNSPECIFIED,
            1 => Ipv6Addr::LOCALHOST,
            2 => Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
            3 => Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, self.rng.u16(..)),
            4 => Ipv4Addr::new(10, 2, 0, self.rng.u8(..)).to_ipv6_mapped(),
            5 => self.pick(&[VIP6, VIP6_2]),
            6 => *backend6(self.rng.u8(2..10), 0).ip(),
            7 => "fd00:1::1".parse().unwrap(),
            8 => crate::lab::CLIENT6,
            _ => Ipv6Addr::new(
                0xfd00,
                2,
                self.rng.u16(..4),
                0,
                0,
                0,
                0,
                self.rng.u16(1..250),
            ),
        }
    }

    /// Extension headers for a frame: mostly none, sometimes options (within and past the
    /// parser's bound), a fragment or a routing header.
    fn ext6(&mut self, s: &mut Frame6Spec) {
        if self.rng.u8(..4) != 0 {
            return;
        }
        for _ in 0..self.rng.usize(1..=4) {
            let kind = self.pick(&[
                packet6::HOP_BY_HOP,
                packet6::DEST_OPTS,
                packet6::DEST_OPTS,
                packet6::FRAGMENT,
                packet6::ROUTING,
            ]);
            let body = match kind {
                packet6::FRAGMENT => {
                    let mut b = vec![0u8; 6];
                    b[0..2].copy_from_slice(&self.pick(&[0u16, 1, 8, 9]).to_be_bytes());
                    b[2..6].copy_from_slice(&self.rng.u32(..).to_be_bytes());
                    b
                }
                packet6::ROUTING => vec![0, self.rng.u8(..3), 0, 0, 0, 0],
                _ => {
                    let n = self.pick(&[6usize, 6, 14, 22]);
                    let mut b = vec![1, (n - 2) as u8];
                    b.resize(n, 0);
                    b
                }
            };
            s.ext.push((kind, body));
        }
    }

    /// An IPv6 frame of some kind.
    fn frame6(&mut self) -> Vec<u8> {
        let ports: [(Ipv6Addr, u16); 7] = [
            (VIP6, 80),
            (VIP6, 81),
            (VIP6, 82),
            (VIP6, 53),
            (VIP6_2, 80),
            (VIP6, 443),
            (VIP6, 8),
        ];
        match self.rng.u8(..100) {
            // A client's (or a spoofer's) ACK for a prefilled flow, as in IPv4.
            0..=3 => {
                let i = self.rng.u16(..200);
                let port = self.pick(&[80, 81, 82]);
                let mut s = Frame6Spec::tcp(
                    prefill_client6(i),
                    sa6(VIP6, port),
                    self.pick(&[ACK, ACK | 0x08, ACK | 0x01]),
                );
                s.ack = if self.rng.bool() {
                    prefill_isn(i).wrapping_add(1)
                } else {
                    self.rng.u32(..)
                };
                if self.rng.bool() {
                    s.payload = self.bytes(16);
                }
                s.build()
            }
            // Client → VIP, TCP.
            4..=39 => {
                let (vip, port) = self.pick(&ports);
                let src = sa6(self.source6(), self.rng.u16(1..));
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
                let mut s = Frame6Spec::tcp(src, sa6(vip, port), flags);
                s.seq = self.rng.u32(..);
                s.ack = self.rng.u32(..);
                s.hop_limit = self.ttl();
                s.payload = self.bytes(64);
                self.ext6(&mut s);
                s.build()
            }
            // Client → VIP, UDP.
            40..=54 => {
                let (vip, port) = self.pick(&ports);
                let src = sa6(self.source6(), self.rng.u16(1..));
                let mut s = Frame6Spec::udp(src, sa6(vip, port), &self.bytes(64));
                s.hop_limit = self.ttl();
                s.udp_no_checksum = self.rng.u8(..8) == 0;
                self.ext6(&mut s);
                s.build()
            }
            // Backend → client replies.
            55..=72 => {
                let (bsrc, client, proto) = match self.seen_flow(1) {
                    Some(f) => (v6(f.backend), v6(f.client), f.proto),
                    None => (
                        backend6(self.rng.u8(2..10), self.pick(&[8080, 5353, 80, 82])),
                        sa6(crate::lab::CLIENT6, self.rng.u16(1..)),
                        self.pick(&[6, 17]),
                    ),
                };
                let mut s = if proto == 6 {
                    let mut s = Frame6Spec::tcp(bsrc, client, self.rng.u8(..));
                    s.seq = self.rng.u32(..);
                    s.payload = self.bytes(32);
                    s
                } else {
                    Frame6Spec::udp(bsrc, client, &self.bytes(32))
                };
                s.src_mac = backend_mac(bsrc.ip().octets()[15]);
                s.hop_limit = self.ttl();
                if proto == 17 && self.rng.u8(..3) == 0 {
                    s.payload = self.bytes(3000);
                    let id = self.rng.u32(..);
                    let chunk = 8 * self.rng.usize(1..200);
                    return self.fragmented(packet6::fragments6(&s.build(), chunk, id));
                }
                self.ext6(&mut s);
                s.build()
            }
            // ICMPv6 to a VIP: errors quoting seen flows (or made-up ones), echo, neighbour
            // discovery, any type.
            73..=89 => {
                let (vip, client, proto) = match self.seen_flow(1) {
                    Some(f) => (v6(f.vip), v6(f.client), f.proto),
                    None => (
                        sa6(VIP6, self.pick(&[80, 81, 53, 82])),
                        sa6(crate::lab::CLIENT6, self.rng.u16(1..)),
                        6,
                    ),
                };
                let mut q = if proto == 6 {
                    Frame6Spec::tcp(vip, client, ACK).payload(&self.bytes(32))
                } else {
                    Frame6Spec::udp(vip, client, &self.bytes(32))
                };
                if self.rng.u8(..8) == 0 {
                    q = q.ext(packet6::DEST_OPTS, vec![1, 4, 0, 0, 0, 0]);
                }
                let quoted = q.build();
                let any = self.rng.u8(..);
                let kind = self.pick(&[
                    packet6::PACKET_TOO_BIG,
                    packet6::PACKET_TOO_BIG,
                    packet6::DEST_UNREACH,
                    packet6::TIME_EXCEEDED,
                    packet6::PARAM_PROBLEM,
                    packet6::ECHO_REQUEST,
                    packet6::NEIGHBOR_SOLICIT,
                    packet6::NEIGHBOR_ADVERT,
                    any,
                ]);
                let quote = self.rng.usize(..=quoted.len());
                let any_param = self.rng.u32(..);
                let param = self.pick(&[1280, 1400, 0, any_param]);
                let mut f = icmp6_error(
                    Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0xfe),
                    *vip.ip(),
                    kind,
                    self.rng.u8(..4),
                    param,
                    &quoted,
                    quote,
                );
                f[21] = self.ttl();
                f
            }
            // Other next headers to a VIP (no next header, GRE, SCTP, any).
            90..=95 => {
                let any = self.rng.u8(..);
                let mut s = Frame6Spec::tcp(sa6(self.source6(), 1), sa6(VIP6, 0), 0);
                s.proto = self.pick(&[packet6::NO_NEXT, 47, 132, 41, 50, any]);
                s.payload = self.bytes(64);
                self.ext6(&mut s);
                s.build()
            }
            // Truncated headers.
            _ => {
                let mut f = Frame6Spec::tcp(sa6(self.source6(), 1), sa6(VIP6, 80), SYN).build();
                let n = self.rng.usize(14..f.len());
                f.truncate(n);
                f
            }
        }
    }

    /// A valid IPv4 frame of some kind (or not IPv4 at all).
    fn frame4(&mut self) -> Vec<u8> {
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
            // A client's (or a spoofer's) ACK for a prefilled flow: acknowledging the backend's
            // SYN-ACK or any other number, with or without data.
            0..=4 => {
                let i = self.rng.u16(..200);
                let port = self.pick(&[80, 81, 82]);
                let mut s = FrameSpec::tcp(
                    prefill_client(i),
                    SocketAddrV4::new(VIP, port),
                    self.pick(&[ACK, ACK | 0x08, ACK | 0x01]),
                );
                s.ack = if self.rng.bool() {
                    prefill_isn(i).wrapping_add(1)
                } else {
                    self.rng.u32(..)
                };
                if self.rng.bool() {
                    s.payload = self.bytes(16);
                }
                s.build()
            }
            // Client → VIP, TCP with any flags, options, payload.
            5..=44 => {
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
                let (bsrc, client, proto) = match self.seen_flow(0) {
                    Some(f) => (v4(f.backend), v4(f.client), f.proto),
                    None => (
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
                // A UDP answer over the link's MTU: its stack's fragments, in order.
                if proto == 17 && self.rng.u8(..3) == 0 {
                    s.frag = 0;
                    s.payload = self.bytes(3000);
                    let chunk = 8 * self.rng.usize(1..200);
                    return self.fragmented(packet::fragments(&s.build(), chunk));
                }
                s.build()
            }
            // ICMP to a VIP: errors quoting seen flows (or made-up ones), echo, any type.
            80..=91 => {
                let (vip, client, proto) = match self.seen_flow(0) {
                    Some(f) => (v4(f.vip), v4(f.client), f.proto),
                    None => (
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
                _ if f.len() > 56 && f[12..14] == [0x86, 0xdd] => {
                    // A plausible IPv6 field: payload length, next header, an extension
                    // header's length, the TCP data offset.
                    match self.rng.u8(..4) {
                        0 => f[18..20].copy_from_slice(&self.rng.u16(..).to_be_bytes()),
                        1 => {
                            let any = self.rng.u8(..);
                            f[20] = self.pick(&[0, 6, 17, 43, 44, 58, 59, 60, any]);
                        }
                        2 => f[55] = self.rng.u8(..),
                        _ => {
                            if f.len() > 66 {
                                f[66] = self.rng.u8(..);
                            }
                        }
                    }
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
    let is6 = |f: &[u8]| f.len() >= 14 && f[12..14] == [0x86, 0xdd];
    // A fragment's transport checksum covers the whole datagram: not checkable alone.
    let valid_in = if fragment_of(input).is_some() {
        false
    } else if is6(input) {
        packet6::verify_checksums6(input).is_ok()
    } else {
        input.len() >= 34 && input[12..14] == [0x08, 0x00] && verify_checksums(input).is_ok()
    };
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
            let p = flow(out).map_err(|e| format!("TX frame unparsable: {e}"))?;
            verify_checksums(out).map_err(|e| format!("TX frame: {e}"))?;
            if p.proto != 6 || p.tcp_flags & 0x04 == 0 {
                return Err("TX frame is not an RST".into());
            }
            if is6(out) != is6(input) {
                return Err("TX frame of the other family".into());
            }
            if !cfg.vips.contains(&p.src) {
                return Err(format!("RST from {} (not a VIP)", p.src));
            }
            Ok(())
        }
        XDP_REDIRECT => {
            let (v6in, v6out) = (is6(input), is6(out));
            if v6in != v6out {
                return Err("redirected frame of the other family".into());
            }
            if !v6out && (out.len() < 34 || out[12..14] != [0x08, 0x00]) {
                return Err("redirected frame is not IPv4".into());
            }
            if v6out && out.len() < 54 {
                return Err("redirected IPv6 frame too short".into());
            }
            let ttl = if v6out { 21 } else { 22 };
            if out[ttl].checked_add(1) != Some(input[ttl]) {
                return Err(format!("TTL {} → {}", input[ttl], out[ttl]));
            }
            if valid_in {
                verify_checksums(out).map_err(|e| format!("redirected with {e}"))?;
            }
            // A reply's fragment (the later ones have no ports): from a VIP.
            if fragment_of(out).is_some() {
                return if cfg.is_vip(source_of(out)) {
                    Ok(())
                } else {
                    Err(format!("fragment redirected from {}", source_of(out)))
                };
            }
            let dst_mac: [u8; 6] = out[0..6].try_into().expect("6 bytes");
            let p = flow(out).map_err(|e| format!("redirected frame unparsable: {e}"))?;
            if p.proto == if v6out { 58 } else { 1 } {
                return if cfg.backend_ips.contains(&p.dst.ip()) || cfg.dsr_macs.contains(&dst_mac) {
                    Ok(())
                } else {
                    Err(format!("ICMP redirected to {}", p.dst.ip()))
                };
            }
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
                "redirected {} → {}: neither to a backend nor from a VIP",
                p.src, p.dst
            ))
        }
        _ => Ok(()),
    }
}

/// A UDP fragment's datagram key (source, destination, identification), its offset and
/// its TTL or hop limit: IPv4, or IPv6 with the fragment header first.
fn fragment_of(f: &[u8]) -> Option<(Vec<u8>, usize, u8)> {
    if f.len() >= 34 && f[12..14] == [0x08, 0x00] && f[14] >> 4 == 4 && f[23] == 17 {
        let fo = u16::from_be_bytes([f[20], f[21]]);
        if fo & 0x3fff == 0 {
            return None;
        }
        let key = [&f[26..34], &f[18..20]].concat();
        return Some((key, usize::from(fo & 0x1fff) * 8, f[22]));
    }
    if f.len() >= 62 && f[12..14] == [0x86, 0xdd] && f[20] == 44 && f[54] == 17 {
        let fo = u16::from_be_bytes([f[56], f[57]]);
        let key = [&f[22..54], &f[58..62]].concat();
        return Some((key, usize::from(fo & 0xfff8), f[21]));
    }
    None
}

/// The source address of an IPv4 or IPv6 frame (unspecified if it is neither).
fn source_of(f: &[u8]) -> IpAddr {
    if f.len() >= 34 && f[12..14] == [0x08, 0x00] {
        return IpAddr::V4(Ipv4Addr::new(f[26], f[27], f[28], f[29]));
    }
    if f.len() >= 54 && f[12..14] == [0x86, 0xdd] {
        let a: [u8; 16] = f[22..38].try_into().expect("16 bytes");
        return IpAddr::V6(a.into());
    }
    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
}

/// The family-independent fields of a frame.
struct Flow {
    src: SocketAddr,
    dst: SocketAddr,
    proto: u8,
    tcp_flags: u8,
}

/// Parses an IPv4 (TCP, UDP or ICMP: ports 0) or IPv6 (TCP, UDP, ICMPv6) frame.
fn flow(f: &[u8]) -> Result<Flow, String> {
    if f.len() >= 14 && f[12..14] == [0x86, 0xdd] {
        let p = parse6(f)?;
        return Ok(Flow {
            src: p.src.into(),
            dst: p.dst.into(),
            proto: p.proto,
            tcp_flags: p.tcp_flags,
        });
    }
    if f.len() >= 34 && f[12..14] == [0x08, 0x00] && f[23] == 1 {
        let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]));
        return Ok(Flow {
            src: SocketAddr::new(ip(26), 0),
            dst: SocketAddr::new(ip(30), 0),
            proto: 1,
            tcp_flags: 0,
        });
    }
    let p = parse(f)?;
    Ok(Flow {
        src: p.src.into(),
        dst: p.dst.into(),
        proto: p.proto,
        tcp_flags: p.tcp_flags,
    })
}

/// Runs `frames` frames (seeded by `seed`) through the lab's program; writes failing inputs
/// under `failures_dir` (if given).
pub fn run(lab: &mut PacketLab, frames: u64, seed: u64, failures_dir: Option<&Path>) -> FuzzReport {
    let ls = listeners();
    lab.apply(ls.clone());
    let cfg = Config::applied(&ls, lab);
    let mut g = Gen {
        rng: fastrand::Rng::with_seed(seed),
        seen: [Vec::new(), Vec::new()],
        queued: Vec::new(),
    };
    // Entries in every table: verified flows (handshakes completed with the backend's
    // SYN-ACK, or on DSR with a data segment), half-open ones with and without a recorded
    // SYN-ACK, persisted and pending clients.
    for i in 0..200u16 {
        let c = prefill_client(i);
        for port in [80, 81, 82] {
            let vip = SocketAddrV4::new(VIP, port);
            let (_, out) = lab.run(&FrameSpec::tcp(c, vip, SYN).build());
            if port != 82
                && i % 4 != 3
                && let Ok(o) = parse(&out)
            {
                let mut sa = FrameSpec::tcp(o.dst, c, SYN | ACK);
                sa.src_mac = backend_mac(o.dst.ip().octets()[3]);
                sa.seq = prefill_isn(i);
                sa.ack = 1001;
                lab.run_on(lab.backend_if, &sa.build());
            }
            if i % 2 == 0 {
                let mut ack = FrameSpec::tcp(c, vip, ACK);
                ack.ack = prefill_isn(i).wrapping_add(1);
                lab.run(&ack.build());
                if port == 82 {
                    lab.run(&ack.payload(b"data").build());
                }
            }
        }
        lab.run(&FrameSpec::udp(c, SocketAddrV4::new(VIP, 53), b"q").build());
        let c6 = prefill_client6(i);
        for port in [80, 81, 82] {
            let vip = sa6(VIP6, port);
            let (_, out) = lab.run(&Frame6Spec::tcp(c6, vip, SYN).build());
            if port != 82
                && i % 4 != 3
                && let Ok(o) = parse6(&out)
            {
                let mut sa = Frame6Spec::tcp(o.dst, c6, SYN | ACK);
                sa.src_mac = backend_mac(o.dst.ip().octets()[15]);
                sa.seq = prefill_isn(i);
                sa.ack = 1001;
                lab.run_on(lab.backend_if, &sa.build());
            }
            if i % 2 == 0 {
                let mut ack = Frame6Spec::tcp(c6, vip, ACK);
                ack.ack = prefill_isn(i).wrapping_add(1);
                lab.run(&ack.build());
                if port == 82 {
                    lab.run(&ack.payload(b"data").build());
                }
            }
        }
        lab.run(&Frame6Spec::udp(c6, sa6(VIP6, 53), b"q").build());
    }
    let mut report = FuzzReport::default();
    // The datagram (source, destination, identification) whose first fragment was last
    // SNATed to a VIP.
    let mut snatted: Option<Vec<u8>> = None;
    let mut before = lab.counters();
    let start_counts = before;
    let t0 = Instant::now();
    for n in 0..frames {
        let mut f = g.frame();
        let mutated = g.rng.bool();
        if mutated {
            g.mutate(&mut f);
        }
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (no NIC delivers
        // one): pad those.
        if f.len() < 14 {
            f.resize(14, 0);
        }
        let claim = Claim::before(&cfg, lab, &f);
        let (verdict, out) = lab.run(&f);
        let after = lab.counters();
        let promoted = after[counter::HALF_OPEN_PROMOTE as usize]
            - before[counter::HALF_OPEN_PROMOTE as usize];
        if let Some(slot) = report.verdicts.get_mut(verdict as usize) {
            *slot += 1;
        }
        if f[12..14] == [0x86, 0xdd]
            && let Some(slot) = report.verdicts6.get_mut(verdict as usize)
        {
            *slot += 1;
        }
        // A later fragment of a reply datagram whose first fragment left from the VIP must
        // leave from the VIP too (passed, the stack would send it with the backend's address).
        let fragment = fragment_of(&f);
        let leaked = match fragment {
            Some((key, 0, _)) => {
                if verdict == XDP_REDIRECT && cfg.is_vip(source_of(&out)) {
                    snatted = Some(key);
                }
                Ok(())
            }
            Some((key, _, hops)) if !mutated && hops > 1 && snatted.as_ref() == Some(&key) => {
                if verdict == XDP_REDIRECT && cfg.is_vip(source_of(&out)) {
                    Ok(())
                } else {
                    Err(format!(
                        "a later fragment of a reply SNATed to the VIP left as {} from {}",
                        verdict_name(verdict),
                        source_of(&out)
                    ))
                }
            }
            _ => Ok(()),
        };
        if let Err(why) = check(&cfg, &f, verdict, &out, &before, &after)
            .and(leaked)
            .and_then(|()| claim.justifies(promoted))
        {
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
            && let (Ok(i), Ok(o)) = (flow(&f), flow(&out))
            && matches!(i.proto, 6 | 17)
            && cfg.vips.contains(&i.dst)
            && cfg.nat_backends.contains(&o.dst)
        {
            let s = Seen {
                client: i.src,
                vip: i.dst,
                backend: o.dst,
                proto: i.proto,
            };
            let seen = &mut g.seen[usize::from(s.client.is_ipv6())];
            if seen.len() < 512 {
                seen.push(s);
            } else {
                let k = g.rng.usize(..512);
                seen[k] = s;
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
    let cfg = Config::applied(&ls, lab);
    let before = lab.counters();
    let claim = Claim::before(&cfg, lab, frame);
    let (verdict, out) = lab.run(frame);
    let after = lab.counters();
    let promoted =
        after[counter::HALF_OPEN_PROMOTE as usize] - before[counter::HALF_OPEN_PROMOTE as usize];
    check(&cfg, frame, verdict, &out, &before, &after).and_then(|()| claim.justifies(promoted))
}

/// What a frame could prove, read before it runs: whether a promotion it causes is justified.
enum Claim {
    /// A client's TCP segment to a TCP listener, with the flow's half-open entry then.
    Client {
        dsr: bool,
        half: Option<HalfOpenValue>,
        flags: u8,
        ack: u32,
        data: bool,
    },
    /// A NAT backend's TCP segment.
    Backend { flags: u8 },
    /// Anything else (UDP, ICMP, not parsable): UDP's exchange is its only proof; the others
    /// promote nothing in the datapath, so they are checked against nothing.
    Other,
}

impl Claim {
    fn before(cfg: &Config, lab: &PacketLab, f: &[u8]) -> Self {
        let is6 = f.len() >= 14 && f[12..14] == [0x86, 0xdd];
        let (src, dst, proto, flags, ack, data): (SocketAddr, SocketAddr, u8, u8, u32, bool) =
            if is6 {
                match parse6(f) {
                    Ok(p) => (
                        p.src.into(),
                        p.dst.into(),
                        p.proto,
                        p.tcp_flags,
                        p.ack,
                        !p.payload.is_empty(),
                    ),
                    Err(_) => return Self::Other,
                }
            } else {
                match parse(f) {
                    Ok(p) => (
                        p.src.into(),
                        p.dst.into(),
                        p.proto,
                        p.tcp_flags,
                        p.ack,
                        !p.payload.is_empty(),
                    ),
                    Err(_) => return Self::Other,
                }
            };
        if proto != 6 {
            return Self::Other;
        }
        if cfg.nat_backends.contains(&src) {
            return Self::Backend { flags };
        }
        let Some((id, dsr)) = cfg.tcp.get(&dst).copied() else {
            return Self::Other;
        };
        let half = match src {
            SocketAddr::V4(c) => lab.half_open(&ConnKey {
                client: ip_to_be(c.ip().octets()),
                client_port: port_to_be(c.port()),
                listener: id,
                proto: 6,
                _pad: [0; 3],
            }),
            SocketAddr::V6(c) => lab.half_open6(&ConnKey6 {
                client: ip6_to_be(c.ip().octets()),
                client_port: port_to_be(c.port()),
                listener: id,
                proto: 6,
                _pad: [0; 3],
            }),
        };
        Self::Client {
            dsr,
            half,
            flags,
            ack,
            data,
        }
    }

    /// `Err` if the frame promoted a flow (`promoted` > 0) it could not prove.
    fn justifies(&self, promoted: u64) -> Result<(), String> {
        if promoted == 0 {
            return Ok(());
        }
        let plain_ack = |flags: u8| flags & (SYN | ACK | RST) == ACK;
        match self {
            Self::Other => Ok(()),
            Self::Backend { flags } if flags & (SYN | RST) == 0 => Ok(()),
            Self::Backend { flags } => Err(format!(
                "a backend's segment with flags {flags:#04x} (SYN-ACK or RST) promoted a flow"
            )),
            Self::Client {
                dsr,
                half,
                flags,
                ack,
                data,
            } => {
                let Some(h) = half else {
                    return Err("a client segment promoted a flow without a half-open entry".into());
                };
                let proven = match (h.kind, dsr) {
                    (HALF_SYN, false) => {
                        plain_ack(*flags)
                            && h.flags & HALF_F_REPLIED != 0
                            && *ack == h.backend_isn.wrapping_add(1)
                    }
                    (HALF_SYN, true) => plain_ack(*flags) && h.flags & HALF_F_ACKED != 0 && *data,
                    (HALF_ADOPTED, true) => *data && flags & (SYN | RST) == 0,
                    _ => false,
                };
                if proven {
                    Ok(())
                } else {
                    Err(format!(
                        "promoted without proof: half-open {h:?}, DSR {dsr}, flags {flags:#04x}, ack {ack:#x}, data {data}"
                    ))
                }
            }
        }
    }
}
