//! Benchmark-only XDP programs (not part of the balancer): a traffic generator run through
//! `BPF_PROG_TEST_RUN` with live frames, and a counting drop sink for backend interfaces.
//!
//! Live frames recycle their pages without copying the input again, and the balancer
//! rewrites frames in place, so the generator writes every header field on every run.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use clb_gen::{GenConfig, PROTO_TCP, SINK_SEEN_WORDS};

#[map]
static GEN_CFG: Array<GenConfig> = Array::with_max_entries(1, 0);

#[map]
static GEN_SEQ: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static SINK_BITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SINK_SEEN_WORDS, 0);

const HDRS: usize = 14 + 20 + 20;

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Writes the n-th frame and redirects it out of the configured interface.
#[xdp]
pub fn clb_gen(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + HDRS > end {
        return xdp_action::XDP_ABORTED;
    }
    let Some(cfg) = GEN_CFG.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let Some(seq) = GEN_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a map value; only this program (on the test-run CPU) writes it.
    let n = unsafe {
        let v = *seq;
        *seq = v + 1;
        v
    };
    let sources = if cfg.sources == 0 { 1 } else { cfg.sources };
    let ports = if cfg.ports == 0 { 1 } else { cfg.ports };
    let src = (cfg.src_base.wrapping_add((n % u64::from(sources)) as u32)).to_be();
    let sport = cfg
        .sport_base
        .wrapping_add(((n / u64::from(sources)) % u64::from(ports)) as u16)
        .to_be();
    let len = (end - start) as u16;
    // TCP: a bare 40-byte IPv4/TCP packet (the frame's tail is Ethernet padding), so the
    // checksum below covers exactly the segment; UDP: the whole frame is the datagram.
    let ip_len = if cfg.proto == PROTO_TCP { 40 } else { len - 14 };
    let p = start as *mut u8;
    // SAFETY: `HDRS` bytes were bounds-checked above; all writes are within them.
    unsafe {
        core::ptr::copy_nonoverlapping(cfg.dst_mac.as_ptr(), p, 6);
        core::ptr::copy_nonoverlapping(cfg.src_mac.as_ptr(), p.add(6), 6);
        *p.add(12) = 0x08;
        *p.add(13) = 0x00;
        let ip = p.add(14);
        *ip = 0x45;
        *ip.add(1) = 0;
        *(ip.add(2) as *mut u16) = ip_len.to_be();
        *(ip.add(4) as *mut u16) = (n as u16).to_be();
        *(ip.add(6) as *mut u16) = 0x4000u16.to_be();
        *ip.add(8) = 64;
        *ip.add(9) = cfg.proto;
        *(ip.add(10) as *mut u16) = 0;
        *(ip.add(12) as *mut u32) = src;
        *(ip.add(16) as *mut u32) = cfg.dst;
        let w = ip as *const u16;
        let mut s: u32 = 0;
        let mut i = 0;
        while i < 10 {
            s += u32::from(*w.add(i));
            i += 1;
        }
        *(ip.add(10) as *mut u16) = !fold(s);
        let l4 = ip.add(20);
        *(l4 as *mut u16) = sport;
        *(l4.add(2) as *mut u16) = cfg.dport;
        if cfg.proto == PROTO_TCP {
            *(l4.add(4) as *mut u32) = (n as u32).to_be(); // seq
            *(l4.add(8) as *mut u32) = 0;
            *l4.add(12) = 5 << 4;
            *l4.add(13) = if cfg.tcp_flags == 0 {
                0x02
            } else {
                cfg.tcp_flags
            };
            *(l4.add(14) as *mut u16) = 64240u16.to_be();
            *(l4.add(16) as *mut u16) = 0;
            *(l4.add(18) as *mut u16) = 0;
            // Checksum over the pseudo-header and the 20-byte header (no payload).
            let mut s: u32 = (src & 0xffff)
                + (src >> 16)
                + (cfg.dst & 0xffff)
                + (cfg.dst >> 16)
                + u32::from(u16::from_ne_bytes([0, PROTO_TCP]))
                + u32::from(20u16.to_be());
            let tw = l4 as *const u16;
            let mut i = 0;
            while i < 10 {
                s += u32::from(*tw.add(i));
                i += 1;
            }
            *(l4.add(16) as *mut u16) = !fold(s);
        } else {
            *(l4.add(4) as *mut u16) = (ip_len - 20).to_be();
            *(l4.add(6) as *mut u16) = 0; // no checksum (valid for UDP over IPv4)
        }
    }
    // SAFETY: helper call with plain integers.
    unsafe { bpf_redirect(cfg.ifindex, 0) as u32 }
}

/// Counts and drops every frame; remembers IPv4 sources in a bitmap (the persistence check).
/// Kept to two array lookups so the sink costs clb and its peers the same little.
#[xdp]
pub fn clb_sink(ctx: XdpContext) -> u32 {
    if let Some(c) = SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 34 <= end {
        // SAFETY: bounds-checked above.
        let (ethertype, src) =
            unsafe { (*((start + 12) as *const u16), *((start + 26) as *const u32)) };
        if ethertype == u16::from_ne_bytes([0x08, 0x00]) {
            let low = u32::from_be(src) & 0xffff;
            if let Some(w) = SINK_BITS.get_ptr_mut(low >> 6) {
                // SAFETY: per-CPU slot, no concurrent writer.
                unsafe { *w |= 1u64 << (low & 63) };
            }
        }
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
