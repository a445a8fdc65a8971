//! Internal snapshots, compressed writes, resize, preallocation, lazy
//! refcounts, free-cluster reuse and check/repair, each checked with
//! Debian's qemu-img and qemu-io.

use std::os::unix::fs::FileExt;
use std::path::Path;

use rvirt_block::qcow2::{CheckReport, Compression, CreateOptions, Preallocation, Qcow2Image, Repair};
use rvirt_block::{BlockBackend, RawImage};

mod common;
use common::*;

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A raw file holding `contents`, for `qemu-img compare`.
fn raw_of(path: &Path, contents: &[u8]) {
    let r = RawImage::create(path, contents.len() as u64).unwrap();
    r.write_at(contents, 0).unwrap();
}

fn assert_same(img: &Path, expected: &[u8], tag: &str) {
    let raw = img.with_extension(format!("{tag}.expected.raw"));
    raw_of(&raw, expected);
    let out = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(img), s(&raw)]);
    assert!(out.contains("Images are identical"), "{tag}: {out}");
}

fn fill(img: &Qcow2Image, model: &mut [u8], offset: u64, len: usize, byte: u8) {
    img.write_at(&vec![byte; len], offset).unwrap();
    model[offset as usize..offset as usize + len].fill(byte);
}

#[test]
fn snapshots_we_take_are_seen_applied_and_deleted_by_qemu() {
    let d = tmpdir("snap");
    let p = d.join("s.qcow2");
    let img = Qcow2Image::create(&p, 8 * MIB, &CreateOptions::default()).unwrap();
    let mut model = vec![0u8; 8 * MIB as usize];
    fill(&img, &mut model, 0, 200_000, 0xa1);
    fill(&img, &mut model, 5 * MIB, 70_000, 0xa2);
    img.write_compressed(7 * MIB, &vec![0xa3; 65536]).unwrap();
    model[7 * MIB as usize..7 * MIB as usize + 65536].fill(0xa3);
    let state1 = model.clone();
    img.create_snapshot("first").unwrap();
    fill(&img, &mut model, 100_000, 300_000, 0xb1);
    fill(&img, &mut model, 7 * MIB + 1000, 10, 0xb2);
    img.write_zeroes(5 * MIB, 65536).unwrap();
    model[5 * MIB as usize..5 * MIB as usize + 65536].fill(0);
    let state2 = model.clone();
    img.create_snapshot("second").unwrap();
    fill(&img, &mut model, 3 * MIB, 4096, 0xc1);
    assert!(img.create_snapshot("second").unwrap_err().to_string().contains("already exists"));
    let names: Vec<String> = img.snapshots().iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, ["first", "second"]);
    drop(img);

    assert_check_clean(&p);
    let list = qemu_img(&["snapshot", "-l", s(&p)]);
    assert!(list.contains("first") && list.contains("second"), "{list}");
    assert_same(&p, &model, "current");
    // QEMU reads each snapshot as we wrote it.
    for (name, state) in [("first", &state1), ("second", &state2)] {
        let out = d.join(format!("{name}.raw"));
        qemu_img(&["convert", "-f", "qcow2", "-O", "raw", "-l", &format!("snapshot.name={name}"), s(&p), s(&out)]);
        assert!(std::fs::read(&out).unwrap() == *state, "snapshot {name} as read by qemu-img differs");
    }
    // We apply and delete; QEMU finds the image consistent each time.
    let img = Qcow2Image::open(&p, false).unwrap();
    img.apply_snapshot("first").unwrap();
    assert_eq!(our_contents(&img), state1);
    fill(&img, &mut state1.clone(), 0, 10, 0xd1);
    img.delete_snapshot("second").unwrap();
    assert!(img.delete_snapshot("nope").unwrap_err().to_string().contains("no snapshot"));
    let report = img.check(Repair::None).unwrap();
    assert_eq!((report.leaks, report.corruptions), (0, 0), "{:?}", report.messages);
    drop(img);
    assert_check_clean(&p);
    // QEMU applies the remaining snapshot of our image.
    qemu_img(&["snapshot", "-a", "first", s(&p)]);
    assert_same(&p, &state1, "qemu-applied");
    let img = Qcow2Image::open(&p, false).unwrap();
    img.delete_snapshot("1").unwrap();
    drop(img);
    assert_check_clean(&p);
    assert!(!qemu_img(&["snapshot", "-l", s(&p)]).contains("first"));
}

