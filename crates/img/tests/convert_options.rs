//! `rvirt-img convert`'s options beyond the plain copy (-B, -n,
//! --target-is-zero, -S, -W, -l/-s, -r), each side by side with Debian's
//! qemu-img: the same contents, the same allocation, the same refusals.

use std::path::{Path, PathBuf};

mod common;
use common::*;

/// `qemu-img map --output=json` of `img`, without host offsets (placement differs), runs merged.
fn allocation(img: &Path) -> Vec<(u64, u64, bool, bool, u64)> {
    let v: serde_json::Value = serde_json::from_str(&qemu(&["map", "--output=json", s(img)])).unwrap();
    let mut out: Vec<(u64, u64, bool, bool, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        let n = |k: &str| e[k].as_u64().unwrap_or(0);
        let cur = (n("start"), n("length"), e["data"] == true, e["zero"] == true, n("depth"));
        // Ranges qemu-img splits only because their host clusters are apart.
        match out.last_mut() {
            Some(last) if (last.2, last.3, last.4) == (cur.2, cur.3, cur.4) && last.0 + last.1 == cur.0 => last.1 += cur.1,
            _ => out.push(cur),
        }
    }
    out
}

/// base.qcow2 (1 MiB of 0x11 at 0, 1 MiB of 0x22 at 4M) under top.qcow2
/// (64 KiB of 0x33 at 4M, zeros written at 0..64k, 64 KiB at 9M).
fn chain(d: &Path) -> (PathBuf, PathBuf) {
    let (base, top) = (d.join("base.qcow2"), d.join("top.qcow2"));
    qemu(&["create", "-q", "-f", "qcow2", s(&base), "16M"]);
    qemu_io(&base, &["write -P 0x11 0 1M", "write -P 0x22 4M 1M"]);
    qemu(&["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "qcow2", s(&top)]);
    qemu_io(&top, &["write -P 0x33 4M 64k", "write -z 0 64k", "write -P 0x44 9M 64k"]);
    (base, top)
}

#[test]
fn convert_b_copies_only_the_top_layer_as_qemu_img() {
    let d = tmpdir("conv-b");
    let (base, top) = chain(&d);
    let (q, r) = (d.join("q.qcow2"), d.join("r.qcow2"));
    qemu(&["convert", "-O", "qcow2", "-B", s(&base), "-F", "qcow2", s(&top), s(&q)]);
    ok(&["convert", "-O", "qcow2", "-B", s(&base), "-F", "qcow2", s(&top), s(&r)]);
    check_clean(&r);
    assert!(identical(&r, &top), "the copy reads as the source");
    assert_eq!(allocation(&r), allocation(&q), "only the top layer's clusters, zeros as zeros");
    let info = qemu(&["info", s(&r)]);
    assert!(info.contains("backing file format: qcow2"), "{info}");
    // Refused as qemu-img refuses them.
    for args in [
        vec!["convert", "-O", "raw", "-B", s(&base), s(&top), "x.raw"],
        vec!["convert", "--target-is-zero", "-O", "raw", s(&top), "x.raw"],
        vec!["convert", "-S", "1000", "-O", "raw", s(&top), "x.raw"],
        vec!["convert", "-S", "64M", "-O", "raw", s(&top), "x.raw"],
    ] {
        let (code, _, err) = ours(&args);
        assert_eq!((code, run("qemu-img", &args).0), (1, 1), "{args:?}: {err}");
        assert!(!Path::new("x.raw").exists());
    }
}

#[test]
fn convert_n_writes_over_an_existing_image() {
    let d = tmpdir("conv-n");
    let (_, top) = chain(&d);
    for fmt in ["raw", "qcow2"] {
        // A destination full of 0xee: zeros in the source must land as zeros.
        let (q, r) = (d.join(format!("q.{fmt}")), d.join(format!("r.{fmt}")));
        for p in [&q, &r] {
            qemu(&["create", "-q", "-f", fmt, s(p), "16M"]);
            run("qemu-io", &["-f", fmt, "-c", "write -P 0xee 0 16M", s(p)]);
        }
        qemu(&["convert", "-n", "-O", fmt, s(&top), s(&q)]);
        ok(&["convert", "-n", "-O", fmt, s(&top), s(&r)]);
        assert!(identical(&r, &top), "{fmt}: -n leaves the source's contents");
        assert!(identical(&r, &q), "{fmt}");
        if fmt == "qcow2" {
            check_clean(&r);
        }
    }
    // --target-is-zero: a fresh (zero) destination, zeros not written.
    let (q, r) = (d.join("qz.qcow2"), d.join("rz.qcow2"));
    for p in [&q, &r] {
        qemu(&["create", "-q", "-f", "qcow2", s(p), "16M"]);
    }
    qemu(&["convert", "-n", "--target-is-zero", "-O", "qcow2", s(&top), s(&q)]);
    ok(&["convert", "-n", "--target-is-zero", "-O", "qcow2", s(&top), s(&r)]);
    assert!(identical(&r, &top));
    assert_eq!(allocation(&r), allocation(&q));
    // A destination smaller than the source, or missing, is refused by both.
    let small = d.join("small.raw");
    qemu(&["create", "-q", "-f", "raw", s(&small), "1M"]);
    for args in [vec!["convert", "-n", s(&top), s(&small)], vec!["convert", "-n", s(&top), "/nonexistent/x.raw"]] {
        let (code, _, err) = ours(&args);
        assert_eq!((code, run("qemu-img", &args).0), (1, 1), "{args:?}: {err}");
    }
}

#[test]
fn convert_s_w_l_and_r_match_qemu_img() {
    let d = tmpdir("conv-swlr");
    let (_, top) = chain(&d);
    // -S 0: fully allocated, as qemu-img makes it.
    let (q, r) = (d.join("q0.qcow2"), d.join("r0.qcow2"));
    qemu(&["convert", "-S", "0", "-O", "qcow2", s(&top), s(&q)]);
    ok(&["convert", "-S", "0", "-O", "qcow2", s(&top), s(&r)]);
    assert!(identical(&r, &top));
    assert_eq!(allocation(&r), allocation(&q));
    assert_eq!(allocation(&r), vec![(0, 16 << 20, true, false, 0)]);
    // -S 64k and -W: the same image as without.
    for extra in [vec!["-S", "64k"], vec!["-W", "-m", "4"], vec!["-r", "64M"]] {
        let out = d.join("w.qcow2");
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend(extra.iter().copied());
        args.extend([s(&top), s(&out)]);
        ok(&args);
        check_clean(&out);
        assert!(identical(&out, &top), "{extra:?}");
        std::fs::remove_file(&out).unwrap();
    }
    // -l / -s: an internal snapshot's contents, however it is named.
    let snap = d.join("snap.qcow2");
    qemu(&["convert", "-O", "qcow2", s(&top), s(&snap)]);
    qemu(&["snapshot", "-c", "before", s(&snap)]);
    qemu_io(&snap, &["write -P 0x55 0 2M"]);
    let expect = d.join("expect.raw");
    qemu(&["convert", "-O", "raw", "-l", "before", s(&snap), s(&expect)]);
    for sel in [vec!["-l", "before"], vec!["-l", "snapshot.name=before"], vec!["-l", "snapshot.id=1"], vec!["-s", "1"]] {
        let out = d.join("l.raw");
        let mut args = vec!["convert", "-O", "raw"];
        args.extend(sel.iter().copied());
        args.extend([s(&snap), s(&out)]);
        ok(&args);
        assert!(identical(&out, &expect), "{sel:?}");
        std::fs::remove_file(&out).unwrap();
    }
    let (code, _, err) = ours(&["convert", "-O", "raw", "-l", "missing", s(&snap), s(&d.join("m.raw"))]);
    assert!(code == 1 && err.contains("missing"), "{err}");
}

/// The plain copy reads its source through a map of the file where it can
/// (a raw file; a qcow2 file's data clusters, wherever qemu-io left them):
/// every kind of cluster beside them still copies as qemu-img copies it.
#[test]
fn sources_read_through_their_map_copy_as_qemu_img_copies_them() {
    let d = tmpdir("conv-mapped");
    let (_, top) = chain(&d);
    // Data clusters out of guest order in the file, compressed ones, zeros
    // written and zero clusters, a partial cluster at the end.
    qemu_io(&top, &["write -P 0x51 12M 192k", "write -P 0x52 2M 64k", "write -c -P 0x53 7M 64k", "write -z 12M 64k", "write -P 0x54 1M 4k", "write -P 0x55 16252928 130048"]);
    let raw = d.join("src.raw");
    qemu(&["convert", "-O", "raw", s(&top), s(&raw)]);
    for (src, fmt) in [(&top, "qcow2"), (&raw, "raw")] {
        for (out_fmt, opts) in [("raw", vec![]), ("qcow2", vec![]), ("qcow2", vec!["-c"]), ("raw", vec!["-W", "-m", "3"])] {
            let (q, r) = (d.join(format!("q-{fmt}-{out_fmt}")), d.join(format!("r-{fmt}-{out_fmt}")));
            for p in [&q, &r] {
                let _ = std::fs::remove_file(p);
            }
            let mut args = vec!["convert", "-f", fmt, "-O", out_fmt];
            args.extend(&opts);
            qemu(&[args.clone(), vec![s(src), s(&q)]].concat());
            ok(&[args, vec![s(src), s(&r)]].concat());
            assert!(identical(&q, &r), "{fmt} -> {out_fmt} {opts:?}");
            assert!(identical(src, &r), "{fmt} -> {out_fmt} {opts:?}");
            if out_fmt == "qcow2" {
                check_clean(&r);
                if opts.is_empty() {
                    assert_eq!(allocation(&r), allocation(&q), "{fmt} -> {out_fmt}");
                }
            }
        }
    }
}
