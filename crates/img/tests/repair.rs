//! `check -r all` on images whose refcount structures or snapshot table are
//! damaged, and reading such images, side by side with Debian's qemu-img.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

mod common;
use common::*;

/// A 64 MiB qcow2 image (64 KiB clusters: header, refcount table at 64 KiB,
/// its block at 128 KiB, L1 at 192 KiB) holding 1 MiB and a bitmap.
fn sample(d: &Path, name: &str) -> PathBuf {
    let p = d.join(name);
    qemu(&["create", "-q", "-f", "qcow2", s(&p), "64M"]);
    qemu_io(&p, &["write -P 0x61 0 1M", "write -P 0x62 40M 64k"]);
    qemu(&["bitmap", "--add", s(&p), "b"]);
    p
}

fn poke(p: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[test]
fn damaged_refcount_structures_are_rebuilt_by_check_r_all() {
    let d = tmpdir("rebuild");
    let good = sample(&d, "good.qcow2");
    let cases: &[(&str, u64, u64)] = &[
        ("zeroed refcount table entry", 0x10000, 0),
        ("refcount block past the end", 0x10000, 0x700_0000),
        ("refcount block over the L1 table", 0x10000, 0x30000),
        ("refcount table past the end", 48, 0x700_0000),
        ("refcount block misaligned", 0x10000, 0x20200),
    ];
    for (i, &(what, at, value)) in cases.iter().enumerate() {
        let ours_img = d.join(format!("o{i}.qcow2"));
        let theirs = d.join(format!("q{i}.qcow2"));
        std::fs::copy(&good, &ours_img).unwrap();
        poke(&ours_img, at, &value.to_be_bytes());
        std::fs::copy(&ours_img, &theirs).unwrap();
        // Found as corruption by both.
        assert_eq!(ours(&["check", s(&ours_img)]).0, 2, "{what}");
        // qemu-img 7.2 stops at a misaligned refcount block (exit 1, and -r all cannot
        // repair it either); rvirt-img reports and rebuilds it.
        let qemu_gives_up = what.ends_with("misaligned");
        assert_eq!(run("qemu-img", &["check", s(&theirs)]).0, if qemu_gives_up { 1 } else { 2 }, "{what}: qemu-img");
        // Repaired: clean for qemu-img, the same data, the bitmap kept.
        let (code, out, err) = ours(&["check", "-r", "all", s(&ours_img)]);
        assert_eq!(code, 0, "{what}: {out}{err}");
        assert!(out.contains("No errors were found") && out.contains("Double checking"), "{what}: {out}");
        check_clean(&ours_img);
        assert!(identical(&good, &ours_img), "{what}: data changed");
        assert_eq!(qemu_bitmaps(&ours_img), qemu_bitmaps(&good), "{what}");
        if qemu_gives_up {
            assert_eq!(run("qemu-img", &["check", "-r", "all", s(&theirs)]).0, 1);
        } else {
            assert_eq!(run("qemu-img", &["check", "-r", "all", s(&theirs)]).0, 0, "{what}: qemu-img");
        }
        // -r leaks cannot rebuild: refused, nothing written.
        let again = d.join(format!("l{i}.qcow2"));
        std::fs::copy(&good, &again).unwrap();
        poke(&again, at, &value.to_be_bytes());
        let before = std::fs::read(&again).unwrap();
        assert_ne!(ours(&["check", "-r", "leaks", s(&again)]).0, 0, "{what}");
        assert!(std::fs::read(&again).unwrap() == before, "{what}: -r leaks wrote");
    }
}

#[test]
fn an_image_marked_corrupt_is_repaired_and_unmarked() {
    let d = tmpdir("corrupt-bit");
    let p = sample(&d, "c.qcow2");
    poke(&p, 72, &2u64.to_be_bytes());
    assert!(qemu(&["info", s(&p)]).contains("corrupt: true"));
    let (code, _, err) = ours(&["resize", s(&p), "128M"]);
    assert!(code == 1 && err.contains("marked corrupt"), "{err}");
    assert_eq!(ours(&["check", s(&p)]).0, 0);
    let (code, out, err) = ours(&["check", "-r", "all", s(&p)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(qemu(&["info", s(&p)]).contains("corrupt: false"));
    check_clean(&p);
    ok(&["resize", s(&p), "128M"]);
}

#[test]
fn a_damaged_snapshot_table_does_not_stop_reading_and_is_dropped_by_repair() {
    let d = tmpdir("snapshot-table");
    let good = sample(&d, "good.qcow2");
    let p = d.join("s.qcow2");
    std::fs::copy(&good, &p).unwrap();
    qemu(&["snapshot", "-c", "s1", s(&p)]);
    qemu_io(&p, &["write -P 0x63 2M 64k"]);
    let expect = d.join("expect.raw");
    qemu(&["convert", "-O", "raw", s(&p), s(&expect)]);
    // The snapshot table's offset now points past the end of the file.
    poke(&p, 64, &0x700_0000u64.to_be_bytes());
    let (code, out, err) = ours(&["info", s(&p)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("virtual size: 64 MiB") && err.contains("warning") && err.contains("snapshot table"), "{out}{err}");
    let raw = d.join("out.raw");
    let (code, _, err) = ours(&["convert", "-O", "raw", s(&p), s(&raw)]);
    assert_eq!(code, 0, "{err}");
    assert!(identical(&raw, &expect));
    let (code, map, _) = ours(&["map", "--output=json", s(&p)]);
    assert_eq!(code, 0);
    assert_eq!(map, qemu(&["map", "--output=json", s(&p)]));
    // Writers refuse it; check says corruption (exit 2 as qemu-img); -r all drops the table.
    assert_eq!(ours(&["resize", s(&p), "128M"]).0, 1);
    assert_eq!(ours(&["check", s(&p)]).0, 2);
    assert_eq!(run("qemu-img", &["check", s(&p)]).0, 2);
    let (code, out, err) = ours(&["check", "-r", "all", s(&p)]);
    assert_eq!(code, 0, "{out}{err}");
    check_clean(&p);
    assert!(identical(&p, &expect));
    assert_eq!(qemu(&["snapshot", "-l", s(&p)]), "");
}

#[test]
fn check_exit_codes_are_qemu_imgs() {
    let d = tmpdir("exit-codes");
    let raw = d.join("r.raw");
    qemu(&["create", "-q", "-f", "raw", s(&raw), "1M"]);
    let junk = d.join("junk.qcow2");
    std::fs::write(&junk, b"QFI\xfb\x00\x00\x00\x09 not an image").unwrap();
    for args in [vec!["check", s(&raw)], vec!["check", s(&junk)], vec!["check", "/nonexistent/x.qcow2"]] {
        let (code, _, err) = ours(&args);
        assert_eq!(code, run("qemu-img", &args).0, "{args:?}: {err}");
    }
    assert_eq!(ours(&["check", s(&raw)]).0, 63);
}
