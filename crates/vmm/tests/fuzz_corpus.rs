//! Replays the fuzz seeds and every input that once failed a fuzz target
//! (`fuzz/corpus/*`, `fuzz/regressions/*`) on stable Rust.

use std::path::Path;

fn replay(dir: &Path, target: fn(&[u8])) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().filter(|e| e.path().is_file()).map(|e| target(&std::fs::read(e.path()).unwrap())).count()
}

#[test]
fn fuzz_seeds_and_regressions_replay() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (name, target) in [("vm_state", rvirt_vmm::fuzzing::vm_state as fn(&[u8])), ("migration_pages", rvirt_vmm::fuzzing::migration_pages)] {
        assert!(replay(&fuzz.join("corpus").join(name), target) >= 1, "{name}: seeds missing");
        replay(&fuzz.join("regressions").join(name), target);
    }
}
