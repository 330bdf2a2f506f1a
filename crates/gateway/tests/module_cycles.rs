//! The guard that keeps the import circle from coming back: reads the daemon
//! crate's sources and fails on any cycle among its modules through
//! `crate::` paths (`use crate::a::b`, `crate::a::f()`, `use crate::{a, b}`),
//! naming the cycle and the lines that make it.
//!
//! Two levels are checked: every module (one per file, `socket::send`), and
//! the top-level modules the tree is made of (`socket`, `hub`, `state`...),
//! where a child of `socket` reaching `state` counts as `socket` -> `state`.
//! The shared state sits below every handler, so neither level has a cycle.
//! Comments and string literals are skipped; `super::` paths stay inside a
//! module's own subtree and are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path: `["socket", "send"]`; the crate root is empty.
type Module = Vec<String>;

/// One reference from a module to another, where it was written.
#[derive(Debug, Clone)]
struct Reference {
    from: Module,
    to: Module,
    at: String,
}

#[test]
fn the_daemon_crate_has_no_module_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = source_files(&src);
    assert!(
        files.len() > 20,
        "found only {} source files under {}",
        files.len(),
        src.display()
    );
    let sources: Vec<(Module, String, String)> = files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            let shown = path.strip_prefix(src.parent().unwrap()).unwrap().display().to_string();
            (module_of(&src, path), shown, text)
        })
        .collect();
    let references = references(&sources);
    assert!(
        references.len() > 50,
        "found only {} crate:: references: is the parser broken?",
        references.len()
    );
    if std::env::var_os("SHOW_MODULE_EDGES").is_some() {
        let edges: BTreeSet<(String, String)> = top_level(&references)
            .iter()
            .map(|r| (r.from.join("::"), r.to.join("::")))
            .collect();
        for (from, to) in edges {
            println!("{from} -> {to}");
        }
    }
    let mut failures = Vec::new();
    for (level, refs) in [
        ("module", references.clone()),
        ("top-level module", top_level(&references)),
    ] {
        for cycle in cycles(&refs) {
            failures.push(describe(level, &cycle, &refs));
        }
    }
    assert!(failures.is_empty(), "import cycles:\n\n{}", failures.join("\n\n"));
}

