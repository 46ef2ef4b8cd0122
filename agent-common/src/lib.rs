//! Shared between the kernel side (`agent-ebpf`, `no_std`, bpfel target) and user space.
//!
//! Every map key and value is `#[repr(C)]`, has no `bool` and no implicit padding, so the
//! kernel and user space agree on the layout byte for byte. Map names are defined once here
//! and used on both sides; they are at most 15 bytes (the kernel's `BPF_OBJ_NAME_LEN` - 1).
#![no_std]
#![cfg_attr(not(feature = "client"), forbid(unsafe_code))]

#[cfg(any(test, feature = "client", feature = "otlp"))]
extern crate std;

pub mod bucket;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "otlp")]
pub mod otlp;
#[cfg(feature = "client")]
pub mod proto;
#[cfg(feature = "client")]
pub mod skip;

/// Socket -> [`SocketTag`]: socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`). User space
/// writes it by descriptor (the socket a client hands the agent), the programs read it with
/// `bpf_sk_storage_get` on the packet's socket. A tag lives and dies with its socket: nothing
/// can evict it, and nothing has to delete it. Pinned, so tags outlive the agent.
pub const MAP_SOCK_TAGS: &str = "BH_SOCK_TAGS";
/// Array of [`MAX_TENANTS`] `u64`, by tenant id: tags the agent has put on sockets minus tags it
/// took off (untag, re-tag). Written by user space only.
pub const MAP_TAGS_SET: &str = "BH_TAGS_SET";
/// Per-CPU array of [`MAX_TENANTS`] `u64`, by tenant id: tagged sockets closed, counted by the
/// `sock_release` program. Live tags of a tenant = `BH_TAGS_SET` - `BH_TAGS_FREED`.
pub const MAP_TAGS_FREED: &str = "BH_TAGS_FREED";
/// Per-CPU array of [`TrafficCounters`], indexed by [`traffic_index`]: bytes and packets per
/// tenant and direction. An array, not a hash: the lookup is a bounds check and an offset (the
/// verifier inlines it), no entry ever has to be created, and it can never be full.
pub const MAP_TRAFFIC: &str = "BH_TRAFFIC";
/// [`TenantName`] -> tenant id (`u32`). Only user space reads or writes it; it is a pinned map
/// so that tenant ids stay stable across agent restarts together with the counters.
pub const MAP_TENANT_IDS: &str = "BH_TENANT_IDS";
/// Per-CPU array of [`DIAG_SLOTS`] `u64` kernel-side event counters, indexed by `DIAG_*`.
pub const MAP_DIAG: &str = "BH_DIAG";

/// [`EndpointKey`] -> [`EndpointValue`]: addresses (and optionally ports) owned by a tenant.
/// Written by the agent from its config; read by the egress program.
pub const MAP_ENDPOINTS: &str = "BH_ENDPOINTS";
/// Array of one `u32`: the number of entries in [`MAP_ENDPOINTS`], so that the egress program
/// skips parsing headers entirely when no endpoint is configured.
pub const MAP_ENDPOINT_COUNT: &str = "BH_ENDPOINT_CNT";
/// cgroup id (`u64`) -> `u32` 1: workload cgroups whose sockets must be tagged; an untagged
/// socket of such a cgroup (or of a cgroup below it) reaching a tenant's endpoint is a
/// cross-tenant flow.
pub const MAP_MUST_TAG: &str = "BH_MUST_TAG";
/// [`FlowKey`] -> `u64`: cross-tenant flows seen, per source tenant, owner and action.
pub const MAP_FLOWS: &str = "BH_FLOWS";
/// [`FlowSeenKey`] -> last report time (ns): a flow is counted and reported once per
/// [`FLOW_REPORT_INTERVAL_NS`], not once per packet.
pub const MAP_FLOW_SEEN: &str = "BH_FLOW_SEEN";
/// Ring buffer of [`FlowEvent`]s for the agent to log.
pub const MAP_FLOW_EVENTS: &str = "BH_FLOW_EVENTS";

