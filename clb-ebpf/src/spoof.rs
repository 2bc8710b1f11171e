//! Source hygiene for packets to a VIP: martian sources (addresses the kernel would drop) and
//! sources that can only be spoofed or looping (a VIP, a backend, the balancer itself) never
//! create or use state. Checked before anything is written for a flow without a verified
//! entry; a verified entry was created by a clean source.

use clb_common::{DENY_BACKEND, DENY_LOCAL, DENY_VIP, counter};

use crate::maps::CLB_NOSRC_V1;

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
    match unsafe { CLB_NOSRC_V1.get(&saddr) } {
        None => Ok(()),
        Some(&DENY_VIP) => Err(counter::DROP_SRC_VIP),
        Some(&DENY_BACKEND) => Err(counter::DROP_SRC_BACKEND),
        Some(&DENY_LOCAL) => Err(counter::DROP_SRC_LOCAL),
        Some(_) => Err(counter::DROP_SRC_LOCAL),
    }
}
