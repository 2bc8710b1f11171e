//! Hand-built Ethernet/IPv4/TCP/UDP frames with correct checksums, a parser, and a checksum
//! verifier that recomputes everything from scratch (so incremental updates are checked
//! against the definition, not against themselves).

use std::net::{Ipv4Addr, SocketAddrV4};

/// TCP flag bits.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

pub const ETH_LEN: usize = 14;

/// MAC address of the hand-built frames' sender.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
/// MAC address the hand-built frames are sent to.
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];

/// Description of a frame to build.
#[derive(Clone, Debug)]
pub struct FrameSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// 6 (TCP), 17 (UDP), or another protocol number (raw payload after the IPv4 header).
    pub proto: u8,
    pub ttl: u8,
    /// IPv4 options (padded to 4 bytes).
    pub ip_options: Vec<u8>,
    /// IPv4 flags+fragment offset field (host order).
    pub frag: u16,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
    /// UDP: send checksum 0 ("none").
    pub udp_no_checksum: bool,
}

impl FrameSpec {
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            src,
            dst,
            proto: 6,
            ttl: 64,
            ip_options: Vec::new(),
            frag: 0x4000,
            tcp_flags: flags,
            seq: 1000,
            ack: if flags & ACK != 0 { 2000 } else { 0 },
            payload: Vec::new(),
            udp_no_checksum: false,
        }
    }

    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Self {
        Self {
            proto: 17,
            tcp_flags: 0,
            ack: 0,
            payload: payload.to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    pub fn build(&self) -> Vec<u8> {
        build(self)
    }
}

/// One's-complement sum of 16-bit big-endian words.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let (pairs, rest) = data.as_chunks::<2>();
    for c in pairs {
        acc += u32::from(u16::from_be_bytes(*c));
    }
    if let [last] = rest {
        acc += u32::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Internet checksum of `data` (the value to store).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

/// Internet checksum of `prefix` (an even length: a pseudo-header) followed by `data`.
pub fn checksum_with(prefix: &[u8], data: &[u8]) -> u16 {
    !fold(sum16(data, sum16(prefix, 0)))
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.push(0);
    p.push(proto);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    sum16(&p, 0)
}

fn build(s: &FrameSpec) -> Vec<u8> {
    let mut opts = s.ip_options.clone();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let ihl = 20 + opts.len();
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
            let c = !fold(sum16(&t, pseudo(*s.src.ip(), *s.dst.ip(), 6, t.len())));
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
                let mut c = !fold(sum16(&u, pseudo(*s.src.ip(), *s.dst.ip(), 17, u.len())));
                if c == 0 {
                    c = 0xffff;
                }
                u[6..8].copy_from_slice(&c.to_be_bytes());
            }
            u
        }
        _ => s.payload.clone(),
    };
    let mut f = Vec::with_capacity(ETH_LEN + ihl + l4.len());
    f.extend_from_slice(&s.dst_mac);
    f.extend_from_slice(&s.src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0u8; 20];
    ip[0] = 0x40 | (ihl / 4) as u8;
    ip[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6..8].copy_from_slice(&s.frag.to_be_bytes());
    ip[8] = s.ttl;
    ip[9] = s.proto;
    ip[12..16].copy_from_slice(&s.src.ip().octets());
    ip[16..20].copy_from_slice(&s.dst.ip().octets());
    ip.extend_from_slice(&opts);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// An ICMP error frame from `router` to `to` of `kind`/`code` (and next-hop MTU `mtu` for
/// fragmentation needed), quoting the first `quote` bytes of the IPv4 packet in `quoted` (a
/// frame built by [`FrameSpec::build`]; its Ethernet header is skipped).
pub fn icmp_error(
    router: Ipv4Addr,
    to: Ipv4Addr,
    kind: u8,
    code: u8,
    mtu: u16,
    quoted: &[u8],
    quote: usize,
) -> Vec<u8> {
    let inner = &quoted[ETH_LEN..];
    let inner = &inner[..quote.min(inner.len())];
    let mut icmp = vec![kind, code, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(inner);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let spec = FrameSpec {
        proto: 1,
        payload: icmp,
        ..FrameSpec::tcp(SocketAddrV4::new(router, 0), SocketAddrV4::new(to, 0), 0)
    };
    spec.build()
}

/// The fields of a parsed frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub ttl: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
}