#[test]
fn snapshots_qemu_takes_are_listed_and_applied_by_us() {
    let d = tmpdir("qsnap");
    let p = d.join("q.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "4M"]);
    qemu_io(&p, "qcow2", "write -P 0x11 0 1M");
    qemu_img(&["snapshot", "-c", "base", s(&p)]);
    qemu_io(&p, "qcow2", "write -P 0x22 512k 1M");
    let before = qemu_contents(&p, "qcow2");
    let img = Qcow2Image::open(&p, false).unwrap();
    assert_eq!(img.snapshots()[0].name, "base");
    assert_eq!(img.snapshots()[0].disk_size, Some(4 * MIB));
    assert_eq!(our_contents(&img), before);
    img.apply_snapshot("base").unwrap();
    let mut want = vec![0u8; 4 * MIB as usize];
    want[..MIB as usize].fill(0x11);
    assert_eq!(our_contents(&img), want);
    img.write_at(&[0x33; 4096], 0).unwrap();
    drop(img);
    assert_check_clean(&p);
    qemu_io(&p, "qcow2", "read -P 0x33 0 4k");
    qemu_io(&p, "qcow2", "read -P 0x11 4k 1020k");
}

#[test]
fn compressed_writes_are_read_by_qemu() {
    let d = tmpdir("compress");
    for (name, compression) in [("zlib", Compression::Zlib), ("zstd", Compression::Zstd)] {
        let p = d.join(format!("{name}.qcow2"));
        let size = 4 * MIB + 1024; // a partial last cluster
        let img = Qcow2Image::create(&p, size, &CreateOptions { compression, ..Default::default() }).unwrap();
        let mut model = vec![0u8; size as usize];
        for c in 0..(size.div_ceil(65536)) {
            let off = c * 65536;
            let len = 65536.min(size - off) as usize;
            // Text-like data compresses; every fourth cluster is noise that does not.
            let data: Vec<u8> = (0..len).map(|i| if c % 4 == 3 { (i as u64 * 2654435761 >> 13) as u8 } else { b"qcow2 "[i % 6] ^ c as u8 }).collect();
            img.write_compressed(off, &data).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        assert!(img.write_compressed(100, &[1; 65536]).is_err(), "unaligned compressed write must be refused");
        drop(img);
        assert_check_clean(&p);
        assert_same(&p, &model, name);
        let disk = std::fs::metadata(&p).unwrap().len();
        assert!(disk < size / 2, "{name}: {disk} bytes on disk for {size} compressible bytes");
        // Overwriting compressed clusters frees them again (no leaks).
        let img = Qcow2Image::open(&p, false).unwrap();
        img.write_at(&vec![9u8; 3 * 65536], 65536).unwrap();
        drop(img);
        assert_check_clean(&p);
    }
}

#[test]
fn resize_grows_tables_and_shrinks_with_consent() {
    let d = tmpdir("resize");
    let p = d.join("r.qcow2");
    // 512-byte clusters: one L1 cluster covers 2 MiB, so growing to 48 MiB
    // moves the L1 table, and the data below outgrows the first refcount table.
    let img = Qcow2Image::create(&p, MIB, &CreateOptions { cluster_bits: 9, ..Default::default() }).unwrap();
    img.write_at(&[0x5a; 4096], 0).unwrap();
    img.resize(48 * MIB, false).unwrap();
    assert_eq!(img.size(), 48 * MIB);
    for i in 0..40u64 {
        img.write_at(&vec![i as u8 + 1; 256 << 10], MIB + i * MIB).unwrap();
    }
    assert!(img.resize(MIB, false).unwrap_err().to_string().contains("--shrink"));
    drop(img);
    assert_check_clean(&p);
    assert!(qemu_img(&["info", s(&p)]).contains("48 MiB"));
    qemu_io(&p, "qcow2", "read -P 0x5a 0 4k");
    qemu_io(&p, "qcow2", "read -P 40 40M 256k");
    let img = Qcow2Image::open(&p, false).unwrap();
    img.resize(2 * MIB + 100, true).unwrap();
    img.resize(48 * MIB, false).unwrap();
    drop(img);
    assert_check_clean(&p);
    qemu_io(&p, "qcow2", "read -P 1 1M 256k");
    qemu_io(&p, "qcow2", "read -P 0 40M 256k");
    qemu_io(&p, "qcow2", "read -P 0 2097252 1000");
}

#[test]
fn preallocation_modes_allocate_what_they_say() {
    let d = tmpdir("prealloc");
    for (name, mode) in [("metadata", Preallocation::Metadata), ("falloc", Preallocation::Falloc), ("full", Preallocation::Full)] {
        let p = d.join(format!("{name}.qcow2"));
        let img = Qcow2Image::create(&p, 16 * MIB, &CreateOptions { preallocation: mode, ..Default::default() }).unwrap();
        let map = img.map(0, 16 * MIB).unwrap();
        assert_eq!(map.len(), 1, "{name}: {map:?}");
        assert_eq!(map[0].kind, rvirt_block::ExtentKind::Data);
        let on_disk = img.allocated_bytes();
        drop(img);
        assert_check_clean(&p);
        qemu_io(&p, "qcow2", "read -P 0 0 16M");
        let qmap = qemu_img(&["map", "--output=json", s(&p)]);
        assert!(!qmap.contains("\"data\": false"), "{name}: qemu-img map {qmap}");
        if mode == Preallocation::Metadata {
            assert!(on_disk < 2 * MIB, "metadata preallocation should stay sparse ({on_disk})");
        } else {
            assert!(on_disk >= 16 * MIB, "{name} should reserve the data ({on_disk})");
        }
    }
}

#[test]
fn freed_clusters_are_reused() {
    let d = tmpdir("reuse");
    let p = d.join("u.qcow2");
    let img = Qcow2Image::create(&p, 16 * MIB, &CreateOptions::default()).unwrap();
    img.write_at(&vec![1u8; 8 * MIB as usize], 0).unwrap();
    let len = std::fs::metadata(&p).unwrap().len();
    img.discard(0, 8 * MIB).unwrap();
    // Freed clusters are reused once the discard is durable: until then the
    // L2 table on disk may still point at them.
    img.flush().unwrap();
    img.write_at(&vec![2u8; 8 * MIB as usize], 8 * MIB).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), len, "the second write should take the freed clusters");
    drop(img);
    assert_check_clean(&p);
    qemu_io(&p, "qcow2", "read -P 2 8M 8M");
}

