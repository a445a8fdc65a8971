//! Replays the fuzz seeds and every input that once crashed the fuzz target
//! (`fuzz/corpus/*`, `fuzz/regressions/*`) through the code the target
//! runs, so they stay fixed without nightly Rust or cargo-fuzz.

use std::path::Path;

fn replay(dir: &str) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir);
    let Ok(entries) = std::fs::read_dir(&dir) else { return 0 };
    let mut n = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        rvirt_scsi::fuzzing::commands(&std::fs::read(&path).unwrap());
        n += 1;
    }
    n
}

#[test]
fn fuzz_seeds_and_regressions_replay_without_panics() {
    assert!(replay("corpus/scsi_commands") >= 4, "the seeds are missing");
    replay("regressions/scsi_commands");
}
