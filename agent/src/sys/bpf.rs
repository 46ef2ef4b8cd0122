//! The `bpf()` commands the agent issues itself, where aya has no public wrapper: each builds
//! its member of `union bpf_attr` and makes the one raw syscall.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use aya_obj::generated::bpf_cmd;

/// One raw `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
///
/// `attr` must be laid out as the member of `union bpf_attr` that `cmd` reads (the kernel reads
/// `size_of::<A>()` bytes and treats the rest of the union as zero), and every pointer in it
/// must be valid, for the reads or writes that command makes, for the duration of the call.
unsafe fn bpf<A>(cmd: bpf_cmd, attr: &mut A) -> io::Result<i64> {
    // SAFETY: the caller guarantees `attr` is what `cmd` reads; it lives for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<A>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `BPF_PROG_QUERY`: ids of the programs attached directly to a cgroup for one attach type
/// (at most 64).
pub fn prog_query(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    /// The `query` member of `union bpf_attr`, up to `prog_cnt`.
    #[repr(C)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    // SAFETY: `attr` is a prefix of `union bpf_attr`'s query member; the kernel writes at most
    // `prog_cnt` u32 ids to `prog_ids`, which points to that many, alive for the call.
    unsafe { bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr) }?;
    ids.truncate((attr.prog_cnt as usize).min(ids.len()));
    Ok(ids)
}

/// `BPF_OBJ_GET`: opens a pinned object (here a link) by path.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    /// The `obj_pin` member of `union bpf_attr`.
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    use std::os::unix::ffi::OsStrExt;
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: `attr` is laid out as the BPF_OBJ_GET member of `union bpf_attr`; `pathname`
    // points to a NUL-terminated string alive for the call.
    let fd = unsafe { bpf(bpf_cmd::BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: on success BPF_OBJ_GET returns a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: atomically replaces the program of an existing link. aya 0.14 keeps
/// its wrapper private for cgroup links, so the agent issues the command itself.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    /// The `link_update` member of `union bpf_attr`.
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is a prefix of `union bpf_attr` for BPF_LINK_UPDATE and holds no
    // pointers; the descriptors are borrowed, so valid for the duration of the call.
    unsafe { bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr) }?;
    Ok(())
}

/// `BPF_MAP_CREATE` of a one-entry array map, closed at once: whether this process may call
/// `bpf()` at all (a seccomp profile or an LSM can refuse it to a holder of `CAP_BPF`).
pub fn probe_map_create() -> io::Result<()> {
    /// The `map_create` member of `union bpf_attr`, up to `map_flags`.
    #[repr(C)]
    struct MapCreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let mut attr = MapCreateAttr {
        map_type: aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        map_flags: 0,
    };
    // SAFETY: `attr` is a prefix of `union bpf_attr` for BPF_MAP_CREATE and holds no pointers.
    let fd = unsafe { bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr) }?;
    // SAFETY: on success BPF_MAP_CREATE returns a new descriptor owned by nobody else; it is
    // closed when dropped here.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}
