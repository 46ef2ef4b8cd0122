//! Tests that cannot run where they are run: visible, and never green under CI.
//!
//! A test that needs something the machine lacks (root and BPF, a binary, an image) calls
//! [`skip`]. Under a truthy `CI` (anything but unset, empty, `0`, `false`, `no`, `off`) that is a
//! failure. Otherwise the skip is printed and, when `BULKHEAD_SKIP_LOG` names a file, appended to
//! it as one line (`<test>: <why>`), so `cargo xtask test` counts it as skipped, not passed.

use std::io::Write;
use std::{eprintln, format, panic};

/// Is this value of `CI` truthy (set, and not empty, `0`, `false`, `no` or `off`)?
pub fn truthy(v: Option<&str>) -> bool {
    v.is_some_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        !matches!(v.as_str(), "" | "0" | "false" | "no" | "off")
    })
}

/// `CI` is set to a truthy value: a test that cannot run must fail.
pub fn ci_strict() -> bool {
    truthy(std::env::var("CI").ok().as_deref())
}

/// This test cannot run here because of `why`: panics under CI, else records the skip. The
/// caller returns right after.
pub fn skip(why: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("<unnamed test>");
    if ci_strict() {
        panic!("CI is set, so this test must run, but it cannot: {why}");
    }
    eprintln!("SKIPPED {test}: {why} (set CI=true to make this a failure)");
    if let Some(path) = std::env::var_os("BULKHEAD_SKIP_LOG")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let line = format!("{test}: {}\n", why.replace('\n', " "));
        let _ = f.write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_truthy_ci_makes_skips_failures() {
        for v in ["true", "1", "yes", "TRUE", "github", " on "] {
            assert!(truthy(Some(v)), "{v:?}");
        }
        for v in [
            None,
            Some(""),
            Some("0"),
            Some("false"),
            Some("No"),
            Some("off"),
        ] {
            assert!(!truthy(v), "{v:?}");
        }
    }
}
