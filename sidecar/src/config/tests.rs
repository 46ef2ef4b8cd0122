use super::*;

fn base() -> String {
    r#"
[upstream]
url = "http://127.0.0.1:8000"
[tenants.acme]
requests_per_minute = 10
[[keys]]
id = "gw"
secret_files = ["/nonexistent"]
tenants = ["*"]
"#
    .to_string()
}

#[test]
fn example_config_is_valid() {
    Config::from_toml(EXAMPLE_CONFIG).unwrap();
}

#[test]
fn errors_name_the_field() {
    let bad = base().replace("requests_per_minute = 10", "requests_per_minute = 0");
    let e = Config::from_toml(&bad).unwrap_err().to_string();
    assert!(e.contains("tenants.acme.requests_per_minute"), "{e}");
    let bad = base().replace("http://127.0.0.1:8000", "ftp://x");
    let e = Config::from_toml(&bad).unwrap_err().to_string();
    assert!(e.contains("upstream.url"), "{e}");
    let bad = base().replace("[\"*\"]", "[\"nobody\"]");
    let e = Config::from_toml(&bad).unwrap_err().to_string();
    assert!(e.contains("keys[0].tenants"), "{e}");
    let bad = base() + "\nbogus = 1\n";
    assert!(Config::from_toml(&bad).is_err());
}

#[test]
fn tenant_names_follow_the_shared_rule() {
    let named = |name: &str| base().replace("[tenants.acme]", &format!("[tenants.{name:?}]"));
    // Reserved names (the node agent's metric labels of no tenant), in any letter case.
    for (name, reserved) in [
        ("untagged", "untagged"),
        ("Shared", "shared"),
        ("UNATTRIBUTED", "unattributed"),
    ] {
        let e = Config::from_toml(&named(name)).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "config field `tenants.{name}`: tenant name is reserved: {reserved:?} \
                 (in any letter case) labels metrics of no single tenant"
            )
        );
    }
    let e = Config::from_toml(&named("a b")).unwrap_err().to_string();
    assert_eq!(
        e,
        "config field `tenants.a b`: tenant name has the character ' ' at position 2; \
         use letters, digits, '.', '_' and '-'"
    );
    let e = Config::from_toml(&named("-a")).unwrap_err().to_string();
    assert!(
        e.contains("`tenants.-a`: tenant name starts with '-'"),
        "{e}"
    );
    let e = Config::from_toml(&named(&"x".repeat(65)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tenant name is 65 bytes long; at most 64 are allowed"),
        "{e}"
    );
    Config::from_toml(&named("a.b_c-9")).unwrap();
}

#[test]
fn isolation_tiers_need_a_capable_upstream() {
    let salted = base().replace(
        "requests_per_minute = 10",
        "requests_per_minute = 10\nisolation = \"salted\"",
    );
    let e = Config::from_toml(&salted).unwrap_err().to_string();
    assert!(
        e.contains("tenants.acme.isolation") && e.contains("openai"),
        "{e}"
    );
    let excl = base().replace(
        "requests_per_minute = 10",
        "requests_per_minute = 10\nisolation = \"exclusive\"",
    );
    let e = Config::from_toml(&excl).unwrap_err().to_string();
    assert!(e.contains("tenants.acme.isolation"), "{e}");
    let vllm = |t: &str| t.replace("8000\"", "8000\"\nflavor = \"vllm\"");
    Config::from_toml(&vllm(&excl)).unwrap();
    let e = Config::from_toml(&vllm(&salted)).unwrap_err().to_string();
    assert!(e.contains("cache.salt_key_file"), "{e}");
    let ok = vllm(&salted) + "[cache]\nsalt_key_file = \"/k\"\n";
    let c = Config::from_toml(&ok).unwrap();
    assert_eq!(c.tenants["acme"].isolation, Isolation::Salted);
    let bad = base().replace("8000\"", "8000\"\nflavor = \"tgi\"");
    assert!(Config::from_toml(&bad).is_err());
}

