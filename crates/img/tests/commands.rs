//! rvirt-img's check, convert -c, resize, snapshot, rebase, commit, compare,
//! map, measure and info --backing-chain, each run side by side with
//! Debian's qemu-img (and qemu-io to write test data).

use std::path::{Path, PathBuf};

mod common;
use common::*;

/// A qcow2 image with data, a zero cluster, a compressed cluster and a hole.
fn sample(d: &Path, name: &str) -> PathBuf {
    let p = d.join(name);
    qemu(&["create", "-q", "-f", "qcow2", s(&p), "8M"]);
    qemu_io(&p, &["write -P 0x41 0 1M", "write -z 2M 64k", "write -c -P 0x43 3M 64k", "write -P 0x44 5M 512k"]);
    p
}

#[test]
fn convert_compressed_and_parallel_outputs_match_qemu() {
    let d = tmpdir("convert");
    let src = sample(&d, "src.qcow2");
    for (name, extra) in [("c.qcow2", vec!["-c"]), ("m1.qcow2", vec!["-m", "1"]), ("m8.raw", vec!["-m", "8"])] {
        let dst = d.join(name);
        let fmt = if name.ends_with("raw") { "raw" } else { "qcow2" };
        let mut args = vec!["convert", "-O", fmt];
        args.extend(extra.iter().copied());
        args.extend([s(&src), s(&dst)]);
        ok(&args);
        assert!(identical(&src, &dst), "{name} differs from its source");
        if fmt == "qcow2" {
            check_clean(&dst);
        }
    }
    let c = serde_json::from_str::<serde_json::Value>(&qemu(&["check", "--output=json", s(&d.join("c.qcow2"))])).unwrap();
    assert!(c["compressed-clusters"].as_u64().unwrap_or(0) >= 20, "convert -c should compress the data clusters: {c}");
    let (code, _, err) = ours(&["convert", "-c", "-O", "raw", s(&src), s(&d.join("x.raw"))]);
    assert!(code == 1 && err.contains("qcow2 destination"), "{err}");
}

#[test]
fn convert_leaves_zero_clusters_beside_data_unallocated_as_qemu_img_does() {
    let d = tmpdir("convert-zeros");
    // Within one 2 MiB stretch: data, a cluster of zeros written as data, data, zeros again.
    let src = d.join("src.raw");
    qemu(&["create", "-q", "-f", "raw", s(&src), "4M"]);
    let (code, out, err) = run("qemu-io", &["-f", "raw", "-c", "write -P 0x41 0 64k", "-c", "write -P 0 64k 64k", "-c", "write -P 0x42 128k 64k", "-c", "write -P 0 192k 1M", "-c", "write -P 0x43 3M 4k", s(&src)]);
    assert!(code == 0 && !out.contains("failed"), "{out}{err}");
    let allocated = |p: &Path, fmt: &str| -> u64 {
        let map: serde_json::Value = serde_json::from_str(&qemu(&["map", "--output=json", "-f", fmt, s(p)])).unwrap();
        map.as_array().unwrap().iter().filter(|e| e["data"].as_bool() == Some(true)).map(|e| e["length"].as_u64().unwrap()).sum()
    };
    for fmt in ["qcow2", "raw"] {
        let (a, b) = (d.join(format!("ours.{fmt}")), d.join(format!("theirs.{fmt}")));
        ok(&["convert", "-O", fmt, s(&src), s(&a)]);
        qemu(&["convert", "-O", fmt, s(&src), s(&b)]);
        assert!(identical(&src, &a), "{fmt}: the copy reads as its source");
        assert_eq!(allocated(&a, fmt), allocated(&b, fmt), "{fmt}: as much allocated as qemu-img's copy");
        if fmt == "qcow2" {
            assert_eq!(allocated(&a, fmt), 3 * 65536, "three data clusters; the zero ones between them are not allocated");
            check_clean(&a);
        }
    }
}

