//! The address family a packet belongs to. The state machine (`forward`, `reply`,
//! `conntrack`, `halfopen`, `persist`) is written once over [`Family`]; what differs between
//! IPv4 and IPv6 — address type, table keys and maps, masks and hashes, source hygiene, the
//! header rewrite and the next hop — is in the implementations, `ipv4.rs` and `ipv6.rs`. This
//! module is only the abstraction and the packet it works on, so every module can name it
//! without importing the implementations (which import those modules).

use aya_ebpf::programs::XdpContext;
use clb_common::{
    BackendAddrInfo, BackendInfo, ConnValue, HalfOpenValue, ListenerInfo, PROTO_TCP, SessionValue,
    slots::Slot,
};

/// TCP flag bits (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

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
    /// The half-open table (in-place, `clb_common::slots`).
    type Half: crate::slots::Table<S: Slot<Key = Self::Key, Val = HalfOpenValue>>;
    /// The pending-persistence table (in-place).
    type Pend: crate::slots::Table<S: Slot<Key = Self::SKey, Val = SessionValue>>;

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
    fn sess(k: &Self::SKey) -> Option<*mut SessionValue>;
    fn sess_insert(k: &Self::SKey, v: &SessionValue) -> bool;

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
    /// Notes a reply's first fragment (before its rewrite), so its datagram's later fragments
    /// are SNATed to `vip` too (`frag`).
    fn note_fragment(
        ctx: &XdpContext,
        ip: *const Self::Hdr,
        p: &Pkt<Self>,
        vip: Self::Addr,
        listener: u32,
        backend: u32,
        now: u64,
    );
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
pub const BPF_ANY: u64 = 0;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Destination: client → VIP becomes client → backend.
    Dst,
    /// Source: backend → client becomes VIP → client.
    Src,
}

/// What the datapath needs of a TCP/UDP packet. Addresses and ports in network byte order.
pub struct Pkt<F: Family> {
    /// Offset of the L4 header.
    pub l4_off: usize,
    /// The IP packet's length, header included (host order).
    pub ip_len: u16,
    pub saddr: F::Addr,
    pub daddr: F::Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags; for UDP 0, or `frag::UDP_FIRST_FRAGMENT` for a datagram's first fragment.
    pub tcp_flags: u8,
}

impl<F: Family> Clone for Pkt<F> {
    #[inline(always)]
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: Family> Copy for Pkt<F> {}

impl<F: Family> Pkt<F> {
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == PROTO_TCP
    }
    /// A connection opener: SYN without ACK.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.is_tcp() && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
    /// Any segment with SYN set (a SYN or a SYN-ACK): never a handshake's completion.
    #[inline(always)]
    pub fn has_syn(&self) -> bool {
        self.is_tcp() && self.tcp_flags & TCP_SYN != 0
    }
    /// A TCP reset.
    #[inline(always)]
    pub fn is_rst(&self) -> bool {
        self.is_tcp() && self.tcp_flags & TCP_RST != 0
    }
    /// A TCP segment with ACK and without SYN or RST: what completes a handshake.
    #[inline(always)]
    pub fn is_plain_ack(&self) -> bool {
        self.is_tcp() && self.tcp_flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK
    }
    /// A SYN-ACK: a backend's answer to a SYN.
    #[inline(always)]
    pub fn is_syn_ack(&self) -> bool {
        self.is_tcp() && self.tcp_flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_SYN | TCP_ACK
    }
    /// The TCP segment's sequence number (host order); 0 if the header cannot be read (it was
    /// parsed before, so it always can).
    #[inline(always)]
    pub fn tcp_seq(&self, ctx: &XdpContext) -> u32 {
        self.tcp_word(ctx, 4)
    }
    /// The TCP segment's acknowledgment number (host order).
    #[inline(always)]
    pub fn tcp_ack(&self, ctx: &XdpContext) -> u32 {
        self.tcp_word(ctx, 8)
    }
    /// Whether the TCP segment carries data (the IP packet ends past its TCP header).
    #[inline(always)]
    pub fn tcp_has_data(&self, ctx: &XdpContext) -> bool {
        let Ok(b) = crate::parse::ptr_at::<[u8; 13]>(ctx, self.l4_off) else {
            return false;
        };
        // SAFETY: `ptr_at` checked the frame holds these 13 bytes.
        let doff = usize::from(unsafe { (*b)[12] } >> 4) * 4;
        crate::parse::IP_OFF + usize::from(self.ip_len) > self.l4_off + doff
    }
    #[inline(always)]
    fn tcp_word(&self, ctx: &XdpContext, at: usize) -> u32 {
        // Read on the few paths that need them, not parsed for every packet.
        match crate::parse::ptr_at::<[u8; 12]>(ctx, self.l4_off) {
            // SAFETY: `ptr_at` checked the frame holds these 12 bytes.
            Ok(b) => unsafe {
                u32::from_be_bytes([(*b)[at], (*b)[at + 1], (*b)[at + 2], (*b)[at + 3]])
            },
            Err(()) => 0,
        }
    }
}
