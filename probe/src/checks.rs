//! The isolation checks, run in order against a live sidecar as two test tenants A and B.

use crate::client::{Answer, CHAT_PATH, Http, HttpError, Prepared, metric_sum};
use crate::config::{ProbeConfig, TenantCreds};
use crate::report::{CheckResult, Report};
use crate::sse;
use bytes::Bytes;
use http::Method;
use std::time::{Duration, Instant, SystemTime};

/// Every check, in the order they run.
pub const CHECKS: [&str; 10] = [
    "signed_accepted",
    "unsigned",
    "tampered",
    "replayed",
    "cross_tenant_key",
    "client_salt_ignored",
    "cross_tenant_cache",
    "canary_not_returned",
    "canary_prompt_blocked",
    "tagged_bytes",
];

/// The agent's per-tenant byte counter (agent/src/metrics.rs).
pub const AGENT_BYTES_METRIC: &str = "bulkhead_network_bytes_total";
/// The sidecar's canary counter.
pub const CANARY_METRIC: &str = "bulkhead_canary_hits_total";
/// The sidecar's per-tenant request counter (every finished request, by status code).
pub const REQUESTS_METRIC: &str = "bulkhead_requests_total";

/// What the sidecar's metrics said before `canary_not_returned`.
struct SidecarCounts {
    /// Tenant B's finished requests.
    b_requests: f64,
    /// Canaries of any tenant seen in any tenant's response.
    response_hits: f64,
    /// A's canaries seen in B's responses.
    pair_hits: f64,
}

/// What a client of one answer sees of the canary.
struct ClientView {
    /// Where the canary was (`streamed: choice 0, delta.content`).
    found: Vec<String>,
    /// The sidecar cut or withheld it (`canary_blocked`).
    canary_blocked: bool,
    /// Events of a stream.
    events: usize,
}

impl ClientView {
    /// A streamed answer's SSE events reassembled per choice and field (a body that is one
    /// JSON document, an error, is read as a whole answer); a whole answer's every string
    /// value. The raw bytes are searched too, for what no decoding shows.
    fn of(ans: &Answer, stream: bool, canary: &str) -> Self {
        let how = if stream { "streamed" } else { "not streamed" };
        let (mut found, mut canary_blocked, mut events) = (Vec::new(), false, 0);
        let json = serde_json::from_slice::<serde_json::Value>(&ans.body).ok();
        match json {
            Some(v) => {
                found = sse::find_in_value(&v, canary);
                canary_blocked =
                    v.pointer("/error/code").and_then(|c| c.as_str()) == Some("canary_blocked");
            }
            None if stream => {
                let t = sse::Transcript::from_sse(&ans.body);
                found = t.find(canary);
                canary_blocked = t.canary_blocked;
                events = t.events;
            }
            None => {}
        }
        let mut found: Vec<String> = found.into_iter().map(|l| format!("{how}: {l}")).collect();
        if found.is_empty() && sse::contains(&String::from_utf8_lossy(&ans.body), canary) {
            found.push(format!("{how}: the raw body"));
        }
        Self {
            found,
            canary_blocked: canary_blocked || ans.code.as_deref() == Some("canary_blocked"),
            events,
        }
    }
}

/// `text` with every occurrence of `secret` (ASCII case-insensitively) replaced by `<canary>`.
fn mask(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        return text.to_string();
    }
    // ASCII lowercasing keeps every byte offset (and char boundary) in place.
    let (hay, needle) = (text.to_ascii_lowercase(), secret.to_ascii_lowercase());
    let mut out = String::new();
    let mut at = 0;
    while let Some(i) = hay[at..].find(&needle) {
        out.push_str(&text[at..at + i]);
        out.push_str("<canary>");
        at += i + needle.len();
    }
    out.push_str(&text[at..]);
    out
}

