//! The defaults as documented (the README's tables, the example configuration's `the default`
//! marks) against `Config::default()`.

use super::*;

/// The defaults as one JSON document, addressed by dotted path: `Config::default()`, with the
/// optional sections' defaults where the README names their fields (`tenants.<name>`,
/// `keys[]`, `auth.jwt`, `limits.redis`, `telemetry.otlp`, `model`).
fn defaults_document() -> serde_json::Value {
    let json = |v: serde_json::Result<serde_json::Value>| v.unwrap();
    let mut doc = json(serde_json::to_value(Config::default()));
    doc["tenants"]["<name>"] = json(serde_json::to_value(TenantConfig::default()));
    doc["keys[]"] = json(serde_json::to_value(KeyConfig::default()));
    doc["auth"]["jwt"] = json(serde_json::to_value(JwtConfig::default()));
    doc["limits"]["redis"] = json(serde_json::to_value(RedisLimitsConfig::default()));
    doc["telemetry"]["otlp"] = json(serde_json::to_value(OtlpConfig::default()));
    let model: ModelConfig =
        toml::from_str("layers = 1\nkv_heads = 1\nhead_dim = 1\ndtype = \"bf16\"").unwrap();
    doc["model"] = json(serde_json::to_value(model));
    doc
}

/// One README default against the configured one; `None` when they agree.
fn readme_default_differs(written: &str, actual: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    let w = written.trim();
    let agrees = match actual {
        _ if matches!(w, "none" | "—" | "required") => match actual {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        },
        Value::Bool(b) => w == b.to_string(),
        Value::Number(n) => {
            let (num, unit) = w.split_once(' ').unwrap_or((w, ""));
            let scale = match unit {
                "" => 1.0,
                "KiB" => 1024.0,
                "MiB" => 1024.0 * 1024.0,
                _ => return Some(format!("{w:?}: unknown unit")),
            };
            num.parse::<f64>().ok().map(|x| x * scale) == n.as_f64()
        }
        Value::Array(items) if w.ends_with(" phrases") => {
            w.trim_end_matches(" phrases").parse::<usize>().ok() == Some(items.len())
        }
        _ => {
            // Backticked: a TOML value (`["*"]`) or a bare word (`tokens`); several, a list.
            let ticked: Vec<&str> = w.split('`').skip(1).step_by(2).collect();
            let value = |t: &str| {
                toml::from_str::<toml::Table>(&format!("v = {t}"))
                    .ok()
                    .and_then(|mut v| v.remove("v"))
                    .map(|v| serde_json::to_value(v).unwrap())
                    .unwrap_or_else(|| Value::String(t.to_string()))
            };
            match ticked.as_slice() {
                [] => false,
                [one] => value(one) == *actual,
                many => Value::Array(many.iter().map(|t| value(t)).collect()) == *actual,
            }
        }
    };
    (!agrees).then(|| format!("README says {w:?}, the default is {actual}"))
}

/// Every row of sidecar/README.md's `| field | default | what |` tables states the default
/// `Config::default()` has (a row may name several fields: `a`, `b` with `x, y`, or one
/// value for all; `.x` is a sibling of the first field).
#[test]
fn readme_defaults_are_the_defaults() {
    let readme = include_str!("../../README.md");
    let doc = defaults_document();
    let mut checked = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    let mut in_table = false;
    for line in readme.lines() {
        if line.starts_with("| field | default |") {
            in_table = true;
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
        }
        if !in_table || line.starts_with("|---") {
            continue;
        }
        let cells: Vec<&str> = line.split(" | ").collect();
        let (fields, written) = (cells[0].trim_start_matches("| "), cells[1]);
        let mut names: Vec<String> = Vec::new();
        for f in fields.split(", ") {
            let f = f.trim_matches('`');
            let name = match (f.strip_prefix('.'), names.first()) {
                (Some(sibling), Some(first)) => {
                    format!("{}.{sibling}", first.rsplit_once('.').unwrap().0)
                }
                _ => f.to_string(),
            };
            names.push(name);
        }
        // One value per field, or one value (maybe a list) for all of them.
        let values: Vec<&str> = if names.len() > 1 && written.split(", ").count() == names.len() {
            written.split(", ").collect()
        } else {
            vec![written; names.len()]
        };
        for (name, written) in names.iter().zip(values) {
            let actual = name
                .split('.')
                .try_fold(&doc, |v, k| v.get(k))
                .unwrap_or_else(|| panic!("{name}: no such field ({line})"));
            if let Some(p) = readme_default_differs(written, actual) {
                problems.push(format!("{name}: {p}"));
            }
            checked.insert(name.clone());
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    // The fields that had no documented default, and a sample of each section.
    for f in [
        "cache.salt_generation",
        "upstream.flavor",
        "http.max_body_bytes",
        "limits.redis.key_prefix",
        "telemetry.otlp.sample_ratio",
        "tenants.<name>.keywords",
        "auth.jwt.algorithms",
    ] {
        assert!(checked.contains(f), "{f} is not in the README's tables");
    }
}

/// A setting the example configuration marks as the default (`# the default`, `(the
/// default)`) is the default.
#[test]
fn example_config_defaults_are_the_defaults() {
    let doc = defaults_document();
    let mut section = String::new();
    let mut checked = 0;
    for line in EXAMPLE_CONFIG.lines() {
        let line = line.trim();
        if let Some(h) = line.strip_prefix('[') {
            let h = h.trim_matches(|c| c == '[' || c == ']');
            section = match h.split_once('.') {
                Some(("tenants", _)) => "tenants.<name>".into(),
                _ if h == "keys" => "keys[]".into(),
                _ => h.into(),
            };
            continue;
        }
        let Some((setting, comment)) = line.split_once(" #") else {
            continue;
        };
        let comment = comment.trim();
        if !(comment == "the default" || comment.contains("the default)")) {
            continue;
        }
        let (key, value) = setting.split_once('=').unwrap();
        let path = format!("{section}.{}", key.trim());
        let written: toml::Table = toml::from_str(&format!("v = {}", value.trim())).unwrap();
        let actual = path
            .split('.')
            .try_fold(&doc, |v, k| v.get(k))
            .unwrap_or_else(|| panic!("{path}: no such field"));
        assert_eq!(
            serde_json::to_value(&written["v"]).unwrap(),
            *actual,
            "{path}: {line}"
        );
        checked += 1;
    }
    assert!(checked >= 3, "{checked}");
}
