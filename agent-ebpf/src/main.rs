//! Kernel side of bulkhead-agent.
//!
//! * `bulkhead_ingress` / `bulkhead_egress` (`cgroup_skb`): read the packet's socket's tag from
//!   `BH_SOCK_TAGS` (socket-local storage: a pointer off the socket, no hash, no key to compute)
//!   and add the packet to its tenant's per-CPU counters in the `BH_TRAFFIC` array; sockets
//!   without a tag count under tenant id 0 ("untagged"). They never drop a packet.
//! * `bulkhead_sock_release` (`cgroup/sock_release`): counts a closing tagged socket in its
//!   tenant's `BH_TAGS_FREED` slot. The tag itself goes with the socket (the kernel frees a
//!   socket's storage with the socket); the count is what lets the agent export live tags per
//!   tenant without walking the sockets.
//!
//! * On egress, packets to an endpoint a tenant owns (`BH_ENDPOINTS`) from a socket of another
//!   tenant, or from an untagged socket of a cgroup that must tag (`BH_MUST_TAG`), are a
//!   cross-tenant flow: counted in `BH_FLOWS`, reported through `BH_FLOW_EVENTS` once per flow
//!   and interval, and dropped when the endpoint's mode is enforce.
//! * `bulkhead_connect4` / `bulkhead_connect6` (`cgroup/connect4`, `cgroup/connect6`): the same
//!   check at connect(), so that an enforced flow fails at once with EPERM instead of its SYNs
//!   being dropped until the connect times out.
//!
//! Every map but the ring buffers is pinned by name, so counters and tags outlive the agent (a
//! socket's storage lives as long as the socket and the map; the pinned map outlives the agent).
#![no_std]
#![no_main]
// `AtomicU64::fetch_add` is not available on the bpf target; the intrinsic lowers to the
// BPF atomic add instruction.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use agent_common::{
    AF_INET, AF_INET6, DIAG_BAD_TAG, DIAG_FLOW_EVENTS_LOST, DIAG_NO_SOCKET, DIAG_RELEASED_TAGS,
    DIAG_SLOTS, DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINTS_MAX_ENTRIES, EndpointKey,
    EndpointValue, FLOW_EVENTS_BYTES, FLOW_REPORT_INTERVAL_NS, FLOW_SEEN_MAX_ENTRIES,
    FLOWS_MAX_ENTRIES, FlowEvent, FlowKey, FlowSeenKey, MAX_TENANTS, MODE_ENFORCE,
    MUST_TAG_MAX_DEPTH, MUST_TAG_MAX_ENTRIES, SocketTag, TENANT_IDS_MAX_ENTRIES,
    TRAFFIC_MAX_ENTRIES, TenantName, TrafficCounters, UNTAGGED_TENANT_ID, traffic_index,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_F_NO_PREALLOC, BPF_NOEXIST, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE},
    cty::c_void,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
        bpf_ktime_get_ns, bpf_sk_storage_get, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{btf_map, cgroup_skb, cgroup_sock, cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use aya_log_ebpf::{debug, warn};
use core::intrinsics::{AtomicOrdering, atomic_xadd};

/// A BTF map definition of a `BPF_MAP_TYPE_SK_STORAGE` of [`SocketTag`], pinned by name.
/// aya-ebpf's own `SkStorage` has no `pinning` member (and its lookup takes only a sock_addr
/// context), so the definition is written out here: each member's pointee encodes one field the
/// loader reads from BTF (`type`, `key`, `value`, `max_entries`, `map_flags`, `pinning`), as
/// libbpf's `__uint`/`__type` do. The kernel requires BTF, an `int` key (a socket descriptor
/// from user space), no preallocation and `max_entries` 0 for socket storage.
#[repr(C)]
pub struct SockTagStorage {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SocketTag,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    /// 1: `LIBBPF_PIN_BY_NAME`.
    pinning: *const [i32; 1],
}

// SAFETY: the members are placeholders the loader reads from BTF; they are never dereferenced.
unsafe impl Sync for SockTagStorage {}

impl SockTagStorage {
    const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    /// The tag of the socket `sk` points to, if it has one. `sk` must be a socket pointer the
    /// verifier knows as one (`skb->sk` after a null check, `bpf_sock_addr->sk`) or, in a
    /// `cgroup_sock` program, the context itself; `bpf_sk_storage_get` returns NULL for sockets
    /// that are not full sockets (request and time-wait sockets).
    #[inline(always)]
    fn tenant_of(&self, sk: *mut c_void) -> Option<u32> {
        let map = core::ptr::from_ref(self).cast_mut().cast::<c_void>();
        // SAFETY: `map` is this map's definition (the loader patches it into the map's
        // descriptor); no value and no flags: a lookup that never creates storage.
        let tag = unsafe { bpf_sk_storage_get(map, sk, core::ptr::null_mut(), 0) };
        if tag.is_null() {
            None
        } else {
            // SAFETY: a non-null pointer to this socket's SocketTag, valid for this program run.
            Some(unsafe { (*tag.cast::<SocketTag>()).tenant_id })
        }
    }
}

#[btf_map]
static BH_SOCK_TAGS: SockTagStorage = SockTagStorage::new();

/// Tagged sockets closed, per tenant id (user space keeps the tags it set and removed in
/// `BH_TAGS_SET`; live tags = set - freed).
#[map]
static BH_TAGS_FREED: PerCpuArray<u64> = PerCpuArray::pinned(MAX_TENANTS, 0);

/// Written by user space only; created and pinned with the rest.
#[map]
static BH_TAGS_SET: Array<u64> = Array::pinned(MAX_TENANTS, 0);

#[map]
static BH_TRAFFIC: PerCpuArray<TrafficCounters> = PerCpuArray::pinned(TRAFFIC_MAX_ENTRIES, 0);

/// Written and read by user space only; lives here so that it is created and pinned with the
/// others and tenant ids survive restarts together with the counters keyed by them.
#[map]
static BH_TENANT_IDS: HashMap<TenantName, u32> = HashMap::pinned(TENANT_IDS_MAX_ENTRIES, 0);

#[map]
static BH_DIAG: PerCpuArray<u64> = PerCpuArray::pinned(DIAG_SLOTS, 0);

#[map]
static BH_ENDPOINTS: HashMap<EndpointKey, EndpointValue> =
    HashMap::pinned(ENDPOINTS_MAX_ENTRIES, 0);

#[map]
static BH_ENDPOINT_CNT: Array<u32> = Array::pinned(1, 0);

#[map]
static BH_MUST_TAG: HashMap<u64, u32> = HashMap::pinned(MUST_TAG_MAX_ENTRIES, 0);

#[map]
static BH_FLOWS: HashMap<FlowKey, u64> = HashMap::pinned(FLOWS_MAX_ENTRIES, 0);

#[map]
static BH_FLOW_SEEN: LruHashMap<FlowSeenKey, u64> = LruHashMap::pinned(FLOW_SEEN_MAX_ENTRIES, 0);

#[map]
static BH_FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);