/// Why an optional check does not run with this configuration.
fn skip_reason(cfg: &ProbeConfig, check: &str) -> Option<&'static str> {
    match check {
        "canary_not_returned" | "canary_prompt_blocked" if cfg.canary.is_none() => {
            Some("no canary of tenant A given (canary_file)")
        }
        "tagged_bytes" if cfg.agent_metrics_url.is_none() => {
            Some("no agent metrics URL given (agent_metrics_url)")
        }
        _ => None,
    }
}

/// Run every check within `cfg.timeout`; checks the timeout cut off are failed.
pub async fn run_probe(cfg: &ProbeConfig) -> Report {
    let started = SystemTime::now();
    let t0 = Instant::now();
    let mut results = Vec::new();
    let finished = tokio::time::timeout(cfg.timeout, run_checks(cfg, &mut results))
        .await
        .is_ok();
    if !finished {
        for name in CHECKS {
            if results.iter().any(|c: &CheckResult| c.name == name) {
                continue;
            }
            results.push(match skip_reason(cfg, name) {
                Some(why) => CheckResult::skip(name, why),
                None => CheckResult::fail(
                    name,
                    format!(
                        "not finished: the probe's timeout ({} s) ran out",
                        cfg.timeout.as_secs()
                    ),
                ),
            });
        }
    }
    Report {
        checks: results,
        started,
        duration: t0.elapsed(),
    }
}

struct Ctx<'a> {
    cfg: &'a ProbeConfig,
    http: Http,
    model: Option<String>,
    words: Words,
}

