//! Client → VIP packets: find the flow's state (verified, then unverified), or decide where a
//! new flow goes, then NAT (or, on DSR listeners, only re-address the frame) and forward.
//!
//! The state machine, per packet without a verified entry (docs/datapath.md tells it whole):
//! - TCP SYN: a half-open entry (retransmission) keeps its backend; otherwise the backend is
//!   chosen (persistence entry, pending entry, schedule) and only the half-open and pending
//!   tables are written — or nothing at all in flood mode, where the stateless hash decides.
//! - TCP ACK completing a handshake (half-open SYN entry): promoted to the connection table,
//!   the client's persistence committed.
//! - Other TCP without state: a Maglev listener, a persisted client or flood mode give a
//!   backend (the one the flow began on, unless the backend set changed); the flow is adopted
//!   as unverified and promoted when its backend answers (NAT) or on its next packet (DSR).
//!   Otherwise the client gets a (rate-limited) RST; a stray RST is dropped.
//! - UDP: a half-open entry is promoted once the backend has answered (NAT) or on the second
//!   client packet (DSR); a new flow is scheduled and recorded as unverified.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, programs::XdpContext};
use clb_common::{
    ConnKey, HALF_ADOPTED, HALF_F_HASHED, HALF_F_REPLIED, HALF_SYN, HALF_UDP, LISTENER_F_ACTIVE,
    LISTENER_F_DSR, LISTENER_F_MAGLEV, LISTENER_F_SHARED_BACKENDS, ListenerInfo, client_hash,
    counter, flow_hash,
};
use network_types::ip::Ipv4Hdr;

use crate::{
    backends,
    conntrack::{self, Dir},
    drop, flood, halfopen,
    maps::CLB_LSN_V2,
    nat,
    parse::Pkt,
    persist, rst, schedule, spoof, stats,
};

/// A flow as seen from its client: what keys its state and feeds the hash.
#[derive(Clone, Copy)]
pub struct Flow {
    /// Client address and port, network byte order.
    pub client: u32,
    pub client_port: u16,
    pub proto: u8,
}

