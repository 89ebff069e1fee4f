//! The bus crate owns every subject: no Tether subject is spelled as a string literal in
//! any other crate of the workspace (sources, tests, benches, examples). Everyone else
//! builds subjects with `tether_nats::subjects` and parses them with `Subject::parse`.

use std::path::{Path, PathBuf};

/// Literal spellings that give a hand-built Tether subject away.
const FORBIDDEN: &[&str] = &[
    "\"tether.",
    "subjects::PREFIX",
    "{PREFIX}",
    "\".bcast\"",
    "\"Nats-Expected-Last-Subject-Sequence\"",
    "\"Nats-Msg-Id\"",
];

/// Literals that start like a subject but are not one.
const ALLOWED: &[&str] = &["\"tether.v1\""];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" && name != "node_modules" {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_subject_literal_outside_the_bus_crate() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(root) = crate_dir.parent() else {
        panic!("the bus crate has no parent directory");
    };
    let mut files = Vec::new();
    rust_files(root, &mut files);
    assert!(
        files.len() > 50,
        "workspace sources not found under {}",
        root.display()
    );
    let mut found = Vec::new();
    for file in files.iter().filter(|f| !f.starts_with(crate_dir)) {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            let mut cleaned = code.to_string();
            for allowed in ALLOWED {
                cleaned = cleaned.replace(allowed, "");
            }
            if FORBIDDEN.iter().any(|f| cleaned.contains(f)) {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "subjects or NATS header names spelled outside nats/ (use tether_nats::subjects / headers):\n{}",
        found.join("\n")
    );
}
