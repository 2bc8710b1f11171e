//! Loading the embedded XDP object, pinning its maps and XDP links under a bpffs directory,
//! attaching to interfaces, and tearing it all down.
//!
//! Pin layout under the directory (default `/sys/fs/bpf/clb`):
//! `maps/<MAP_NAME>` for every map (`clb_common::ALL_MAPS`) and `links/<ifname>` for every
//! attachment. A new daemon reuses both: maps keep their contents (aya checks that a pinned
//! map's type, key and value sizes match the object's), and a pinned link is pointed at the
//! newly loaded program atomically, so packets never see a gap.

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use clb_common::{ALL_MAPS, PASS_PROGRAM, XDP_PROGRAM};
use tracing::{info, warn};

use crate::{EBPF_OBJECT, dataplane::AyaDataplane};

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The default pin directory.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/clb";

/// How to attach: native (driver) XDP, generic (skb) XDP, or native with a generic fallback.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Native,
    Generic,
    Auto,
}

/// A loaded program with its maps taken out as a [`AyaDataplane`].
pub struct Loaded {
    pub ebpf: Ebpf,
    pub dataplane: AyaDataplane,
    /// Where maps and links are pinned, if anywhere.
    pub pin_dir: Option<PathBuf>,
}

/// Loads the embedded object. With `pin_dir`, every map is pinned there (reused if already
/// pinned with the same layout); without, the maps live as long as the returned value.
pub fn load(pin_dir: Option<&Path>) -> anyhow::Result<Loaded> {
    load_inner(pin_dir, false)
}

/// Loads the object with every map shrunk to one entry: for attaching only the pass program
/// (`clb_common::PASS_PROGRAM`) to veth peers, without allocating the balancer's tables.
pub fn load_small() -> anyhow::Result<Loaded> {
    load_inner(None, true)
}

fn load_inner(pin_dir: Option<&Path>, small: bool) -> anyhow::Result<Loaded> {
    let mut loader = EbpfLoader::new();
    if small {
        for name in ALL_MAPS {
            loader.map_max_entries(name, 1);
        }
    }
    if let Some(dir) = pin_dir {
        let maps = dir.join("maps");
        std::fs::create_dir_all(&maps).with_context(|| format!("creating {}", maps.display()))?;
        for name in ALL_MAPS {
            loader.map_pin_path(name, maps.join(name));
        }
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .context("loading the clb eBPF object (maps pinned with another layout?)")?;
    for name in [XDP_PROGRAM, PASS_PROGRAM] {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading XDP program {name} (verifier)"))?;
    }
    let dataplane = AyaDataplane::from_ebpf(&mut ebpf)?;
    Ok(Loaded {
        ebpf,
        dataplane,
        pin_dir: pin_dir.map(Path::to_owned),
    })
}

fn xdp_prog<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing"))?
        .try_into()?)
}

