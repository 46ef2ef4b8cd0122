//! Tenant ids (`TenantRegistry::assign`) and the tagging socket file (`tagging::bind_socket`),
//! without eBPF: what an operator relies on across restarts and config changes.

use agent_common::{MAX_TENANTS, UNTAGGED_TENANT_ID};
use bulkhead_agent::config::TaggingConfig;
use bulkhead_agent::tagging::{TaggingError, bind_socket};
use bulkhead_agent::tenants::{TenantError, TenantRegistry};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn pairs(v: &[(&str, u32)]) -> Vec<(String, u32)> {
    v.iter().map(|(n, id)| (n.to_string(), *id)).collect()
}

#[test]
fn new_tenants_get_ids_after_the_highest_ever_given_in_config_order() {
    // Ids 1 and 5 were given out (2-4 to tenants long gone, whose entries were lost): a new
    // tenant gets 6, never a gap's id, which old counters may still carry.
    let existing = pairs(&[("a", 1), ("c", 5)]);
    let (r, new) = TenantRegistry::assign(&names(&["b", "a", "d"]), &existing).unwrap();
    assert_eq!(new, pairs(&[("b", 6), ("d", 7)]));
    assert_eq!(
        r.configured().collect::<Vec<_>>(),
        vec![("a", 1), ("b", 6), ("d", 7)],
        "configured tenants, by name, without the retired c"
    );
    assert_eq!(r.id("c"), None, "c is retired: it cannot be tagged");
    assert_eq!(r.name(5), Some("c"), "but its counters keep their name");
    assert_eq!(r.label(5), "c");
    assert_eq!(
        r.labelled_ids(),
        vec![
            (0, "untagged".to_string()),
            (1, "a".to_string()),
            (5, "c".to_string()),
            (6, "b".to_string()),
            (7, "d".to_string())
        ]
    );
}

#[test]
fn nothing_configured_and_nothing_stored_starts_at_one() {
    let (r, new) = TenantRegistry::assign(&[], &[]).unwrap();
    assert!(new.is_empty());
    assert_eq!(r.configured().count(), 0);
    assert_eq!(r.labelled_ids(), vec![(0, "untagged".to_string())]);
    let (r, new) = TenantRegistry::assign(&names(&["only"]), &[]).unwrap();
    assert_eq!(new, pairs(&[("only", 1)]));
    assert_eq!(r.id("only"), Some(1));
}

#[test]
fn a_stored_id_of_zero_is_never_a_tenants() {
    // Id 0 is "untagged": a map entry giving it to a name (written by something else) is
    // ignored, and the tenant gets an id of its own.
    let existing = pairs(&[("a", UNTAGGED_TENANT_ID), ("b", 2)]);
    let (r, new) = TenantRegistry::assign(&names(&["a", "b"]), &existing).unwrap();
    assert_eq!(new, pairs(&[("a", 3)]));
    assert_eq!(r.id("a"), Some(3));
    assert_eq!(r.id("b"), Some(2), "b keeps its id: no new entry for it");
    assert_eq!(r.label(0), "untagged");
    assert_eq!(r.name(0), None);
    assert_eq!(
        r.labelled_ids(),
        vec![
            (0, "untagged".to_string()),
            (2, "b".to_string()),
            (3, "a".to_string())
        ]
    );
}

#[test]
fn unknown_ids_are_labelled_but_have_no_name() {
    let (r, _) = TenantRegistry::assign(&names(&["a"]), &[]).unwrap();
    assert_eq!(r.label(42), "unknown-42");
    assert_eq!(r.name(42), None);
    assert_eq!(r.id("untagged"), None);
    assert_eq!(r.id("A"), None, "names are case-sensitive");
}

#[test]
fn the_last_id_is_given_out_and_the_one_after_is_refused() {
    let last = MAX_TENANTS - 1;
    let existing = pairs(&[("old", last - 1)]);
    let (r, new) = TenantRegistry::assign(&names(&["new"]), &existing).unwrap();
    assert_eq!(new, pairs(&[("new", last)]));
    assert_eq!(r.id("new"), Some(last));

    // One id left, two new tenants: the second is refused, by name, and nothing is returned
    // to persist.
    let err = TenantRegistry::assign(&names(&["x", "y"]), &existing).unwrap_err();
    assert!(
        matches!(&err, TenantError::Exhausted(n) if n == "y"),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!("ids 1-{last} were all given out")),
        "{text}"
    );
    assert!(text.contains("cleanup --remove-maps"), "{text}");

    // Known tenants need no new id, even when none is left.
    let full = pairs(&[("old", last)]);
    let (r, new) = TenantRegistry::assign(&names(&["old"]), &full).unwrap();
    assert!(new.is_empty());
    assert_eq!(r.id("old"), Some(last));
    assert!(TenantRegistry::assign(&names(&["old", "new"]), &full).is_err());
}

/// A fresh directory under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("bulkhead-sock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tagging(path: &Path, mode: u32) -> TaggingConfig {
    TaggingConfig {
        socket_path: path.to_path_buf(),
        socket_mode: mode,
        ..TaggingConfig::default()
    }
}

/// Whether a SOCK_SEQPACKET client can connect to `path` (what the agent's clients use).
fn seqpacket_connects(path: &Path) -> bool {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).is_ok()
}

#[test]
fn the_socket_is_made_with_its_directory_and_mode() {
    let dir = TempDir::new("mode");
    let path = dir.0.join("run/bulkhead/agent.sock");
    let _listener = bind_socket(&tagging(&path, 0o660)).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    assert!(seqpacket_connects(&path));
}

#[test]
fn a_stale_socket_file_is_replaced_but_a_live_one_is_not() {
    let dir = TempDir::new("stale");
    let path = dir.0.join("agent.sock");
    let cfg = tagging(&path, 0o666);
    let first = bind_socket(&cfg).unwrap();

    // A second agent on the same path is refused, naming it, and the first keeps serving.
    let err = bind_socket(&cfg).unwrap_err();
    assert!(
        matches!(&err, TaggingError::InUse { path: p } if p == &path),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("is in use by a running agent"),
        "{err}"
    );
    assert!(
        seqpacket_connects(&path),
        "the running agent's socket was removed"
    );

    // Gone without removing its file (a crash): the file is replaced.
    drop(first);
    assert!(path.exists() && !seqpacket_connects(&path));
    let _again = bind_socket(&cfg).unwrap();
    assert!(seqpacket_connects(&path));
}

#[test]
fn a_stream_listener_on_the_path_is_not_taken_over() {
    let dir = TempDir::new("stream");
    std::fs::create_dir_all(&dir.0).unwrap();
    let path = dir.0.join("agent.sock");
    let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let err = bind_socket(&tagging(&path, 0o666)).unwrap_err();
    assert!(matches!(err, TaggingError::InUse { .. }), "{err:?}");
    assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
    drop(other);
}

#[test]
fn a_path_whose_directory_cannot_be_made_is_an_error_naming_it() {
    let dir = TempDir::new("nodir");
    std::fs::create_dir_all(&dir.0).unwrap();
    let blocker = dir.0.join("file");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let path = blocker.join("agent.sock");
    let err = bind_socket(&tagging(&path, 0o666)).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            &err,
            TaggingError::Socket {
                what: "creating its directory",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(text.contains(&path.display().to_string()), "{text}");
}
