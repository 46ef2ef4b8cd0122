//! Loading, attaching and pinning the eBPF programs and maps, and typed access to the maps.
//!
//! Maps are pinned by name under `pin_dir` (aya reuses a pinned map when one exists), so
//! counters, tags and tenant ids survive the agent. Program links are pinned there too, as
//! `link_<program>`: a new agent finds them and swaps its programs in atomically with
//! `BPF_LINK_UPDATE`, so a restart neither double-counts nor leaves a gap. On shutdown the links
//! are unpinned (detached) or left in place, as `detach_on_shutdown` says.

use crate::sys;
use agent_common::{
    MAP_DIAG, MAP_ENDPOINT_COUNT, MAP_ENDPOINTS, MAP_FLOW_EVENTS, MAP_FLOWS, MAP_MUST_TAG,
    MAP_SOCK_TAGS, MAP_TAGS_FREED, MAP_TAGS_SET, MAP_TENANT_IDS, MAP_TRAFFIC, PROG_CONNECT4,
    PROG_CONNECT6, PROG_EGRESS, PROG_INGRESS, PROG_SOCK_RELEASE,
};
use aya::maps::{MapData, MapError, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, ProgramError,
    ProgramFd,
};
use aya::{Ebpf, EbpfLoader};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

mod maps;

pub use maps::Maps;
use maps::SockTags;

/// The object built from `agent-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot create the pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object (maps pinned under {pin_dir}) failed: {source}")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("attaching program {name} to the cgroup: {message}")]
    Attach { name: &'static str, message: String },
    #[error("pinning the link of {name} at {path}: {message}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        message: String,
    },
}

/// A program link pinned at `path`, and this agent's descriptor of it.
struct AttachedLink {
    name: &'static str,
    path: PathBuf,
    hold: LinkHold,
}

