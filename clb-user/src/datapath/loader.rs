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
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use clb_common::{
    ALL_MAPS, CONN_MAP, CONN6_MAP, HALF_OPEN_MAP, HALF_OPEN6_MAP, HalfSlot, HalfSlot6,
    PASS_PROGRAM, PENDING_SESSION_MAP, PENDING_SESSION6_MAP, PROGRAM_MAP, PendSlot, PendSlot6,
    SESSION_MAP, SESSION6_MAP, SLOT_SETS_GLOBAL, SLOT_SETS6_GLOBAL, TAIL_PROGRAMS, XDP_PROGRAM,
    layouts::{self, Fate},
    slot_sets,
    slots::Slot,
};
use tracing::{info, warn};

use super::{aya::AyaDataplane, slots::SlotTable};
use crate::EBPF_OBJECT;

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

/// Sizes of the flow tables, set at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableSizes {
    pub connections: u32,
    pub half_open: u32,
    pub sessions: u32,
    /// The IPv6 tables (sized on their own: a dual-stack listener's flows split by family).
    pub connections6: u32,
    pub half_open6: u32,
    pub sessions6: u32,
}

impl Default for TableSizes {
    fn default() -> Self {
        Self {
            connections: clb_common::DEFAULT_CONNS,
            half_open: clb_common::DEFAULT_HALF_OPEN,
            sessions: clb_common::DEFAULT_SESSIONS,
            connections6: clb_common::DEFAULT_CONNS6,
            half_open6: clb_common::DEFAULT_HALF_OPEN6,
            sessions6: clb_common::DEFAULT_SESSIONS6,
        }
    }
}

/// One sized table as the loader creates it.
struct Sized {
    name: &'static str,
    /// The map's `max_entries`: entries of a hash map, sets of an in-place table.
    max_entries: u32,
    /// The `[tables]` setting and its value (entries).
    setting: &'static str,
    entries: u32,
    /// Kernel memory per entry, about.
    entry_bytes: u64,
}

impl TableSizes {
    /// Each sized table: the LRU hash maps of verified flows, and the in-place tables of
    /// unverified ones (`clb_common::slots`: their map entries are sets of slots).
    fn maps(&self) -> [Sized; 8] {
        let lru = |name, entries, setting, entry_bytes| Sized {
            name,
            max_entries: entries,
            setting,
            entries,
            entry_bytes,
        };
        let slots = |name, entries, setting, slot: usize| Sized {
            name,
            max_entries: slot_sets(entries),
            setting,
            entries,
            entry_bytes: slot as u64,
        };
        [
            lru(CONN_MAP, self.connections, "connections", 96),
            slots(
                HALF_OPEN_MAP,
                self.half_open,
                "half_open",
                size_of::<HalfSlot>(),
            ),
            lru(SESSION_MAP, self.sessions, "sessions", 88),
            slots(
                PENDING_SESSION_MAP,
                self.half_open,
                "half_open",
                size_of::<PendSlot>(),
            ),
            lru(CONN6_MAP, self.connections6, "connections6", 104),
            slots(
                HALF_OPEN6_MAP,
                self.half_open6,
                "half_open6",
                size_of::<HalfSlot6>(),
            ),
            lru(SESSION6_MAP, self.sessions6, "sessions6", 104),
            slots(
                PENDING_SESSION6_MAP,
                self.half_open6,
                "half_open6",
                size_of::<PendSlot6>(),
            ),
        ]
    }
}

/// A pinned table being resized or migrated: the old map (moved aside, or an earlier layout
/// version's pin), whose live entries are copied into the new one.
pub struct Resize {
    pub name: &'static str,
    pub from: u32,
    pub to: u32,
    old: MapData,
    /// A handle on the new table.
    new: Option<MapData>,
    aside: PathBuf,
    /// Entries copied so far.
    pub copied: u64,
    /// A migration from an earlier layout: the old pin's name and its entries' converter.
    pub migrate: Option<Migration>,
}

/// A table of an earlier layout version converted into this version's table.
#[derive(Clone, Copy)]
pub struct Migration {
    /// The earlier layout's pin name (`clb_common::layouts`).
    pub from: &'static str,
    /// Converts one value (the keys are the same in every converted layout).
    conv: Convert,
    /// The new table already existed: a migration interrupted after its first copy, whose
    /// entries may be newer than the old table's. Only the keys it lacks are copied.
    resumed: bool,
    /// When the migration began (its log line says how long it took, attach included).
    started: std::time::Instant,
    /// The old program writes the table (flows, persisted clients): what it wrote between
    /// the first copy and the attach is copied after it.
    written_by_datapath: bool,
}

