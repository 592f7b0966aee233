//! The module graph of every workspace crate is acyclic.
//!
//! Reads every `*.rs` under each workspace member's `src/` (and the facade's own `src/`), maps
//! each file to its module path (`src/a.rs` and `src/a/mod.rs` are `a`, `src/a/b.rs` is
//! `a::b`), and collects the modules each file names through `crate::…` and `super::…` paths in
//! code. Comments, string literals and char literals are skipped, so intra-doc links and doc
//! tests do not count; a group `use crate::{a, b::c}` names `a` and `b`. A name re-exported by
//! the crate root or a directory module (`pub use store::Core;` in `lib.rs`) resolves to the
//! module it comes from. The crate root (`lib.rs`, `main.rs`) only declares and re-exports
//! modules, so it is no node of the graph.
//!
//! Two granularities are checked: the top-level modules of each crate, and the submodules of
//! each directory module (`relay/`, `memory/`, ...) among themselves. A cycle fails the test and
//! is printed, e.g. `outbox-postgres: store -> ops -> store`.
//!
//! Plain std, no build of the crates involved: it runs in well under a second.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A module path inside one crate: `[]` is the crate root, `["relay", "leases"]` is
/// `relay::leases`.
type ModPath = Vec<String>;

/// One crate's source files, by module path.
struct Crate {
    name: String,
    files: BTreeMap<ModPath, String>,
}

/// The workspace root (this test belongs to the facade package at the root).
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The member folders named in the root `Cargo.toml`'s `[workspace] members = [...]`, plus
/// the root package itself.
fn member_dirs(root: &Path) -> Vec<PathBuf> {
    let manifest = fs::read_to_string(root.join("Cargo.toml")).expect("read root Cargo.toml");
    let start = manifest
        .find("members")
        .expect("workspace members in Cargo.toml");
    let open = start + manifest[start..].find('[').expect("members list opens");
    let close = open + manifest[open..].find(']').expect("members list closes");
    let mut dirs = vec![root.to_path_buf()];
    for entry in manifest[open + 1..close].split(',') {
        let entry = entry.trim().trim_matches('"');
        if !entry.is_empty() {
            dirs.push(root.join(entry));
        }
    }
    dirs
}

/// The package name in a member's `Cargo.toml` (for messages).
fn package_name(dir: &Path) -> String {
    let manifest = fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
    manifest
        .lines()
        .find_map(|line| {
            let rest = line.trim().strip_prefix("name")?.trim_start();
            Some(rest.strip_prefix('=')?.trim().trim_matches('"').to_string())
        })
        .unwrap_or_else(|| dir.display().to_string())
}

/// Every `*.rs` file below `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file relative to `src/`.
fn module_path(relative: &Path) -> ModPath {
    let mut parts: ModPath = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs").to_string();
        let is_root = parts.is_empty() && (stem == "lib" || stem == "main");
        if stem != "mod" && !is_root {
            parts.push(stem);
        }
    }
    parts
}

fn load_crate(dir: &Path) -> Crate {
    let src = dir.join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let mut files = BTreeMap::new();
    for path in paths {
        let relative = path.strip_prefix(&src).expect("file under src");
        let text = fs::read_to_string(&path).expect("read source file");
        // lib.rs and main.rs are both the root; keep them together.
        files
            .entry(module_path(relative))
            .and_modify(|all: &mut String| {
                all.push('\n');
                all.push_str(&text);
            })
            .or_insert(text);
    }
    Crate {
        name: package_name(dir),
        files,
    }
}

/// A token of Rust code: an identifier (or keyword), `::`, or one punctuation character.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Punct(char),
}

/// The tokens of `text` with comments, string literals and char literals removed.
fn tokens(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_string(&chars, i + 1, 0);
        } else if (c == 'r' || c == 'b' || c == 'c') && raw_string_hashes(&chars, i).is_some() {
            let (start, hashes) = raw_string_hashes(&chars, i).unwrap_or((i, 0));
            i = skip_string(&chars, start, hashes);
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{7f}') or a lifetime ('a).
            if next == Some('\\') {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // `$crate` in a macro is the defining crate, not a module of this one.
            let after_dollar = start > 0 && chars[start - 1] == '$';
            out.push(Token::Ident(if after_dollar {
                format!("${word}")
            } else {
                word
            }));
        } else if c == ':' && next == Some(':') {
            out.push(Token::PathSep);
            i += 2;
        } else if c.is_whitespace() || c.is_ascii_digit() {
            i += 1;
        } else {
            out.push(Token::Punct(c));
            i += 1;
        }
    }
    out
}

