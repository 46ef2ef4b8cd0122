//! The agent's one interface to the kernel below aya and nix: the host facts it depends on
//! (privileges, bpffs, the cgroup-v2 mount, kernel BTF, whether `bpf()` is allowed), the socket
//! options read from descriptors handed to the tagging API, the raw `bpf()` commands aya has no
//! public wrapper for ([`bpf`]), and the descriptors tokio polls or the kernel hands over
//! ([`fd`]). Every `unsafe` block of the agent is in this module, each with its `// SAFETY:`
//! argument; the crate denies `unsafe_code` everywhere else, and `agent/tests/unsafe_code.rs`
//! checks that no other source file has an unsafe block, function, impl or trait.

mod bpf;
mod fd;

pub use bpf::{link_update, obj_get, prog_query};
pub use fd::{Received, StableFd, accept, async_fd, recv_with_fds};

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error(
        "bulkhead-agent needs root, or the capabilities CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON \
         (or CAP_SYS_ADMIN), to load its eBPF programs; it runs as uid {uid} with {missing} missing"
    )]
    NotPrivileged { uid: u32, missing: String },
    #[error("cannot read this process's capabilities from /proc/self/status: {0}")]
    Capabilities(String),
    #[error("{path} is not a bpffs mount and mounting one there failed: {source}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a bpffs mount, and mounting one there takes CAP_SYS_ADMIN, which this \
         process lacks: mount it on the host (`mount -t bpf bpf {path}`, or a systemd mount \
         unit), or point `bpffs` at a bpffs mount"
    )]
    BpffsNotMounted { path: PathBuf },
    #[error(
        "no kernel BTF at {path}: the eBPF programs need a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (5.10 or newer)"
    )]
    NoBtf { path: PathBuf },
    #[error(
        "bpf() is refused to this process ({source}) although it holds the capabilities: a \
         seccomp profile or an LSM denies it (the container's seccompProfile; see \
         deploy/README.md, Prerequisites)"
    )]
    BpfRefused {
        #[source]
        source: io::Error,
    },
    #[error("the kernel cannot create a BPF map ({source}): it lacks BPF, or its limits refuse it")]
    BpfUnavailable {
        #[source]
        source: io::Error,
    },
    #[error("cgroup_path {path} is not a cgroup-v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error(
        "no cgroup-v2 hierarchy found (tried /sys/fs/cgroup, /sys/fs/cgroup/unified and \
         /proc/self/mountinfo); the kernel must have cgroup v2 mounted, or set cgroup_path"
    )]
    NoCgroup2,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// This process's effective capabilities: the `CapEff` mask of /proc/self/status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps(u64);

impl Caps {
    pub fn current() -> Result<Self, SysError> {
        let status = std::fs::read_to_string("/proc/self/status")
            .map_err(|e| SysError::Capabilities(e.to_string()))?;
        Self::from_status(&status)
    }

    /// From the text of a `/proc/<pid>/status`.
    pub fn from_status(status: &str) -> Result<Self, SysError> {
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .map(Self)
            .ok_or_else(|| SysError::Capabilities("no CapEff line".into()))
    }

    fn has(self, cap: u32) -> bool {
        self.0 & (1u64 << cap) != 0
    }

    /// May mount filesystems (a bpffs).
    pub fn sys_admin(self) -> bool {
        self.has(CAP_SYS_ADMIN)
    }
}

/// Fails with one clear error unless the process may load and attach the programs; returns
/// its capabilities.
pub fn check_privileges() -> Result<Caps, SysError> {
    let caps = Caps::current()?;
    check_capabilities(caps)?;
    Ok(caps)
}

fn check_capabilities(caps: Caps) -> Result<(), SysError> {
    let has = |cap: u32| caps.has(cap);
    let sys_admin = caps.sys_admin();
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !sys_admin {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !sys_admin {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SysError::NotPrivileged {
            uid: nix::unistd::geteuid().as_raw(),
            missing: missing.join(", "),
        })
    }
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    let st = nix::sys::statfs::statfs(path).map_err(io::Error::from)?;
    Ok(st.filesystem_type().0 as i64)
}

