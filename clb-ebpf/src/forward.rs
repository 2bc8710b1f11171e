//! Client → VIP packets: find the flow's state (verified, then unverified), or decide where a
//! new flow goes, then NAT (or, on DSR listeners, only re-address the frame) and forward.
//!
//! The state machine, per packet without a verified entry (docs/datapath.md tells it whole):
//! - TCP SYN (never looked up in the connection table): a half-open entry (retransmission)
//!   keeps its backend; otherwise the backend is chosen (persistence entry, pending entry,
//!   schedule) and only the half-open and pending tables are written — or nothing at all
//!   in flood mode, where the stateless hash decides.
//! - A packet of a closed (FIN/RST) connection whose ports a new handshake (a half-open SYN
//!   entry) took: the new handshake's path below.
//! - TCP ACK completing a handshake (half-open SYN entry) that proves it (NAT: it acknowledges
//!   the backend's SYN-ACK; DSR: a data segment after it): promoted to the connection table,
//!   the client's persistence committed.
//! - Other TCP without state: a Maglev listener, a persisted client or flood mode give a
//!   backend (the one the flow began on, unless the backend set changed); the flow is adopted
//!   as unverified and promoted when its backend answers (NAT) or on its next packet (DSR).
//!   Otherwise the client gets a (rate-limited) RST; a stray RST is dropped.
//! - UDP: a half-open entry is promoted once the backend has answered (NAT) or on the second
//!   client packet (DSR); a new flow is scheduled and recorded as unverified.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, programs::XdpContext};
use clb_common::{
    CONN_OPEN, HALF_ADOPTED, HALF_F_ACKED, HALF_F_HASHED, HALF_F_REPLIED, HALF_SYN, HALF_UDP,
    HalfOpenValue, LISTENER_F_ACTIVE, LISTENER_F_DSR, LISTENER_F_MAGLEV,
    LISTENER_F_SHARED_BACKENDS, ListenerInfo, counter,
};

use crate::{
    backends,
    conntrack::{self, Dir},
    drop,
    family::Family,
    flood, halfopen,
    maps::CLB_LSN_V2,
    nat::End,
    parse::Pkt,
    persist, schedule, stats,
};

/// A flow as seen from its client: what keys its state and feeds the hash.
pub struct Flow<F: Family> {
    /// Client address and port, network byte order.
    pub client: F::Addr,
    pub client_port: u16,
    pub proto: u8,
}

