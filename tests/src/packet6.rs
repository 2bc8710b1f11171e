//! Hand-built Ethernet/IPv6 frames (extension headers, TCP, UDP, ICMPv6) with correct
//! checksums, a parser, and a from-scratch checksum verifier: the IPv6 side of
//! [`crate::packet`].

use std::net::{Ipv6Addr, SocketAddrV6};

use crate::packet::{ACK, CLIENT_MAC, ETH_LEN, LB_MAC, checksum_with};

/// Length of the fixed IPv6 header.
pub const IP6_LEN: usize = 40;
/// Extension header types.
pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DEST_OPTS: u8 = 60;
pub const NO_NEXT: u8 = 59;
/// ICMPv6 types.
pub const DEST_UNREACH: u8 = 1;
pub const PACKET_TOO_BIG: u8 = 2;
pub const TIME_EXCEEDED: u8 = 3;
pub const PARAM_PROBLEM: u8 = 4;
pub const ECHO_REQUEST: u8 = 128;
pub const NEIGHBOR_SOLICIT: u8 = 135;
pub const NEIGHBOR_ADVERT: u8 = 136;

/// Description of an IPv6 frame to build.
#[derive(Clone, Debug)]
pub struct Frame6Spec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    /// Upper-layer protocol: 6 (TCP), 17 (UDP), 58 (ICMPv6, `payload` is the whole message
    /// without its checksum filled), or another (raw payload).
    pub proto: u8,
    pub hop_limit: u8,
    /// Extension headers in order: (type, body after the 2-byte next-header/length prefix),
    /// zero-padded to a multiple of 8 bytes with the prefix.
    pub ext: Vec<(u8, Vec<u8>)>,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
    /// UDP: checksum 0 (illegal in IPv6; the datapath must not forward it as if valid).
    pub udp_no_checksum: bool,
}

impl Frame6Spec {
    pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            src,
            dst,
            proto: 6,
            hop_limit: 64,
            ext: Vec::new(),
            tcp_flags: flags,
            seq: 1000,
            ack: if flags & ACK != 0 { 2000 } else { 0 },
            payload: Vec::new(),
            udp_no_checksum: false,
        }
    }

    pub fn udp(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Self {
        Self {
            proto: 17,
            tcp_flags: 0,
            ack: 0,
            payload: payload.to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    /// An ICMPv6 message `kind`/`code` whose body (after the 4-byte type/code/checksum) is
    /// `body`.
    pub fn icmp(src: Ipv6Addr, dst: Ipv6Addr, kind: u8, code: u8, body: &[u8]) -> Self {
        let mut msg = vec![kind, code, 0, 0];
        msg.extend_from_slice(body);
        Self {
            proto: 58,
            tcp_flags: 0,
            ack: 0,
            payload: msg,
            ..Self::tcp(
                SocketAddrV6::new(src, 0, 0, 0),
                SocketAddrV6::new(dst, 0, 0, 0),
                0,
            )
        }
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    /// Adds an extension header of `kind` with a `body`-byte body (PadN options for hop-by-hop
    /// and destination options).
    pub fn ext(mut self, kind: u8, body: Vec<u8>) -> Self {
        self.ext.push((kind, body));
        self
    }

    pub fn build(&self) -> Vec<u8> {
        build(self)
    }
}

/// Sum of the IPv6 pseudo-header for an upper-layer packet of `len` bytes.
fn pseudo(src: &Ipv6Addr, dst: &Ipv6Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, proto]);
    p
}

/// The checksum of upper-layer packet `l4` between `src` and `dst`.
pub fn l4_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, proto: u8, l4: &[u8]) -> u16 {
    checksum_with(&pseudo(src, dst, proto, l4.len()), l4)
}