/// Appends the converted form of one value (its bytes) to a buffer.
type Convert = fn(&[u8], &mut Vec<u8>);

/// The converter of each convertible earlier layout (`clb_common::layouts::Fate::Converted`).
fn converter(pin: &str) -> Option<Convert> {
    use clb_common::layouts::v0_1;
    fn conv<A: bytemuck::Pod, B: bytemuck::Pod>(v: &[u8], out: &mut Vec<u8>, f: fn(&A) -> B) {
        let a: A = bytemuck::pod_read_unaligned(v);
        out.extend_from_slice(bytemuck::bytes_of(&f(&a)));
    }
    Some(match pin {
        "CLB_LSN_V1" => |v, out| {
            // An inactive slot stays all zeros (the table is an array: every index exists).
            let a: v0_1::ListenerInfo = bytemuck::pod_read_unaligned(v);
            if a.flags & v0_1::LISTENER_F_ACTIVE == 0 {
                out.extend_from_slice(&[0; size_of::<clb_common::ListenerInfo>()]);
            } else {
                out.extend_from_slice(bytemuck::bytes_of(&v0_1::listener(&a)));
            }
        },
        "CLB_CONN_V1" => |v, out| conv(v, out, v0_1::conn),
        "CLB_SESS_V1" => |v, out| conv(v, out, v0_1::session),
        _ => return None,
    })
}

/// A loaded program with its maps taken out as a [`AyaDataplane`].
pub struct Loaded {
    pub ebpf: Ebpf,
    pub dataplane: AyaDataplane,
    /// Where maps and links are pinned, if anywhere.
    pub pin_dir: Option<PathBuf>,
    /// Pinned tables whose size changed (see [`copy_resized`]).
    pub resized: Vec<Resize>,
}

/// Loads the embedded object with tables of `sizes`. With `pin_dir`, every map is pinned there
/// (reused if already pinned with the same layout and size); without, the maps live as long as
/// the returned value.
///
/// A pinned table of another size is resized: the old pin is moved aside, a new table of the
/// configured size is created, and its live entries are copied over — once now, before the
/// new program replaces the old one on the interfaces, and once more after (entries created
/// in between), by [`copy_resized`]. A smaller table keeps what fits (the LRU evicts
/// the rest; an in-place table keeps the newest entries of each set). The kernel refusing the
/// memory is an error that names the table and its size.
///
/// Pins of an earlier layout version (`clb_common::layouts`) are upgraded the same way: a
/// converted table's entries are copied through its converter into the new table (created by
/// this load) now and, for what the old program wrote in between, after the attach; its old
/// pin goes then. Schedules, counters and tables of unverified flows of an earlier layout are
/// dropped once this load succeeds. Pins of a newer or unknown layout are refused by name.
pub fn load(pin_dir: Option<&Path>, sizes: &TableSizes) -> anyhow::Result<Loaded> {
    load_inner(pin_dir, sizes, false)
}

/// Loads the object with every map shrunk to one entry: for attaching only the pass program
/// (`clb_common::PASS_PROGRAM`) to veth peers, without allocating the balancer's tables.
pub fn load_small() -> anyhow::Result<Loaded> {
    load_inner(None, &TableSizes::default(), true)
}

