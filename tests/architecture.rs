//! The library's top-level modules depend one way, in the order of ARCHITECTURE.md: a module may
//! refer (`crate::<module>`) only to modules listed before it. Test-only code (`#[cfg(test)]`
//! and after) is not architecture and is not read. This also rules out every module cycle.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bottom first. `proto` (generated, in lib.rs) and `error` sit under everything.
const LAYERS: &[&str] = &[
    "error", "ir", "onnx", "runtime", "inspect", "calib", "verify", "quant", "lint", "passes", "pipeline", "report",
    "job",
];

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_file() {
        out.push(path.to_path_buf());
    } else if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for e in entries {
            if e.is_dir() || e.extension().is_some_and(|x| x == "rs") {
                rust_files(&e, out);
            }
        }
    }
}

/// The top-level modules a source text refers to through `crate::m` or `crate::{m, …}`.
fn references(text: &str) -> BTreeSet<String> {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let group = if let Some(inner) = rest.strip_prefix('{') {
            &inner[..inner.find('}').unwrap_or(inner.len())]
        } else {
            rest
        };
        for item in group.split(',') {
            let name: String = item
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
            if !rest.starts_with('{') {
                break;
            }
        }
    }
    found
}

#[test]
fn modules_depend_one_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut actual: BTreeSet<String> = BTreeSet::new();
    for entry in std::fs::read_dir(root.join("src")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if (p.is_dir() || p.extension().is_some_and(|x| x == "rs")) && name != "lib" && name != "main" {
            actual.insert(name);
        }
    }
    actual.insert("passes".into());
    let listed: BTreeSet<String> = LAYERS.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        actual, listed,
        "every top-level module has a place in LAYERS (and ARCHITECTURE.md)"
    );

    let mut violations = Vec::new();
    for (rank, module) in LAYERS.iter().enumerate() {
        let path = if *module == "passes" {
            root.join("passes")
        } else if root.join("src").join(module).is_dir() {
            root.join("src").join(module)
        } else {
            root.join("src").join(format!("{module}.rs"))
        };
        let mut files = Vec::new();
        rust_files(&path, &mut files);
        assert!(!files.is_empty(), "no source for {module}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for used in references(&text) {
                if let Some(used_rank) = LAYERS.iter().position(|m| *m == used) {
                    if used_rank > rank {
                        violations.push(format!(
                            "{} ({module}) uses crate::{used}, which sits above it",
                            file.strip_prefix(root).unwrap().display()
                        ));
                    }
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn references_are_read_from_paths_and_groups() {
    let text = "use crate::ir::Model;\nuse crate::{calib, quant::plan::Plan};\nlet x = crate::onnx::schemas::f(1);\n#[cfg(test)]\nuse crate::job;";
    let found: Vec<String> = references(text).into_iter().collect();
    assert_eq!(found, ["calib", "ir", "onnx", "quant"]);
}
