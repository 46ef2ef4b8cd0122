//! Cross-tenant flow detection: the config's endpoints and must-tag cgroups, written to the
//! maps the egress program reads, and the flow events it reports, logged with a rate limit.

use crate::config::{Config, EndpointMode};
use crate::datapath::Maps;
use crate::metrics::AgentMetrics;
use crate::tenants::TenantRegistry;
use agent_common::bucket::TokenBucket;
use agent_common::{
    AF_INET, AF_INET6, EndpointKey, EndpointValue, FlowEvent, MODE_ALERT, MODE_ENFORCE,
};
use aya::maps::{MapData, RingBuf};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum CrossTenantError {
    #[error("config field `cross_tenant.must_tag_cgroups[{index}]`: {path}: {message}")]
    Cgroup {
        index: usize,
        path: PathBuf,
        message: String,
    },
    #[error("config field `cross_tenant.endpoints[{index}].tenant`: {tenant:?} has no id")]
    UnknownTenant { index: usize, tenant: String },
    #[error("writing the cross-tenant maps: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// The map entries for the configured endpoints.
pub fn endpoint_entries(
    config: &Config,
    tenants: &TenantRegistry,
) -> Result<Vec<(EndpointKey, EndpointValue)>, CrossTenantError> {
    config
        .cross_tenant
        .endpoints
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let tenant_id =
                tenants
                    .id(&e.tenant)
                    .ok_or_else(|| CrossTenantError::UnknownTenant {
                        index,
                        tenant: e.tenant.clone(),
                    })?;
            let mut addr = [0u8; 16];
            let family = match e.address {
                IpAddr::V4(a) => {
                    addr[..4].copy_from_slice(&a.octets());
                    AF_INET
                }
                IpAddr::V6(a) => {
                    addr = a.octets();
                    AF_INET6
                }
            };
            let key = EndpointKey {
                family,
                port: u32::from(e.port.unwrap_or(0)),
                addr,
            };
            let mode = match e.mode {
                EndpointMode::Alert => MODE_ALERT,
                EndpointMode::Enforce => MODE_ENFORCE,
            };
            Ok((key, EndpointValue { tenant_id, mode }))
        })
        .collect()
}

/// The cgroup ids (kernfs inode numbers) of the must-tag cgroups; relative paths are taken
/// from the attach cgroup.
pub fn must_tag_ids(config: &Config, cgroup_root: &Path) -> Result<Vec<u64>, CrossTenantError> {
    use std::os::unix::fs::MetadataExt;
    config
        .cross_tenant
        .must_tag_cgroups
        .iter()
        .enumerate()
        .map(|(index, p)| {
            let path = if p.is_absolute() {
                p.clone()
            } else {
                cgroup_root.join(p)
            };
            let err = |message: String| CrossTenantError::Cgroup {
                index,
                path: path.clone(),
                message,
            };
            if !crate::sys::is_cgroup2(&path) {
                return Err(err("not a cgroup-v2 directory".into()));
            }
            std::fs::metadata(&path)
                .map(|m| m.ino())
                .map_err(|e| err(e.to_string()))
        })
        .collect()
}

/// Writes the config's endpoints and the must-tag cgroup ids (from [`must_tag_ids`], which
/// callers resolve before any side effect) into the maps. The endpoints are resolved before
/// either map is written, so a bad config changes nothing.
pub fn apply(
    config: &Config,
    must_tag: &[u64],
    tenants: &TenantRegistry,
    maps: &Maps,
) -> Result<(), CrossTenantError> {
    let endpoints = endpoint_entries(config, tenants)?;
    maps.sync_must_tag(must_tag)?;
    maps.sync_endpoints(&endpoints)?;
    Ok(())
}

/// A flow event decoded from the ring buffer.
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < std::mem::size_of::<FlowEvent>() {
        return None;
    }
    let u64_at = |o: usize| u64::from_ne_bytes(bytes[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap());
    let addr_at = |o: usize| -> [u8; 16] { bytes[o..o + 16].try_into().unwrap() };
    Some(FlowEvent {
        cookie: u64_at(0),
        cgroup_id: u64_at(8),
        src_tenant: u32_at(16),
        dst_tenant: u32_at(20),
        action: u32_at(24),
        family: u32_at(28),
        src_port: u32_at(32),
        dst_port: u32_at(36),
        src_addr: addr_at(40),
        dst_addr: addr_at(56),
    })
}

fn socket_addr(family: u32, addr: [u8; 16], port: u32) -> SocketAddr {
    let ip = if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(addr))
    };
    SocketAddr::new(ip, port as u16)
}

/// At most `rate` events a second (bursts of up to `rate`); `rate` may change between calls.
fn take(bucket: &mut TokenBucket<Instant>, rate: u32, now: Instant) -> bool {
    let rate = f64::from(rate);
    bucket.set_rate(rate, rate);
    bucket.take(1.0, now)
}