fn load_inner(pin_dir: Option<&Path>, sizes: &TableSizes, small: bool) -> anyhow::Result<Loaded> {
    let mut loader = EbpfLoader::new();
    // The in-place tables' geometry, a constant of this program (each loaded program keeps
    // its own, matching the tables it was loaded with).
    let (sets, sets6) = if small {
        (0, 0)
    } else {
        (slot_sets(sizes.half_open), slot_sets(sizes.half_open6))
    };
    loader
        .override_global(SLOT_SETS_GLOBAL, &sets, true)
        .override_global(SLOT_SETS6_GLOBAL, &sets6, true);
    if small {
        for name in ALL_MAPS {
            loader.map_max_entries(name, 1);
        }
    } else {
        for t in sizes.maps() {
            loader.map_max_entries(t.name, t.max_entries);
        }
    }
    let mut resized = Vec::new();
    // Pins this load creates, removed again if it fails (a refused load leaves nothing).
    let mut created: Vec<PathBuf> = Vec::new();
    let mut maps_dir_created = false;
    if let Some(dir) = pin_dir {
        let maps = dir.join("maps");
        refuse_other_layouts(&maps)?;
        maps_dir_created = !maps.exists();
        std::fs::create_dir_all(&maps).with_context(|| format!("creating {}", maps.display()))?;
        created = ALL_MAPS
            .iter()
            .map(|name| maps.join(name))
            .filter(|p| !p.exists())
            .collect();
        for Sized {
            name,
            max_entries: to,
            ..
        } in sizes.maps()
        {
            let pin = maps.join(name);
            let aside = maps.join(format!("{RESIZE_PREFIX}{name}"));
            if aside.exists() {
                // A resize that did not finish (the daemon died during it).
                if pin.exists() {
                    warn!(
                        table = name,
                        "removing the old table of an unfinished resize"
                    );
                    std::fs::remove_file(&aside).ok();
                } else {
                    warn!(
                        table = name,
                        "restoring the old table of an unfinished resize"
                    );
                    std::fs::rename(&aside, &pin).with_context(|| {
                        format!("restoring {} from {}", pin.display(), aside.display())
                    })?;
                }
            }
            if !pin.exists() {
                continue;
            }
            let old = MapData::from_pin(&pin)
                .with_context(|| format!("opening the pinned table {}", pin.display()))?;
            let from = old.info()?.max_entries();
            if from == to {
                continue;
            }
            std::fs::rename(&pin, &aside)
                .with_context(|| format!("moving {} aside to resize it", pin.display()))?;
            info!(
                table = name,
                from, to, "resizing a pinned table; its live entries are copied"
            );
            resized.push(Resize {
                name,
                from,
                to,
                old,
                new: None,
                aside,
                copied: 0,
                migrate: None,
            });
        }
        resized.extend(migrations(&maps)?);
        for name in ALL_MAPS {
            loader.map_pin_path(name, maps.join(name));
        }
    }
    let mut ebpf = match loader.load(EBPF_OBJECT) {
        Ok(e) => e,
        Err(e) => {
            // Nothing changes: the pins this load created go, the old tables come back.
            for p in &created {
                if p.exists()
                    && let Err(err) = std::fs::remove_file(p)
                {
                    warn!(pin = %p.display(), "removing a pin of the failed load: {err}");
                }
            }
            if let Some(dir) = pin_dir {
                for r in resized.iter().filter(|r| r.migrate.is_none()) {
                    if let Err(err) = std::fs::rename(&r.aside, dir.join("maps").join(r.name)) {
                        warn!(table = r.name, "putting the old table back: {err}");
                    }
                }
                if maps_dir_created {
                    std::fs::remove_dir(dir.join("maps")).ok();
                }
            }
            return Err(explain_load_error(e, sizes));
        }
    };
    for name in [XDP_PROGRAM, PASS_PROGRAM]
        .into_iter()
        .chain(TAIL_PROGRAMS.map(|(name, _)| name))
    {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading XDP program {name} (verifier)"))?;
    }
    if !small {
        fill_tail_calls(&mut ebpf)?;
    }
    if let Some(dir) = pin_dir {
        drop_superseded(&dir.join("maps"));
    }
    let dataplane = AyaDataplane::from_ebpf(&mut ebpf)?;
    let tables = dataplane.aya_tables();
    for r in &mut resized {
        if r.migrate.is_some()
            && let Some(dir) = pin_dir
        {
            // A converted table may be any of the object's maps: its new pin is its handle.
            let pin = dir.join("maps").join(r.name);
            r.new = Some(
                MapData::from_pin(&pin)
                    .with_context(|| format!("opening the new table {}", pin.display()))?,
            );
            continue;
        }
        let m = tables
            .by_name(r.name)
            .ok_or_else(|| anyhow!("table {} missing from the object", r.name))?;
        let id = m.info()?.id();
        r.new = Some(MapData::from_id(id)?);
    }
    copy_resized(&mut resized, false)?;
    Ok(Loaded {
        ebpf,
        dataplane,
        pin_dir: pin_dir.map(Path::to_owned),
        resized,
    })
}

/// Puts the IPv6 programs (packets, ICMPv6, later fragments) into the program array the balancer tail-calls them through (a
/// pinned array from an earlier load gets this load's programs).
fn fill_tail_calls(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut fds = Vec::new();
    for (name, slot) in TAIL_PROGRAMS {
        let prog: &Xdp = ebpf
            .program(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?
            .try_into()?;
        fds.push((slot, prog.fd()?.try_clone()?));
    }
    let map = ebpf
        .map_mut(PROGRAM_MAP)
        .ok_or_else(|| anyhow!("map {PROGRAM_MAP} missing from the object"))?;
    let mut progs = aya::maps::ProgramArray::try_from(map)?;
    for (slot, fd) in &fds {
        progs
            .set(*slot, fd, 0)
            .with_context(|| format!("setting tail-call slot {slot} of {PROGRAM_MAP}"))?;
    }
    Ok(())
}

/// A load error, with the table, its `[tables]` setting and size named when the kernel
/// refused a table's memory.
fn explain_load_error(e: aya::EbpfError, sizes: &TableSizes) -> anyhow::Error {
    // The whole chain: aya's message names the map, its source carries the errno.
    let mut text = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        src = s.source();
    }
    let refused = [
        "os error 12",
        "os error 7",
        "os error 1)",
        "memory",
        "too big",
    ]
    .iter()
    .any(|m| text.contains(m));
    for t in sizes.maps() {
        let (name, n, setting) = (t.name, t.entries, t.setting);
        if refused && text.contains(&format!("`{name}`")) {
            return anyhow!(
                "the kernel refused the memory for table {name} ({n} entries, about {} MB; [tables] {setting}): {text}. Nothing was changed; configure a smaller [tables] {setting}, or give the daemon more memory (its cgroup's limit, or RLIMIT_MEMLOCK on kernels before 5.11)",
                (u64::from(n) * t.entry_bytes).div_ceil(1_000_000)
            );
        }
    }
    anyhow!("loading the clb eBPF object: {text}")
}

