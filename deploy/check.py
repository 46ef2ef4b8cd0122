#!/usr/bin/env python3
"""Checks of deploy/ that need a YAML or JSON parser (run by `xtask deploy-check`).

    check.py manifests           list the Kubernetes manifests: "core PATH" or "crd PATH" lines
    check.py check               kustomizations, CRD shapes, rules vs PrometheusRule, alerts vs
                                 RUNBOOK.md and tests*.yaml, dashboard queries vs the metrics
    check.py gen-prometheusrule  rewrite prometheus/prometheusrule.yaml from prometheus/rules.yaml
    check.py dashboard-rules OUT write the dashboard's queries, Grafana variables substituted, as
                                 recording rules to OUT, so `promtool check rules OUT` parses them
    check.py only-named-alerts OUT
                                 write to OUT a promtool test file that replays every scenario of
                                 the tests*.yaml files and expects every alert the scenario does
                                 not name to stay silent at every evaluation, start to end

Needs PyYAML and jsonschema (both come with kubernetes-validate). Prints one line per problem
and exits 1 when there is any.
"""

import json
import os
import re
import sys

import jsonschema
import yaml

DEPLOY = os.path.dirname(os.path.abspath(__file__))

# Every metric Bulkhead exports or plans to export (counters as they appear on the wire).
INVENTORY = {
    # agent
    "bulkhead_network_bytes_total",
    "bulkhead_network_packets_total",
    "bulkhead_agent_up",
    "bulkhead_map_entries",
    "bulkhead_map_capacity",
    "bulkhead_map_fill_ratio",
    "bulkhead_kernel_events_total",
    "bulkhead_tag_requests_total",
    "bulkhead_gpu_memory_bytes",
    "bulkhead_kv_cache_bytes",
    "bulkhead_gpu_memory_total_bytes",
    "bulkhead_nvml_up",
    "bulkhead_gpu_busy_seconds_total",
    "bulkhead_gpu_energy_joules_total",
    "bulkhead_gpu_device_busy_seconds_total",
    "bulkhead_gpu_device_energy_joules_total",
    "bulkhead_gpu_unattributed_busy_seconds_total",
    "bulkhead_gpu_counter_resets_total",
    "bulkhead_gpu_sharing",
    "bulkhead_cross_tenant_flows_total",
    "bulkhead_tagged_sockets",
    "bulkhead_tagging_connections",
    "bulkhead_tagging_connections_refused_total",
    "bulkhead_tagging_connections_idle_closed_total",
    "bulkhead_accept_errors_total",
    # sidecar
    "bulkhead_requests_total",
    "bulkhead_tokens_total",
    "bulkhead_tenant_weight",
    "bulkhead_gpu_hour_price",
    "bulkhead_queued_requests",
    "bulkhead_rate_limited_total",
    "bulkhead_inflight_requests",
    "bulkhead_auth_failures_total",
    "bulkhead_auth_failures_by_tenant_total",
    "bulkhead_cache_flushes_total",
    "bulkhead_cache_salt_overrides_total",
    "bulkhead_kv_cache_tokens",
    "bulkhead_sidecar_kv_inflight_bytes",
    "bulkhead_canary_hits_total",
    "bulkhead_keyword_hits_total",
    "bulkhead_injection_markers_total",
    "bulkhead_fair_queue_virtual_tokens",
    "bulkhead_kv_cache_reserved_tokens",
    "bulkhead_kv_cache_quota_tokens",
    # bulkhead-probe (Pushgateway or node-exporter textfile)
    "bulkhead_probe_check",
    "bulkhead_probe_success",
    "bulkhead_probe_last_run_timestamp_seconds",
    "bulkhead_probe_duration_seconds",
    "bulkhead_cost_total",
    "bulkhead_jwks_refreshes_total",
    "bulkhead_limits_backend_up",
    "bulkhead_limits_degraded_decisions_total",
    "bulkhead_telemetry_dropped_spans_total",
    "bulkhead_telemetry_exported_spans_total",
    "bulkhead_telemetry_queued_spans",
    "bulkhead_telemetry_metric_exports_total",
}
HISTOGRAMS = {
    "bulkhead_request_duration_seconds",
    "bulkhead_time_to_first_token_seconds",
    "bulkhead_queue_wait_seconds",
    "bulkhead_cache_flush_duration_seconds",
    # the GenAI semantic conventions' instruments, Prometheus-translated (sidecar)
    "gen_ai_server_request_duration_seconds",
    "gen_ai_server_time_to_first_token_seconds",
    "gen_ai_server_time_per_output_token_seconds",
    "gen_ai_client_token_usage",
    "bulkhead_sidecar_overhead_duration_seconds",
}
SERIES_NAMES = INVENTORY | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

