//! qcow2 variants beyond the plain one: extended L2 entries (subclusters)
//! and external data files, read and written, side by side with qemu-img
//! and qemu-io: the same contents, map, check and info.

use std::path::{Path, PathBuf};

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

/// A 16 MiB base filled by qemu-io, in `d`.
fn filled_base(d: &Path) -> PathBuf {
    let base = d.join("base.qcow2");
    qemu(&["create", "-q", "-f", "qcow2", s(&base), "16M"]);
    qemu_io(&base, &["write -P 0x11 0 16M"]);
    base
}

/// `img`, an extended-L2 overlay of `base` holding what qemu-io writes:
/// partial subclusters over the backing file, zero subclusters, whole
/// clusters, a compressed one.
fn qemu_subcluster_image(base: &Path, img: &Path) {
    qemu(&["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", s(base), "-F", "qcow2", s(img), "16M"]);
    qemu_io(img, &["write -P 0x22 4k 2k", "write -z 64k 8k", "write -P 0x33 1M 128k", "write -z 2M 64k", "write -c -P 0x44 3M 64k", "write -P 0x55 5M 3k"]);
}

#[test]
fn extended_l2_images_read_as_with_qemu_img() {
    let d = tmpdir("ext-l2");
    let base = filled_base(&d);
    let img = d.join("x.qcow2");
    qemu_subcluster_image(&base, &img);
    reads_as_qemu_img_reads(&d, &img);
}

/// One write of the extended-L2 write test, as qemu-io says it and as our library does it.
enum Op {
    Data(u8, u64, u64),
    Zero(u64, u64),
    Discard(u64, u64),
}

impl Op {
    fn qemu_io(&self) -> String {
        match *self {
            Op::Data(p, o, l) => format!("write -P {p:#x} {o} {l}"),
            Op::Zero(o, l) => format!("write -z {o} {l}"),
            Op::Discard(o, l) => format!("discard {o} {l}"),
        }
    }

    fn apply(&self, img: &dyn rvirt_block::BlockBackend) {
        match *self {
            Op::Data(p, o, l) => img.write_at(&vec![p; l as usize], o).unwrap(),
            Op::Zero(o, l) => img.write_zeroes(o, l).unwrap(),
            Op::Discard(o, l) => img.discard(o, l).unwrap(),
        }
    }
}