#[test]
fn audit_limits_are_validated() {
    let with = |extra: &str| base() + "[audit]\n" + extra;
    let c = Config::from_toml(&with("")).unwrap();
    assert_eq!(c.audit.max_file_bytes, 64 << 20);
    assert_eq!(c.audit.max_total_bytes, 512 << 20);
    assert_eq!(c.audit.unauthenticated_per_second, 100);
    for (extra, field) in [
        ("max_file_bytes = 1000", "audit.max_file_bytes"),
        (
            "max_file_bytes = 2000000\nmax_total_bytes = 1000000",
            "audit.max_file_bytes",
        ),
        (
            "max_file_bytes = 65536\nmax_total_bytes = 1000000000",
            "audit.max_total_bytes",
        ),
        // acme and _unauthenticated: 2 x 128 KiB at least.
        (
            "max_file_bytes = 65536\nmax_total_bytes = 200000",
            "audit.max_total_bytes",
        ),
        (
            "unauthenticated_per_second = 0",
            "audit.unauthenticated_per_second",
        ),
        ("unauthenticated_burst = 0", "audit.unauthenticated_burst"),
    ] {
        let e = Config::from_toml(&with(extra)).unwrap_err().to_string();
        assert!(e.contains(field), "{extra}: {e}");
    }
    Config::from_toml(&with("max_file_bytes = 65536\nmax_total_bytes = 262144")).unwrap();
    assert!(Config::from_toml(&with("max_bytes = 1")).is_err());
}

