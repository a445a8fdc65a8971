//! Replays the fuzz seeds and every input that once crashed a fuzz target
//! (`fuzz/corpus/*`, `fuzz/regressions/*`) on stable Rust.

use std::path::Path;

fn replay(dir: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir);
    let mut n = 0;
    // git keeps no empty directories: no regressions yet means no directory.
    let entries = match std::fs::read_dir(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.starts_with(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions")) => return 0,
        other => other.unwrap_or_else(|e| panic!("{}: {e}", dir.display())),
    };
    for entry in entries {
        run(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    n
}

#[test]
fn fuzz_seeds_and_regressions_replay_without_panics_or_hangs() {
    assert!(replay("corpus/virtio_blk_queue", rvirt_virtio_devices::fuzzing::block_queue) >= 1, "seeds missing");
    replay("regressions/virtio_blk_queue", rvirt_virtio_devices::fuzzing::block_queue);
    assert!(replay("corpus/virtio_chains", rvirt_virtio_devices::fuzzing::chains) >= 1, "seeds missing");
    replay("regressions/virtio_chains", rvirt_virtio_devices::fuzzing::chains);
    assert!(replay("corpus/virtio_net_rx", rvirt_virtio_devices::fuzzing::net_rx) >= 1, "seeds missing");
    replay("regressions/virtio_net_rx", rvirt_virtio_devices::fuzzing::net_rx);
}
