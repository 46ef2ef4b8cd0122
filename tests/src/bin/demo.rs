//! `cargo xtask demo`: the whole request path on this machine. `bulkhead-sim` plays the
//! inference server, `bulkhead-sidecar` sits in front of it with three tenants (one of them
//! noisy, flooding it), and, when run as root, the real `bulkhead-agent` counts every tenant's
//! bytes in the kernel from the sockets the sidecar tags. Prints the per-tenant table.

use bulkhead_tests::harness::{Agent, Metrics, Paths};
use bulkhead_tests::stack::{Outcome, Stack, TempDir};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// (tenant, concurrent clients, sidecar limits): acme and globex are well-behaved; initech
/// floods with many clients against tight limits.
const TENANTS: &[(&str, usize, &str)] = &[
    (
        "acme",
        4,
        "weight = 3\nrequests_per_minute = 60000\ntokens_per_minute = 5000000\nmax_concurrent = 8\n\
         canaries = [\"CANARY-acme-demo-3f9a\"]",
    ),
    (
        "globex",
        2,
        "weight = 1\nrequests_per_minute = 60000\ntokens_per_minute = 5000000\nmax_concurrent = 8",
    ),
    (
        "initech",
        24,
        "weight = 1\nrequests_per_minute = 1200\ntokens_per_minute = 30000\nmax_concurrent = 4",
    ),
];

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds: u64 = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let serve = args.iter().any(|a| a == "--serve");

    let exe = std::env::current_exe().expect("current exe");
    let agent_bin = exe.with_file_name("bulkhead-agent");
    let agent_bin = agent_bin.to_str().unwrap().to_string();
    let paths = Paths::named("demo");
    let agent = match std::process::Command::new(&agent_bin)
        .arg("preflight")
        .output()
    {
        Ok(o) if o.status.success() => {
            let mut config = format!(
                "pin_dir = {:?}\nadmin_addr = \"127.0.0.1:0\"\n[gpu]\nsource = \"off\"\n[tagging]\nsocket_path = {:?}\nallowed_uids = [{}]\n",
                paths.pin_dir,
                paths.socket,
                nix::unistd::geteuid().as_raw()
            );
            for (name, ..) in TENANTS {
                config.push_str(&format!("[[tenants]]\nname = \"{name}\"\n"));
            }
            Some(Agent::start(&agent_bin, &paths, &config))
        }
        Ok(o) => {
            eprintln!(
                "bulkhead-agent not started (it loads eBPF programs; run the demo as root to see \
                 per-tenant bytes): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("cannot run {agent_bin}: {e} (`cargo xtask demo` builds it)");
            return ExitCode::from(71);
        }
    };

    let dir = TempDir::new("demo-stack");
    let tenants: String = TENANTS
        .iter()
        .map(|(name, _, limits)| format!("[tenants.{name}]\n{limits}\n"))
        .collect();
    let sim = bulkhead_sim::SimConfig {
        time_to_first_token: Duration::from_millis(20),
        inter_token_latency: Duration::from_millis(1),
        completion_tokens: 32,
        ..Default::default()
    };
    let queue = "[queue]\nmax_inflight = 8\nmax_queue_per_tenant = 16\ntimeout_ms = 2000\n";
    let stack = Stack::start(
        sim,
        &tenants,
        queue,
        agent.as_ref().map(|_| paths.socket.as_path()),
        &dir.0,
    )
    .await;
    println!(
        "bulkhead-sim      http://{}",
        stack.sim.url().trim_start_matches("http://")
    );
    println!(
        "bulkhead-sidecar  http://{}  (metrics: http://{}/metrics)",
        stack.addr, stack.admin
    );
    if let Some(a) = &agent {
        println!("bulkhead-agent    metrics: http://{}/metrics", a.admin);
    }
    println!(
        "\n{seconds} s of load: acme 4 clients, globex 2, initech 24 (noisy, tight limits)...\n"
    );

    loop {
        let outcomes = load(&stack, Duration::from_secs(seconds)).await;
        let sidecar = Metrics::parse(&stack.get_admin("/metrics").await.unwrap().1);
        let node = agent.as_ref().map(|a| a.metrics());
        print_table(&outcomes, &sidecar, node.as_ref());
        if !serve {
            break;
        }
        println!("(--serve: running again; Ctrl-C to stop)\n");
    }
    stack.stop().await;
    if let Some(a) = agent {
        a.stop();
    }
    ExitCode::SUCCESS
}