pub fn is_bpffs(path: &Path) -> bool {
    fs_magic(path).ok() == Some(BPF_FS_MAGIC)
}

/// The state of the configured bpffs mount point, as the agent's start finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bpffs {
    /// A bpffs is mounted there.
    Mounted,
    /// None is, and the agent would mount one (it may: CAP_SYS_ADMIN, and a directory there
    /// or none yet).
    WillMount,
    /// None was, and the agent mounted one.
    MountedNow,
}

/// Whether `path` is a bpffs mount, or else whether a process with `caps` could mount one
/// there: it takes CAP_SYS_ADMIN, and the path must be a directory or not exist yet. The
/// agent's start checks this before it mounts ([`ensure_bpffs`]), and `preflight` checks only
/// this, so the two fail alike.
pub fn check_bpffs(path: &Path, caps: Caps) -> Result<Bpffs, SysError> {
    if is_bpffs(path) {
        return Ok(Bpffs::Mounted);
    }
    if !caps.sys_admin() {
        return Err(SysError::BpffsNotMounted {
            path: path.to_path_buf(),
        });
    }
    match std::fs::metadata(path) {
        Ok(m) if !m.is_dir() => Err(SysError::MountBpffs {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        }),
        _ => Ok(Bpffs::WillMount),
    }
}

/// Makes sure `path` is a bpffs mount, mounting one when it is not ([`check_bpffs`] first).
///
/// Two agents starting at once must not both mount: each bpffs mount is a new, empty instance,
/// and the second would hide the first one's pins. So the check and the mount happen under an
/// exclusive lock on the mount-point directory, and the check is repeated under the lock.
pub fn ensure_bpffs(path: &Path, caps: Caps) -> Result<Bpffs, SysError> {
    if check_bpffs(path, caps)? == Bpffs::Mounted {
        return Ok(Bpffs::Mounted);
    }
    let err = |source: io::Error| SysError::MountBpffs {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    let dir = std::fs::File::open(path).map_err(err)?;
    let _lock = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| err(e.into()))?;
    if is_bpffs(path) {
        return Ok(Bpffs::Mounted);
    }
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| SysError::MountBpffs {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    Ok(Bpffs::MountedNow)
}

/// Where the kernel exposes its own BTF.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Fails unless the kernel's BTF is at `path` ([`KERNEL_BTF`]): the programs' relocations and
/// the socket-storage map need it.
pub fn check_btf(path: &Path) -> Result<(), SysError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(SysError::NoBtf {
            path: path.to_path_buf(),
        })
    }
}

/// Fails unless this process may call `bpf()`: creates (and closes) a one-entry map. Refused
/// with `EPERM` or `EACCES` to a process that holds the capabilities ([`check_privileges`]
/// comes first), it is a seccomp profile or an LSM.
pub fn check_bpf() -> Result<(), SysError> {
    bpf::probe_map_create().map_err(|source| match source.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => SysError::BpfRefused { source },
        _ => SysError::BpfUnavailable { source },
    })
}

pub fn is_cgroup2(path: &Path) -> bool {
    fs_magic(path).ok() == Some(CGROUP2_SUPER_MAGIC)
}