/// Logs the kernel's flow events (one JSON line each with `--log-format json`), at most
/// `rate` per second; the rest are counted in `bulkhead_cross_tenant_events_suppressed_total`.
pub async fn drain_events(
    ring: RingBuf<MapData>,
    tenants: Arc<RwLock<TenantRegistry>>,
    rate: Arc<AtomicU32>,
    metrics: AgentMetrics,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut fd = match crate::sys::async_fd(ring, tokio::io::Interest::READABLE) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the flow event ring buffer; flows are counted but not logged");
            return;
        }
    };
    let mut bucket = {
        let r = f64::from(rate.load(Ordering::Relaxed));
        TokenBucket::full(r, r)
    };
    tokio::pin!(shutdown);
    loop {
        let mut guard = tokio::select! {
            _ = &mut shutdown => return,
            g = fd.readable_mut() => match g {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "flow event ring buffer failed");
                    return;
                }
            },
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            let Some(ev) = decode(&item) else { continue };
            if !take(&mut bucket, rate.load(Ordering::Relaxed), Instant::now()) {
                metrics.flow_event_suppressed();
                continue;
            }
            let tenants = tenants.read().unwrap();
            tracing::warn!(
                target: "bulkhead::cross_tenant",
                src_tenant = %tenants.label(ev.src_tenant),
                dst_tenant = %tenants.label(ev.dst_tenant),
                action = if ev.action == MODE_ENFORCE { "enforce" } else { "alert" },
                src = %socket_addr(ev.family, ev.src_addr, ev.src_port),
                dst = %socket_addr(ev.family, ev.dst_addr, ev.dst_port),
                cgroup_id = ev.cgroup_id,
                cookie = ev.cookie,
                "cross-tenant flow"
            );
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn endpoints_become_map_entries() {
        let config = Config::parse(
            "[[tenants]]\nname = \"a\"\n[[tenants]]\nname = \"b\"\n\
             [[cross_tenant.endpoints]]\ntenant = \"b\"\naddress = \"10.1.2.3\"\nport = 6333\n\
             [[cross_tenant.endpoints]]\ntenant = \"a\"\naddress = \"fd00::1\"\nmode = \"enforce\"\n",
            "t",
        )
        .unwrap();
        let (tenants, _) =
            TenantRegistry::assign(&["a".to_string(), "b".to_string()], &[]).unwrap();
        let e = endpoint_entries(&config, &tenants).unwrap();
        assert_eq!(e[0].0.family, AF_INET);
        assert_eq!(e[0].0.port, 6333);
        assert_eq!(&e[0].0.addr[..4], &[10, 1, 2, 3]);
        assert_eq!(&e[0].0.addr[4..], &[0; 12]);
        assert_eq!(
            e[0].1,
            EndpointValue {
                tenant_id: 2,
                mode: MODE_ALERT
            }
        );
        assert_eq!(e[1].0.family, AF_INET6);
        assert_eq!(e[1].0.port, 0, "no port: every port");
        assert_eq!(e[1].0.addr, "fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(
            e[1].1,
            EndpointValue {
                tenant_id: 1,
                mode: MODE_ENFORCE
            }
        );
    }

    #[test]
    fn events_decode_from_the_kernel_layout() {
        let ev = FlowEvent {
            cookie: 7,
            cgroup_id: 9,
            src_tenant: 1,
            dst_tenant: 2,
            action: MODE_ENFORCE,
            family: AF_INET,
            src_port: 40000,
            dst_port: 443,
            src_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst_addr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        let mut bytes = Vec::new();
        for v in [ev.cookie, ev.cgroup_id] {
            bytes.extend(v.to_ne_bytes());
        }
        for v in [
            ev.src_tenant,
            ev.dst_tenant,
            ev.action,
            ev.family,
            ev.src_port,
            ev.dst_port,
        ] {
            bytes.extend(v.to_ne_bytes());
        }
        bytes.extend(ev.src_addr);
        bytes.extend(ev.dst_addr);
        assert_eq!(bytes.len(), std::mem::size_of::<FlowEvent>());
        assert_eq!(decode(&bytes), Some(ev));
        assert_eq!(decode(&bytes[..10]), None);
        assert_eq!(
            socket_addr(ev.family, ev.dst_addr, ev.dst_port).to_string(),
            "10.0.0.2:443"
        );
    }

    #[test]
    fn the_bucket_limits_the_rate() {
        let mut b = TokenBucket::full(3.0, 3.0);
        let taken = (0..100).filter(|_| take(&mut b, 3, Instant::now())).count();
        assert!((3..=4).contains(&taken), "{taken}");
        // A lower rate cuts the burst at once; a pause refills at the rate.
        let t0 = Instant::now() + Duration::from_secs(10);
        assert!(take(&mut b, 1, t0));
        assert!(!take(&mut b, 1, t0));
        assert!(take(&mut b, 1, t0 + Duration::from_secs(1)));
    }
}