#[test]
fn the_guard_finds_a_cycle_and_names_it() {
    let module = |path: &str| -> Module { path.split("::").filter(|s| !s.is_empty()).map(String::from).collect() };
    let sources = vec![
        (
            module(""),
            "lib.rs".to_owned(),
            "mod app; mod socket; mod state;".to_owned(),
        ),
        (
            module("app"),
            "app.rs".to_owned(),
            "use crate::socket::serve;\n// use crate::state::Ignored;\nlet s = \"crate::state\";".to_owned(),
        ),
        (module("socket"), "socket/mod.rs".to_owned(), "mod send;".to_owned()),
        (
            module("socket::send"),
            "socket/send.rs".to_owned(),
            "use crate::{state::{AppState, Other}, app};".to_owned(),
        ),
        (
            module("state"),
            "state.rs".to_owned(),
            "fn f() -> crate::socket::X { todo!() }".to_owned(),
        ),
    ];
    let refs = references(&sources);
    let edges: BTreeSet<(String, String)> = refs.iter().map(|r| (r.from.join("::"), r.to.join("::"))).collect();
    let expected: BTreeSet<(String, String)> = [
        ("app", "socket"),
        ("socket::send", "state"),
        ("socket::send", "app"),
        ("state", "socket"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(edges, expected, "comments and strings are skipped, groups are expanded");
    // Per file: app -> socket (mod.rs) but socket::send -> app, so no
    // file-level cycle through `socket` itself...
    assert!(cycles(&refs).is_empty(), "{:?}", cycles(&refs));
    // ...but at the top level socket -> app -> socket and socket -> state -> socket.
    let top = top_level(&refs);
    let found = cycles(&top);
    assert_eq!(found.len(), 1, "one strongly connected group: {found:?}");
    let text = describe("top-level module", &found[0], &top);
    assert!(
        text.contains("app -> socket -> app") || text.contains("socket -> app -> socket"),
        "{text}"
    );
    assert!(text.contains("socket/send.rs:1"), "names the line: {text}");
}

/// Every `.rs` file under `dir`.
fn source_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(source_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// `src/socket/send.rs` -> `socket::send`; `mod.rs` and `lib.rs` name their folder.
fn module_of(src: &Path, file: &Path) -> Module {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Module = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|last| last == "mod" || last == "lib") {
        parts.pop();
    }
    parts
}

/// Every `crate::` reference of every file, resolved to the longest module
/// path it names (a path that names no module refers to the crate root).
fn references(sources: &[(Module, String, String)]) -> Vec<Reference> {
    let modules: BTreeSet<Module> = sources.iter().map(|(m, _, _)| m.clone()).collect();
    let mut out = Vec::new();
    for (from, shown, text) in sources {
        let code = code_only(text);
        let mut search = 0;
        while let Some(found) = code[search..].find("crate::") {
            let at = search + found;
            search = at + "crate::".len();
            // `crate::` inside a longer name (`ws_crate::`) is not ours.
            if code[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                continue;
            }
            let line = code[..at].matches('\n').count() + 1;
            let mut paths = Vec::new();
            parse_tree(&code[search..], Vec::new(), &mut paths);
            for path in paths {
                let mut to = path;
                while !to.is_empty() && !modules.contains(&to) {
                    to.pop();
                }
                if &to != from {
                    out.push(Reference {
                        from: from.clone(),
                        to,
                        at: format!("{shown}:{line}"),
                    });
                }
            }
        }
    }
    out
}

/// Parses a use tree after `crate::` (`a::b::C`, `a::{b, c::{D, E}}`, `{a, b}`)
/// into full paths; returns how many bytes it read.
fn parse_tree(text: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut path = prefix;
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < bytes.len() && bytes[i] == b'{' {
            i += 1;
            loop {
                i += parse_tree(&text[i..], path.clone(), out);
                while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                    i += 1;
                }
                match bytes.get(i) {
                    Some(b',') => i += 1,
                    Some(b'}') => return i + 1,
                    _ => return i,
                }
                while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                    i += 1;
                }
                if bytes.get(i) == Some(&b'}') {
                    return i + 1;
                }
            }
        }
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        if start == i {
            // `*` or nothing: what was read so far is the path.
            if !path.is_empty() {
                out.push(path);
            }
            return i;
        }
        path.push(text[start..i].to_owned());
        if text[i..].starts_with("::") {
            i += 2;
        } else {
            out.push(path);
            return i;
        }
    }
}