/// Copies the live entries of resized tables into the new ones. `after_attach`: the second
/// pass, once the new program runs: only keys the new table lacks are copied (the old program
/// stopped writing; the new one's entries are newer), then the old pins go. Returns, after the
/// attach, a line per table migrated from an earlier layout (for `clb status`).
pub fn copy_resized(resized: &mut Vec<Resize>, after_attach: bool) -> anyhow::Result<Vec<String>> {
    let mut migrated = Vec::new();
    for r in resized.iter_mut() {
        let Some(new) = &r.new else {
            continue;
        };
        if let Some(m) = r.migrate {
            if after_attach && !m.written_by_datapath {
                // Only user space writes it (the listener table): the first copy has it all,
                // and since then the daemon may have changed the new one (a listener the
                // configuration lost), which a second copy would undo.
                info!(
                    from = m.from,
                    to = r.name,
                    entries = r.copied,
                    "migrated {} → {}: {} entries",
                    m.from,
                    r.name,
                    r.copied
                );
                std::fs::remove_file(&r.aside).ok();
                continue;
            }
            let t0 = std::time::Instant::now();
            let n = copy_entries(&r.old, new, after_attach || m.resumed, m.conv)
                .with_context(|| format!("converting the entries of {} into {}", m.from, r.name))?;
            r.copied += n;
            info!(
                from = m.from,
                to = r.name,
                entries = n,
                ms = t0.elapsed().as_millis(),
                "{} copy of {}: {n} entries converted",
                if after_attach {
                    "second (after the attach)"
                } else {
                    "first"
                },
                m.from
            );
            if after_attach {
                let ms = m.started.elapsed().as_millis();
                info!(
                    from = m.from,
                    to = r.name,
                    entries = r.copied,
                    ms,
                    "migrated {} → {}: {} entries in {ms} ms (load and attach included)",
                    m.from,
                    r.name,
                    r.copied
                );
                std::fs::remove_file(&r.aside).ok();
            }
            continue;
        }
        let n = copy_table(r.name, &r.old, new, after_attach)
            .with_context(|| format!("copying entries of {} into its resized table", r.name))?;
        r.copied += n;
        if after_attach {
            info!(
                table = r.name,
                from = r.from,
                to = r.to,
                copied = r.copied,
                "table resized; live entries copied (a smaller table keeps what fits)"
            );
            std::fs::remove_file(&r.aside).ok();
        }
    }
    if after_attach {
        migrated.extend(resized.iter().filter_map(|r| {
            r.migrate
                .map(|m| format!("{} → {}: {} entries", m.from, r.name, r.copied))
        }));
        resized.clear();
    }
    Ok(migrated)
}

/// Copies the live entries of table `name` from `from` into `to`: hash maps entry by entry, the
/// in-place tables by placing each entry anew (their geometry changed with their size).
fn copy_table(
    name: &str,
    from: &MapData,
    to: &MapData,
    missing_only: bool,
) -> std::io::Result<u64> {
    match name {
        HALF_OPEN_MAP => copy_slots::<HalfSlot>(from, to, missing_only),
        HALF_OPEN6_MAP => copy_slots::<HalfSlot6>(from, to, missing_only),
        PENDING_SESSION_MAP => copy_slots::<PendSlot>(from, to, missing_only),
        PENDING_SESSION6_MAP => copy_slots::<PendSlot6>(from, to, missing_only),
        _ => copy_entries(from, to, missing_only, |v, out| out.extend_from_slice(v)),
    }
}

