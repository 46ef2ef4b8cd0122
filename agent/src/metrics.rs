//! Prometheus metrics. Kernel counters are read from the maps at scrape time (a collector), so
//! a scrape always sees the kernel's current totals and nothing polls in between.

use crate::datapath::Maps;
use crate::tenants::TenantRegistry;
use agent_common::{
    DIAG_BAD_TAG, DIAG_FLOW_EVENTS_LOST, DIAG_NO_SOCKET, DIAG_RELEASED_TAGS, DIRECTION_EGRESS,
    DIRECTION_INGRESS, MAP_SOCK_TAGS, MAP_TENANT_IDS, MODE_ENFORCE, TENANT_IDS_MAX_ENTRIES,
    TrafficCounters,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use std::sync::{Arc, RwLock};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TagLabels {
    pub op: &'static str,
    pub result: &'static str,
}

/// The agent's own (non-kernel) metrics.
#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    tag_requests: Family<TagLabels, Counter>,
    up: Gauge,
    flow_events_suppressed: Counter,
    reloads: Family<ResultLabels, Counter>,
    tagging_connections: Gauge,
    tagging_refused: Counter,
    tagging_idle_closed: Counter,
    accept_errors: Family<AcceptErrorLabels, Counter>,
    otlp_exports: Family<ResultLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcceptErrorLabels {
    pub listener: &'static str,
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

impl AgentMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "bulkhead_telemetry_metric_exports",
            "OTLP exports of these metrics ([telemetry.otlp]), by result (ok, failed, timeout)",
            m.otlp_exports.clone(),
        );
        registry.register(
            "bulkhead_tag_requests",
            "Tagging API requests, by operation and result (ok or the error code)",
            m.tag_requests.clone(),
        );
        registry.register(
            "bulkhead_agent_up",
            "1 while the agent runs with its eBPF programs attached",
            m.up.clone(),
        );
        registry.register(
            "bulkhead_cross_tenant_events_suppressed",
            "Cross-tenant flow events not logged because of the log rate limit (the flows are still counted)",
            m.flow_events_suppressed.clone(),
        );
        registry.register(
            "bulkhead_config_reloads",
            "Configuration reloads (SIGHUP), by result: ok, or invalid (the old config stays)",
            m.reloads.clone(),
        );
        registry.register(
            "bulkhead_tagging_connections",
            "Connections to the tagging socket being served now",
            m.tagging_connections.clone(),
        );
        registry.register(
            "bulkhead_tagging_connections_refused",
            "Connections to the tagging socket closed at once because tagging.max_connections were open",
            m.tagging_refused.clone(),
        );
        registry.register(
            "bulkhead_tagging_connections_idle_closed",
            "Tagging connections closed after tagging.idle_timeout_ms without a request (or without taking an answer)",
            m.tagging_idle_closed.clone(),
        );
        registry.register(
            "bulkhead_accept_errors",
            "Failed accepts, by listener (tagging, admin) and error (EMFILE, ENFILE, ENOBUFS, ENOMEM: backed off; other)",
            m.accept_errors.clone(),
        );
        m
    }

    pub fn tagging_connections(&self, open: usize) {
        self.tagging_connections.set(open as i64);
    }

    pub fn tagging_connection_refused(&self) {
        self.tagging_refused.inc();
    }

    pub fn tagging_idle_closed(&self) {
        self.tagging_idle_closed.inc();
    }

    pub fn accept_error(&self, listener: &'static str, error: &'static str) {
        self.accept_errors
            .get_or_create(&AcceptErrorLabels { listener, error })
            .inc();
    }

    /// The export results' series, at zero (once OTLP export is configured).
    pub fn otlp_exports_init(&self) {
        for result in ["ok", "failed", "timeout"] {
            let _ = self.otlp_exports.get_or_create(&ResultLabels { result });
        }
    }

    pub fn otlp_export(&self, result: &'static str) {
        self.otlp_exports
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn flow_event_suppressed(&self) {
        self.flow_events_suppressed.inc();
    }

    pub fn reload(&self, result: agent_common::ReloadResult) {
        self.reloads
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .inc();
    }

    pub fn tag_request(&self, op: &'static str, result: &'static str) {
        self.tag_requests
            .get_or_create(&TagLabels { op, result })
            .inc();
    }

    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TrafficLabels {
    tenant: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    src_tenant: String,
    dst_tenant: String,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

/// Reads the kernel maps on each scrape.
#[derive(Debug)]
pub struct DatapathCollector {
    pub maps: Arc<Maps>,
    pub tenants: Arc<RwLock<TenantRegistry>>,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Every id with a name (configured or retired) and the untagged bucket.
        let tenants = self.tenants.read().unwrap();
        let mut traffic: Vec<(TrafficLabels, TrafficCounters)> = Vec::new();
        let labelled = tenants.labelled_ids();
        // Every labelled id but the untagged bucket has a BH_TENANT_IDS entry.
        let tenant_ids = labelled.len() - 1;
        for (id, name) in labelled {
            for (direction, label) in [(DIRECTION_INGRESS, "ingress"), (DIRECTION_EGRESS, "egress")]
            {
                match self.maps.traffic(id, direction) {
                    Ok(c) => traffic.push((
                        TrafficLabels {
                            tenant: name.clone(),
                            direction: label,
                        },
                        c,
                    )),
                    Err(e) => {
                        tracing::warn!(error = %e, tenant = %name, "reading the traffic map failed")
                    }
                }
            }
        }
        let flows: Vec<(FlowLabels, u64)> = match self.maps.flows() {
            Ok(f) => f
                .into_iter()
                .map(|(k, n)| {
                    let labels = FlowLabels {
                        src_tenant: tenants.label(k.src_tenant),
                        dst_tenant: tenants.label(k.dst_tenant),
                        action: if k.action == MODE_ENFORCE {
                            "enforce"
                        } else {
                            "alert"
                        },
                    };
                    (labels, n)
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading the flow map failed");
                Vec::new()
            }
        };
        let tag_counts: Vec<(TenantLabels, u64)> = match self.maps.tag_counts() {
            Ok(c) => c
                .into_iter()
                .map(|(id, n)| {
                    (
                        TenantLabels {
                            tenant: tenants.label(id),
                        },
                        n,
                    )
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading the tag counts failed");
                Vec::new()
            }
        };
        drop(tenants);
        let tagged_total: u64 = tag_counts.iter().map(|(_, n)| n).sum();
        let mut tagged = encoder.encode_descriptor(
            "bulkhead_tagged_sockets",
            "Open sockets carrying the tenant's tag (tags set by the agent minus tagged sockets closed)",
            None,
            MetricType::Gauge,
        )?;
        for (labels, n) in &tag_counts {
            ConstGauge::new(*n as i64).encode(tagged.encode_family(labels)?)?;
        }
        let mut flow_family = encoder.encode_descriptor(
            "bulkhead_cross_tenant_flows",
            "Cross-tenant flows: a socket of src_tenant (or an untagged socket of a must-tag cgroup, src_tenant=\"untagged\") sending to an endpoint dst_tenant owns; counted once per socket, destination and minute; action=enforce flows were dropped",
            None,
            MetricType::Counter,
        )?;
        for (labels, n) in &flows {
            ConstCounter::new(*n).encode(flow_family.encode_family(labels)?)?;
        }
        let mut bytes = encoder.encode_descriptor(
            "bulkhead_network_bytes",
            "Bytes of the tenant's sockets seen by the cgroup hooks (from the IP header on); tenant=\"untagged\" for untagged sockets",
            None,
            MetricType::Counter,
        )?;
        for (labels, c) in &traffic {
            ConstCounter::new(c.bytes).encode(bytes.encode_family(labels)?)?;
        }
        let mut packets = encoder.encode_descriptor(
            "bulkhead_network_packets",
            "Packets (socket buffers) of the tenant's sockets seen by the cgroup hooks",
            None,
            MetricType::Counter,
        )?;
        for (labels, c) in &traffic {
            ConstCounter::new(c.packets).encode(packets.encode_family(labels)?)?;
        }

        // Socket storage has no capacity: a tag lives on its socket.
        let entries_of = [
            (MAP_SOCK_TAGS, tagged_total),
            (MAP_TENANT_IDS, tenant_ids as u64),
        ];
        let fill = [(MAP_TENANT_IDS, tenant_ids, TENANT_IDS_MAX_ENTRIES - 1)];
        let mut entries = encoder.encode_descriptor(
            "bulkhead_map_entries",
            "Entries in the agent's eBPF maps (BH_SOCK_TAGS: tagged sockets)",
            None,
            MetricType::Gauge,
        )?;
        for (map, n) in entries_of {
            ConstGauge::new(n as i64).encode(entries.encode_family(&MapLabels { map })?)?;
        }
        let mut capacity = encoder.encode_descriptor(
            "bulkhead_map_capacity",
            "Maximum entries of the agent's fixed-size eBPF maps",
            None,
            MetricType::Gauge,
        )?;
        for (map, _, max) in fill {
            ConstGauge::new(i64::from(max)).encode(capacity.encode_family(&MapLabels { map })?)?;
        }
        let mut ratio = encoder.encode_descriptor(
            "bulkhead_map_fill_ratio",
            "Entries over capacity of the agent's fixed-size eBPF maps (0-1)",
            None,
            MetricType::Gauge,
        )?;
        for (map, n, max) in fill {
            ConstGauge::new(n as f64 / f64::from(max))
                .encode(ratio.encode_family(&MapLabels { map })?)?;
        }

        if let Ok(diag) = self.maps.diag() {
            let mut events = encoder.encode_descriptor(
                "bulkhead_kernel_events",
                "Events seen by the kernel programs: bad_tag (a tag with an out-of-range tenant id, counted as untagged), no_socket (packets without a socket, counted as untagged), tag_released (tagged sockets closed), flow_event_lost (cross-tenant flow events lost to a full ring buffer; the flows are still counted)",
                None,
                MetricType::Counter,
            )?;
            for (event, slot) in [
                ("bad_tag", DIAG_BAD_TAG),
                ("flow_event_lost", DIAG_FLOW_EVENTS_LOST),
                ("no_socket", DIAG_NO_SOCKET),
                ("tag_released", DIAG_RELEASED_TAGS),
            ] {
                ConstCounter::new(diag[slot as usize])
                    .encode(events.encode_family(&EventLabels { event })?)?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    gpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuTenantLabels {
    tenant: String,
    gpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuReasonLabels {
    gpu: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuCounterLabels {
    gpu: String,
    counter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuModeLabels {
    gpu: String,
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuInfoLabels {
    gpu: String,
    uuid: String,
}

/// GPU memory per tenant, from the poller's last report.
pub struct GpuCollector {
    pub state: Arc<crate::gpu::GpuState>,
    /// False with `gpu.source = "off"`: then nothing GPU-related is exported.
    pub enabled: bool,
}

impl std::fmt::Debug for GpuCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GpuCollector")
    }
}

impl Collector for GpuCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if !self.enabled {
            return Ok(());
        }
        let report = self.state.report.read().unwrap().clone();
        let up = encoder.encode_descriptor(
            "bulkhead_nvml_up",
            "1 when the last GPU poll succeeded (NVML loaded and answering), else 0",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(report.nvml_up)).encode(up)?;
        let garbled = encoder.encode_descriptor(
            "bulkhead_nvml_garbled_entries",
            "GPU process entries dropped as garbled (PID 0, more memory than the GPU, a PID twice)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(report.garbled_total).encode(garbled)?;
        let polls = encoder.encode_descriptor(
            "bulkhead_gpu_polls",
            "GPU source polls since the agent started, failed ones included",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(report.polls_total).encode(polls)?;
        let mut info = encoder.encode_descriptor(
            "bulkhead_gpu_info",
            "One series per GPU, labelled with its UUID",
            None,
            MetricType::Gauge,
        )?;
        for g in &report.gpus {
            ConstGauge::new(1).encode(info.encode_family(&GpuInfoLabels {
                gpu: g.gpu.clone(),
                uuid: g.uuid.clone(),
            })?)?;
        }
        let mut total = encoder.encode_descriptor(
            "bulkhead_gpu_memory_total_bytes",
            "Memory of each GPU",
            None,
            MetricType::Gauge,
        )?;
        for g in &report.gpus {
            ConstGauge::new(g.total_bytes as i64)
                .encode(total.encode_family(&GpuLabels { gpu: g.gpu.clone() })?)?;
        }
        let mut memory = encoder.encode_descriptor(
            "bulkhead_gpu_memory_bytes",
            "Used GPU memory by tenant: a dedicated pod's processes, a tenant's KV cache in a shared server; tenant=\"shared\" for the rest of a shared server (weights, free KV pool), tenant=\"unattributed\" for unknown processes and driver memory",
            None,
            MetricType::Gauge,
        )?;
        for g in &report.gpus {
            for (tenant, bytes) in &g.memory {
                ConstGauge::new(*bytes as i64).encode(memory.encode_family(
                    &GpuTenantLabels {
                        tenant: tenant.clone(),
                        gpu: g.gpu.clone(),
                    },
                )?)?;
            }
        }
        let c = &report.compute;
        let tenant_gpu = |(gpu, tenant): &(String, String)| GpuTenantLabels {
            tenant: tenant.clone(),
            gpu: gpu.clone(),
        };
        let mut busy = encoder.encode_descriptor(
            "bulkhead_gpu_busy_seconds",
            "GPU busy time by tenant, from NVML's per-process samples (a shared server's split by its sidecar's weighted tokens, tenant=\"shared\" without them); tenant=\"unattributed\" for busy time no tenant's process accounts for. A GPU's series sum to bulkhead_gpu_device_busy_seconds_total; MIG instances are their own gpu",
            None,
            MetricType::Counter,
        )?;
        for (k, v) in &c.busy {
            ConstCounter::new(*v).encode(busy.encode_family(&tenant_gpu(k))?)?;
        }
        let mut energy = encoder.encode_descriptor(
            "bulkhead_gpu_energy_joules",
            "GPU energy by tenant: the device's energy counter split by busy time; idle power and unattributed busy time under tenant=\"unattributed\" on the physical GPU. A GPU's series (its MIG instances' included) sum to bulkhead_gpu_device_energy_joules_total",
            None,
            MetricType::Counter,
        )?;
        for (k, v) in &c.energy {
            ConstCounter::new(*v).encode(energy.encode_family(&tenant_gpu(k))?)?;
        }
        let mut device_busy = encoder.encode_descriptor(
            "bulkhead_gpu_device_busy_seconds",
            "Busy time of each GPU (or MIG instance), from its utilization samples",
            None,
            MetricType::Counter,
        )?;
        for (gpu, v) in &c.device_busy {
            ConstCounter::new(*v)
                .encode(device_busy.encode_family(&GpuLabels { gpu: gpu.clone() })?)?;
        }
        let mut device_energy = encoder.encode_descriptor(
            "bulkhead_gpu_device_energy_joules",
            "Energy of each GPU, from its energy counter (wraps and driver reloads accounted)",
            None,
            MetricType::Counter,
        )?;
        for (gpu, v) in &c.device_energy {
            ConstCounter::new(*v)
                .encode(device_energy.encode_family(&GpuLabels { gpu: gpu.clone() })?)?;
        }
        let mut why = encoder.encode_descriptor(
            "bulkhead_gpu_unattributed_busy_seconds",
            "GPU busy time attributed to no tenant, by reason: unknown_process (a process of no configured workload), mps_server (the driver reports only the MPS server, not its clients), no_process_samples (busy time no process sample accounts for)",
            None,
            MetricType::Counter,
        )?;
        for ((gpu, reason), v) in &c.unattributed {
            ConstCounter::new(*v).encode(why.encode_family(&GpuReasonLabels {
                gpu: gpu.clone(),
                reason,
            })?)?;
        }
        let mut resets = encoder.encode_descriptor(
            "bulkhead_gpu_counter_resets",
            "GPU counters that went backwards or jumped: energy (a wrap, a driver reload, or an implausible step, not counted), clock (a reading older than the last)",
            None,
            MetricType::Counter,
        )?;
        for ((gpu, counter), n) in &c.resets {
            ConstCounter::new(*n).encode(resets.encode_family(&GpuCounterLabels {
                gpu: gpu.clone(),
                counter,
            })?)?;
        }
        let mut sharing = encoder.encode_descriptor(
            "bulkhead_gpu_sharing",
            "1 per GPU (or MIG instance) with how it is shared now: exclusive, time_slicing, mps, mig",
            None,
            MetricType::Gauge,
        )?;
        for (gpu, mode) in &c.sharing {
            ConstGauge::new(1).encode(sharing.encode_family(&GpuModeLabels {
                gpu: gpu.clone(),
                mode,
            })?)?;
        }
        let mut kv = encoder.encode_descriptor(
            "bulkhead_kv_cache_bytes",
            "KV-cache bytes each tenant holds in shared inference servers on the GPU, as their sidecars report",
            None,
            MetricType::Gauge,
        )?;
        for g in &report.gpus {
            for (tenant, bytes) in &g.kv_cache {
                ConstGauge::new(*bytes as i64).encode(kv.encode_family(&GpuTenantLabels {
                    tenant: tenant.clone(),
                    gpu: g.gpu.clone(),
                })?)?;
            }
        }
        Ok(())
    }
}