/// If a raw or prefixed string literal starts at `i` (`r"`, `r#"`, `b"`, `br#"`, `c"`), the
/// index just after its opening quote and its number of `#`.
fn raw_string_hashes(chars: &[char], i: usize) -> Option<(usize, usize)> {
    if i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_') {
        return None;
    }
    let mut j = i;
    if matches!(chars.get(j), Some('b') | Some('c')) {
        j += 1;
    }
    let raw = chars.get(j) == Some(&'r');
    if raw {
        j += 1;
    }
    let mut hashes = 0;
    while raw && chars.get(j) == Some(&'#') {
        hashes += 1;
        j += 1;
    }
    (j > i && chars.get(j) == Some(&'"')).then_some((j + 1, hashes))
}

/// The index after a string literal whose body starts at `i` and that closes with `"` and
/// `hashes` times `#` (escapes apply only without hashes... and in plain strings).
fn skip_string(chars: &[char], mut i: usize, hashes: usize) -> usize {
    while i < chars.len() {
        if chars[i] == '\\' && hashes == 0 {
            i += 2;
            continue;
        }
        if chars[i] == '"' && (0..hashes).all(|k| chars.get(i + 1 + k) == Some(&'#')) {
            return i + 1 + hashes;
        }
        i += 1;
    }
    i
}

/// A path as written: its leading segments up to the first that is not a plain identifier,
/// or, for a group (`a::{b, c::d}`), one path per member.
fn paths_at(toks: &[Token], mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    loop {
        match toks.get(i) {
            Some(Token::Ident(word)) => {
                path.push(word.clone());
                i += 1;
                if toks.get(i) == Some(&Token::PathSep) {
                    i += 1;
                } else {
                    out.push(path);
                    return;
                }
            }
            Some(Token::Punct('{')) => {
                // One path per top-level member of the group.
                i += 1;
                let mut depth = 0;
                let mut member_start = true;
                while let Some(tok) = toks.get(i) {
                    match tok {
                        Token::Punct('{') => depth += 1,
                        Token::Punct('}') if depth == 0 => return,
                        Token::Punct('}') => depth -= 1,
                        Token::Punct(',') if depth == 0 => {
                            member_start = true;
                            i += 1;
                            continue;
                        }
                        _ => {}
                    }
                    if member_start && depth == 0 {
                        paths_at(toks, i, path.clone(), out);
                        member_start = false;
                    }
                    i += 1;
                }
                return;
            }
            _ => {
                out.push(path);
                return;
            }
        }
    }
}

