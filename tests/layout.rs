//! The house's shape, checked from the source: the folders are the levels `src/lib.rs` states,
//! a file imports only from its own level or below, no two files import each other in a
//! circle, and no source file grows past 600 lines.
//!
//! Run it alone with `cargo nextest run --test layout` (or `cargo test --test layout`). It
//! reads `src/` as text: every `crate::`, `super::`, `self::` and (in the binaries)
//! `flyproxy::` path outside a file's `#[cfg(test)]` module is an import, resolved to the file
//! that defines it (through a folder's `pub use` re-exports, and `#[macro_export]` macros to
//! the file that defines them).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 600;

/// One source file: its module path (`["relay", "park"]`; `[]` for lib.rs) and its text with
/// comments and the test module taken out.
struct Source {
    rel: String,
    module: Vec<String>,
    is_mod: bool,
    code: String,
    lines: usize,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code without comments, and without the `#[cfg(test)]` module that ends a file (unit
/// tests may reach anywhere).
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|n| n.trim_start().starts_with("mod "))
        {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        // A trailing comment; a `//` inside a string (a URL) cuts the rest of that line only.
        let code = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

fn load() -> Vec<Source> {
    let root = src_dir();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let rel = path
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let text = fs::read_to_string(&path).expect("read source");
            let mut module: Vec<String> = rel
                .trim_end_matches(".rs")
                .split('/')
                .map(str::to_owned)
                .collect();
            let is_mod = matches!(module.last().map(String::as_str), Some("mod" | "lib"));
            if is_mod {
                module.pop();
            }
            Source {
                rel,
                module,
                is_mod,
                lines: text.lines().count(),
                code: code_of(&text),
            }
        })
        .collect()
}

/// Parse the path tree that starts at `s` (after `crate::` and the like): `a::b::{c, d::e}`
/// gives `[a,b,c]` and `[a,b,d,e]`.
fn paths_at(s: &[u8], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    loop {
        while *i < s.len() && s[*i].is_ascii_whitespace() {
            *i += 1;
        }
        if *i < s.len() && s[*i] == b'{' {
            *i += 1;
            loop {
                paths_at(s, i, path.clone(), out);
                while *i < s.len() && s[*i].is_ascii_whitespace() {
                    *i += 1;
                }
                match s.get(*i) {
                    Some(b',') => *i += 1,
                    Some(b'}') => {
                        *i += 1;
                        return;
                    }
                    _ => return,
                }
                while *i < s.len() && s[*i].is_ascii_whitespace() {
                    *i += 1;
                }
                if s.get(*i) == Some(&b'}') {
                    *i += 1;
                    return;
                }
            }
        }
        let start = *i;
        while *i < s.len() && (s[*i].is_ascii_alphanumeric() || s[*i] == b'_') {
            *i += 1;
        }
        if start == *i {
            // `*` or nothing: the path so far.
            out.push(path);
            return;
        }
        path.push(String::from_utf8_lossy(&s[start..*i]).into_owned());
        if s[*i..].starts_with(b"::") {
            *i += 2;
        } else {
            out.push(path);
            return;
        }
    }
}

/// Every path a file names, made absolute (from the crate root).
fn imports(src: &Source) -> Vec<Vec<String>> {
    let s = src.code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let preceded_by_ident = i > 0 && (s[i - 1].is_ascii_alphanumeric() || s[i - 1] == b'_');
        let base: Option<(usize, Vec<String>)> = if preceded_by_ident {
            None
        } else if s[i..].starts_with(b"crate::") {
            Some((7, vec![]))
        } else if s[i..].starts_with(b"flyproxy::") {
            Some((10, vec![]))
        } else if s[i..].starts_with(b"super::") {
            let mut m = src.module.clone();
            if !src.is_mod || !m.is_empty() {
                m.pop();
            }
            Some((7, m))
        } else if s[i..].starts_with(b"self::") && src.is_mod {
            Some((6, src.module.clone()))
        } else {
            None
        };
        match base {
            Some((skip, prefix)) => {
                i += skip;
                paths_at(s, &mut i, prefix, &mut out);
            }
            None => i += 1,
        }
    }
    out
}