/// Sets the stored refcount of host cluster `cluster` (16-bit refcounts, one refcount block).
fn poke_refcount(p: &Path, cluster: u64, value: u16) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap();
    let mut rt = [0u8; 8];
    f.read_exact_at(&mut rt, 65536).unwrap();
    let block = u64::from_be_bytes(rt);
    f.write_all_at(&value.to_be_bytes(), block + cluster * 2).unwrap();
}

fn qemu_check_text(p: &Path) -> String {
    run("qemu-img", &["check", s(p)]).1
}

#[test]
fn check_finds_and_repairs_leaks_and_refcount_errors_as_qemu_does() {
    let d = tmpdir("check");
    let p = d.join("c.qcow2");
    let img = Qcow2Image::create(&p, 8 * MIB, &CreateOptions::default()).unwrap();
    img.write_at(&vec![7u8; 3 * 65536], 0).unwrap();
    img.write_at(&vec![8u8; 2 * 65536], MIB).unwrap();
    img.discard(MIB, 2 * 65536).unwrap();
    drop(img);
    // The discarded clusters are the file's last two: mark them in use again
    // (two leaks), and mark a live data cluster free (an error, and a wrong
    // COPIED flag, which qemu-img also counts).
    let clusters = std::fs::metadata(&p).unwrap().len() / 65536;
    poke_refcount(&p, clusters - 1, 1);
    poke_refcount(&p, clusters - 2, 2);
    poke_refcount(&p, clusters - 3, 0);
    let qemu = qemu_check_text(&p);
    assert!(qemu.contains("2 leaked clusters") && qemu.contains("2 errors"), "{qemu}");
    let ours: CheckReport = rvirt_block::qcow2::check::check_path(&p, Repair::None).unwrap();
    assert_eq!((ours.leaks, ours.corruptions), (2, 2), "{:?}", ours.messages);
    // Leaks only: the errors stay.
    let fixed = rvirt_block::qcow2::check::check_path(&p, Repair::Leaks).unwrap();
    assert_eq!((fixed.leaks_fixed, fixed.leaks, fixed.corruptions), (2, 0, 2));
    let fixed = rvirt_block::qcow2::check::check_path(&p, Repair::All).unwrap();
    assert_eq!((fixed.corruptions_fixed, fixed.corruptions), (2, 0), "{:?}", fixed.messages);
    assert_check_clean(&p);
    qemu_io(&p, "qcow2", "read -P 7 0 192k");
    // A clean image has nothing to report, and our figures match qemu-img's.
    let ours = rvirt_block::qcow2::check::check_path(&p, Repair::None).unwrap();
    let json = qemu_img(&["check", "--output=json", s(&p)]);
    let v: Vec<(&str, u64)> = vec![
        ("allocated-clusters", ours.allocated_clusters),
        ("total-clusters", ours.total_clusters),
        ("image-end-offset", ours.image_end_offset),
    ];
    assert_eq!(ours.fragmented_clusters, 0, "qemu-img omits fragmented-clusters when there are none");
    for (k, want) in v {
        assert!(json.contains(&format!("\"{k}\": {want}")), "{k}={want} not in {json}");
    }
}

#[test]
fn lazy_refcounts_survive_a_crash_and_are_repaired_on_open() {
    let d = tmpdir("lazy");
    let p = d.join("l.qcow2");
    let img = Qcow2Image::create(&p, 8 * MIB, &CreateOptions { lazy_refcounts: true, ..Default::default() }).unwrap();
    img.write_at(&vec![3u8; 512 << 10], 0).unwrap();
    img.write_at(&vec![4u8; 4096], 4 * MIB).unwrap();
    // Flushed data, then a crash: the refcounts were still in memory.
    img.flush().unwrap();
    img.simulate_crash();
    let info = qemu_img(&["info", "--output=json", s(&p)]);
    assert!(info.contains("\"lazy-refcounts\": true"), "{info}");
    assert!(!qemu_check_text(&p).contains("No errors were found"), "a crashed lazy image should need repair");
    // Opening it read-write repairs it, and a clean close clears the dirty bit.
    let img = Qcow2Image::open(&p, false).unwrap();
    img.write_at(&[5u8; 512], 8192).unwrap();
    drop(img);
    assert_check_clean(&p);
    qemu_io(&p, "qcow2", "read -P 3 0 8k");
    qemu_io(&p, "qcow2", "read -P 5 8k 512");
    qemu_io(&p, "qcow2", "read -P 4 4M 4k");
}