impl<F: Family> Clone for Flow<F> {
    #[inline(always)]
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: Family> Copy for Flow<F> {}

impl<F: Family> Flow<F> {
    #[inline(always)]
    pub fn key(&self, listener: u32) -> F::Key {
        F::key(self.client, self.client_port, listener, self.proto)
    }
}

/// Handles a well-formed TCP/UDP packet for listener `id`.
#[inline(always)]
pub fn client_packet<F: Family>(ctx: &XdpContext, ip: *mut F::Hdr, p: &Pkt<F>, id: u32) -> u32 {
    let Some(lsn) = CLB_LSN_V2.get(id) else {
        return xdp_action::XDP_PASS;
    };
    if lsn.flags & LISTENER_F_ACTIVE == 0 {
        return xdp_action::XDP_PASS;
    }
    // Forwarding a TTL-1 packet would make the next hop's time-exceeded reveal the backend.
    if F::ttl(ip) <= 1 {
        return drop(counter::DROP_TTL);
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let flow = Flow::<F> {
        client: p.saddr,
        client_port: p.sport,
        proto: p.proto,
    };
    let key = flow.key(id);
    let dsr = lsn.flags & LISTENER_F_DSR != 0;

    // A SYN starts a flow: it never looks at the connection table (as in Katran), which
    // saves a lookup into the largest table on the path floods take. A handshake on the ports
    // of a closed connection takes over from it at its ACK (below).
    if !p.is_syn()
        && let Some(c) = conntrack::live::<F>(&key, lsn, now)
        && backends::present(c.backend).is_some()
        && !reopened::<F>(c.state, p, &key, now)
    {
        let backend = c.backend;
        let refreshed = conntrack::track(c, p, now, Dir::Fwd, !dsr);
        if refreshed && lsn.persist_ns != 0 {
            persist::touch::<F>(&persist::key::<F>(lsn, p.saddr, id), lsn, backend, now);
        }
        return send(ctx, ip, p, lsn, id, backend, now);
    }
    // No verified flow: a martian or looping source gets no further.
    if let Err(reason) = F::spoof(p.saddr) {
        return drop(reason);
    }
    if p.is_tcp() {
        tcp_unverified(ctx, ip, p, lsn, id, &flow, &key, now)
    } else {
        udp_unverified(ctx, ip, p, lsn, id, &flow, &key, now)
    }
}

/// Whether a client's TCP packet (not an RST) proves its unverified flow `v` real, so that the
/// flow may enter the verified tables (docs/datapath.md, "Verification"):
/// - NAT, a SYN entry: an ACK that acknowledges the backend's SYN-ACK (its initial sequence
///   number + 1). The SYN-ACK went to the client's address, so only a sender who receives at
///   that address knows the number: a spoofed SYN's blind ACK guesses one of 2^32.
/// - DSR, a SYN entry: clb never sees the SYN-ACK, so no number can be checked. The
///   handshake's ACK only marks the entry ([`HALF_F_ACKED`]); a later segment carrying data
///   promotes it. A bare SYN + ACK pair never does; an off-path sender needs a third packet.
/// - DSR, an adopted flow: a segment carrying data after its first packet.
///
/// (NAT adopted flows are proven by their backend's answer, on the reply path.)
#[inline(always)]
fn proven<F: Family>(ctx: &XdpContext, p: &Pkt<F>, v: &HalfOpenValue, dsr: bool) -> bool {
    match v.kind {
        HALF_SYN if !p.is_plain_ack() => false,
        HALF_SYN if dsr => v.flags & HALF_F_ACKED != 0 && p.tcp_has_data(ctx),
        HALF_SYN => {
            v.flags & HALF_F_REPLIED != 0 && p.tcp_ack(ctx) == v.backend_isn.wrapping_add(1)
        }
        HALF_ADOPTED => dsr && p.tcp_has_data(ctx),
        _ => false,
    }
}

/// Whether a TCP packet of a connection in `state` belongs to a new handshake on the same
/// ports instead: the connection is closing (FIN/RST) and the key has a live SYN half-open
/// entry, whose path (its ACK promotes it over the closed entry) decides.
#[inline(always)]
fn reopened<F: Family>(state: u8, p: &Pkt<F>, key: &F::Key, now: u64) -> bool {
    state != CONN_OPEN
        && p.is_tcp()
        && halfopen::live::<F>(key, now).is_some_and(|h| h.val().kind == HALF_SYN)
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "one packet's context, passed down once"
)]
fn tcp_unverified<F: Family>(
    ctx: &XdpContext,
    ip: *mut F::Hdr,
    p: &Pkt<F>,
    lsn: &ListenerInfo,
    id: u32,
    flow: &Flow<F>,
    key: &F::Key,
    now: u64,
) -> u32 {
    let dsr = lsn.flags & LISTENER_F_DSR != 0;
    let half = halfopen::live::<F>(key, now);
    if p.is_syn() {
        if let Some(h) = &half
            && h.val().kind == HALF_SYN
            && backends::present(u32::from(h.val().backend)).is_some()
        {
            // A retransmitted SYN: the handshake stays where it began.
            halfopen::touch::<F>(h, now);
            let b = u32::from(h.val().backend);
            return send(ctx, ip, p, lsn, id, b, now);
        }
        let flood = flood::note_new_flow(now);
        let mut b = match choose(lsn, id, flow, now, flood) {
            Ok(b) => b,
            Err(reason) => return reset(ctx, p, id, reason, now),
        };
        if flood {
            stats::count(counter::FLOOD_HASHED);
        }
        if (!flood || lsn.flags & LISTENER_F_SHARED_BACKENDS != 0)
            && !halfopen::insert::<F>(key, b, HALF_SYN, if flood { HALF_F_HASHED } else { 0 }, now)
            && !flood
        {
            // Its state could not be written: placed as in flood mode (now on), where its
            // ACK looks.
            b = match stateless_backend(lsn, id, flow, now) {
                Ok(b) => b,
                Err(reason) => return reset(ctx, p, id, reason, now),
            };
        }
        stats::both(id, b, |c| c.new_conns += 1);
        return send(ctx, ip, p, lsn, id, b, now);
    }
    if let Some(h) = &half
        && backends::present(u32::from(h.val().backend)).is_some()
    {
        let b = u32::from(h.val().backend);
        if p.is_rst() {
            // The client gave up on the handshake (or a spoofer tried): forget it.
            halfopen::remove::<F>(h);
            stats::count(counter::HALF_OPEN_CLOSED);
        } else if proven(ctx, p, h.val(), dsr) {
            promote(key, Some(h), lsn, id, flow, b, p, now);
        } else {
            let v = h.val();
            let mut flags = 0;
            if v.kind == HALF_SYN && p.is_plain_ack() {
                if dsr {
                    flags = HALF_F_ACKED;
                } else {
                    // A handshake's ACK that does not acknowledge the backend's SYN-ACK: sent
                    // blind (its sender never saw it). It goes on to the backend, which
                    // answers it with an RST; it proves nothing.
                    stats::count(counter::HALF_OPEN_UNPROVEN);
                }
            }
            halfopen::note_packet::<F>(h, now, flags);
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
        persist::lookup::<F>(&persist::key::<F>(lsn, flow.client, id), lsn, now, true)
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
            // Without room its next packets adopt it again, the same way.
            let _tracked = halfopen::insert::<F>(
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
fn udp_unverified<F: Family>(
    ctx: &XdpContext,
    ip: *mut F::Hdr,
    p: &Pkt<F>,
    lsn: &ListenerInfo,
    id: u32,
    flow: &Flow<F>,
    key: &F::Key,
    now: u64,
) -> u32 {
    let dsr = lsn.flags & LISTENER_F_DSR != 0;
    if let Some(h) = halfopen::live::<F>(key, now)
        && h.val().kind == HALF_UDP
        && backends::present(u32::from(h.val().backend)).is_some()
    {
        let b = u32::from(h.val().backend);
        if h.val().flags & HALF_F_REPLIED != 0 || dsr {
            promote(key, Some(&h), lsn, id, flow, b, p, now);
        } else {
            halfopen::note_packet::<F>(&h, now, 0);
        }
        return send(ctx, ip, p, lsn, id, b, now);
    }
    // In flood mode a new UDP flow is placed by the stateless hash, so that its datagrams
    // agree on a backend even when there is no room to remember it.
    let flood = flood::note_new_flow(now) || flood::recent(now);
    let mut b = match choose(lsn, id, flow, now, flood) {
        Ok(b) => b,
        Err(reason) => return drop(reason),
    };
    let flags = if flood { HALF_F_HASHED } else { 0 };
    if !halfopen::insert::<F>(key, b, HALF_UDP, flags, now) && !flood {
        b = match stateless_backend(lsn, id, flow, now) {
            Ok(b) => b,
            Err(reason) => return drop(reason),
        };
    }
    stats::both(id, b, |c| c.new_conns += 1);
    send(ctx, ip, p, lsn, id, b, now)
}

/// The backend of a new flow: the client's persisted backend if it has a live entry that
/// still accepts, else the schedule's (the hash's when `stateless`). Without `stateless`, a
/// persisted listener's choice is remembered as pending for the client's next flows.
#[inline(always)]
fn choose<F: Family>(
    lsn: &ListenerInfo,
    id: u32,
    flow: &Flow<F>,
    now: u64,
    stateless: bool,
) -> Result<u32, u32> {
    if lsn.persist_ns == 0 {
        return if stateless || lsn.flags & LISTENER_F_MAGLEV != 0 {
            schedule::hashed(id, hash(lsn, id, flow))
        } else {
            schedule::next(lsn, id)
        };
    }
    let k = persist::key::<F>(lsn, flow.client, id);
    if let Some(b) = persist::lookup::<F>(&k, lsn, now, false) {
        stats::both(id, b, |c| c.session_hits += 1);
        return Ok(b);
    }
    let hashed = stateless || lsn.flags & LISTENER_F_MAGLEV != 0;
    let b = if hashed {
        schedule::hashed(id, hash(lsn, id, flow))?
    } else {
        schedule::next(lsn, id)?
    };
    if stateless {
        return Ok(b);
    }
    match persist::remember_pending::<F>(&k, lsn, b, now, halfopen::timeout_ns()) {
        Some(b) => Ok(b),
        // Other CPUs kept the set busy, nothing remembers the choice: the client hash, which
        // its parallel flows agree on.
        None if hashed => Ok(b),
        None => {
            stats::count(counter::SLOT_BUSY);
            schedule::hashed(id, hash(lsn, id, flow))
        }
    }
}

/// The backend a flow without any state belongs to, computed without writing anything: the
/// client's persisted backend (verified or pending), else the hash. A SYN placed in flood
/// mode, its ACK, and the backend's replies all compute the same.
#[inline(always)]
pub fn stateless_backend<F: Family>(
    lsn: &ListenerInfo,
    id: u32,
    flow: &Flow<F>,
    now: u64,
) -> Result<u32, u32> {
    if lsn.persist_ns != 0
        && let Some(b) =
            persist::lookup::<F>(&persist::key::<F>(lsn, flow.client, id), lsn, now, true)
    {
        return Ok(b);
    }
    schedule::hashed(id, hash(lsn, id, flow))
}

/// The consistent hash of a flow: of its (masked) client with persistence, of its 5-tuple
/// without.
#[inline(always)]
fn hash<F: Family>(lsn: &ListenerInfo, id: u32, flow: &Flow<F>) -> u32 {
    if lsn.persist_ns != 0 {
        F::client_hash(F::masked(flow.client, lsn, id), lsn, id, flow.proto)
    } else {
        F::flow_hash(flow.client, flow.client_port, lsn, id, flow.proto)
    }
}

/// An unverified flow proved real: it moves to the connection table (its half-open entry
/// `half`, if it had one, goes), and its client's choice to the persistence table.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "one packet's context, passed down once"
)]
pub fn promote<F: Family>(
    key: &F::Key,
    half: Option<&halfopen::Half<F>>,
    lsn: &ListenerInfo,
    id: u32,
    flow: &Flow<F>,
    backend: u32,
    p: &Pkt<F>,
    now: u64,
) {
    if conntrack::insert::<F>(key, backend, p, now).is_err() {
        stats::count(counter::DROP_CONN_TABLE);
        return;
    }
    if let Some(h) = half {
        halfopen::remove::<F>(h);
    }
    stats::count(counter::HALF_OPEN_PROMOTE);
    if lsn.persist_ns != 0 {
        persist::commit::<F>(
            &persist::key::<F>(lsn, flow.client, id),
            lsn,
            id,
            backend,
            now,
        );
    }
}

/// Forwards a client packet to `backend`: DNAT (NAT) or next-hop MAC only (DSR).
#[inline(always)]
fn send<F: Family>(
    ctx: &XdpContext,
    ip: *mut F::Hdr,
    p: &Pkt<F>,
    lsn: &ListenerInfo,
    id: u32,
    backend: u32,
    now: u64,
) -> u32 {
    let Some(be) = backends::present(backend) else {
        return drop(counter::DROP_NO_BACKEND);
    };
    stats::forward(id, backend, p.ip_len);
    let addr = F::backend_addr(backend, be);
    if lsn.flags & LISTENER_F_DSR != 0 {
        stats::count(counter::DSR_FORWARDED);
        return F::forward(ctx, ip, p, addr, true, now);
    }
    if F::rewrite(ctx, ip, p, End::Dst, addr, be.port).is_err() {
        return xdp_action::XDP_ABORTED;
    }
    F::forward(ctx, ip, p, addr, false, now)
}

/// Answers a TCP packet that belongs nowhere with an RST (within the RST budget), or drops
/// it (UDP, or no budget left) counting `reason`.
#[inline(always)]
fn reset<F: Family>(ctx: &XdpContext, p: &Pkt<F>, id: u32, reason: u32, now: u64) -> u32 {
    if !p.is_tcp() || p.is_rst() {
        return drop(reason);
    }
    if !flood::take_rst(now) {
        return drop(counter::DROP_RST_RATE);
    }
    if F::rst(ctx, p).is_err() {
        return drop(reason);
    }
    stats::count(counter::RST_SENT);
    if let Some(c) = stats::listener(id) {
        c.resets += 1;
    }
    xdp_action::XDP_TX
}