#[test]
fn extended_l2_images_written_as_qemu_writes_them() {
    use rvirt_block::qcow2::Qcow2Image;
    let d = tmpdir("ext-l2-write");
    let base = filled_base(&d);
    // The same image twice, holding every kind of extended entry qemu-io makes.
    let (q, r) = (d.join("q.qcow2"), d.join("r.qcow2"));
    for img in [&q, &r] {
        qemu_subcluster_image(&base, img);
    }
    // Over backing subclusters, zero subclusters, allocated ones, a compressed
    // cluster, a zero cluster, unallocated space; zeroes and discards whole and partial.
    let ops = [
        Op::Data(0x61, 5 * 1024, 4 * 1024),
        Op::Data(0x62, 66 * 1024, 1024),
        Op::Data(0x63, (1 << 20) + 100, 300),
        Op::Data(0x64, (2 << 20) + 4096, 512),
        Op::Data(0x65, (3 << 20) + 8192, 2048),
        Op::Data(0x66, (5 << 20) + 2048, 70 * 1024),
        Op::Data(0x67, 7 << 20, 256 * 1024),
        Op::Zero((8 << 20) + 4096, 4096),
        Op::Zero(9 << 20, 128 * 1024),
        Op::Discard((1 << 20) + 65536, 65536),
        Op::Data(0x68, (12 << 20) + 6000, 1),
    ];
    qemu_io(&q, &ops.iter().map(Op::qemu_io).collect::<Vec<_>>().iter().map(String::as_str).collect::<Vec<_>>());
    {
        let img = Qcow2Image::open(&r, false).unwrap();
        for op in &ops {
            op.apply(&img);
        }
        rvirt_block::BlockBackend::flush(&img).unwrap();
    }
    check_clean(&r);
    assert!(identical(&q, &r), "our writes read differently from qemu-io's");
    // The same subclusters allocated, zero and the backing file's (host offsets aside).
    let layout = |p: &Path| -> Vec<serde_json::Value> {
        let mut v: Vec<serde_json::Value> = serde_json::from_str(&qemu(&["map", "--output=json", s(p)])).unwrap();
        v.iter_mut().for_each(|e| drop(e.as_object_mut().unwrap().remove("offset")));
        v
    };
    assert_eq!(layout(&r), layout(&q));
    assert!(qemu(&["info", s(&r)]).contains("extended l2: true"));
    reads_as_qemu_img_reads(&d, &r);

    // Made by us: the header qemu-img reads as extended; written by our bench
    // and qemu-img's the same, and qemu-io's writes on top agree.
    let (mine, theirs) = (d.join("mine.qcow2"), d.join("theirs.qcow2"));
    ok(&["create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k", s(&mine), "8M"]);
    qemu(&["create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k", s(&theirs), "8M"]);
    assert!(ok(&["info", "--output=json", s(&mine)]).contains("\"extended-l2\": true"));
    assert!(qemu(&["info", s(&mine)]).contains("extended l2: true"));
    let bench = |p: &Path| vec!["bench".to_string(), "-q".into(), "-w".into(), "-c".into(), "60".into(), "-s".into(), "5k".into(), "-S".into(), "100k".into(), "--pattern=7".into(), s(p).into()];
    ok(&bench(&mine).iter().map(String::as_str).collect::<Vec<_>>());
    qemu(&bench(&theirs).iter().map(String::as_str).collect::<Vec<_>>());
    check_clean(&mine);
    assert!(identical(&mine, &theirs));
    qemu_io(&mine, &["write -P 0x71 1000 5000", "write -z 40k 8k"]);
    qemu_io(&theirs, &["write -P 0x71 1000 5000", "write -z 40k 8k"]);
    assert!(identical(&mine, &theirs));
    let (code, out, _) = ours(&["check", s(&mine)]);
    assert_eq!((code, out), (0, qemu(&["check", s(&mine)])));

    // Preallocated: clusters marked zero over their host cluster, as qemu-img
    // makes them; a write fills its cluster in place (the file does not grow).
    let (pm, pq) = (d.join("pm.qcow2"), d.join("pq.qcow2"));
    for mode in ["falloc", "metadata"] {
        let o = format!("extended_l2=on,preallocation={mode}");
        for p in [&pm, &pq] {
            let _ = std::fs::remove_file(p);
        }
        ok(&["create", "-f", "qcow2", "-o", &o, s(&pm), "4M"]);
        qemu(&["create", "-q", "-f", "qcow2", "-o", &o, s(&pq), "4M"]);
        assert_eq!(ok(&["map", "--output=json", s(&pm)]), qemu(&["map", "--output=json", s(&pq)]), "{mode}");
    }
    let size = std::fs::metadata(&pm).unwrap().len();
    ok(&["bench", "-q", "-w", "-c", "8", "-s", "3k", "-S", "200k", s(&pm)]);
    qemu(&["bench", "-q", "-w", "-c", "8", "-s", "3k", "-S", "200k", s(&pq)]);
    assert_eq!(std::fs::metadata(&pm).unwrap().len(), size);
    assert_eq!(ok(&["map", "--output=json", s(&pm)]), qemu(&["map", "--output=json", s(&pm)]));
    assert_eq!(ok(&["map", "--output=json", s(&pm)]).replace("pm.qcow2", ""), qemu(&["map", "--output=json", s(&pq)]).replace("pq.qcow2", ""));
    let (code, out, _) = ours(&["check", s(&pm)]);
    assert_eq!((code, out), (0, qemu(&["check", s(&pm)])));

    // Snapshots, resize, convert and commit keep extended images whole.
    ok(&["snapshot", "-c", "s1", s(&r)]);
    qemu_io(&r, &["write -P 0x72 4k 1k"]);
    ok(&["snapshot", "-a", "s1", s(&r)]);
    check_clean(&r);
    assert!(identical(&q, &r));
    ok(&["snapshot", "-d", "s1", s(&r)]);
    ok(&["resize", s(&r), "20M"]);
    ok(&["resize", "--shrink", s(&r), "6M"]);
    check_clean(&r);
    let c = d.join("c.qcow2");
    ok(&["convert", "-O", "qcow2", "-o", "extended_l2=on", s(&q), s(&c)]);
    check_clean(&c);
    assert!(identical(&q, &c));
    assert!(qemu(&["info", s(&c)]).contains("extended l2: true"));
    ok(&["commit", s(&q)]);
    check_clean(&base);

    // What qemu-img refuses, refused with its words.
    let (code, _, err) = ours(&["amend", "-o", "compat=0.10", s(&c)]);
    assert!(code == 1 && err.contains("Cannot downgrade an image with incompatible features 0x10 set"), "{err}");
    let (code, _, err) = ours(&["create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=8k", s(&d.join("small.qcow2")), "1M"]);
    assert!(code == 1 && err.contains("at least 16384 bytes"), "{err}");
    let (code, _, err) = ours(&["create", "-f", "qcow2", "-o", "extended_l2=on,compat=0.10", s(&d.join("v2.qcow2")), "1M"]);
    assert!(code == 1 && err.contains("compatibility level 1.1"), "{err}");
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