/// The cgroup-v2 directory to attach to: the configured one (checked), else the usual mount
/// points, else the first cgroup2 mount in /proc/self/mountinfo.
pub fn resolve_cgroup(configured: Option<&Path>) -> Result<PathBuf, SysError> {
    if let Some(p) = configured {
        return if is_cgroup2(p) {
            Ok(p.to_path_buf())
        } else {
            Err(SysError::NotCgroup2 {
                path: p.to_path_buf(),
            })
        };
    }
    for p in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if is_cgroup2(Path::new(p)) {
            return Ok(PathBuf::from(p));
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    cgroup2_from_mountinfo(&mountinfo)
        .filter(|p| is_cgroup2(p))
        .ok_or(SysError::NoCgroup2)
}

/// First mount point of type cgroup2 in a mountinfo text.
pub fn cgroup2_from_mountinfo(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// What the tagging API needs to know of a descriptor it was handed.
#[derive(Debug, PartialEq, Eq)]
pub enum SocketKind {
    NotASocket,
    /// A socket of a family the kernel programs never see (e.g. AF_UNIX).
    Unsupported {
        family: i32,
    },
    Inet {
        cookie: u64,
    },
}

pub fn inspect_socket(fd: BorrowedFd<'_>) -> io::Result<SocketKind> {
    let st = nix::sys::stat::fstat(fd).map_err(io::Error::from)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Ok(SocketKind::NotASocket);
    }
    let family = getsockopt_int(fd, libc::SO_DOMAIN)?;
    if family != libc::AF_INET && family != libc::AF_INET6 {
        return Ok(SocketKind::Unsupported { family });
    }
    Ok(SocketKind::Inet {
        cookie: socket_cookie(fd)?,
    })
}

fn getsockopt_int(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of the sizes given, and `fd` is a live socket.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The kernel's cookie for the socket (SO_COOKIE): the key the eBPF programs see through
/// `bpf_get_socket_cookie`.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given, and `fd` is a live
    // socket; SO_COOKIE writes one u64.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What an accept loop does after `accept` failed. Running out of descriptors or memory
/// (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`) leaves the listener readable, so retrying at once
/// would spin a core (and log a line per try); it waits 10 ms, doubling up to 1 s, until an
/// accept succeeds again, and logs once per episode. Other errors (a connection reset before
/// it was accepted) are retried at once.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    delay: Option<std::time::Duration>,
}

impl AcceptBackoff {
    pub fn succeeded(&mut self) {
        if self.delay.take().is_some() {
            tracing::info!("accept works again");
        }
    }

    /// Waits as the error calls for; returns its label for the accept-error metric.
    pub async fn failed(&mut self, e: &io::Error, listener: &'static str) -> &'static str {
        let label = match e.raw_os_error() {
            Some(libc::EMFILE) => "EMFILE",
            Some(libc::ENFILE) => "ENFILE",
            Some(libc::ENOBUFS) => "ENOBUFS",
            Some(libc::ENOMEM) => "ENOMEM",
            _ => {
                tracing::debug!(listener, error = %e, "accept failed");
                return "other";
            }
        };
        let delay = match self.delay {
            None => {
                tracing::warn!(listener, error = %e, "accept failed for want of resources; backing off until it works again");
                std::time::Duration::from_millis(10)
            }
            Some(d) => (d * 2).min(std::time::Duration::from_secs(1)),
        };
        self.delay = Some(delay);
        tokio::time::sleep(delay).await;
        label
    }
}

/// The PID of the process a pidfd refers to, as the procfs mounted at `proc_root` numbers it
/// (the `Pid:` line of `<proc_root>/self/fdinfo/<fd>`). The kernel prints the PID in the PID
/// namespace of that procfs instance, not of the reader, so through the host's /proc (which the
/// agent mounts at `gpu.proc_root` for NVML's host PIDs anyway) this is the host PID even when
/// the agent runs in a PID namespace of its own. `None` when the process has exited or has no
/// PID in that namespace.
pub fn pidfd_pid(proc_root: &Path, pidfd: BorrowedFd<'_>) -> io::Result<Option<u32>> {
    let path = proc_root
        .join("self/fdinfo")
        .join(pidfd.as_raw_fd().to_string());
    let text = std::fs::read_to_string(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let pid = text
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} has no Pid line: not a pidfd", path.display()),
            )
        })?
        .trim()
        .parse::<i64>()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(u32::try_from(pid).ok().filter(|&p| p > 0))
}

#[cfg(test)]
mod tests;
