//! The library's top-level modules form layers: no module reaches, through `crate::` paths,
//! a module that reaches back to it. A cycle between top-level modules fails this test with
//! the modules and the files that tie them.
//!
//! Test code is left out: `tests.rs` files, `#[cfg(test)]` modules and the `fakes` module
//! (which implements every boundary and so depends on all of them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module of a file under `src/`: `src/launcher/ecs/api.rs` → `launcher`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    // The binary's own files are not part of the library.
    (!matches!(name, "lib" | "main" | "app")).then(|| name.to_owned())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src/") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The product code of a file: everything before its `#[cfg(test)]` module, without
/// comments (a doc link is not a dependency).
fn product_code(text: &str) -> String {
    let product = match text.find("#[cfg(test)]\nmod ") {
        Some(at) => &text[..at],
        None => text,
    };
    product
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level modules named by `crate::name` in `code`, including grouped imports
/// (`use crate::{a, b::c}`).
fn crate_references(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                let name = ident(item.trim());
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

#[test]
fn top_level_modules_have_no_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // module → (module it names → the files that name it)
    let mut edges: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in &files {
        let Some(from) = module_of(&src, file) else {
            continue;
        };
        if from == "fakes" || file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("readable source");
        for to in crate_references(&product_code(&text)) {
            if to != from && to != "fakes" {
                edges
                    .entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_default()
                    .insert(file.strip_prefix(&src).unwrap().display().to_string());
            }
        }
    }
    assert!(
        edges.contains_key("controller"),
        "the scan found no imports at all: is src/ where this test looks ({})?",
        src.display()
    );
    let cycles = find_cycles(&edges);
    let report: Vec<String> = cycles
        .iter()
        .map(|cycle| {
            let ties: Vec<String> = cycle
                .iter()
                .zip(cycle.iter().cycle().skip(1))
                .map(|(a, b)| format!("{a} -> {b} ({:?})", edges[a][b]))
                .collect();
            ties.join("; ")
        })
        .collect();
    assert!(report.is_empty(), "module cycles:\n{}", report.join("\n"));
}

/// One cycle per strongly connected component of more than one module (Tarjan's algorithm,
/// then a path around the component).
fn find_cycles(edges: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        components: Vec<Vec<&'a str>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, node: &'a str) {
            let n = self.index.len();
            self.index.insert(node, n);
            self.low.insert(node, n);
            self.stack.push(node);
            for next in self.edges.get(node).into_iter().flat_map(|m| m.keys()) {
                let next = next.as_str();
                if !self.index.contains_key(next) {
                    self.visit(next);
                    let low = self.low[node].min(self.low[next]);
                    self.low.insert(node, low);
                } else if self.stack.contains(&next) {
                    let low = self.low[node].min(self.index[next]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = Vec::new();
                while let Some(top) = self.stack.pop() {
                    component.push(top);
                    if top == node {
                        break;
                    }
                }
                self.components.push(component);
            }
        }
    }
    let mut walk = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        components: Vec::new(),
    };
    for node in edges.keys() {
        if !walk.index.contains_key(node.as_str()) {
            walk.visit(node);
        }
    }
    walk.components
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|component| shortest_cycle(edges, &component))
        .collect()
}

/// The shortest way from the component's first module around and back to it (breadth
/// first, inside the component).
fn shortest_cycle(
    edges: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    component: &[&str],
) -> Vec<String> {
    let members: BTreeSet<&str> = component.iter().copied().collect();
    let start = component[0];
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(at) = queue.pop_front() {
        for next in edges[at].keys().map(String::as_str) {
            if !members.contains(next) || parent.contains_key(next) {
                continue;
            }
            parent.insert(next, at);
            if next == start {
                let mut path = vec![start.to_owned()];
                let mut back = at;
                while back != start {
                    path.push(back.to_owned());
                    back = parent[back];
                }
                path[1..].reverse();
                return path;
            }
            queue.push_back(next);
        }
    }
    unreachable!("a strongly connected component leads back to each of its modules")
}

#[test]
fn the_scan_sees_grouped_and_plain_imports() {
    let code = "use crate::{a, b::c};\nuse crate::d::E;\n/// See crate::y.\nfn f() { crate::g::h(); }\n#[cfg(test)]\nmod tests { use crate::z; }";
    let found = crate_references(&product_code(code));
    let expected: BTreeSet<String> = ["a", "b", "d", "g"].map(String::from).into();
    assert_eq!(found, expected);
}

#[test]
fn a_cycle_is_found() {
    let mut edges: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (a, b) in [("x", "y"), ("y", "z"), ("z", "x"), ("z", "w")] {
        edges
            .entry(a.into())
            .or_default()
            .insert(b.into(), BTreeSet::new());
    }
    let cycles = find_cycles(&edges);
    assert_eq!(cycles.len(), 1);
    let members: BTreeSet<&str> = cycles[0].iter().map(String::as_str).collect();
    assert_eq!(members, ["x", "y", "z"].into());
}
