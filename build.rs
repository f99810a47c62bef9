//! Names the commit the binaries were built from, so that `--version` (and with it every bug
//! report) says exactly which code ran: `qmprestore 0.1.0 (commit 113ed41c2f0a)`.
//!
//! The commit comes from `QMPBACKUP_COMMIT` when a packager sets it (a build from a source
//! tarball has no git), else from `git rev-parse` when the source is a git checkout, else it
//! is left out. Cargo re-runs this script when HEAD or the branch it names moves.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=QMPBACKUP_COMMIT");
    let commit = std::env::var("QMPBACKUP_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            watch_git_head();
            git(&["rev-parse", "--short=12", "HEAD"])
        });
    let version = env!("CARGO_PKG_VERSION");
    let long = match commit {
        Some(c) => format!("{version} (commit {c})"),
        None => version.to_string(),
    };
    println!("cargo:rustc-env=QMPBACKUP_LONG_VERSION={long}");
}

/// One line of `git`'s output, or None when git or the repository is missing.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.trim();
    (out.status.success() && !line.is_empty()).then(|| line.to_string())
}

/// Asks cargo to re-run when HEAD, the branch it points to, or the packed refs change. Only
/// files that exist are named: cargo re-runs on every build for a missing one.
fn watch_git_head() {
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]).map(PathBuf::from) {
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
