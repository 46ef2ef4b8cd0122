use super::*;
use crate::cache::{FlushOutcome, derive_salt, judge_flush};
use crate::config::Flavor;
use crate::record::metrics::KindLabel;
use http::StatusCode;
use std::time::Duration;

fn settings(window_ms: u64, max: u32) -> GateSettings {
    GateSettings {
        exclusive: ["a".to_string()].into_iter().collect(),
        window: Duration::from_millis(window_ms),
        window_max_requests: max,
        flavor: Flavor::Vllm,
        upstream: "http://127.0.0.1:1".parse().unwrap(),
        flush_attempts: 1,
        flush_retry: Duration::ZERO,
        flush_timeout: Duration::from_secs(1),
        on_failure: FlushFailure::Fail,
        drain_timeout: Duration::from_secs(3600),
        flush_proves_idle: false,
        max_inflight: 64,
    }
}

/// A gate's state with a cache known to be clean (most tests start there).
fn state(window_ms: u64, max: u32) -> State {
    let mut st = State::new(settings(window_ms, max), Instant::now());
    st.dirty.clear();
    st
}

#[test]
fn the_cache_is_dirty_until_the_first_flush_after_start() {
    // What the upstream cached before the sidecar started is unknown: the first exclusive
    // request flushes; shared tenants need no flush for it.
    let mut st = State::new(settings(100, 100), Instant::now());
    let now = Instant::now();
    let b1 = arrive_at(&mut st, "b", now);
    assert_eq!(try_step(&mut st, b1, now), "enter");
    leave(&mut st, "b");
    let mut st = State::new(settings(100, 100), Instant::now());
    let a1 = arrive_at(&mut st, "a", now);
    assert_eq!(try_step(&mut st, a1, now), "flush");
    assert_eq!(try_step(&mut st, a1, now), "enter");
}

fn arrive(st: &mut State, tenant: &str) -> u64 {
    arrive_at(st, tenant, Instant::now())
}

fn arrive_at(st: &mut State, tenant: &str, now: Instant) -> u64 {
    st.seq += 1;
    let exclusive = st.settings.exclusive.contains(tenant);
    st.waiting.insert(
        st.seq,
        Waiting {
            tenant: tenant.into(),
            exclusive,
            arrived: now,
        },
    );
    st.seq
}

/// A pass of `_tenant` ends (the gate counts passes, not whose they are).
fn leave(st: &mut State, _tenant: &str) {
    st.running_total -= 1;
}

/// What `ticket` may do now: "enter" (and enters), "flush" (and the flush succeeds),
/// "vouch" (a flush for a stalled drain, and it succeeds), "fail" (gives up: removed,
/// as its guard does) or "wait".
fn try_step(st: &mut State, ticket: u64, now: Instant) -> &'static str {
    match st.step(ticket, now) {
        Step::Enter => {
            st.enter(ticket, now);
            "enter"
        }
        Step::Flush { vouch: false } => {
            st.dirty.clear();
            "flush"
        }
        Step::Flush { vouch: true } => {
            st.dirty.clear();
            st.detach();
            "vouch"
        }
        Step::Fail(_) => {
            st.waiting.remove(&ticket);
            "fail"
        }
        Step::Wait(_) => "wait",
    }
}

