//! `cargo xtask mutants [--fast] [FILE ...]`: mutation testing of the security and accounting
//! core with cargo-mutants (installed when missing).
//!
//! Each mutant is judged by the unit tests of its crate (`.cargo/mutants.toml`). The run fails
//! when a file's score (caught / viable) is under 90 %, or when a mutant survives that
//! TESTING.md does not list as equivalent (with its reason): a new survivor is either killed by
//! a new test or argued there. `--fast` runs the small files only, for a quick check.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::Path;

/// The files whose mutants must be caught: identity (signatures, JWTs, scopes), digest, limits
/// (local and shared), isolation, the body schema, inspection and route matching of the
/// request path, the agent's tagging and tenants.
/// Each group is one cargo-mutants run, with the tests that judge its mutants: the sidecar's
/// core is pure logic, judged by its unit tests; the agent's tagging server and tenant registry
/// act on kernel maps, judged by the tests that load the real programs (root and BPF).
pub const CORE: &[(&[&str], &[&str])] = &[
    (
        &[
            "sidecar/src/auth/signature/mod.rs",
            "sidecar/src/auth/signature/params.rs",
            "sidecar/src/auth/signature/replay.rs",
            "sidecar/src/auth/digest.rs",
            "sidecar/src/proxy/routes.rs",
            "sidecar/src/limits/local.rs",
            "sidecar/src/proxy/inspect/mod.rs",
            "sidecar/src/proxy/inspect/fields.rs",
            "sidecar/src/proxy/inspect/scope.rs",
            "sidecar/src/proxy/inspect/prompt_hash.rs",
            "sidecar/src/proxy/scan.rs",
            "sidecar/src/proxy/schema.rs",
            "sidecar/src/auth/scope.rs",
            "sidecar/src/cache/gate.rs",
            "sidecar/src/cache/flush.rs",
            "sidecar/src/cache/salt.rs",
        ],
        &["--lib"],
    ),
    // What the sidecar shares with its clients: the signature base, signing, Content-Digest;
    // judged by the client's tests and the sidecar's verifier tests, which cover it too.
    (
        &["client/src/signature.rs", "client/src/digest.rs"],
        &["--lib", "--test-package=bulkhead-client,bulkhead-sidecar"],
    ),
    // The sealed audit's chain, judged with the tests that write real files through the
    // audit writer and read them back with `audit read`.
    (
        &[
            "sidecar/src/record/seal/mod.rs",
            "sidecar/src/record/seal/verify.rs",
        ],
        &["--lib", "--test=audit"],
    ),
    // Leak detection, response metering and pricing, judged with the tests that stream
    // answers through the sidecar from the simulator.
    (
        &[
            "sidecar/src/record/leaks/mod.rs",
            "sidecar/src/proxy/meter.rs",
            "sidecar/src/record/cost.rs",
        ],
        &["--lib", "--test=leaks", "--test=cost", "--test=sse_split"],
    ),
    // The probe's view of an answer (SSE reassembled per choice and field).
    (&["probe/src/sse.rs"], &["--lib", "--test=probe"]),
    // JWT verification, judged with the tests that sign with an independent library.
    (
        &[
            "sidecar/src/auth/jwt/mod.rs",
            "sidecar/src/auth/jwt/jwks.rs",
        ],
        &["--lib", "--test=jwt"],
    ),
    // The shared limits and replay cache, judged with the tests that run a real Redis.
    (
        &[
            "sidecar/src/limits/shared/mod.rs",
            "sidecar/src/limits/shared/tenant.rs",
            "sidecar/src/limits/shared/settle.rs",
            "sidecar/src/limits/shared/nonces.rs",
            "sidecar/src/limits/shared/responses.rs",
            "sidecar/src/limits/shared/conn.rs",
            "sidecar/src/limits/shared/scripts.rs",
        ],
        &["--lib", "--test=redis_limits"],
    ),
    (
        &["agent/src/tagging.rs", "agent/src/tenants.rs"],
        &[
            "--lib",
            "--test=tagging_socket",
            "--test=datapath",
            "--test=kv_namespaces",
            "--test=registry_and_socket",
        ],
    ),
];
const FAST: &[&str] = &["sidecar/src/auth/digest.rs", "sidecar/src/proxy/routes.rs"];
const GOAL: f64 = 0.90;
const CARGO_MUTANTS_VERSION: &str = "27.1.0";

#[derive(Default, Debug, PartialEq, Eq)]
pub struct FileScore {
    pub caught: usize,
    pub timeout: usize,
    pub missed: Vec<String>,
    pub unviable: usize,
}