/// Parses an Ethernet/IPv4/TCP-or-UDP frame.
pub fn parse(f: &[u8]) -> Result<Parsed, String> {
    if f.len() < ETH_LEN + 20 || f[12..14] != [0x08, 0x00] {
        return Err("not an IPv4 frame".into());
    }
    let ip = &f[ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if tot > ip.len() || ihl < 20 || tot < ihl {
        return Err(format!(
            "bad lengths ihl {ihl} total {tot} frame {}",
            f.len()
        ));
    }
    let l4 = &ip[ihl..tot];
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let (sport, dport, flags, seq, ack, payload) = match ip[9] {
        6 if l4.len() < 20 || usize::from(l4[12] >> 4) * 4 > l4.len() => {
            return Err(format!("TCP header cut off ({} bytes)", l4.len()));
        }
        17 if l4.len() < 8 => return Err(format!("UDP header cut off ({} bytes)", l4.len())),
        6 => {
            let doff = usize::from(l4[12] >> 4) * 4;
            (
                port(&l4[0..]),
                port(&l4[2..]),
                l4[13],
                u32::from_be_bytes(l4[4..8].try_into().unwrap()),
                u32::from_be_bytes(l4[8..12].try_into().unwrap()),
                l4[doff..].to_vec(),
            )
        }
        17 => (port(&l4[0..]), port(&l4[2..]), 0, 0, 0, l4[8..].to_vec()),
        p => return Err(format!("protocol {p}")),
    };
    Ok(Parsed {
        dst_mac: f[0..6].try_into().unwrap(),
        src_mac: f[6..12].try_into().unwrap(),
        src: SocketAddrV4::new(src_ip, sport),
        dst: SocketAddrV4::new(dst_ip, dport),
        proto: ip[9],
        ttl: ip[8],
        tcp_flags: flags,
        seq,
        ack,
        payload,
    })
}

/// Recomputes the IPv4 header checksum and the TCP/UDP checksum of `f` from scratch and
/// says which (if any) is wrong. An IPv6 frame goes to [`crate::packet6::verify_checksums6`].
pub fn verify_checksums(f: &[u8]) -> Result<(), String> {
    if f.len() >= ETH_LEN && f[12..14] == [0x86, 0xdd] {
        return crate::packet6::verify_checksums6(f);
    }
    if f.len() < ETH_LEN + 20 {
        return Err("too short for IPv4".into());
    }
    let ip = &f[ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || tot < ihl || tot > ip.len() {
        return Err(format!(
            "bad lengths: ihl {ihl}, total {tot}, {} bytes",
            ip.len()
        ));
    }
    if fold(sum16(&ip[..ihl], 0)) != 0xffff {
        return Err("IPv4 header checksum is wrong".into());
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..tot];
    match ip[9] {
        6 | 17 if l4.len() < 8 => return Err("L4 header cut off".into()),
        6 if fold(sum16(l4, pseudo(src, dst, 6, l4.len()))) != 0xffff => {
            return Err("TCP checksum is wrong".into());
        }
        17 if l4[6..8] != [0, 0] && fold(sum16(l4, pseudo(src, dst, 17, l4.len()))) != 0xffff => {
            return Err("UDP checksum is wrong".into());
        }
        1 => {
            if l4.len() < 8 || fold(sum16(l4, 0)) != 0xffff {
                return Err("ICMP checksum is wrong".into());
            }
            // An error quoting an IPv4 header: the quoted header's checksum too.
            if matches!(l4[0], 3 | 11 | 12) && l4.len() >= 28 {
                let q = &l4[8..];
                let qihl = usize::from(q[0] & 0x0f) * 4;
                if q.len() >= qihl && fold(sum16(&q[..qihl], 0)) != 0xffff {
                    return Err("quoted IPv4 header checksum is wrong".into());
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Hex dump, 16 bytes a line, for failure messages.
pub fn hexdump(f: &[u8]) -> String {
    f.chunks(16)
        .enumerate()
        .map(|(i, c)| {
            let hex: Vec<String> = c.iter().map(|b| format!("{b:02x}")).collect();
            format!("  {:04x}  {}", i * 16, hex.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Splits an IPv4 frame (20-byte header) into fragments of at most `chunk` payload bytes (a
/// multiple of 8), as a sender's stack does: the frame's identification in each, more
/// fragments on all but the last, offsets in 8-byte units, don't-fragment cleared.
pub fn fragments(frame: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    assert!(chunk.is_multiple_of(8) && chunk > 0, "chunk {chunk}");
    let head = &frame[..ETH_LEN + 20];
    assert_eq!(head[ETH_LEN] & 0x0f, 5, "no IPv4 options");
    let payload = &frame[ETH_LEN + 20..];
    let n = payload.len().div_ceil(chunk);
    (0..n)
        .map(|i| {
            let part = &payload[i * chunk..((i + 1) * chunk).min(payload.len())];
            let mut f = head.to_vec();
            let more = if i + 1 < n { 0x2000 } else { 0 };
            let ip = &mut f[ETH_LEN..];
            ip[2..4].copy_from_slice(&((20 + part.len()) as u16).to_be_bytes());
            ip[6..8].copy_from_slice(&((more | (i * chunk / 8)) as u16).to_be_bytes());
            ip[10..12].copy_from_slice(&[0, 0]);
            let c = checksum(&ip[..20]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(part);
            f
        })
        .collect()
}

/// Reassembles IPv4 fragments (in any order) as a receiver does, into the frame with the
/// first fragment's Ethernet and IPv4 header (flags and offset 0). `Err` if they do not form
/// one datagram: a header checksum wrong, source, destination, protocol or identification
/// not shared (what a client's reassembly would refuse), a gap or no last fragment.
pub fn reassemble(frags: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    let key = |f: &[u8]| {
        let ip = &f[ETH_LEN..ETH_LEN + 20];
        (ip[4..6].to_vec(), ip[9], ip[12..20].to_vec())
    };
    let first = frags.first().ok_or("no fragments")?;
    let mut parts: Vec<(usize, bool, &[u8], &[u8])> = Vec::new();
    for f in frags {
        let ip = &f[ETH_LEN..];
        if checksum(&ip[..20]) != 0 {
            return Err("fragment header checksum".into());
        }
        if key(f) != key(first) {
            return Err(format!(
                "fragment of another datagram: {:?} vs {:?}",
                key(f),
                key(first)
            ));
        }
        let fo = u16::from_be_bytes([ip[6], ip[7]]);
        let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        parts.push((
            usize::from(fo & 0x1fff) * 8,
            fo & 0x2000 != 0,
            &f[..ETH_LEN + 20],
            &ip[20..tot],
        ));
    }
    parts.sort_by_key(|p| p.0);
    let mut payload = Vec::new();
    for (off, _, _, data) in &parts {
        if *off != payload.len() {
            return Err(format!("gap at {} (next fragment at {off})", payload.len()));
        }
        payload.extend_from_slice(data);
    }
    if parts.last().is_some_and(|p| p.1) {
        return Err("no last fragment".into());
    }
    let mut f = parts[0].2.to_vec();
    let ip = &mut f[ETH_LEN..];
    ip[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    ip[6..8].copy_from_slice(&[0, 0]);
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&ip[..20]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&payload);
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_verify_and_parse_back() {
        let s = FrameSpec::tcp(
            "10.0.1.2:40000".parse().unwrap(),
            "10.0.0.100:80".parse().unwrap(),
            SYN,
        )
        .payload(b"hello");
        let f = s.build();
        verify_checksums(&f).unwrap();
        let p = parse(&f).unwrap();
        assert_eq!(p.src, s.src);
        assert_eq!(p.dst, s.dst);
        assert_eq!(p.tcp_flags, SYN);
        assert_eq!(p.payload, b"hello");
        let u = FrameSpec::udp(s.src, s.dst, b"odd").build();
        verify_checksums(&u).unwrap();
        let mut bad = u.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(verify_checksums(&bad).is_err());
    }
}
