//! IPv6 NAT and forwarding: as `nat` for IPv4, without a header checksum (the L4 checksum's
//! pseudo-header carries the 128-bit addresses), the hop limit for the TTL, and `AF_INET6` FIB
//! lookups cached per CPU in their own table.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use clb_common::{Addr6, NH_TTL_NS, NextHop6, addr6_eq, counter, ip6_from_be, nh_slot6};
use network_types::ip::Ipv6Hdr;

use crate::{
    csum,
    family::V6,
    maps::{CLB_FIB_SCRATCH_V1, CLB_NH6_V1},
    nat::{self, End},
    parse::Pkt,
    stats,
};

const AF_INET6: u8 = 10;

/// Rewrites one end's address and port (see `nat::rewrite`).
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    ip: *mut Ipv6Hdr,
    p: &Pkt<V6>,
    end: End,
    addr: Addr6,
    port: u16,
) -> Result<(), ()> {
    let (old_addr, old_port) = match end {
        End::Dst => (p.daddr, p.dport),
        End::Src => (p.saddr, p.sport),
    };
    // SAFETY: `ip` was bounds-checked by the parser; the frame has not changed size since.
    unsafe {
        match end {
            End::Dst => (*ip).dst_addr = ip6_from_be(addr),
            End::Src => (*ip).src_addr = ip6_from_be(addr),
        }
    }
    nat::l4(ctx, p.l4_off, p.proto, end, old_port, port, |c| {
        csum::replace16(c, &old_addr, &addr)
    })
}

/// Where [`forward`] sends a packet: towards `dst`, DSR or not, at `now`.
pub struct Hop {
    pub dst: Addr6,
    pub now: u64,
    pub dsr: bool,
}

/// Sends the packet on towards `hop.dst` (see `nat::forward`). A BPF function of its own (the
/// IPv6 paths' frames would not fit together otherwise).
#[inline(always)]
pub fn forward(ctx: &XdpContext, ip: *mut Ipv6Hdr, p: &Pkt<V6>, hop: &Hop) -> u32 {
    let (nh_dst, dsr, now) = (hop.dst, hop.dsr, hop.now);
    // SAFETY: `ip` is bounds-checked (see `rewrite`).
    let hops = unsafe { (*ip).hop_limit };
    if hops <= 1 {
        return xdp_action::XDP_PASS;
    }
    let Some(nh) = CLB_NH6_V1.get_ptr_mut(nh_slot6(&nh_dst)) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: this CPU's slot; nothing else writes it while the program runs here.
    let nh = unsafe { &mut *nh };
    if addr6_eq(&nh.dst, &nh_dst) && nh.expires_ns > now {
        stats::count(counter::NEXTHOP_CACHED);
    } else {
        match fib(ctx, p, nh_dst) {
            Ok(found) => {
                *nh = NextHop6 {
                    dst: nh_dst,
                    expires_ns: now + NH_TTL_NS,
                    ..found
                };
            }
            Err(xdp_action::XDP_DROP) => return xdp_action::XDP_DROP,
            Err(_) if dsr => {
                stats::count(counter::DROP_DSR_NO_NEXTHOP);
                return xdp_action::XDP_DROP;
            }
            Err(action) => return action,
        }
    }
    if dsr && nh.onlink == 0 {
        stats::count(counter::DROP_DSR_NO_NEXTHOP);
        return xdp_action::XDP_DROP;
    }
    let (ifindex, src_mac, dst_mac) = (nh.ifindex, nh.src_mac, nh.dst_mac);
    nat::emit(ctx, ifindex, src_mac, dst_mac, dsr, || {
        // SAFETY: as above; IPv6 has no header checksum.
        unsafe { (*ip).hop_limit = hops - 1 };
    })
}

/// The next hop towards `dst` per the kernel's FIB, or the action when there is none now.
#[inline(always)]
fn fib(ctx: &XdpContext, p: &Pkt<V6>, dst: Addr6) -> Result<NextHop6, u32> {
    // SAFETY: `fib` is this CPU's scratch slot (nothing else uses it while the program runs
    // here), a plain C struct for which all-zero is valid; the helper reads and writes only
    // it.
    unsafe {
        let Some(fib) = CLB_FIB_SCRATCH_V1.get_ptr_mut(0) else {
            return Err(xdp_action::XDP_ABORTED);
        };
        let fib = &mut *fib;
        *fib = core::mem::zeroed::<bpf_fib_lookup>();
        fib.family = AF_INET6;
        fib.l4_protocol = p.proto;
        fib.__bindgen_anon_1.tot_len = p.ip_len;
        // The same sixteen bytes, as the helper's words.
        fib.__bindgen_anon_3.ipv6_src = core::mem::transmute::<Addr6, [u32; 4]>(p.saddr);
        fib.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<Addr6, [u32; 4]>(dst);
        fib.ifindex = ctx.ingress_ifindex() as u32;
        let rc = fib_lookup(
            ctx.as_ptr(),
            fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        );
        nat::fib_verdict(rc)?;
        Ok(NextHop6 {
            ifindex: fib.ifindex,
            // The helper replaces the destination with the gateway when there is one.
            onlink: u8::from(addr6_eq(
                &core::mem::transmute::<[u32; 4], Addr6>(fib.__bindgen_anon_4.ipv6_dst),
                &dst,
            )),
            src_mac: fib.__bindgen_anon_6.__bindgen_anon_2.smac,
            dst_mac: fib.__bindgen_anon_6.__bindgen_anon_2.dmac,
            ..NextHop6::default()
        })
    }
}