impl FileScore {
    pub fn viable(&self) -> usize {
        self.caught + self.timeout + self.missed.len()
    }

    /// Caught (a timeout is a hang the tests detect) over viable; 1.0 with nothing viable.
    pub fn score(&self) -> f64 {
        match self.viable() {
            0 => 1.0,
            v => (self.caught + self.timeout) as f64 / v as f64,
        }
    }
}

pub fn run(args: &[&str]) -> Result<()> {
    let files: Vec<&str> = match args {
        [] => CORE.iter().flat_map(|(f, _)| f.iter().copied()).collect(),
        ["--fast"] => FAST.to_vec(),
        files if files.iter().all(|f| !f.starts_with('-')) => files.to_vec(),
        _ => bail!("usage: cargo xtask mutants [--fast | FILE ...]"),
    };
    let mut groups: Vec<(Vec<&str>, &[&str])> = Vec::new();
    for f in &files {
        let Some((_, tests)) = CORE.iter().find(|(fs, _)| fs.contains(f)) else {
            bail!("{f} is not in the mutation-tested core (xtask/src/mutants.rs CORE)");
        };
        match groups.iter_mut().find(|(_, t)| t == tests) {
            Some((fs, _)) => fs.push(f),
            None => groups.push((vec![f], tests)),
        }
    }
    ensure_cargo_mutants()?;
    // The agent's build script builds the eBPF programs.
    crate::setup::run()?;
    let root = crate::root();
    let mut scores = BTreeMap::new();
    for (group, tests) in &groups {
        // Named by crate and test set, so runs of two groups (in two shells) do not meet.
        let krate = format!(
            "{}{}",
            group[0].split('/').next().unwrap_or("core"),
            tests
                .iter()
                .filter_map(|t| t.strip_prefix("--test="))
                .map(|t| format!("-{t}"))
                .collect::<String>()
        );
        let out = root.join(format!("target/mutants-out/{krate}"));
        std::fs::create_dir_all(&out)?;
        let mut cmd = crate::cargo();
        cmd.arg("mutants")
            .arg("--output")
            .arg(&out)
            .args(["--jobs", "1"])
            // The test timeout is 3x the baseline's (.cargo/mutants.toml), at least 8 s
            // (cargo-mutants' own floor, 20 s, makes every hanging mutant cost 20 s).
            .args(["--minimum-test-timeout", "8"])
            // A target of its own that outlives the run's copy of the tree: the dependencies
            // build once, not once a run.
            .env(
                "CARGO_TARGET_DIR",
                root.join(format!("target/mutants/{krate}")),
            )
            // Each mutant is one rebuild of the mutated crate: incremental, even where the
            // caller turned incremental builds off for a one-off build (.ci/run).
            .env("CARGO_INCREMENTAL", "1")
            .env("PATH", crate::setup::path_with_linker()?);
        for t in *tests {
            match t.strip_prefix("--test-package=") {
                Some(packages) => cmd.args(["--test-package", packages]),
                None => cmd.arg(format!("--cargo-arg={t}")),
            };
        }
        for f in group {
            cmd.args(["--file", f]);
        }
        eprintln!("+ {}", crate::render(&cmd));
        // cargo-mutants exits non-zero when a mutant survives: the verdict is ours, below.
        let status = cmd
            .current_dir(&root)
            .status()
            .context("run cargo mutants")?;
        if !out.join("mutants.out/caught.txt").exists() {
            bail!("cargo mutants produced no results ({status}): see its output above");
        }
        scores.extend(read_outcomes(&out.join("mutants.out"))?);
    }
    let equivalent = std::fs::read_to_string(root.join("TESTING.md")).unwrap_or_default();
    let (table, failures) = verdict(&files, &scores, &equivalent);
    println!("{table}");
    if !failures.is_empty() {
        bail!("mutation testing:\n  {}", failures.join("\n  "));
    }
    println!("mutants: every file at >= {:.0} %", GOAL * 100.0);
    Ok(())
}