fn build(s: &Frame6Spec) -> Vec<u8> {
    let (src, dst) = (s.src.ip(), s.dst.ip());
    let l4: Vec<u8> = match s.proto {
        6 => {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&s.src.port().to_be_bytes());
            t[2..4].copy_from_slice(&s.dst.port().to_be_bytes());
            t[4..8].copy_from_slice(&s.seq.to_be_bytes());
            t[8..12].copy_from_slice(&s.ack.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = s.tcp_flags;
            t[14..16].copy_from_slice(&64240u16.to_be_bytes());
            t.extend_from_slice(&s.payload);
            let c = l4_checksum(src, dst, 6, &t);
            t[16..18].copy_from_slice(&c.to_be_bytes());
            t
        }
        17 => {
            let mut u = vec![0u8; 8];
            u[0..2].copy_from_slice(&s.src.port().to_be_bytes());
            u[2..4].copy_from_slice(&s.dst.port().to_be_bytes());
            u[4..6].copy_from_slice(&((8 + s.payload.len()) as u16).to_be_bytes());
            u.extend_from_slice(&s.payload);
            if !s.udp_no_checksum {
                let mut c = l4_checksum(src, dst, 17, &u);
                if c == 0 {
                    c = 0xffff;
                }
                u[6..8].copy_from_slice(&c.to_be_bytes());
            }
            u
        }
        58 if s.payload.len() >= 4 => {
            let mut m = s.payload.clone();
            m[2] = 0;
            m[3] = 0;
            let c = l4_checksum(src, dst, 58, &m);
            m[2..4].copy_from_slice(&c.to_be_bytes());
            m
        }
        _ => s.payload.clone(),
    };
    let mut exts = Vec::new();
    for (i, (_, body)) in s.ext.iter().enumerate() {
        let next = s.ext.get(i + 1).map_or(s.proto, |e| e.0);
        let mut h = vec![next, 0];
        h.extend_from_slice(body);
        while !h.len().is_multiple_of(8) {
            h.push(0);
        }
        h[1] = (h.len() / 8 - 1) as u8;
        if s.ext[i].0 == FRAGMENT {
            h[1] = 0; // reserved, and the header is always 8 bytes
            h.truncate(8);
        }
        exts.extend_from_slice(&h);
    }
    let first = s.ext.first().map_or(s.proto, |e| e.0);
    let mut f = Vec::with_capacity(ETH_LEN + IP6_LEN + exts.len() + l4.len());
    f.extend_from_slice(&s.dst_mac);
    f.extend_from_slice(&s.src_mac);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((exts.len() + l4.len()) as u16).to_be_bytes());
    f.push(first);
    f.push(s.hop_limit);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&exts);
    f.extend_from_slice(&l4);
    f
}

/// An ICMPv6 error from `router` to `to` of `kind`/`code` with the 32-bit `param` (the MTU of
/// a packet too big, the pointer of a parameter problem), quoting the first `quote` bytes of
/// the IPv6 packet in `quoted` (a frame built by [`Frame6Spec::build`]).
pub fn icmp6_error(
    router: Ipv6Addr,
    to: Ipv6Addr,
    kind: u8,
    code: u8,
    param: u32,
    quoted: &[u8],
    quote: usize,
) -> Vec<u8> {
    let inner = &quoted[ETH_LEN..];
    let inner = &inner[..quote.min(inner.len())];
    let mut body = param.to_be_bytes().to_vec();
    body.extend_from_slice(inner);
    Frame6Spec::icmp(router, to, kind, code, &body).build()
}

/// The fields of a parsed IPv6 frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed6 {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: SocketAddrV6,
    pub dst: SocketAddrV6,
    /// The upper-layer protocol (after hop-by-hop and destination options headers).
    pub proto: u8,
    pub hop_limit: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// The upper-layer payload (ICMPv6: the message after type/code/checksum).
    pub payload: Vec<u8>,
    /// Offset of the upper-layer header in the frame.
    pub l4_off: usize,
}

/// The upper-layer protocol and its offset within the IPv6 packet `ip` (options headers
/// skipped; a fragment or routing header ends the walk).
fn upper(ip: &[u8], end: usize) -> Result<(u8, usize), String> {
    let (mut nh, mut off) = (ip[6], IP6_LEN);
    while matches!(nh, HOP_BY_HOP | DEST_OPTS) {
        if off + 2 > end {
            return Err("extension header cut off".into());
        }
        let len = (usize::from(ip[off + 1]) + 1) * 8;
        nh = ip[off];
        off += len;
        if off > end {
            return Err("extension header cut off".into());
        }
    }
    Ok((nh, off))
}

