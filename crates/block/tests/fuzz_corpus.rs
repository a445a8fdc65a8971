//! Replays the fuzz seeds and every input that once crashed a fuzz target
//! (`fuzz/corpus/*`, `fuzz/regressions/*`) through the same code the fuzz
//! targets run, so they stay fixed without nightly Rust or cargo-fuzz.

use std::path::Path;

fn replay(dir: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        run(&std::fs::read(&path).unwrap());
        n += 1;
    }
    n
}

#[test]
fn fuzz_seeds_and_regressions_replay_without_panics() {
    assert!(replay("corpus/qcow2_image", rvirt_block::fuzzing::image) >= 3, "the seed images are missing");
    replay("regressions/qcow2_image", rvirt_block::fuzzing::image);
    replay("corpus/qcow2_image", rvirt_block::fuzzing::header);
}
