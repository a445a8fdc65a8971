//! Helpers the side-by-side tests share: run rvirt-img, qemu-img and
//! qemu-io, and compare what they leave.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rvirt-img-cmd-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn run(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

pub fn ours(args: &[&str]) -> (i32, String, String) {
    run(env!("CARGO_BIN_EXE_rvirt-img"), args)
}

/// Runs rvirt-img and asserts success.
pub fn ok(args: &[&str]) -> String {
    let (code, out, err) = ours(args);
    assert_eq!(code, 0, "rvirt-img {args:?}: {out}{err}");
    out
}

pub fn qemu(args: &[&str]) -> String {
    let (code, out, err) = run("qemu-img", args);
    assert_eq!(code, 0, "qemu-img {args:?}: {out}{err}");
    out
}

pub fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(s(img));
    let (code, out, err) = run("qemu-io", &args);
    assert!(code == 0 && !out.contains("failed") && !err.contains("error"), "qemu-io {cmds:?}: {out}{err}");
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn identical(a: &Path, b: &Path) -> bool {
    run("qemu-img", &["compare", s(a), s(b)]).0 == 0
}

pub fn check_clean(p: &Path) {
    let out = qemu(&["check", s(p)]);
    assert!(out.contains("No errors were found"), "{out}");
}


/// The ranges bitmap `name` of `img` marks dirty, as QEMU reads them
/// (qemu-nbd exports the bitmap; qemu-img map shows dirty ranges as no data).
pub fn qemu_dirty_ranges(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let sock = img.with_extension(format!("{name}.nbd"));
    let _ = std::fs::remove_file(&sock);
    let mut nbd = Command::new("qemu-nbd")
        .args(["-r", "-t", "-f", "qcow2", "-B", name, "--socket", s(&sock), s(img)])
        .spawn()
        .expect("qemu-nbd");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let opts = format!("driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}", s(&sock));
    let out = run("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    let _ = nbd.kill();
    let _ = nbd.wait();
    assert_eq!(out.0, 0, "qemu-img map of bitmap {name}: {}{}", out.1, out.2);
    let v: serde_json::Value = serde_json::from_str(&out.1).expect("map json");
    v.as_array()
        .expect("map array")
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap_or(0), e["length"].as_u64().unwrap_or(0)))
        .collect()
}

/// `format-specific.data.bitmaps` of `qemu-img info --output=json`.
pub fn qemu_bitmaps(img: &Path) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&qemu(&["info", "--output=json", "-U", s(img)])).expect("info json");
    v["format-specific"]["data"]["bitmaps"].clone()
}
