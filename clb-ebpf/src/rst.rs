//! Builds a TCP RST in place for a packet of a connection the balancer does not know, and
//! sends it back out the interface it came in on (`XDP_TX`), so the client learns at once that
//! the connection is gone instead of retransmitting into a black hole. The caller keeps the
//! per-CPU RST budget (`flood::take_rst`), so clb cannot be used as a reflector.
//!
//! RFC 9293 §3.10.7.1: if the offending segment has ACK set, the reset is `<SEQ=SEG.ACK><RST>`;
//! otherwise `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><RST,ACK>`.

use aya_ebpf::{helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use clb_common::PROTO_TCP;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use crate::{
    csum,
    family::{V4, V6},
    parse::{IP_OFF, Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ptr_at},
};

const RST_FRAME_LEN: usize = IP_OFF + Ipv4Hdr::LEN + TcpHdr::LEN;

/// Turns the TCP packet `p` into an RST to its sender, to be sent with `XDP_TX`. Fails (the
/// caller drops the packet) for packets carrying RST themselves or with IPv4 options.
#[inline(always)]
pub fn build(ctx: &XdpContext, p: &Pkt<V4>) -> Result<(), ()> {
    if p.tcp_flags & TCP_RST != 0 || p.l4_off != IP_OFF + Ipv4Hdr::LEN {
        return Err(());
    }
    let (seq, ack, flags) = reply_numbers(
        ctx,
        p.l4_off,
        p.tcp_flags,
        u32::from(p.ip_len) - Ipv4Hdr::LEN as u32,
    )?;

    // Cut the frame down to Ethernet + IPv4 + a bare TCP header.
    let delta = RST_FRAME_LEN as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: the helper only resizes the frame; all pointers are re-derived after it.
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(());
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, IP_OFF)?;
    let tcp: *mut TcpHdr = ptr_at(ctx, IP_OFF + Ipv4Hdr::LEN)?;
    // SAFETY: all three bounds-checked just above against the new frame end.
    unsafe {
        core::mem::swap(&mut (*eth).src_addr, &mut (*eth).dst_addr);

        (*ip).vihl = 0x45;
        (*ip).tos = 0;
        (*ip).tot_len = ((Ipv4Hdr::LEN + TcpHdr::LEN) as u16).to_be_bytes();
        (*ip).id = [0, 0];
        (*ip).frags = 0x4000u16.to_be_bytes(); // DF
        (*ip).ttl = 64;
        (*ip).proto = PROTO_TCP;
        (*ip).src_addr = p.daddr.to_ne_bytes();
        (*ip).dst_addr = p.saddr.to_ne_bytes();
        (*ip).check = [0, 0];
        let ipw = ip as *const u16;
        let mut s: u32 = 0;
        let mut i = 0;
        while i < Ipv4Hdr::LEN / 2 {
            s += u32::from(*ipw.add(i));
            i += 1;
        }
        (*ip).check = (!csum::fold(s)).to_ne_bytes();

        // Pseudo-header: addresses, protocol, TCP length.
        let pseudo = (p.daddr & 0xffff)
            + (p.daddr >> 16)
            + (p.saddr & 0xffff)
            + (p.saddr >> 16)
            + u32::from(u16::from_ne_bytes([0, PROTO_TCP]))
            + u32::from(u16::from_ne_bytes((TcpHdr::LEN as u16).to_be_bytes()));
        fill_tcp(tcp, p.dport, p.sport, seq, ack, flags, pseudo);
    }
    Ok(())
}

