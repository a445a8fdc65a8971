//! rvirt-img against qemu-img: what we create, qemu-img accepts; our `info
//! --output json` agrees with qemu-img's on the shared fields; bad input gets
//! one clear line.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rvirt-img-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ours(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rvirt-img")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn json(cmd: &str, img: &Path) -> serde_json::Value {
    let out = Command::new(cmd).args(["info", "--output", "json"]).arg(img).output().unwrap();
    assert!(out.status.success(), "{cmd} info: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_info_agrees(img: &Path) {
    let mine = json(env!("CARGO_BIN_EXE_rvirt-img"), img);
    let theirs = json("qemu-img", img);
    for key in ["virtual-size", "filename", "cluster-size", "format", "backing-filename", "backing-filename-format", "full-backing-filename", "dirty-flag"] {
        assert_eq!(mine.get(key), theirs.get(key), "{key} differs for {}", img.display());
    }
    if theirs.get("format-specific").is_some() {
        for key in ["compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2"] {
            assert_eq!(mine["format-specific"]["data"].get(key), theirs["format-specific"]["data"].get(key), "format-specific {key}");
        }
    }
}

#[test]
fn created_images_pass_qemu_img_check_and_info_agrees() {
    let d = tmpdir("create");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let raw = d.join("base.raw");
    let q = d.join("plain.qcow2");
    let v2 = d.join("v2.qcow2");
    let top = d.join("top.qcow2");
    assert_eq!(ours(&["create", "-f", "raw", &s(&raw), "16M"]).0, 0);
    assert_eq!(ours(&["create", "-f", "qcow2", "-o", "cluster_size=4k", &s(&q), "1G"]).0, 0);
    assert_eq!(ours(&["create", "-f", "qcow2", "-o", "compat=0.10", &s(&v2), "100M"]).0, 0);
    assert_eq!(ours(&["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &s(&top)]).0, 0);
    let opts = d.join("opts.qcow2");
    assert_eq!(ours(&["create", "-f", "qcow2", "-o", "compression_type=zstd,lazy_refcounts=on,preallocation=metadata", &s(&opts), "8M"]).0, 0);
    let full = d.join("full.raw");
    assert_eq!(ours(&["create", "-f", "raw", "-o", "preallocation=full", &s(&full), "4M"]).0, 0);
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&full).unwrap().blocks() * 512 >= 4 << 20, "preallocation=full should allocate the raw file");
    for img in [&q, &v2, &top, &opts] {
        let out = Command::new("qemu-img").args(["check"]).arg(img).output().unwrap();
        assert!(out.status.success(), "{}: {}", img.display(), String::from_utf8_lossy(&out.stdout));
    }
    for img in [&raw, &q, &v2, &top, &opts] {
        assert_info_agrees(img);
    }
    // Images made by qemu-img, too.
    let theirs = d.join("theirs.qcow2");
    assert!(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2"]).arg(&theirs).status().unwrap().success());
    assert_info_agrees(&theirs);
    let (code, human, _) = ours(&["info", &s(&top)]);
    assert_eq!(code, 0);
    assert!(human.contains("virtual size: 16 MiB (16777216 bytes)") && human.contains("backing file: base.raw"), "{human}");
}

#[test]
fn bad_input_gets_one_line() {
    let d = tmpdir("bad");
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    for (args, needle) in [
        (vec!["create", "-f", "vmdk", &s(d.join("a")), "1G"], "unknown image format 'vmdk'"),
        (vec!["create", "-f", "qcow2", &s(d.join("b"))], "Image creation needs a size parameter"),
        (vec!["create", "-f", "qcow2", &s(d.join("c")), "10X"], "invalid size '10X'"),
        (vec!["create", "-f", "qcow2", "-o", "cluster_size=3000", &s(d.join("d")), "1G"], "not a power of two"),
        (vec!["create", "-f", "qcow2", "-o", "cluster_size=4M", &s(d.join("e")), "1G"], "cluster size"),
        (vec!["create", "-f", "qcow2", "-o", "nonsense=1", &s(d.join("f")), "1G"], "option 'nonsense'"),
        (vec!["create", "-f", "qcow2", "-b", "missing.raw", &s(d.join("g"))], "backing file missing.raw"),
        (vec!["create", "-f", "raw", "-b", "x", &s(d.join("h")), "1G"], "backing files need format qcow2"),
        (vec!["info", "/nonexistent/disk.qcow2"], "/nonexistent/disk.qcow2"),
        (vec!["create", "-f", "qcow2", "-o", "preallocation=some", &s(d.join("p")), "1G"], "invalid preallocation 'some'"),
        (vec!["create", "-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", &s(d.join("l")), "1G"], "need compat=1.1"),
        (vec!["snapshot", "-l", "-c", "x", &s(d.join("p"))], "exactly one of -l"),
        (vec!["measure", "-O", "qcow2"], "either --size or a source image"),
        (vec!["info", "--output", "xml", "/etc/hostname"], "invalid --output 'xml'"),
    ] {
        let (code, _, err) = ours(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: expected '{needle}' in {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    // A truncated qcow2 gets a clear error from info.
    let t = d.join("trunc.qcow2");
    std::fs::write(&t, b"QFI\xfb\0\0\0\x03").unwrap();
    let (code, _, err) = ours(&["info", t.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not a qcow2") || err.contains("truncated"), "{err}");
}

#[test]
fn convert_round_trips_and_stays_sparse() {
    let d = tmpdir("convert");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let src = d.join("src.qcow2");
    // A source with data, zero clusters, compressed data and holes, written by QEMU.
    assert!(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&src).arg("64M").status().unwrap().success());
    for cmd in ["write -P 0x11 0 1M", "write -z 4M 1M", "write -c -P 0x22 8M 64k", "write -P 0x33 63M 4k"] {
        assert!(Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd]).arg(&src).output().unwrap().status.success());
    }
    let raw = d.join("out.raw");
    let q = d.join("out.qcow2");
    assert_eq!(ours(&["convert", "-O", "raw", &s(&src), &s(&raw)]).0, 0);
    assert_eq!(ours(&["convert", "-t", "writeback", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=16k", &s(&raw), &s(&q)]).0, 0);
    for out in [&raw, &q] {
        let c = Command::new("qemu-img").args(["compare"]).arg(&src).arg(out).output().unwrap();
        assert!(c.status.success(), "{}: {}", out.display(), String::from_utf8_lossy(&c.stdout));
    }
    assert!(Command::new("qemu-img").args(["check", "-q"]).arg(&q).status().unwrap().success());
    // Only ~1.1 MiB of the 64 MiB is data: both outputs stay sparse.
    use std::os::unix::fs::MetadataExt;
    for out in [&raw, &q] {
        let allocated = std::fs::metadata(out).unwrap().blocks() * 512;
        assert!(allocated < 4 << 20, "{} allocates {allocated} bytes", out.display());
    }
    let (code, _, err) = ours(&["convert", "-m", "0", "-O", "qcow2", &s(&src), &s(&d.join("c.qcow2"))]);
    assert_eq!(code, 1);
    assert!(err.contains("-m must be between 1 and 16"), "{err}");
    let (code, _, err) = ours(&["convert", "-t", "sometimes", &s(&src), &s(&d.join("t.raw"))]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid cache mode 'sometimes'"), "{err}");
}
