//! The coordinator's rooms import one way: entry points (`cli`, `client`, `server`) above the
//! HTTP API, which is above admission (`api`), the scheduler, then the worker groups
//! (`cluster`); the leaves (`net`, `metrics`, `default_model`) import no room. Read from the
//! source, so that an import that runs back up fails here rather than in a review.

use std::collections::BTreeSet;
use std::path::Path;

/// Each room with the rooms it may import (leaves are open to all).
const ALLOWED: &[(&str, &[&str])] = &[
    ("cli", &["cluster", "scheduler"]),
    ("client", &["api", "cli"]),
    ("server", &["http", "api", "scheduler", "cluster"]),
    ("http", &["api", "scheduler"]),
    ("api", &["scheduler", "cluster"]),
    ("scheduler", &["cluster"]),
    ("cluster", &[]),
];
const LEAVES: &[&str] = &["net", "metrics", "default_model"];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The rooms a file names through `crate::room`, comments left out.
fn imported_rooms(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines().map(|l| l.split("//").next().unwrap_or("")) {
        for (i, _) in line.match_indices("crate::") {
            let rest = &line[i + "crate::".len()..];
            let room: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            out.insert(room);
        }
    }
    out
}

#[test]
fn rooms_import_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut seen_rooms = BTreeSet::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        let room = first.trim_end_matches(".rs").to_string();
        if matches!(room.as_str(), "lib" | "main") {
            continue;
        }
        seen_rooms.insert(room.clone());
        let text = std::fs::read_to_string(file).unwrap();
        let allowed: Vec<&str> = match ALLOWED.iter().find(|(r, _)| *r == room) {
            Some((_, a)) => a.to_vec(),
            None if LEAVES.contains(&room.as_str()) => Vec::new(),
            None => panic!("{}: room `{room}` is in neither ALLOWED nor LEAVES", rel.display()),
        };
        for to in imported_rooms(&text) {
            if to != room && !LEAVES.contains(&to.as_str()) && !allowed.contains(&to.as_str()) {
                wrong.push(format!("{} ({room}) imports {to}", rel.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layering:\n{}", wrong.join("\n"));
    // The check saw every room it names.
    for (room, _) in ALLOWED {
        assert!(seen_rooms.contains(*room), "no room `{room}` under src/");
    }
}

#[test]
fn the_reader_finds_imports() {
    let text = "use crate::api::Api;\n// crate::server in a comment\nlet x = crate::metrics::METRICS;";
    let rooms: Vec<String> = imported_rooms(text).into_iter().collect();
    assert_eq!(rooms, ["api", "metrics"]);
}