pub const ENDPOINTS_MAX_ENTRIES: u32 = 4_096;
pub const MUST_TAG_MAX_ENTRIES: u32 = 1_024;
pub const FLOWS_MAX_ENTRIES: u32 = 16_384;
pub const FLOW_SEEN_MAX_ENTRIES: u32 = 16_384;
pub const FLOW_EVENTS_BYTES: u32 = 256 * 1024;
pub const FLOW_REPORT_INTERVAL_NS: u64 = 60_000_000_000;
/// How many cgroup levels above a socket's own the egress program checks in [`MAP_MUST_TAG`].
pub const MUST_TAG_MAX_DEPTH: i32 = 8;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// What happens to a cross-tenant flow to an endpoint.
pub const MODE_ALERT: u32 = 1;
pub const MODE_ENFORCE: u32 = 2;

/// Names of the programs in the object, as user space looks them up.
pub const PROG_INGRESS: &str = "bulkhead_ingress";
pub const PROG_EGRESS: &str = "bulkhead_egress";
pub const PROG_SOCK_RELEASE: &str = "bulkhead_sock_release";
pub const PROG_CONNECT4: &str = "bulkhead_connect4";
pub const PROG_CONNECT6: &str = "bulkhead_connect6";

/// Tenant ids are `0..MAX_TENANTS` (0 is "untagged"), so at most `MAX_TENANTS - 1` named tenants
/// over the life of the pinned maps.
pub const MAX_TENANTS: u32 = 1_024;
pub const TRAFFIC_MAX_ENTRIES: u32 = MAX_TENANTS * 2;
pub const TENANT_IDS_MAX_ENTRIES: u32 = MAX_TENANTS;

/// Tenant id of traffic whose socket carries no tag. Never handed to a named tenant.
pub const UNTAGGED_TENANT_ID: u32 = 0;
/// Label used for [`UNTAGGED_TENANT_ID`] in metrics.
pub const UNTAGGED_TENANT_NAME: &str = "untagged";

pub const DIRECTION_INGRESS: u32 = 0;
pub const DIRECTION_EGRESS: u32 = 1;

/// Diagnostic counters kept by the kernel programs (slots of [`MAP_DIAG`]).
/// A tag with a tenant id out of range (counted as untagged instead); never seen unless the tag
/// map was written by something other than the agent.
pub const DIAG_BAD_TAG: u32 = 0;
pub const DIAG_NO_SOCKET: u32 = 1;
pub const DIAG_RELEASED_TAGS: u32 = 2;
/// Cross-tenant flow events lost because the ring buffer was full (the flow was still counted).
pub const DIAG_FLOW_EVENTS_LOST: u32 = 3;
pub const DIAG_SLOTS: u32 = 4;

/// Longest tenant name, in bytes (the size of [`TenantName::bytes`]).
pub const TENANT_NAME_LEN: usize = 64;

/// Label, in the agent's GPU memory metrics, of a shared server's memory that is no tenant's.
pub const SHARED_TENANT_NAME: &str = "shared";
/// Label, in the agent's GPU memory metrics, of memory no process or tenant could be found for.
pub const UNATTRIBUTED_TENANT_NAME: &str = "unattributed";

/// Names no tenant may have, in any letter case: they label metrics of traffic or memory that
/// belongs to no single tenant.
pub const RESERVED_TENANT_NAMES: [&str; 3] = [
    UNTAGGED_TENANT_NAME,
    SHARED_TENANT_NAME,
    UNATTRIBUTED_TENANT_NAME,
];

/// Why [`check_tenant_name`] refused a name. Its `Display` says what is wrong, without the
/// name itself (the caller adds the name or the config field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantNameError {
    /// The empty string.
    Empty,
    /// Longer than [`TENANT_NAME_LEN`] bytes; `len` is the name's length in bytes.
    TooLong { len: usize },
    /// A character outside `[A-Za-z0-9._-]`; `position` counts characters from 1.
    BadCharacter { position: usize, character: char },
    /// Starts with `.`, `_` or `-`.
    BadFirstCharacter { character: char },
    /// Equal, ignoring ASCII case, to `reserved`, one of [`RESERVED_TENANT_NAMES`].
    Reserved { reserved: &'static str },
}