const ALLOW: i32 = 1;
const DROP: i32 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

#[cgroup_skb]
pub fn bulkhead_ingress(ctx: SkBuffContext) -> i32 {
    let tenant_id = tenant_of(&ctx);
    count(&ctx, tenant_id, DIRECTION_INGRESS);
    ALLOW
}

#[cgroup_skb]
pub fn bulkhead_egress(ctx: SkBuffContext) -> i32 {
    let tenant_id = tenant_of(&ctx);
    let verdict = check_cross_tenant(&ctx, tenant_id);
    // A dropped packet never leaves, so it is not the tenant's traffic; the flow counts it.
    if verdict == ALLOW {
        count(&ctx, tenant_id, DIRECTION_EGRESS);
    }
    verdict
}

#[cgroup_sock_addr(connect4)]
pub fn bulkhead_connect4(ctx: SockAddrContext) -> i32 {
    connect_verdict(&ctx, AF_INET)
}

#[cgroup_sock_addr(connect6)]
pub fn bulkhead_connect6(ctx: SockAddrContext) -> i32 {
    connect_verdict(&ctx, AF_INET6)
}

/// 1 lets connect() go on, 0 makes it fail with EPERM (an enforced cross-tenant flow).
#[inline(always)]
fn connect_verdict(ctx: &SockAddrContext, family: u32) -> i32 {
    if !endpoints_configured() {
        return ALLOW;
    }
    // SAFETY: the context is the `struct bpf_sock_addr *` the kernel passed; reads only.
    let sa = unsafe { &*ctx.sock_addr };
    let mut p = Packet {
        family,
        src_addr: [0; 16],
        dst_addr: [0; 16],
        src_port: 0,
        dst_port: u32::from(u16::from_be(sa.user_port as u16)),
    };
    if family == AF_INET {
        // user_ip4 is in network order: its bytes in memory are the address.
        p.dst_addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    } else {
        for (i, word) in sa.user_ip6.iter().enumerate() {
            p.dst_addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    }
    let Some(owner) = endpoint_owner(&p) else {
        return ALLOW;
    };
    // SAFETY: `sk` of a sock_addr context is always set: the verifier types it as a full
    // socket (the union only pads the pointer to 64 bits).
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let tenant_id = BH_SOCK_TAGS
        .tenant_of(sk.cast())
        .unwrap_or(UNTAGGED_TENANT_ID);
    if owner.tenant_id == tenant_id {
        return ALLOW;
    }
    // SAFETY: the context pointer is the one the kernel passed; the helper only reads it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: connect() runs in the calling task's context; these helpers read its cgroup.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if tenant_id == UNTAGGED_TENANT_ID
        && !must_tag(cgroup_id, |level| unsafe {
            // SAFETY: as above.
            bpf_get_current_ancestor_cgroup_id(level)
        })
    {
        return ALLOW;
    }
    // Alert-mode flows are reported by the egress program with their real source address.
    if owner.mode != MODE_ENFORCE {
        return ALLOW;
    }
    report(cookie, cgroup_id, tenant_id, &owner, &p);
    DROP
}

#[cgroup_sock(sock_release)]
pub fn bulkhead_sock_release(ctx: SockContext) -> i32 {
    // A cgroup_sock program passes its context (the closing socket) to bpf_sk_storage_get.
    let Some(tenant_id) = BH_SOCK_TAGS.tenant_of(ctx.as_ptr()) else {
        return ALLOW;
    };
    if tenant_id < MAX_TENANTS
        && let Some(freed) = BH_TAGS_FREED.get_ptr_mut(tenant_id)
    {
        // SAFETY: this CPU's slot of a per-CPU array, valid for this program run; atomic, as
        // for the traffic counters.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(freed, 1) };
    }
    bump_diag(DIAG_RELEASED_TAGS);
    // SAFETY: the context pointer is the `struct bpf_sock *` the kernel passed to this program;
    // bpf_get_socket_cookie is allowed for cgroup_sock programs and only reads it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    debug!(&ctx, "released the tag of closed socket {}", cookie);
    ALLOW
}

/// The tenant of the packet's socket (untagged when it has none, or no tag).
#[inline(always)]
fn tenant_of(ctx: &SkBuffContext) -> u32 {
    // SAFETY: `skb` is the context the kernel passed; reading its `sk` member is a context
    // access the verifier rewrites, giving a socket pointer or NULL.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        bump_diag(DIAG_NO_SOCKET);
        return UNTAGGED_TENANT_ID;
    }
    BH_SOCK_TAGS
        .tenant_of(sk.cast())
        .unwrap_or(UNTAGGED_TENANT_ID)
}

