//! qcow2 variants beyond the plain one: extended L2 entries (subclusters;
//! read, writes refused by name) and external data files (read and
//! written), side by side with qemu-img: the same contents, map, check and
//! info.

use std::path::Path;

mod common;
use common::*;

/// `info`, `map --output=json`, `check` and a raw copy of `img` agree with qemu-img's.
fn reads_as_qemu_img_reads(d: &Path, img: &Path) {
    assert_eq!(ok(&["info", s(img)]), qemu(&["info", s(img)]), "{}", img.display());
    assert_eq!(ok(&["map", "--output=json", s(img)]), qemu(&["map", "--output=json", s(img)]), "{}", img.display());
    let (code, out, _) = ours(&["check", s(img)]);
    assert_eq!((code, out), (0, qemu(&["check", s(img)])), "{}", img.display());
    let (q, r) = (d.join("q.raw"), d.join("r.raw"));
    qemu(&["convert", "-O", "raw", s(img), s(&q)]);
    ok(&["convert", "-O", "raw", s(img), s(&r)]);
    assert!(std::fs::read(&q).unwrap() == std::fs::read(&r).unwrap(), "{}: the copies differ", img.display());
}

#[test]
fn extended_l2_images_read_as_with_qemu_img() {
    let d = tmpdir("ext-l2");
    let base = d.join("base.qcow2");
    qemu(&["create", "-q", "-f", "qcow2", s(&base), "16M"]);
    qemu_io(&base, &["write -P 0x11 0 16M"]);
    let img = d.join("x.qcow2");
    qemu(&["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", s(&base), "-F", "qcow2", s(&img), "16M"]);
    // Partial subclusters over the backing file, zero subclusters, whole clusters, compressed.
    qemu_io(&img, &["write -P 0x22 4k 2k", "write -z 64k 8k", "write -P 0x33 1M 128k", "write -z 2M 64k", "write -c -P 0x44 3M 64k", "write -P 0x55 5M 3k"]);
    reads_as_qemu_img_reads(&d, &img);
    // Writers refuse, saying why.
    let (code, _, err) = ours(&["resize", s(&img), "+1M"]);
    assert!(code == 1 && err.contains("does not write them"), "{err}");
}

