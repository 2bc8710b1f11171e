//! Backend lookups shared by the forward and reply paths.

use clb_common::{BACKEND_F_ACCEPTING, BACKEND_F_PRESENT, BackendInfo};

use crate::maps::CLB_BE_V1;

/// The backend in slot `id` if it is configured (established flows may keep using it).
#[inline(always)]
pub fn present(id: u32) -> Option<&'static BackendInfo> {
    let be = CLB_BE_V1.get(id)?;
    if be.flags & BACKEND_F_PRESENT == 0 {
        return None;
    }
    Some(be)
}

/// Whether backend `id` takes new connections and new persisted clients.
#[inline(always)]
pub fn accepting(id: u32) -> bool {
    match CLB_BE_V1.get(id) {
        Some(be) => {
            be.flags & (BACKEND_F_PRESENT | BACKEND_F_ACCEPTING)
                == (BACKEND_F_PRESENT | BACKEND_F_ACCEPTING)
        }
        None => false,
    }
}