/// Parses an Ethernet/IPv6/TCP, UDP or ICMPv6 frame.
pub fn parse6(f: &[u8]) -> Result<Parsed6, String> {
    if f.len() < ETH_LEN + IP6_LEN || f[12..14] != [0x86, 0xdd] {
        return Err("not an IPv6 frame".into());
    }
    let ip = &f[ETH_LEN..];
    let end = IP6_LEN + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if end > ip.len() {
        return Err(format!("payload length {} past the frame", end - IP6_LEN));
    }
    let (proto, off) = upper(ip, end)?;
    let l4 = &ip[off..end];
    let addr = |b: &[u8]| Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap());
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let (sport, dport, flags, seq, ack, payload) = match proto {
        6 if l4.len() >= 20 => {
            let doff = usize::from(l4[12] >> 4) * 4;
            (
                port(&l4[0..]),
                port(&l4[2..]),
                l4[13],
                u32::from_be_bytes(l4[4..8].try_into().unwrap()),
                u32::from_be_bytes(l4[8..12].try_into().unwrap()),
                l4.get(doff..).unwrap_or_default().to_vec(),
            )
        }
        17 if l4.len() >= 8 => (port(&l4[0..]), port(&l4[2..]), 0, 0, 0, l4[8..].to_vec()),
        58 if l4.len() >= 4 => (0, 0, 0, 0, 0, l4[4..].to_vec()),
        p => return Err(format!("protocol {p} ({} bytes)", l4.len())),
    };
    Ok(Parsed6 {
        dst_mac: f[0..6].try_into().unwrap(),
        src_mac: f[6..12].try_into().unwrap(),
        src: SocketAddrV6::new(addr(&ip[8..24]), sport, 0, 0),
        dst: SocketAddrV6::new(addr(&ip[24..40]), dport, 0, 0),
        proto,
        hop_limit: ip[7],
        tcp_flags: flags,
        seq,
        ack,
        payload,
        l4_off: ETH_LEN + off,
    })
}

