//! The injected readings script NVML's answers for each sharing mode; each test checks the
//! split exactly, and [`sums`] that each GPU's series add up to its device's busy seconds and
//! energy delta (nothing counted twice, nothing lost).

use super::*;
use crate::gpu::{GpuProcess, MigInstance};

const S: u64 = 1_000_000; // µs

fn roles(pid: u32) -> Option<Role> {
    match pid {
        100 => Some(Role::Dedicated("acme".into())),
        101 => Some(Role::Dedicated("globex".into())),
        200 => Some(Role::Shared("server".into())),
        900 => Some(Role::MpsServer),
        _ => None,
    }
}

/// `n` device samples of `sm` % evenly in (from, to].
fn busy(from: u64, to: u64, n: u64, sm: u32) -> Vec<UtilSample> {
    (1..=n)
        .map(|i| UtilSample {
            ts_us: from + (to - from) * i / n,
            sm,
        })
        .collect()
}

/// `pid`'s samples of `sm` % at the first `k` of `n` device sample times in (from, to].
fn proc(pid: u32, from: u64, to: u64, n: u64, k: u64, sm: u32) -> Vec<ProcSample> {
    (1..=k)
        .map(|i| ProcSample {
            pid,
            ts_us: from + (to - from) * i / n,
            sm,
            mem: 0,
        })
        .collect()
}

fn gpu(index: u32, ts: u64, energy_mj: Option<u64>) -> GpuSnapshot {
    GpuSnapshot {
        index,
        uuid: format!("GPU-{index}"),
        total_bytes: 80 << 30,
        timestamp_us: Some(ts),
        energy_mj,
        ..Default::default()
    }
}

/// The processes NVML lists on a GPU (memory not known).
fn listed(pids: &[u32]) -> Vec<GpuProcess> {
    pids.iter()
        .map(|&pid| GpuProcess {
            pid,
            used_bytes: None,
        })
        .collect()
}

fn poll(a: &mut Accountant, gpus: &[GpuSnapshot], tokens: &mut TokenMix) {
    a.poll(gpus, &roles, tokens, Duration::from_secs(60));
}

fn busy_of(t: &ComputeTotals, gpu: &str, tenant: &str) -> f64 {
    t.busy
        .get(&(gpu.to_string(), tenant.to_string()))
        .copied()
        .unwrap_or(0.0)
}