#[test]
fn exclusive_window_is_bounded_by_time() {
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let mut st = state(2000, 100);
    // b (shared) ran before: a's window starts with a flush.
    let b0 = arrive(&mut st, "b");
    assert_eq!(try_step(&mut st, b0, t0), "enter");
    leave(&mut st, "b");
    let a1 = arrive(&mut st, "a");
    assert_eq!(try_step(&mut st, a1, t0), "flush");
    assert_eq!(try_step(&mut st, a1, t0), "enter");
    // b waits while a runs; a's queued requests join the window until it ends.
    let b1 = arrive(&mut st, "b");
    assert_eq!(try_step(&mut st, b1, ms(10)), "wait");
    let a2 = arrive(&mut st, "a");
    assert_eq!(try_step(&mut st, a2, ms(10)), "enter");
    let a3 = arrive(&mut st, "a");
    assert_eq!(try_step(&mut st, a3, ms(2001)), "wait", "window over");
    assert_eq!(try_step(&mut st, b1, ms(2001)), "wait", "a still runs");
    leave(&mut st, "a");
    leave(&mut st, "a");
    // Drained: flush, then b; a's next window waits for b.
    assert_eq!(try_step(&mut st, b1, ms(2002)), "flush");
    assert_eq!(try_step(&mut st, b1, ms(2002)), "enter");
    assert_eq!(try_step(&mut st, a3, ms(2003)), "wait");
    let b2 = arrive(&mut st, "b");
    assert_eq!(
        try_step(&mut st, b2, ms(2003)),
        "wait",
        "behind a's waiting request"
    );
    leave(&mut st, "b");
    assert_eq!(try_step(&mut st, a3, ms(2004)), "flush");
    assert_eq!(try_step(&mut st, a3, ms(2004)), "enter");
}

#[test]
fn exclusive_window_is_bounded_by_count() {
    let t0 = Instant::now();
    let mut st = state(60_000, 2);
    let a: Vec<u64> = (0..4).map(|_| arrive(&mut st, "a")).collect();
    let b = arrive(&mut st, "b");
    assert_eq!(try_step(&mut st, a[0], t0), "enter");
    assert_eq!(try_step(&mut st, a[1], t0), "enter");
    assert_eq!(
        try_step(&mut st, a[2], t0),
        "wait",
        "two per window while b waits"
    );
    leave(&mut st, "a");
    leave(&mut st, "a");
    assert_eq!(try_step(&mut st, a[2], t0), "wait");
    assert_eq!(try_step(&mut st, b, t0), "flush");
    assert_eq!(try_step(&mut st, b, t0), "enter");
    leave(&mut st, "b");
    assert_eq!(try_step(&mut st, a[2], t0), "flush");
    assert_eq!(try_step(&mut st, a[2], t0), "enter");
    // Nobody else waits: a's window renews instead of ending.
    assert_eq!(try_step(&mut st, a[3], t0), "enter");
    let a5 = arrive(&mut st, "a");
    assert_eq!(try_step(&mut st, a5, t0), "enter");
    assert_eq!(st.running_total, 3);
}

#[test]
fn an_exclusive_request_gives_up_on_a_drain_that_does_not_end() {
    let mut st = state(2000, 100);
    st.settings.drain_timeout = Duration::from_millis(500);
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let b0 = arrive_at(&mut st, "b", t0);
    assert_eq!(try_step(&mut st, b0, t0), "enter");
    // a waits for b's request; b's newer request waits behind a.
    let a1 = arrive_at(&mut st, "a", t0);
    assert_eq!(try_step(&mut st, a1, t0), "wait");
    let b1 = arrive_at(&mut st, "b", ms(10));
    assert_eq!(try_step(&mut st, b1, ms(10)), "wait");
    assert!(matches!(st.step(a1, ms(10)), Step::Wait(Some(w)) if w == ms(500)));
    assert_eq!(try_step(&mut st, a1, ms(499)), "wait");
    // b0 never ends: a fails at the bound, and b1 goes at once.
    assert_eq!(try_step(&mut st, a1, ms(500)), "fail");
    assert_eq!(try_step(&mut st, b1, ms(500)), "enter");
    // A later exclusive request starts a new drain of its own.
    let a2 = arrive_at(&mut st, "a", ms(600));
    assert_eq!(try_step(&mut st, a2, ms(1000)), "wait");
    leave(&mut st, "b");
    leave(&mut st, "b");
    assert_eq!(try_step(&mut st, a2, ms(1001)), "flush");
    assert_eq!(try_step(&mut st, a2, ms(1001)), "enter");
}