/// [`copy_table`] of an in-place table with slots `S`.
fn copy_slots<S: Slot>(from: &MapData, to: &MapData, missing_only: bool) -> std::io::Result<u64> {
    let (from, to) = (SlotTable::<S>::of(from)?, SlotTable::<S>::of(to)?);
    let mut n = 0u64;
    from.walk(8192, |keys, vals, _| {
        for (k, v) in keys.iter().zip(vals) {
            if (!missing_only || to.get(k).is_none()) && to.put(k, v) {
                n += 1;
            }
        }
        true
    });
    Ok(n)
}

/// Copies every entry of hash or array map `from` into `to` (same key size), each value through
/// `conv`; with `missing_only`, only keys `to` lacks (in an array, whose every index exists:
/// indices holding zeros). Returns how many were written.
fn copy_entries(
    from: &MapData,
    to: &MapData,
    missing_only: bool,
    conv: Convert,
) -> std::io::Result<u64> {
    let info = from.info().map_err(std::io::Error::other)?;
    let (ks, vs) = (info.key_size() as usize, info.value_size() as usize);
    let to_info = to.info().map_err(std::io::Error::other)?;
    let to_vs = to_info.value_size() as usize;
    if to_info.key_size() as usize != ks {
        return Err(std::io::Error::other(format!(
            "key sizes differ ({ks} and {} bytes)",
            to_info.key_size()
        )));
    }
    let mut have = std::collections::HashSet::new();
    if missing_only {
        super::batch::for_each_batch_raw(to.fd().as_fd(), ks, to_vs, 8192, |k, v| {
            for (key, val) in k.chunks(ks).zip(v.chunks(to_vs)) {
                if val.iter().any(|&b| b != 0) {
                    have.insert(key.to_vec());
                }
            }
            true
        })?;
    }
    let mut n = 0u64;
    let mut err = None;
    super::batch::for_each_batch_raw(from.fd().as_fd(), ks, vs, 8192, |k, v| {
        let mut keys = Vec::new();
        let mut vals = Vec::new();
        for (key, val) in k.chunks(ks).zip(v.chunks(vs)) {
            if !missing_only || !have.contains(key) {
                keys.extend_from_slice(key);
                conv(val, &mut vals);
            }
        }
        if vals.len() != keys.len() / ks * to_vs {
            err = Some(std::io::Error::other(
                "a converted value has the wrong size",
            ));
            return false;
        }
        match super::batch::update_raw(to.fd().as_fd(), &keys, &vals, ks, to_vs) {
            Ok(w) => {
                n += w as u64;
                true
            }
            Err(e) => {
                err = Some(e);
                false
            }
        }
    })?;
    match err {
        Some(e) => Err(e),
        None => Ok(n),
    }
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
                match prog.attach_to_link(xdp_link) {
                    Ok(id) => {
                        // The link stays pinned; let go of our handle without detaching.
                        let link = prog.take_link(id)?;
                        drop(FdLink::try_from(link)?);
                        info!(iface, "reused pinned XDP link, program replaced in place");
                        return Ok(ifindex);
                    }
                    // The interface the link was made for was deleted (perhaps re-created
                    // since under the same name): the link is severed and attaches nothing.
                    Err(e) if severed(&e) => {
                        warn!(
                            iface,
                            "the pinned XDP link's interface was deleted; attaching anew"
                        );
                        std::fs::remove_file(pin).with_context(|| {
                            format!("removing the severed link pin {}", pin.display())
                        })?;
                    }
                    Err(e) => {
                        return Err(anyhow::Error::new(e)
                            .context(format!("replacing the program on {iface}")));
                    }
                }
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

/// Whether `e` says a link's device is gone (`ENOLINK` from `bpf_link_update`).
fn severed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::ENOLINK)
        {
            return true;
        }
        cur = err.source();
    }
    false
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

/// Why a directory is not a clb pin directory (teardown refuses it, touching nothing).
#[derive(Debug, thiserror::Error)]
pub enum NotPinDir {
    #[error("{0} does not exist")]
    Missing(PathBuf),
    #[error("{0} is not on a bpffs: not a clb pin directory")]
    NotBpffs(PathBuf),
    #[error("{0} has no maps/ directory: not a clb pin directory")]
    NoMaps(PathBuf),
    #[error("{path} holds {entry}, which clb does not create: not a clb pin directory")]
    Foreign { path: PathBuf, entry: String },
}

/// Name prefix of a table moved aside while being resized (bpffs allows no dots in names).
const RESIZE_PREFIX: &str = "RESIZE_";

/// Pins under `maps` whose names are clb's but not this version's layouts: maps of an older
/// (or newer) clb. Their entries cannot be read with this version's types, and the flows they
/// hold would be silently dropped by starting over them, so the load is refused instead.
pub fn other_layouts(maps: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(maps) else {
        return Vec::new();
    };
    let mut v: Vec<String> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            let base = n.strip_prefix(RESIZE_PREFIX).unwrap_or(n);
            is_clb_map_pin(n) && !ALL_MAPS.contains(&base)
        })
        .collect();
    v.sort();
    v
}