#[test]
fn external_data_file_images_read_as_with_qemu_img() {
    let d = tmpdir("data-file");
    // Absolute names: qemu-img resolves a relative one from the current directory.
    for (name, data, raw) in [("raw.qcow2", "raw.data", true), ("plain.qcow2", "plain.data", false)] {
        let img = d.join(name);
        let opts = format!("data_file={},data_file_raw={}", s(&d.join(data)), if raw { "on" } else { "off" });
        qemu(&["create", "-q", "-f", "qcow2", "-o", &opts, s(&img), "16M"]);
        qemu_io(&img, &["write -P 0x22 0 64k", "write -P 0x33 1M 4k", "write -z 2M 64k", "write -P 0x44 5M 64k"]);
        reads_as_qemu_img_reads(&d, &img);
        // Opened as rvirtd opens a VM's disks (the chain given): the named file is not opened.
        let given = rvirt_block::ImageOptions { read_only: true, backing: rvirt_block::BackingPolicy::Given(Vec::new()), ..Default::default() };
        let err = rvirt_block::qcow2::Qcow2Image::open_with(&img, &given).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("cannot name more files"), "{err}");
    }
    // Made and written by us, read by qemu-img: the same disk and the same raw data file as qemu-img's.
    for raw in ["on", "off"] {
        let (q, r) = (d.join(format!("wq-{raw}.qcow2")), d.join(format!("wr-{raw}.qcow2")));
        let (qd, rd) = (d.join(format!("wq-{raw}.data")), d.join(format!("wr-{raw}.data")));
        qemu(&["create", "-q", "-f", "qcow2", "-o", &format!("data_file={},data_file_raw={raw}", s(&qd)), s(&q), "16M"]);
        ok(&["create", "-f", "qcow2", "-o", &format!("data_file={},data_file_raw={raw}", s(&rd)), s(&r), "16M"]);
        let args = |p: &Path| vec!["bench".to_string(), "-q".into(), "-w".into(), "-c".into(), "40".into(), "-s".into(), "6k".into(), "-S".into(), "300k".into(), "--pattern=9".into(), s(p).into()];
        qemu(&args(&q).iter().map(String::as_str).collect::<Vec<_>>());
        ok(&args(&r).iter().map(String::as_str).collect::<Vec<_>>());
        qemu_io(&r, &["write -P 0x31 1M 100k", "write -z 4M 64k"]);
        qemu_io(&q, &["write -P 0x31 1M 100k", "write -z 4M 64k"]);
        check_clean(&r);
        assert!(identical(&r, &q), "data_file_raw={raw}");
        assert_eq!(qemu(&["info", s(&r)]).contains("data file raw: true"), raw == "on");
        if raw == "on" {
            assert!(std::fs::read(&rd).unwrap() == std::fs::read(&qd).unwrap(), "the raw data files differ");
        }
        let (code, _, err) = ours(&["snapshot", "-c", "s", s(&r)]);
        assert!(code == 1 && err.contains("external data file"), "{err}");
    }
    // A data file outside the image's directory: read, never written (or truncated).
    let elsewhere = tmpdir("data-file-elsewhere");
    let (img, data) = (d.join("far.qcow2"), elsewhere.join("far.data"));
    qemu(&["create", "-q", "-f", "qcow2", "-o", &format!("data_file={}", s(&data)), s(&img), "16M"]);
    qemu_io(&img, &["write -P 0x41 0 64k"]);
    let before = std::fs::read(&data).unwrap();
    let (code, _, err) = ours(&["resize", s(&img), "1M", "--shrink"]);
    assert!(code == 1 && err.contains("not in the image's directory"), "{err}");
    assert!(std::fs::read(&data).unwrap() == before, "the far data file changed");
    ok(&["convert", "-O", "raw", s(&img), s(&d.join("far.raw"))]);
    // A data file that is gone: info still reads the header, a copy says which file is missing.
    let img = d.join("plain.qcow2");
    std::fs::remove_file(d.join("plain.data")).unwrap();
    assert!(ok(&["info", s(&img)]).contains("plain.data"));
    let (code, _, err) = ours(&["convert", "-O", "raw", s(&img), s(&d.join("gone.raw"))]);
    assert!(code == 1 && err.contains("plain.data"), "{err}");
}

#[test]
fn backing_chains_as_deep_as_qemu_img_reads() {
    let d = tmpdir("deep-chain");
    // 1,001 images (qemu-img 7.2 reads that many and crashes at 1,101): data at the bottom and halfway.
    let layer = |i: usize| d.join(format!("l{i}.qcow2"));
    qemu(&["create", "-q", "-f", "qcow2", s(&layer(0)), "1M"]);
    qemu_io(&layer(0), &["write -P 0x61 0 1M"]);
    for i in 1..=1025 {
        let below = format!("l{}.qcow2", i - 1);
        ok(&["create", "-f", "qcow2", "-u", "-b", &below, "-F", "qcow2", s(&layer(i)), "1M"]);
        if i == 500 {
            qemu_io(&layer(i), &["write -P 0x62 64k 64k"]);
        }
    }
    let (q, r) = (d.join("q.raw"), d.join("r.raw"));
    qemu(&["convert", "-O", "raw", s(&layer(1000)), s(&q)]);
    ok(&["convert", "-O", "raw", s(&layer(1000)), s(&r)]);
    assert!(identical(&q, &r));
    assert_eq!(ok(&["info", "--backing-chain", s(&layer(1000))]).matches("image:").count(), 1001);
    // Past the limit: refused by name, no crash.
    let (code, _, err) = ours(&["convert", "-O", "raw", s(&layer(1025)), s(&d.join("x.raw"))]);
    assert!(code == 1 && err.contains("deeper than 1024"), "{err}");
}