impl core::fmt::Display for TenantNameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Empty => write!(
                f,
                "tenant name is empty; use 1-{TENANT_NAME_LEN} bytes of [A-Za-z0-9._-]"
            ),
            Self::TooLong { len } => write!(
                f,
                "tenant name is {len} bytes long; at most {TENANT_NAME_LEN} are allowed"
            ),
            Self::BadCharacter {
                position,
                character,
            } => write!(
                f,
                "tenant name has the character {character:?} at position {position}; \
                 use letters, digits, '.', '_' and '-'"
            ),
            Self::BadFirstCharacter { character } => write!(
                f,
                "tenant name starts with {character:?}; it must start with a letter or a digit"
            ),
            Self::Reserved { reserved } => write!(
                f,
                "tenant name is reserved: {reserved:?} (in any letter case) labels metrics of \
                 no single tenant"
            ),
        }
    }
}

impl core::error::Error for TenantNameError {}

/// The `result` of `bulkhead_config_reloads_total`, in the agent's and the sidecar's
/// metrics alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// The new configuration is in force (restart-only fields keep their running values).
    Ok,
    /// The file could not be read, parsed, validated or applied: the running configuration
    /// stays, unchanged.
    Invalid,
}

impl ReloadResult {
    /// Every value, for tables and tests.
    pub const ALL: [ReloadResult; 2] = [ReloadResult::Ok, ReloadResult::Invalid];

    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Ok => "ok",
            ReloadResult::Invalid => "invalid",
        }
    }
}

/// The rule for tenant names, in the agent's and the sidecar's configs alike: 1 to
/// [`TENANT_NAME_LEN`] bytes of `[A-Za-z0-9._-]`, starting with a letter or a digit, and none
/// of [`RESERVED_TENANT_NAMES`] in any letter case. The first problem found is returned.
pub fn check_tenant_name(name: &str) -> Result<(), TenantNameError> {
    if name.is_empty() {
        return Err(TenantNameError::Empty);
    }
    if name.len() > TENANT_NAME_LEN {
        return Err(TenantNameError::TooLong { len: name.len() });
    }
    for (i, c) in name.chars().enumerate() {
        if !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            return Err(TenantNameError::BadCharacter {
                position: i + 1,
                character: c,
            });
        }
    }
    if let Some(c) = name.chars().next().filter(|c| !c.is_ascii_alphanumeric()) {
        return Err(TenantNameError::BadFirstCharacter { character: c });
    }
    if let Some(reserved) = RESERVED_TENANT_NAMES
        .iter()
        .find(|r| r.eq_ignore_ascii_case(name))
    {
        return Err(TenantNameError::Reserved { reserved });
    }
    Ok(())
}

/// Index into [`MAP_TRAFFIC`] of a tenant's counters in one direction ([`DIRECTION_INGRESS`] or
/// [`DIRECTION_EGRESS`]); `None` for an id out of range.
#[inline(always)]
pub fn traffic_index(tenant_id: u32, direction: u32) -> Option<u32> {
    if tenant_id < MAX_TENANTS && direction <= 1 {
        Some(tenant_id * 2 + direction)
    } else {
        None
    }
}

/// Value of [`MAP_TRAFFIC`] (one copy per CPU; user space sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    /// Bytes of the packets as the cgroup hook sees them: from the network header on.
    pub bytes: u64,
    /// Packets (socket buffers; a GSO buffer counts once).
    pub packets: u64,
}

/// Value of [`MAP_SOCK_TAGS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketTag {
    pub tenant_id: u32,
    pub _reserved: u32,
}

/// Key of [`MAP_ENDPOINTS`]. IPv4 addresses take the first 4 bytes of `addr`, the rest zero.
/// `port` 0 matches every port of the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u32,
    /// Host byte order.
    pub port: u32,
    pub addr: [u8; 16],
}

/// Value of [`MAP_ENDPOINTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointValue {
    pub tenant_id: u32,
    /// [`MODE_ALERT`] or [`MODE_ENFORCE`].
    pub mode: u32,
}

