//! Every system call the agent makes that no safe wrapper covers: the bpf(2) commands aya
//! 0.14 lacks (batch lookups and updates, the interface of a pinned link), and the few libc
//! calls nix covers only in part. The rest of the crate has no `unsafe` (lib.rs denies it).
#![allow(unsafe_code, reason = "the raw syscalls of the agent live here, each with its SAFETY note")]

use std::{
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use aya::maps::MapData;

/// Whether this process runs as root (tests that need it skip otherwise).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The interface's index, or None when it does not exist in this network namespace.
pub fn if_index(iface: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(iface).ok().filter(|&i| i != 0)
}

/// (interface name, address) of every IPv4 and IPv6 address in this network namespace.
pub fn interface_addresses() -> Result<Vec<(String, IpAddr)>> {
    let addrs = nix::ifaddrs::getifaddrs().context("getifaddrs")?;
    Ok(addrs
        .filter_map(|ifa| {
            let addr = ifa.address?;
            let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (_, Some(v6)) => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            Some((ifa.interface_name, ip))
        })
        .collect())
}

/// The magic number of a bpf filesystem in statfs(2)'s f_type.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> Result<bool> {
    let fs = nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(fs.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Mounts a bpf filesystem (mode 0700) on `path`.
pub fn mount_bpffs(path: &Path) -> Result<()> {
    nix::mount::mount(Some("bpf"), path, Some("bpf"), nix::mount::MsFlags::empty(), Some("mode=0700"))
        .with_context(|| format!("cannot mount a bpf filesystem on {}", path.display()))
}

fn c_path(path: &Path) -> Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(path.as_os_str().as_bytes()).with_context(|| format!("bad path {}", path.display()))
}

/// The interface index a pinned XDP link is attached to (0: defunct, its device is gone).
/// aya's LinkInfo does not expose it: BPF_OBJ_GET and BPF_OBJ_GET_INFO_BY_FD by hand.
pub fn pinned_link_ifindex(path: &Path) -> Result<u32> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_TYPE_XDP: u32 = 6;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let c = c_path(path)?;
    let get = ObjGet { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: 0 };
    // SAFETY: bpf(2) reads the attribute struct we own; the path outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &get, std::mem::size_of::<ObjGet>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_OBJ_GET");
    }
    // SAFETY: a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then a union (8-aligned) whose xdp member is
    // the ifindex, at byte 16.
    let mut info = [0u8; 256];
    let attr = InfoByFd { bpf_fd: fd.as_raw_fd() as u32, info_len: info.len() as u32, info: info.as_mut_ptr() as u64 };
    // SAFETY: the kernel writes at most info_len bytes into `info`, which outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &attr, std::mem::size_of::<InfoByFd>()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_OBJ_GET_INFO_BY_FD");
    }
    let word = |at: usize| u32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]]);
    if word(0) != BPF_LINK_TYPE_XDP {
        bail!("pinned object is not an XDP link (link type {})", word(0));
    }
    Ok(word(16))
}

/// The `batch` member of `union bpf_attr` (aya 0.14 has no batch operations).
#[repr(C)]
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

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Runs one batch command on `map` over the `K` keys and `V` values at `keys` and `values`
/// (`count` of each), from the batch token at `in_batch` (0: from the start) and writing the
/// next one at `out_batch` (0: none); returns the syscall's result and the count the kernel
/// wrote back.
///
/// # Safety
/// `keys` and `values` must point to buffers of at least `count` elements, writable for a
/// lookup, that outlive the call; `in_batch` and `out_batch` (if not 0) must point to a token
/// of the map's kind (a key for an array, a `u32` bucket index for a hash map).
unsafe fn map_batch<K, V>(
    cmd: libc::c_long,
    map: &MapData,
    batch: (u64, u64),
    keys: *const K,
    values: *const V,
    count: u32,
) -> Result<(libc::c_long, u32)> {
    let info = map.info()?;
    if info.key_size() as usize != std::mem::size_of::<K>() || info.value_size() as usize != std::mem::size_of::<V>() {
        bail!("unexpected key or value size");
    }
    let mut attr = BatchAttr {
        in_batch: batch.0,
        out_batch: batch.1,
        keys: keys as u64,
        values: values as u64,
        count,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: the caller vouches for the buffers; key and value sizes were checked above.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, &mut attr, std::mem::size_of::<BatchAttr>()) };
    Ok((rc, attr.count))
}

