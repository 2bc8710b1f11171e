//! Internet checksum helpers (RFC 1071 sums, RFC 1624 incremental updates).
//!
//! All 16-bit words are used as they sit in memory (`from_ne_bytes` of the packet bytes). The
//! one's-complement sum commutes with byte swapping, so a checksum computed and stored that way
//! is the right one on the wire, and no byte order conversion is needed anywhere.

use clb_common::{Addr6, half6};

/// Folds a 32-bit one's-complement accumulator to 16 bits (not inverted).
#[inline(always)]
pub fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')` for one 16-bit word changing from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let s = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(s)
}

/// [`replace2`] for a 32-bit field (an IPv4 address), as two 16-bit words.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let s = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    !fold(s)
}

/// UDP: a computed checksum of 0 is sent as 0xffff (0 means "no checksum", RFC 768).
#[inline(always)]
pub fn udp_nonzero(c: u16) -> u16 {
    if c == 0 { 0xffff } else { c }
}

/// [`replace2`] for a 128-bit field (an IPv6 address), as eight 16-bit words.
#[inline(always)]
pub fn replace16(check: u16, old: &Addr6, new: &Addr6) -> u16 {
    let mut s = u32::from(!check);
    let mut i = 0;
    while i < 8 {
        s += u32::from(!half6(old, i)) + u32::from(half6(new, i));
        i += 1;
    }
    !fold(s)
}

/// The one's-complement sum of an address's eight 16-bit words (for pseudo-headers).
#[inline(always)]
pub fn sum16(a: &Addr6) -> u32 {
    let mut s = 0;
    let mut i = 0;
    while i < 8 {
        s += u32::from(half6(a, i));
        i += 1;
    }
    s
}
