//! The host facts the agent depends on: privileges, bpffs, the cgroup-v2 mount, and the
//! socket options read from descriptors handed to the tagging API.

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

/// Fails with one clear error unless the process may load and attach the programs.
pub fn check_privileges() -> Result<(), SysError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| SysError::Capabilities(e.to_string()))?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| SysError::Capabilities("no CapEff line".into()))?;
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    let sys_admin = has(CAP_SYS_ADMIN);
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

/// Makes sure `path` is a bpffs mount, mounting one when it is not. Returns whether it mounted.
///
/// Two agents starting at once must not both mount: each bpffs mount is a new, empty instance,
/// and the second would hide the first one's pins. So the check and the mount happen under an
/// exclusive lock on the mount-point directory, and the check is repeated under the lock.
pub fn ensure_bpffs(path: &Path) -> Result<bool, SysError> {
    if is_bpffs(path) {
        return Ok(false);
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
        return Ok(false);
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
    Ok(true)
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
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn finds_cgroup2_in_mountinfo() {
        let text = "24 30 0:22 / /sys rw,nosuid - sysfs sysfs rw\n\
                    35 31 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_from_mountinfo(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_from_mountinfo("24 30 0:22 / /sys rw - sysfs sysfs rw"),
            None
        );
    }

    #[test]
    fn a_pidfd_names_its_process_through_the_proc_root() {
        let me = std::process::id();
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id();
        // A pidfd of a child, from pidfd_open (the agent gets its pidfds from SO_PEERPIDFD).
        // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        assert!(raw >= 0, "pidfd_open: {}", io::Error::last_os_error());
        // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
        let pidfd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw as i32) };
        let root = Path::new("/proc");
        assert_eq!(pidfd_pid(root, pidfd.as_fd()).unwrap(), Some(pid));
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(pidfd_pid(root, pidfd.as_fd()).unwrap(), None, "exited");
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(pidfd_pid(root, file.as_fd()).is_err(), "not a pidfd");
        assert_ne!(me, pid);
    }

    #[test]
    fn inspects_descriptors() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(
            inspect_socket(file.as_fd()).unwrap(),
            SocketKind::NotASocket
        );
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(
            inspect_socket(a.as_fd()).unwrap(),
            SocketKind::Unsupported {
                family: libc::AF_UNIX
            }
        );
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let SocketKind::Inet { cookie } = inspect_socket(udp.as_fd()).unwrap() else {
            panic!("a UDP socket is inet");
        };
        assert_ne!(cookie, 0);
        assert_eq!(
            socket_cookie(udp.as_fd()).unwrap(),
            cookie,
            "cookies are stable"
        );
        let udp2 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_ne!(socket_cookie(udp2.as_fd()).unwrap(), cookie);
    }
}