enum LinkHold {
    /// Attached and pinned by this agent.
    Pinned(#[allow(dead_code)] PinnedLink),
    /// Taken over from an earlier agent's pin.
    Adopted(#[allow(dead_code)] OwnedFd),
}

/// The loaded programs, their links and the maps.
pub struct Datapath {
    // Holds the programs (and the aya-log ring buffer) alive; the links hold the attachment.
    _ebpf: Ebpf,
    maps: std::sync::Arc<Maps>,
    links: Vec<AttachedLink>,
    cgroup: PathBuf,
    pin_dir: PathBuf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    flow_events: Option<RingBuf<MapData>>,
    /// How the programs came to be attached: fresh, or swapped into an earlier agent's links.
    pub replaced_links: usize,
}

impl Datapath {
    /// Loads the object with its maps pinned in `pin_dir` and attaches the programs to `cgroup`.
    pub fn load(cgroup: &Path, pin_dir: &Path) -> Result<Self, DatapathError> {
        std::fs::create_dir_all(pin_dir).map_err(|source| DatapathError::PinDir {
            path: pin_dir.to_path_buf(),
            source,
        })?;
        // Kernel-side log records below the agent's own level are not even written.
        let log_level = kernel_log_level(tracing::level_filters::LevelFilter::current());
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .override_global(aya_log::LEVEL, &log_level, true)
            .load(EBPF_OBJECT)
            .map_err(|source| DatapathError::Load {
                pin_dir: pin_dir.to_path_buf(),
                source: Box::new(source),
            })?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "kernel-side logging unavailable");
                None
            }
        };
        let maps = std::sync::Arc::new(Maps {
            tags: Mutex::new(SockTags {
                storage: take_map(&mut ebpf, MAP_SOCK_TAGS)?,
                set: take_map(&mut ebpf, MAP_TAGS_SET)?,
            }),
            tags_freed: Mutex::new(take_map(&mut ebpf, MAP_TAGS_FREED)?),
            traffic: Mutex::new(take_map(&mut ebpf, MAP_TRAFFIC)?),
            tenant_ids: Mutex::new(take_map(&mut ebpf, MAP_TENANT_IDS)?),
            diag: Mutex::new(take_map(&mut ebpf, MAP_DIAG)?),
            endpoints: Mutex::new(take_map(&mut ebpf, MAP_ENDPOINTS)?),
            endpoint_count: Mutex::new(take_map(&mut ebpf, MAP_ENDPOINT_COUNT)?),
            must_tag: Mutex::new(take_map(&mut ebpf, MAP_MUST_TAG)?),
            flows: Mutex::new(take_map(&mut ebpf, MAP_FLOWS)?),
        });
        let flow_events = Some(take_map(&mut ebpf, MAP_FLOW_EVENTS)?);
        let cgroup_file = std::fs::File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        // With bpf_link (kernel >= 5.7, which aya uses when present) the attach flags must be 0
        // ("Single"); the kernel then attaches the link as one of many programs on the cgroup,
        // so the agent coexists with other cgroup programs.
        // Loads one program and attaches it (or swaps it into its pinned link); the program
        // types differ only in their attach arguments.
        macro_rules! attach {
            ($ty:ty, $name:expr $(, $arg:expr)*) => {{
                let name = $name;
                let prog: &mut $ty = program(&mut ebpf, name)?;
                prog.load()
                    .map_err(|source| DatapathError::Program { name, source })?;
                let fd = prog_fd(prog.fd(), name)?;
                attach_pinned(name, pin_dir, fd.as_fd(), || {
                    let id = prog.attach(&cgroup_file, $($arg,)* CgroupAttachMode::Single)?;
                    FdLink::try_from(prog.take_link(id)?).map_err(|e| e.to_string().into())
                })?
            }};
        }
        let attached = [
            attach!(CgroupSkb, PROG_INGRESS, CgroupSkbAttachType::Ingress),
            attach!(CgroupSkb, PROG_EGRESS, CgroupSkbAttachType::Egress),
            attach!(CgroupSock, PROG_SOCK_RELEASE),
            attach!(CgroupSockAddr, PROG_CONNECT4),
            attach!(CgroupSockAddr, PROG_CONNECT6),
        ];
        let replaced_links = attached.iter().filter(|(_, replaced)| *replaced).count();
        let links = attached.into_iter().map(|(link, _)| link).collect();
        Ok(Self {
            _ebpf: ebpf,
            maps,
            links,
            cgroup: cgroup.to_path_buf(),
            pin_dir: pin_dir.to_path_buf(),
            logger,
            flow_events,
            replaced_links,
        })
    }

    pub fn maps(&self) -> std::sync::Arc<Maps> {
        self.maps.clone()
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Takes the cross-tenant flow event ring buffer, to be drained when readable.
    pub fn take_flow_events(&mut self) -> Option<RingBuf<MapData>> {
        self.flow_events.take()
    }

    /// Takes the kernel-side log reader, to be drained when its descriptor is readable.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// Ends this agent's hold on the programs. With `detach`, the links are unpinned and so the
    /// programs detached; otherwise they stay attached (and counting) for the next agent.
    pub fn shutdown(self, detach: bool) {
        let mut ids = Vec::new();
        for l in self.links {
            if detach {
                ids.extend(linked_program(&l.path));
                if let Err(e) = std::fs::remove_file(&l.path) {
                    tracing::warn!(program = l.name, path = %l.path.display(), error = %e, "could not unpin link");
                }
            }
            // Dropping the last descriptor of an unpinned link detaches its program.
            drop(l.hold);
        }
        if let Err(e) = wait_detached(&self.cgroup, &ids) {
            tracing::warn!(error = %e, "programs not yet detached");
        }
    }
}

/// aya-log's level numbers (error = 1 … trace = 5, 0 = off) for a tracing level filter.
fn kernel_log_level(filter: tracing::level_filters::LevelFilter) -> u8 {
    use tracing::Level;
    match filter.into_level() {
        None => 0,
        Some(Level::ERROR) => 1,
        Some(Level::WARN) => 2,
        Some(Level::INFO) => 3,
        Some(Level::DEBUG) => 4,
        Some(Level::TRACE) => 5,
    }
}

/// Detaches programs left attached by an earlier agent (the `cleanup` command): removes the
/// pinned links. Returns the links removed. Maps are kept unless `remove_maps`.
pub fn cleanup(pin_dir: &Path, cgroup: &Path, remove_maps: bool) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("link_") || remove_maps {
            ids.extend(linked_program(&path));
            std::fs::remove_file(&path)?;
            removed.push(path);
        }
    }
    if remove_maps {
        std::fs::remove_dir(pin_dir)?;
    }
    wait_detached(cgroup, &ids)?;
    Ok(removed)
}

/// The id of the program behind the link pinned at `path`, if it is one.
fn linked_program(path: &Path) -> Option<u32> {
    let link: FdLink = match PinnedLink::from_pin(path) {
        Ok(l) => l.into(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot open pinned link");
            return None;
        }
    };
    match link.info() {
        Ok(i) => Some(i.program_id()),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the link's program");
            None
        }
    }
}