struct Tree<'a> {
    by_module: HashMap<Vec<String>, &'a Source>,
    /// In a folder's mod.rs: name re-exported -> the child module it comes from.
    reexports: HashMap<Vec<String>, HashMap<String, Vec<String>>>,
    /// `#[macro_export]` macros (named from the crate root) -> the file that defines them.
    macros: HashMap<String, &'a Source>,
}

impl<'a> Tree<'a> {
    fn new(sources: &'a [Source]) -> Tree<'a> {
        let mut by_module = HashMap::new();
        let mut reexports: HashMap<Vec<String>, HashMap<String, Vec<String>>> = HashMap::new();
        let mut macros = HashMap::new();
        for src in sources
            .iter()
            .filter(|s| !s.rel.starts_with("bin/") && s.rel != "main.rs")
        {
            by_module.insert(src.module.clone(), src);
            for line in src.code.lines() {
                let t = line.trim();
                if let Some(rest) = t.strip_prefix("macro_rules! ") {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    macros.insert(name, src);
                }
            }
            if src.is_mod {
                for stmt in src.code.split(';') {
                    let t = stmt.trim();
                    let Some(rest) = t.strip_prefix("pub use ") else {
                        continue;
                    };
                    let rest = rest.trim_start_matches("self::");
                    let mut paths = Vec::new();
                    let mut i = 0;
                    paths_at(rest.as_bytes(), &mut i, vec![], &mut paths);
                    for p in paths {
                        if p.len() >= 2 {
                            let mut child = src.module.clone();
                            child.push(p[0].clone());
                            reexports
                                .entry(src.module.clone())
                                .or_default()
                                .insert(p.last().unwrap().clone(), child);
                        }
                    }
                }
            }
        }
        Tree {
            by_module,
            reexports,
            macros,
        }
    }

    /// The file that defines what `path` names.
    fn resolve(&self, path: &[String]) -> Option<&'a Source> {
        if path.len() == 1 {
            if let Some(src) = self.macros.get(&path[0]) {
                return Some(src);
            }
        }
        for n in (0..=path.len()).rev() {
            let Some(src) = self.by_module.get(&path[..n]) else {
                continue;
            };
            if src.is_mod && n < path.len() {
                if let Some(child) = self.reexports.get(&path[..n]).and_then(|r| r.get(&path[n])) {
                    if let Some(c) = self.by_module.get(child) {
                        return Some(c);
                    }
                }
            }
            return Some(src);
        }
        None
    }
}

/// The level of each top-level module, read from `src/lib.rs`'s numbered list: a module's
/// level is the first item that names it in backquotes.
fn levels(lib: &str, tops: &BTreeSet<String>) -> BTreeMap<String, usize> {
    let mut levels = BTreeMap::new();
    let mut current = None;
    for line in lib.lines() {
        let Some(doc) = line.strip_prefix("//!") else {
            continue;
        };
        let doc = doc.trim();
        if let Some((n, _)) = doc.split_once(". ") {
            if let Ok(n) = n.parse::<usize>() {
                current = Some(n);
            }
        }
        if doc.is_empty() {
            current = None;
        }
        let Some(level) = current else { continue };
        for (k, part) in doc.split('`').enumerate() {
            if k % 2 == 1 && tops.contains(part) {
                levels.entry(part.to_string()).or_insert(level);
            }
        }
    }
    levels
}

fn top_level(src: &Source, levels: &BTreeMap<String, usize>) -> usize {
    if src.rel == "main.rs" || src.rel.starts_with("bin/") {
        return usize::MAX;
    }
    match src.module.first() {
        None => 0,
        Some(top) => levels[top],
    }
}

#[test]
fn every_top_level_module_has_a_level_in_lib_rs() {
    let sources = load();
    let tops: BTreeSet<String> = sources
        .iter()
        .filter(|s| !s.rel.starts_with("bin/") && s.rel != "main.rs")
        .filter_map(|s| s.module.first().cloned())
        .collect();
    let lib = fs::read_to_string(src_dir().join("lib.rs")).unwrap();
    let levels = levels(&lib, &tops);
    let missing: Vec<_> = tops.iter().filter(|t| !levels.contains_key(*t)).collect();
    assert!(
        missing.is_empty(),
        "src/lib.rs's levels do not name {missing:?}"
    );
    assert!(levels.len() >= 6, "src/lib.rs's levels read as {levels:?}");
}

