//! One daemon per datapath: exclusive `flock`s on the pin directory, on the API socket (a
//! `.lock` file beside it, holding the owner's pid) and on each interface (a lock file per
//! network namespace and interface name under `/run/clb/locks`). A second daemon for the same
//! pins, interfaces or socket fails to take one and refuses at once, before it changes
//! anything. The kernel drops the locks when the process dies, however it dies.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

/// Where interface locks live.
pub const IFACE_LOCK_DIR: &str = "/run/clb/locks";

/// Taking a lock failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{what} is in use by another clb daemon{owner} (lock {path})")]
    Busy {
        what: String,
        path: PathBuf,
        owner: String,
    },
    #[error("locking {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Held locks; released on drop (or when the process ends).
#[derive(Debug)]
pub struct Locks {
    _files: Vec<File>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LockError + '_ {
    move |source| LockError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Tries an exclusive, non-blocking flock on `f`: `Ok(false)` if another holds it.
fn try_flock(f: &File, path: &Path) -> Result<bool, LockError> {
    // SAFETY: a valid fd owned by `f`.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(io(path)(e))
}

/// Opens (creating) a lock file and locks it; writes our pid into it.
fn lock_file(path: &Path, what: String) -> Result<File, LockError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io(path))?;
    if !try_flock(&f, path)? {
        let owner = std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .map(|pid| format!(" (pid {pid})"))
            .unwrap_or_default();
        return Err(LockError::Busy {
            what,
            path: path.to_owned(),
            owner,
        });
    }
    f.set_len(0).map_err(io(path))?;
    write!(f, "{}", std::process::id()).map_err(io(path))?;
    Ok(f)
}

/// Locks the pin directory `dir` (which must exist): directories can be flocked on any
/// filesystem, bpffs included, which holds no regular files.
pub fn lock_pin_dir(dir: &Path) -> Result<File, LockError> {
    let f = File::open(dir).map_err(io(dir))?;
    if !try_flock(&f, dir)? {
        return Err(LockError::Busy {
            what: format!("the datapath pinned at {}", dir.display()),
            path: dir.to_owned(),
            owner: String::new(),
        });
    }
    Ok(f)
}

/// Whether a daemon holds the pin directory `dir` now.
pub fn pin_dir_in_use(dir: &Path) -> Result<bool, LockError> {
    let f = File::open(dir).map_err(io(dir))?;
    let free = try_flock(&f, dir)?;
    // Dropping `f` releases the probe's lock.
    Ok(!free)
}

/// The lock file of the API socket `api`.
pub fn api_lock_path(api: &Path) -> PathBuf {
    let mut s = api.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// The lock file of interface `iface` in the calling thread's network namespace.
pub fn iface_lock_path(iface: &str) -> Result<PathBuf, LockError> {
    let ns = Path::new("/proc/thread-self/ns/net");
    let ino = std::fs::metadata(ns).map_err(io(ns))?.ino();
    Ok(Path::new(IFACE_LOCK_DIR).join(format!("netns-{ino}-{iface}.lock")))
}

/// Takes every lock a daemon needs, or none: the pin directory, the API socket, the
/// interfaces.
pub fn acquire(pin_dir: &Path, api: &Path, ifaces: &[String]) -> Result<Locks, LockError> {
    let mut files = vec![lock_pin_dir(pin_dir)?];
    files.push(lock_file(
        &api_lock_path(api),
        format!("the API socket {}", api.display()),
    )?);
    for i in ifaces {
        files.push(lock_file(
            &iface_lock_path(i)?,
            format!("interface {i} (this network namespace)"),
        )?);
    }
    Ok(Locks { _files: files })
}
