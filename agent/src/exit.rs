//! The binary's exit statuses: one table, printed as is in agent/README.md ("Exit codes"; a
//! test compares the two), and the one mapping from errors to it.

use crate::AgentError;
use crate::sys::SysError;

/// Why the agent (or one of its commands) exited unsuccessfully. The codes are sysexits.h's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// The configuration cannot be read or is invalid.
    Config,
    /// The kernel lacks something the agent needs.
    Unavailable,
    /// Anything else failed.
    OsError,
    /// The process is not permitted what the agent needs.
    NoPermission,
}

impl ExitStatus {
    /// Every status, in the order of their codes.
    pub const ALL: [ExitStatus; 4] = [
        ExitStatus::Config,
        ExitStatus::Unavailable,
        ExitStatus::OsError,
        ExitStatus::NoPermission,
    ];

    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Config => 64,
            ExitStatus::Unavailable => 69,
            ExitStatus::OsError => 71,
            ExitStatus::NoPermission => 77,
        }
    }

    /// Its name in sysexits.h.
    pub fn name(self) -> &'static str {
        match self {
            ExitStatus::Config => "EX_USAGE",
            ExitStatus::Unavailable => "EX_UNAVAILABLE",
            ExitStatus::OsError => "EX_OSERR",
            ExitStatus::NoPermission => "EX_NOPERM",
        }
    }

    /// What it means, for an operator (one line of the README's table).
    pub fn meaning(self) -> &'static str {
        match self {
            ExitStatus::Config => {
                "the config file cannot be read or is invalid; the message names the field"
            }
            ExitStatus::Unavailable => {
                "the kernel lacks what the agent needs: cgroup v2 (or `cgroup_path` is not a \
                 cgroup-v2 directory), kernel BTF at /sys/kernel/btf/vmlinux, or BPF maps; \
                 `gpu-status`: the GPU source cannot be read"
            }
            ExitStatus::OsError => {
                "anything else: loading, attaching or pinning the programs, the pinned maps, \
                 the tagging socket (e.g. in use by a running agent), the admin address, a \
                 bpffs mount that failed other than for permission; `cleanup`: removing a pin"
            }
            ExitStatus::NoPermission => {
                "not permitted: not root and without CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; \
                 `bpf()` refused by a seccomp profile or an LSM although the capabilities are \
                 held; or no bpffs at `bpffs` and the agent may not mount one (no \
                 CAP_SYS_ADMIN, or the mount refused)"
            }
        }
    }

    /// The table as agent/README.md prints it.
    pub fn markdown_table() -> String {
        let mut out = String::from("| code | sysexits | meaning |\n|---|---|---|\n");
        for s in Self::ALL {
            out.push_str(&format!(
                "| {} | `{}` | {} |\n",
                s.code(),
                s.name(),
                s.meaning()
            ));
        }
        out
    }
}

impl From<ExitStatus> for std::process::ExitCode {
    fn from(s: ExitStatus) -> Self {
        std::process::ExitCode::from(s.code())
    }
}

impl From<&SysError> for ExitStatus {
    fn from(e: &SysError) -> Self {
        match e {
            SysError::NotPrivileged { .. }
            | SysError::BpffsNotMounted { .. }
            | SysError::BpfRefused { .. } => ExitStatus::NoPermission,
            SysError::MountBpffs { source, .. }
                if matches!(source.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
            {
                ExitStatus::NoPermission
            }
            SysError::NoCgroup2
            | SysError::NotCgroup2 { .. }
            | SysError::NoBtf { .. }
            | SysError::BpfUnavailable { .. } => ExitStatus::Unavailable,
            SysError::Capabilities(_) | SysError::MountBpffs { .. } | SysError::Io { .. } => {
                ExitStatus::OsError
            }
        }
    }
}

impl From<&AgentError> for ExitStatus {
    fn from(e: &AgentError) -> Self {
        match e {
            AgentError::Sys(e) => e.into(),
            AgentError::Config(_) => ExitStatus::Config,
            AgentError::Datapath(_)
            | AgentError::Tenants(_)
            | AgentError::Tagging(_)
            | AgentError::CrossTenant(_)
            | AgentError::Admin { .. } => ExitStatus::OsError,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::path::PathBuf;

    /// `BULKHEAD_BLESS=1 cargo test -p bulkhead-agent --lib exit` rewrites the README's table.
    #[test]
    fn the_readme_prints_this_table() {
        const BEGIN: &str =
            "<!-- BEGIN exit codes (agent/src/exit.rs: ExitStatus::markdown_table) -->\n";
        const END: &str = "<!-- END exit codes -->";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let (Some(start), Some(end)) = (readme.find(BEGIN), readme.find(END)) else {
            panic!("agent/README.md has no {BEGIN} ... {END} section");
        };
        let start = start + BEGIN.len();
        let table = ExitStatus::markdown_table();
        if std::env::var_os("BULKHEAD_BLESS").is_some() {
            let blessed = format!("{}{table}{}", &readme[..start], &readme[end..]);
            std::fs::write(path, blessed).unwrap();
            return;
        }
        assert_eq!(
            &readme[start..end],
            table,
            "agent/README.md's exit-code table is not ExitStatus's; run \
             BULKHEAD_BLESS=1 cargo test -p bulkhead-agent --lib exit"
        );
    }

    #[test]
    fn host_errors_map_to_what_an_operator_does_about_them() {
        let path = PathBuf::from("/sys/fs/bpf");
        let errno = |n| io::Error::from_raw_os_error(n);
        let status = |e: SysError| ExitStatus::from(&AgentError::Sys(e)).code();
        assert_eq!(status(SysError::BpffsNotMounted { path: path.clone() }), 77);
        assert_eq!(
            status(SysError::BpfRefused {
                source: errno(libc::EPERM)
            }),
            77
        );
        assert_eq!(
            status(SysError::MountBpffs {
                path: path.clone(),
                source: errno(libc::EPERM)
            }),
            77
        );
        assert_eq!(
            status(SysError::MountBpffs {
                path,
                source: errno(libc::ENOTDIR)
            }),
            71
        );
        assert_eq!(
            status(SysError::NoBtf {
                path: PathBuf::from("/sys/kernel/btf/vmlinux")
            }),
            69
        );
        assert_eq!(status(SysError::NoCgroup2), 69);
        assert_eq!(
            status(SysError::BpfUnavailable {
                source: errno(libc::ENOSYS)
            }),
            69
        );
    }
}