#[test]
fn rebase_u_names_a_backing_file_that_does_not_exist_yet_as_qemu_img_does() {
    let d = tmpdir("rebase-missing");
    let (a, b) = (d.join("ours.qcow2"), d.join("theirs.qcow2"));
    let missing = d.join("later.qcow2");
    for p in [&a, &b] {
        qemu(&["create", "-q", "-f", "qcow2", s(p), "1M"]);
    }
    ok(&["rebase", "-u", "-b", s(&missing), "-F", "qcow2", s(&a)]);
    qemu(&["rebase", "-u", "-b", s(&missing), "-F", "qcow2", s(&b)]);
    let info = |p: &Path| -> serde_json::Value { serde_json::from_str(&qemu(&["info", "--output=json", s(p)])).unwrap() };
    for k in ["backing-filename", "backing-filename-format"] {
        assert_eq!(info(&a)[k], info(&b)[k], "{k}");
    }
    // Without -F both refuse: the format of a file that is not there cannot be known.
    let (code, _, err) = ours(&["rebase", "-u", "-b", s(&d.join("nope.qcow2")), s(&a)]);
    assert!(code != 0 && err.contains("-F"), "{err}");
    assert_ne!(run("qemu-img", &["rebase", "-u", "-b", s(&d.join("nope.qcow2")), s(&b)]).0, 0);
}

#[test]
fn sizes_are_whole_sectors_as_with_qemu_img() {
    let d = tmpdir("sizes");
    for fmt in ["raw", "qcow2"] {
        let (a, b) = (d.join(format!("ours.{fmt}")), d.join(format!("theirs.{fmt}")));
        ok(&["create", "-f", fmt, s(&a), "1000"]);
        qemu(&["create", "-q", "-f", fmt, s(&b), "1000"]);
        let size = |p: &Path| -> u64 {
            let v: serde_json::Value = serde_json::from_str(&qemu(&["info", "-f", fmt, "--output=json", s(p)])).unwrap();
            v["virtual-size"].as_u64().unwrap()
        };
        assert_eq!((size(&a), size(&b)), (1024, 1024), "{fmt}: 1000 bytes asked, rounded up to whole sectors");
        // A qcow2 size that is not whole sectors is refused by both; raw is rounded up by both.
        let (code, _, err) = ours(&["resize", "-f", fmt, s(&a), "1500"]);
        let (qcode, _, qerr) = run("qemu-img", &["resize", "-f", fmt, s(&b), "1500"]);
        assert_eq!(code == 0, qcode == 0, "{fmt}: {err} / {qerr}");
        if fmt == "qcow2" {
            assert!(err.contains("multiple of 512") && qerr.contains("multiple of 512"), "{err} / {qerr}");
        }
        assert_eq!(size(&a), size(&b), "{fmt}: the same size after the resize");
    }
    // A raw source of odd length converts to whole sectors, as qemu-img's copy.
    let odd = d.join("odd.raw");
    std::fs::write(&odd, vec![0x5au8; 1000]).unwrap();
    for fmt in ["raw", "qcow2"] {
        let (a, b) = (d.join(format!("conv-ours.{fmt}")), d.join(format!("conv-theirs.{fmt}")));
        ok(&["convert", "-O", fmt, s(&odd), s(&a)]);
        qemu(&["convert", "-O", fmt, s(&odd), s(&b)]);
        let info = |p: &Path| -> serde_json::Value { serde_json::from_str(&qemu(&["info", "-f", fmt, "--output=json", s(p)])).unwrap() };
        assert_eq!(info(&a)["virtual-size"], info(&b)["virtual-size"], "{fmt}");
        assert!(identical(&a, &b), "{fmt}");
    }
}

