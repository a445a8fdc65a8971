//! `rvirt-img create`'s options beyond the basics (-u, refcount_bits,
//! extended_l2, -o help) and `info` on images whose backing file is missing
//! or of a format rvirt does not read, side by side with Debian's qemu-img.

mod common;
use common::*;

#[test]
fn create_options_match_qemu_img() {
    let d = tmpdir("create-opts");
    // -u: the backing file is recorded, not opened; a size is then needed.
    let (q, r) = (d.join("q.qcow2"), d.join("r.qcow2"));
    qemu(&["create", "-q", "-f", "qcow2", "-u", "-b", "nothere.qcow2", "-F", "qcow2", s(&q), "64M"]);
    ok(&["create", "-f", "qcow2", "-u", "-b", "nothere.qcow2", "-F", "qcow2", s(&r), "64M"]);
    let info = |p: &std::path::Path| qemu(&["info", "--output=json", s(p)]);
    let strip = |j: String| {
        let mut v: serde_json::Value = serde_json::from_str(&j).unwrap();
        for k in ["filename", "actual-size", "full-backing-filename"] {
            v.as_object_mut().unwrap().remove(k);
        }
        v
    };
    assert_eq!(strip(info(&r)), strip(info(&q)));
    for args in [
        vec!["create", "-f", "qcow2", "-u", "-b", "nothere.qcow2", "-F", "qcow2", "x.qcow2"],
        vec!["create", "-f", "qcow2", "-b", "nothere.qcow2", "-F", "qcow2", "x.qcow2", "64M"],
        vec!["create", "-f", "qcow2", "-o", "compat=0.10,refcount_bits=8", "x.qcow2", "1M"],
        vec!["create", "-f", "qcow2", "-o", "refcount_bits=3", "x.qcow2", "1M"],
    ] {
        let (code, _, err) = ours(&args);
        assert_eq!((code, run("qemu-img", &args).0), (1, 1), "{args:?}: {err}");
        let _ = std::fs::remove_file("x.qcow2");
    }
    // refcount_bits and extended_l2=off: the same image as qemu-img's.
    for opts in ["refcount_bits=1", "refcount_bits=8", "refcount_bits=64", "extended_l2=off,refcount_bits=32"] {
        let (q, r) = (d.join("qr.qcow2"), d.join("rr.qcow2"));
        qemu(&["create", "-q", "-f", "qcow2", "-o", opts, s(&q), "16M"]);
        ok(&["create", "-f", "qcow2", "-o", opts, s(&r), "16M"]);
        assert_eq!(strip(info(&r)), strip(info(&q)), "{opts}");
        qemu_io(&r, &["write -P 9 0 1M"]);
        check_clean(&r);
        std::fs::remove_file(&q).unwrap();
        std::fs::remove_file(&r).unwrap();
    }
    let help = ok(&["create", "-f", "qcow2", "-o", "help"]);
    assert!(help.contains("refcount_bits") && help.contains("lazy_refcounts"), "{help}");
    assert!(help.contains("extended_l2"), "{help}");
}

#[test]
fn info_reads_images_whose_backing_file_is_missing_or_foreign() {
    let d = tmpdir("info-backing");
    for (name, fmt) in [("missing.qcow2", "qcow2"), ("foreign.qcow2", "vmdk")] {
        let p = d.join(name);
        qemu(&["create", "-q", "-f", "qcow2", "-u", "-b", "base.img", "-F", fmt, s(&p), "64M"]);
        assert_eq!(ok(&["info", s(&p)]), qemu(&["info", s(&p)]), "{name}");
        let ours_json: serde_json::Value = serde_json::from_str(&ok(&["info", "--output=json", s(&p)])).unwrap();
        let theirs: serde_json::Value = serde_json::from_str(&qemu(&["info", "--output=json", s(&p)])).unwrap();
        assert_eq!(ours_json["backing-filename-format"], theirs["backing-filename-format"], "{name}");
        // Reading through the chain is refused by both, by name.
        let out = d.join("out.raw");
        let (code, _, err) = ours(&["convert", "-O", "raw", s(&p), s(&out)]);
        assert_eq!((code, run("qemu-img", &["convert", "-O", "raw", s(&p), s(&out)]).0), (1, 1), "{err}");
        assert!(err.contains("base.img") || err.contains(fmt), "{err}");
    }
}

#[test]
fn image_opts_name_images_as_with_qemu_img() {
    let d = tmpdir("image-opts");
    // A comma in the path is written ",," in the option string.
    let p = d.join("a,b.qcow2");
    qemu(&["create", "-q", "-f", "qcow2", s(&p), "8M"]);
    qemu_io(&p, &["write -P 5 0 1M"]);
    let opts = format!("driver=qcow2,file.driver=file,file.filename={}", s(&p).replace(',', ",,"));
    for args in [vec!["info", "--image-opts", &opts], vec!["check", "--image-opts", &opts], vec!["map", "--output=json", "--image-opts", &opts]] {
        assert_eq!(ok(&args), qemu(&args), "{args:?}");
    }
    let (q, r) = (d.join("q.raw"), d.join("r.raw"));
    qemu(&["convert", "--image-opts", &opts, "-O", "raw", s(&q)]);
    ok(&["convert", "--image-opts", &opts, "-O", "raw", s(&r)]);
    assert!(identical(&q, &r));
    // As a raw image (the driver decides, not the contents), and refusals.
    assert!(ok(&["info", "--image-opts", &format!("driver=raw,file.filename={}", s(&p).replace(',', ",,"))]).contains("file format: raw"));
    for bad in [
        vec!["info", "--image-opts", "-f", "qcow2", &opts],
        vec!["info", "--image-opts", "driver=vmdk,file.filename=x"],
        vec!["info", "--image-opts", "file.filename=x"],
    ] {
        let (code, _, err) = ours(&bad);
        assert_eq!((code, run("qemu-img", &bad).0), (1, 1), "{bad:?}: {err}");
    }
}
