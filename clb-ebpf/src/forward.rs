//! Client → VIP packets: find or make the flow's connection entry, NAT the destination to the
//! backend, forward.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, programs::XdpContext};
use clb_common::{ConnKey, LISTENER_F_ACTIVE, ListenerInfo, counter};
use network_types::ip::Ipv4Hdr;

use crate::{
    backends, conntrack,
    maps::CLB_LSN_V1,
    nat::{self, End},
    parse::{Pkt, TCP_RST},
    persist, rst, schedule, stats,
};

/// Handles a well-formed TCP/UDP packet for listener `id`.
#[inline(always)]
pub fn client_packet(ctx: &XdpContext, ip: *mut Ipv4Hdr, p: &Pkt, id: u32) -> u32 {
    let Some(lsn) = CLB_LSN_V1.get(id) else {
        return xdp_action::XDP_PASS;
    };
    if lsn.flags & LISTENER_F_ACTIVE == 0 {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = ConnKey {
        client: p.saddr,
        client_port: p.sport,
        listener: id as u16,
        proto: p.proto,
        _pad: [0; 3],
    };

    let backend = match conntrack::forward(&key, lsn, p, now) {
        Some((b, refreshed)) => {
            if refreshed && lsn.persist_ns != 0 {
                persist::touch(id, lsn, p.saddr, b, now);
            }
            b
        }
        None => match new_flow(id, lsn, &key, p, now) {
            Ok(b) => b,
            Err(NewFlowError::Drop(reason)) => {
                stats::count(reason);
                return xdp_action::XDP_DROP;
            }
            Err(NewFlowError::Reset(reason)) => {
                stats::count(reason);
                if let Some(c) = stats::listener(id) {
                    c.resets += 1;
                }
                return rst::reply(ctx, p);
            }
        },
    };
    let Some(be) = backends::present(backend) else {
        stats::count(counter::DROP_NO_BACKEND);
        return xdp_action::XDP_DROP;
    };
    stats::forward(id, backend, p.ip_len);
    if nat::rewrite(ctx, ip, p, End::Dst, be.addr, be.port).is_err() {
        return xdp_action::XDP_ABORTED;
    }
    nat::forward(ctx, ip, p, now)
}

enum NewFlowError {
    /// Drop, counting this reason.
    Drop(u32),
    /// Answer with a TCP RST, counting this reason.
    Reset(u32),
}

/// A packet with no live connection entry: schedule it (SYN, UDP) or refuse it (TCP
/// mid-stream without a persisted backend), creating the entry on success.
#[inline(always)]
fn new_flow(
    id: u32,
    lsn: &ListenerInfo,
    key: &ConnKey,
    p: &Pkt,
    now: u64,
) -> Result<u32, NewFlowError> {
    let backend = if p.is_tcp() && !p.is_syn() {
        // Never schedule a mid-stream packet as a new connection: the chosen backend would
        // only answer with a RST, and a different one each time. Where the client is
        // persisted, its flow belongs to that backend.
        let persisted = if lsn.persist_ns != 0 {
            persist::live_backend(id, lsn, p.saddr, now, true)
        } else {
            None
        };
        match persisted {
            Some(b) => b,
            None if p.tcp_flags & TCP_RST != 0 => {
                return Err(NewFlowError::Drop(counter::DROP_NO_CONN));
            }
            None => return Err(NewFlowError::Reset(counter::DROP_NO_CONN)),
        }
    } else {
        let picked = if lsn.persist_ns != 0 {
            persist::pick(id, lsn, p.saddr, now)
        } else {
            schedule::pick(id, lsn)
        };
        match picked {
            Ok(b) => b,
            Err(reason) if p.is_tcp() => return Err(NewFlowError::Reset(reason)),
            Err(reason) => return Err(NewFlowError::Drop(reason)),
        }
    };
    if conntrack::insert(key, backend, p, now).is_err() {
        return Err(NewFlowError::Drop(counter::DROP_CONN_TABLE));
    }
    stats::both(id, backend, |c| c.new_conns += 1);
    Ok(backend)
}
