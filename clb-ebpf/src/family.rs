//! The address family a packet belongs to. The state machine (`forward`, `reply`,
//! `conntrack`, `halfopen`, `persist`) is written once over [`Family`]; what differs between
//! IPv4 and IPv6 — address type, table keys and maps, masks and hashes, source hygiene, the
//! header rewrite and the next hop — is here, in [`V4`] and [`V6`].

use aya_ebpf::programs::XdpContext;
use clb_common::{
    Addr6, BACKEND_F_V6, BackendAddrInfo, BackendAddrKey, BackendAddrKey6, BackendInfo, ConnKey,
    ConnKey6, ConnValue, HalfOpenValue, ListenerInfo, SessionKey, SessionKey6, SessionValue,
    addr6_eq, client_hash, client_hash6, flow_hash, flow_hash6, mask6,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    maps::{
        CLB_BE_ADDR_V1, CLB_BE_ADDR6_V1, CLB_BE6_V1, CLB_CONN_V2, CLB_CONN6_V1, CLB_HALF_V1,
        CLB_HALF6_V1, CLB_LSN6_V1, CLB_PSESS_V1, CLB_PSESS6_V1, CLB_SESS_V2, CLB_SESS6_V1,
    },
    nat::{self, End},
    nat6,
    parse::Pkt,
    rst, spoof,
};

/// What the state machine needs of an address family.
pub trait Family: Sized + Copy {
    /// An address as it sits in the packet.
    type Addr: Copy + PartialEq;
    /// The IP header.
    type Hdr;
    /// Key of the connection and half-open tables.
    type Key;
    /// Key of the persistence tables.
    type SKey;

    fn key(client: Self::Addr, port: u16, listener: u32, proto: u8) -> Self::Key;
    fn skey(masked_client: Self::Addr, listener: u32) -> Self::SKey;
    /// The client as persistence and the hash see it (masked by the listener's prefix).
    fn masked(client: Self::Addr, lsn: &ListenerInfo, id: u32) -> Self::Addr;
    /// The listener's VIP.
    fn vip(lsn: &ListenerInfo, id: u32) -> Self::Addr;
    fn client_hash(masked: Self::Addr, lsn: &ListenerInfo, id: u32, proto: u8) -> u32;
    fn flow_hash(client: Self::Addr, port: u16, lsn: &ListenerInfo, id: u32, proto: u8) -> u32;
    /// `Err(drop reason)` if packets to a VIP from `saddr` must be dropped.
    fn spoof(saddr: Self::Addr) -> Result<(), u32>;
    /// Address equality.
    fn same(a: Self::Addr, b: Self::Addr) -> bool;
    /// Backend `id` (with `be` its entry)'s address.
    fn backend_addr(id: u32, be: &BackendInfo) -> Self::Addr;
    /// The listeners a reply from `addr`:`port` may belong to.
    fn backend_listeners(
        addr: Self::Addr,
        port: u16,
        proto: u8,
    ) -> Option<&'static BackendAddrInfo>;

    fn conn(k: &Self::Key) -> Option<*mut ConnValue>;
    fn conn_insert(k: &Self::Key, v: &ConnValue) -> bool;
    fn conn_remove(k: &Self::Key);
    fn half(k: &Self::Key) -> Option<*mut HalfOpenValue>;
    fn half_insert(k: &Self::Key, v: &HalfOpenValue) -> bool;
    fn half_remove(k: &Self::Key);
    fn sess(k: &Self::SKey) -> Option<*mut SessionValue>;
    fn sess_insert(k: &Self::SKey, v: &SessionValue) -> bool;
    fn psess(k: &Self::SKey) -> Option<*mut SessionValue>;
    fn psess_insert(k: &Self::SKey, v: &SessionValue, flags: u64) -> bool;

