//! IPv4 to the state machine: [`Family`] for [`V4`].

use aya_ebpf::programs::XdpContext;
use clb_common::{
    BackendAddrInfo, BackendAddrKey, BackendInfo, ConnKey, ConnValue, ListenerInfo, SessionKey,
    SessionValue, client_hash, flow_hash,
};
use network_types::ip::Ipv4Hdr;

use crate::{
    family::{BPF_ANY, End, Family, Pkt, V4},
    frag,
    maps::{CLB_BE_ADDR_V1, CLB_CONN_V2, CLB_SESS_V2},
    nat, rst, spoof,
};

impl Family for V4 {
    type Addr = u32;
    type Hdr = Ipv4Hdr;
    type Key = ConnKey;
    type SKey = SessionKey;
    type Half = crate::slots::Half4;
    type Pend = crate::slots::Pend4;

    #[inline(always)]
    fn key(client: u32, port: u16, listener: u32, proto: u8) -> ConnKey {
        ConnKey {
            client,
            client_port: port,
            listener: listener as u16,
            proto,
            _pad: [0; 3],
        }
    }
    #[inline(always)]
    fn skey(masked_client: u32, listener: u32) -> SessionKey {
        SessionKey {
            client: masked_client,
            listener: listener as u16,
            _pad: 0,
        }
    }
    #[inline(always)]
    fn masked(client: u32, lsn: &ListenerInfo, _id: u32) -> u32 {
        client & lsn.client_mask
    }
    #[inline(always)]
    fn vip(lsn: &ListenerInfo, _id: u32) -> u32 {
        lsn.vip
    }
    #[inline(always)]
    fn client_hash(masked: u32, lsn: &ListenerInfo, _id: u32, proto: u8) -> u32 {
        client_hash(masked, lsn.vip, lsn.port, proto)
    }
    #[inline(always)]
    fn flow_hash(client: u32, port: u16, lsn: &ListenerInfo, _id: u32, proto: u8) -> u32 {
        flow_hash(client, port, lsn.vip, lsn.port, proto)
    }
    #[inline(always)]
    fn spoof(saddr: u32) -> Result<(), u32> {
        spoof::check(saddr)
    }
    #[inline(always)]
    fn same(a: u32, b: u32) -> bool {
        a == b
    }
    #[inline(always)]
    fn backend_addr(_id: u32, be: &BackendInfo) -> u32 {
        be.addr
    }
    #[inline(always)]
    fn backend_listeners(addr: u32, port: u16, proto: u8) -> Option<&'static BackendAddrInfo> {
        let k = BackendAddrKey {
            addr,
            port,
            proto,
            _pad: 0,
        };
        // SAFETY: read-only use of a map value.
        unsafe { CLB_BE_ADDR_V1.get(&k) }
    }
    #[inline(always)]
    fn conn(k: &ConnKey) -> Option<*mut ConnValue> {
        CLB_CONN_V2.get_ptr_mut(k)
    }
    #[inline(always)]
    fn conn_insert(k: &ConnKey, v: &ConnValue) -> bool {
        CLB_CONN_V2.insert(k, v, BPF_ANY).is_ok()
    }
    #[inline(always)]
    fn sess(k: &SessionKey) -> Option<*mut SessionValue> {
        CLB_SESS_V2.get_ptr_mut(k)
    }
    #[inline(always)]
    fn sess_insert(k: &SessionKey, v: &SessionValue) -> bool {
        CLB_SESS_V2.insert(k, v, BPF_ANY).is_ok()
    }
    #[inline(always)]
    fn ttl(ip: *const Ipv4Hdr) -> u8 {
        // SAFETY: the parser bounds-checked the header.
        unsafe { (*ip).ttl }
    }
    #[inline(always)]
    fn rewrite(
        ctx: &XdpContext,
        ip: *mut Ipv4Hdr,
        p: &Pkt<V4>,
        end: End,
        addr: u32,
        port: u16,
    ) -> Result<(), ()> {
        nat::rewrite(ctx, ip, p, end, addr, port)
    }
    #[inline(always)]
    fn forward(
        ctx: &XdpContext,
        ip: *mut Ipv4Hdr,
        p: &Pkt<V4>,
        nh_dst: u32,
        dsr: bool,
        now: u64,
    ) -> u32 {
        nat::forward(ctx, ip, p, nh_dst, dsr, now)
    }
    #[inline(always)]
    fn note_fragment(
        _ctx: &XdpContext,
        ip: *const Ipv4Hdr,
        _p: &Pkt<V4>,
        vip: u32,
        listener: u32,
        backend: u32,
        now: u64,
    ) {
        frag::note4(ip, vip, listener, backend, now);
    }
    #[inline(always)]
    fn rst(ctx: &XdpContext, p: &Pkt<V4>) -> Result<(), ()> {
        rst::build(ctx, p)
    }
}