#[inline(always)]
fn count(ctx: &SkBuffContext, tenant_id: u32, direction: u32) {
    let index = match traffic_index(tenant_id, direction) {
        Some(i) => i,
        None => {
            bump_diag(DIAG_BAD_TAG);
            warn!(ctx, "a socket has tenant id {} out of range", tenant_id);
            UNTAGGED_TENANT_ID * 2 + direction
        }
    };
    if let Some(counters) = BH_TRAFFIC.get_ptr_mut(index) {
        let len = u64::from(ctx.len());
        // SAFETY: the pointer is this CPU's element of the array, valid and aligned for this
        // program run. Atomic adds, because a softirq on this CPU can interrupt a
        // process-context update of the same element.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*counters).bytes, len);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*counters).packets, 1);
        }
    }
}

/// Addresses and ports of an IPv4/IPv6 packet (ports 0 when not TCP/UDP or not parsed).
struct Packet {
    family: u32,
    src_addr: [u8; 16],
    dst_addr: [u8; 16],
    src_port: u32,
    dst_port: u32,
}

/// Parses the network and transport headers; the cgroup hook's packet starts at the IP header.
#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Option<Packet> {
    let first: u8 = ctx.load(0).ok()?;
    let mut p = Packet {
        family: 0,
        src_addr: [0; 16],
        dst_addr: [0; 16],
        src_port: 0,
        dst_port: 0,
    };
    let (proto, l4) = match first >> 4 {
        4 => {
            p.family = AF_INET;
            // Fixed-size loads: the verifier needs a constant length.
            let src: [u8; 4] = ctx.load(12).ok()?;
            let dst: [u8; 4] = ctx.load(16).ok()?;
            p.src_addr[..4].copy_from_slice(&src);
            p.dst_addr[..4].copy_from_slice(&dst);
            let frag: u16 = u16::from_be(ctx.load(6).ok()?);
            if frag & 0x1fff != 0 {
                return Some(p); // a later fragment: no transport header
            }
            (ctx.load::<u8>(9).ok()?, usize::from(first & 0x0f) * 4)
        }
        6 => {
            p.family = AF_INET6;
            p.src_addr = ctx.load(8).ok()?;
            p.dst_addr = ctx.load(24).ok()?;
            (ctx.load::<u8>(6).ok()?, 40)
        }
        _ => return None,
    };
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        let ports: u32 = u32::from_be(ctx.load(l4).ok()?);
        p.src_port = ports >> 16;
        p.dst_port = ports & 0xffff;
    }
    Some(p)
}

