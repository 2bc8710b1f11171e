//! IPv6 to the state machine: [`Family`] for [`V6`].

use aya_ebpf::programs::XdpContext;
use clb_common::{
    Addr6, BACKEND_F_V6, BackendAddrInfo, BackendAddrKey6, BackendInfo, ConnKey6, ConnValue,
    ListenerInfo, SessionKey6, SessionValue, addr6_eq, client_hash6, flow_hash6, mask6,
};
use network_types::ip::Ipv6Hdr;

use crate::{
    family::{BPF_ANY, End, Family, Pkt, V6},
    frag,
    maps::{CLB_BE_ADDR6_V1, CLB_BE6_V1, CLB_CONN6_V1, CLB_LSN6_V1, CLB_SESS6_V1},
    nat6, rst, spoof,
};

impl Family for V6 {
    type Addr = Addr6;
    type Hdr = Ipv6Hdr;
    type Key = ConnKey6;
    type SKey = SessionKey6;
    type Half = crate::slots::Half6;
    type Pend = crate::slots::Pend6;

    #[inline(always)]
    fn key(client: Addr6, port: u16, listener: u32, proto: u8) -> ConnKey6 {
        ConnKey6 {
            client,
            client_port: port,
            listener: listener as u16,
            proto,
            _pad: [0; 3],
        }
    }
    #[inline(always)]
    fn skey(masked_client: Addr6, listener: u32) -> SessionKey6 {
        SessionKey6 {
            client: masked_client,
            listener: listener as u16,
            _pad: [0; 6],
        }
    }
    #[inline(always)]
    fn masked(client: Addr6, _lsn: &ListenerInfo, id: u32) -> Addr6 {
        match CLB_LSN6_V1.get(id) {
            Some(l) => mask6(client, l.client_mask),
            None => client,
        }
    }
    #[inline(always)]
    fn vip(_lsn: &ListenerInfo, id: u32) -> Addr6 {
        match CLB_LSN6_V1.get(id) {
            Some(l) => l.vip,
            None => [0; 2],
        }
    }
    #[inline(always)]
    fn client_hash(masked: Addr6, lsn: &ListenerInfo, id: u32, proto: u8) -> u32 {
        client_hash6(masked, Self::vip(lsn, id), lsn.port, proto)
    }
    #[inline(always)]
    fn flow_hash(client: Addr6, port: u16, lsn: &ListenerInfo, id: u32, proto: u8) -> u32 {
        flow_hash6(client, port, Self::vip(lsn, id), lsn.port, proto)
    }
    #[inline(always)]
    fn spoof(saddr: Addr6) -> Result<(), u32> {
        spoof::check6(saddr)
    }
    #[inline(always)]
    fn same(a: Addr6, b: Addr6) -> bool {
        addr6_eq(&a, &b)
    }
    #[inline(always)]
    fn backend_addr(id: u32, be: &BackendInfo) -> Addr6 {
        if be.flags & BACKEND_F_V6 == 0 {
            return [0; 2];
        }
        match CLB_BE6_V1.get(id) {
            Some(a) => *a,
            None => [0; 2],
        }
    }
    #[inline(always)]
    fn backend_listeners(addr: Addr6, port: u16, proto: u8) -> Option<&'static BackendAddrInfo> {
        let k = BackendAddrKey6 {
            addr,
            port,
            proto,
            _pad: [0; 5],
        };
        // SAFETY: read-only use of a map value.
        unsafe { CLB_BE_ADDR6_V1.get(&k) }
    }
    #[inline(always)]
    fn conn(k: &ConnKey6) -> Option<*mut ConnValue> {
        CLB_CONN6_V1.get_ptr_mut(k)
    }
    #[inline(always)]
    fn conn_insert(k: &ConnKey6, v: &ConnValue) -> bool {
        CLB_CONN6_V1.insert(k, v, BPF_ANY).is_ok()
    }
    #[inline(always)]
    fn sess(k: &SessionKey6) -> Option<*mut SessionValue> {
        CLB_SESS6_V1.get_ptr_mut(k)
    }
    #[inline(always)]
    fn sess_insert(k: &SessionKey6, v: &SessionValue) -> bool {
        CLB_SESS6_V1.insert(k, v, BPF_ANY).is_ok()
    }
    #[inline(always)]
    fn ttl(ip: *const Ipv6Hdr) -> u8 {
        // SAFETY: the parser bounds-checked the header.
        unsafe { (*ip).hop_limit }
    }
    #[inline(always)]
    fn rewrite(
        ctx: &XdpContext,
        ip: *mut Ipv6Hdr,
        p: &Pkt<V6>,
        end: End,
        addr: Addr6,
        port: u16,
    ) -> Result<(), ()> {
        nat6::rewrite(ctx, ip, p, end, addr, port)
    }
    #[inline(always)]
    fn forward(
        ctx: &XdpContext,
        ip: *mut Ipv6Hdr,
        p: &Pkt<V6>,
        nh_dst: Addr6,
        dsr: bool,
        now: u64,
    ) -> u32 {
        nat6::forward(
            ctx,
            ip,
            p,
            &nat6::Hop {
                dst: nh_dst,
                now,
                dsr,
            },
        )
    }
    #[inline(always)]
    fn note_fragment(
        ctx: &XdpContext,
        _ip: *const Ipv6Hdr,
        p: &Pkt<V6>,
        vip: Addr6,
        listener: u32,
        backend: u32,
        now: u64,
    ) {
        frag::note6(ctx, p, vip, listener, backend, now);
    }
    #[inline(always)]
    fn rst(ctx: &XdpContext, p: &Pkt<V6>) -> Result<(), ()> {
        rst::build6(ctx, p)
    }
}