/// Key of [`MAP_FLOWS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src_tenant: u32,
    pub dst_tenant: u32,
    /// [`MODE_ALERT`] or [`MODE_ENFORCE`]: what was done.
    pub action: u32,
    pub _reserved: u32,
}

/// Key of [`MAP_FLOW_SEEN`]: one socket to one destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSeenKey {
    pub cookie: u64,
    pub family: u32,
    pub port: u32,
    pub addr: [u8; 16],
}

/// A cross-tenant flow, as reported through [`MAP_FLOW_EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    pub cookie: u64,
    pub cgroup_id: u64,
    pub src_tenant: u32,
    pub dst_tenant: u32,
    pub action: u32,
    pub family: u32,
    /// Host byte order.
    pub src_port: u32,
    pub dst_port: u32,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
}

/// Key of [`MAP_TENANT_IDS`]: the name's bytes, zero padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TenantName {
    pub len: u32,
    pub bytes: [u8; TENANT_NAME_LEN],
}

impl TenantName {
    /// `None` when the name is empty or longer than [`TENANT_NAME_LEN`] bytes.
    pub fn new(name: &str) -> Option<Self> {
        let src = name.as_bytes();
        if src.is_empty() || src.len() > TENANT_NAME_LEN {
            return None;
        }
        let mut bytes = [0u8; TENANT_NAME_LEN];
        bytes[..src.len()].copy_from_slice(src);
        Some(Self {
            len: src.len() as u32,
            bytes,
        })
    }