/// What this build does with the pin `name` of another layout version (`RESIZE_` stripped):
/// its entry in the registry of layouts, `None` for a table it does not know.
fn fate(name: &str) -> Option<Fate> {
    match name.strip_prefix(RESIZE_PREFIX) {
        // An older clb's unfinished resize of a table this build converts: that clb must
        // finish it (its own restart does).
        Some(n) => layouts::layout(n)
            .map(|l| l.fate)
            .filter(|f| !matches!(f, Fate::Converted { .. })),
        None => layouts::layout(name).map(|l| l.fate),
    }
}

/// The earlier layouts' tables that this build converts, with both tables opened: the new one
/// is created by the load (or was, by a migration that was interrupted: then only what it
/// lacks is copied). Their old pins go once the new program is attached.
fn migrations(maps: &Path) -> anyhow::Result<Vec<Resize>> {
    let mut out = Vec::new();
    for name in other_layouts(maps) {
        let Some(Fate::Converted { into }) = fate(&name) else {
            continue;
        };
        let Some(conv) = converter(&name) else {
            bail!("{name}: the registry converts it but this build has no converter");
        };
        let Some(from) = layouts::layout(&name).map(|l| l.pin) else {
            continue;
        };
        let pin = maps.join(&name);
        let old = MapData::from_pin(&pin)
            .with_context(|| format!("opening the pinned table {}", pin.display()))?;
        let size = old.info()?.max_entries();
        let resumed = maps.join(into).exists();
        info!(
            from,
            to = into,
            resumed,
            "{from} is an earlier layout of {into}: its entries are converted"
        );
        out.push(Resize {
            name: into,
            from: size,
            to: size,
            old,
            new: None,
            aside: pin,
            copied: 0,
            migrate: Some(Migration {
                from,
                conv,
                resumed,
                started: std::time::Instant::now(),
                written_by_datapath: name != "CLB_LSN_V1",
            }),
        });
    }
    Ok(out)
}

/// Removes the pins of earlier layouts this build does not carry over entry by entry, once
/// this version's tables are loaded (the old program keeps its maps until it is replaced on
/// the interfaces): tables of unverified flows, schedules the daemon writes again, counters.
fn drop_superseded(maps: &Path) {
    for name in other_layouts(maps) {
        let why = match fate(&name) {
            Some(Fate::Transient { .. }) => {
                "replaced the table of unverified flows of an older clb (handshakes in flight restart; connections and persisted clients stay)"
            }
            Some(Fate::Rebuilt { .. }) => {
                "replaced an older clb's schedule table (written again from the configuration)"
            }
            Some(Fate::Reset { .. }) => {
                "replaced an older clb's counter table (the datapath counters start from zero)"
            }
            _ => continue,
        };
        match std::fs::remove_file(maps.join(&name)) {
            Ok(()) => warn!(table = name, "{why}"),
            Err(e) => warn!(table = name, "removing an older clb's table: {e}"),
        }
    }
}

/// Refuses pins this build cannot carry over: a newer clb's layouts (a downgrade), and tables
/// the registry does not know. Earlier layouts are upgraded (`clb_common::layouts`).
fn refuse_other_layouts(maps: &Path) -> anyhow::Result<()> {
    let other: Vec<String> = other_layouts(maps)
        .into_iter()
        .filter(|n| fate(n).is_none())
        .collect();
    if other.is_empty() {
        return Ok(());
    }
    let dir = maps.parent().unwrap_or(maps);
    let newer: Vec<String> = other
        .iter()
        .filter_map(|n| {
            layouts::newer_than_known(n.strip_prefix(RESIZE_PREFIX).unwrap_or(n))
                .map(|mine| format!("{n} (this clb has {mine})"))
        })
        .collect();
    if !newer.is_empty() {
        bail!(
            "{} holds tables of a newer clb than this one ({}, release {}): it cannot read \
             them and would lose the flows and persisted clients they hold, so it touches \
             nothing. Start the newer clb again, or remove that datapath first with `clb \
             teardown --bpffs {}` (its connections break), or use another --bpffs directory",
            dir.display(),
            newer.join(", "),
            layouts::THIS_RELEASE,
            dir.display()
        );
    }
    bail!(
        "{} holds maps of another clb version ({}): this clb reads other layouts ({}) and would \
         lose the flows and persisted clients they hold. Start the clb version that made them, \
         or remove that datapath first with `clb teardown --bpffs {}` (its connections break), \
         or use another --bpffs directory",
        dir.display(),
        other.join(", "),
        layout_hint(&other),
        dir.display()
    )
}