#[test]
fn a_closed_window_whose_requests_stall_refuses_others_unless_a_flush_vouches() {
    let mut st = state(100, 100);
    st.settings.drain_timeout = Duration::from_millis(500);
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let a1 = arrive_at(&mut st, "a", t0);
    assert_eq!(try_step(&mut st, a1, t0), "enter");
    // b arrives; a has nothing more waiting: the window closes and a's request drains.
    let b1 = arrive_at(&mut st, "b", ms(10));
    assert!(matches!(st.step(b1, ms(10)), Step::Wait(Some(w)) if w == ms(510)));
    assert_eq!(try_step(&mut st, b1, ms(509)), "wait");
    // It never ends. Without a flush that can prove the upstream idle: refused, and so is
    // every newcomer while it runs; nobody runs beside it.
    assert_eq!(try_step(&mut st, b1, ms(510)), "fail");
    let b2 = arrive_at(&mut st, "b", ms(600));
    assert_eq!(try_step(&mut st, b2, ms(600)), "fail");
    // Flushes the upstream refuses while busy, but a's passes fill the fair queue: one of
    // them may still be on its way to the upstream, so no flush can vouch.
    st.settings.flush_proves_idle = true;
    st.settings.max_inflight = 1;
    let b3 = arrive_at(&mut st, "b", ms(700));
    assert_eq!(try_step(&mut st, b3, ms(700)), "fail");
    // With a free slot, a confirmed flush retires a's pass and b runs.
    st.settings.max_inflight = 2;
    let b4 = arrive_at(&mut st, "b", ms(800));
    assert_eq!(try_step(&mut st, b4, ms(800)), "vouch");
    assert_eq!((st.running_total, st.detached), (0, 1));
    assert_eq!(try_step(&mut st, b4, ms(800)), "enter");
    // a's next window drains b only: a's retired pass does not hold it up.
    let a2 = arrive_at(&mut st, "a", ms(900));
    assert_eq!(try_step(&mut st, a2, ms(900)), "wait");
    leave(&mut st, "b");
    assert_eq!(try_step(&mut st, a2, ms(901)), "flush");
    assert_eq!(try_step(&mut st, a2, ms(901)), "enter");
}

#[test]
fn a_flush_vouches_only_while_the_passes_out_leave_a_fair_queue_slot_free() {
    let mut st = state(100, 100);
    st.settings.flush_proves_idle = true;
    st.settings.max_inflight = 2;
    st.running_total = 1;
    st.detached = 1;
    assert!(
        !st.may_vouch(),
        "a running and a retired pass fill both slots"
    );
    st.detached = 0;
    assert!(st.may_vouch());
    st.settings.flush_proves_idle = false;
    assert!(!st.may_vouch(), "an upstream whose flush proves nothing");
}

#[test]
fn an_exclusive_request_past_its_drain_bound_waits_on_while_nothing_runs() {
    let mut st = state(100, 100);
    st.settings.drain_timeout = Duration::from_millis(100);
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let b1 = arrive_at(&mut st, "b", t0);
    let a1 = arrive_at(&mut st, "a", t0);
    // Nothing runs and the older b is about to enter: there is no drain to give up on.
    assert_eq!(try_step(&mut st, a1, ms(200)), "wait");
    assert_eq!(try_step(&mut st, b1, ms(200)), "enter");
}

#[test]
fn after_a_failed_drain_the_shared_requests_waiting_behind_it_go_first() {
    let mut st = state(100, 100);
    st.settings.drain_timeout = Duration::from_millis(100);
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let b1 = arrive_at(&mut st, "b", t0);
    assert_eq!(try_step(&mut st, b1, t0), "enter");
    // b never ends; a waits for the drain, then another a, then c (shared) behind them.
    let a1 = arrive_at(&mut st, "a", ms(10));
    let _a2 = arrive_at(&mut st, "a", ms(20));
    let c1 = arrive_at(&mut st, "c", ms(30));
    assert_eq!(
        try_step(&mut st, c1, ms(30)),
        "wait",
        "behind the exclusive"
    );
    assert_eq!(try_step(&mut st, a1, ms(200)), "fail");
    // Everyone who waited behind the failed request goes, the newest included, before
    // the next exclusive request starts a drain of its own.
    assert_eq!(try_step(&mut st, c1, ms(200)), "enter");
}

