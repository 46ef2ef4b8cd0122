//! Check results, the exit code and the Prometheus text format.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    /// Not run: what it needs was not given (a canary, a metrics URL).
    Skip,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
        }
    }
}

/// One named check with a one-line reason.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckResult {
    pub name: &'static str,
    pub outcome: Outcome,
    pub reason: String,
}

impl CheckResult {
    pub fn pass(name: &'static str, reason: impl Into<String>) -> Self {
        Self::new(name, Outcome::Pass, reason)
    }

    pub fn fail(name: &'static str, reason: impl Into<String>) -> Self {
        Self::new(name, Outcome::Fail, reason)
    }

    pub fn skip(name: &'static str, reason: impl Into<String>) -> Self {
        Self::new(name, Outcome::Skip, reason)
    }

    fn new(name: &'static str, outcome: Outcome, reason: impl Into<String>) -> Self {
        // One line, whatever a server answered.
        let reason = reason.into().replace(['\n', '\r'], " ");
        Self {
            name,
            outcome,
            reason,
        }
    }
}

/// Exit codes of `bulkhead-probe`.
pub mod exit {
    /// Every check passed or was skipped.
    pub const OK: i32 = 0;
    /// A check failed.
    pub const FAILED: i32 = 1;
    /// Bad flags or configuration.
    pub const USAGE: i32 = 2;
    /// The checks ran but the result could not be written or pushed.
    pub const OUTPUT: i32 = 3;
}

/// A probe run.
#[derive(Debug, Clone)]
pub struct Report {
    pub checks: Vec<CheckResult>,
    /// When the run started.
    pub started: SystemTime,
    pub duration: Duration,
}

impl Report {
    /// No check failed.
    pub fn success(&self) -> bool {
        self.checks.iter().all(|c| c.outcome != Outcome::Fail)
    }

    pub fn exit_code(&self) -> i32 {
        if self.success() {
            exit::OK
        } else {
            exit::FAILED
        }
    }

    pub fn check(&self, name: &str) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// One line per check: `pass  unsigned  refused: 401 missing`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for c in &self.checks {
            let _ = writeln!(s, "{:<4}  {:<22}  {}", c.outcome.as_str(), c.name, c.reason);
        }
        let failed = self
            .checks
            .iter()
            .filter(|c| c.outcome == Outcome::Fail)
            .count();
        let _ = writeln!(
            s,
            "{} ({} checks, {failed} failed, {:.1} s)",
            if failed == 0 { "PASS" } else { "FAIL" },
            self.checks.len(),
            self.duration.as_secs_f64()
        );
        s
    }

    /// The Prometheus text format (node-exporter textfile or Pushgateway).
    pub fn to_prometheus(&self) -> String {
        let mut s = String::new();
        s.push_str("# HELP bulkhead_probe_check Result of each isolation check in the last probe run (1 for its result).\n");
        s.push_str("# TYPE bulkhead_probe_check gauge\n");
        for c in &self.checks {
            let _ = writeln!(
                s,
                "bulkhead_probe_check{{check=\"{}\",result=\"{}\"}} 1",
                escape(c.name),
                c.outcome.as_str()
            );
        }
        s.push_str("# HELP bulkhead_probe_success Whether the last probe run had no failed check (1) or some (0).\n");
        s.push_str("# TYPE bulkhead_probe_success gauge\n");
        let _ = writeln!(
            s,
            "bulkhead_probe_success {}",
            if self.success() { 1 } else { 0 }
        );
        s.push_str("# HELP bulkhead_probe_last_run_timestamp_seconds When the last probe run started (Unix time).\n");
        s.push_str("# TYPE bulkhead_probe_last_run_timestamp_seconds gauge\n");
        let ts = self
            .started
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let _ = writeln!(s, "bulkhead_probe_last_run_timestamp_seconds {ts:.3}");
        s.push_str("# HELP bulkhead_probe_duration_seconds How long the last probe run took.\n");
        s.push_str("# TYPE bulkhead_probe_duration_seconds gauge\n");
        let _ = writeln!(
            s,
            "bulkhead_probe_duration_seconds {:.3}",
            self.duration.as_secs_f64()
        );
        s
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Write `text` to `path` atomically: a temporary file in the same directory, then rename (the
/// node exporter never reads a half-written file).
pub fn write_textfile(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the textfile path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_and_exit_code() {
        let mut r = Report {
            checks: vec![
                CheckResult::pass("unsigned", "refused: 401 missing"),
                CheckResult::skip("tagged_bytes", "no agent_metrics_url\nsecond line"),
            ],
            started: UNIX_EPOCH + Duration::from_millis(1_700_000_000_250),
            duration: Duration::from_millis(1500),
        };
        assert_eq!(r.exit_code(), 0);
        assert!(!r.checks[1].reason.contains('\n'));
        let t = r.to_prometheus();
        assert!(t.contains("bulkhead_probe_check{check=\"unsigned\",result=\"pass\"} 1\n"));
        assert!(t.contains("bulkhead_probe_check{check=\"tagged_bytes\",result=\"skip\"} 1\n"));
        assert!(t.contains("bulkhead_probe_success 1\n"));
        assert!(t.contains("bulkhead_probe_last_run_timestamp_seconds 1700000000.250\n"));
        assert!(t.contains("bulkhead_probe_duration_seconds 1.500\n"));
        r.checks
            .push(CheckResult::fail("replayed", "accepted twice"));
        assert_eq!(r.exit_code(), 1);
        assert!(r.to_prometheus().contains("bulkhead_probe_success 0\n"));
        assert!(r.summary().starts_with("pass  unsigned"));
        assert!(r.summary().contains("FAIL (3 checks, 1 failed"));
    }

    #[test]
    fn textfile_is_replaced_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bulkhead_probe.prom");
        write_textfile(&p, "a 1\n").unwrap();
        write_textfile(&p, "b 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "b 2\n");
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        assert!(write_textfile(&d.path().join("no/such/dir/x.prom"), "x").is_err());
    }
}
