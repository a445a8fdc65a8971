//! Replays the fuzz seeds and every input that once failed the fuzz target
//! (`fuzz/corpus/*`, `fuzz/regressions/*`) on stable Rust.

use std::path::Path;

fn replay(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().filter(|e| e.path().is_file()).map(|e| rvirt_vmm::fuzzing::vm_state(&std::fs::read(e.path()).unwrap())).count()
}

#[test]
fn fuzz_seeds_and_regressions_replay() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    assert!(replay(&fuzz.join("corpus/vm_state")) >= 1, "seeds missing");
    replay(&fuzz.join("regressions/vm_state"));
}