#[test]
fn a_window_is_renewed_only_once_over() {
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let mut st = state(2000, 100);
    let a1 = arrive_at(&mut st, "a", t0);
    assert_eq!(try_step(&mut st, a1, t0), "enter");
    // More of a while its window lasts: the same window, not a new one.
    let a2 = arrive_at(&mut st, "a", ms(1000));
    assert_eq!(try_step(&mut st, a2, ms(1000)), "enter");
    // b comes once the window (from 0 ms) is over: a's next request waits.
    let _b1 = arrive_at(&mut st, "b", ms(2500));
    let a3 = arrive_at(&mut st, "a", ms(2500));
    assert_eq!(try_step(&mut st, a3, ms(2500)), "wait");
}

#[test]
fn an_over_window_nobody_else_wants_is_renewed_from_then() {
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let mut st = state(2000, 100);
    let a1 = arrive_at(&mut st, "a", t0);
    assert_eq!(try_step(&mut st, a1, t0), "enter");
    let a2 = arrive_at(&mut st, "a", ms(2500));
    assert_eq!(try_step(&mut st, a2, ms(2500)), "enter");
    // The new window runs from 2500 ms: at 3000 ms a's request still enters before b.
    let _b1 = arrive_at(&mut st, "b", ms(3000));
    let a3 = arrive_at(&mut st, "a", ms(3000));
    assert_eq!(try_step(&mut st, a3, ms(3000)), "enter");
}

#[test]
fn a_window_drain_bound_runs_from_the_close_and_restarts_on_reload() {
    let mut st = state(100, 100);
    st.settings.drain_timeout = Duration::from_millis(500);
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let a1 = arrive_at(&mut st, "a", t0);
    let a2 = arrive_at(&mut st, "a", t0);
    let b1 = arrive_at(&mut st, "b", t0);
    assert_eq!(try_step(&mut st, a1, t0), "enter");
    assert!(matches!(st.step(b1, ms(10)), Step::Wait(Some(w)) if w == ms(100)));
    // a2 joins the window while it lasts; it closes at 100 ms.
    assert_eq!(try_step(&mut st, a2, ms(90)), "enter");
    assert!(matches!(st.step(b1, ms(100)), Step::Wait(Some(w)) if w == ms(600)));
    // A reload (a larger fair queue may let queued passes through) starts it over.
    st.last_change = ms(300);
    assert_eq!(try_step(&mut st, b1, ms(600)), "wait");
    assert_eq!(try_step(&mut st, b1, ms(800)), "fail");
}

/// A gate whose flushes go to a simulator; `b` is shared, `a` exclusive.
async fn sim_gate(
    drain_ms: u64,
) -> (
    Arc<CacheGate>,
    bulkhead_sim::SimHandle,
    prometheus_client::registry::Registry,
) {
    let sim = bulkhead_sim::SimHandle::start(bulkhead_sim::SimConfig::default())
        .await
        .unwrap();
    let mut s = settings(50, 100);
    s.upstream = sim.url().parse().unwrap();
    s.drain_timeout = Duration::from_millis(drain_ms);
    s.flush_proves_idle = true;
    let mut registry = prometheus_client::registry::Registry::default();
    let gate = CacheGate::new(s, Metrics::register(&mut registry));
    // A cache known to be clean: the flush counts below are the tests' own.
    gate.lock().dirty.clear();
    (gate, sim, registry)
}

fn gate_timeouts(gate: &CacheGate, kind: GateTimeout) -> u64 {
    gate.metrics
        .gate_timeouts
        .get_or_create(&KindLabel {
            kind: kind.as_str(),
        })
        .get()
}

/// Requests past the gate and not finished.
fn passes_out(gate: &CacheGate) -> usize {
    let st = gate.lock();
    st.running_total + st.detached
}

