//! Typed access to the pinned maps, each behind its own lock.

use agent_common::{
    DIAG_SLOTS, EndpointKey, EndpointValue, FlowKey, MAX_TENANTS, SocketTag, TenantName,
    TrafficCounters, traffic_index,
};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, SkStorage};
use std::os::fd::BorrowedFd;
use std::sync::Mutex;

/// Handles on the pinned maps. Each sits behind a mutex: aya's map writes take `&mut`.
pub struct Maps {
    pub(super) tags: Mutex<SockTags>,
    pub(super) tags_freed: Mutex<PerCpuArray<MapData, u64>>,
    pub(super) traffic: Mutex<PerCpuArray<MapData, TrafficCounters>>,
    pub(super) tenant_ids: Mutex<HashMap<MapData, TenantName, u32>>,
    pub(super) diag: Mutex<PerCpuArray<MapData, u64>>,
    pub(super) endpoints: Mutex<HashMap<MapData, EndpointKey, EndpointValue>>,
    pub(super) endpoint_count: Mutex<Array<MapData, u32>>,
    pub(super) must_tag: Mutex<HashMap<MapData, u64, u32>>,
    pub(super) flows: Mutex<HashMap<MapData, FlowKey, u64>>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Maps")
    }
}

/// The socket-tag storage and the per-tenant count of the tags the agent set, under one lock
/// so that a tag and its count change together.
pub(super) struct SockTags {
    pub(super) storage: SkStorage<MapData, SocketTag>,
    pub(super) set: Array<MapData, u64>,
}

impl SockTags {
    fn add(&mut self, tenant_id: u32, delta: i64) -> Result<(), MapError> {
        if tenant_id >= MAX_TENANTS {
            return Ok(());
        }
        let n = self.set.get(&tenant_id, 0)?;
        self.set.set(tenant_id, n.wrapping_add_signed(delta), 0)
    }

    fn get(&self, socket: BorrowedFd<'_>) -> Result<Option<u32>, MapError> {
        match self.storage.get(&socket, 0) {
            Ok(tag) => Ok(Some(tag.tenant_id)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A lookup or delete of something that is not there (aya reports some as syscall errors).
fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

impl Maps {
    /// Tags `socket` (a descriptor of it) with `tenant_id`; an existing tag is replaced.
    pub fn tag(&self, socket: BorrowedFd<'_>, tenant_id: u32) -> Result<(), MapError> {
        let mut tags = self.tags.lock().unwrap();
        let before = tags.get(socket)?;
        if before == Some(tenant_id) {
            return Ok(());
        }
        let tag = SocketTag {
            tenant_id,
            _reserved: 0,
        };
        tags.storage.insert(&socket, tag, 0)?;
        if let Some(old) = before {
            tags.add(old, -1)?;
        }
        tags.add(tenant_id, 1)
    }

    /// Removes the socket's tag; `false` when it had none.
    pub fn untag(&self, socket: BorrowedFd<'_>) -> Result<bool, MapError> {
        let mut tags = self.tags.lock().unwrap();
        let Some(old) = tags.get(socket)? else {
            return Ok(false);
        };
        match tags.storage.remove(&socket) {
            Ok(()) => {}
            Err(e) if not_found(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
        tags.add(old, -1)?;
        Ok(true)
    }

    pub fn lookup_tag(&self, socket: BorrowedFd<'_>) -> Result<Option<u32>, MapError> {
        self.tags.lock().unwrap().get(socket)
    }

    /// Live tagged sockets per tenant id (ids without any left out): tags set minus tagged
    /// sockets closed. Sockets closed while no program was attached are not counted as closed.
    pub fn tag_counts(&self) -> Result<Vec<(u32, u64)>, MapError> {
        let set: Vec<u64> = {
            let tags = self.tags.lock().unwrap();
            tags.set.iter().collect::<Result<_, _>>()?
        };
        let freed = self.tags_freed.lock().unwrap();
        let mut out = Vec::new();
        for (id, set) in set.into_iter().enumerate() {
            if set == 0 {
                continue;
            }
            let closed: u64 = freed
                .get(&(id as u32), 0)?
                .iter()
                .fold(0u64, |a, b| a.wrapping_add(*b));
            let live = (set.wrapping_sub(closed) as i64).max(0) as u64;
            if live > 0 {
                out.push((id as u32, live));
            }
        }
        Ok(out)
    }

    /// Counters of one tenant in one direction, summed over CPUs.
    pub fn traffic(&self, tenant_id: u32, direction: u32) -> Result<TrafficCounters, MapError> {
        let Some(index) = traffic_index(tenant_id, direction) else {
            return Ok(TrafficCounters::default());
        };
        let per_cpu = self.traffic.lock().unwrap().get(&index, 0)?;
        let mut sum = TrafficCounters::default();
        for c in per_cpu.iter() {
            sum.bytes = sum.bytes.wrapping_add(c.bytes);
            sum.packets = sum.packets.wrapping_add(c.packets);
        }
        Ok(sum)
    }

    pub fn diag(&self) -> Result<[u64; DIAG_SLOTS as usize], MapError> {
        let map = self.diag.lock().unwrap();
        let mut out = [0u64; DIAG_SLOTS as usize];
        for (slot, v) in out.iter_mut().enumerate() {
            *v = map.get(&(slot as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    pub fn tenant_ids(&self) -> Result<Vec<(String, u32)>, MapError> {
        let map = self.tenant_ids.lock().unwrap();
        let mut out = Vec::new();
        for entry in map.iter() {
            let (name, id) = entry?;
            if let Some(name) = name.as_str() {
                out.push((name.to_string(), id));
            }
        }
        Ok(out)
    }

    pub fn insert_tenant_id(&self, name: &TenantName, id: u32) -> Result<(), MapError> {
        self.tenant_ids.lock().unwrap().insert(name, id, 0)
    }

    /// Makes `BH_ENDPOINTS` hold exactly `wanted`: new and changed entries first, then stale ones
    /// removed, then the count the programs check, so no configured endpoint is ever missing.
    pub fn sync_endpoints(&self, wanted: &[(EndpointKey, EndpointValue)]) -> Result<(), MapError> {
        let mut map = self.endpoints.lock().unwrap();
        for (k, v) in wanted {
            map.insert(k, v, 0)?;
        }
        let stale: Vec<EndpointKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.iter().any(|(w, _)| w == k))
            .collect();
        for k in stale {
            map.remove(&k)?;
        }
        let count = map.keys().count() as u32;
        self.endpoint_count.lock().unwrap().set(0, count, 0)
    }

    /// Makes `BH_MUST_TAG` hold exactly these cgroup ids.
    pub fn sync_must_tag(&self, ids: &[u64]) -> Result<(), MapError> {
        let mut map = self.must_tag.lock().unwrap();
        for id in ids {
            map.insert(id, 1, 0)?;
        }
        let stale: Vec<u64> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !ids.contains(k))
            .collect();
        for k in stale {
            map.remove(&k)?;
        }
        Ok(())
    }

    /// Cross-tenant flows counted so far.
    pub fn flows(&self) -> Result<Vec<(FlowKey, u64)>, MapError> {
        let map = self.flows.lock().unwrap();
        let mut out = Vec::new();
        for entry in map.iter() {
            out.push(entry?);
        }
        out.sort();
        Ok(out)
    }
}