/// ALLOW, or DROP for a cross-tenant flow to an endpoint in enforce mode.
#[inline(always)]
fn check_cross_tenant(ctx: &SkBuffContext, tenant_id: u32) -> i32 {
    if !endpoints_configured() {
        return ALLOW;
    }
    let Some(p) = parse(ctx) else {
        return ALLOW;
    };
    let Some(owner) = endpoint_owner(&p) else {
        return ALLOW;
    };
    if owner.tenant_id == tenant_id {
        return ALLOW;
    }
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: `skb` is the context the kernel passed; these helpers only read it.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
    if tenant_id == UNTAGGED_TENANT_ID
        && !must_tag(cgroup_id, |level| unsafe {
            // SAFETY: as above.
            bpf_skb_ancestor_cgroup_id(skb, level)
        })
    {
        return ALLOW;
    }
    // SAFETY: the context pointer is the `struct __sk_buff *` the kernel passed; the helper
    // only reads it (0 when the packet has no socket).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    report(cookie, cgroup_id, tenant_id, &owner, &p);
    if owner.mode == MODE_ENFORCE {
        DROP
    } else {
        ALLOW
    }
}

#[inline(always)]
fn endpoints_configured() -> bool {
    matches!(BH_ENDPOINT_CNT.get(0), Some(n) if *n > 0)
}

/// The tenant owning the packet's destination: its address and port, else its address alone.
#[inline(always)]
fn endpoint_owner(p: &Packet) -> Option<EndpointValue> {
    let mut key = EndpointKey {
        family: p.family,
        port: p.dst_port,
        addr: p.dst_addr,
    };
    let owner = match BH_ENDPOINTS.get_ptr(key) {
        Some(v) => v,
        None => {
            key.port = 0;
            BH_ENDPOINTS.get_ptr(key)?
        }
    };
    // SAFETY: a non-null pointer into the map's value, valid for this program run.
    Some(unsafe { *owner })
}

/// Whether cgroup `own`, or one above it (`ancestor(level)`, level 0 being the root), is
/// marked as one whose sockets must be tagged.
#[inline(always)]
fn must_tag(own: u64, ancestor: impl Fn(i32) -> u64) -> bool {
    if BH_MUST_TAG.get_ptr(own).is_some() {
        return true;
    }
    for level in 0..MUST_TAG_MAX_DEPTH {
        let id = ancestor(level);
        if id == 0 || id == own {
            return false;
        }
        if BH_MUST_TAG.get_ptr(id).is_some() {
            return true;
        }
    }
    false
}

/// Counts the flow and emits an event, once per socket, destination and report interval.
#[inline(always)]
fn report(cookie: u64, cgroup_id: u64, tenant_id: u32, owner: &EndpointValue, p: &Packet) {
    let seen = FlowSeenKey {
        cookie,
        family: p.family,
        port: p.dst_port,
        addr: p.dst_addr,
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match BH_FLOW_SEEN.get_ptr_mut(seen) {
        Some(last) => {
            // SAFETY: a non-null pointer into the map's value, valid for this program run.
            unsafe {
                if now.wrapping_sub(*last) < FLOW_REPORT_INTERVAL_NS {
                    return;
                }
                *last = now;
            }
        }
        None => {
            // NOEXIST: when two CPUs see the first packet at once, one of them reports it.
            if BH_FLOW_SEEN
                .insert(seen, now, u64::from(BPF_NOEXIST))
                .is_err()
            {
                return;
            }
        }
    }
    let key = FlowKey {
        src_tenant: tenant_id,
        dst_tenant: owner.tenant_id,
        action: owner.mode,
        _reserved: 0,
    };
    if !add_flow(&key) && BH_FLOWS.insert(key, 1u64, u64::from(BPF_NOEXIST)).is_err() {
        add_flow(&key);
    }
    match BH_FLOW_EVENTS.reserve::<FlowEvent>(0) {
        Some(mut entry) => {
            entry.write(FlowEvent {
                cookie,
                cgroup_id,
                src_tenant: tenant_id,
                dst_tenant: owner.tenant_id,
                action: owner.mode,
                family: p.family,
                src_port: p.src_port,
                dst_port: p.dst_port,
                src_addr: p.src_addr,
                dst_addr: p.dst_addr,
            });
            entry.submit(0);
        }
        None => bump_diag(DIAG_FLOW_EVENTS_LOST),
    }
}

#[inline(always)]
fn add_flow(key: &FlowKey) -> bool {
    match BH_FLOWS.get_ptr_mut(key) {
        Some(n) => {
            // SAFETY: a non-null pointer into the map's value; atomic, as CPUs share it.
            unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1) };
            true
        }
        None => false,
    }
}

#[inline(always)]
fn bump_diag(slot: u32) {
    if let Some(v) = BH_DIAG.get_ptr_mut(slot) {
        // SAFETY: as in `add`: this CPU's slot of a per-CPU array, valid for this run.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(v, 1) };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
