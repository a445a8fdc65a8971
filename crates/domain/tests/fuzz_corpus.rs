//! Replays the fuzz seeds and every input that once failed a fuzz target
//! (`fuzz/corpus/*`, `fuzz/regressions/*`) on stable Rust, and the real
//! libvirt definitions in `shared/libvirt-xml-corpus` when they are there.

use std::path::Path;

fn replay(dir: &Path, run: fn(&[u8])) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for entry in entries.flatten() {
        if entry.path().is_file() {
            run(&std::fs::read(entry.path()).unwrap());
            n += 1;
        }
    }
    n
}

#[test]
fn fuzz_seeds_regressions_and_real_definitions_replay() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    assert!(replay(&fuzz.join("corpus/domain_xml"), rvirt_domain::fuzzing::definition) >= 2, "seeds missing");
    replay(&fuzz.join("regressions/domain_xml"), rvirt_domain::fuzzing::definition);
    assert!(replay(&fuzz.join("corpus/rvirtd_request"), rvirt_domain::fuzzing::daemon_request) >= 1, "seeds missing");
    replay(&fuzz.join("regressions/rvirtd_request"), rvirt_domain::fuzzing::daemon_request);
    assert!(replay(&fuzz.join("corpus/storage_xml"), rvirt_domain::fuzzing::storage) >= 3, "seeds missing");
    replay(&fuzz.join("regressions/storage_xml"), rvirt_domain::fuzzing::storage);
    // The project's shared corpus of real definitions, beside the repository (and CI's clone).
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/libvirt-xml-corpus");
    replay(&shared, rvirt_domain::fuzzing::definition);
}