/// The text with comments and string and char literals blanked out (newlines
/// kept, so line numbers stay right).
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
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
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !chars[..i]
                .last()
                .is_some_and(|p| p.is_ascii_alphanumeric() || *p == '_')
        {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                match chars.get(j) {
                    None => break,
                    Some('"') if (1..=hashes).all(|h| chars.get(j + h) == Some(&'#')) => {
                        j += 1 + hashes;
                        break;
                    }
                    Some(&other) => {
                        blank(&mut out, other);
                        j += 1;
                    }
                }
            }
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if let Some(&inner) = chars.get(i) {
                    blank(&mut out, inner);
                }
                i += 1;
            }
            i += 1;
        } else if c == '\'' && (next == Some('\\') || chars.get(i + 2) == Some(&'\'')) {
            // A char literal (a lifetime has no closing quote).
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// The references between top-level modules (a reference inside one
/// top-level module is not an edge; the crate root is its own node).
fn top_level(references: &[Reference]) -> Vec<Reference> {
    references
        .iter()
        .filter_map(|r| {
            let from: Module = r.from.iter().take(1).cloned().collect();
            let to: Module = r.to.iter().take(1).cloned().collect();
            (from != to).then(|| Reference {
                from,
                to,
                at: r.at.clone(),
            })
        })
        .collect()
}

/// A group of modules that reach each other, and one cycle through it.
#[derive(Debug)]
struct Cycle {
    members: Vec<Module>,
    path: Vec<Module>,
}

/// The strongly connected groups of more than one module, each with one cycle
/// through some of its members (Tarjan's algorithm, then a path back).
fn cycles(references: &[Reference]) -> Vec<Cycle> {
    let mut graph: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for r in references {
        graph.entry(r.from.clone()).or_default().insert(r.to.clone());
        graph.entry(r.to.clone()).or_default();
    }
    let nodes: Vec<Module> = graph.keys().cloned().collect();
    let index_of: BTreeMap<&Module, usize> = nodes.iter().enumerate().map(|(i, m)| (m, i)).collect();
    let edges: Vec<Vec<usize>> = nodes
        .iter()
        .map(|m| graph[m].iter().map(|t| index_of[t]).collect())
        .collect();

    struct Tarjan<'a> {
        edges: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        groups: Vec<Vec<usize>>,
    }
    impl Tarjan<'_> {
        fn visit(&mut self, v: usize) {
            self.index[v] = Some(self.next);
            self.low[v] = self.next;
            self.next += 1;
            self.stack.push(v);
            self.on_stack[v] = true;
            for &w in &self.edges[v] {
                match self.index[w] {
                    None => {
                        self.visit(w);
                        self.low[v] = self.low[v].min(self.low[w]);
                    }
                    Some(iw) if self.on_stack[w] => self.low[v] = self.low[v].min(iw),
                    Some(_) => {}
                }
            }
            if Some(self.low[v]) == self.index[v] {
                let mut group = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack[w] = false;
                    group.push(w);
                    if w == v {
                        break;
                    }
                }
                if group.len() > 1 {
                    self.groups.push(group);
                }
            }
        }
    }
    let n = nodes.len();
    let mut tarjan = Tarjan {
        edges: &edges,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        groups: Vec::new(),
    };
    for v in 0..n {
        if tarjan.index[v].is_none() {
            tarjan.visit(v);
        }
    }
    tarjan
        .groups
        .iter()
        .map(|group| {
            // The shortest way from the group's first member back to itself.
            let members: BTreeSet<usize> = group.iter().copied().collect();
            let start = *members.iter().next().unwrap();
            let mut previous: BTreeMap<usize, usize> = BTreeMap::new();
            let mut queue = std::collections::VecDeque::from([start]);
            let mut end = None;
            'search: while let Some(v) = queue.pop_front() {
                for &w in &edges[v] {
                    if !members.contains(&w) {
                        continue;
                    }
                    if w == start {
                        end = Some(v);
                        break 'search;
                    }
                    if let std::collections::btree_map::Entry::Vacant(e) = previous.entry(w) {
                        e.insert(v);
                        queue.push_back(w);
                    }
                }
            }
            // Walk back from the last step to `start`, then read it forwards.
            let mut back = Vec::new();
            let mut v = end.expect("a strongly connected group has a cycle");
            while v != start {
                back.push(v);
                v = previous[&v];
            }
            let path = std::iter::once(start).chain(back.into_iter().rev()).chain([start]);
            Cycle {
                members: members.iter().map(|&i| nodes[i].clone()).collect(),
                path: path.map(|i| nodes[i].clone()).collect(),
            }
        })
        .collect()
}

/// The cycle, and for each step the lines that make it.
fn describe(level: &str, cycle: &Cycle, references: &[Reference]) -> String {
    let name = |m: &Module| if m.is_empty() { "crate".to_owned() } else { m.join("::") };
    let mut out = format!(
        "{level} cycle: {}\n  ({} modules reach each other: {})",
        cycle.path.iter().map(name).collect::<Vec<_>>().join(" -> "),
        cycle.members.len(),
        cycle.members.iter().map(name).collect::<Vec<_>>().join(", ")
    );
    for step in cycle.path.windows(2) {
        let lines: BTreeSet<&str> = references
            .iter()
            .filter(|r| r.from == step[0] && r.to == step[1])
            .map(|r| r.at.as_str())
            .collect();
        let lines: Vec<&str> = lines.into_iter().take(5).collect();
        out.push_str(&format!(
            "\n  {} -> {}: {}",
            name(&step[0]),
            name(&step[1]),
            lines.join(", ")
        ));
    }
    out
}
