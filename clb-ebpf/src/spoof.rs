//! Source hygiene for packets to a VIP: martian sources (addresses the kernel would drop) and
//! sources that can only be spoofed or looping (a VIP, a backend, the balancer itself) never
//! create or use state. Checked before anything is written for a flow without a verified
//! entry; a verified entry was created by a clean source.

use clb_common::{Addr6, DENY_BACKEND, DENY_LOCAL, DENY_VIP, counter, ip6_from_be, word6};

use crate::maps::{CLB_NOSRC_V1, CLB_NOSRC6_V1};

/// `Err(drop reason)` if packets to a VIP from `saddr` (network byte order) must be dropped.
#[inline(always)]
pub fn check(saddr: u32) -> Result<(), u32> {
    let first = saddr.to_ne_bytes()[0];
    // 0.0.0.0/8 ("this network"), 127.0.0.0/8 (loopback), 224.0.0.0/4 (multicast) and
    // 240.0.0.0/4 (reserved, including the limited broadcast 255.255.255.255).
    if first == 0 || first == 127 || first >= 224 {
        return Err(counter::DROP_SRC_MARTIAN);
    }
    // SAFETY: read-only use of a map value.
    denied(unsafe { CLB_NOSRC_V1.get(&saddr) })
}

#[inline(always)]
fn denied(reason: Option<&u32>) -> Result<(), u32> {
    match reason {
        None => Ok(()),
        Some(&DENY_VIP) => Err(counter::DROP_SRC_VIP),
        Some(&DENY_BACKEND) => Err(counter::DROP_SRC_BACKEND),
        Some(&DENY_LOCAL) => Err(counter::DROP_SRC_LOCAL),
        Some(_) => Err(counter::DROP_SRC_LOCAL),
    }
}

/// [`check`] for IPv6: the unspecified address, loopback, multicast (ff00::/8), link-local
/// (fe80::/10: not routable to a VIP) and IPv4-mapped (::ffff:0:0/96) sources are martian.
#[inline(always)]
pub fn check6(saddr: Addr6) -> Result<(), u32> {
    let b = ip6_from_be(saddr);
    let (w0, w1, w2, w3) = (
        word6(&saddr, 0),
        word6(&saddr, 1),
        word6(&saddr, 2),
        word6(&saddr, 3),
    );
    let zero64 = w0 == 0 && w1 == 0;
    // ::, ::1, and ::ffff:a.b.c.d (the last word is the IPv4 address).
    let unspecified_or_loopback =
        zero64 && w2 == 0 && (w3 == 0 || w3 == u32::from_ne_bytes([0, 0, 0, 1]));
    let mapped = zero64 && w2 == u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    if unspecified_or_loopback || mapped || b[0] == 0xff || (b[0] == 0xfe && b[1] & 0xc0 == 0x80) {
        return Err(counter::DROP_SRC_MARTIAN);
    }
    // SAFETY: read-only use of a map value.
    denied(unsafe { CLB_NOSRC6_V1.get(&saddr) })
}
