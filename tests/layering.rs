//! The library's dependencies point one way, as the README's Layout section says: this test
//! reads every source file under `src/` and fails on a `crate::…` path into a module that the
//! importing module may not use. A new edge is a design decision: add it here and in the
//! README together.

use std::collections::BTreeSet;
use std::path::Path;

/// Each top-level module of the library and the modules it may use.
const ALLOWED: &[(&str, &[&str])] = &[
    ("qcow2", &[]),
    ("net", &[]),
    ("cli", &[]),
    ("s3", &["qcow2"]),
    ("store", &["s3", "qcow2"]),
    ("qmp", &["net"]),
    ("chain", &["store", "s3", "qcow2"]),
    ("serve", &["store", "qcow2", "net"]),
    ("backup", &["store", "s3", "qmp", "qcow2", "cli"]),
];

/// The top-level module a file under `src/` belongs to (`src/qcow2/write/data.rs` → qcow2).
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

/// The top-level modules that `text` names through `crate::`, outside comments.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading src/") {
        let path = entry.expect("reading src/").path();
        if path.is_dir() {
            walk(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

#[test]
fn library_modules_only_use_the_modules_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let Some(module) = module_of(rel) else {
            continue;
        };
        // The binaries use the library through `qmpbackup::`, and lib.rs declares it.
        if module == "bin" || module == "lib" {
            continue;
        }
        let allowed = ALLOWED
            .iter()
            .find(|(m, _)| *m == module)
            .unwrap_or_else(|| panic!("{}: module {module} is not in ALLOWED", rel.display()))
            .1;
        checked += 1;
        let text = std::fs::read_to_string(file).unwrap();
        for used in crate_paths(&text) {
            if used != module && !allowed.contains(&used.as_str()) {
                wrong.push(format!("{} uses crate::{used}", rel.display()));
            }
        }
    }
    assert!(checked > 50, "only {checked} source files found under src/");
    assert!(
        wrong.is_empty(),
        "edges against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_import_scanner_sees_paths_and_skips_comments() {
    let text = "use crate::qcow2::Disk;\n// crate::backup in a comment\nlet x = crate::store::name::f(); crate::s3::Y";
    let got: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(got, ["qcow2", "s3", "store"]);
}