/// This version's names for the tables in `other` (same name without the version suffix).
fn layout_hint(other: &[String]) -> String {
    let stem = |n: &str| n.rsplit_once("_V").map(|(s, _)| s.to_owned());
    let mine: Vec<&str> = ALL_MAPS
        .iter()
        .copied()
        .filter(|m| {
            other
                .iter()
                .any(|o| stem(o).is_some() && stem(o) == stem(m))
        })
        .collect();
    if mine.is_empty() {
        ALL_MAPS.join(", ")
    } else {
        mine.join(", ")
    }
}

/// Whether `name` is a map pin clb creates (any layout version, or a table being resized).
fn is_clb_map_pin(name: &str) -> bool {
    let n = name.strip_prefix(RESIZE_PREFIX).unwrap_or(name);
    n.starts_with("CLB_")
        && n.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// Checks that `dir` is a clb pin directory: on bpffs, with `maps/` holding only clb map
/// pins and nothing but `maps/` and `links/` (holding only pins) at its top.
pub fn check_pin_dir(dir: &Path) -> Result<(), NotPinDir> {
    if !dir.is_dir() {
        return Err(NotPinDir::Missing(dir.to_owned()));
    }
    if !is_bpffs(dir).unwrap_or(false) {
        return Err(NotPinDir::NotBpffs(dir.to_owned()));
    }
    let maps = dir.join("maps");
    if !maps.is_dir() {
        return Err(NotPinDir::NoMaps(dir.to_owned()));
    }
    let foreign = |path: &Path, entry: String| NotPinDir::Foreign {
        path: path.to_owned(),
        entry,
    };
    for e in std::fs::read_dir(dir).map_err(|_| NotPinDir::Missing(dir.to_owned()))? {
        let name = e
            .map_err(|_| NotPinDir::Missing(dir.to_owned()))?
            .file_name();
        let name = name.to_string_lossy();
        if name != "maps" && name != "links" {
            return Err(foreign(dir, name.into_owned()));
        }
    }
    for e in std::fs::read_dir(&maps).map_err(|_| NotPinDir::NoMaps(dir.to_owned()))? {
        let e = e.map_err(|_| NotPinDir::NoMaps(dir.to_owned()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_clb_map_pin(&name) || e.file_type().map(|t| t.is_dir()).unwrap_or(true) {
            return Err(foreign(&maps, name));
        }
    }
    let links = dir.join("links");
    if links.exists() {
        for e in std::fs::read_dir(&links).map_err(|_| NotPinDir::Missing(links.clone()))? {
            let e = e.map_err(|_| NotPinDir::Missing(links.clone()))?;
            if e.file_type().map(|t| t.is_dir()).unwrap_or(true) {
                return Err(foreign(
                    &links,
                    e.file_name().to_string_lossy().into_owned(),
                ));
            }
        }
    }
    Ok(())
}

/// Detaches every pinned link and removes every pin under `dir` (the datapath stops; the
/// maps are freed once nothing else holds them). Refuses, touching nothing, a directory that
/// is not a clb pin directory ([`check_pin_dir`]).
pub fn teardown(dir: &Path) -> anyhow::Result<Teardown> {
    check_pin_dir(dir)?;
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
    for e in std::fs::read_dir(&maps)? {
        let e = e?;
        std::fs::remove_file(e.path())
            .with_context(|| format!("removing {}", e.path().display()))?;
        t.maps.push(e.file_name().to_string_lossy().into_owned());
    }
    std::fs::remove_dir(&maps).ok();
    std::fs::remove_dir(dir).ok();
    Ok(t)
}

/// Whether the datapath pinned under `dir` is still attached: its link pins exist. `Ok(false)`
/// only when they are gone (the directory is missing or empty: `clb teardown`); any other
/// failure to look (out of file descriptors, memory) is an error, which says nothing about
/// the pins.
pub fn attached(dir: &Path) -> io::Result<bool> {
    match std::fs::read_dir(dir.join("links")) {
        Ok(mut r) => match r.next() {
            None => Ok(false),
            Some(Ok(_)) => Ok(true),
            Some(Err(e)) => Err(e),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use aya::maps::{Array, IterableMap as _};
    use clb_common::{BPF_F_MMAPABLE, ConnKey, HalfOpenValue, SLOT_WAYS};

    use super::*;

    type HalfSet = [HalfSlot; SLOT_WAYS as usize];

    /// A standalone in-place half-open table of `slots` slots (needs root, as the suite does).
    fn half_table(slots: u32) -> Array<MapData, HalfSet> {
        Array::create(slot_sets(slots), BPF_F_MMAPABLE).expect("creating an mmapable array")
    }

    fn key(i: u32) -> ConnKey {
        ConnKey {
            client: clb_common::ip_to_be([10, 9, (i >> 8) as u8, i as u8]),
            client_port: clb_common::port_to_be(40000 + (i % 7) as u16),
            listener: 3,
            proto: 6,
            _pad: [0; 3],
        }
    }

    fn val(i: u32) -> HalfOpenValue {
        HalfOpenValue {
            last_seen_ns: 1_000 + u64::from(i),
            backend: i as u16,
            kind: clb_common::HALF_SYN,
            flags: 0,
            backend_isn: 0,
        }
    }

    fn slots_of(a: &Array<MapData, HalfSet>) -> SlotTable<HalfSlot> {
        SlotTable::of(a.map()).unwrap()
    }

    #[test]
    fn a_resized_in_place_table_gets_every_live_entry_placed_anew() {
        let (old, new, small) = (half_table(1024), half_table(4096), half_table(1024));
        let from = slots_of(&old);
        for i in 0..300 {
            assert!(from.put(&key(i), &val(i)));
        }
        assert_eq!(from.len(), 300);
        // Bigger: all of them, each where the new geometry puts it.
        let n = copy_table(HALF_OPEN_MAP, old.map(), new.map(), false).unwrap();
        assert_eq!(n, 300);
        let to = slots_of(&new);
        assert_eq!(to.capacity(), 4096);
        for i in 0..300 {
            assert_eq!(
                to.get(&key(i)).map(|v| u32::from(v.backend)),
                Some(i),
                "entry {i}"
            );
        }
        // The second pass copies only what the new table lacks.
        assert_eq!(
            copy_table(HALF_OPEN_MAP, old.map(), new.map(), true).unwrap(),
            0
        );
        // Smaller than what it holds: what fits stays, the newest of each set.
        let big = slots_of(&new);
        for i in 300..3000 {
            assert!(big.put(&key(i), &val(i)));
        }
        copy_table(HALF_OPEN_MAP, new.map(), small.map(), false).unwrap();
        let kept = slots_of(&small).len();
        assert!(
            (900..=1024).contains(&kept),
            "kept {kept} of 3000 in 1024 slots"
        );
    }

    #[test]
    fn pins_of_another_layout_version_are_named_and_refused() {
        let dir = std::env::temp_dir().join(format!("clb-layouts-{}", std::process::id()));
        let maps = dir.join("maps");
        std::fs::create_dir_all(&maps).unwrap();
        for n in [CONN_MAP, SESSION_MAP, "RESIZE_CLB_SESS_V2"] {
            std::fs::write(maps.join(n), b"").unwrap();
        }
        assert!(
            other_layouts(&maps).is_empty(),
            "this version's pins are its own"
        );
        assert!(refuse_other_layouts(&maps).is_ok());
        // Every earlier layout is upgraded, not a reason to refuse; the tables it does not
        // convert go once this version's are loaded.
        for n in ["CLB_HALF_V1", "CLB_SCHED_V1", "CLB_COUNT_V1", "CLB_CONN_V1"] {
            std::fs::write(maps.join(n), b"").unwrap();
        }
        assert!(refuse_other_layouts(&maps).is_ok());
        drop_superseded(&maps);
        assert_eq!(other_layouts(&maps), ["CLB_CONN_V1"], "converted later");
        std::fs::remove_file(maps.join("CLB_CONN_V1")).unwrap();
        // A newer clb's table (a downgrade) is refused by name, touching nothing.
        std::fs::write(maps.join("CLB_CONN_V3"), b"").unwrap();
        std::fs::write(maps.join("CLB_SESS_V3"), b"").unwrap();
        let e = refuse_other_layouts(&maps).unwrap_err().to_string();
        assert!(e.contains("tables of a newer clb"), "{e}");
        assert!(
            e.contains(&format!("CLB_CONN_V3 (this clb has {CONN_MAP})")),
            "{e}"
        );
        assert!(e.contains("clb teardown --bpffs"), "{e}");
        assert!(maps.join("CLB_CONN_V3").exists());
        std::fs::remove_file(maps.join("CLB_CONN_V3")).unwrap();
        std::fs::remove_file(maps.join("CLB_SESS_V3")).unwrap();
        // A table no release had.
        std::fs::write(maps.join("CLB_WHAT_V1"), b"").unwrap();
        let e = refuse_other_layouts(&maps).unwrap_err().to_string();
        assert!(e.contains("another clb version (CLB_WHAT_V1)"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            other_layouts(&maps).is_empty(),
            "no directory: nothing pinned yet"
        );
    }
}