#[test]
fn drain_timeout_is_validated() {
    let c = Config::from_toml(&base()).unwrap();
    assert_eq!(c.cache.exclusive_drain_timeout_ms, 5000);
    assert!(!c.cache.flush_refused_while_busy);
    let cache = |extra: &str| format!("{}[cache]\n{extra}\n", base());
    let e = Config::from_toml(&cache("exclusive_drain_timeout_ms = 0"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cache.exclusive_drain_timeout_ms"), "{e}");
    // Trusting a flush to vouch for running requests needs a bound past the connect
    // timeout (2000 ms by default).
    let e = Config::from_toml(&cache(
        "flush_refused_while_busy = true\nexclusive_drain_timeout_ms = 2000",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("cache.exclusive_drain_timeout_ms") && e.contains("connect_timeout_ms"),
        "{e}"
    );
    let c = Config::from_toml(&cache(
        "flush_refused_while_busy = true\nexclusive_drain_timeout_ms = 2001",
    ))
    .unwrap();
    assert_eq!(c.cache.exclusive_drain_timeout_ms, 2001);
}

#[test]
fn limits_backend_is_validated() {
    let c = Config::from_toml(&base()).unwrap();
    assert_eq!(c.limits.backend, LimitsBackend::Local);
    assert!(c.limits.redis.is_none());
    let with = |extra: &str| format!("{}[limits]\n{extra}\n", base());
    let redis = |extra: &str| {
        with(&format!(
            "backend = \"redis\"\n[limits.redis]\nurl = \"redis://127.0.0.1:6379/\"\n{extra}"
        ))
    };
    let c = Config::from_toml(&redis("")).unwrap();
    let r = c.limits.redis.unwrap();
    assert_eq!(r.mode, LimitsMode::Strict);
    assert_eq!(r.on_backend_failure, BackendFailure::Local);
    assert_eq!(r.key_prefix, "bulkhead:");
    assert_eq!((r.command_timeout_ms, r.expected_replicas), (100, 1));
    for (text, field) in [
        (with("backend = \"redis\""), "limits.redis"),
        (
            with("backend = \"redis\"\n[limits.redis]\n"),
            "limits.redis.url",
        ),
        (redis("urls = [\"redis://a:1\"]"), "limits.redis.urls"),
        (
            with("backend = \"redis\"\n[limits.redis]\nurl = \"rediss://h/\""),
            "limits.redis.url",
        ),
        (
            with("backend = \"redis\"\n[limits.redis]\nurls = [\"redis://a:1\", \"http://b\"]"),
            "limits.redis.urls[1]",
        ),
        (
            redis("command_timeout_ms = 0"),
            "limits.redis.command_timeout_ms",
        ),
        (
            redis("connect_timeout_ms = 0"),
            "limits.redis.connect_timeout_ms",
        ),
        (redis("key_prefix = \"a{b}\""), "limits.redis.key_prefix"),
        (redis("lease_tokens = 0"), "limits.redis.lease_tokens"),
        (redis("lease_requests = 0"), "limits.redis.lease_requests"),
        (
            redis("concurrency_lease_ms = 100"),
            "limits.redis.concurrency_lease_ms",
        ),
        (
            redis("concurrency_lease_ms = 600\ncommand_timeout_ms = 300"),
            "limits.redis.concurrency_lease_ms",
        ),
        (
            redis("expected_replicas = 0"),
            "limits.redis.expected_replicas",
        ),
    ] {
        let e = Config::from_toml(&text).unwrap_err().to_string();
        assert!(e.contains(&format!("`{field}`")), "{text}: {e}");
    }
    assert!(Config::from_toml(&redis("mode = \"eventual\"")).is_err());
    assert!(Config::from_toml(&redis("on_backend_failure = \"open\"")).is_err());
    assert!(Config::from_toml(&redis("bogus = 1")).is_err());
    let c = Config::from_toml(&redis(
        "mode = \"leased\"\non_backend_failure = \"deny\"\nexpected_replicas = 3",
    ))
    .unwrap();
    let r = c.limits.redis.unwrap();
    assert_eq!(
        (r.mode, r.on_backend_failure, r.expected_replicas),
        (LimitsMode::Leased, BackendFailure::Deny, 3)
    );
}

/// The configurations in deploy/'s ConfigMaps parse and validate (the shared-limits one
/// on Redis).
#[test]
fn deploy_example_configs_are_valid() {
    for (file, backend) in [
        ("example-vllm/sidecar-configmap.yaml", LimitsBackend::Local),
        (
            "example-shared-limits/sidecar-configmap.yaml",
            LimitsBackend::Redis,
        ),
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(file);
        let yaml = std::fs::read_to_string(&path).unwrap();
        let toml: String = yaml
            .lines()
            .skip_while(|l| l.trim() != "sidecar.toml: |")
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
            .collect();
        let c = Config::from_toml(&toml).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(c.limits.backend, backend, "{file}");
    }
}

#[test]
fn kv_bytes_per_token() {
    let m = ModelConfig {
        layers: 32,
        kv_heads: 8,
        head_dim: 128,
        dtype: Dtype::Bf16,
        media_part_tokens: 4096,
    };
    assert_eq!(m.kv_bytes_per_token(), 131_072);
    let m = ModelConfig {
        dtype: Dtype::Fp8,
        ..m
    };
    assert_eq!(m.kv_bytes_per_token(), 65_536);
}

#[test]
fn missing_key_file_is_reported() {
    let cfg = Config::from_toml(&base()).unwrap();
    let e = cfg.load_keys().unwrap_err().to_string();
    assert!(e.contains("keys[0].secret_files[0]"), "{e}");
}

#[test]
fn body_field_settings_are_validated() {
    let tenant = |extra: &str| {
        base().replace(
            "requests_per_minute = 10",
            &format!("requests_per_minute = 10\n{extra}"),
        )
    };
    let vllm = |t: String| t.replace("8000\"", "8000\"\nflavor = \"vllm\"");
    let err = |t: &str| Config::from_toml(t).unwrap_err().to_string();
    // Extra fields: never an engine field.
    let c = Config::from_toml(&tenant("extra_fields = [\"x_trace\"]")).unwrap();
    assert_eq!(c.tenants["acme"].extra_fields, ["x_trace"]);
    let e = err(&tenant("extra_fields = [\"kv_transfer_params\"]"));
    assert!(
        e.contains("tenants.acme.extra_fields") && e.contains("trusted_engine_fields"),
        "{e}"
    );
    assert!(err(&tenant("extra_fields = [\"\"]")).contains("tenants.acme.extra_fields"));
    // Trusted engine fields: only those the schema classes as such.
    Config::from_toml(&tenant(
        "trusted_engine_fields = [\"kv_transfer_params\", \"lora_path\"]",
    ))
    .unwrap();
    for f in ["priority", "request_id", "temperature", "nonsense"] {
        let e = err(&tenant(&format!("trusted_engine_fields = [\"{f}\"]")));
        assert!(e.contains("tenants.acme.trusted_engine_fields"), "{f}: {e}");
    }
    // A priority needs an engine that reads one.
    assert!(err(&tenant("priority = 2")).contains("tenants.acme.priority"));
    let c = Config::from_toml(&vllm(tenant("priority = -2\nstore_responses = true"))).unwrap();
    assert_eq!(
        (
            c.tenants["acme"].priority,
            c.tenants["acme"].store_responses
        ),
        (-2, true)
    );
    // Identity headers: lowercase, end-to-end header names; the defaults when absent.
    assert_eq!(
        Config::from_toml(&base())
            .unwrap()
            .upstream
            .identity_headers,
        ["x-gateway-inference-fairness-id", "x-tenant-id"]
    );
    for bad in ["\"X-Tenant\"", "\"bad header\"", "\"connection\""] {
        let t = base().replace("8000\"", &format!("8000\"\nidentity_headers = [{bad}]"));
        assert!(err(&t).contains("upstream.identity_headers"), "{bad}");
    }
}

#[test]
fn telemetry_is_off_by_default_and_its_errors_name_the_field() {
    let c = Config::from_toml(&base()).unwrap();
    assert_eq!(c.telemetry.otlp, None);
    assert!(!c.tenants["acme"].trust_traceparent);
    let otlp = |extra: &str| {
        base() + &format!("\n[telemetry.otlp]\nendpoint = \"http://collector:4318\"\n{extra}\n")
    };
    let c = Config::from_toml(&otlp("")).unwrap();
    let o = c.telemetry.otlp.unwrap();
    assert_eq!(o.sample_ratio, 0.1);
    assert_eq!((o.max_queue_spans, o.max_batch_spans), (4096, 512));
    assert_eq!(o.service_name, "bulkhead-sidecar");
    for (extra, field) in [
        ("sample_ratio = 1.5", "telemetry.otlp.sample_ratio"),
        ("sample_ratio = -0.1", "telemetry.otlp.sample_ratio"),
        ("max_queue_spans = 0", "telemetry.otlp.max_queue_spans"),
        (
            "max_queue_spans = 10\nmax_batch_spans = 11",
            "telemetry.otlp.max_batch_spans",
        ),
        ("timeout_ms = 0", "telemetry.otlp.timeout_ms"),
        (
            "export_interval_ms = 0",
            "telemetry.otlp.export_interval_ms",
        ),
        ("service_name = \"\"", "telemetry.otlp.service_name"),
    ] {
        let e = Config::from_toml(&otlp(extra)).unwrap_err().to_string();
        assert!(e.contains(field), "{extra}: {e}");
    }
    for endpoint in [
        "https://collector:4318",
        "collector:4318",
        "http://c:4318/?a=b",
    ] {
        let bad = base() + &format!("\n[telemetry.otlp]\nendpoint = \"{endpoint}\"\n");
        let e = Config::from_toml(&bad).unwrap_err().to_string();
        assert!(e.contains("telemetry.otlp.endpoint"), "{endpoint}: {e}");
    }
    let trusted = base().replace(
        "requests_per_minute = 10",
        "requests_per_minute = 10\ntrust_traceparent = true",
    );
    assert!(Config::from_toml(&trusted).unwrap().tenants["acme"].trust_traceparent);
}

/// Every key file goes through one reader: base64 (whitespace around it ignored) or, for
/// `keys[].encoding = "raw"`, the bytes as they are; at least 16 bytes; errors name the field.
#[test]
fn key_files_share_one_reader() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, content: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    };
    let good = write("good", b"  MDEyMzQ1Njc4OWFiY2RlZg==\n");
    let short = write("short", b"MDEyMzQ1Njc4OWFiY2Rl\n");
    let not_b64 = write("bad", b"0123456789abcdef0123!");
    let binary = write("bin", &[0xff; 20]);
    assert_eq!(read_key_file(&good, "f").unwrap(), b"0123456789abcdef");
    for (p, why) in [
        (&short, "key shorter than 16 bytes"),
        (&not_b64, "not valid base64"),
        (&binary, "not valid base64"),
    ] {
        let e = read_key_file(p, "cache.salt_key_file").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("config field `cache.salt_key_file`: {why}")
        );
    }
    let e = read_key_file_as(&write("raw", b"0123456789abcde"), "f", KeyEncoding::Raw);
    assert!(e.unwrap_err().to_string().contains("shorter than 16 bytes"));
    // The same rules for an HMAC key, naming the file's place in the config.
    let keys = |file: &std::path::Path, encoding: &str| {
        let text = base().replace("/nonexistent", &file.display().to_string())
            + &format!("encoding = \"{encoding}\"\n");
        Config::from_toml(&text).unwrap().load_keys()
    };
    assert_eq!(
        keys(&good, "base64").unwrap()[0].secrets[0],
        b"0123456789abcdef"
    );
    for (p, encoding, why) in [
        (&short, "base64", "key shorter than 16 bytes"),
        (&binary, "base64", "not valid base64"),
        (
            &write("raw15", b"0123456789abcde"),
            "raw",
            "key shorter than 16 bytes",
        ),
    ] {
        let e = keys(p, encoding).unwrap_err().to_string();
        assert_eq!(e, format!("config field `keys[0].secret_files[0]`: {why}"));
    }
    // A raw key is its bytes, newline included.
    let raw = keys(&write("raw16", b"0123456789abcde\n"), "raw").unwrap();
    assert_eq!(raw[0].secrets[0], b"0123456789abcde\n");
}