#[tokio::test]
async fn a_flush_proving_the_upstream_idle_lets_others_past_a_stalled_window() {
    let (gate, sim, _r) = sim_gate(300).await;
    let far = Instant::now() + Duration::from_secs(60);
    // a's request is done upstream but its pass is held (a client that stopped reading).
    let stalled = gate.enter("a", far).await.unwrap();
    let t0 = Instant::now();
    let b = gate.enter("b", far).await.unwrap();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(sim.sim.flushes(), (1, 0), "b ran without a confirmed flush");
    assert_eq!(passes_out(&gate), 2);
    // a's next window waits for b alone and is flushed again.
    drop(b);
    let a = gate.enter("a", far).await.unwrap();
    assert_eq!(sim.sim.flushes(), (2, 0));
    drop(stalled);
    assert_eq!(passes_out(&gate), 1);
    // The retired pass ending is not the new window's pass ending: b still may not run
    // beside a's request.
    let soon = Instant::now() + Duration::from_millis(150);
    assert_eq!(gate.enter("b", soon).await.err(), Some(GateError::Timeout));
    drop(a);
    assert_eq!(passes_out(&gate), 0);
    assert_eq!(gate_timeouts(&gate, GateTimeout::WindowDrain), 0);
    sim.stop().await;
}

#[tokio::test]
async fn an_unconfirmed_flush_after_the_drain_bound_refuses_everyone_who_waited() {
    let (gate, sim, _r) = sim_gate(300).await;
    let far = Instant::now() + Duration::from_secs(60);
    let stalled = gate.enter("a", far).await.unwrap();
    sim.sim.refuse_next_flushes(100);
    let t0 = Instant::now();
    let (b1, b2) = tokio::join!(gate.enter("b", far), gate.enter("b", far));
    let took = t0.elapsed();
    assert_eq!(b1.err(), Some(GateError::DrainTimeout));
    assert_eq!(b2.err(), Some(GateError::DrainTimeout));
    assert!(took < Duration::from_secs(5), "{took:?}");
    // One flush call answered for both (the second waited through it).
    assert_eq!(sim.sim.flushes(), (0, 1));
    assert_eq!(gate_timeouts(&gate, GateTimeout::WindowDrain), 2);
    // Once a's request ends, others run (after a flush).
    sim.sim.refuse_next_flushes(0);
    drop(stalled);
    let b = gate.enter("b", far).await.unwrap();
    assert_eq!(sim.sim.flushes(), (1, 1));
    drop(b);
    sim.stop().await;
}

#[tokio::test]
async fn a_waiter_gone_mid_flush_does_not_wedge_the_gate() {
    // An upstream that accepts the flush call and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut settings = state(1000, 10).settings;
    settings.upstream = format!("http://{}", listener.local_addr().unwrap())
        .parse()
        .unwrap();
    settings.flush_timeout = Duration::from_secs(600);
    let mut registry = prometheus_client::registry::Registry::default();
    let gate = CacheGate::new(settings, Metrics::register(&mut registry));
    let far = Instant::now() + Duration::from_secs(600);
    drop(gate.enter("b", far).await.unwrap());
    let g = gate.clone();
    let waiter = tokio::spawn(async move { g.enter("a", far).await.map(|_| ()) });
    let (_conn, _) = listener.accept().await.unwrap();
    assert!(gate.lock().flushing);
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    let st = gate.lock();
    assert!(!st.flushing && st.waiting.is_empty());
}

#[tokio::test]
async fn a_reload_that_makes_a_tenant_exclusive_takes_effect() {
    let (gate, sim, _r) = sim_gate(300).await;
    let far = Instant::now() + Duration::from_secs(60);
    drop(gate.enter("c", far).await.unwrap());
    let mut s = gate.lock().settings.clone();
    s.exclusive.insert("b".into());
    gate.update(s);
    drop(gate.enter("b", far).await.unwrap());
    assert_eq!(
        sim.sim.flushes(),
        (1, 0),
        "b, exclusive now, ran after c unflushed"
    );
    sim.stop().await;
}