/// Recomputes the TCP, UDP or ICMPv6 checksum of IPv6 frame `f` from scratch (and that of a
/// quoted packet's transport header where an ICMPv6 error quotes it whole) and says which,
/// if any, is wrong.
pub fn verify_checksums6(f: &[u8]) -> Result<(), String> {
    if f.len() < ETH_LEN + IP6_LEN {
        return Err("too short for IPv6".into());
    }
    let ip = &f[ETH_LEN..];
    let end = IP6_LEN + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    if end > ip.len() {
        return Err("payload length past the frame".into());
    }
    let (proto, off) = upper(ip, end)?;
    let (src, dst) = (
        Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap()),
        Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap()),
    );
    let l4 = &ip[off..end];
    let ok = |l4: &[u8], proto| l4_checksum(&src, &dst, proto, l4) == 0;
    match proto {
        6 | 17 if l4.len() < 8 => Err("L4 header cut off".into()),
        6 if !ok(l4, 6) => Err("TCP checksum is wrong".into()),
        17 if l4[6..8] == [0, 0] => Err("UDP checksum 0 (not allowed over IPv6)".into()),
        17 if !ok(l4, 17) => Err("UDP checksum is wrong".into()),
        58 if l4.len() < 4 || !ok(l4, 58) => Err("ICMPv6 checksum is wrong".into()),
        58 if matches!(l4[0], 1..=4) && l4.len() >= 8 + IP6_LEN => {
            // The quoted packet: its transport checksum, if it is quoted whole.
            let q = &l4[8..];
            let qend = IP6_LEN + usize::from(u16::from_be_bytes([q[4], q[5]]));
            if qend != q.len() {
                return Ok(());
            }
            let (qp, qoff) = upper(q, qend)?;
            let (qs, qd) = (
                Ipv6Addr::from(<[u8; 16]>::try_from(&q[8..24]).unwrap()),
                Ipv6Addr::from(<[u8; 16]>::try_from(&q[24..40]).unwrap()),
            );
            if matches!(qp, 6 | 17) && l4_checksum(&qs, &qd, qp, &q[qoff..]) != 0 {
                return Err("quoted transport checksum is wrong".into());
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Splits an IPv6 frame without extension headers into fragments of at most `chunk` bytes of
/// its upper-layer packet (a multiple of 8), each with a fragment header of identification
/// `id`, as a sender's stack does.
pub fn fragments6(frame: &[u8], chunk: usize, id: u32) -> Vec<Vec<u8>> {
    assert!(chunk.is_multiple_of(8) && chunk > 0, "chunk {chunk}");
    let head = &frame[..ETH_LEN + IP6_LEN];
    let proto = head[ETH_LEN + 6];
    let payload = &frame[ETH_LEN + IP6_LEN..];
    let n = payload.len().div_ceil(chunk);
    (0..n)
        .map(|i| {
            let part = &payload[i * chunk..((i + 1) * chunk).min(payload.len())];
            let mut f = head.to_vec();
            f[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&((8 + part.len()) as u16).to_be_bytes());
            f[ETH_LEN + 6] = FRAGMENT;
            let more = u16::from(i + 1 < n);
            f.extend_from_slice(&[proto, 0]);
            f.extend_from_slice(&(((i * chunk) as u16) | more).to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(part);
            f
        })
        .collect()
}

/// Reassembles IPv6 fragments made like [`fragments6`]'s (in any order) into the frame
/// without the fragment header. `Err` if they are not one datagram (source, destination or
/// identification not shared), or leave a gap or no last fragment.
pub fn reassemble6(frags: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    let key = |f: &[u8]| {
        (
            f[ETH_LEN + 8..ETH_LEN + IP6_LEN].to_vec(),
            f[ETH_LEN + IP6_LEN + 4..ETH_LEN + IP6_LEN + 8].to_vec(),
        )
    };
    let first = frags.first().ok_or("no fragments")?;
    let mut parts: Vec<(usize, bool, &[u8])> = Vec::new();
    for f in frags {
        if f[ETH_LEN + 6] != FRAGMENT {
            return Err("not a fragment".into());
        }
        if key(f) != key(first) {
            return Err("fragment of another datagram (source, destination or id)".into());
        }
        let h = &f[ETH_LEN + IP6_LEN..];
        let fo = u16::from_be_bytes([h[2], h[3]]);
        let len = usize::from(u16::from_be_bytes([f[ETH_LEN + 4], f[ETH_LEN + 5]]));
        parts.push((usize::from(fo & 0xfff8), fo & 1 != 0, &h[8..len]));
    }
    parts.sort_by_key(|p| p.0);
    let mut payload = Vec::new();
    for (off, _, data) in &parts {
        if *off != payload.len() {
            return Err(format!("gap at {} (next fragment at {off})", payload.len()));
        }
        payload.extend_from_slice(data);
    }
    if parts.last().is_some_and(|p| p.1) {
        return Err("no last fragment".into());
    }
    let proto = first[ETH_LEN + IP6_LEN];
    let mut f = first[..ETH_LEN + IP6_LEN].to_vec();
    f[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    f[ETH_LEN + 6] = proto;
    f.extend_from_slice(&payload);
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_verify_and_parse_back() {
        let s = Frame6Spec::tcp(
            "[fd00:1::2]:40000".parse().unwrap(),
            "[fd00::100]:80".parse().unwrap(),
            crate::packet::SYN,
        )
        .payload(b"hello")
        .ext(HOP_BY_HOP, vec![1, 2, 0, 0])
        .ext(DEST_OPTS, vec![1, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let f = s.build();
        verify_checksums6(&f).unwrap();
        let p = parse6(&f).unwrap();
        assert_eq!((p.src, p.dst, p.proto), (s.src, s.dst, 6));
        assert_eq!(p.payload, b"hello");
        assert_eq!(p.l4_off, ETH_LEN + IP6_LEN + 8 + 16);
        let u = Frame6Spec::udp(s.src, s.dst, b"odd").build();
        verify_checksums6(&u).unwrap();
        let mut bad = u.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(verify_checksums6(&bad).is_err());
        let e = icmp6_error(
            "fd00:1::fe".parse().unwrap(),
            "fd00::100".parse().unwrap(),
            PACKET_TOO_BIG,
            0,
            1280,
            &u,
            usize::MAX,
        );
        verify_checksums6(&e).unwrap();
        assert_eq!(parse6(&e).unwrap().proto, 58);
    }
}