    /// The name, or `None` when the stored bytes are not a valid name.
    pub fn as_str(&self) -> Option<&str> {
        let len = self.len as usize;
        if len == 0 || len > TENANT_NAME_LEN {
            return None;
        }
        core::str::from_utf8(&self.bytes[..len]).ok()
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], made of integers only, with no padding, so every bit
    // pattern is a valid value and the kernel's copy can be read back as-is.
    unsafe impl aya::Pod for super::TrafficCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SocketTag {}
    // SAFETY: as above (u32 followed by a byte array whose length is a multiple of 4).
    unsafe impl aya::Pod for super::TenantName {}
    // SAFETY: as above (two u32 then 16 bytes).
    unsafe impl aya::Pod for super::EndpointKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EndpointValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(core::mem::size_of::<TrafficCounters>(), 16);
        assert_eq!(core::mem::size_of::<SocketTag>(), 8);
        assert_eq!(core::mem::size_of::<TenantName>(), 4 + TENANT_NAME_LEN);
        assert_eq!(core::mem::size_of::<EndpointKey>(), 24);
        assert_eq!(core::mem::size_of::<EndpointValue>(), 8);
        assert_eq!(core::mem::size_of::<FlowKey>(), 16);
        assert_eq!(core::mem::size_of::<FlowSeenKey>(), 32);
        assert_eq!(core::mem::size_of::<FlowEvent>(), 2 * 8 + 6 * 4 + 32);
    }

    #[test]
    fn tenant_name_round_trips_and_rejects_bad_lengths() {
        let n = TenantName::new("acme").unwrap();
        assert_eq!(n.as_str(), Some("acme"));
        assert!(TenantName::new("").is_none());
        let long = "x".repeat(TENANT_NAME_LEN + 1);
        assert!(TenantName::new(&long).is_none());
        assert!(TenantName::new(&long[..TENANT_NAME_LEN]).is_some());
    }

    #[test]
    fn tenant_names_follow_the_rule() {
        for ok in [
            "a",
            "acme",
            "tenant-a",
            "Acme.Corp_2",
            "0day",
            "a..b",
            "a-",
            "sharedx",
            "untagged2",
        ] {
            assert_eq!(check_tenant_name(ok), Ok(()), "{ok}");
        }
        let longest = "x".repeat(TENANT_NAME_LEN);
        assert_eq!(check_tenant_name(&longest), Ok(()));
        assert!(
            TenantName::new(&longest).is_some(),
            "every valid name fits the map key"
        );

        assert_eq!(check_tenant_name(""), Err(TenantNameError::Empty));
        let long = "x".repeat(TENANT_NAME_LEN + 1);
        assert_eq!(
            check_tenant_name(&long),
            Err(TenantNameError::TooLong { len: 65 })
        );
        assert_eq!(
            check_tenant_name("a b"),
            Err(TenantNameError::BadCharacter {
                position: 2,
                character: ' '
            })
        );
        assert_eq!(
            check_tenant_name("acme/x"),
            Err(TenantNameError::BadCharacter {
                position: 5,
                character: '/'
            })
        );
        assert_eq!(
            check_tenant_name("caf\u{e9}"),
            Err(TenantNameError::BadCharacter {
                position: 4,
                character: '\u{e9}'
            })
        );
        // Multi-byte characters count as one position.
        assert_eq!(
            check_tenant_name("\u{e9}\u{e9}"),
            Err(TenantNameError::BadCharacter {
                position: 1,
                character: '\u{e9}'
            })
        );
        for (bad, c) in [(".hidden", '.'), ("-x", '-'), ("_", '_')] {
            assert_eq!(
                check_tenant_name(bad),
                Err(TenantNameError::BadFirstCharacter { character: c }),
                "{bad}"
            );
        }
        for (bad, r) in [
            ("untagged", "untagged"),
            ("shared", "shared"),
            ("unattributed", "unattributed"),
            ("Untagged", "untagged"),
            ("SHARED", "shared"),
            ("UnAttributed", "unattributed"),
        ] {
            assert_eq!(
                check_tenant_name(bad),
                Err(TenantNameError::Reserved { reserved: r }),
                "{bad}"
            );
        }
    }

    #[test]
    fn tenant_name_errors_say_what_is_wrong() {
        use std::string::ToString;
        let cases: [(&str, &str); 5] = [
            ("", "tenant name is empty; use 1-64 bytes of [A-Za-z0-9._-]"),
            (
                "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                "tenant name is 68 bytes long; at most 64 are allowed",
            ),
            (
                "a b",
                "tenant name has the character ' ' at position 2; use letters, digits, '.', '_' and '-'",
            ),
            (
                "-a",
                "tenant name starts with '-'; it must start with a letter or a digit",
            ),
            (
                "Shared",
                "tenant name is reserved: \"shared\" (in any letter case) labels metrics of no single tenant",
            ),
        ];
        for (name, want) in cases {
            assert_eq!(
                check_tenant_name(name).unwrap_err().to_string(),
                want,
                "{name:?}"
            );
        }
    }

    #[test]
    fn reserved_names_are_the_metric_labels_of_no_tenant() {
        assert!(RESERVED_TENANT_NAMES.contains(&UNTAGGED_TENANT_NAME));
        assert!(RESERVED_TENANT_NAMES.contains(&SHARED_TENANT_NAME));
        assert!(RESERVED_TENANT_NAMES.contains(&UNATTRIBUTED_TENANT_NAME));
    }

    #[test]
    fn traffic_indexes_are_dense_and_bounded() {
        assert_eq!(traffic_index(0, DIRECTION_INGRESS), Some(0));
        assert_eq!(traffic_index(0, DIRECTION_EGRESS), Some(1));
        assert_eq!(traffic_index(5, DIRECTION_EGRESS), Some(11));
        assert_eq!(
            traffic_index(MAX_TENANTS - 1, DIRECTION_EGRESS),
            Some(TRAFFIC_MAX_ENTRIES - 1)
        );
        assert_eq!(traffic_index(MAX_TENANTS, DIRECTION_INGRESS), None);
        assert_eq!(traffic_index(1, 2), None);
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in [
            MAP_SOCK_TAGS,
            MAP_TAGS_SET,
            MAP_TAGS_FREED,
            MAP_TRAFFIC,
            MAP_TENANT_IDS,
            MAP_DIAG,
            MAP_ENDPOINTS,
            MAP_ENDPOINT_COUNT,
            MAP_MUST_TAG,
            MAP_FLOWS,
            MAP_FLOW_SEEN,
            MAP_FLOW_EVENTS,
        ] {
            assert!(name.len() <= 15, "{name} is too long for BPF_OBJ_NAME_LEN");
        }
    }
}
