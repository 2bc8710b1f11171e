//! Backend → client packets (NAT listeners): find the flow they answer, NAT the source back to
//! the VIP, forward. A normal answer is also what verifies an unverified flow: a UDP flow is
//! marked answered (its next client packet promotes it), an adopted TCP flow or a handshake
//! is promoted at once. A backend's SYN-ACK records its initial sequence number, which the
//! client's ACK must acknowledge to complete the handshake; it verifies nothing itself (a
//! spoofed SYN is answered by one), nor does an RST (a spoofed mid-stream packet is answered
//! by one).
//! Anything else from a backend address passes to the stack untouched.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, programs::XdpContext};
use clb_common::{
    HALF_SYN, HALF_UDP, LISTENER_F_DSR, MAX_LISTENERS_PER_BACKEND_ADDR, NO_LISTENER, counter,
};

use crate::{
    backends,
    conntrack::{self, Dir},
    family::Family,
    flood,
    forward::{self, Flow},
    frag, halfopen,
    maps::CLB_LSN_V2,
    nat::End,
    parse::Pkt,
    stats,
};

/// Handles a well-formed TCP/UDP packet not addressed to a VIP.
#[inline(always)]
pub fn backend_packet<F: Family>(ctx: &XdpContext, ip: *mut F::Hdr, p: &Pkt<F>) -> u32 {
    let Some(info) = F::backend_listeners(p.saddr, p.sport, p.proto) else {
        return xdp_action::XDP_PASS;
    };
    // The stack answers a TTL-expiring packet (to the backend, its source) itself.
    if F::ttl(ip) <= 1 {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let flow = Flow::<F> {
        client: p.daddr,
        client_port: p.dport,
        proto: p.proto,
    };
    // With one listener behind this backend address, a reply without state can still be told
    // apart by the stateless hash; with several, only by state (their SYNs keep writing it).
    let unambiguous = info.listeners[1] == NO_LISTENER;
    let mut i = 0;
    while i < MAX_LISTENERS_PER_BACKEND_ADDR {
        let id = info.listeners[i];
        i += 1;
        if id == NO_LISTENER {
            continue;
        }
        let id = u32::from(id);
        let Some(lsn) = CLB_LSN_V2.get(id) else {
            continue;
        };
        if lsn.flags & LISTENER_F_DSR != 0 {
            continue;
        }
        let key = flow.key(id);
        // Whether `b` is this packet's backend (the same client port may be in use towards
        // another listener's backend).
        let ours = |b: u32| {
            backends::present(b)
                .is_some_and(|be| F::same(F::backend_addr(b, be), p.saddr) && be.port == p.sport)
        };
        if let Some(c) = conntrack::live::<F>(&key, lsn, now)
            && ours(c.backend)
        {
            let b = c.backend;
            conntrack::track(c, p, now, Dir::Rev, true);
            return answer(ctx, ip, p, id, b, F::vip(lsn, id), lsn.port, now);
        }
        if let Some(h) = halfopen::live::<F>(&key, now)
            && ours(u32::from(h.val().backend))
        {
            let b = u32::from(h.val().backend);
            let kind = h.val().kind;
            if kind == HALF_SYN && p.is_syn_ack() {
                // The number the client's ACK must acknowledge to prove itself.
                halfopen::note_syn_ack::<F>(&h, p.tcp_seq(ctx));
            } else if p.is_rst() {
                // Verifies nothing (a spoofed flow's packets are answered by one), and ends
                // nothing: a spoofed ACK on a real client's handshake is answered by an RST
                // too, while the client's own ACK still completes it.
            } else if kind == HALF_UDP {
                halfopen::note_reply::<F>(&h);
            } else if !p.has_syn() {
                // A backend's normal segment on a SYN or adopted entry: its connection is
                // established, which a spoofed handshake never gets to.
                forward::promote(&key, Some(&h), lsn, id, &flow, b, p, now);
            }
            return answer(ctx, ip, p, id, b, F::vip(lsn, id), lsn.port, now);
        }
        // A flow placed by the stateless hash whose half-open entry a flood evicted (or
        // never wrote): recompute, and adopt it if this backend is the one it names.
        if unambiguous
            && p.is_tcp()
            && !p.is_rst()
            && flood::recent(now)
            && let Ok(b) = forward::stateless_backend(lsn, id, &flow, now)
            && ours(b)
        {
            stats::count(counter::HALF_OPEN_MISS_HASHED);
            // A SYN-ACK answers a SYN that may have been spoofed: it verifies nothing.
            if !p.has_syn() {
                forward::promote(&key, None, lsn, id, &flow, b, p, now);
            }
            return answer(ctx, ip, p, id, b, F::vip(lsn, id), lsn.port, now);
        }
    }
    stats::count(counter::REPLY_NO_CONN);
    xdp_action::XDP_PASS
}

/// SNATs a reply of `backend` on listener `id` back to the VIP and forwards it.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "one packet's context, passed down once"
)]
fn answer<F: Family>(
    ctx: &XdpContext,
    ip: *mut F::Hdr,
    p: &Pkt<F>,
    id: u32,
    backend: u32,
    vip: F::Addr,
    vip_port: u16,
    now: u64,
) -> u32 {
    stats::reply(id, backend, p.ip_len);
    if frag::is_first(p) {
        F::note_fragment(ctx, ip, p, vip, id, backend, now);
    }
    if F::rewrite(ctx, ip, p, End::Src, vip, vip_port).is_err() {
        return xdp_action::XDP_ABORTED;
    }
    F::forward(ctx, ip, p, p.daddr, false, now)
}
