//! `unsafe` lives in the sys layer (`agent/src/sys/`) alone: the crate denies `unsafe_code`,
//! allows it on `mod sys` only, and no other source file has an unsafe block, function, impl
//! or trait (the lint could be allowed again further down; this reads the sources).

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The lines of `text` that use `unsafe` as Rust syntax (comments aside).
fn unsafe_uses(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            let code = l.split("//").next().unwrap_or_default();
            [
                "unsafe {",
                "unsafe fn",
                "unsafe impl",
                "unsafe trait",
                "unsafe extern",
            ]
            .iter()
            .any(|u| code.contains(u))
        })
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn only_the_sys_layer_has_unsafe_code() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let sys = src.join("sys");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 10, "found the sources: {files:?}");
    let mut in_sys = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let uses = unsafe_uses(&text);
        if file.starts_with(&sys) {
            in_sys += uses.len();
            continue;
        }
        assert!(uses.is_empty(), "{}: {uses:?}", file.display());
        let allows: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("allow(unsafe_code)"))
            .collect();
        if file.ends_with("lib.rs") {
            assert!(text.contains("#![deny(unsafe_code)]"), "lib.rs denies it");
            let at = text.find("#[allow(unsafe_code)]\npub mod sys;");
            assert!(at.is_some(), "lib.rs allows it on `mod sys` alone");
            assert_eq!(allows.len(), 1, "lib.rs: {allows:?}");
        } else {
            assert!(allows.is_empty(), "{}: {allows:?}", file.display());
        }
    }
    // The scan sees what it looks for: the sys layer's own blocks.
    assert!(in_sys >= 8, "{in_sys} unsafe uses found in the sys layer");
}