impl Flow {
    #[inline(always)]
    pub fn key(&self, listener: u32) -> ConnKey {
        ConnKey {
            client: self.client,
            client_port: self.client_port,
            listener: listener as u16,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Handles a well-formed TCP/UDP packet for listener `id`.
#[inline(always)]
pub fn client_packet(ctx: &XdpContext, ip: *mut Ipv4Hdr, p: &Pkt, id: u32) -> u32 {
    let Some(lsn) = CLB_LSN_V2.get(id) else {
        return xdp_action::XDP_PASS;
    };
    if lsn.flags & LISTENER_F_ACTIVE == 0 {
        return xdp_action::XDP_PASS;
    }
    // Forwarding a TTL-1 packet would make the next hop's time-exceeded reveal the backend.
    // SAFETY: `ip` was bounds-checked by the parser.
    if unsafe { (*ip).ttl } <= 1 {
        return drop(counter::DROP_TTL);
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let flow = Flow {
        client: p.saddr,
        client_port: p.sport,
        proto: p.proto,
    };
    let key = flow.key(id);
    let dsr = lsn.flags & LISTENER_F_DSR != 0;

    if let Some(c) = conntrack::live(&key, lsn, now) {
        if p.is_syn() && c.state != clb_common::CONN_OPEN {
            // A SYN reusing the ports of a closed connection starts a new flow.
            conntrack::remove(&key);
        } else if backends::present(c.backend).is_some() {
            let backend = c.backend;
            let refreshed = conntrack::track(c, p, now, Dir::Fwd, !dsr);
            if refreshed && lsn.persist_ns != 0 {
                persist::touch(&persist::key(lsn, p.saddr, id), lsn, backend, now);
            }
            return send(ctx, ip, p, lsn, id, backend, now);
        }
    }
    // No verified flow: a martian or looping source gets no further.
    if let Err(reason) = spoof::check(p.saddr) {
        return drop(reason);
    }
    if p.is_tcp() {
        tcp_unverified(ctx, ip, p, lsn, id, &flow, &key, now)
    } else {
        udp_unverified(ctx, ip, p, lsn, id, &flow, &key, now)
    }
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "one packet's context, passed down once"
)]
fn tcp_unverified(
    ctx: &XdpContext,
    ip: *mut Ipv4Hdr,
    p: &Pkt,
    lsn: &ListenerInfo,
    id: u32,
    flow: &Flow,
    key: &ConnKey,
    now: u64,
) -> u32 {
    let dsr = lsn.flags & LISTENER_F_DSR != 0;
    let half = halfopen::live(key, now);
    if p.is_syn() {
        if let Some(h) = half
            && h.kind == HALF_SYN
            && backends::present(h.backend).is_some()
        {
            // A retransmitted SYN: the handshake stays where it began.
            halfopen::touch(h, now);
            let b = h.backend;
            return send(ctx, ip, p, lsn, id, b, now);
        }
        let flood = flood::note_new_flow(now);
        let b = match choose(lsn, id, flow, now, flood) {
            Ok(b) => b,
            Err(reason) => return reset(ctx, p, id, reason, now),
        };
        if flood {
            stats::count(counter::FLOOD_HASHED);
        }
        if !flood || lsn.flags & LISTENER_F_SHARED_BACKENDS != 0 {
            halfopen::insert(key, b, HALF_SYN, if flood { HALF_F_HASHED } else { 0 }, now);
        }
        stats::both(id, b, |c| c.new_conns += 1);
        return send(ctx, ip, p, lsn, id, b, now);
    }
    if let Some(h) = half
        && backends::present(h.backend).is_some()
    {
        let b = h.backend;
        if p.is_rst() {
            // The client gave up on the handshake (or a spoofer tried): forget it.
            halfopen::remove(key);
            stats::count(counter::HALF_OPEN_CLOSED);
        } else if (h.kind == HALF_SYN && p.is_plain_ack())
            || (h.kind == HALF_ADOPTED && dsr && h.packets >= 1)
        {
            promote(key, lsn, id, flow, b, p, now);
        } else {
            halfopen::touch(h, now);
            h.packets = h.packets.saturating_add(1);
        }
        return send(ctx, ip, p, lsn, id, b, now);
    }
    if p.is_rst() {
        return drop(counter::DROP_STRAY_RST);
    }
    // Mid-stream without state: where did this flow begin?
    let hashed = flood::recent(now);
    let adopt = if hashed || lsn.flags & LISTENER_F_MAGLEV != 0 {
        stateless_backend(lsn, id, flow, now)
    } else if lsn.persist_ns != 0 {
        persist::lookup(&persist::key(lsn, flow.client, id), lsn, now, true)
            .ok_or(counter::DROP_NO_CONN)
    } else {
        Err(counter::DROP_NO_CONN)
    };
    match adopt {
        Ok(b) => {
            flood::note_new_flow(now);
            if hashed {
                stats::count(counter::HALF_OPEN_MISS_HASHED);
            }
            stats::count(counter::ADOPTED);
            halfopen::insert(
                key,
                b,
                HALF_ADOPTED,
                if hashed { HALF_F_HASHED } else { 0 },
                now,
            );
            send(ctx, ip, p, lsn, id, b, now)
        }
        Err(reason) => reset(ctx, p, id, reason, now),
    }
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "one packet's context, passed down once"
)]
fn udp_unverified(
    ctx: &XdpContext,
    ip: *mut Ipv4Hdr,
    p: &Pkt,
    lsn: &ListenerInfo,
    id: u32,
    flow: &Flow,
    key: &ConnKey,
    now: u64,
) -> u32 {
    let dsr = lsn.flags & LISTENER_F_DSR != 0;
    if let Some(h) = halfopen::live(key, now)
        && h.kind == HALF_UDP
        && backends::present(h.backend).is_some()
    {
        let b = h.backend;
        if h.flags & HALF_F_REPLIED != 0 || (dsr && h.packets >= 1) {
            promote(key, lsn, id, flow, b, p, now);
        } else {
            halfopen::touch(h, now);
            h.packets = h.packets.saturating_add(1);
        }
        return send(ctx, ip, p, lsn, id, b, now);
    }
    flood::note_new_flow(now);
    let b = match choose(lsn, id, flow, now, false) {
        Ok(b) => b,
        Err(reason) => return drop(reason),
    };
    halfopen::insert(key, b, HALF_UDP, 0, now);
    stats::both(id, b, |c| c.new_conns += 1);
    send(ctx, ip, p, lsn, id, b, now)
}

/// The backend of a new flow: the client's persisted backend if it has a live entry that
/// still accepts, else the schedule's (the hash's when `stateless`). Without `stateless`, a
/// persisted listener's choice is remembered as pending for the client's next flows.
#[inline(always)]
fn choose(lsn: &ListenerInfo, id: u32, flow: &Flow, now: u64, stateless: bool) -> Result<u32, u32> {
    if lsn.persist_ns == 0 {
        return if stateless || lsn.flags & LISTENER_F_MAGLEV != 0 {
            schedule::hashed(id, hash(lsn, flow))
        } else {
            schedule::round_robin(id)
        };
    }
    let k = persist::key(lsn, flow.client, id);
    if let Some(b) = persist::lookup(&k, lsn, now, false) {
        stats::both(id, b, |c| c.session_hits += 1);
        return Ok(b);
    }
    if stateless || lsn.flags & LISTENER_F_MAGLEV != 0 {
        let b = schedule::hashed(id, hash(lsn, flow))?;
        if stateless {
            return Ok(b);
        }
        return Ok(persist::remember_pending(&k, b, now));
    }
    let b = schedule::round_robin(id)?;
    Ok(persist::remember_pending(&k, b, now))
}

/// The backend a flow without any state belongs to, computed without writing anything: the
/// client's persisted backend (verified or pending), else the hash. A SYN placed in flood
/// mode, its ACK, and the backend's replies all compute the same.
#[inline(always)]
pub fn stateless_backend(lsn: &ListenerInfo, id: u32, flow: &Flow, now: u64) -> Result<u32, u32> {
    if lsn.persist_ns != 0
        && let Some(b) = persist::lookup(&persist::key(lsn, flow.client, id), lsn, now, true)
    {
        return Ok(b);
    }
    schedule::hashed(id, hash(lsn, flow))
}

/// The consistent hash of a flow: of its (masked) client with persistence, of its 5-tuple
/// without.
#[inline(always)]
fn hash(lsn: &ListenerInfo, flow: &Flow) -> u32 {
    if lsn.persist_ns != 0 {
        client_hash(flow.client & lsn.client_mask, lsn.vip, lsn.port, flow.proto)
    } else {
        flow_hash(flow.client, flow.client_port, lsn.vip, lsn.port, flow.proto)
    }
}

/// An unverified flow proved real: it moves to the connection table, and its client's choice
/// to the persistence table.
#[inline(always)]
pub fn promote(
    key: &ConnKey,
    lsn: &ListenerInfo,
    id: u32,
    flow: &Flow,
    backend: u32,
    p: &Pkt,
    now: u64,
) {
    if conntrack::insert(key, backend, p, now).is_err() {
        stats::count(counter::DROP_CONN_TABLE);
        return;
    }
    halfopen::remove(key);
    stats::count(counter::HALF_OPEN_PROMOTE);
    if lsn.persist_ns != 0 {
        persist::commit(&persist::key(lsn, flow.client, id), lsn, id, backend, now);
    }
}

/// Forwards a client packet to `backend`: DNAT (NAT) or next-hop MAC only (DSR).
#[inline(always)]
fn send(
    ctx: &XdpContext,
    ip: *mut Ipv4Hdr,
    p: &Pkt,
    lsn: &ListenerInfo,
    id: u32,
    backend: u32,
    now: u64,
) -> u32 {
    let Some(be) = backends::present(backend) else {
        return drop(counter::DROP_NO_BACKEND);
    };
    stats::forward(id, backend, p.ip_len);
    if lsn.flags & LISTENER_F_DSR != 0 {
        stats::count(counter::DSR_FORWARDED);
        return nat::forward(ctx, ip, p, be.addr, true, now);
    }
    if nat::rewrite(ctx, ip, p, nat::End::Dst, be.addr, be.port).is_err() {
        return xdp_action::XDP_ABORTED;
    }
    nat::forward(ctx, ip, p, be.addr, false, now)
}

/// Answers a TCP packet that belongs nowhere with an RST (within the RST budget), or drops
/// it (UDP, or no budget left) counting `reason`.
#[inline(always)]
fn reset(ctx: &XdpContext, p: &Pkt, id: u32, reason: u32, now: u64) -> u32 {
    if !p.is_tcp() || p.is_rst() {
        return drop(reason);
    }
    if !flood::take_rst(now) {
        return drop(counter::DROP_RST_RATE);
    }
    if rst::build(ctx, p).is_err() {
        return drop(reason);
    }
    stats::count(counter::RST_SENT);
    if let Some(c) = stats::listener(id) {
        c.resets += 1;
    }
    xdp_action::XDP_TX
}