/// The `crate::…` and `super::…` paths in one file, each made absolute (starting at the crate
/// root), keyed by the module that names them (the file's module; inline modules such as
/// `mod tests { use super::*; }` are resolved but count as their file).
fn absolute_paths(module: &ModPath, text: &str) -> Vec<Vec<String>> {
    let toks = tokens(text);
    let mut out = Vec::new();
    // Inline modules open at a brace depth; `super` inside them starts from them.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let preceded_by_sep = i > 0 && toks[i - 1] == Token::PathSep;
        match &toks[i] {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Token::Ident(word)
                if word == "mod"
                    && matches!(toks.get(i + 1), Some(Token::Ident(_)))
                    && toks.get(i + 2) == Some(&Token::Punct('{')) =>
            {
                if let Some(Token::Ident(name)) = toks.get(i + 1) {
                    inline.push((name.clone(), depth));
                }
            }
            Token::Ident(word)
                if (word == "crate" || word == "super")
                    && !preceded_by_sep
                    && toks.get(i + 1) == Some(&Token::PathSep) =>
            {
                let mut base: ModPath = module.clone();
                base.extend(inline.iter().map(|(name, _)| name.clone()));
                let mut j = i;
                if word == "crate" {
                    base.clear();
                    j += 2;
                } else {
                    while toks.get(j) == Some(&Token::Ident("super".into()))
                        && toks.get(j + 1) == Some(&Token::PathSep)
                    {
                        base.pop();
                        j += 2;
                    }
                }
                let mut found = Vec::new();
                paths_at(&toks, j, base, &mut found);
                out.extend(found);
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Names a module re-exports with `pub use` (or `pub(crate) use`): name -> the path it comes
/// from, made absolute.
fn reexports(module: &ModPath, text: &str) -> BTreeMap<String, Vec<String>> {
    let toks = tokens(text);
    let mut map = BTreeMap::new();
    let mut i = 0;
    while i < toks.len() {
        if toks[i] == Token::Ident("pub".into()) {
            let mut j = i + 1;
            if toks.get(j) == Some(&Token::Punct('(')) {
                while j < toks.len() && toks[j] != Token::Punct(')') {
                    j += 1;
                }
                j += 1;
            }
            if toks.get(j) == Some(&Token::Ident("use".into())) {
                let mut found = Vec::new();
                let start = j + 1;
                let (base, from) = match toks.get(start) {
                    Some(Token::Ident(w)) if w == "crate" => (Vec::new(), start + 2),
                    Some(Token::Ident(w)) if w == "self" => (module.clone(), start + 2),
                    Some(Token::Ident(w)) if w == "super" => {
                        let mut base = module.clone();
                        base.pop();
                        (base, start + 2)
                    }
                    _ => (module.clone(), start),
                };
                paths_at(&toks, from, base, &mut found);
                for path in found {
                    if let Some(name) = path.last() {
                        map.insert(name.clone(), path.clone());
                    }
                }
            }
        }
        i += 1;
    }
    map
}

/// The module an absolute path lands in: its longest prefix that is a module of the crate,
/// following the re-exports (`exports`) of the module it stops at.
fn target_module(
    modules: &BTreeSet<ModPath>,
    exports: &BTreeMap<ModPath, BTreeMap<String, Vec<String>>>,
    path: &[String],
) -> ModPath {
    let mut path = path.to_vec();
    for _ in 0..8 {
        let mut known = 0;
        while known < path.len() && modules.contains(&path[..=known].to_vec()) {
            known += 1;
        }
        let module = path[..known].to_vec();
        let Some(next) = path.get(known) else {
            return module;
        };
        match exports.get(&module).and_then(|map| map.get(next)) {
            Some(source) if source.as_slice() != &path[..=known] => {
                let mut rerouted = source.clone();
                rerouted.extend_from_slice(&path[known + 1..]);
                path = rerouted;
            }
            _ => return module,
        }
    }
    Vec::new()
}

/// The strongly connected components of `graph` with more than one node (each holds a cycle).
fn tangles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    let reaches = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(node) = todo.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|node| (node, reaches(node))).collect();
    let mut out: Vec<BTreeSet<String>> = Vec::new();
    for (node, seen) in &reach {
        if !seen.contains(*node) || out.iter().any(|scc| scc.contains(*node)) {
            continue;
        }
        let scc: BTreeSet<String> = seen
            .iter()
            .filter(|other| reach.get(other).is_some_and(|back| back.contains(*node)))
            .cloned()
            .collect();
        out.push(scc);
    }
    out
}

/// A shortest cycle through the first node of `scc`, its first node repeated at the end.
fn cycle_in(graph: &BTreeMap<String, BTreeSet<String>>, scc: &BTreeSet<String>) -> Vec<String> {
    let Some(start) = scc.iter().next() else {
        return Vec::new();
    };
    // Breadth-first from `start` back to `start`, inside the component.
    let mut parent: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start.clone()]);
    while let Some(node) = queue.pop_front() {
        for next in graph.get(&node).into_iter().flatten() {
            if !scc.contains(next) {
                continue;
            }
            if next == start {
                let mut cycle = vec![start.clone(), node.clone()];
                let mut at = node.clone();
                while let Some(up) = parent.get(&at) {
                    cycle.push(up.clone());
                    at = up.clone();
                }
                cycle.reverse();
                return cycle;
            }
            if !parent.contains_key(next) && next != start {
                parent.insert(next.clone(), node.clone());
                queue.push_back(next.clone());
            }
        }
    }
    Vec::new()
}

/// Every module-level edge of a crate: (naming module, named module), both absolute.
fn edges(krate: &Crate) -> BTreeSet<(ModPath, ModPath)> {
    let modules: BTreeSet<ModPath> = krate.files.keys().cloned().collect();
    // Only the crate root and directory modules are seen through: they are no node of the
    // graph they head. A file module's re-export (`rules` re-exporting `text`) is named as
    // that module.
    let heads_others = |m: &ModPath| {
        modules
            .iter()
            .any(|o| o.len() > m.len() && o.starts_with(m))
    };
    let exports: BTreeMap<ModPath, BTreeMap<String, Vec<String>>> = krate
        .files
        .iter()
        .filter(|(module, _)| heads_others(module))
        .map(|(module, text)| (module.clone(), reexports(module, text)))
        .collect();
    let mut out = BTreeSet::new();
    for (module, text) in &krate.files {
        for path in absolute_paths(module, text) {
            let target = target_module(&modules, &exports, &path);
            if &target != module {
                out.insert((module.clone(), target));
            }
        }
    }
    out
}

