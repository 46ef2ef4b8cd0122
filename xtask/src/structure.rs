//! `cargo xtask structure [--write]`: the sidecar's module map drawn from its `use` lines (with
//! `--write`, into ARCHITECTURE.md), and the lines of code of every source file of the agent and
//! the sidecar.
//!
//! The tests below hold ARCHITECTURE.md to the code: its module map is exactly the graph the
//! `crate::` paths draw, that graph has no cycle, and no file is over [`MAX_CODE_LINES`].

use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// "No module over about 600 lines of code": non-blank lines that are not comments, outside
/// the unit-test module.
pub const MAX_CODE_LINES: usize = 600;

/// The line in ARCHITECTURE.md that the module map's fenced block follows.
const MAP_MARKER: &str = "<!-- module map: drawn by `cargo xtask structure` -->";

/// Top-level module -> the top-level modules it names in a `crate::` path (`main`, the binary,
/// in a `bulkhead_sidecar::` path). Test-only code (`tests.rs` files, `mod tests` blocks) and
/// comments are left out: they are not the architecture.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

pub fn run(args: &[&str]) -> Result<()> {
    let write = match args {
        [] => false,
        ["--write"] => true,
        _ => bail!("usage: cargo xtask structure [--write]"),
    };
    let root = crate::root();
    let graph = sidecar_graph(&root)?;
    if write {
        let path = root.join("ARCHITECTURE.md");
        let md = std::fs::read_to_string(&path)?;
        let old = documented_map(&md).context("ARCHITECTURE.md has no module map block")?;
        let at = md.find(MAP_MARKER).unwrap();
        let md = format!(
            "{}{}",
            &md[..at],
            md[at..].replacen(&old, &render_map(&graph), 1)
        );
        std::fs::write(&path, md)?;
        println!("ARCHITECTURE.md: module map written\n");
    }
    println!("sidecar module map (the block ARCHITECTURE.md holds):\n");
    println!("{}", render_map(&graph));
    for (name, graph) in [
        ("sidecar", graph.clone()),
        (
            "agent",
            crate_graph(&root.join("agent/src"), "bulkhead_agent::")?,
        ),
    ] {
        match find_cycle(&graph) {
            Some(c) => println!("{name}: cycle: {}", c.join(" -> ")),
            None => println!("{name}: no cycle"),
        }
    }
    println!();
    for dir in ["sidecar/src", "agent/src", "agent-common/src"] {
        let mut total = 0;
        println!("{dir} (lines of code, without unit tests and comments):");
        for (file, n) in code_lines_under(&root.join(dir))? {
            total += n;
            let rel = file.strip_prefix(root.join(dir)).unwrap_or(&file);
            let flag = if n > MAX_CODE_LINES { "  <-- over" } else { "" };
            println!("  {n:>5}  {}{flag}", rel.display());
        }
        println!("  {total:>5}  total\n");
    }
    Ok(())
}

