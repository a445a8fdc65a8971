//! Persistent dirty bitmaps side by side with Debian's qemu-img, qemu-io
//! and qemu-nbd: bitmaps either tool made are read, kept and tracked by the
//! other; `bitmap`, `convert --bitmaps`, `measure`, `info` and `check` give
//! what qemu-img gives.

use std::path::{Path, PathBuf};

mod common;
use common::*;

/// A 64 MiB qcow2 image with qemu-img's bitmaps: `on` (enabled, 64 KiB) and
/// `off` (disabled, 128 KiB), and 1 MiB written by qemu-io while `on` records.
fn qemu_made(d: &Path, name: &str) -> PathBuf {
    let p = d.join(name);
    qemu(&["create", "-q", "-f", "qcow2", s(&p), "64M"]);
    qemu(&["bitmap", "--add", s(&p), "on"]);
    qemu(&["bitmap", "--add", "-g", "128k", "--disable", s(&p), "off"]);
    qemu_io(&p, &["write -P 1 0 1M"]);
    p
}

#[test]
fn bitmaps_qemu_img_made_are_counted_kept_and_tracked() {
    let d = tmpdir("bm-kept");
    let p = qemu_made(&d, "a.qcow2");
    assert_eq!(qemu_dirty_ranges(&p, "on"), vec![(0, 1 << 20)]);
    // Their clusters are in use: no leaks, and -r leaks frees nothing.
    let (code, out, err) = ours(&["check", s(&p)]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, qemu(&["check", s(&p)]));
    let (code, out, _) = ours(&["check", "-r", "leaks", s(&p)]);
    assert_eq!(code, 0, "{out}");
    check_clean(&p);
    assert_eq!(ok(&["info", s(&p)]), qemu(&["info", s(&p)]));
    // Our writes (commit into the image as a base) land in the enabled bitmap only.
    let top = d.join("top.qcow2");
    qemu(&["create", "-q", "-f", "qcow2", "-b", s(&p), "-F", "qcow2", s(&top)]);
    qemu_io(&top, &["write -P 3 8M 64k", "write -P 4 20M 4k", "write -z 30M 128k"]);
    ok(&["commit", s(&top)]);
    check_clean(&p);
    assert_eq!(qemu_dirty_ranges(&p, "on"), vec![(0, 1 << 20), (8 << 20, 65536), (20 << 20, 65536), (30 << 20, 131072)]);
    assert_eq!(qemu_dirty_ranges(&p, "off"), vec![]);
    assert_eq!(qemu_bitmaps(&p), serde_json::json!([
        {"flags": ["auto"], "name": "on", "granularity": 65536},
        {"flags": [], "name": "off", "granularity": 131072}
    ]));
}

#[test]
fn bitmap_command_does_what_qemu_img_bitmap_does() {
    let d = tmpdir("bm-cmd");
    let q = qemu_made(&d, "q.qcow2");
    let r = d.join("r.qcow2");
    std::fs::copy(&q, &r).unwrap();
    // The same steps by each tool, in one command where qemu-img takes them so.
    let steps: &[&[&str]] = &[
        &["--add", "-g", "512", "fine"],
        &["--merge", "on", "--disable", "fine"],
        &["--clear", "on"],
        &["--enable", "off"],
        &["--remove", "--add", "-g", "1M", "redo"],
    ];
    for step in steps {
        let (flags, name) = step.split_at(step.len() - 1);
        for (tool, img) in [("qemu", &q), ("ours", &r)] {
            let mut args = vec!["bitmap"];
            args.extend_from_slice(flags);
            args.extend([s(img), name[0]]);
            if flags[0] == "--remove" {
                // Removed and made again in one command: it exists first (a missing one fails in both).
                let add = ["bitmap", "--add", s(img), "redo"];
                if tool == "qemu" {
                    qemu(&add);
                } else {
                    ok(&add);
                }
            }
            if tool == "qemu" {
                qemu(&args);
            } else {
                ok(&args);
            }
        }
        assert_eq!(qemu_bitmaps(&r), qemu_bitmaps(&q), "after {step:?}");
    }
    // Writes after the steps: `off` (now enabled) and `redo` record, `fine` does not.
    for img in [&q, &r] {
        qemu_io(img, &["write -P 7 40M 4k"]);
        check_clean(img);
    }
    for name in ["on", "off", "fine", "redo"] {
        assert_eq!(qemu_dirty_ranges(&r, name), qemu_dirty_ranges(&q, name), "bitmap {name}");
    }
    assert_eq!(qemu_dirty_ranges(&r, "fine"), vec![(0, 1 << 20)]);
    // Refusals, with qemu-img's exit code.
    let raw = d.join("x.raw");
    qemu(&["create", "-q", "-f", "raw", s(&raw), "1M"]);
    for args in [
        vec!["bitmap", "--add", s(&r), "on"],
        vec!["bitmap", "--remove", s(&r), "nope"],
        vec!["bitmap", "--clear", s(&r), "nope"],
        vec!["bitmap", "--add", "-g", "1000", s(&r), "g"],
        vec!["bitmap", "--add", s(&raw), "b"],
        vec!["bitmap", s(&r), "b"],
    ] {
        let (qcode, _, qerr) = run("qemu-img", &args);
        let (code, out, err) = ours(&args);
        assert_eq!((code, qcode), (1, 1), "{args:?}: ours {out}{err}; qemu-img {qerr}");
        assert!(!err.is_empty());
    }
    check_clean(&r);
}

