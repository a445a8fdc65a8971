//! `rvirt-img amend` and `dd` side by side with Debian's qemu-img: the same
//! images (contents, `info`, `check`), the same sizes and refusals.

use std::path::{Path, PathBuf};

mod common;
use common::*;

fn sample(d: &Path, name: &str) -> PathBuf {
    let p = d.join(name);
    qemu(&["create", "-q", "-f", "qcow2", s(&p), "64M"]);
    qemu_io(&p, &["write -P 0x61 0 1M", "write -z 2M 64k", "write -P 0x62 40M 64k", "write -c -P 0x63 50M 64k"]);
    p
}

/// `qemu-img info` without the lines that name the file or its allocation.
fn info(p: &Path) -> String {
    qemu(&["info", s(p)]).lines().filter(|l| !l.starts_with("image:") && !l.starts_with("disk size:")).collect::<Vec<_>>().join("\n")
}

#[test]
fn amend_changes_what_qemu_img_amend_changes() {
    let d = tmpdir("amend");
    let steps: &[&str] = &[
        "compat=0.10",
        "compat=1.1",
        "refcount_bits=1",
        "refcount_bits=8,lazy_refcounts=on",
        "lazy_refcounts=off,refcount_bits=16",
        "size=128M",
        "size=48M",
    ];
    let (q, r) = (sample(&d, "q.qcow2"), sample(&d, "r.qcow2"));
    for step in steps {
        qemu(&["amend", "-o", step, s(&q)]);
        ok(&["amend", "-o", step, s(&r)]);
        check_clean(&r);
        assert_eq!(info(&r), info(&q), "after {step}");
        assert!(identical(&r, &q), "after {step}");
    }
    // Refusals, with qemu-img's exit code.
    for step in ["cluster_size=4k", "compat=0.5", "refcount_bits=3", "bogus=1", "lazy_refcounts=maybe", "backing_file=base.raw,backing_fmt=raw"] {
        let (code, _, err) = ours(&["amend", "-o", step, s(&r)]);
        assert_eq!((code, run("qemu-img", &["amend", "-o", step, s(&q)]).0), (1, 1), "{step}: {err}");
    }
    // 64-bit refcounts (qemu-img takes ~10 s to rewrite them; we check ours alone).
    ok(&["amend", "-o", "refcount_bits=64", s(&r)]);
    check_clean(&r);
    assert!(qemu(&["info", s(&r)]).contains("refcount bits: 64"));
    assert!(identical(&r, &q));
    let v2 = sample(&d, "v2.qcow2");
    ok(&["amend", "-o", "refcount_bits=8", s(&v2)]);
    let (code, _, err) = ours(&["amend", "-o", "compat=0.10", s(&v2)]);
    assert!(code == 1 && err.contains("refcount_bits=16"), "{err}");
    assert!(ok(&["amend", "-o", "help", s(&v2)]).contains("lazy_refcounts"));
}

#[test]
fn dd_sizes_and_copies_as_qemu_img_dd() {
    let d = tmpdir("dd");
    let src = sample(&d, "src.qcow2");
    for args in [
        vec!["bs=64k", "skip=2", "count=10"],
        vec!["bs=1M", "count=3"],
        vec!["bs=1M", "skip=100"],
        vec![],
        vec!["bs=1000", "count=3"],
        vec!["bs=1M", "count=0"],
        vec!["bs=4k", "skip=10239"],
    ] {
        for fmt in ["raw", "qcow2"] {
            let (q, r) = (d.join(format!("q.{fmt}")), d.join(format!("r.{fmt}")));
            let in_arg = format!("if={}", s(&src));
            let run_dd = |out: &Path| -> Vec<String> {
                let mut a: Vec<String> = vec!["dd".into(), "-O".into(), fmt.into(), in_arg.clone(), format!("of={}", s(out))];
                a.extend(args.iter().map(|x| x.to_string()));
                a
            };
            let qa = run_dd(&q);
            let ra = run_dd(&r);
            let qcode = run("qemu-img", &qa.iter().map(String::as_str).collect::<Vec<_>>()).0;
            let (code, out, err) = ours(&ra.iter().map(String::as_str).collect::<Vec<_>>());
            assert_eq!(code, qcode, "{args:?} {fmt}: {out}{err}");
            let size = |p: &Path| -> serde_json::Value {
                let v: serde_json::Value = serde_json::from_str(&qemu(&["info", "-f", fmt, "--output=json", s(p)])).unwrap();
                v["virtual-size"].clone()
            };
            assert_eq!(size(&r), size(&q), "{args:?} {fmt}");
            assert!(identical(&r, &q), "{args:?} {fmt}");
        }
    }
    for bad in [vec!["dd", "bs=0", "if=x", "of=y"], vec!["dd", "if=x"], vec!["dd", "bogus=1", "if=x", "of=y"]] {
        assert_eq!((ours(&bad).0, run("qemu-img", &bad).0), (1, 1), "{bad:?}");
    }
}

#[test]
fn bench_runs_and_reports_as_qemu_img_bench() {
    let d = tmpdir("bench");
    let img = d.join("b.qcow2");
    qemu(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    for args in [
        vec!["bench", "-c", "2000", s(&img)],
        vec!["bench", "-w", "-c", "1000", "-d", "4", "-s", "64k", "-S", "128k", "-o", "1M", "--pattern=7", "--flush-interval=100", s(&img)],
        vec!["bench", "-c", "300", "-s", "1M", "-d", "2", "-t", "none", s(&img)],
    ] {
        let (code, out, err) = ours(&args);
        let theirs = qemu(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        // The same description; the time is each tool's own.
        let head = |t: &str| t.lines().filter(|l| !l.starts_with("Run completed")).map(str::to_string).collect::<Vec<_>>();
        assert_eq!(head(&out), head(&theirs), "{args:?}");
        assert!(out.lines().last().is_some_and(|l| l.starts_with("Run completed in ")), "{out}");
    }
    check_clean(&img);
    // Where the writes land, wrapping at the end of the image: the same clusters as qemu-img's.
    let (q, r) = (d.join("wq.qcow2"), d.join("wr.qcow2"));
    let args = |p: &std::path::Path| vec!["bench".to_string(), "-q".into(), "-w".into(), "-c".into(), "12".into(), "-d".into(), "1".into(), "-s".into(), "64k".into(), "-S".into(), "192k".into(), "-o".into(), "64k".into(), "--pattern=9".into(), s(p).into()];
    for p in [&q, &r] {
        qemu(&["create", "-q", "-f", "qcow2", s(p), "1M"]);
    }
    let qa = args(&q);
    qemu(&qa.iter().map(String::as_str).collect::<Vec<_>>());
    let ra = args(&r);
    ok(&ra.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(identical(&q, &r));
    let layout = |p: &std::path::Path| qemu(&["map", "--output=json", s(p)]).lines().map(|l| l.split("\"offset\"").next().unwrap_or("").to_string()).collect::<Vec<_>>();
    assert_eq!(layout(&r), layout(&q));
    for bad in [vec!["bench", "--flush-interval=10", s(&img)], vec!["bench", "-o", "100M", s(&img)]] {
        assert_eq!(ours(&bad).0, 1, "{bad:?}");
        assert_eq!(run("qemu-img", &bad).0, 1, "qemu-img {bad:?}");
    }
    assert_eq!(ours(&["bench", "-q", "-c", "10", s(&img)]).1, "");
}