#[tokio::test]
async fn hold_retries_the_flush_each_flush_retry_until_the_deadline() {
    let (gate, sim, _r) = sim_gate(300).await;
    let mut s = gate.lock().settings.clone();
    s.on_failure = FlushFailure::Hold;
    s.flush_retry = Duration::from_millis(100);
    gate.update(s);
    drop(
        gate.enter("b", Instant::now() + Duration::from_secs(60))
            .await
            .unwrap(),
    );
    sim.sim.refuse_next_flushes(1000);
    let t0 = Instant::now();
    let r = gate.enter("a", t0 + Duration::from_secs(1)).await;
    let took = t0.elapsed();
    assert_eq!(r.err(), Some(GateError::Timeout));
    assert!(took >= Duration::from_secs(1), "gave up early: {took:?}");
    // One attempt each 100 ms (fewer on a loaded machine, never a busy loop).
    let (confirmed, refused) = sim.sim.flushes();
    assert_eq!(confirmed, 0);
    assert!((3..=11).contains(&refused), "{refused} flush calls in 1 s");
    sim.stop().await;
}

#[tokio::test]
async fn flush_retries_wait_flush_retry_between_attempts() {
    let (gate, sim, _r) = sim_gate(300).await;
    let mut s = gate.lock().settings.clone();
    s.flush_attempts = 3;
    s.flush_retry = Duration::from_millis(150);
    gate.update(s);
    let far = Instant::now() + Duration::from_secs(60);
    drop(gate.enter("b", far).await.unwrap());
    sim.sim.refuse_next_flushes(2);
    let t0 = Instant::now();
    drop(gate.enter("a", far).await.unwrap());
    let took = t0.elapsed();
    assert_eq!(sim.sim.flushes(), (1, 2));
    assert!(
        took >= Duration::from_millis(300),
        "two waits of 150 ms: {took:?}"
    );
    sim.stop().await;
}

#[tokio::test]
async fn the_first_flush_goes_at_once_and_no_retry_outlives_the_deadline() {
    let (gate, sim, _r) = sim_gate(300).await;
    let far = Instant::now() + Duration::from_secs(60);
    drop(gate.enter("b", far).await.unwrap());
    // A retry interval longer than the time left: the first attempt still goes.
    let mut s = gate.lock().settings.clone();
    s.flush_attempts = 3;
    s.flush_retry = Duration::from_secs(10);
    gate.update(s.clone());
    drop(
        gate.enter("a", Instant::now() + Duration::from_secs(1))
            .await
            .unwrap(),
    );
    assert_eq!(sim.sim.flushes(), (1, 0));
    // Refused throughout: a retry goes only while it can end before the deadline (at
    // 500 ms, not at 1000 ms).
    drop(gate.enter("b", far).await.unwrap());
    s.flush_retry = Duration::from_millis(500);
    gate.update(s);
    sim.sim.refuse_next_flushes(100);
    let r = gate
        .enter("a", Instant::now() + Duration::from_millis(800))
        .await;
    assert!(matches!(r, Err(GateError::FlushFailed(_))), "{:?}", r.err());
    // (b's entry after a's window was flushed: the second confirmed one.)
    assert_eq!(sim.sim.flushes(), (2, 2));
    sim.stop().await;
}

/// An upstream whose flush answers wait for the test: each flush call is announced on the
/// first channel, then answered 200 once the second gets a message.
async fn held_flush_upstream() -> (
    String,
    tokio::sync::mpsc::Receiver<()>,
    tokio::sync::mpsc::Sender<()>,
) {
    held_flush_upstream_answering(String::new()).await
}

async fn held_flush_upstream_answering(
    body: String,
) -> (
    String,
    tokio::sync::mpsc::Receiver<()>,
    tokio::sync::mpsc::Sender<()>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (started_tx, started_rx) = tokio::sync::mpsc::channel(8);
    let (release_tx, release_rx) = tokio::sync::mpsc::channel::<()>(8);
    let release_rx = Arc::new(tokio::sync::Mutex::new(release_rx));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (started_tx, release_rx) = (started_tx.clone(), release_rx.clone());
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 1024];
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let _ = started_tx.send(()).await;
                        release_rx.lock().await.recv().await;
                        if conn.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, started_rx, release_tx)
}

