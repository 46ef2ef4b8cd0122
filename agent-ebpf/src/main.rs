//! Kernel side of bulkhead-agent.
//!
//! * `bulkhead_ingress` / `bulkhead_egress` (`cgroup_skb`): look up the packet's socket cookie in
//!   `BH_COOKIE_TAGS` and add the packet to its tenant's per-CPU counters in the `BH_TRAFFIC`
//!   array; sockets without a tag count under tenant id 0 ("untagged"). They never drop a packet.
//! * `bulkhead_sock_release` (`cgroup/sock_release`): deletes the tag of a closing socket, so the
//!   tag map holds live sockets only (the map is also an LRU, as a backstop).
//!
//! Every map is pinned by name, so counters and tags outlive the agent process.
#![no_std]
#![no_main]
// `AtomicU64::fetch_add` is not available on the bpf target; the intrinsic lowers to the
// BPF atomic add instruction.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use agent_common::{
    COOKIE_TAGS_MAX_ENTRIES, DIAG_BAD_TAG, DIAG_NO_SOCKET, DIAG_RELEASED_TAGS, DIAG_SLOTS,
    DIRECTION_EGRESS, DIRECTION_INGRESS, SocketTag, TENANT_IDS_MAX_ENTRIES, TRAFFIC_MAX_ENTRIES,
    TenantName, TrafficCounters, UNTAGGED_TENANT_ID, traffic_index,
};
use aya_ebpf::{
    EbpfContext,
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_skb, cgroup_sock, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{SkBuffContext, SockContext},
};
use aya_log_ebpf::{debug, warn};
use core::intrinsics::{AtomicOrdering, atomic_xadd};

#[map]
static BH_COOKIE_TAGS: LruHashMap<u64, SocketTag> = LruHashMap::pinned(COOKIE_TAGS_MAX_ENTRIES, 0);

#[map]
static BH_TRAFFIC: PerCpuArray<TrafficCounters> = PerCpuArray::pinned(TRAFFIC_MAX_ENTRIES, 0);

/// Written and read by user space only; lives here so that it is created and pinned with the
/// others and tenant ids survive restarts together with the counters keyed by them.
#[map]
static BH_TENANT_IDS: HashMap<TenantName, u32> = HashMap::pinned(TENANT_IDS_MAX_ENTRIES, 0);

#[map]
static BH_DIAG: PerCpuArray<u64> = PerCpuArray::pinned(DIAG_SLOTS, 0);

const ALLOW: i32 = 1;

#[cgroup_skb]
pub fn bulkhead_ingress(ctx: SkBuffContext) -> i32 {
    count(&ctx, DIRECTION_INGRESS);
    ALLOW
}

#[cgroup_skb]
pub fn bulkhead_egress(ctx: SkBuffContext) -> i32 {
    count(&ctx, DIRECTION_EGRESS);
    ALLOW
}

#[cgroup_sock(sock_release)]
pub fn bulkhead_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer is the `struct bpf_sock *` the kernel passed to this program;
    // bpf_get_socket_cookie is allowed for cgroup_sock programs and only reads it.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if cookie != 0 && BH_COOKIE_TAGS.remove(cookie).is_ok() {
        bump_diag(DIAG_RELEASED_TAGS);
        debug!(&ctx, "released the tag of closed socket {}", cookie);
    }
    ALLOW
}

#[inline(always)]
fn count(ctx: &SkBuffContext, direction: u32) {
    // SAFETY: the context pointer is the `struct __sk_buff *` the kernel passed to this program;
    // bpf_get_socket_cookie only reads it and returns 0 when the packet has no socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let tenant_id = if cookie == 0 {
        bump_diag(DIAG_NO_SOCKET);
        UNTAGGED_TENANT_ID
    } else {
        match BH_COOKIE_TAGS.get_ptr(cookie) {
            // SAFETY: a non-null pointer into the map's value, valid for this program run.
            Some(tag) => unsafe { (*tag).tenant_id },
            None => UNTAGGED_TENANT_ID,
        }
    };
    let index = match traffic_index(tenant_id, direction) {
        Some(i) => i,
        None => {
            bump_diag(DIAG_BAD_TAG);
            warn!(
                ctx,
                "socket {} has tenant id {} out of range", cookie, tenant_id
            );
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
