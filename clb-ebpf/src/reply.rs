//! Backend → client packets: find the connection they answer, NAT the source back to the VIP,
//! forward. Anything else from a backend address passes to the stack untouched.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, programs::XdpContext};
use clb_common::{BackendAddrKey, ConnKey, MAX_LISTENERS_PER_BACKEND_ADDR, NO_LISTENER, counter};
use network_types::ip::Ipv4Hdr;

use crate::{
    backends, conntrack,
    maps::{CLB_BE_ADDR_V1, CLB_LSN_V1},
    nat::{self, End},
    parse::Pkt,
    stats,
};

/// Handles a well-formed TCP/UDP packet not addressed to a VIP.
#[inline(always)]
pub fn backend_packet(ctx: &XdpContext, ip: *mut Ipv4Hdr, p: &Pkt) -> u32 {
    let bkey = BackendAddrKey {
        addr: p.saddr,
        port: p.sport,
        proto: p.proto,
        _pad: 0,
    };
    // SAFETY: read-only use of a map value.
    let Some(info) = (unsafe { CLB_BE_ADDR_V1.get(&bkey) }) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut i = 0;
    while i < MAX_LISTENERS_PER_BACKEND_ADDR {
        let id = info.listeners[i];
        i += 1;
        if id == NO_LISTENER {
            continue;
        }
        let Some(lsn) = CLB_LSN_V1.get(u32::from(id)) else {
            continue;
        };
        let key = ConnKey {
            client: p.daddr,
            client_port: p.dport,
            listener: id,
            proto: p.proto,
            _pad: [0; 3],
        };
        let Some(c) = conntrack::live(&key, lsn, now) else {
            continue;
        };
        // The entry must be this backend's: the same client port may be in use towards
        // another listener's backend.
        let Some(be) = backends::present(c.backend) else {
            continue;
        };
        if be.addr != p.saddr || be.port != p.sport {
            continue;
        }
        conntrack::track(c, p, now);
        stats::reply(u32::from(id), c.backend, p.ip_len);
        if nat::rewrite(ctx, ip, p, End::Src, lsn.vip, lsn.port).is_err() {
            return xdp_action::XDP_ABORTED;
        }
        return nat::forward(ctx, ip, p, now);
    }
    stats::count(counter::REPLY_NO_CONN);
    xdp_action::XDP_PASS
}