/// Every entry of an array map whose values are `V`, in one BPF_MAP_LOOKUP_BATCH:
/// (index, value).
pub fn array_lookup_all<V: aya::Pod + Default>(map: &MapData, max_entries: u32) -> Result<Vec<(u32, V)>> {
    let n = max_entries as usize;
    let mut keys = vec![0u32; n];
    let mut values = vec![V::default(); n];
    let mut token = 0u32;
    // SAFETY: both buffers hold `max_entries` elements and outlive the call; the batch token
    // (the key size) goes into `token`.
    let (rc, got) = unsafe {
        map_batch(
            BPF_MAP_LOOKUP_BATCH,
            map,
            (0, &mut token as *mut u32 as u64),
            keys.as_mut_ptr(),
            values.as_mut_ptr(),
            max_entries,
        )?
    };
    let err = std::io::Error::last_os_error();
    // ENOENT: the batch reached the end of the map, which it always does here.
    if rc != 0 && err.raw_os_error() != Some(libc::ENOENT) {
        return Err(err).context("BPF_MAP_LOOKUP_BATCH");
    }
    Ok(keys.into_iter().zip(values).take((got as usize).min(n)).collect())
}

/// Entries a hash-map walk asks for per BPF_MAP_LOOKUP_BATCH at first.
const HASH_BATCH: u32 = 4096;
/// What it may grow to: the kernel returns whole buckets, and refuses (ENOSPC) a batch too
/// small for the next one.
const HASH_BATCH_MAX: u32 = 1 << 20;

/// Gives every entry of a hash map (plain or LRU) of `K` → `V` to `f`, a few thousand per
/// BPF_MAP_LOOKUP_BATCH instead of two syscalls per entry (get-next-key, lookup): a walk of a
/// million-entry flow table costs tens of milliseconds, not seconds. Returns the entries seen.
/// A lookup this way does not count as a use for the LRU. As with any walk of a map that
/// changes meanwhile, an entry added or removed during it may be missed.
pub fn hash_for_each<K: aya::Pod + Default, V: aya::Pod + Default>(
    map: &MapData,
    mut f: impl FnMut(&K, &V),
) -> Result<u64> {
    let mut chunk = HASH_BATCH;
    let mut keys = vec![K::default(); chunk as usize];
    let mut values = vec![V::default(); chunk as usize];
    // The batch token of a hash map: the bucket to go on from (none: from the start).
    let (mut token_in, mut token_out) = (None::<u32>, 0u32);
    let mut seen = 0u64;
    loop {
        let in_batch = token_in.as_ref().map_or(0, |t| t as *const u32 as u64);
        // SAFETY: both buffers hold `chunk` elements and outlive the call; the tokens are u32s,
        // the hash map's kind.
        let (rc, got) = unsafe {
            map_batch(
                BPF_MAP_LOOKUP_BATCH,
                map,
                (in_batch, &mut token_out as *mut u32 as u64),
                keys.as_mut_ptr(),
                values.as_mut_ptr(),
                chunk,
            )?
        };
        let errno = if rc == 0 { None } else { Some(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)) };
        let got = (got as usize).min(chunk as usize);
        match errno {
            None | Some(libc::ENOENT) => {}
            Some(libc::ENOSPC) if got == 0 && chunk < HASH_BATCH_MAX => {
                chunk *= 2;
                keys.resize(chunk as usize, K::default());
                values.resize(chunk as usize, V::default());
                continue;
            }
            Some(e) => return Err(std::io::Error::from_raw_os_error(e)).context("BPF_MAP_LOOKUP_BATCH"),
        }
        for (k, v) in keys.iter().zip(&values).take(got) {
            f(k, v);
        }
        seen += got as u64;
        // ENOENT: the walk went past the last bucket (the last entries, if any, came with it).
        if errno.is_some() {
            return Ok(seen);
        }
        token_in = Some(token_out);
    }
}

/// Writes `values` at indexes `base..` of an array map of `V`s in one BPF_MAP_UPDATE_BATCH.
pub fn array_update_all<V: aya::Pod>(map: &MapData, base: u32, values: &[V]) -> Result<()> {
    let count = u32::try_from(values.len())?;
    if u64::from(base) + u64::from(count) > u64::from(map.info()?.max_entries()) {
        bail!("writing {count} entries at {base} goes past the end of the map");
    }
    let keys: Vec<u32> = (base..base + count).collect();
    // SAFETY: `keys` and `values` hold `count` elements each and outlive the call.
    let (rc, _) = unsafe { map_batch(BPF_MAP_UPDATE_BATCH, map, (0, 0), keys.as_ptr(), values.as_ptr(), count)? };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_MAP_UPDATE_BATCH");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_and_unknown_interfaces_are_not() {
        assert_eq!(if_index("lo"), Some(1));
        assert_eq!(if_index("nosuchif0"), None);
        assert_eq!(if_index("bad/name"), None);
        let addrs = interface_addresses().unwrap();
        assert!(addrs.iter().any(|(name, a)| name == "lo" && a.is_loopback()), "{addrs:?}");
    }
}

/// Makes a child started by `cmd` receive SIGTERM when this thread's process goes away, even
/// by SIGKILL: a BIRD the agent runs must not go on announcing for a dead agent. The signal
/// follows the thread that forks, so call this from a thread that lives as long as the agent
/// (the main thread, or a runtime worker).
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure makes only async-signal-safe calls (prctl,
    // getppid) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the prctl took effect: nobody would signal us.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}