async fn run_checks(cfg: &ProbeConfig, out: &mut Vec<CheckResult>) {
    let mut ctx = Ctx {
        cfg,
        http: Http::new(cfg),
        model: cfg.model.clone(),
        words: Words::new(),
    };
    // The agent's counter before any of the probe's traffic.
    let bytes_before = match &cfg.agent_metrics_url {
        Some(url) => Some(ctx.agent_bytes(url).await),
        None => None,
    };
    if ctx.model.is_none() {
        ctx.model = ctx.discover_model().await;
    }
    out.push(ctx.signed_accepted().await);
    out.push(ctx.unsigned().await);
    out.push(ctx.tampered().await);
    out.push(ctx.replayed().await);
    out.push(ctx.cross_tenant_key().await);
    out.push(ctx.client_salt_ignored().await);
    out.push(ctx.cross_tenant_cache().await);
    match cfg.canary.clone() {
        Some(canary) => {
            out.push(ctx.canary_not_returned(&canary).await);
            out.push(ctx.canary_prompt_blocked(&canary).await);
        }
        None => {
            for name in ["canary_not_returned", "canary_prompt_blocked"] {
                out.push(CheckResult::skip(
                    name,
                    skip_reason(cfg, name).unwrap_or(""),
                ));
            }
        }
    }
    out.push(match (&cfg.agent_metrics_url, bytes_before) {
        (Some(url), Some(before)) => ctx.tagged_bytes(url, before).await,
        _ => CheckResult::skip(
            "tagged_bytes",
            skip_reason(cfg, "tagged_bytes").unwrap_or(""),
        ),
    });
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

/// A refusal check: pass on 401 with one of `codes`.
fn expect_refusal(name: &'static str, a: Result<Answer, HttpError>, codes: &[&str]) -> CheckResult {
    let want = codes.join(" or ");
    match a {
        Err(e) => CheckResult::fail(name, format!("no answer: {e}")),
        Ok(a) if a.status.is_success() => CheckResult::fail(
            name,
            format!("accepted ({}), expected 401 {want}", a.describe()),
        ),
        Ok(a) if a.status == http::StatusCode::UNAUTHORIZED => match a.code.as_deref() {
            Some(c) if codes.contains(&c) => {
                CheckResult::pass(name, format!("refused: {}", a.describe()))
            }
            _ => CheckResult::fail(
                name,
                format!(
                    "refused for another reason ({}), expected 401 {want}: check the probe's tenants and keys",
                    a.describe()
                ),
            ),
        },
        Ok(a) => CheckResult::fail(
            name,
            format!("answered {}, expected 401 {want}", a.describe()),
        ),
    }
}

impl<'a> Ctx<'a> {
    fn a(&self) -> &'a TenantCreds {
        &self.cfg.tenant_a
    }

    fn b(&self) -> &'a TenantCreds {
        &self.cfg.tenant_b
    }

    fn chat_body(&self, prompt: &str, max_tokens: u32, stream: bool, salt: Option<&str>) -> Bytes {
        let mut v = serde_json::json!({
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
        });
        if let Some(m) = &self.model {
            v["model"] = serde_json::Value::String(m.clone());
        }
        if let Some(s) = salt {
            v["cache_salt"] = serde_json::Value::String(s.to_string());
        }
        Bytes::from(v.to_string())
    }

    /// A chat completion signed by `who` for itself.
    fn chat(
        &self,
        who: &TenantCreds,
        prompt: &str,
        max_tokens: u32,
        stream: bool,
        salt: Option<&str>,
    ) -> Result<Prepared, HttpError> {
        let body = self.chat_body(prompt, max_tokens, stream, salt);
        self.http
            .signed(who, &who.name, Method::POST, CHAT_PATH, body)
    }

    async fn send_chat(
        &self,
        who: &TenantCreds,
        prompt: &str,
        max_tokens: u32,
        stream: bool,
        salt: Option<&str>,
    ) -> Result<Answer, HttpError> {
        let p = self.chat(who, prompt, max_tokens, stream, salt)?;
        self.http.send(&p).await
    }

    /// The time to first token of a streamed one-token completion; an error unless 2xx.
    async fn ttft(
        &self,
        who: &TenantCreds,
        prompt: &str,
        salt: Option<&str>,
    ) -> Result<Duration, String> {
        match self.send_chat(who, prompt, 1, true, salt).await {
            Ok(a) if a.status.is_success() => Ok(a.first_byte),
            Ok(a) => Err(format!(
                "a request of tenant {} answered {}",
                who.name,
                a.describe()
            )),
            Err(e) => Err(format!("a request of tenant {} failed: {e}", who.name)),
        }
    }

    async fn discover_model(&self) -> Option<String> {
        let p = self
            .http
            .signed(
                self.a(),
                &self.a().name,
                Method::GET,
                "/v1/models",
                Bytes::new(),
            )
            .ok()?;
        let a = self.http.send(&p).await.ok()?;
        if !a.status.is_success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&a.body).ok()?;
        v.pointer("/data/0/id")?.as_str().map(str::to_string)
    }

    async fn signed_accepted(&mut self) -> CheckResult {
        const NAME: &str = "signed_accepted";
        let mut seen = Vec::new();
        for who in [self.a(), self.b()] {
            let prompt = self.words.prompt(8);
            match self.send_chat(who, &prompt, 1, false, None).await {
                Ok(a) if a.status.is_success() => {
                    seen.push(format!("{} {}", who.name, a.describe()))
                }
                Ok(a) => {
                    return CheckResult::fail(
                        NAME,
                        format!(
                            "tenant {}'s signed request answered {}: check its key id, key file and the sidecar's [[keys]] and tenants",
                            who.name,
                            a.describe()
                        ),
                    );
                }
                Err(e) => return CheckResult::fail(NAME, format!("tenant {}: {e}", who.name)),
            }
        }
        CheckResult::pass(
            NAME,
            format!("both test tenants are served ({})", seen.join(", ")),
        )
    }

    async fn unsigned(&mut self) -> CheckResult {
        let prompt = self.words.prompt(8);
        let body = self.chat_body(&prompt, 1, false, None);
        let p = self
            .http
            .unsigned(&self.a().name, Method::POST, CHAT_PATH, body);
        expect_refusal("unsigned", self.http.send(&p).await, &["missing"])
    }

    async fn tampered(&mut self) -> CheckResult {
        const NAME: &str = "tampered";
        let prompt = self.words.prompt(8);
        let mut p = match self.chat(self.a(), &prompt, 1, false, None) {
            Ok(p) => p,
            Err(e) => return CheckResult::fail(NAME, e.to_string()),
        };
        // The body changed after signing (the signature covers its digest).
        p.body = self.chat_body(&format!("{prompt} tampered"), 1, false, None);
        expect_refusal(
            NAME,
            self.http.send(&p).await,
            &["digest_mismatch", "bad_signature"],
        )
    }

    async fn replayed(&mut self) -> CheckResult {
        const NAME: &str = "replayed";
        let prompt = self.words.prompt(8);
        let p = match self.chat(self.a(), &prompt, 1, false, None) {
            Ok(p) => p,
            Err(e) => return CheckResult::fail(NAME, e.to_string()),
        };
        match self.http.send(&p).await {
            Ok(a) if a.status.is_success() => {}
            Ok(a) => {
                return CheckResult::fail(
                    NAME,
                    format!("inconclusive: the first send answered {}", a.describe()),
                );
            }
            Err(e) => return CheckResult::fail(NAME, format!("inconclusive: the first send: {e}")),
        }
        expect_refusal(NAME, self.http.send(&p).await, &["replayed"])
    }

    async fn cross_tenant_key(&mut self) -> CheckResult {
        const NAME: &str = "cross_tenant_key";
        let prompt = self.words.prompt(8);
        let body = self.chat_body(&prompt, 1, false, None);
        let (a, b) = (self.a(), self.b());
        let p = match self.http.signed(a, &b.name, Method::POST, CHAT_PATH, body) {
            Ok(p) => p,
            Err(e) => return CheckResult::fail(NAME, e.to_string()),
        };
        let r = self.http.send(&p).await;
        if let Ok(ans) = &r
            && ans.status.is_success()
        {
            return CheckResult::fail(
                NAME,
                format!(
                    "accepted ({}): key {} of tenant {} may act for tenant {} (bound to \"*\" or to both)",
                    ans.describe(),
                    a.key_id,
                    a.name,
                    b.name
                ),
            );
        }
        expect_refusal(NAME, r, &["tenant_mismatch"])
    }

    /// As B: a fresh prompt with client salt s1 (a miss), again with s2 (a hit only if the
    /// server never sees the client's salt), again with s1 (a hit in any case: the control).
    async fn client_salt_ignored(&mut self) -> CheckResult {
        const NAME: &str = "client_salt_ignored";
        let n = self.cfg.timing.prompt_words;
        let (mut miss, mut other, mut same) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.cfg.timing.samples {
            let prompt = self.words.prompt(n);
            let s1 = format!("probe-salt-{:016x}", self.words.next());
            let s2 = format!("probe-salt-{:016x}", self.words.next());
            let b = self.b();
            for (salt, into) in [(&s1, &mut miss), (&s2, &mut other), (&s1, &mut same)] {
                match self.ttft(b, &prompt, Some(salt)).await {
                    Ok(t) => into.push(t),
                    Err(e) => return CheckResult::fail(NAME, e),
                }
            }
        }
        let (miss, other, same) = (median(miss), median(other), median(same));
        let limit = miss.mul_f64(self.cfg.timing.hit_ratio);
        let figures = format!(
            "medians: miss {}, other salt {}, same salt {}",
            ms(miss),
            ms(other),
            ms(same)
        );
        if same >= limit {
            CheckResult::fail(
                NAME,
                format!(
                    "inconclusive: no measurable prefix cache (a repeat with the same salt is not faster; {figures})"
                ),
            )
        } else if other < limit {
            CheckResult::pass(
                NAME,
                format!(
                    "a different client cache_salt still hits: the server never sees it ({figures})"
                ),
            )
        } else {
            CheckResult::fail(
                NAME,
                format!(
                    "the client's cache_salt reaches the server: a different salt misses ({figures})"
                ),
            )
        }
    }

    /// A sends a fresh prompt P twice (the control: the second must hit); B sends P (must be
    /// no faster than B's miss on another fresh prompt of the same size).
    async fn cross_tenant_cache(&mut self) -> CheckResult {
        const NAME: &str = "cross_tenant_cache";
        let n = self.cfg.timing.prompt_words;
        let (mut a_miss, mut a_hit, mut b_miss, mut b_probe) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..self.cfg.timing.samples {
            let p = self.words.prompt(n);
            let q = self.words.prompt(n);
            let (a, b) = (self.a(), self.b());
            let mut steps = vec![(a, &p, &mut a_miss), (a, &p, &mut a_hit)];
            // Alternate B's order, so drift does not favour one side.
            if i % 2 == 0 {
                steps.push((b, &q, &mut b_miss));
                steps.push((b, &p, &mut b_probe));
            } else {
                steps.push((b, &p, &mut b_probe));
                steps.push((b, &q, &mut b_miss));
            }
            for (who, prompt, into) in steps {
                match self.ttft(who, prompt, None).await {
                    Ok(t) => into.push(t),
                    Err(e) => return CheckResult::fail(NAME, e),
                }
            }
        }
        let ratio = self.cfg.timing.hit_ratio;
        let (a_miss, a_hit, b_miss, b_probe) = (
            median(a_miss),
            median(a_hit),
            median(b_miss),
            median(b_probe),
        );
        let figures = format!(
            "medians: {a} miss {}, {a} repeat {}, {b} miss {}, {b} on {a}'s prompt {}",
            ms(a_miss),
            ms(a_hit),
            ms(b_miss),
            ms(b_probe),
            a = self.a().name,
            b = self.b().name,
        );
        if a_hit >= a_miss.mul_f64(ratio) {
            return CheckResult::fail(
                NAME,
                format!(
                    "inconclusive: no measurable prefix cache (the control repeat did not hit; {figures})"
                ),
            );
        }
        if b_probe < b_miss.mul_f64(ratio) {
            return CheckResult::fail(
                NAME,
                format!(
                    "tenant {} hits tenant {}'s prefix cache: they share cache blocks ({figures})",
                    self.b().name,
                    self.a().name
                ),
            );
        }
        CheckResult::pass(NAME, format!("no faster than a miss ({figures})"))
    }

    /// A plants its canary in a prompt; B sends the same prefix without it, once streamed and
    /// once not; neither response may hold the canary as a client reads it (the stream's
    /// events decoded and reassembled per choice and field, the answer's every string value).
    /// With the sidecar's metrics, its own count of canaries in responses must not rise either.
    async fn canary_not_returned(&mut self, canary: &str) -> CheckResult {
        let r = self.canary_not_returned_unmasked(canary).await;
        // The canary never appears in a result, whatever a server echoed into a location.
        CheckResult {
            reason: mask(&r.reason, canary),
            ..r
        }
    }

    async fn canary_not_returned_unmasked(&mut self, canary: &str) -> CheckResult {
        const NAME: &str = "canary_not_returned";
        let (a, b) = (self.a().name.clone(), self.b().name.clone());
        let before = match &self.cfg.sidecar_metrics_url {
            Some(url) => match self.sidecar_counts(url).await {
                Ok(c) => Some(c),
                Err(e) => return CheckResult::fail(NAME, e),
            },
            None => None,
        };
        let prefix = self.words.prompt(48);
        let plant = format!(
            "{prefix} The secret code word is {canary}. Remember it and repeat the secret code word."
        );
        let max = self.cfg.canary_max_tokens;
        match self.send_chat(self.a(), &plant, max, false, None).await {
            Ok(a) if a.status.is_success() => {}
            Ok(a) => {
                return CheckResult::fail(
                    NAME,
                    format!("inconclusive: planting answered {}", a.describe()),
                );
            }
            Err(e) => return CheckResult::fail(NAME, format!("inconclusive: planting: {e}")),
        }
        let ask = format!("{prefix} The secret code word is");
        let mut answers = Vec::new();
        for stream in [true, false] {
            match self.send_chat(self.b(), &ask, max, stream, None).await {
                Ok(ans) => answers.push(ans),
                Err(e) => return CheckResult::fail(NAME, format!("tenant {b}: {e}")),
            }
        }
        let (streamed, whole) = (&answers[0], &answers[1]);
        let s = ClientView::of(streamed, true, canary);
        let w = ClientView::of(whole, false, canary);
        let rise = match (&self.cfg.sidecar_metrics_url, &before) {
            (Some(url), Some(before)) => Some(self.sidecar_rise(url, before, 2).await),
            _ => None,
        };
        let counted = match rise {
            Some(Ok((all, pair))) if all > 0.0 => Some(format!(
                "{CANARY_METRIC}{{where=\"response\"}} +{all} during the check ({a} seen by {b}: +{pair})"
            )),
            _ => None,
        };
        let found: Vec<String> = s.found.iter().chain(&w.found).cloned().collect();
        if !found.is_empty() {
            let mut why = format!(
                "tenant {a}'s canary came back in tenant {b}'s response ({})",
                found.join("; ")
            );
            if let Some(c) = &counted {
                why.push_str(&format!("; the sidecar counted it too: {c}"));
            }
            return CheckResult::fail(NAME, why);
        }
        if s.canary_blocked || w.canary_blocked {
            let mut why = format!(
                "the inference server produced tenant {a}'s canary for tenant {b}; the sidecar cut the response (canary_blocked, {})",
                match (s.canary_blocked, w.canary_blocked) {
                    (true, true) => "streamed and not",
                    (true, false) => "streamed",
                    _ => "not streamed",
                }
            );
            if let Some(c) = &counted {
                why.push_str(&format!("; {c}"));
            }
            return CheckResult::fail(NAME, why);
        }
        // What the client saw is reported above even when the sidecar's count is unknown.
        if let Some(Err(e)) = rise {
            return CheckResult::fail(NAME, e);
        }
        if let Some(c) = counted {
            return CheckResult::fail(
                NAME,
                format!(
                    "the sidecar counted another tenant's canary in a response: {c}, while tenant {b}'s responses held none as a client reads them (the sidecar may have cut it, or a tenant's response outside the probe carried one)"
                ),
            );
        }
        for ans in [streamed, whole] {
            if !ans.status.is_success() {
                return CheckResult::fail(
                    NAME,
                    format!(
                        "inconclusive: tenant {b}'s request answered {}",
                        ans.describe()
                    ),
                );
            }
        }
        let mut why = format!(
            "tenant {b}'s responses hold no trace of the canary (streamed: {} events, {} bytes, reassembled per choice and field; not streamed: {} bytes)",
            s.events,
            streamed.body.len(),
            whole.body.len()
        );
        if rise.is_some() {
            why.push_str(&format!(
                "; the sidecar counted none ({CANARY_METRIC}{{where=\"response\"}} +0)"
            ));
        }
        CheckResult::pass(NAME, why)
    }

    /// The sidecar's counts that `canary_not_returned` compares; an error text when its
    /// metrics cannot be read.
    async fn sidecar_counts(&self, url: &str) -> Result<SidecarCounts, String> {
        let text = self
            .http
            .scrape(url)
            .await
            .map_err(|e| format!("cannot scrape the sidecar: {e}"))?;
        let (a, b) = (self.a().name.as_str(), self.b().name.as_str());
        Ok(SidecarCounts {
            b_requests: metric_sum(&text, REQUESTS_METRIC, &[("tenant", b)]).unwrap_or(0.0),
            response_hits: metric_sum(&text, CANARY_METRIC, &[("where", "response")])
                .unwrap_or(0.0),
            pair_hits: metric_sum(
                &text,
                CANARY_METRIC,
                &[("owner", a), ("seen_by", b), ("where", "response")],
            )
            .unwrap_or(0.0),
        })
    }

    /// The rise of the sidecar's canary counts in responses since `before` (all, and A's seen
    /// by B), read once the sidecar has finished B's `sent` requests (it counts a response's
    /// hits before it counts the request in `bulkhead_requests_total`).
    async fn sidecar_rise(
        &self,
        url: &str,
        before: &SidecarCounts,
        sent: u32,
    ) -> Result<(f64, f64), String> {
        let wait = Duration::from_secs(5).min(self.cfg.request_timeout);
        let deadline = Instant::now() + wait;
        loop {
            let now = self.sidecar_counts(url).await?;
            if now.b_requests >= before.b_requests + f64::from(sent) {
                return Ok((
                    now.response_hits - before.response_hits,
                    now.pair_hits - before.pair_hits,
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "inconclusive: the sidecar at {url} did not count tenant {}'s {sent} requests in {REQUESTS_METRIC} within {} s (+{}): is it the replica the probe reaches?",
                    self.b().name,
                    wait.as_secs(),
                    now.b_requests - before.b_requests
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// B's prompt holding A's canary is refused (403 canary_blocked) or, with the sidecar's
    /// metrics, counted in bulkhead_canary_hits_total{owner=A,seen_by=B,where="prompt"}.
    async fn canary_prompt_blocked(&mut self, canary: &str) -> CheckResult {
        const NAME: &str = "canary_prompt_blocked";
        let (a, b) = (self.a().name.clone(), self.b().name.clone());
        let labels = [
            ("owner", a.as_str()),
            ("seen_by", b.as_str()),
            ("where", "prompt"),
        ];
        let before = match &self.cfg.sidecar_metrics_url {
            Some(url) => match self.http.scrape(url).await {
                Ok(t) => Some(metric_sum(&t, CANARY_METRIC, &labels).unwrap_or(0.0)),
                Err(e) => {
                    return CheckResult::fail(NAME, format!("cannot scrape the sidecar: {e}"));
                }
            },
            None => None,
        };
        let prompt = format!(
            "{} {canary} {}",
            self.words.prompt(16),
            self.words.prompt(8)
        );
        let ans = match self.send_chat(self.b(), &prompt, 1, false, None).await {
            Ok(a) => a,
            Err(e) => return CheckResult::fail(NAME, format!("tenant {b}: {e}")),
        };
        if ans.status == http::StatusCode::FORBIDDEN
            && ans.code.as_deref() == Some("canary_blocked")
        {
            return CheckResult::pass(NAME, format!("refused: {}", ans.describe()));
        }
        if !ans.status.is_success() {
            return CheckResult::fail(
                NAME,
                format!(
                    "answered {}, expected 403 canary_blocked (or 200, counted)",
                    ans.describe()
                ),
            );
        }
        let (Some(url), Some(before)) = (&self.cfg.sidecar_metrics_url, before) else {
            return CheckResult::fail(
                NAME,
                format!(
                    "accepted ({}) and no sidecar_metrics_url to see it counted: on_canary = \"block\" refuses it",
                    ans.describe()
                ),
            );
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = match self.http.scrape(url).await {
                Ok(t) => metric_sum(&t, CANARY_METRIC, &labels),
                Err(e) => {
                    return CheckResult::fail(NAME, format!("cannot scrape the sidecar: {e}"));
                }
            };
            if let Some(v) = now
                && v > before
            {
                return CheckResult::pass(
                    NAME,
                    format!(
                        "accepted and counted ({CANARY_METRIC}{{owner={a},seen_by={b},where=prompt}} +{})",
                        v - before
                    ),
                );
            }
            if Instant::now() >= deadline {
                return CheckResult::fail(
                    NAME,
                    format!(
                        "accepted ({}) and not counted in {CANARY_METRIC}{{owner={a},seen_by={b},where=prompt}}: the sidecar does not know tenant {a}'s canary",
                        ans.describe()
                    ),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The agent's byte counter of tenant A (0 when absent); an error text when unreachable.
    async fn agent_bytes(&self, url: &str) -> Result<f64, String> {
        let text = self
            .http
            .scrape(url)
            .await
            .map_err(|e| format!("cannot scrape the agent: {e}"))?;
        Ok(metric_sum(&text, AGENT_BYTES_METRIC, &[("tenant", &self.a().name)]).unwrap_or(0.0))
    }

    async fn tagged_bytes(&self, url: &str, before: Result<f64, String>) -> CheckResult {
        const NAME: &str = "tagged_bytes";
        let before = match before {
            Ok(b) => b,
            Err(e) => return CheckResult::fail(NAME, e),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = match self.agent_bytes(url).await {
                Ok(v) => v,
                Err(e) => return CheckResult::fail(NAME, e),
            };
            if now > before {
                return CheckResult::pass(
                    NAME,
                    format!(
                        "{AGENT_BYTES_METRIC}{{tenant={}}} +{} over the probe's traffic",
                        self.a().name,
                        now - before
                    ),
                );
            }
            if Instant::now() >= deadline {
                return CheckResult::fail(
                    NAME,
                    format!(
                        "{AGENT_BYTES_METRIC}{{tenant={}}} did not grow over the probe's traffic ({before}): is the sidecar tagging its connections, and is this the agent of the sidecar's node?",
                        self.a().name
                    ),
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Fresh random prompts of common words (about one token each).
struct Words {
    state: u64,
}

const VOCAB: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as", "by", "at", "from",
    "river", "stone", "light", "green", "house", "market", "window", "garden", "paper", "music",
    "winter", "summer", "table", "road", "bridge", "cloud", "forest", "letter", "number", "yellow",
    "silver", "morning", "evening", "city", "village", "island", "mountain", "water", "bread",
    "coffee", "train", "ship", "horse", "bird", "apple", "orange", "chair", "door", "school",
    "story", "question", "answer", "little", "great", "small", "large", "quiet", "bright", "early",
    "late", "north", "south", "east", "west", "people", "friend", "teacher", "doctor", "farmer",
    "painter", "engine", "wheel", "clock", "field", "corner", "street", "ocean", "valley",
    "desert", "harbor", "castle", "tower", "lamp", "glass", "wood", "iron", "copper", "cotton",
    "salt", "sugar", "honey", "tea", "rice", "corn", "wind", "rain", "snow",
];

impl Words {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS per process; mix in the time for good measure.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Self { state: h.finish() }
    }

    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `n` words, the first a random tag, so no two prompts share a first cache block.
    fn prompt(&mut self, n: usize) -> String {
        let mut s = format!("probe{:016x}", self.next());
        for _ in 1..n {
            s.push(' ');
            s.push_str(VOCAB[(self.next() % VOCAB.len() as u64) as usize]);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_fresh_and_sized() {
        let mut w = Words::new();
        let (a, b) = (w.prompt(100), w.prompt(100));
        assert_ne!(a, b);
        assert_ne!(a.split(' ').next(), b.split(' ').next());
        assert_eq!(a.split(' ').count(), 100);
    }

    #[test]
    fn the_canary_is_masked_whatever_its_case() {
        assert_eq!(
            mask(
                "at x BHCANARY-1, bhcanary-1y and \u{e9}BHCanary-1",
                "BHCANARY-1"
            ),
            "at x <canary>, <canary>y and \u{e9}<canary>"
        );
        assert_eq!(mask("nothing", "BHCANARY-1"), "nothing");
        assert_eq!(mask("nothing", ""), "nothing");
    }

    #[test]
    fn medians() {
        let d = Duration::from_millis;
        assert_eq!(median(vec![d(5), d(1), d(100)]), d(5));
        assert_eq!(median(vec![d(4), d(2)]), d(3));
    }
}