# The panels the dashboard must have (matched against panel titles, case-insensitive).
REQUIRED_PANELS = [
    "requests",
    "tokens",
    "throttl",
    "latency p50",
    "latency p99",
    "network bytes",
    "gpu memory",
    "kv cache",
    "cross-tenant flows",
]

PROMETHEUSRULE_HEADER = """\
# GENERATED from rules.yaml by `python3 deploy/check.py gen-prometheusrule`; do not edit.
# The deploy check fails when this file and rules.yaml differ.
"""

problems = []
quiet = False  # `manifests` lists what it can; `check` reports the problems


def problem(msg):
    problems.append(msg)
    if not quiet:
        print(f"deploy/check.py: {msg}", file=sys.stderr)


def rel(path):
    return os.path.relpath(path, DEPLOY)


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_one(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


# ---------------------------------------------------------------------------- kustomizations


def kustomization_dirs():
    out = []
    for d, dirs, files in os.walk(DEPLOY):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        if "kustomization.yaml" in files:
            out.append(d)
    return sorted(out)


def check_kustomizations():
    """Every resource named exists: a file, or a directory with its own kustomization.yaml,
    inside the kustomization root (kustomize's default load restriction); every YAML manifest
    under deploy/ is reached from deploy/kustomization.yaml or another kustomization."""
    files = []
    for d in kustomization_dirs():
        k = load_one(os.path.join(d, "kustomization.yaml"))
        if k.get("kind") != "Kustomization":
            problem(f"{rel(d)}/kustomization.yaml: kind is not Kustomization")
        for r in k.get("resources", []):
            p = os.path.normpath(os.path.join(d, r))
            if os.path.isdir(p):
                if not os.path.isfile(os.path.join(p, "kustomization.yaml")):
                    problem(f"{rel(d)}/kustomization.yaml: resource {r} is a directory without kustomization.yaml")
            elif os.path.isfile(p):
                if not p.startswith(d + os.sep):
                    problem(f"{rel(d)}/kustomization.yaml: file {r} is outside the kustomization root")
                files.append(p)
            else:
                problem(f"{rel(d)}/kustomization.yaml: resource {r} does not exist")
    # Not Kubernetes manifests: Prometheus rule files (and their tests*.yaml) and the
    # Alertmanager configuration.
    not_resources = {"kustomization.yaml", "rules.yaml", "alertmanager.yaml"}
    for d, dirs, names in os.walk(DEPLOY):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        for n in names:
            p = os.path.join(d, n)
            if n in not_resources or p in rule_test_files():
                continue
            if n.endswith((".yaml", ".yml")) and p not in files:
                problem(f"{rel(p)}: not listed in any kustomization.yaml")
    return sorted(set(files))


def manifests():
    """(kind, path) for every manifest listed in a kustomization: "core" when its apiVersion
    is a built-in Kubernetes group, "crd" for monitoring.coreos.com."""
    out = []
    for p in check_kustomizations():
        docs = load_all(p)
        if not docs:
            problem(f"{rel(p)}: no documents")
        groups = {d.get("apiVersion", "").split("/")[0] for d in docs}
        if groups == {"monitoring.coreos.com"}:
            out.append(("crd", p))
        elif "monitoring.coreos.com" in groups:
            problem(f"{rel(p)}: mixes Prometheus Operator resources with built-in ones")
        else:
            out.append(("core", p))
    return out


# -------------------------------------------------------------------------------- CRD shapes

_selector = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
}
_relabel = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep",
                            "hashmod", "lowercase", "uppercase", "keepequal", "dropequal",
                            "Replace", "Keep", "Drop", "LabelMap", "LabelDrop", "LabelKeep"]},
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
    },
}
_duration = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                          r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_metadata = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
# The subset of the monitoring.coreos.com/v1 CRD schemas these files use; unknown fields are
# rejected, as the API server's structural-schema pruning would silently drop them.
CRD_SCHEMAS = {
    "PodMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": _metadata,
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "additionalProperties": False,
                "properties": {
                    "jobLabel": {"type": "string"},
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "selector": _selector,
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["port"],
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": _duration,
                                "scrapeTimeout": _duration,
                                "honorLabels": {"type": "boolean"},
                                "relabelings": {"type": "array", "items": _relabel},
                                "metricRelabelings": {"type": "array", "items": _relabel},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _metadata,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _duration,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": _duration,
                                            "labels": {"type": "object",
                                                       "additionalProperties": {"type": "string"}},
                                            "annotations": {"type": "object",
                                                            "additionalProperties": {"type": "string"}},
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def check_crds(crd_files):
    n = 0
    for p in crd_files:
        for doc in load_all(p):
            schema = CRD_SCHEMAS.get(doc.get("kind"))
            if schema is None:
                problem(f"{rel(p)}: no shape schema for kind {doc.get('kind')}")
                continue
            for e in jsonschema.Draft202012Validator(schema).iter_errors(doc):
                where = "/".join(str(x) for x in e.absolute_path)
                problem(f"{rel(p)}: {doc['kind']} {where}: {e.message}")
            n += 1
    return n


# ------------------------------------------------------------------------------------ rules


def rule_test_files():
    """The promtool unit test files of rules.yaml: prometheus/tests.yaml and any other
    prometheus/tests*.yaml (one per area, e.g. tests-probe.yaml)."""
    d = os.path.join(DEPLOY, "prometheus")
    return sorted(os.path.join(d, n) for n in os.listdir(d)
                  if n.startswith("tests") and n.endswith(".yaml"))


def rules_groups():
    return load_one(os.path.join(DEPLOY, "prometheus", "rules.yaml"))["groups"]


def prometheusrule_doc():
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "bulkhead", "labels": {"app.kubernetes.io/name": "bulkhead"}},
        "spec": {"groups": rules_groups()},
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper, s):
    style = "|" if "\n" in s else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