#[test]
fn check_reports_and_repairs_like_qemu_img() {
    let d = tmpdir("check");
    let p = sample(&d, "c.qcow2");
    let ours_json: serde_json::Value = serde_json::from_str(&ok(&["check", "--output", "json", s(&p)])).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&qemu(&["check", "--output=json", s(&p)])).unwrap();
    for k in ["image-end-offset", "total-clusters", "allocated-clusters", "compressed-clusters", "fragmented-clusters", "check-errors"] {
        assert_eq!(ours_json.get(k), theirs.get(k), "{k}");
    }
    assert!(ok(&["check", s(&p)]).contains("No errors were found on the image."));
    // Leak a cluster: raise the refcount of the last cluster of the file.
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
    use std::os::unix::fs::FileExt;
    let mut rt = [0u8; 8];
    f.read_exact_at(&mut rt, 0x10000).unwrap();
    let block = u64::from_be_bytes(rt);
    // A whole new cluster at the end with refcount 1 and no reference.
    f.set_len(len + 65536).unwrap();
    f.write_all_at(&1u16.to_be_bytes(), block + (len / 65536) * 2).unwrap();
    drop(f);
    let (code, out, err) = ours(&["check", s(&p)]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains("1 leaked clusters were found") && err.contains("Leaked cluster"), "{out}{err}");
    assert_eq!(run("qemu-img", &["check", s(&p)]).0, 3);
    let (code, out, _) = ours(&["check", "-r", "leaks", s(&p)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 leaked clusters") && out.contains("No errors were found"), "{out}");
    check_clean(&p);
    let raw = d.join("r.raw");
    qemu(&["create", "-q", "-f", "raw", s(&raw), "1M"]);
    let (code, _, err) = ours(&["check", s(&raw)]);
    assert!(code == 63 && err.contains("does not support checks"), "{err}");
    let (code, _, err) = ours(&["check", "-r", "everything", s(&p)]);
    assert!(code == 1 && err.contains("leaks or all"), "{err}");
}

#[test]
fn resize_grows_and_shrinks_only_when_asked() {
    let d = tmpdir("resize");
    let q = sample(&d, "r.qcow2");
    ok(&["resize", s(&q), "+8M"]);
    assert!(qemu(&["info", s(&q)]).contains("16 MiB"));
    let (code, _, err) = ours(&["resize", s(&q), "-10M"]);
    assert!(code == 1 && err.contains("--shrink"), "{err}");
    ok(&["resize", "--shrink", s(&q), "-12M"]);
    assert!(qemu(&["info", s(&q)]).contains("4 MiB"));
    check_clean(&q);
    qemu_io(&q, &["read -P 0x41 0 1M", "read -P 0x43 3M 64k"]);
    // With an internal snapshot, as qemu-img allows: the snapshot keeps its size and data.
    let before = d.join("before.raw");
    qemu(&["convert", "-O", "raw", s(&q), s(&before)]);
    qemu(&["snapshot", "-c", "full", s(&q)]);
    ok(&["resize", "--shrink", s(&q), "1M"]);
    check_clean(&q);
    assert!(qemu(&["info", s(&q)]).contains("1 MiB"));
    ok(&["snapshot", "-a", "full", s(&q)]);
    check_clean(&q);
    assert!(identical(&q, &before));
    let raw = d.join("r.raw");
    ok(&["create", "-f", "raw", s(&raw), "1M"]);
    ok(&["resize", s(&raw), "3M"]);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 3 << 20);
    let (code, _, err) = ours(&["resize", s(&raw), "-5M"]);
    assert!(code == 1 && err.contains("below zero"), "{err}");
}

#[test]
fn snapshot_commands_interoperate_with_qemu_img() {
    let d = tmpdir("snapshot");
    let p = sample(&d, "s.qcow2");
    let before = d.join("before.raw");
    qemu(&["convert", "-O", "raw", s(&p), s(&before)]);
    ok(&["snapshot", "-c", "clean", s(&p)]);
    qemu_io(&p, &["write -P 0x55 0 2M"]);
    qemu(&["snapshot", "-c", "dirty", s(&p)]);
    let list = ok(&["snapshot", "-l", s(&p)]);
    let theirs = qemu(&["snapshot", "-l", s(&p)]);
    // Same table apart from the dates (taken at different times).
    let strip = |t: &str| t.lines().map(|l| l.split_whitespace().take(4).collect::<Vec<_>>().join(" ")).collect::<Vec<_>>();
    assert_eq!(strip(&list), strip(&theirs), "ours:\n{list}\nqemu-img:\n{theirs}");
    ok(&["snapshot", "-a", "clean", s(&p)]);
    assert!(identical(&p, &before));
    ok(&["snapshot", "-d", "dirty", s(&p)]);
    check_clean(&p);
    assert!(!qemu(&["snapshot", "-l", s(&p)]).contains("dirty"));
    let (code, _, err) = ours(&["snapshot", "-a", "missing", s(&p)]);
    assert!(code == 1 && err.contains("no snapshot"), "{err}");
    // A name may repeat, as in qemu-img; -a and -d then take the first (lowest id).
    let twin = d.join("twin.qcow2");
    std::fs::copy(&p, &twin).unwrap();
    ok(&["snapshot", "-c", "clean", s(&p)]);
    qemu(&["snapshot", "-c", "clean", s(&twin)]);
    assert_eq!(strip(&ok(&["snapshot", "-l", s(&p)])), strip(&qemu(&["snapshot", "-l", s(&twin)])));
    ok(&["snapshot", "-d", "clean", s(&p)]);
    qemu(&["snapshot", "-d", "clean", s(&twin)]);
    assert_eq!(strip(&qemu(&["snapshot", "-l", s(&p)])), strip(&qemu(&["snapshot", "-l", s(&twin)])));
    check_clean(&p);
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", "--output", "json", s(&p)])).unwrap();
    let qinfo: serde_json::Value = serde_json::from_str(&qemu(&["info", "--output=json", s(&p)])).unwrap();
    assert_eq!(info["snapshots"], qinfo["snapshots"]);
}