/// Attaches program `name` (the balancer or the pass program) to `iface` in the calling
/// thread's network namespace. Returns the ifindex.
///
/// With a pin directory: an existing pinned link for `iface` is switched to this program
/// (atomic replace; the datapath never stops), otherwise a new link is created and pinned,
/// so it outlives this process. Without: the attachment lives as long as `ebpf`.
pub fn attach(
    ebpf: &mut Ebpf,
    name: &str,
    iface: &str,
    mode: AttachMode,
    pin_dir: Option<&Path>,
) -> anyhow::Result<u32> {
    let c_iface = CString::new(iface).context("interface name")?;
    // SAFETY: a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(c_iface.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface named {iface:?} in this network namespace");
    }
    let prog = xdp_prog(ebpf, name)?;
    let link_pin = pin_dir.map(|d| d.join("links").join(iface));
    if let Some(pin) = &link_pin
        && pin.exists()
    {
        match PinnedLink::from_pin(pin) {
            Ok(pinned) => {
                let fd_link: FdLink = pinned.into();
                let xdp_link = XdpLink::try_from(fd_link)
                    .with_context(|| format!("{} is not an XDP link", pin.display()))?;
                let id = prog
                    .attach_to_link(xdp_link)
                    .with_context(|| format!("replacing the program on {iface}"))?;
                // The link stays pinned; let go of our handle without detaching.
                let link = prog.take_link(id)?;
                drop(FdLink::try_from(link)?);
                info!(iface, "reused pinned XDP link, program replaced in place");
                return Ok(ifindex);
            }
            Err(e) => {
                warn!(iface, error = %e, "stale link pin, removing it");
                std::fs::remove_file(pin).ok();
            }
        }
    }
    let id = match mode {
        AttachMode::Native => prog
            .attach(c_iface.as_c_str(), XdpMode::Driver)
            .with_context(|| format!("attaching {name} to {iface} in native mode"))?,
        AttachMode::Generic => prog
            .attach(c_iface.as_c_str(), XdpMode::Skb)
            .with_context(|| format!("attaching {name} to {iface} in generic mode"))?,
        AttachMode::Auto => match prog.attach(c_iface.as_c_str(), XdpMode::Driver) {
            Ok(id) => id,
            Err(e) => {
                warn!(iface, error = %e, "native XDP unavailable, falling back to generic mode");
                prog.attach(c_iface.as_c_str(), XdpMode::Skb)
                    .with_context(|| format!("attaching {name} to {iface} in generic mode"))?
            }
        },
    };
    if let Some(pin) = link_pin {
        let dir = pin.parent().expect("links dir");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let link = prog.take_link(id)?;
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                fd_link
                    .pin(&pin)
                    .with_context(|| format!("pinning the XDP link at {}", pin.display()))?;
            }
            Err(_) => {
                // Netlink attachment (no bpf_link support): it stays on the interface until
                // removed, with nothing to pin.
                warn!(iface, "attached through netlink; the link cannot be pinned");
            }
        }
    }
    Ok(ifindex)
}

/// Makes sure `dir` is on a bpffs, mounting one if needed: if neither `dir` nor its parent
/// is on bpffs, a bpffs is mounted at `dir`. Returns whether it mounted one.
pub fn ensure_bpffs(dir: &Path) -> anyhow::Result<bool> {
    if dir.exists() && is_bpffs(dir)? {
        return Ok(false);
    }
    if let Some(parent) = dir.parent()
        && parent.exists()
        && is_bpffs(parent)?
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        return Ok(false);
    }
    // The bpffs root for the default location is /sys/fs/bpf itself.
    let mount_at = if dir.parent() == Some(Path::new("/sys/fs/bpf")) {
        PathBuf::from("/sys/fs/bpf")
    } else {
        dir.to_owned()
    };
    std::fs::create_dir_all(&mount_at)
        .with_context(|| format!("creating {}", mount_at.display()))?;
    let target = CString::new(mount_at.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid C strings; mounting a fresh bpffs instance.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mounting bpffs at {}", mount_at.display()));
    }
    info!(at = %mount_at.display(), "mounted bpffs (it was not mounted)");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(true)
}

fn is_bpffs(p: &Path) -> anyhow::Result<bool> {
    let c = CString::new(p.as_os_str().as_encoded_bytes())?;
    // SAFETY: zeroed statfs is a valid out-buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("statfs {}", p.display()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// What [`teardown`] removed.
#[derive(Debug, Default)]
pub struct Teardown {
    pub links: Vec<String>,
    pub maps: Vec<String>,
}

/// Detaches every pinned link and removes every pin under `dir` (the datapath stops; the
/// maps are freed once nothing else holds them).
pub fn teardown(dir: &Path) -> anyhow::Result<Teardown> {
    let mut t = Teardown::default();
    let links = dir.join("links");
    if links.exists() {
        for e in std::fs::read_dir(&links)? {
            let e = e?;
            let path = e.path();
            match PinnedLink::from_pin(&path) {
                Ok(pinned) => {
                    // Unpinning drops the bpffs reference; dropping our fd, the last one,
                    // destroys the link and takes the program off the interface.
                    drop(pinned.unpin().context("unpinning link")?);
                }
                Err(_) => {
                    std::fs::remove_file(&path).ok();
                }
            }
            t.links.push(e.file_name().to_string_lossy().into_owned());
        }
        std::fs::remove_dir(&links).ok();
    }
    let maps = dir.join("maps");
    if maps.exists() {
        for e in std::fs::read_dir(&maps)? {
            let e = e?;
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            t.maps.push(e.file_name().to_string_lossy().into_owned());
        }
        std::fs::remove_dir(&maps).ok();
    }
    std::fs::remove_dir(dir).ok();
    Ok(t)
}