/// Every `.rs` file under `dir` but unit-test files, with its lines of code, sorted by path.
pub fn code_lines_under(dir: &Path) -> Result<Vec<(PathBuf, usize)>> {
    let mut out = Vec::new();
    for file in rust_files(dir)? {
        if is_test_file(&file) {
            continue;
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        out.push((file, code_lines(&text)));
    }
    Ok(out)
}

fn is_test_file(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == "tests.rs")
        || p.components().any(|c| c.as_os_str() == "tests")
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let p = entry?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The lines of a source file up to its unit-test module (`#[cfg(test)]` then `mod tests {`).
fn production_lines(text: &str) -> impl Iterator<Item = &str> {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .windows(2)
        .position(|w| w[0].trim() == "#[cfg(test)]" && w[1].trim_start().starts_with("mod tests {"))
        .unwrap_or(lines.len());
    lines.into_iter().take(end)
}

/// Non-blank lines that are not `//` comments (doc comments included), before the unit tests.
pub fn code_lines(text: &str) -> usize {
    production_lines(text)
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .count()
}

/// A source file's module path: `auth/jwt.rs` -> `auth::jwt`, `auth/mod.rs` -> `auth`.
fn module_path(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| {
            c.as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string()
        })
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

fn parent(module: &str) -> &str {
    module.rsplit_once("::").map_or("", |(p, _)| p)
}

fn join(base: &str, rest: &str) -> String {
    if base.is_empty() {
        rest.to_string()
    } else {
        format!("{base}::{rest}")
    }
}

/// Every path in code (not comments, not the unit tests) that starts with one of `roots`
/// (`crate::`, `super::`, `self::`, `bulkhead_sidecar::`), as (root, the rest); a use tree's
/// groups (`a::{b, c::{d, e}}`, over several lines too) give one path per leaf.
fn paths(text: &str, roots: &[&str]) -> Vec<(String, String)> {
    let code: String = production_lines(text)
        .map(|line| line.find("//").map_or(line, |i| &line[..i]))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    for root in roots {
        let mut at = 0;
        while let Some(i) = code[at..].find(root) {
            let start = at + i;
            at = start + root.len();
            let before = code[..start].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let mut leaves = Vec::new();
            use_tree(&code[at..], String::new(), &mut leaves);
            out.extend(leaves.into_iter().map(|p| (root.to_string(), p)));
        }
    }
    out
}

/// The leaves of the use tree at the start of `s`, each prefixed with `prefix`; returns how
/// many bytes of `s` the tree took.
fn use_tree(s: &str, prefix: String, leaves: &mut Vec<String>) -> usize {
    let ident = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    let path_len = s.find(|c: char| !ident(c)).unwrap_or(s.len());
    let path = s[..path_len].trim_end_matches(':');
    let full = match (prefix.is_empty(), path.is_empty()) {
        (_, true) => prefix.clone(),
        (true, false) => path.to_string(),
        (false, false) => format!("{prefix}::{path}"),
    };
    let rest = &s[path_len..];
    let group_at = s[..path_len].ends_with("::") || path.is_empty();
    if group_at && rest.starts_with('{') {
        let mut used = path_len + 1;
        loop {
            let item = &s[used..];
            let skip = item.len() - item.trim_start().len();
            used += skip;
            if s[used..].starts_with('}') || used >= s.len() {
                return used + 1;
            }
            used += use_tree(&s[used..], full.clone(), leaves);
            let item = &s[used..];
            used += item.len() - item.trim_start().len();
            match s[used..].chars().next() {
                Some(',') => used += 1,
                Some('}') => return used + 1,
                _ => return used,
            }
        }
    }
    // `self` in a group names the group's own path.
    let full = full
        .strip_suffix("::self")
        .map(str::to_string)
        .unwrap_or(full);
    if !full.is_empty() {
        leaves.push(full);
    }
    path_len
}

/// The longest prefix of `path` (`a::b::Item`) that is one of `modules`.
fn resolve(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|m| modules.contains(m))
}

/// The sidecar's module graph, one node a source file, from `sidecar/src`. A module's use of
/// its own ancestors (`super::Item` from a child) is not an edge: the parent is the folder's
/// namespace, and the parent naming its children is how Rust declares them.
pub fn sidecar_graph(root: &Path) -> Result<Graph> {
    crate_graph(&root.join("sidecar/src"), "bulkhead_sidecar::")
}