_Dumper.add_representer(str, _str_representer)


class _IndentDumper(_Dumper):
    # PyYAML writes block sequences flush with their key; the other files here indent them.
    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)


def render_prometheusrule():
    body = yaml.dump(prometheusrule_doc(), Dumper=_IndentDumper, sort_keys=False, width=100,
                     allow_unicode=True)
    return PROMETHEUSRULE_HEADER + body


def gen_prometheusrule():
    path = os.path.join(DEPLOY, "prometheus", "prometheusrule.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_prometheusrule())
    print(f"wrote {rel(path)}")


def check_prometheusrule():
    path = os.path.join(DEPLOY, "prometheus", "prometheusrule.yaml")
    if not os.path.isfile(path):
        problem("prometheus/prometheusrule.yaml is missing (python3 deploy/check.py gen-prometheusrule)")
        return
    docs = load_all(path)
    if len(docs) != 1 or docs[0].get("kind") != "PrometheusRule":
        problem("prometheus/prometheusrule.yaml: expected exactly one PrometheusRule")
        return
    if docs[0].get("spec", {}).get("groups") != rules_groups():
        problem("prometheus/prometheusrule.yaml differs from rules.yaml "
                "(python3 deploy/check.py gen-prometheusrule)")
    with open(path, encoding="utf-8") as f:
        if f.read() != render_prometheusrule():
            problem("prometheus/prometheusrule.yaml is not the generated text "
                    "(python3 deploy/check.py gen-prometheusrule)")


def github_anchor(heading):
    a = heading.strip().lower()
    a = re.sub(r"[^\w\- ]", "", a)
    return a.replace(" ", "-")


def runbook_anchors():
    anchors = {}
    with open(os.path.join(DEPLOY, "RUNBOOK.md"), encoding="utf-8") as f:
        text = f.read()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    for s in sections:
        heading, _, body = s.partition("\n")
        anchors[github_anchor(heading)] = body
    return anchors


METRIC_RE = re.compile(r"\b(bulkhead_[a-z0-9_]+)")
RECORD_RE = re.compile(r"\b([a-z_]+:bulkhead_[a-z0-9_]+:[a-z0-9_]+)\b")


# The Alertmanager receivers (deploy/alertmanager/alertmanager.yaml), one per `team` label value.
TEAMS = {"security", "platform"}


def check_alerts():
    groups = rules_groups()
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    records = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    anchors = runbook_anchors()
    for g in groups:
        for r in g["rules"]:
            for m in METRIC_RE.findall(RECORD_RE.sub("", r["expr"])):
                if m not in SERIES_NAMES:
                    problem(f"rules.yaml: {r.get('alert') or r.get('record')}: unknown metric {m}")
    for a in alerts:
        name = a["alert"]
        if not a.get("labels", {}).get("severity"):
            problem(f"rules.yaml: {name}: no labels.severity")
        # alertmanager/alertmanager.yaml routes on `team`; `cargo xtask deploy-check` tests that
        # each value reaches the receiver of the same name.
        if a.get("labels", {}).get("team") not in TEAMS:
            problem(f"rules.yaml: {name}: labels.team should be one of {sorted(TEAMS)}")
        ann = a.get("annotations", {})
        for k in ("summary", "description", "runbook_url"):
            if not ann.get(k):
                problem(f"rules.yaml: {name}: no annotations.{k}")
        url = ann.get("runbook_url", "")
        anchor = url.partition("#")[2]
        if not url.startswith("deploy/RUNBOOK.md#") or anchor != name.lower():
            problem(f"rules.yaml: {name}: runbook_url should be deploy/RUNBOOK.md#{name.lower()}, is {url}")
        elif anchor not in anchors:
            problem(f"RUNBOOK.md: no section '## {name}' for alert {name}")
        else:
            body = anchors[anchor]
            for part in ("Meaning", "Confirm", "Act"):
                if f"**{part}" not in body:
                    problem(f"RUNBOOK.md: section {name} lacks a **{part}** part")

    firing, silent = set(), set()
    for path in rule_test_files():
        tests = load_one(path)
        for t in tests.get("tests", []):
            for case in t.get("alert_rule_test", []) or []:
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    for a in alerts:
        if a["alert"] not in firing:
            problem(f"tests*.yaml: no case where {a['alert']} fires")
        if a["alert"] not in silent:
            problem(f"tests*.yaml: no case where {a['alert']} must not fire")
    known = {a["alert"] for a in alerts}
    for name in (firing | silent) - known:
        problem(f"tests*.yaml: tests an alert that rules.yaml does not define: {name}")
    return len(alerts), len(records)


# ----------------------------------------------------------- alerts a scenario does not name
#
# promtool's exp_alerts for alert X compares only X's alerts: a scenario written for one alert
# says nothing about the others, and an alert with `for:` that a scenario triggers by mistake
# shows only once its `for:` has elapsed. So (1) every scenario that expects an alert to fire
# at T must keep its series going until at least T + the longest `for:` of any alert
# (check_scenario_lengths), and (2) `only-named-alerts` replays each scenario and expects every
# alert the scenario does not name in its alert_rule_test to be silent at every evaluation
# from 0 to the scenario's last sample.

_DURATION_RE = re.compile(r"(\d+)(ms|y|w|d|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def duration_s(text):
    """A Prometheus duration ("5m", "1h30m") in seconds."""
    text = str(text).strip()
    if text == "0":
        return 0
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * _UNIT_S[u] for n, u in parts)


_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_EXPANDING_RE = re.compile(rf"^({_NUM})([-+])({_NUM})x(\d+)$")
_REPEAT_RE = re.compile(rf"^({_NUM})x(\d+)$")
_BLANKS_RE = re.compile(r"^_x(\d+)$")
_SINGLE_RE = re.compile(rf"^(?:{_NUM}|stale|Inf|\+Inf|-Inf|NaN)$")


def last_sample_index(values):
    """Index (in steps of the scenario's interval) of the last sample that promtool's expanding
    notation ('1x4 0x10', '_ _ 1', '0+2x30', '_x5 1x20') gives, or None when there is none."""
    i, last = 0, None
    for tok in str(values).split():
        if tok == "_":
            i += 1
        elif m := _BLANKS_RE.match(tok):
            i += int(m.group(1))
        elif m := _EXPANDING_RE.match(tok) or _REPEAT_RE.match(tok):
            n = int(m.groups()[-1]) + 1
            i += n
            last = i - 1
        elif _SINGLE_RE.match(tok):
            i += 1
            last = i - 1
        else:
            raise ValueError(f"cannot read series values {values!r} (token {tok!r})")
    return last


def alert_fors():
    """{alert name: its `for:` in seconds} for every alert in rules.yaml."""
    return {r["alert"]: duration_s(r.get("for", "0"))
            for g in rules_groups() for r in g["rules"] if "alert" in r}


def scenarios():
    """(file, index, top-level evaluation_interval in s, test group) for every test group with
    input series, in every tests*.yaml."""
    for path in rule_test_files():
        doc = load_one(path)
        interval = duration_s(doc.get("evaluation_interval", "1m"))
        for i, t in enumerate(doc.get("tests", []) or []):
            if t.get("input_series"):
                yield path, i, interval, t


def scenario_end_s(t):
    """Seconds from 0 to the last sample of the scenario's series that ends first: until
    then every series of the scenario is present."""
    step = duration_s(t.get("interval", "1m"))
    ends = [last_sample_index(s["values"]) for s in t["input_series"]]
    return min((e for e in ends if e is not None), default=0) * step


def fmt_s(seconds):
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def check_scenario_lengths():
    fors = alert_fors()
    longest = max(fors.values(), default=0)
    for path, i, _, t in scenarios():
        end = scenario_end_s(t)
        for case in t.get("alert_rule_test", []) or []:
            if not case.get("exp_alerts"):
                continue
            at = duration_s(case["eval_time"])
            if end < at + longest:
                problem(f"{rel(path)}: test {i} (expects {case['alertname']} at {case['eval_time']}): its series "
                        f"end at {fmt_s(end)}, before {fmt_s(at + longest)} (the longest for: of any alert, "
                        f"{fmt_s(longest)}, after the firing check), so an alert with a long for: that this "
                        f"scenario triggers by mistake could not be seen to fire")


def only_named_alerts(out):
    """Writes the promtool test file described above to OUT."""
    fors = alert_fors()
    groups, cases, intervals = [], 0, set()
    for path, i, interval, t in scenarios():
        intervals.add(interval)
        named = {c["alertname"] for c in t.get("alert_rule_test", []) or []}
        others = [a for a in fors if a not in named]
        end = scenario_end_s(t)
        checks = [{"eval_time": fmt_s(at), "alertname": a, "exp_alerts": []}
                  for at in range(0, end + 1, interval) for a in others]
        cases += len(checks)
        if checks:
            groups.append((f"{rel(path)}, test {i}",
                           {"interval": t.get("interval", "1m"),
                            "input_series": t["input_series"],
                            "alert_rule_test": checks}))
        for c in t.get("alert_rule_test", []) or []:
            if c["alertname"] not in fors:
                problem(f"{rel(path)}: test {i} names {c['alertname']}, which rules.yaml does not define")
    if len(intervals) > 1:
        problem("tests*.yaml: the files differ in evaluation_interval; only-named-alerts writes one file")
    head = {"rule_files": [os.path.join(DEPLOY, "prometheus", "rules.yaml")],
            "evaluation_interval": fmt_s(min(intervals, default=60))}
    with open(out, "w", encoding="utf-8") as f:
        f.write("# GENERATED by `python3 deploy/check.py only-named-alerts`: each scenario of "
                "deploy/prometheus/tests*.yaml,\n# every alert it does not name expected silent at "
                "every evaluation.\n")
        yaml.safe_dump(head, f, sort_keys=False, width=1000)
        f.write("tests:\n")
        for where, g in groups:
            f.write(f"# {where}\n")
            yaml.safe_dump([g], f, sort_keys=False, width=1000)
    print(f"wrote {len(groups)} scenarios, {cases} checks that an alert the scenario does not name stays "
          f"silent, to {out}")


# -------------------------------------------------------------------------------- dashboard


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def check_dashboard():
    path = os.path.join(DEPLOY, "grafana", "bulkhead.json")
    try:
        with open(path, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        problem(f"grafana/bulkhead.json: {e}")
        return 0
    records = {r["record"] for g in rules_groups() for r in g["rules"] if "record" in r}
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    if "tenant" not in variables:
        problem("grafana/bulkhead.json: no 'tenant' template variable")
    else:
        q = variables["tenant"].get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        if not any(m in SERIES_NAMES for m in METRIC_RE.findall(q)):
            problem("grafana/bulkhead.json: the tenant variable's query uses no Bulkhead metric")
    n = 0
    titles = []
    for p in walk_panels(dash.get("panels", [])):
        if p.get("type") == "row":
            continue
        n += 1
        title = p.get("title", "")
        titles.append(title.lower())
        targets = p.get("targets", [])
        if not targets:
            problem(f"grafana/bulkhead.json: panel '{title}' has no queries")
        for t in targets:
            expr = t.get("expr", "")
            used = RECORD_RE.findall(expr)
            for r in used:
                if r not in records:
                    problem(f"grafana/bulkhead.json: panel '{title}': unknown recording rule {r}")
            metrics = METRIC_RE.findall(RECORD_RE.sub("", expr))
            if not metrics and not used:
                problem(f"grafana/bulkhead.json: panel '{title}': query uses no Bulkhead metric: {expr!r}")
            for m in metrics:
                if m not in SERIES_NAMES:
                    problem(f"grafana/bulkhead.json: panel '{title}': unknown metric {m}")
    for want in REQUIRED_PANELS:
        if not any(want in t for t in titles):
            problem(f"grafana/bulkhead.json: no panel titled like '{want}'")
    return n


def dashboard_rules(out):
    with open(os.path.join(DEPLOY, "grafana", "bulkhead.json"), encoding="utf-8") as f:
        dash = json.load(f)
    rules = []
    for p in walk_panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            for var, value in (("$__rate_interval", "1m"), ("$__interval", "1m"), ("$tenant", ".*")):
                expr = expr.replace(var, value)
            rules.append({"record": f"dashboard:panel_{p['id']}_{t['refId']}:query", "expr": expr})
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, sort_keys=False)
    print(f"wrote {len(rules)} dashboard queries to {out}")


# ------------------------------------------------------------------------------------- main


def main(argv):
    cmd = argv[1] if len(argv) > 1 else "check"
    global quiet
    if cmd == "manifests":
        quiet = True
        for kind, p in manifests():
            print(kind, p)
        return 0
    elif cmd == "dashboard-rules" and len(argv) == 3:
        dashboard_rules(argv[2])
    elif cmd == "only-named-alerts" and len(argv) == 3:
        only_named_alerts(argv[2])
    elif cmd == "gen-prometheusrule":
        gen_prometheusrule()
    elif cmd == "check":
        ms = manifests()
        crds = check_crds([p for k, p in ms if k == "crd"])
        check_prometheusrule()
        n_alerts, n_records = check_alerts()
        check_scenario_lengths()
        n_panels = check_dashboard()
        print(f"check.py: {len(ms)} manifest files in kustomizations, {crds} custom resources shape-checked, "
              f"{n_alerts} alerts and {n_records} recording rules, {n_panels} dashboard panels; "
              f"{len(problems)} problem(s)")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
