//! `BPF_MAP_LOOKUP_BATCH` / `BPF_MAP_DELETE_BATCH` for hash maps: aya exposes one key per
//! syscall, which makes walking a million-entry table take seconds; the batch commands read
//! and delete thousands of entries per syscall.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use bytemuck::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn sys_bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size we pass; the kernel only writes
    // `out_batch`/`count` and the buffers `keys`/`values` point to (sized by the caller).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Calls `f` with successive batches of (key, value) pairs of the map `fd`, until the map is
/// exhausted or `f` returns `false`. Entries added or removed meanwhile may or may not be seen
/// (hash-map iteration semantics).
pub fn for_each_batch<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    batch_size: usize,
    mut f: impl FnMut(&[K], &[V]) -> bool,
) -> io::Result<()> {
    let mut keys = vec![K::zeroed(); batch_size];
    let mut values = vec![V::zeroed(); batch_size];
    lookup_batches(
        fd,
        bytemuck::cast_slice_mut(&mut keys),
        bytemuck::cast_slice_mut(&mut values),
        batch_size,
        |kb, vb, n| f(&view::<K>(kb)[..n], &view::<V>(vb)[..n]),
    )
}

/// Reinterprets a byte buffer filled by the kernel as `T`s (the buffer came from a `Vec<T>`,
/// so it is aligned).
fn view<T: Pod>(b: &[u8]) -> &[T] {
    bytemuck::cast_slice(b)
}

/// [`for_each_batch`] with untyped keys and values of `key_size` / `value_size` bytes.
pub fn for_each_batch_raw(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    batch_size: usize,
    mut f: impl FnMut(&[u8], &[u8]) -> bool,
) -> io::Result<()> {
    let mut keys = vec![0u8; key_size * batch_size];
    let mut values = vec![0u8; value_size * batch_size];
    lookup_batches(fd, &mut keys, &mut values, batch_size, |kb, vb, n| {
        f(&kb[..n * key_size], &vb[..n * value_size])
    })
}

fn lookup_batches(
    fd: BorrowedFd<'_>,
    keys: &mut [u8],
    values: &mut [u8],
    batch_size: usize,
    mut f: impl FnMut(&[u8], &[u8], usize) -> bool,
) -> io::Result<()> {
    // Hash and array batch tokens are bucket / slot indices (u32).
    let mut token_in: u32 = 0;
    let mut token_out: u32 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::addr_of_mut!(token_in) as u64
            },
            out_batch: std::ptr::addr_of_mut!(token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: batch_size as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let res = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        let done = match res {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        if n > 0 && !f(keys, values, n) {
            return Ok(());
        }
        if done {
            return Ok(());
        }
        first = false;
        token_in = token_out;
    }
}

/// Deletes `keys` from the hash map `fd`; keys already gone are skipped. Returns how many
/// were deleted.
pub fn delete<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: rest.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let res = sys_bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        let n = attr.count as usize;
        deleted += n;
        match res {
            Ok(()) => return Ok(deleted),
            // The kernel stops at the first missing key (another deleter, LRU eviction, or the
            // datapath's own replacement); skip it and go on.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                rest = &rest[(n + 1).min(rest.len())..]
            }
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// The element-command prefix of `union bpf_attr` (map_fd, key, value/next_key, flags).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Deletes one key with `BPF_MAP_DELETE_ELEM` (for map types without batch deletes, such as
/// arrays of maps, and without an aya delete). A missing key is not an error.
pub fn delete_one<K: Pod>(fd: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid prefix of `bpf_attr` for BPF_MAP_DELETE_ELEM; the kernel reads
    // the key through the pointer, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            &mut attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Inserts or replaces `keys[i]` → `values[i]` in the map `fd`, many per syscall (used to
/// fill tables in benchmarks and tests, and to copy resized tables). Returns how many were
/// written.
pub fn update<K: Pod, V: Pod>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> io::Result<usize> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    update_raw(
        fd,
        bytemuck::cast_slice(keys),
        bytemuck::cast_slice(values),
        std::mem::size_of::<K>(),
        std::mem::size_of::<V>(),
    )
}

/// [`update`] with untyped keys and values of `key_size` / `value_size` bytes.
pub fn update_raw(
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    key_size: usize,
    value_size: usize,
) -> io::Result<usize> {
    let count = keys.len() / key_size.max(1);
    let mut done = 0;
    const CHUNK: usize = 16384;
    while done < count {
        let n = (count - done).min(CHUNK);
        let mut attr = BatchAttr {
            keys: keys[done * key_size..].as_ptr() as u64,
            values: values[done * value_size..].as_ptr() as u64,
            count: n as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        done += attr.count as usize;
    }
    Ok(done)
}

/// The `memlock` the kernel accounts to the map `fd` (bytes), from `/proc/self/fdinfo`.
pub fn memlock(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no memlock line in fdinfo"))
}
