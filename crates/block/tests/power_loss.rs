//! Power-loss replay: a qcow2 image written through a file that records
//! every write and every `fdatasync`, then cut at thousands of random
//! points. At a cut, everything before the last `fdatasync` is on the disk,
//! and of the writes after it a random subset (not only a prefix) is: what a
//! disk with a volatile write cache may keep when the power goes.
//!
//! Every such image must pass `qemu-img check` (leaks allowed), pass our own
//! check with no corruption, and read back every guest write that a
//! completed flush covered; a byte written after that flush may read as
//! either its old or any later value.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use rvirt_block::qcow2::{CreateOptions, Qcow2Image, Repair};
use rvirt_block::{BlockBackend, ImageFile};

/// One thing the image did to its file.
#[derive(Clone)]
enum FileOp {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Sync,
}

#[derive(Default)]
struct Recording {
    live: Vec<u8>,
    log: Vec<FileOp>,
}

/// A file in memory that logs what is done to it.
#[derive(Clone, Default)]
struct RecordingFile(Arc<Mutex<Recording>>);

impl RecordingFile {
    fn log_len(&self) -> usize {
        self.0.lock().unwrap().log.len()
    }
}

fn apply(bytes: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write(off, data) => {
            let end = *off as usize + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[*off as usize..end].copy_from_slice(data);
        }
        FileOp::SetLen(len) => bytes.resize(*len as usize, 0),
        FileOp::Sync => {}
    }
}

impl ImageFile for RecordingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let r = self.0.lock().unwrap();
        let start = (offset as usize).min(r.live.len());
        let n = buf.len().min(r.live.len() - start);
        buf[..n].copy_from_slice(&r.live[start..start + n]);
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut r = self.0.lock().unwrap();
        let op = FileOp::Write(offset, buf.to_vec());
        apply(&mut r.live, &op);
        r.log.push(op);
        Ok(())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.lock().unwrap().log.push(FileOp::Sync);
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.lock().unwrap().live.len() as u64)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut r = self.0.lock().unwrap();
        let op = FileOp::SetLen(len);
        apply(&mut r.live, &op);
        r.log.push(op);
        Ok(())
    }
    fn allocate(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn allocated_bytes(&self) -> u64 {
        self.0.lock().unwrap().live.len() as u64
    }
}

/// xorshift64*: a seeded, repeatable generator (a failing seed is printed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A guest request and where it sits in the file log.
struct GuestOp {
    /// Log length when the request started and when it returned.
    start: usize,
    end: usize,
    /// Guest bytes it set (None: a flush).
    range: Option<(u64, Vec<u8>)>,
}

struct Scenario {
    cluster_bits: u32,
    size: u64,
    ops: usize,
    cuts: usize,
    seed: u64,
}

