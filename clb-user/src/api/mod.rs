//! The daemon's local API (JSON over HTTP/1.1 on a Unix socket): the wire types, the server
//! (over the controller), and the client the CLI uses.

pub mod client;
pub mod server;
pub mod signin;
pub mod types;

use std::{os::unix::fs::PermissionsExt as _, path::Path};

use anyhow::Context as _;
use tokio::net::UnixListener;

/// Binds the API socket at `path` with mode 0600 from the start (created under a umask of
/// 0177: no window in which another user could connect), replacing a stale socket file.
/// The caller holds the socket's lock (`datapath::lock`), so nothing else is using it.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    // SAFETY: umask only changes this process's file-creation mask; restored right after.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = l.with_context(|| format!("binding {}", path.display()))?;
    // Belt and braces: the mode is 0600 whatever the filesystem did with the umask.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}
