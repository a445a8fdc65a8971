//! Timing helpers the rvirt-img benches share: one command's wall time
//! (it must succeed) and the median of several.

use std::process::Command;
use std::time::Instant;

/// Runs `cmd args`, asserting success, and returns its wall time in seconds.
pub fn time(cmd: &str, args: &[&str]) -> f64 {
    let t = Instant::now();
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    t.elapsed().as_secs_f64()
}

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
