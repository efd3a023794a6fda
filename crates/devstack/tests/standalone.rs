//! The repository must stand alone: a `git clone` with nothing beside it passes the README's commands. So no
//! file may refer to a folder beside the clone (the team's reference folder is not there on a user's machine).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// Directories that are build output or local state, not the project's files.
const SKIP_DIRS: &[&str] = &[".git", "target", "out", "node_modules"];

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let name = entry.file_name();
        let ty = entry.file_type().unwrap();
        if ty.is_dir() {
            if !SKIP_DIRS.iter().any(|s| name == *s) {
                files_under(&path, out);
            }
        } else if ty.is_file() {
            out.push(path);
        }
    }
}

#[test]
fn nothing_in_the_repository_reads_a_folder_beside_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap();
    let mut files = Vec::new();
    files_under(&root, &mut files);
    assert!(
        files.len() > 100,
        "walked too few files ({}) under {root:?}",
        files.len()
    );
    // Spelled in pieces so that this file does not match itself.
    let needles = [
        format!("{}/{}", "..", "shared"),
        format!("CQRS_{}_DIR", "SHARED"),
    ];
    let mut offenders = Vec::new();
    for file in &files {
        let Ok(bytes) = std::fs::read(file) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        for (n, line) in text.lines().enumerate() {
            if needles.iter().any(|needle| line.contains(needle.as_str())) {
                offenders.push(format!(
                    "{}:{}: {}",
                    file.strip_prefix(&root).unwrap().display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "files refer to a folder outside the repository:\n{}",
        offenders.join("\n")
    );
}