/// The graphs to check for one crate: label -> graph of node names. `crate` is its top-level
/// modules; `crate::relay` the submodules of `relay/` among themselves.
fn graphs(
    krate: &Crate,
    edges: &BTreeSet<(ModPath, ModPath)>,
) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    // Every module with submodules is a scope: the root and each directory module.
    let scopes: BTreeSet<ModPath> = krate
        .files
        .keys()
        .filter(|m| !m.is_empty())
        .map(|m| m[..m.len() - 1].to_vec())
        .collect();
    let mut out = BTreeMap::new();
    for scope in scopes {
        let label = if scope.is_empty() {
            krate.name.clone()
        } else {
            format!("{}: {}", krate.name, scope.join("::"))
        };
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in edges {
            let inside = |m: &ModPath| m.len() > scope.len() && m.starts_with(&scope);
            if inside(from) && inside(to) {
                let a = &from[scope.len()];
                let b = &to[scope.len()];
                if a != b {
                    graph.entry(a.clone()).or_default().insert(b.clone());
                }
            }
        }
        out.insert(label, graph);
    }
    out
}

#[test]
fn no_module_cycles_in_any_workspace_crate() {
    let root = workspace_root();
    let mut cycles = Vec::new();
    let mut checked = 0;
    for dir in member_dirs(&root) {
        let krate = load_crate(&dir);
        assert!(
            !krate.files.is_empty(),
            "no sources under {}",
            dir.display()
        );
        let edges = edges(&krate);
        for (label, graph) in graphs(&krate, &edges) {
            checked += 1;
            for scc in tangles(&graph) {
                let members: Vec<&str> = scc.iter().map(String::as_str).collect();
                cycles.push(format!(
                    "{label}: {} (tangled: {})",
                    cycle_in(&graph, &scc).join(" -> "),
                    members.join(", ")
                ));
            }
        }
    }
    assert!(checked > 10, "only {checked} module graphs found");
    assert!(
        cycles.is_empty(),
        "module cycles (each module names the next through crate::/super:: paths):\n  {}",
        cycles.join("\n  ")
    );
}

#[test]
fn the_scanner_sees_groups_super_and_skips_comments() {
    let text = r##"
//! [`crate::doc_only`] is a link
/// `use crate::in_doc;`
use crate::{alpha, beta::Thing, gamma::{x, y}};
const S: &str = "crate::in_string";
const R: &str = r#"crate::in_raw"#;
fn f<'a>(c: char) { let _ = '{'; crate::delta::call(); }
mod tests { use super::*; use super::super::epsilon::E; }
"##;
    let module = vec!["here".to_string(), "inner".to_string()];
    let found: BTreeSet<String> = absolute_paths(&module, text)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    let expected: BTreeSet<String> = [
        "alpha",
        "beta::Thing",
        "gamma::x",
        "gamma::y",
        "delta::call",
        "here::inner",
        "here::epsilon::E",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(found, expected);
}

#[test]
fn the_cycle_finder_reports_each_tangle_with_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("store", &["ops", "core"][..]),
        ("ops", &["core", "store"][..]),
        ("core", &[][..]),
        ("a", &["b"][..]),
        ("b", &["c"][..]),
        ("c", &["a"][..]),
    ]
    .into_iter()
    .map(|(from, to)| (from.to_string(), to.iter().map(|t| t.to_string()).collect()))
    .collect();
    let found: Vec<Vec<String>> = tangles(&graph)
        .iter()
        .map(|scc| cycle_in(&graph, scc))
        .collect();
    assert_eq!(
        found,
        vec![
            vec!["a".to_string(), "b".into(), "c".into(), "a".into()],
            vec!["ops".to_string(), "store".into(), "ops".into()],
        ]
    );
    let acyclic: BTreeMap<String, BTreeSet<String>> =
        [("store".to_string(), BTreeSet::from(["core".to_string()]))].into();
    assert!(tangles(&acyclic).is_empty());
}