fn energy_of(t: &ComputeTotals, gpu: &str, tenant: &str) -> f64 {
    t.energy
        .get(&(gpu.to_string(), tenant.to_string()))
        .copied()
        .unwrap_or(0.0)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Each unit's tenants sum to its device busy seconds; each physical GPU's energy series
/// (`gpu` and the MIG instances in `units`) sum to its energy delta.
fn sums(t: &ComputeTotals, gpu: &str, units: &[&str]) {
    let units: Vec<&str> = if units.is_empty() {
        vec![gpu]
    } else {
        units.to_vec()
    };
    for u in &units {
        let tenants: f64 = t
            .busy
            .iter()
            .filter(|((g, _), _)| g == u)
            .map(|(_, v)| v)
            .sum();
        let device = t.device_busy.get(*u).copied().unwrap_or(0.0);
        assert!(
            close(tenants, device),
            "{u}: tenants {tenants} device {device}"
        );
        let reasons: f64 = t
            .unattributed
            .iter()
            .filter(|((g, _), _)| g == u)
            .map(|(_, v)| v)
            .sum();
        assert!(
            close(reasons, busy_of(t, u, UNATTRIBUTED)),
            "{u}: reasons {reasons}"
        );
    }
    let labels: Vec<&str> = units.iter().copied().chain([gpu]).collect();
    let energy: f64 = t
        .energy
        .iter()
        .filter(|((g, _), _)| labels.contains(&g.as_str()))
        .map(|(_, v)| v)
        .sum();
    let device = t.device_energy.get(gpu).copied().unwrap_or(0.0);
    assert!(
        close(energy, device),
        "{gpu}: energy {energy} device {device}"
    );
}

#[test]
fn two_time_sliced_processes_each_get_their_own_samples() {
    let mut a = Accountant::default();
    let mut tok = TokenMix::default();
    let mut g = gpu(0, S, Some(1_000_000));
    g.processes = listed(&[100, 101]);
    g.busy_samples = busy(0, S, 6, 100);
    g.process_samples = proc(100, 0, S, 6, 6, 100);
    poll(&mut a, &[g.clone()], &mut tok);
    assert!(a.totals.busy.is_empty(), "the first poll is the baseline");
    // 2 s later: 12 periods, 9 busy; acme busy in 6, globex in 3. NVML's older samples are
    // read again (a file source repeats them): they must not count twice.
    g.timestamp_us = Some(3 * S);
    g.energy_mj = Some(1_600_000);
    let mut dev = busy(S, 3 * S, 12, 100);
    for s in dev.iter_mut().skip(9) {
        s.sm = 0;
    }
    g.busy_samples.extend(dev);
    g.process_samples.extend(proc(100, S, 3 * S, 12, 6, 100));
    g.process_samples
        .extend(proc(101, S, 3 * S, 12, 9, 100).into_iter().skip(6));
    poll(&mut a, &[g], &mut tok);
    let t = &a.totals;
    assert_eq!(t.device_busy["0"], 1.5);
    assert_eq!(busy_of(t, "0", "acme"), 1.0);
    assert_eq!(busy_of(t, "0", "globex"), 0.5);
    assert_eq!(busy_of(t, "0", UNATTRIBUTED), 0.0);
    assert_eq!(t.device_energy["0"], 600.0);
    assert_eq!(energy_of(t, "0", "acme"), 300.0, "600 J x 1 s / 2 s");
    assert_eq!(energy_of(t, "0", "globex"), 150.0);
    assert_eq!(energy_of(t, "0", UNATTRIBUTED), 150.0, "idle half a second");
    assert_eq!(t.sharing["0"], "time_slicing");
    sums(t, "0", &[]);
}

#[test]
fn mps_clients_reported_by_pid_share_the_device_and_the_server_is_not_counted_again() {
    let mut a = Accountant::default();
    let mut tok = TokenMix::default();
    let mut g = gpu(0, S, Some(0));
    poll(&mut a, &[g.clone()], &mut tok);
    g.timestamp_us = Some(2 * S);
    g.energy_mj = Some(500_000);
    g.busy_samples = busy(S, 2 * S, 10, 100);
    // Two clients at 60 % each (their kernels overlap under MPS) and the server at 100 %.
    g.process_samples = [
        proc(100, S, 2 * S, 10, 10, 60),
        proc(101, S, 2 * S, 10, 10, 60),
        proc(900, S, 2 * S, 10, 10, 100),
    ]
    .concat();
    poll(&mut a, &[g], &mut tok);
    let t = &a.totals;
    assert_eq!(t.device_busy["0"], 1.0);
    assert!(close(busy_of(t, "0", "acme"), 0.5), "{t:?}");
    assert!(close(busy_of(t, "0", "globex"), 0.5));
    assert_eq!(
        busy_of(t, "0", UNATTRIBUTED),
        0.0,
        "the server's samples are dropped"
    );
    assert!(close(energy_of(t, "0", "acme"), 250.0));
    assert_eq!(t.sharing["0"], "mps");
    sums(t, "0", &[]);
}

#[test]
fn mps_reporting_only_its_server_is_unattributed_with_the_reason() {
    let mut a = Accountant::default();
    let mut tok = TokenMix::default();
    let mut g = gpu(0, S, Some(0));
    g.processes = listed(&[100, 101]);
    poll(&mut a, &[g.clone()], &mut tok);
    g.timestamp_us = Some(2 * S);
    g.energy_mj = Some(300_000);
    g.busy_samples = busy(S, 2 * S, 10, 80);
    g.process_samples = proc(900, S, 2 * S, 10, 10, 80);
    poll(&mut a, &[g], &mut tok);
    let t = &a.totals;
    assert!(close(t.device_busy["0"], 0.8));
    assert_eq!(busy_of(t, "0", "acme") + busy_of(t, "0", "globex"), 0.0);
    assert!(close(busy_of(t, "0", UNATTRIBUTED), 0.8));
    assert!(close(t.unattributed[&("0".to_string(), REASON_MPS)], 0.8));
    assert!(close(energy_of(t, "0", UNATTRIBUTED), 300.0));
    assert_eq!(t.sharing["0"], "mps");
    sums(t, "0", &[]);
}

#[test]
fn two_mig_instances_are_their_own_gpus_and_share_the_parents_energy_by_slice() {
    let mut a = Accountant::default();
    let mut tok = TokenMix::default();
    let inst = |uuid: &str, gib: u64| MigInstance {
        uuid: uuid.into(),
        total_bytes: gib << 30,
        ..Default::default()
    };
    let mut g = gpu(0, S, Some(10_000));
    g.mig = vec![inst("MIG-a", 40), inst("MIG-b", 20)];
    poll(&mut a, &[g.clone()], &mut tok);
    g.timestamp_us = Some(2 * S);
    g.energy_mj = Some(410_000);
    g.mig[0].busy_samples = busy(S, 2 * S, 4, 100);
    g.mig[0].process_samples = proc(100, S, 2 * S, 4, 4, 100);
    g.mig[1].busy_samples = busy(S, 2 * S, 4, 50);
    g.mig[1].process_samples = proc(101, S, 2 * S, 4, 4, 50);
    poll(&mut a, &[g], &mut tok);
    let t = &a.totals;
    assert_eq!(busy_of(t, "MIG-a", "acme"), 1.0);
    assert_eq!(busy_of(t, "MIG-b", "globex"), 0.5);
    assert!(
        !t.device_busy.contains_key("0"),
        "busy time is counted on the instances only"
    );
    assert_eq!(
        energy_of(t, "MIG-a", "acme"),
        200.0,
        "400 J x half the GPU x 1 s / 1 s"
    );
    assert_eq!(
        energy_of(t, "MIG-b", "globex"),
        50.0,
        "400 J x a quarter x 0.5 s / 1 s"
    );
    assert_eq!(energy_of(t, "0", UNATTRIBUTED), 150.0);
    assert_eq!(t.sharing["MIG-a"], "mig");
    sums(t, "0", &["MIG-a", "MIG-b"]);
}

#[test]
fn a_process_that_moves_is_counted_where_its_samples_are_and_once() {
    let mut a = Accountant::default();
    let mut tok = TokenMix::default();
    let g0 = gpu(0, S, None);
    let g1 = gpu(1, S, None);
    poll(&mut a, &[g0.clone(), g1.clone()], &mut tok);
    // Second 1-2: on GPU 0. Second 2-3: on GPU 1 (GPU 0 still lists its old samples).
    let (mut g0, mut g1) = (g0, g1);
    for g in [&mut g0, &mut g1] {
        g.timestamp_us = Some(2 * S);
        g.busy_samples = busy(S, 2 * S, 5, 0);
    }
    g0.busy_samples = busy(S, 2 * S, 5, 100);
    g0.process_samples = proc(100, S, 2 * S, 5, 5, 100);
    poll(&mut a, &[g0.clone(), g1.clone()], &mut tok);
    for g in [&mut g0, &mut g1] {
        g.timestamp_us = Some(3 * S);
    }
    g0.busy_samples.extend(busy(2 * S, 3 * S, 5, 0));
    g1.busy_samples.extend(busy(2 * S, 3 * S, 5, 100));
    g1.process_samples = proc(100, 2 * S, 3 * S, 5, 5, 100);
    poll(&mut a, &[g0, g1], &mut tok);
    let t = &a.totals;
    assert_eq!(busy_of(t, "0", "acme"), 1.0);
    assert_eq!(busy_of(t, "1", "acme"), 1.0);
    assert_eq!(t.device_busy["0"] + t.device_busy["1"], 2.0);
    sums(t, "0", &[]);
    sums(t, "1", &[]);
}

#[test]
fn energy_counters_that_wrap_or_reset_are_counted_once_and_flagged() {
    let mut a = Accountant::default();
    let mut tok = TokenMix::default();
    let step = |a: &mut Accountant, tok: &mut TokenMix, k: u64, energy: u64| {
        let mut g = gpu(0, k * S, Some(energy));
        g.busy_samples = busy((k - 1) * S, k * S, 4, 100);
        g.process_samples = proc(100, (k - 1) * S, k * S, 4, 4, 100);
        poll(a, &[g], tok);
    };
    step(&mut a, &mut tok, 1, u64::MAX - 99_999);
    // 64-bit wrap: 100 J before the top, 200 J after.
    step(&mut a, &mut tok, 2, 200_000);
    assert_eq!(a.totals.device_energy["0"], 300.0);
    // Driver reload: the counter starts again from 0; 50 J since.
    step(&mut a, &mut tok, 3, 50_000);
    assert_eq!(a.totals.device_energy["0"], 350.0);
    // A 32-bit counter wrapping.
    step(&mut a, &mut tok, 4, (1 << 32) - 1_000);
    step(&mut a, &mut tok, 5, 2_000);
    let t = &a.totals;
    let big = ((1u64 << 32) - 1_000 - 50_000) as f64 / 1000.0;
    // Step 4 is a jump of ~4.3 MJ in 1 s: more than any GPU draws, so not counted.
    assert_eq!(t.device_energy["0"], 350.0 + 3.0, "{big} J skipped");
    assert_eq!(t.resets[&("0".to_string(), "energy")], 4);
    assert_eq!(energy_of(t, "0", "acme"), 353.0, "busy all along");
    assert_eq!(t.device_busy["0"], 4.0);
    sums(t, "0", &[]);
    // The same reading again counts nothing and is no reset.
    let before = t.clone();
    let mut same = gpu(0, 5 * S, Some(2_000));
    same.busy_samples = busy(4 * S, 5 * S, 4, 100);
    poll(&mut a, &[same], &mut tok);
    assert_eq!(a.totals, before);
    // A clock that goes back restarts the interval without counting anything.
    let mut g = gpu(0, 4 * S, Some(3_000));
    g.busy_samples = busy(3 * S, 4 * S, 4, 100);
    poll(&mut a, &[g], &mut tok);
    assert_eq!(a.totals.busy, before.busy);
    assert_eq!(a.totals.resets[&("0".to_string(), "clock")], 1);
}

#[test]
fn counter_deltas() {
    assert_eq!(counter_delta(10, 15, 100), Delta::Normal(5));
    assert_eq!(counter_delta(10, 500, 100), Delta::Skipped);
    assert_eq!(counter_delta(u64::MAX, 4, 100), Delta::Wrapped(5));
    assert_eq!(counter_delta(u32::MAX as u64, 4, 100), Delta::Wrapped(5));
    assert_eq!(counter_delta(1_000, 40, 100), Delta::Reset(40));
    assert_eq!(counter_delta(1_000, 400, 100), Delta::Skipped);
}

#[test]
fn a_shared_servers_time_is_split_by_its_sidecars_weighted_tokens() {
    let mut a = Accountant::default();
    let mut tok = TokenMix::default();
    let at = |k: u64| {
        // The server is tensor-parallel over GPUs 0 and 1, busy all the time on both.
        [0, 1].map(|i| {
            let mut g = gpu(i, k * S, Some(k * 100_000));
            g.busy_samples = busy((k - 1) * S, k * S, 4, 100);
            g.process_samples = proc(200, (k - 1) * S, k * S, 4, 4, 100);
            g
        })
    };
    poll(&mut a, &at(1), &mut tok);
    // No report yet: the server's time is "shared".
    poll(&mut a, &at(2), &mut tok);
    assert_eq!(busy_of(&a.totals, "0", SHARED), 1.0);
    // Two reports before the next poll: their tokens add up (acme 300, globex 100).
    tok.record(
        "server",
        &BTreeMap::from([("acme".into(), 200), ("globex".into(), 100)]),
    );
    tok.record("server", &BTreeMap::from([("acme".into(), 100)]));
    poll(&mut a, &at(3), &mut tok);
    for gpu in ["0", "1"] {
        assert_eq!(
            busy_of(&a.totals, gpu, "acme"),
            0.75,
            "the same mix on both shards"
        );
        assert_eq!(busy_of(&a.totals, gpu, "globex"), 0.25);
        assert_eq!(energy_of(&a.totals, gpu, "acme"), 75.0);
    }
    // No new tokens: the last mix goes on.
    poll(&mut a, &at(4), &mut tok);
    assert_eq!(busy_of(&a.totals, "0", "acme"), 1.5);
    // A report of new tokens replaces it.
    tok.record("server", &BTreeMap::from([("globex".into(), 50)]));
    poll(&mut a, &at(5), &mut tok);
    assert_eq!(busy_of(&a.totals, "0", "globex"), 0.5 + 1.0);
    assert_eq!(busy_of(&a.totals, "0", "acme"), 1.5);
    sums(&a.totals, "0", &[]);
    sums(&a.totals, "1", &[]);
}

#[test]
fn tokens_reported_while_the_server_was_idle_split_its_next_busy_time() {
    let mut a = Accountant::default();
    let mut tok = TokenMix::default();
    let at = |k: u64, sm: u32| {
        let mut g = gpu(0, k * S, None);
        g.busy_samples = busy((k - 1) * S, k * S, 4, sm);
        if sm > 0 {
            g.process_samples = proc(200, (k - 1) * S, k * S, 4, 4, sm);
        }
        [g]
    };
    poll(&mut a, &at(1, 0), &mut tok);
    tok.record("server", &BTreeMap::from([("acme".into(), 30)]));
    poll(&mut a, &at(2, 0), &mut tok);
    tok.record("server", &BTreeMap::from([("globex".into(), 10)]));
    poll(&mut a, &at(3, 0), &mut tok);
    poll(&mut a, &at(4, 100), &mut tok);
    assert_eq!(
        busy_of(&a.totals, "0", "acme"),
        0.75,
        "all tokens since the last split"
    );
    assert_eq!(busy_of(&a.totals, "0", "globex"), 0.25);
}

#[test]
fn unknown_processes_and_busy_time_without_samples_are_unattributed_by_reason() {
    let mut a = Accountant::default();
    let mut tok = TokenMix::default();
    let mut g = gpu(0, S, None);
    poll(&mut a, &[g.clone()], &mut tok);
    g.timestamp_us = Some(2 * S);
    g.busy_samples = busy(S, 2 * S, 4, 100);
    g.process_samples = [
        proc(100, S, 2 * S, 4, 1, 100),
        proc(777, S, 2 * S, 4, 2, 100),
    ]
    .concat();
    poll(&mut a, &[g], &mut tok);
    let t = &a.totals;
    assert_eq!(busy_of(t, "0", "acme"), 0.25);
    assert_eq!(t.unattributed[&("0".to_string(), REASON_UNKNOWN)], 0.5);
    assert_eq!(t.unattributed[&("0".to_string(), REASON_NO_SAMPLES)], 0.25);
    assert_eq!(busy_of(t, "0", UNATTRIBUTED), 0.75);
    sums(t, "0", &[]);
}