#[tokio::test]
async fn a_long_confirmation_is_read_whole() {
    // vLLM's answer is short, but nothing says it must be: a 2 KiB JSON confirmation.
    let detail = "x".repeat(2048);
    let (url, _started, release) =
        held_flush_upstream_answering(format!(r#"{{"success":true,"detail":"{detail}"}}"#)).await;
    let mut s = settings(50, 100);
    s.upstream = url.parse().unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let gate = CacheGate::new(s, Metrics::register(&mut registry));
    release.send(()).await.unwrap();
    let pass = gate
        .enter("a", Instant::now() + Duration::from_secs(10))
        .await;
    assert!(pass.is_ok(), "{:?}", pass.err());
}

#[tokio::test]
async fn a_flush_during_which_the_settings_changed_vouches_for_nothing() {
    let (url, mut started, release) = held_flush_upstream().await;
    let mut s = settings(50, 100);
    s.upstream = url.parse().unwrap();
    s.drain_timeout = Duration::from_millis(300);
    s.flush_proves_idle = true;
    let mut registry = prometheus_client::registry::Registry::default();
    let gate = CacheGate::new(s.clone(), Metrics::register(&mut registry));
    gate.lock().dirty.clear();
    let far = Instant::now() + Duration::from_secs(60);
    let stalled = gate.enter("a", far).await.unwrap();
    let g = gate.clone();
    let b = tokio::spawn(async move { g.enter("b", far).await.map(|_| ()) });
    // Past the drain bound b asks for a flush to vouch that a's request is done; a reload
    // comes while it is on its way (a larger fair queue may have let a pass through).
    let wait = Duration::from_secs(10);
    tokio::time::timeout(wait, started.recv()).await.unwrap();
    gate.update(s);
    release.send(()).await.unwrap();
    // That flush retires nothing: b waits a new drain bound and asks again.
    tokio::time::timeout(wait, started.recv())
        .await
        .expect("a second flush: the first one, though confirmed, vouched for nothing");
    {
        let st = gate.lock();
        assert_eq!((st.running_total, st.detached), (1, 0));
    }
    release.send(()).await.unwrap();
    tokio::time::timeout(wait, b)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(gate.lock().detached, 1, "the second flush retired a's pass");
    drop(stalled);
    assert_eq!(passes_out(&gate), 0);
}

#[test]
fn salts_are_keyed_and_rotate() {
    let k1 = b"0123456789abcdef0123456789abcdef";
    let k2 = b"fedcba9876543210fedcba9876543210";
    let a = derive_salt(k1, 1, "acme");
    assert_eq!(a, derive_salt(k1, 1, "acme"));
    assert_ne!(a, derive_salt(k1, 1, "globex"));
    assert_ne!(a, derive_salt(k1, 2, "acme"));
    assert_ne!(a, derive_salt(k2, 1, "acme"));
    assert!(!a.contains("acme") && a.len() >= 43);
}

#[test]
fn flush_answers_are_judged_strictly() {
    let ok = StatusCode::OK;
    assert_eq!(judge_flush(Flavor::Vllm, ok, b""), FlushOutcome::Ok);
    assert_eq!(
        judge_flush(Flavor::Vllm, ok, br#"{"success":true}"#),
        FlushOutcome::Ok
    );
    assert_eq!(
        judge_flush(Flavor::Vllm, ok, br#"{"success":false}"#).label(),
        "refused"
    );
    assert_eq!(
        judge_flush(Flavor::Vllm, StatusCode::SERVICE_UNAVAILABLE, b"busy").label(),
        "refused"
    );
    assert_eq!(
        judge_flush(Flavor::Vllm, StatusCode::INTERNAL_SERVER_ERROR, b"").label(),
        "failed"
    );
    assert_eq!(
        judge_flush(
            Flavor::Sglang,
            ok,
            b"Cache not flushed because there are pending requests."
        )
        .label(),
        "refused"
    );
    assert_eq!(
        judge_flush(Flavor::Sglang, ok, b"Cache flushed.\n"),
        FlushOutcome::Ok
    );
    // Each refusal phrase on its own is a refusal, whatever else the body says.
    for body in [
        &b"Cache NOT FLUSHED: the scheduler is busy"[..],
        b"There are pending requests; try again later",
        br#"{"success":"maybe"}"#,
    ] {
        assert_eq!(
            judge_flush(Flavor::Sglang, ok, body).label(),
            "refused",
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}