/// Runs the guest requests on a recorded image; returns the image's bytes
/// before recording began, the file log, the guest log, and the guest
/// contents before recording began.
fn record(sc: &Scenario, unsafe_cache: bool) -> (Vec<u8>, Vec<FileOp>, Vec<GuestOp>, Vec<u8>) {
    let d = common::tmpdir(&format!("powerloss-{}-{}", sc.cluster_bits, unsafe_cache));
    let p = d.join("base.qcow2");
    let mut rng = Rng(sc.seed);
    let mut model = vec![0u8; sc.size as usize];
    {
        // A snapshot over some data: later writes copy shared clusters and L2 tables.
        let img = Qcow2Image::create(&p, sc.size, &CreateOptions { cluster_bits: sc.cluster_bits, ..Default::default() }).unwrap();
        for _ in 0..40 {
            let len = 1 + rng.below(4 << sc.cluster_bits) as usize;
            let off = rng.below(sc.size - len as u64);
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            img.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        img.create_snapshot("before").unwrap();
    }
    let initial = std::fs::read(&p).unwrap();
    let initial_model = model.clone();
    let file = RecordingFile::default();
    file.0.lock().unwrap().live = initial.clone();
    let img = Qcow2Image::open_file(Box::new(file.clone()), "recorded.qcow2", false, None).unwrap();
    img.set_cache_unsafe(unsafe_cache);
    let cs = 1u64 << sc.cluster_bits;
    let mut guest = Vec::new();
    for _ in 0..sc.ops {
        let start = file.log_len();
        let kind = rng.below(100);
        let range = if kind < 15 {
            img.flush().unwrap();
            None
        } else if kind < 29 {
            let len = 1 + rng.below(3 * cs);
            let off = rng.below(sc.size - len);
            if kind < 22 {
                img.write_zeroes(off, len).unwrap();
            } else {
                img.discard(off, len).unwrap();
            }
            Some((off, vec![0u8; len as usize]))
        } else if kind < 32 {
            let off = rng.below(sc.size / cs) * cs;
            let data = vec![rng.next() as u8; cs as usize];
            img.write_compressed(off, &data).unwrap();
            Some((off, data))
        } else {
            // Mostly small writes; some span several clusters (fresh runs).
            let len = 1 + if rng.below(4) == 0 { rng.below(6 * cs) } else { rng.below(cs) };
            let off = rng.below(sc.size - len);
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            img.write_at(&data, off).unwrap();
            Some((off, data))
        };
        guest.push(GuestOp { start, end: file.log_len(), range });
    }
    img.simulate_crash();
    let log = std::mem::take(&mut file.0.lock().unwrap().log);
    (initial, log, guest, initial_model)
}

/// What went wrong at one cut, if anything.
fn verify_cut(path: &Path, bytes: &[u8], durable: &[u8], uncertain: &[&GuestOp]) -> Option<String> {
    std::fs::write(path, bytes).unwrap();
    let out = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(path).output().unwrap();
    let code = out.status.code().unwrap_or(-1);
    if code != 0 && code != 3 {
        return Some(format!("qemu-img check exit {code}:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    }
    let img = match Qcow2Image::open_with(path, &rvirt_block::ImageOptions::read_only()) {
        Ok(i) => i,
        Err(e) => return Some(format!("our open: {e}")),
    };
    match img.check(Repair::None) {
        Ok(r) if r.corruptions == 0 => {}
        Ok(r) => return Some(format!("our check: {} corruptions: {:?}", r.corruptions, r.messages)),
        Err(e) => return Some(format!("our check: {e}")),
    }
    let mut actual = vec![0u8; durable.len()];
    if let Err(e) = img.read_at(&mut actual, 0) {
        return Some(format!("read: {e}"));
    }
    if actual == durable {
        return None;
    }
    for (i, (&a, &want)) in actual.iter().zip(durable).enumerate() {
        if a == want {
            continue;
        }
        let later = uncertain.iter().filter_map(|g| g.range.as_ref()).any(|(off, data)| {
            let i = i as u64;
            i >= *off && i < off + data.len() as u64 && data[(i - off) as usize] == a
        });
        if !later {
            return Some(format!("guest byte {i} reads {a:#04x}: the flushed value is {want:#04x} and no later write wrote {a:#04x}"));
        }
    }
    None
}

/// Replays `sc.cuts` random cut points; returns how many failed, and the first failure.
fn replay(sc: &Scenario, unsafe_cache: bool) -> (usize, Option<String>) {
    let (initial, log, guest, initial_model) = record(sc, unsafe_cache);
    let mut rng = Rng(sc.seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut cuts: Vec<usize> = (0..sc.cuts).map(|_| rng.below(log.len() as u64 + 1) as usize).collect();
    cuts.sort_unstable();
    let path = common::tmpdir(&format!("powerloss-cut-{}-{}", sc.cluster_bits, unsafe_cache)).join("cut.qcow2");
    // The state known durable, advanced as the cuts move forward.
    let (mut base, mut base_upto) = (initial, 0usize);
    let (mut durable, mut flushed_upto) = (initial_model, 0usize);
    let (mut failures, mut first) = (0, None);
    for &k in &cuts {
        let last_sync = log[..k].iter().rposition(|op| matches!(op, FileOp::Sync)).map_or(0, |i| i + 1);
        for op in &log[base_upto..last_sync.max(base_upto)] {
            apply(&mut base, op);
        }
        base_upto = base_upto.max(last_sync);
        // Guest requests up to the last flush that returned before the cut
        // are promised durable, whatever the image did about it.
        let done_flush = guest.iter().rposition(|g| g.range.is_none() && g.end <= k).map_or(0, |i| i + 1);
        for g in &guest[flushed_upto..done_flush.max(flushed_upto)] {
            if let Some((off, data)) = &g.range {
                durable[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
        }
        flushed_upto = flushed_upto.max(done_flush);
        let uncertain: Vec<&GuestOp> = guest[flushed_upto..].iter().take_while(|g| g.start < k).collect();
        let mut bytes = base.clone();
        for op in &log[base_upto..k] {
            if rng.below(2) == 0 {
                apply(&mut bytes, op);
            }
        }
        if let Some(e) = verify_cut(&path, &bytes, &durable, &uncertain) {
            failures += 1;
            first.get_or_insert(format!("seed {:#x}, cut at file op {k} of {}: {e}", sc.seed, log.len()));
        }
    }
    (failures, first)
}

fn assert_survives(sc: Scenario) {
    let (failures, first) = replay(&sc, false);
    assert_eq!(failures, 0, "{failures} of {} cut points lost flushed data or broke the image; first: {}", sc.cuts, first.unwrap_or_default());
}

#[test]
fn qcow2_with_small_clusters_survives_power_loss_at_random_points() {
    // 512-byte clusters: new tables, refcount blocks and copy-on-write at every turn.
    assert_survives(Scenario { cluster_bits: 9, size: 1 << 20, ops: 1200, cuts: 2000, seed: 0x5eed_0001 });
}

#[test]
fn qcow2_with_default_clusters_survives_power_loss_at_random_points() {
    // The default 64 KiB clusters: fresh multi-cluster runs and compressed clusters.
    assert_survives(Scenario { cluster_bits: 16, size: 8 << 20, ops: 400, cuts: 1000, seed: 0x5eed_0002 });
}

#[test]
fn the_replay_catches_a_writer_without_barriers() {
    // qemu-img's `unsafe` cache mode issues no fdatasync at all: flushed
    // guest data is never durable, and the replay must say so.
    let sc = Scenario { cluster_bits: 9, size: 1 << 20, ops: 300, cuts: 100, seed: 0x5eed_0003 };
    let (failures, _) = replay(&sc, true);
    assert!(failures > 0, "a writer with no barriers passed every cut: the replay cannot see anything");
}
