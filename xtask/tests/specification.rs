//! SPECIFICATION.md names, for each promise, the test that checks it. A
//! test that is renamed, moved or deleted must take the specification
//! with it: every `path.rs::…::name` reference has to name a function that
//! exists in that file.

use std::path::Path;

/// The `path.rs::…::name` references of one line, in order; `…::name` (or
/// `::name`) continues the last full path on the same line.
fn references(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut last: Option<String> = None;
    for (i, code) in line.split('`').enumerate() {
        if i % 2 == 0 || code.contains('<') {
            continue; // outside backticks, or a placeholder like <crate>
        }
        if let Some(name) = code.strip_prefix("…::").or_else(|| code.strip_prefix("::")) {
            if let Some(path) = &last {
                let name = name.rsplit("::").next().unwrap_or(name);
                out.push((path.clone(), name.to_string()));
            }
        } else if let Some((path, rest)) = code.split_once(".rs::") {
            let path = format!("{path}.rs");
            let name = rest.rsplit("::").next().unwrap_or(rest).to_string();
            last = Some(path.clone());
            out.push((path, name));
        }
    }
    out
}

fn defines_fn(src: &str, name: &str) -> bool {
    src.match_indices(&format!("fn {name}")).any(|(at, m)| {
        let next = src[at + m.len()..].chars().next();
        !matches!(next, Some(c) if c.is_alphanumeric() || c == '_')
    })
}

#[test]
fn every_test_the_specification_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let spec = std::fs::read_to_string(root.join("SPECIFICATION.md")).unwrap();
    let mut missing = Vec::new();
    let mut count = 0;
    for (n, line) in spec.lines().enumerate() {
        for (path, name) in references(line) {
            count += 1;
            let ok = std::fs::read_to_string(root.join(&path))
                .map(|src| defines_fn(&src, &name))
                .unwrap_or(false);
            if !ok {
                missing.push(format!("line {}: {path}::{name}", n + 1));
            }
        }
    }
    assert!(
        count > 100,
        "only {count} test references found: did the format change?"
    );
    assert!(missing.is_empty(), "not found:\n{}", missing.join("\n"));
}

#[test]
fn references_are_read_as_written() {
    let line = "| HP-1 | x | y | `hotpatch/src/a.rs::tests::one`, `…::two`, `<crate>/x.rs::<f>` |";
    assert_eq!(
        references(line),
        [
            ("hotpatch/src/a.rs".to_string(), "one".to_string()),
            ("hotpatch/src/a.rs".to_string(), "two".to_string())
        ]
    );
    assert!(defines_fn("fn one() {}", "one"));
    assert!(!defines_fn("fn one_more() {}", "one"));
}