#[test]
fn rebase_and_commit_keep_what_the_image_reads() {
    let d = tmpdir("chain");
    sample(&d, "base.qcow2");
    let other = d.join("other.qcow2");
    qemu(&["create", "-q", "-f", "qcow2", s(&other), "8M"]);
    qemu_io(&other, &["write -P 0x77 0 4M"]);
    let top = d.join("top.qcow2");
    ok(&["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", s(&top)]);
    qemu_io(&top, &["write -P 0x99 512k 64k"]);
    let before = d.join("top-before.raw");
    qemu(&["convert", "-O", "raw", s(&top), s(&before)]);
    // Safe rebase onto an unrelated image: contents unchanged.
    ok(&["rebase", "-b", "other.qcow2", "-F", "qcow2", s(&top)]);
    assert!(qemu(&["info", s(&top)]).contains("backing file: other.qcow2"));
    assert!(identical(&top, &before), "safe rebase changed what the image reads");
    check_clean(&top);
    // Commit into the new backing file, which then reads as top did.
    let out = ok(&["commit", s(&top)]);
    assert!(out.contains("Image committed."));
    assert!(identical(&other, &before), "commit did not carry the data down");
    check_clean(&top);
    check_clean(&other);
    assert!(qemu(&["map", "--output=json", s(&top)]).lines().all(|l| !l.contains("\"depth\": 0")), "commit should empty the top image");
    // Remove the backing file altogether (safe): the top keeps every byte.
    ok(&["rebase", "-b", "", s(&top)]);
    assert!(!qemu(&["info", s(&top)]).contains("backing file"));
    assert!(identical(&top, &before));
    let (code, _, err) = ours(&["commit", s(&top)]);
    assert!(code == 1 && err.contains("no backing file"), "{err}");
}

