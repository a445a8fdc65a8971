//! Helpers shared by the tests that run Debian's qemu-img and qemu-io.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use rvirt_block::BlockBackend;

pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rvirt-block-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e} (install qemu-utils)"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

pub fn qemu_img(args: &[&str]) -> String {
    let (ok, text) = run("qemu-img", args);
    assert!(ok, "qemu-img {args:?} failed:\n{text}");
    text
}

pub fn qemu_io(img: &Path, fmt: &str, cmd: &str) -> String {
    let (ok, text) = run("qemu-io", &["-f", fmt, "-c", cmd, img.to_str().unwrap()]);
    assert!(ok && !text.contains("Pattern verification failed") && !text.contains("error"), "qemu-io '{cmd}':\n{text}");
    text
}

pub fn assert_check_clean(img: &Path) {
    let out = qemu_img(&["check", "-f", "qcow2", img.to_str().unwrap()]);
    assert!(out.contains("No errors were found"), "qemu-img check:\n{out}");
}

/// What qemu-img reads from `img`, as raw bytes.
pub fn qemu_contents(img: &Path, fmt: &str) -> Vec<u8> {
    let raw = img.with_extension("qemu.raw");
    qemu_img(&["convert", "-f", fmt, "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
    std::fs::read(raw).unwrap()
}

pub fn our_contents(img: &dyn BlockBackend) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

/// Opens `path` as `opts` say, waiting up to 5 s while it is locked: a
/// test in this process that spawns qemu-img or qemu-io gives its child,
/// between fork and exec, every descriptor we had open a moment ago, and
/// with them their locks.
pub fn reopen_qcow2(path: &Path, opts: &rvirt_block::ImageOptions) -> rvirt_block::qcow2::Qcow2Image {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match rvirt_block::qcow2::Qcow2Image::open_with(path, opts) {
            Err(rvirt_block::Error::Locked { .. }) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(10)),
            r => break r.unwrap(),
        }
    }
}