/// The RST's sequence and acknowledgement numbers and flags for the offending segment at
/// `l4_off` with `seg_bytes` of TCP header and payload (RFC 9293 §3.10.7.1).
#[inline(always)]
fn reply_numbers(
    ctx: &XdpContext,
    l4_off: usize,
    tcp_flags: u8,
    seg_bytes: u32,
) -> Result<(u32, u32, u8), ()> {
    let tcp: *const TcpHdr = ptr_at(ctx, l4_off)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let (seg_seq, seg_ack, doff) = unsafe {
        (
            u32::from_be_bytes((*tcp).seq),
            u32::from_be_bytes((*tcp).ack_seq),
            ((*(tcp as *const u8).add(12)) >> 4) as u32 * 4,
        )
    };
    if tcp_flags & TCP_ACK != 0 {
        return Ok((seg_ack, 0, TCP_RST));
    }
    let mut seg_len = seg_bytes.saturating_sub(doff);
    if tcp_flags & TCP_SYN != 0 {
        seg_len += 1;
    }
    if tcp_flags & TCP_FIN != 0 {
        seg_len += 1;
    }
    Ok((0, seg_seq.wrapping_add(seg_len), TCP_RST | TCP_ACK))
}

/// Writes a bare TCP header (no options, no payload) and its checksum over `pseudo`, the
/// pseudo-header's one's-complement sum.
///
/// # Safety
/// `tcp` must point at `TcpHdr::LEN` bytes inside the frame.
#[inline(always)]
unsafe fn fill_tcp(
    tcp: *mut TcpHdr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    pseudo: u32,
) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        (*tcp).source = sport.to_ne_bytes();
        (*tcp).dest = dport.to_ne_bytes();
        (*tcp).seq = seq.to_be_bytes();
        (*tcp).ack_seq = ack.to_be_bytes();
        let b = tcp as *mut u8;
        *b.add(12) = 5 << 4; // data offset 5 words, reserved bits 0
        *b.add(13) = flags;
        (*tcp).window = [0, 0];
        (*tcp).check = [0, 0];
        (*tcp).urg_ptr = [0, 0];
        let mut s = pseudo;
        let tw = tcp as *const u16;
        let mut i = 0;
        while i < TcpHdr::LEN / 2 {
            s += u32::from(*tw.add(i));
            i += 1;
        }
        (*tcp).check = (!csum::fold(s)).to_ne_bytes();
    }
}

const RST6_FRAME_LEN: usize = IP_OFF + Ipv6Hdr::LEN + TcpHdr::LEN;

/// [`build`] for IPv6 (packets with extension headers fail: the caller drops them).
#[inline(always)]
pub fn build6(ctx: &XdpContext, p: &Pkt<V6>) -> Result<(), ()> {
    if p.tcp_flags & TCP_RST != 0 || p.l4_off != IP_OFF + Ipv6Hdr::LEN {
        return Err(());
    }
    let (seq, ack, flags) = reply_numbers(
        ctx,
        p.l4_off,
        p.tcp_flags,
        u32::from(p.ip_len) - Ipv6Hdr::LEN as u32,
    )?;
    let delta = RST6_FRAME_LEN as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: the helper only resizes the frame; all pointers are re-derived after it.
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(());
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ip: *mut Ipv6Hdr = ptr_at(ctx, IP_OFF)?;
    let tcp: *mut TcpHdr = ptr_at(ctx, IP_OFF + Ipv6Hdr::LEN)?;
    // SAFETY: all three bounds-checked just above against the new frame end.
    unsafe {
        core::mem::swap(&mut (*eth).src_addr, &mut (*eth).dst_addr);
        (*ip).vcf = [0x60, 0, 0, 0];
        (*ip).payload_len = (TcpHdr::LEN as u16).to_be_bytes();
        (*ip).next_hdr = PROTO_TCP;
        (*ip).hop_limit = 64;
        (*ip).src_addr = clb_common::ip6_from_be(p.daddr);
        (*ip).dst_addr = clb_common::ip6_from_be(p.saddr);
        // Pseudo-header: both addresses, the upper-layer length and the next header, as
        // 32-bit big-endian numbers.
        let pseudo = u32::from(u16::from_ne_bytes([0, PROTO_TCP]))
            + u32::from(u16::from_ne_bytes((TcpHdr::LEN as u16).to_be_bytes()))
            + csum::sum16(&p.saddr)
            + csum::sum16(&p.daddr);
        fill_tcp(tcp, p.dport, p.sport, seq, ack, flags, pseudo);
    }
    Ok(())
}