#[test]
fn compare_map_measure_and_backing_chain_agree_with_qemu_img() {
    let d = tmpdir("inspect");
    let base = sample(&d, "base.qcow2");
    let top = d.join("top.qcow2");
    qemu(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", s(&top)]);
    qemu_io(&top, &["write -P 0x99 512k 64k"]);
    // compare: exit codes and messages as qemu-img's.
    for (a, b) in [(&top, &base), (&base, &base)] {
        let (qcode, qout, _) = run("qemu-img", &["compare", s(a), s(b)]);
        let (code, out, _) = ours(&["compare", s(a), s(b)]);
        assert_eq!((code, out.trim()), (qcode, qout.trim()));
    }
    let (code, _, _) = ours(&["compare", s(&top), s(&d.join("missing"))]);
    assert_eq!(code, 2);
    // Strict mode: sizes must match too.
    let bigger = d.join("bigger.qcow2");
    qemu(&["convert", "-O", "qcow2", s(&base), s(&bigger)]);
    qemu(&["resize", "-q", s(&bigger), "+1M"]);
    for args in [["compare", "-s", s(&base), s(&base)], ["compare", "-s", s(&base), s(&bigger)]] {
        let (qcode, qout, _) = run("qemu-img", &args);
        let (code, out, _) = ours(&args);
        assert_eq!((code, out.trim()), (qcode, qout.trim()), "{args:?}");
    }
    let (code, out, _) = ours(&["compare", s(&base), s(&bigger)]);
    assert!(code == 0 && out.contains("Warning: Image size mismatch!") && out.contains("Images are identical."), "{out}");
    // map: the same JSON as qemu-img for this chain (7.2 has no compressed field).
    let qmap = qemu(&["map", "--output=json", s(&top)]);
    let omap = ok(&["map", "--output", "json", s(&top)]);
    assert_eq!(omap, qmap);
    let (code, _, err) = ours(&["map", s(&top)]);
    assert!(code == 1 && err.contains("compressed clusters"), "{err}");
    // measure: new images and a qcow2 source.
    for args in [vec!["measure", "-O", "qcow2", "--size", "10G"], vec!["measure", "-O", "qcow2", "--size", "3M"], vec!["measure", "-O", "qcow2", s(&base)], vec!["measure", "-O", "raw", "--size", "1G"]] {
        assert_eq!(ok(&args), qemu(&args), "{args:?}");
    }
    // An overlay is measured by what its whole chain holds; every create option that changes sizes.
    for o in ["", "cluster_size=4k,refcount_bits=8", "preallocation=full", "compat=0.10", "extended_l2=on", "refcount_bits=1", "backing_file=base.qcow2,backing_fmt=qcow2"] {
        for src in [vec![s(&top)], vec!["--size", "100G"]] {
            let mut args = vec!["measure", "-O", "qcow2"];
            if !o.is_empty() {
                args.extend(["-o", o]);
            }
            args.extend(src.iter().copied());
            assert_eq!(ok(&args), qemu(&args), "{args:?}");
        }
    }
    for bad in [vec!["measure", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "--size", "1G"], vec!["measure", "-O", "qcow2", "-o", "bogus=1", "--size", "1G"]] {
        assert_eq!((ours(&bad).0, run("qemu-img", &bad).0), (1, 1), "{bad:?}");
    }
    let args = ["measure", "--output=json", "-O", "qcow2", s(&base)];
    let theirs: serde_json::Value = serde_json::from_str(&qemu(&args)).unwrap();
    let mine: serde_json::Value = serde_json::from_str(&ok(&["measure", "--output", "json", "-O", "qcow2", s(&base)])).unwrap();
    assert_eq!(mine, theirs);
    // info --backing-chain: both images, top first.
    let chain: serde_json::Value = serde_json::from_str(&ok(&["info", "--backing-chain", "--output", "json", s(&top)])).unwrap();
    let qchain: serde_json::Value = serde_json::from_str(&qemu(&["info", "--backing-chain", "--output=json", s(&top)])).unwrap();
    assert_eq!(chain.as_array().map(Vec::len), Some(2));
    for i in 0..2 {
        for k in ["filename", "virtual-size", "backing-filename", "format"] {
            assert_eq!(chain[i].get(k), qchain[i].get(k), "image {i} {k}");
        }
    }
    let text = ok(&["info", "--backing-chain", s(&top)]);
    assert_eq!(text.matches("image: ").count(), 2, "{text}");
}

#[test]
fn commit_b_and_a_smaller_base_as_qemu_img() {
    let d = tmpdir("commit-b");
    // base.raw (8 MiB) <- mid.qcow2 (16 MiB) <- top.qcow2 (16 MiB), made twice.
    let make = |tag: &str| -> (PathBuf, PathBuf, PathBuf) {
        let (base, mid, top) = (d.join(format!("{tag}-base.raw")), d.join(format!("{tag}-mid.qcow2")), d.join(format!("{tag}-top.qcow2")));
        qemu(&["create", "-q", "-f", "raw", s(&base), "8M"]);
        run("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 8M", s(&base)]);
        qemu(&["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "raw", s(&mid), "16M"]);
        qemu_io(&mid, &["write -P 0x22 1M 1M", "write -P 0x23 12M 64k", "write -z 3M 64k"]);
        qemu(&["create", "-q", "-f", "qcow2", "-b", s(&mid), "-F", "qcow2", s(&top)]);
        qemu_io(&top, &["write -P 0x33 1536k 64k", "write -P 0x34 14M 64k", "write -z 5M 64k"]);
        (base, mid, top)
    };
    let (qb, _, qt) = make("q");
    let (rb, _, rt) = make("r");
    let view = d.join("before.raw");
    qemu(&["convert", "-O", "raw", s(&rt), s(&view)]);
    qemu(&["commit", "-q", "-b", s(&qb), s(&qt)]);
    ok(&["commit", "-b", s(&rb), s(&rt)]);
    // The base grew to 16 MiB and reads as the top did; the top is left as it was (-d implied).
    assert!(identical(&rb, &qb), "the base matches qemu-img's");
    assert!(identical(&rb, &view), "the base reads as the top did");
    assert_eq!(std::fs::metadata(&rb).unwrap().len(), 16 << 20);
    assert!(identical(&rt, &qt));
    let other = d.join("unrelated.raw");
    qemu(&["create", "-q", "-f", "raw", s(&other), "1M"]);
    let (code, _, err) = ours(&["commit", "-b", s(&other), s(&rt)]);
    assert!(code == 1 && err.contains("not in the backing chain"), "{err}");
    assert_eq!(run("qemu-img", &["commit", "-b", s(&other), s(&qt)]).0, 1);
    // Without -b: a base smaller than the top grows too.
    let (sb, st) = (d.join("small.raw"), d.join("small-top.qcow2"));
    qemu(&["create", "-q", "-f", "raw", s(&sb), "1M"]);
    qemu(&["create", "-q", "-f", "qcow2", "-b", s(&sb), "-F", "raw", s(&st), "4M"]);
    qemu_io(&st, &["write -P 0x44 3M 64k"]);
    let view = d.join("small-view.raw");
    qemu(&["convert", "-O", "raw", s(&st), s(&view)]);
    ok(&["commit", s(&st)]);
    assert!(identical(&sb, &view));
    check_clean(&st);
}

#[test]
fn resize_preallocation_matches_qemu_img() {
    let d = tmpdir("resize-prealloc");
    for (fmt, mode) in [("qcow2", "metadata"), ("qcow2", "falloc"), ("qcow2", "full"), ("raw", "falloc"), ("raw", "full")] {
        let (q, r) = (d.join(format!("q.{fmt}")), d.join(format!("r.{fmt}")));
        for p in [&q, &r] {
            qemu(&["create", "-q", "-f", fmt, s(p), "1M"]);
            run("qemu-io", &["-f", fmt, "-c", "write -P 7 0 1M", s(p)]);
        }
        let opt = format!("--preallocation={mode}");
        qemu(&["resize", "-q", "-f", fmt, &opt, s(&q), "32M"]);
        ok(&["resize", "-f", fmt, &opt, s(&r), "32M"]);
        assert!(identical(&q, &r), "{fmt} {mode}");
        let used = |p: &Path| {
            let v: serde_json::Value = serde_json::from_str(&qemu(&["info", "-f", fmt, "--output=json", s(p)])).unwrap();
            v["actual-size"].as_u64().unwrap()
        };
        // Allocation within two clusters of qemu-img's (metadata placement and filesystem rounding aside).
        assert!(used(&r).abs_diff(used(&q)) <= 2 * 65536, "{fmt} {mode}: {} vs {}", used(&r), used(&q));
        if fmt == "qcow2" {
            check_clean(&r);
            // The same extents as qemu-img's (data, and zero where the file has holes), host offsets aside.
            let kinds = |p: &Path| -> Vec<(u64, u64, bool, bool)> {
                let v: serde_json::Value = serde_json::from_str(&qemu(&["map", "--output=json", s(p)])).unwrap();
                let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
                for e in v.as_array().unwrap() {
                    let cur = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["data"] == true, e["zero"] == true);
                    match out.last_mut() {
                        Some(l) if (l.2, l.3) == (cur.2, cur.3) && l.0 + l.1 == cur.0 => l.1 += cur.1,
                        _ => out.push(cur),
                    }
                }
                out
            };
            assert_eq!(kinds(&r), kinds(&q), "{mode}");
        }
        let (code, _, err) = ours(&["resize", "-f", fmt, "--shrink", &opt, s(&r), "16M"]);
        assert!(code == 1 && err.contains("only be used for growing"), "{err}");
        std::fs::remove_file(&q).unwrap();
        std::fs::remove_file(&r).unwrap();
    }
}
