//! A writer killed with SIGKILL mid-stream leaves an image that
//! `qemu-img check` calls clean or leak-only, and that still reads back
//! every write completed before the last flush.
//!
//! The writer is this test binary run again with RVIRT_CRASH_WRITER set.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use rvirt_block::qcow2::{CreateOptions, Qcow2Image};
use rvirt_block::BlockBackend;

const WRITE_LEN: usize = 12 * 1024;
const STRIDE: u64 = 12 * 1024 + 1000; // unaligned: partial clusters and copy-on-write
const FLUSH_EVERY: u64 = 4;
const MAX_WRITES: u64 = 4000;

fn pattern(i: u64) -> u8 {
    (i % 250) as u8 + 1
}

fn writer(path: &Path) {
    let img = Qcow2Image::open(path, false).unwrap();
    let mut out = std::io::stdout();
    for i in 0..MAX_WRITES {
        img.write_at(&vec![pattern(i); WRITE_LEN], i * STRIDE).unwrap();
        if (i + 1) % FLUSH_EVERY == 0 {
            img.flush().unwrap();
            writeln!(out, "flushed {i}").unwrap();
            out.flush().unwrap();
        }
    }
}

/// Runs the writer on `img` in a child process (this test binary, test
/// `test`), SIGKILLs it after 600 flushes and returns the last flushed write.
fn kill_writer_midway(img: &Path, test: &str) -> u64 {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("RVIRT_CRASH_WRITER", img)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut last_flushed = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("flushed ") {
            let n: u64 = n.parse().unwrap();
            last_flushed = Some(n);
            if n >= 600 {
                // SAFETY: signalling our own child process.
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                break;
            }
        }
    }
    let status = child.wait().unwrap();
    let last = last_flushed.expect("the writer never flushed");
    assert!(last < MAX_WRITES - 1, "the writer finished before it was killed ({status})");
    last
}

/// `qemu-img check` exit code and output.
fn qemu_check(img: &Path) -> (i32, String) {
    let out = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(img).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn assert_flushed_writes_survive(img: &Path, last: u64) {
    let reopened = Qcow2Image::open(img, true).unwrap();
    let mut buf = vec![0u8; WRITE_LEN];
    for i in 0..=last {
        reopened.read_at(&mut buf, i * STRIDE).unwrap();
        // STRIDE > WRITE_LEN: writes never overlap, so each keeps its pattern.
        assert!(buf.iter().all(|&b| b == pattern(i)), "write {i} (flushed) did not survive");
    }
}

/// Held by each test for its whole run: a writer spawned by one test
/// inherits, until its exec, the descriptors the other test has open, and
/// with them that image's lock (seen as a spurious "another process does
/// not share write" in the other test's writer).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn crash_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rvirt-crash-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn sigkill_mid_stream_leaves_a_consistent_image() {
    if let Some(p) = std::env::var_os("RVIRT_CRASH_WRITER") {
        writer(Path::new(&p));
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = crash_dir("strict");
    let img = dir.join("crash.qcow2");
    Qcow2Image::create(&img, MAX_WRITES * STRIDE + (1 << 20), &CreateOptions { cluster_bits: 12, ..Default::default() }).unwrap();
    let last = kill_writer_midway(&img, "sigkill_mid_stream_leaves_a_consistent_image");
    // 0: no errors; 3: leaked clusters only.
    let (code, text) = qemu_check(&img);
    assert!(code == 0 || code == 3, "qemu-img check exit {code}:\n{text}");
    assert!(!text.contains("ERROR"), "{text}");
    assert_flushed_writes_survive(&img, last);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigkill_with_lazy_refcounts_is_repaired_on_next_open() {
    if let Some(p) = std::env::var_os("RVIRT_CRASH_WRITER") {
        writer(Path::new(&p));
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = crash_dir("lazy");
    let img = dir.join("lazy.qcow2");
    let opts = CreateOptions { cluster_bits: 12, lazy_refcounts: true, ..Default::default() };
    Qcow2Image::create(&img, MAX_WRITES * STRIDE + (1 << 20), &opts).unwrap();
    let last = kill_writer_midway(&img, "sigkill_with_lazy_refcounts_is_repaired_on_next_open");
    // The dirty bit is set; a read-write open rebuilds the refcounts.
    drop(Qcow2Image::open(&img, false).unwrap());
    let (code, text) = qemu_check(&img);
    assert_eq!(code, 0, "qemu-img check after repair:\n{text}");
    assert_flushed_writes_survive(&img, last);
    let _ = std::fs::remove_dir_all(&dir);
}
