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

/// A `/proc/<pid>/status` text with this `CapEff` mask.
fn caps(mask: u64) -> Caps {
    Caps::from_status(&format!("Name:\tx\nCapEff:\t{mask:016x}\n")).unwrap()
}

const ALL_CAPS: u64 = 0x1ff_ffff_ffff;
const NO_SYS_ADMIN: u64 = ALL_CAPS & !(1 << CAP_SYS_ADMIN);

#[test]
fn capabilities_are_read_from_capeff() {
    assert!(caps(ALL_CAPS).sys_admin());
    assert!(!caps(NO_SYS_ADMIN).sys_admin());
    assert!(Caps::from_status("Name:\tx\n").is_err());
    assert!(
        check_capabilities(caps(NO_SYS_ADMIN)).is_ok(),
        "CAP_BPF and CAP_PERFMON"
    );
    let err = check_capabilities(caps(1 << CAP_NET_ADMIN)).unwrap_err();
    assert!(
        err.to_string().contains("CAP_BPF, CAP_PERFMON missing"),
        "{err}"
    );
}

#[test]
fn a_directory_that_is_no_bpffs_fails_without_the_right_to_mount_one() {
    let dir = std::env::temp_dir().join(format!("bulkhead-sys-bpffs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = check_bpffs(&dir, caps(NO_SYS_ADMIN)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SysError::BpffsNotMounted { .. }), "{text}");
    assert!(
        text.contains(&format!("{} is not a bpffs mount", dir.display())),
        "{text}"
    );
    assert!(text.contains("CAP_SYS_ADMIN"), "{text}");
    assert_eq!(check_bpffs(&dir, caps(ALL_CAPS)).unwrap(), Bpffs::WillMount);
    assert_eq!(
        check_bpffs(&dir.join("not-yet"), caps(ALL_CAPS)).unwrap(),
        Bpffs::WillMount,
        "created when mounted"
    );
    let file = dir.join("file");
    std::fs::write(&file, "").unwrap();
    let err = check_bpffs(&file, caps(ALL_CAPS)).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn btf_is_a_file_at_its_path() {
    let missing = Path::new("/nonexistent/btf/vmlinux");
    let err = check_btf(missing).unwrap_err();
    assert!(
        err.to_string()
            .contains("no kernel BTF at /nonexistent/btf/vmlinux"),
        "{err}"
    );
    assert!(check_btf(Path::new("/proc/self/status")).is_ok());
}