/// Waits until none of `programs` is attached to `cgroup` any more. The last reference to an
/// unpinned link is dropped asynchronously (after an RCU grace period, then on a workqueue,
/// then under the cgroup mutex), so a program runs on for a moment after its pin and every
/// descriptor are gone; callers that say "detached" ask the cgroup itself (BPF_PROG_QUERY).
fn wait_detached(cgroup: &Path, programs: &[u32]) -> io::Result<()> {
    use aya_obj::generated::bpf_attach_type::*;
    if programs.is_empty() {
        return Ok(());
    }
    let dir = std::fs::File::open(cgroup)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut still = Vec::new();
        for attach_type in [
            BPF_CGROUP_INET_INGRESS,
            BPF_CGROUP_INET_EGRESS,
            BPF_CGROUP_INET_SOCK_RELEASE,
            BPF_CGROUP_INET4_CONNECT,
            BPF_CGROUP_INET6_CONNECT,
        ] {
            still.extend(
                sys::prog_query(dir.as_fd(), attach_type as u32)?
                    .into_iter()
                    .filter(|id| programs.contains(id)),
            );
        }
        if still.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "programs {still:?} still attached to {} 5 s after their links were unpinned",
                cgroup.display()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(DatapathError::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// A duplicate of the program's descriptor, so the program can be borrowed mutably to attach.
fn prog_fd(
    fd: Result<&ProgramFd, ProgramError>,
    name: &'static str,
) -> Result<ProgramFd, DatapathError> {
    fd.and_then(|f| f.try_clone().map_err(ProgramError::from))
        .map_err(|source| DatapathError::Program { name, source })
}

/// Swaps the program into the link an earlier agent pinned, or attaches it fresh and pins the
/// new link. Returns the pinned link and whether it was an existing one.
fn attach_pinned(
    name: &'static str,
    pin_dir: &Path,
    prog_fd: BorrowedFd<'_>,
    attach: impl FnOnce() -> Result<FdLink, Box<dyn std::error::Error>>,
) -> Result<(AttachedLink, bool), DatapathError> {
    let path = pin_dir.join(format!("link_{name}"));
    if !path.exists() {
        return attach_and_pin(name, &path, attach).map(|l| (l, false));
    }
    let adopted = sys::obj_get(&path)
        .map_err(|e| format!("opening it: {e}"))
        .and_then(|link| {
            sys::link_update(link.as_fd(), prog_fd)
                .map(|()| link)
                .map_err(|e| format!("BPF_LINK_UPDATE: {e}"))
        });
    match adopted {
        Ok(link) => {
            return Ok((
                AttachedLink {
                    name,
                    path,
                    hold: LinkHold::Adopted(link),
                },
                true,
            ));
        }
        Err(e) => tracing::warn!(program = name, path = %path.display(), error = %e,
            "cannot swap the program into the pinned link; replacing the link"),
    }
    // Attach the new link before the stale one goes, so nothing goes uncounted; bpffs has no
    // rename, so the new link is pinned once the old pin is removed.
    let fd_link = attach().map_err(|e| DatapathError::Attach {
        name,
        message: error_chain(e.as_ref()),
    })?;
    std::fs::remove_file(&path).map_err(|e| DatapathError::Pin {
        name,
        path: path.clone(),
        message: format!("removing the stale link: {e}"),
    })?;
    pin(name, &path, fd_link).map(|l| (l, false))
}

fn attach_and_pin(
    name: &'static str,
    path: &Path,
    attach: impl FnOnce() -> Result<FdLink, Box<dyn std::error::Error>>,
) -> Result<AttachedLink, DatapathError> {
    let fd_link = attach().map_err(|e| DatapathError::Attach {
        name,
        message: error_chain(e.as_ref()),
    })?;
    pin(name, path, fd_link)
}

fn pin(name: &'static str, path: &Path, fd_link: FdLink) -> Result<AttachedLink, DatapathError> {
    let link = fd_link.pin(path).map_err(|e| DatapathError::Pin {
        name,
        path: path.to_path_buf(),
        message: error_chain(&e),
    })?;
    Ok(AttachedLink {
        name,
        path: path.to_path_buf(),
        hold: LinkHold::Pinned(link),
    })
}

/// "outer: inner: innermost", so a syscall's errno is not lost behind its wrapper.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