    /// The TTL / hop limit.
    fn ttl(ip: *const Self::Hdr) -> u8;
    /// Rewrites one end's address and port, with every checksum that covers them.
    fn rewrite(
        ctx: &XdpContext,
        ip: *mut Self::Hdr,
        p: &Pkt<Self>,
        end: End,
        addr: Self::Addr,
        port: u16,
    ) -> Result<(), ()>;
    /// Sends the packet on towards `nh_dst` (see `nat::forward`).
    fn forward(
        ctx: &XdpContext,
        ip: *mut Self::Hdr,
        p: &Pkt<Self>,
        nh_dst: Self::Addr,
        dsr: bool,
        now: u64,
    ) -> u32;
    /// Turns the TCP packet into an RST to its sender (for `XDP_TX`).
    fn rst(ctx: &XdpContext, p: &Pkt<Self>) -> Result<(), ()>;
}

/// IPv4.
#[derive(Clone, Copy)]
pub struct V4;

/// IPv6.
#[derive(Clone, Copy)]
pub struct V6;

/// `BPF_NOEXIST`/`BPF_ANY` are the callers'; plain inserts replace.
const BPF_ANY: u64 = 0;

impl Family for V4 {
    type Addr = u32;
    type Hdr = Ipv4Hdr;
    type Key = ConnKey;
    type SKey = SessionKey;

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
    fn conn_remove(k: &ConnKey) {
        // A missing key is fine: another CPU removed it first.
        let _gone = CLB_CONN_V2.remove(k).is_ok();
    }
    #[inline(always)]
    fn half(k: &ConnKey) -> Option<*mut HalfOpenValue> {
        CLB_HALF_V1.get_ptr_mut(k)
    }
    #[inline(always)]
    fn half_insert(k: &ConnKey, v: &HalfOpenValue) -> bool {
        CLB_HALF_V1.insert(k, v, BPF_ANY).is_ok()
    }
    #[inline(always)]
    fn half_remove(k: &ConnKey) {
        // Absent already (evicted, or another CPU promoted it): nothing to do.
        let _gone = CLB_HALF_V1.remove(k).is_ok();
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
    fn psess(k: &SessionKey) -> Option<*mut SessionValue> {
        CLB_PSESS_V1.get_ptr_mut(k)
    }
    #[inline(always)]
    fn psess_insert(k: &SessionKey, v: &SessionValue, flags: u64) -> bool {
        CLB_PSESS_V1.insert(k, v, flags).is_ok()
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
    fn rst(ctx: &XdpContext, p: &Pkt<V4>) -> Result<(), ()> {
        rst::build(ctx, p)
    }
}

impl Family for V6 {
    type Addr = Addr6;
    type Hdr = Ipv6Hdr;
    type Key = ConnKey6;
    type SKey = SessionKey6;

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
    fn conn_remove(k: &ConnKey6) {
        // A missing key is fine: another CPU removed it first.
        let _gone = CLB_CONN6_V1.remove(k).is_ok();
    }
    #[inline(always)]
    fn half(k: &ConnKey6) -> Option<*mut HalfOpenValue> {
        CLB_HALF6_V1.get_ptr_mut(k)
    }
    #[inline(always)]
    fn half_insert(k: &ConnKey6, v: &HalfOpenValue) -> bool {
        CLB_HALF6_V1.insert(k, v, BPF_ANY).is_ok()
    }
    #[inline(always)]
    fn half_remove(k: &ConnKey6) {
        // Absent already: nothing to do.
        let _gone = CLB_HALF6_V1.remove(k).is_ok();
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
    fn psess(k: &SessionKey6) -> Option<*mut SessionValue> {
        CLB_PSESS6_V1.get_ptr_mut(k)
    }
    #[inline(always)]
    fn psess_insert(k: &SessionKey6, v: &SessionValue, flags: u64) -> bool {
        CLB_PSESS6_V1.insert(k, v, flags).is_ok()
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
    fn rst(ctx: &XdpContext, p: &Pkt<V6>) -> Result<(), ()> {
        rst::build6(ctx, p)
    }
}