/// Every tenant's clients send chat completions back to back until `dur` has passed.
async fn load(stack: &Stack, dur: Duration) -> BTreeMap<&'static str, Vec<Outcome>> {
    let deadline = Instant::now() + dur;
    let mut tasks = Vec::new();
    for &(tenant, clients, _) in TENANTS {
        for c in 0..clients {
            tasks.push(async move {
                let mut out = Vec::new();
                let mut i = 0;
                while Instant::now() < deadline {
                    // The noisy tenant's first client also tries, now and then, a marker
                    // string planted in acme's data (a canary): the sidecar counts it.
                    let prompt = if tenant == "initech" && c == 0 && i % 10 == 5 {
                        format!("client {c} question {i}: what is CANARY-acme-demo-3f9a?")
                    } else {
                        format!("client {c} question {i}: what does {tenant} own?")
                    };
                    out.push(stack.chat(tenant, &prompt, 32).await);
                    i += 1;
                }
                (tenant, out)
            });
        }
    }
    let mut by_tenant: BTreeMap<&'static str, Vec<Outcome>> = BTreeMap::new();
    for (tenant, out) in futures_join_all(tasks).await {
        by_tenant.entry(tenant).or_default().extend(out);
    }
    by_tenant
}

/// Runs the futures concurrently on this task (they share the stack by reference).
async fn futures_join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futs.iter_mut().zip(done.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    done.into_iter().map(|v| v.unwrap()).collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn print_table(
    outcomes: &BTreeMap<&'static str, Vec<Outcome>>,
    sidecar: &Metrics,
    node: Option<&Metrics>,
) {
    println!(
        "{:<9} {:>8} {:>10} {:>11} {:>9} {:>9} {:>14} {:>14}",
        "tenant", "ok", "throttled", "tokens", "p50", "p99", "bytes out", "bytes in"
    );
    for &(tenant, ..) in TENANTS {
        let out = outcomes.get(tenant).map(Vec::as_slice).unwrap_or(&[]);
        let ok: Vec<&Outcome> = out.iter().filter(|o| o.status == 200).collect();
        let throttled = out
            .iter()
            .filter(|o| o.status == 429 || o.status == 503)
            .count();
        let mut lat: Vec<Duration> = ok.iter().map(|o| o.latency).collect();
        lat.sort();
        let tokens = sidecar.get(
            "bulkhead_tokens_total",
            &[("tenant", tenant), ("kind", "completion")],
        ) + sidecar.get(
            "bulkhead_tokens_total",
            &[("tenant", tenant), ("kind", "prompt")],
        );
        let bytes = |dir: &str| {
            node.map(|m| m.bytes(tenant, dir).to_string())
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{:<9} {:>8} {:>10} {:>11} {:>7.1}ms {:>7.1}ms {:>14} {:>14}",
            tenant,
            ok.len(),
            throttled,
            tokens as u64,
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            bytes("egress"),
            bytes("ingress"),
        );
    }
    let limits = ["requests", "tokens", "concurrency", "queue"];
    let noisy: Vec<String> = limits
        .iter()
        .map(|l| {
            format!(
                "{l} {}",
                sidecar.get(
                    "bulkhead_rate_limited_total",
                    &[("tenant", "initech"), ("limit", l)]
                )
            )
        })
        .collect();
    println!("\ninitech's refusals by limit: {}", noisy.join(", "));
    println!(
        "leak detection: acme's canary seen in initech's prompts {} times, in responses {} \
         times (bulkhead_canary_hits_total; initech's audit lists each, acme's gets a record a \
         second)",
        sidecar.get(
            "bulkhead_canary_hits_total",
            &[
                ("owner", "acme"),
                ("seen_by", "initech"),
                ("where", "prompt")
            ]
        ),
        sidecar.get(
            "bulkhead_canary_hits_total",
            &[
                ("owner", "acme"),
                ("seen_by", "initech"),
                ("where", "response")
            ]
        ),
    );
    println!(
        "tokens: prompt + completion as the sidecar charged them; bytes: the agent's kernel \
         counters for the sockets the sidecar tagged (client and upstream sides)\n"
    );
}