#[test]
fn bitmaps_left_in_use_by_a_crash_are_refused_as_qemu_img_refuses_them() {
    let d = tmpdir("bm-inuse");
    let p = qemu_made(&d, "a.qcow2");
    {
        let img = rvirt_block::qcow2::Qcow2Image::open(&p, false).unwrap();
        rvirt_block::BlockBackend::write_at(&img, &[9u8; 512], 4 << 20).unwrap();
        img.simulate_crash();
    }
    // The crash leaked the write's cluster; repairing leaks keeps the bitmaps.
    assert_eq!(ours(&["check", "-r", "leaks", s(&p)]).0, 0);
    check_clean(&p);
    assert_eq!(qemu_bitmaps(&p), serde_json::json!([
        {"flags": ["in-use", "auto"], "name": "on", "granularity": 65536},
        {"flags": ["in-use"], "name": "off", "granularity": 131072}
    ]));
    let info = ok(&["info", s(&p)]);
    assert_eq!(info, qemu(&["info", s(&p)]));
    for args in [vec!["bitmap", "--clear", s(&p), "on"], vec!["resize", s(&p), "128M"]] {
        let (code, _, err) = ours(&args);
        assert_eq!(code, 1);
        assert!(err.contains("inconsistent"), "{err}");
        assert_eq!(run("qemu-img", &args).0, 1, "qemu-img {args:?}");
    }
    let out = d.join("c.qcow2");
    let (code, _, err) = ours(&["convert", "--bitmaps", "-O", "qcow2", s(&p), s(&out)]);
    assert_eq!(code, 1);
    assert!(err.contains("Cannot copy inconsistent bitmap"), "{err}");
    assert!(!out.exists());
    ok(&["convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", s(&p), s(&out)]);
    assert_eq!(qemu_bitmaps(&out), serde_json::Value::Null);
    // Removal works on an inconsistent bitmap, and leaves nothing behind.
    ok(&["bitmap", "--remove", s(&p), "on"]);
    ok(&["bitmap", "--remove", s(&p), "off"]);
    check_clean(&p);
    assert_eq!(qemu_bitmaps(&p), serde_json::Value::Null);
}

#[test]
fn convert_bitmaps_and_measure_agree_with_qemu_img() {
    let d = tmpdir("bm-convert");
    let p = qemu_made(&d, "a.qcow2");
    let (q, r) = (d.join("q.qcow2"), d.join("r.qcow2"));
    qemu(&["convert", "--bitmaps", "-O", "qcow2", s(&p), s(&q)]);
    ok(&["convert", "--bitmaps", "-O", "qcow2", s(&p), s(&r)]);
    check_clean(&r);
    assert!(identical(&q, &r));
    assert_eq!(qemu_bitmaps(&r), qemu_bitmaps(&q));
    for name in ["on", "off"] {
        assert_eq!(qemu_dirty_ranges(&r, name), qemu_dirty_ranges(&q, name));
    }
    for args in [
        vec!["measure", "-O", "qcow2", s(&p)],
        vec!["measure", "-O", "qcow2", "-o", "cluster_size=4k", s(&p)],
        vec!["measure", "-O", "raw", s(&p)],
    ] {
        assert_eq!(ok(&args), qemu(&args), "{args:?}");
    }
    // Bitmaps need qcow2 at both ends.
    let raw = d.join("r.raw");
    for args in [vec!["convert", "--bitmaps", "-O", "raw", s(&p), s(&raw)], vec!["convert", "--skip-broken-bitmaps", "-O", "qcow2", s(&p), s(&raw)]] {
        assert_eq!(ours(&args).0, 1, "{args:?}");
        assert!(!raw.exists(), "{args:?} left a file");
        assert_eq!(run("qemu-img", &args).0, 1, "qemu-img {args:?}");
        let _ = std::fs::remove_file(&raw);
    }
}
