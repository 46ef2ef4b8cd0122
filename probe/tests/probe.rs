//! The probe against real stacks (bulkhead-sim behind bulkhead-sidecar, over sockets): it
//! passes a correctly configured one and FAILS the deliberately misconfigured ones, so it is
//! shown to catch what it claims. Timing checks use medians of 5 fresh prompts whose misses
//! cost the simulator ~128 ms of prefill and whose hits cost ~2 ms (a hit is < 0.5 x the miss
//! median): wide margins on a loaded machine.

mod common;
use bulkhead_probe::{Outcome, ProbeConfig, exit, run_probe};
use common::*;
use http::StatusCode;
use std::time::Duration;

const REQUIRED: [&str; 7] = [
    "signed_accepted",
    "unsigned",
    "tampered",
    "replayed",
    "cross_tenant_key",
    "client_salt_ignored",
    "cross_tenant_cache",
];

fn outcome(r: &bulkhead_probe::Report, name: &str) -> (Outcome, String) {
    let c = r
        .check(name)
        .unwrap_or_else(|| panic!("no check {name}:\n{}", r.summary()));
    (c.outcome, c.reason.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_stack_passes_every_check() {
    let s = Stack::start(Setup::correct()).await;
    let cfg = ProbeConfig::from_toml(&s.probe_toml_timed("")).unwrap();
    let r = run_probe(&cfg).await;
    eprintln!("{}", r.summary());
    let names: Vec<&str> = r.checks.iter().map(|c| c.name).collect();
    assert_eq!(names, bulkhead_probe::CHECKS, "{}", r.summary());
    for name in REQUIRED {
        assert_eq!(outcome(&r, name).0, Outcome::Pass, "{}", r.summary());
    }
    for name in [
        "canary_not_returned",
        "canary_prompt_blocked",
        "tagged_bytes",
    ] {
        let (o, why) = outcome(&r, name);
        assert_eq!(o, Outcome::Skip, "{}", r.summary());
        assert!(why.contains("no "), "{why}");
    }
    assert_eq!(r.exit_code(), exit::OK);
    assert!(outcome(&r, "unsigned").1.contains("401 missing"));
    assert!(
        outcome(&r, "cross_tenant_key")
            .1
            .contains("401 tenant_mismatch")
    );
    let text = r.to_prometheus();
    assert!(text.contains("bulkhead_probe_success 1\n"), "{text}");
    assert!(
        text.contains("bulkhead_probe_check{check=\"cross_tenant_cache\",result=\"pass\"} 1\n")
    );
    assert!(text.contains("bulkhead_probe_check{check=\"tagged_bytes\",result=\"skip\"} 1\n"));
    // The salted tier is what made B miss: the simulator saw two different salts, never the
    // probe's own client salts.
    let salts: std::collections::HashSet<String> = s
        .sim
        .as_ref()
        .unwrap()
        .sim
        .cache_events()
        .iter()
        .filter_map(|e| e.salt.clone())
        .collect();
    assert_eq!(salts.len(), 2, "{salts:?}");
    assert!(salts.iter().all(|x| !x.starts_with("probe-salt-")));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_passes_a_correct_stack_writes_the_textfile_and_pushes() {
    let s = Stack::start(Setup::correct()).await;
    let gateway = Fake::start(|_, _| (StatusCode::OK, "text/plain", String::new())).await;
    let conf = s.dir.path().join("probe.toml");
    std::fs::write(&conf, s.probe_toml_timed("")).unwrap();
    let textfile = s.dir.path().join("textfile/bulkhead_probe.prom");
    std::fs::create_dir_all(textfile.parent().unwrap()).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulkhead-probe"))
        .arg("--config")
        .arg(&conf)
        .arg("--textfile")
        .arg(&textfile)
        .args(["--pushgateway", &gateway.url(), "--instance", "vllm/test"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("pass  cross_tenant_cache"), "{stdout}");
    assert!(stdout.contains("skip  tagged_bytes"), "{stdout}");
    let text = std::fs::read_to_string(&textfile).unwrap();
    assert!(text.contains("bulkhead_probe_success 1\n"), "{text}");
    assert!(text.contains("bulkhead_probe_last_run_timestamp_seconds "));
    // Only the textfile in its directory (the temporary file was renamed over it).
    assert_eq!(
        std::fs::read_dir(textfile.parent().unwrap())
            .unwrap()
            .count(),
        1
    );
    let pushed = gateway.seen();
    assert_eq!(pushed.len(), 1);
    assert_eq!(pushed[0].method, http::Method::PUT);
    // A `/` in a grouping value: the Pushgateway's base64url form ("vllm/test").
    assert_eq!(
        pushed[0].path,
        "/metrics/job/bulkhead_probe/instance@base64/dmxsbS90ZXN0"
    );
    assert_eq!(String::from_utf8_lossy(&pushed[0].body), text.as_str());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_sharing_the_cache_fail_cross_tenant_cache() {
    let s = Stack::start(Setup {
        isolation: "shared",
        ..Setup::correct()
    })
    .await;
    let cfg = ProbeConfig::from_toml(&s.probe_toml_timed("")).unwrap();
    let r = run_probe(&cfg).await;
    eprintln!("{}", r.summary());
    let (o, why) = outcome(&r, "cross_tenant_cache");
    assert_eq!(o, Outcome::Fail, "{}", r.summary());
    assert!(why.contains("hits tenant probe-a's prefix cache"), "{why}");
    // The shared tier removes client salts too: that check still passes, as do the others.
    for name in REQUIRED.iter().filter(|n| **n != "cross_tenant_cache") {
        assert_eq!(outcome(&r, name).0, Outcome::Pass, "{}", r.summary());
    }
    assert_eq!(r.exit_code(), exit::FAILED);
    let text = r.to_prometheus();
    assert!(
        text.contains("bulkhead_probe_check{check=\"cross_tenant_cache\",result=\"fail\"} 1\n")
    );
    assert!(text.contains("bulkhead_probe_success 0\n"));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_bound_to_every_tenant_fails_cross_tenant_key() {
    let s = Stack::start(Setup {
        a_key_tenants: r#"["*"]"#,
        ..Setup::correct()
    })
    .await;
    // The timing checks are not under test here: keep them short.
    let cfg = ProbeConfig::from_toml(&format!(
        "{}[timing]\nsamples = 1\nprompt_words = 64\n",
        s.probe_toml("")
    ))
    .unwrap();
    let r = run_probe(&cfg).await;
    let (o, why) = outcome(&r, "cross_tenant_key");
    assert_eq!(o, Outcome::Fail, "{}", r.summary());
    assert!(
        why.contains("key probe-a-key of tenant probe-a may act for tenant probe-b"),
        "{why}"
    );
    for name in ["signed_accepted", "unsigned", "tampered", "replayed"] {
        assert_eq!(outcome(&r, name).0, Outcome::Pass, "{}", r.summary());
    }
    assert_eq!(r.exit_code(), exit::FAILED);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_checks_run_when_given_what_they_need() {
    let s = Stack::start(Setup::correct()).await;
    let agent = fake_agent(true).await;
    let extra = format!(
        "canary_file = \"{}\"\nsidecar_metrics_url = \"{}\"\nagent_metrics_url = \"{}\"",
        s.canary_file().display(),
        s.metrics_url(),
        agent.url(), // no path: /metrics is implied
    );
    let cfg = ProbeConfig::from_toml(&format!(
        "{}[timing]\nsamples = 1\nprompt_words = 64\n",
        s.probe_toml(&extra)
    ))
    .unwrap();
    let r = run_probe(&cfg).await;
    // The simulator never repeats a prompt: nothing comes back.
    assert_eq!(
        outcome(&r, "canary_not_returned").0,
        Outcome::Pass,
        "{}",
        r.summary()
    );
    // This sidecar has no canaries configured: B's prompt with A's canary is neither refused
    // nor counted, and the probe says so.
    let (o, why) = outcome(&r, "canary_prompt_blocked");
    assert_eq!(o, Outcome::Fail, "{}", r.summary());
    assert!(why.contains("not counted"), "{why}");
    let (o, why) = outcome(&r, "tagged_bytes");
    assert_eq!(o, Outcome::Pass, "{}", r.summary());
    assert!(
        why.contains("bulkhead_network_bytes_total{tenant=probe-a} +"),
        "{why}"
    );
    assert!(agent.seen().iter().all(|x| x.path == "/metrics"));
    // The canary never appears in the probe's results.
    assert!(!r.summary().contains(CANARY) && !r.to_prometheus().contains(CANARY));

    // An agent whose counter for A does not move: tagged_bytes fails (after its deadline).
    let still = fake_agent(false).await;
    let mut cfg = cfg.clone();
    cfg.agent_metrics_url = Some(format!("{}/metrics", still.url()));
    cfg.canary = None;
    let r = run_probe(&cfg).await;
    let (o, why) = outcome(&r, "tagged_bytes");
    assert_eq!(o, Outcome::Fail, "{}", r.summary());
    assert!(why.contains("did not grow"), "{why}");
    assert_eq!(outcome(&r, "canary_prompt_blocked").0, Outcome::Skip);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_the_canary_configured_passes_the_canary_checks() {
    for mode in ["block", "count"] {
        let s = Stack::start(Setup {
            on_canary: Some(mode),
            ..Setup::correct()
        })
        .await;
        let extra = format!(
            "canary_file = \"{}\"\nsidecar_metrics_url = \"{}\"",
            s.canary_file().display(),
            s.metrics_url(),
        );
        let cfg = ProbeConfig::from_toml(&format!(
            "{}[timing]\nsamples = 1\nprompt_words = 64\n",
            s.probe_toml(&extra)
        ))
        .unwrap();
        let r = run_probe(&cfg).await;
        for check in ["canary_not_returned", "canary_prompt_blocked"] {
            let (o, why) = outcome(&r, check);
            assert_eq!(o, Outcome::Pass, "{mode}: {check}: {why}\n{}", r.summary());
        }
        // The metrics cross-check ran: the sidecar saw no canary in B's responses.
        let why = outcome(&r, "canary_not_returned").1;
        assert!(
            why.contains(
                "the sidecar counted none (bulkhead_canary_hits_total{where=\"response\"} +0)"
            ),
            "{mode}: {why}"
        );
        s.shutdown().await;
    }
}

/// A stack whose upstream answers as `leak` says, the sidecar knowing probe-a's canary with
/// `on_canary` (or not at all), and the probe's result with the canary file and `extra`.
async fn run_against(
    leak: Leak,
    on_canary: Option<&'static str>,
    extra: &str,
) -> (bulkhead_probe::Report, Stack, Fake) {
    let up = leaky_upstream(leak).await;
    let s = Stack::start(Setup {
        upstream: Upstream::Url(up.url()),
        on_canary,
        ..Setup::correct()
    })
    .await;
    let extra = format!(
        "canary_file = \"{}\"\n{}",
        s.canary_file().display(),
        extra.replace("{metrics}", &s.metrics_url())
    );
    // Five timing samples: the timing checks judge medians, and one sample of a loaded
    // machine can make a cache-less upstream look like one with a cache.
    let cfg = ProbeConfig::from_toml(&format!(
        "{}[timing]\nsamples = 5\nprompt_words = 64\n",
        s.probe_toml(&extra)
    ))
    .unwrap();
    let r = run_probe(&cfg).await;
    // The canary never appears in the probe's results.
    assert!(!r.summary().contains(CANARY) && !r.to_prometheus().contains(CANARY));
    (r, s, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaky_upstream_fails_canary_not_returned() {
    // The leak streams 3 characters per event in one of two interleaved choices: the probe
    // finds it in the text a client reassembles for that choice, and names where.
    for (leak, choice) in [(Leak::InChoice0, 0), (Leak::InChoice1, 1)] {
        let (r, s, up) = run_against(leak, None, "").await;
        let (o, why) = outcome(&r, "canary_not_returned");
        assert_eq!(o, Outcome::Fail, "{leak:?}: {}", r.summary());
        assert!(
            why.contains("canary came back in tenant probe-b's response"),
            "{why}"
        );
        assert!(
            why.contains(&format!("streamed: choice {choice}, delta.content")),
            "{why}"
        );
        assert!(
            why.contains(&format!("not streamed: choice {choice}, message.content")),
            "{why}"
        );
        // Only the leaking choice is named.
        assert!(!why.contains(&format!("choice {}", 1 - choice)), "{why}");
        // B did ask streamed (where the raw bytes never hold the canary whole) and not.
        let asked: Vec<bool> = up
            .seen()
            .iter()
            .filter_map(|x| serde_json::from_slice::<serde_json::Value>(&x.body).ok())
            .filter(|v| v.to_string().contains("The secret code word is\""))
            .map(|v| v["stream"].as_bool().unwrap_or(false))
            .collect();
        assert_eq!(asked, vec![true, false], "{leak:?}");
        if leak == Leak::InChoice0 {
            // The upstream has no prefix cache: the timing checks say so rather than pass.
            let (o, why) = outcome(&r, "cross_tenant_cache");
            assert_eq!(o, Outcome::Fail);
            assert!(why.starts_with("inconclusive"), "{why}");
        }
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_halves_in_two_choices_pass_canary_not_returned() {
    // Choice 0 ends with the canary's first half and choice 1 starts with its second half:
    // the events' contents in arrival order spell it, no client's text holds it.
    let (r, s, _up) = run_against(Leak::Halves, None, "").await;
    let (o, why) = outcome(&r, "canary_not_returned");
    assert_eq!(o, Outcome::Pass, "{}", r.summary());
    assert!(why.contains("hold no trace of the canary"), "{why}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecars_count_of_a_leak_is_cross_checked() {
    // One choice leaking 3 characters per event: the sidecar (count mode) counts it in B's
    // two responses, and the probe reports both views.
    let metrics = "sidecar_metrics_url = \"{metrics}\"";
    let (r, s, _up) = run_against(Leak::OneChoice, Some("count"), metrics).await;
    let (o, why) = outcome(&r, "canary_not_returned");
    assert_eq!(o, Outcome::Fail, "{}", r.summary());
    assert!(why.contains("streamed: choice 0, delta.content"), "{why}");
    assert!(
        why.contains(
            "the sidecar counted it too: bulkhead_canary_hits_total{where=\"response\"} +2 during the check (probe-a seen by probe-b: +2)"
        ),
        "{why}"
    );
    s.shutdown().await;

    // Block mode: the sidecar cuts the stream before the event that completes the canary and
    // withholds the whole answer; the probe says so, with the sidecar's count.
    let (r, s, _up) = run_against(Leak::OneChoice, Some("block"), metrics).await;
    let (o, why) = outcome(&r, "canary_not_returned");
    assert_eq!(o, Outcome::Fail, "{}", r.summary());
    assert!(
        why.contains("the sidecar cut the response (canary_blocked, streamed and not)"),
        "{why}"
    );
    assert!(why.contains("+2 during the check"), "{why}");
    s.shutdown().await;

    // A clean stack whose sidecar counts a canary in a response during the check (here: a
    // metrics page where acme's canary reaches globex): the client saw nothing, the check
    // still fails.
    let s = Stack::start(Setup::correct()).await;
    let base = format!(
        "{}[timing]\nsamples = 1\nprompt_words = 64\n",
        s.probe_toml(&format!("canary_file = \"{}\"", s.canary_file().display()))
    );
    let mut cfg = ProbeConfig::from_toml(&base).unwrap();
    let seen = fake_sidecar_metrics(true, true).await;
    cfg.sidecar_metrics_url = Some(format!("{}/metrics", seen.url()));
    let r = run_probe(&cfg).await;
    let (o, why) = outcome(&r, "canary_not_returned");
    assert_eq!(o, Outcome::Fail, "{}", r.summary());
    assert!(
        why.contains("the sidecar counted another tenant's canary in a response: bulkhead_canary_hits_total{where=\"response\"} +1 during the check (probe-a seen by probe-b: +0), while tenant probe-b's responses held none"),
        "{why}"
    );
    // The same page without the hit: pass, saying the sidecar counted none.
    let quiet = fake_sidecar_metrics(true, false).await;
    cfg.sidecar_metrics_url = Some(format!("{}/metrics", quiet.url()));
    let r = run_probe(&cfg).await;
    let (o, why) = outcome(&r, "canary_not_returned");
    assert_eq!(o, Outcome::Pass, "{}", r.summary());
    assert!(why.contains("the sidecar counted none"), "{why}");
    // A sidecar that never counts B's requests (another replica): the cross-check cannot
    // conclude and says why, instead of passing.
    let other = fake_sidecar_metrics(false, false).await;
    cfg.sidecar_metrics_url = Some(format!("{}/metrics", other.url()));
    cfg.request_timeout = Duration::from_secs(2);
    let r = run_probe(&cfg).await;
    let (o, why) = outcome(&r, "canary_not_returned");
    assert_eq!(o, Outcome::Fail, "{}", r.summary());
    assert!(
        why.contains("did not count tenant probe-b's 2 requests in bulkhead_requests_total"),
        "{why}"
    );
    assert!(
        why.contains("is it the replica the probe reaches?"),
        "{why}"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overall_timeout_fails_what_did_not_finish() {
    let s = Stack::start(Setup {
        upstream: Upstream::Sim(bulkhead_sim::SimConfig {
            time_to_first_token: Duration::from_secs(5),
            ..sim_config()
        }),
        ..Setup::correct()
    })
    .await;
    let mut cfg = ProbeConfig::from_toml(&s.probe_toml("")).unwrap();
    cfg.timeout = Duration::from_millis(500);
    let r = run_probe(&cfg).await;
    assert!(r.duration < Duration::from_secs(4), "{:?}", r.duration);
    assert_eq!(r.checks.len(), bulkhead_probe::CHECKS.len());
    let (o, why) = outcome(&r, "signed_accepted");
    assert_eq!(o, Outcome::Fail);
    assert!(why.contains("timeout"), "{why}");
    assert_eq!(outcome(&r, "tagged_bytes").0, Outcome::Skip);
    assert_eq!(r.exit_code(), exit::FAILED);
    s.shutdown().await;
}

#[tokio::test]
async fn configuration_errors_exit_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("probe.toml");
    std::fs::write(
        &conf,
        "target = \"http://127.0.0.1:1\"\n[tenant_a]\nname = \"a\"\nkey_id = \"k\"\nkey_file = \"/nonexistent/a.key\"\n",
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_bulkhead-probe");
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(bin)
            .args(args)
            .output()
            .await
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(vec!["--config".into(), conf.display().to_string()]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`tenant_a.key_file`"), "{err}");
    let (code, err) = run(vec![]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`target`"), "{err}");
    let (code, _) = run(vec!["--no-such-flag".into()]).await;
    assert_eq!(code, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bare_inference_server_fails_every_isolation_check() {
    // No sidecar: the probe pointed at the simulator itself, which takes any request and
    // folds the client's cache_salt into its cache keys.
    let sim = bulkhead_sim::SimHandle::start(sim_config()).await.unwrap();
    let keys = Stack::start(Setup::correct()).await; // only for its key files
    let text = keys
        .probe_toml_timed("")
        .replace(&format!("http://{}", keys.addr), &sim.url());
    let cfg = ProbeConfig::from_toml(&text).unwrap();
    let r = run_probe(&cfg).await;
    eprintln!("{}", r.summary());
    for name in ["unsigned", "tampered", "replayed", "cross_tenant_key"] {
        let (o, why) = outcome(&r, name);
        assert_eq!(o, Outcome::Fail, "{}", r.summary());
        assert!(why.starts_with("accepted"), "{why}");
    }
    let (o, why) = outcome(&r, "client_salt_ignored");
    assert_eq!(o, Outcome::Fail, "{}", r.summary());
    assert!(why.contains("reaches the server"), "{why}");
    assert_eq!(outcome(&r, "cross_tenant_cache").0, Outcome::Fail);
    assert_eq!(r.exit_code(), exit::FAILED);
    keys.shutdown().await;
    sim.stop().await;
}
