//! Interrupting a command that changes files in place: right before its N-th write (the fault
//! hook aborts the process: no destructors, no flush) and by SIGKILL at random moments.

use super::Lcg;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the command `fresh` makes (on fresh files each time) with the fault hook set to abort
/// before write N+1, for each N of `points` in turn until a run completes; after each crash
/// `judge(what)` judges the files it left. Returns the number of crashes.
pub fn after_each_write(
    points: impl Iterator<Item = u64>,
    mut fresh: impl FnMut() -> Command,
    mut judge: impl FnMut(&str),
) -> u64 {
    let mut crashes = 0;
    for n in points {
        let o = fresh()
            .env(qmpbackup::qcow2::fault::ENV, n.to_string())
            .output()
            .unwrap();
        if o.status.success() {
            break;
        }
        assert_eq!(
            o.status.code(),
            None,
            "crash after {n}: failed instead: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        crashes += 1;
        judge(&format!("crash after write {n}"));
        assert!(n < 5000, "the command never finishes");
    }
    crashes
}

/// Times one uninterrupted run of the command `fresh` makes, then starts it `runs` more times
/// and kills each (SIGKILL) at a random moment within that time; `judge(what, finished)` then
/// judges the files (`finished`: the run ended before the kill).
pub fn killed_at_random(
    runs: usize,
    seed: u64,
    mut fresh: impl FnMut() -> Command,
    mut judge: impl FnMut(&str, bool),
) {
    let start = Instant::now();
    let o = fresh().output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let full_run = start.elapsed().as_micros() as u64;
    judge("an uninterrupted run", true);
    let mut rng = Lcg(seed);
    for k in 0..runs {
        let mut child = fresh()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(full_run.max(1))));
        let _ = child.kill();
        let status = child.wait().unwrap();
        judge(&format!("SIGKILL {k}"), status.success());
    }
}
