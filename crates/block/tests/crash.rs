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

#[test]
fn sigkill_mid_stream_leaves_a_consistent_image() {
    if let Some(p) = std::env::var_os("RVIRT_CRASH_WRITER") {
        writer(Path::new(&p));
        return;
    }
    let dir = std::env::temp_dir().join(format!("rvirt-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("crash.qcow2");
    Qcow2Image::create(&img, MAX_WRITES * STRIDE + (1 << 20), &CreateOptions { cluster_bits: 12, ..Default::default() }).unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sigkill_mid_stream_leaves_a_consistent_image", "--nocapture", "--test-threads=1"])
        .env("RVIRT_CRASH_WRITER", &img)
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

    let out = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&img).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // 0: no errors; 3: leaked clusters only.
    let code = out.status.code().unwrap_or(-1);
    assert!(code == 0 || code == 3, "qemu-img check exit {code}:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("ERROR"), "{text}");

    let reopened = Qcow2Image::open(&img, true).unwrap();
    let mut buf = vec![0u8; WRITE_LEN];
    for i in 0..=last {
        reopened.read_at(&mut buf, i * STRIDE).unwrap();
        // STRIDE > WRITE_LEN: writes never overlap, so each keeps its pattern.
        assert!(buf.iter().all(|&b| b == pattern(i)), "write {i} (flushed) did not survive");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