#[test]
fn no_file_imports_from_a_higher_level() {
    let sources = load();
    let tree = Tree::new(&sources);
    let tops: BTreeSet<String> = tree
        .by_module
        .keys()
        .filter_map(|m| m.first().cloned())
        .collect();
    let lib = fs::read_to_string(src_dir().join("lib.rs")).unwrap();
    let levels = levels(&lib, &tops);
    let mut wrong = BTreeSet::new();
    let mut seen = 0;
    for src in &sources {
        let from = top_level(src, &levels);
        for path in imports(src) {
            let Some(to) = tree.resolve(&path) else {
                continue;
            };
            seen += 1;
            let to_level = top_level(to, &levels);
            if to_level > from {
                wrong.insert(format!(
                    "{} (level {from}) imports {} from {} (level {to_level})",
                    src.rel,
                    path.join("::"),
                    to.rel
                ));
            }
        }
    }
    assert!(
        seen > 100,
        "only {seen} imports found: the reader is broken"
    );
    assert!(
        wrong.is_empty(),
        "imports that run up the levels:\n{}",
        wrong.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn no_import_circle_between_files() {
    let sources = load();
    let tree = Tree::new(&sources);
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for src in &sources {
        let set = edges.entry(src.rel.as_str()).or_default();
        for path in imports(src) {
            let Some(to) = tree.resolve(&path) else {
                continue;
            };
            // A folder's mod.rs declares and re-exports its children: that is not a use.
            let own_child = src.is_mod && to.module.starts_with(&src.module);
            if to.rel != src.rel && !own_child && to.rel != "lib.rs" {
                set.insert(to.rel.as_str());
            }
        }
    }
    // Depth-first search; a grey node met again closes a circle.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        White,
        Grey,
        Black,
    }
    fn visit<'a>(
        n: &'a str,
        edges: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        mark: &mut HashMap<&'a str, Mark>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<&'a str>> {
        mark.insert(n, Mark::Grey);
        stack.push(n);
        for &m in edges.get(n).into_iter().flatten() {
            match mark.get(m).copied().unwrap_or(Mark::White) {
                Mark::Grey => {
                    let at = stack.iter().position(|s| *s == m).unwrap();
                    let mut circle = stack[at..].to_vec();
                    circle.push(m);
                    return Some(circle);
                }
                Mark::White => {
                    if let Some(c) = visit(m, edges, mark, stack) {
                        return Some(c);
                    }
                }
                Mark::Black => {}
            }
        }
        stack.pop();
        mark.insert(n, Mark::Black);
        None
    }
    let mut mark = HashMap::new();
    for &n in edges.keys() {
        if mark.get(n).copied().unwrap_or(Mark::White) == Mark::White {
            if let Some(circle) = visit(n, &edges, &mut mark, &mut Vec::new()) {
                panic!("import circle: {}", circle.join(" -> "));
            }
        }
    }
}

#[test]
fn no_source_file_over_600_lines() {
    let long: Vec<String> = load()
        .iter()
        .filter(|s| s.lines > MAX_LINES)
        .map(|s| format!("src/{}: {} lines", s.rel, s.lines))
        .collect();
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines (split them by concern):\n{}",
        long.join("\n")
    );
}

#[test]
fn the_reader_resolves_what_it_must() {
    // Guards the checks above against a reader that quietly finds nothing: a few imports
    // known to exist must resolve to their files.
    let sources = load();
    let tree = Tree::new(&sources);
    let path = |s: &str| s.split("::").map(str::to_owned).collect::<Vec<_>>();
    let rel = |p: &str| tree.resolve(&path(p)).map(|s| s.rel.clone());
    assert_eq!(rel("sys::net::canonical").as_deref(), Some("sys/net.rs"));
    assert_eq!(rel("info").as_deref(), Some("sys/log.rs"));
    let frontend_bpf = sources.iter().find(|s| s.rel == "frontend/bpf.rs").unwrap();
    let found: BTreeSet<String> = imports(frontend_bpf)
        .iter()
        .filter_map(|p| tree.resolve(p).map(|s| s.rel.clone()))
        .collect();
    assert!(
        found.contains("bpf/mod.rs"),
        "frontend/bpf.rs's imports read as {found:?}"
    );
}
