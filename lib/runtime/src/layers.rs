//! Keeps the runtime's modules in layers: no top-level module may reach,
//! through `crate::` paths, a module that reaches it back. A cycle is how
//! a plane ends up needing the whole runtime (the event plane once did).
//! Read from the source files, so it checks the tree as written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its code names with `crate::`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src is readable") {
            let path = entry.expect("src is readable").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src");
            let first = relative.components().next().expect("a file name");
            let module = first.as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
            let text = std::fs::read_to_string(&path).expect("source is UTF-8");
            let uses = graph.entry(module.clone()).or_default();
            uses.extend(crate_references(&text).filter(|used| *used != module));
        }
    }
    graph
}

/// The top-level modules named by `crate::x` in code (comments and test
/// modules left out: a doc link or a test is not a dependency).
fn crate_references(text: &str) -> impl Iterator<Item = String> + '_ {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    code.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .flat_map(|line| {
            line.match_indices("crate::")
                .map(move |(at, _)| &line[at + "crate::".len()..])
        })
        .flat_map(|rest| match rest.strip_prefix('{') {
            // `use crate::{a::X, b};` names every module in the braces.
            Some(group) => group
                .split('}')
                .next()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .collect(),
            None => vec![rest],
        })
        .map(|path| {
            path.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|module| !module.is_empty() && module.chars().next().is_some_and(char::is_lowercase))
}

/// A path `start → … → start` in `graph`, if there is one.
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![start.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().expect("paths are never empty");
        for next in graph.get(last).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(start.to_string());
                return Some(cycle);
            }
            if graph.contains_key(next) && seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push(longer);
            }
        }
    }
    None
}

fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    graph
        .keys()
        .filter_map(|module| cycle_through(graph, module))
        .map(|cycle| cycle.join(" → "))
        .collect()
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    assert!(graph.contains_key("component") && graph.contains_key("event_plane"));
    let found = cycles(&graph);
    assert!(found.is_empty(), "import cycles between runtime modules: {found:#?}");
}

#[test]
fn the_checker_finds_a_cycle() {
    let graph = BTreeMap::from([
        (
            "a".to_string(),
            crate_references("use crate::b::X;\n// crate::c::Y\n").collect(),
        ),
        ("b".to_string(), crate_references("fn f() { crate::a::g() }").collect()),
        ("c".to_string(), crate_references("use crate::{d::X, a};").collect()),
    ]);
    assert_eq!(cycles(&graph), ["a → b → a", "b → a → b"]);
    assert_eq!(graph["c"], BTreeSet::from(["a".to_string(), "d".to_string()]));
}