/// Fields without a default are required by validation, whose error names them (every
/// section takes its absent fields from its `Default`).
#[test]
fn required_fields_are_named() {
    let err = |t: &str| Config::from_toml(t).unwrap_err().to_string();
    assert!(err("").contains("`upstream.url`: required"));
    assert!(
        err(&base().replace("url = \"http://127.0.0.1:8000\"", ""))
            .contains("`upstream.url`: required")
    );
    let e = err(&(base() + "\n[telemetry.otlp]\nsample_ratio = 0.5\n"));
    assert!(e.contains("`telemetry.otlp.endpoint`: required"), "{e}");
    let e = err(&base().replace("id = \"gw\"\n", ""));
    assert!(e.contains("`keys[0].id`"), "{e}");
    let e = err(&base().replace("secret_files = [\"/nonexistent\"]\n", ""));
    assert!(e.contains("`keys[0].secret_files`"), "{e}");
    let e = err(&(base() + "[auth.jwt]\naudiences = [\"bh\"]\njwks_file = \"/j\"\n"));
    assert!(e.contains("`auth.jwt.issuers`"), "{e}");
    // An absent section is its default.
    let c = Config::from_toml(&base()).unwrap();
    assert_eq!(
        (&c.http, &c.cache, &c.audit),
        (
            &HttpLimits::default(),
            &CacheConfig::default(),
            &AuditConfig::default()
        )
    );
}