fn ensure_cargo_mutants() -> Result<()> {
    let have = crate::cargo()
        .args(["mutants", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        crate::run(crate::cargo().args([
            "install",
            "--locked",
            "cargo-mutants",
            "--version",
            CARGO_MUTANTS_VERSION,
        ]))?;
    }
    Ok(())
}

/// Per file, from cargo-mutants' `caught.txt`, `timeout.txt`, `missed.txt` and `unviable.txt`
/// (one mutant a line: `path:line:col: description`).
pub fn read_outcomes(dir: &Path) -> Result<BTreeMap<String, FileScore>> {
    let mut scores: BTreeMap<String, FileScore> = BTreeMap::new();
    for kind in ["caught", "timeout", "missed", "unviable"] {
        let path = dir.join(format!("{kind}.txt"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (file, what) = split_mutant(line)
                .with_context(|| format!("{}: unexpected line {line:?}", path.display()))?;
            let s = scores.entry(file.to_string()).or_default();
            match kind {
                "caught" => s.caught += 1,
                "timeout" => s.timeout += 1,
                "missed" => s.missed.push(what.to_string()),
                _ => s.unviable += 1,
            }
        }
    }
    Ok(scores)
}

/// `sidecar/src/x.rs:12:5: replace a with b` -> (`sidecar/src/x.rs`, `replace a with b`):
/// the position is dropped so TESTING.md's list survives edits that move lines.
pub fn split_mutant(line: &str) -> Option<(&str, &str)> {
    let (file, rest) = line.split_once(':')?;
    let (_line, rest) = rest.split_once(':')?;
    let (_col, what) = rest.split_once(':')?;
    Some((file, what.trim()))
}

/// The markdown table and the failures: a file under the goal, or a survivor that TESTING.md
/// does not list as `file: description`.
pub fn verdict(
    files: &[&str],
    scores: &BTreeMap<String, FileScore>,
    testing_md: &str,
) -> (String, Vec<String>) {
    let mut table = String::from(
        "| file | mutants | unviable | viable | caught | timeouts | missed | score |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut failures = Vec::new();
    for f in files {
        let empty = FileScore::default();
        let s = scores.get(*f).unwrap_or(&empty);
        table.push_str(&format!(
            "| `{f}` | {} | {} | {} | {} | {} | {} | {:.1} % |\n",
            s.viable() + s.unviable,
            s.unviable,
            s.viable(),
            s.caught,
            s.timeout,
            s.missed.len(),
            s.score() * 100.0
        ));
        if s.score() < GOAL {
            failures.push(format!(
                "{f}: {:.1} % of {} viable mutants caught (goal {:.0} %)",
                s.score() * 100.0,
                s.viable(),
                GOAL * 100.0
            ));
        }
        for m in &s.missed {
            if !testing_md.contains(&format!("`{f}: {m}`")) {
                failures.push(format!(
                    "{f}: `{m}` survived and TESTING.md does not argue it is equivalent"
                ));
            }
        }
    }
    (table, failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_core_file_exists() {
        let root = crate::root();
        let missing: Vec<&str> = CORE
            .iter()
            .flat_map(|(files, _)| files.iter().copied())
            .chain(FAST.iter().copied())
            .filter(|f| !root.join(f).is_file())
            .collect();
        assert!(
            missing.is_empty(),
            "CORE names files that are gone: {missing:?}"
        );
    }

    #[test]
    fn positions_are_dropped_and_descriptions_kept() {
        assert_eq!(
            split_mutant("sidecar/src/auth/digest.rs:41:9: replace == with != in verify"),
            Some(("sidecar/src/auth/digest.rs", "replace == with != in verify"))
        );
        assert_eq!(split_mutant("no positions here"), None);
    }

    #[test]
    fn a_file_under_the_goal_or_an_unargued_survivor_fails() {
        let mut scores = BTreeMap::new();
        scores.insert(
            "a.rs".to_string(),
            FileScore {
                caught: 9,
                timeout: 0,
                missed: vec!["replace f -> bool with true".into()],
                unviable: 3,
            },
        );
        scores.insert(
            "b.rs".to_string(),
            FileScore {
                caught: 8,
                timeout: 0,
                missed: vec!["x".into(), "y".into()],
                unviable: 0,
            },
        );
        let md = "- `a.rs: replace f -> bool with true`: f is only ever true here\n";
        let (table, failures) = verdict(&["a.rs", "b.rs"], &scores, md);
        assert!(
            table.contains("| `a.rs` | 13 | 3 | 10 | 9 | 0 | 1 | 90.0 % |"),
            "{table}"
        );
        assert_eq!(failures.len(), 3, "{failures:?}");
        assert!(failures[0].starts_with("b.rs: 80.0 %"), "{failures:?}");
        assert!(failures[1].contains("`x` survived"), "{failures:?}");
        // a.rs: exactly the goal, its one survivor argued.
        assert!(
            !failures.iter().any(|f| f.starts_with("a.rs")),
            "{failures:?}"
        );
    }
}