/// The module graph of the crate whose sources are in `src`; its binary (`main.rs`) names the
/// library as `lib_name`.
pub fn crate_graph(src: &Path, lib_name: &str) -> Result<Graph> {
    let mut files = BTreeMap::new();
    for file in rust_files(src)? {
        let rel = file.strip_prefix(src).unwrap().to_path_buf();
        if is_test_file(&file) || rel == Path::new("lib.rs") {
            continue;
        }
        files.insert(module_path(&rel), file);
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    let mut graph = Graph::new();
    for (module, file) in &files {
        let text = std::fs::read_to_string(file)?;
        let deps = graph.entry(module.clone()).or_default();
        let roots = if module == "main" {
            vec![lib_name]
        } else {
            vec!["crate::", "super::", "self::"]
        };
        for (r, path) in paths(&text, &roots) {
            let full = match r.as_str() {
                "super::" => join(parent(module), &path),
                "self::" => join(module, &path),
                _ => path,
            };
            let Some(target) = resolve(&full, &modules) else {
                continue;
            };
            let ancestor = target == *module || module.starts_with(&format!("{target}::"));
            if !ancestor {
                deps.insert(target);
            }
        }
    }
    Ok(graph)
}

/// One line a module: `from ──▶ to, to` (`(none)` for a leaf), modules in name order.
pub fn render_map(graph: &Graph) -> String {
    let width = graph.keys().map(String::len).max().unwrap_or(0);
    graph
        .iter()
        .map(|(from, to)| {
            let to = if to.is_empty() {
                "(none)".to_string()
            } else {
                to.iter().cloned().collect::<Vec<_>>().join(", ")
            };
            format!("{from:<width$} ──▶ {to}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A cycle, as the modules along it (first repeated last), if the graph has one.
pub fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for next in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

/// The fenced block after [`MAP_MARKER`] in ARCHITECTURE.md.
pub fn documented_map(architecture_md: &str) -> Option<String> {
    let after = &architecture_md[architecture_md.find(MAP_MARKER)? + MAP_MARKER.len()..];
    let body = &after[after.find("```")? + 3..];
    let body = &body[body.find('\n')? + 1..];
    Some(body[..body.find("```")?].trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_md_holds_the_module_map_the_code_draws() {
        let root = crate::root();
        let md = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
        let documented = documented_map(&md).expect("ARCHITECTURE.md has no module map block");
        let drawn = render_map(&sidecar_graph(&root).unwrap());
        assert_eq!(
            documented, drawn,
            "ARCHITECTURE.md's module map is not the code's; `cargo xtask structure` prints it"
        );
    }

    #[test]
    fn the_sidecars_and_the_agents_modules_have_no_cycle() {
        let root = crate::root();
        for (src, lib) in [
            ("sidecar/src", "bulkhead_sidecar::"),
            ("agent/src", "bulkhead_agent::"),
        ] {
            let graph = crate_graph(&root.join(src), lib).unwrap();
            assert_eq!(find_cycle(&graph), None, "{src}:\n{}", render_map(&graph));
        }
    }

    #[test]
    fn no_source_file_is_over_the_line_budget() {
        let root = crate::root();
        let over: Vec<String> = ["sidecar/src", "agent/src", "agent-common/src"]
            .iter()
            .flat_map(|d| code_lines_under(&root.join(d)).unwrap())
            .filter(|(_, n)| *n > MAX_CODE_LINES)
            .map(|(f, n)| format!("{}: {n}", f.display()))
            .collect();
        assert!(
            over.is_empty(),
            "over {MAX_CODE_LINES} lines of code: {over:?}"
        );
    }

    #[test]
    fn code_lines_leave_out_comments_blanks_and_the_unit_tests() {
        let text = "//! doc\nuse a;\n\n/// item\nfn f() {\n    // note\n    g(); // trailing\n}\n#[cfg(test)]\nmod tests {\n    fn t() {}\n}\n";
        assert_eq!(code_lines(text), 4);
        // A `#[cfg(test)]` item that is not the test module is code.
        assert_eq!(code_lines("#[cfg(test)]\nfn helper() {}\n"), 2);
    }

    #[test]
    fn paths_are_read_from_code_only_whole_and_grouped() {
        let text = "use crate::auth::jwt;\n// crate::record::metrics in a comment\nlet x = foo_crate::limits::y; // crate::record\nuse crate::node::{\n    kv::{self, Kv},\n    tagging,\n};\nuse super::{refusal::Refusal, routes};\n#[cfg(test)]\nmod tests {\n    use crate::record::audit;\n}\n";
        let got = paths(text, &["crate::", "super::"]);
        let want = [
            ("crate::", "auth::jwt"),
            ("crate::", "node::kv"),
            ("crate::", "node::kv::Kv"),
            ("crate::", "node::tagging"),
            ("super::", "refusal::Refusal"),
            ("super::", "routes"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()));
        assert_eq!(got, want);
        let modules: BTreeSet<String> = ["auth", "auth::jwt"].map(String::from).into();
        assert_eq!(
            resolve("auth::jwt::Verifier", &modules).as_deref(),
            Some("auth::jwt")
        );
        assert_eq!(resolve("auth::Error", &modules).as_deref(), Some("auth"));
        assert_eq!(resolve("proxy::x", &modules), None);
        assert_eq!(module_path(Path::new("auth/mod.rs")), "auth");
        assert_eq!(
            module_path(Path::new("limits/shared/conn.rs")),
            "limits::shared::conn"
        );
    }

    #[test]
    fn a_cycle_is_found_and_named() {
        let mut g = Graph::new();
        g.insert("a".into(), ["b".to_string()].into());
        g.insert("b".into(), ["c".to_string()].into());
        g.insert("c".into(), ["a".to_string()].into());
        g.insert("d".into(), BTreeSet::new());
        assert_eq!(find_cycle(&g).unwrap().len(), 4);
        g.get_mut("c").unwrap().clear();
        assert_eq!(find_cycle(&g), None);
        assert_eq!(
            render_map(&g),
            "a ──▶ b\nb ──▶ c\nc ──▶ (none)\nd ──▶ (none)"
        );
    }

    #[test]
    fn the_documented_map_is_the_block_after_the_marker() {
        let md = format!("# x\n```\nother\n```\n{MAP_MARKER}\n\n```text\na ──▶ b\n```\n");
        assert_eq!(documented_map(&md).as_deref(), Some("a ──▶ b"));
        assert_eq!(documented_map("no marker"), None);
    }
}
