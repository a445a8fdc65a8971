//! Live migration between two rvirt-vmm processes on this host's /dev/kvm,
//! over a Unix socket: a hand-made guest keeps 16 MiB of pages dirty and
//! checks at each round that every page holds what it wrote the round
//! before (a page the migration missed prints `!`); it must go on at the
//! destination with the next letter and never print `!`. Streams that are
//! not rvirt's, or of another version, are refused before anything
//! moves; a refusal, a destination killed midway, a cancel or a destination
//! whose disks differ leaves the source running; writable disks' images
//! change hands. Both VMMs run under their seccomp lists (the default).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rvirt_api::{ApiClient, MigrationState, MigrationStatus, Request};
use rvirt_lab::guests::{bzimage_with, dirty_and_check};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rvirt-mig-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An rvirt-vmm process with its API.
struct Vmm {
    child: Child,
    api: ApiClient,
}

impl Drop for Vmm {
    /// A failed test leaves no VMM running (nor holding the test's output open).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, name: &str, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_rvirt-vmm"))
        .args(args)
        .args(["--serial"])
        .arg(format!("file={}", dir.join(format!("{name}.log")).display()))
        .arg("--api-socket")
        .arg(dir.join(format!("{name}.sock")))
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
        .spawn()
        .unwrap()
}

fn wait_for_path(p: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the VMM ended before {} appeared", p.display());
        assert!(Instant::now() < deadline, "no {}", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn source(dir: &Path, kernel: &Path, extra: &[&str]) -> Vmm {
    let mut args = vec!["--kernel", kernel.to_str().unwrap(), "--memory", "256M"];
    args.extend_from_slice(extra);
    let mut child = spawn(dir, "one", &args);
    wait_for_path(&dir.join("one.sock"), &mut child);
    let api = ApiClient::connect(&dir.join("one.sock"), Duration::from_secs(10)).unwrap();
    Vmm { child, api }
}

/// A destination waiting at `dir/mig.sock`.
fn destination(dir: &Path, extra: &[&str]) -> Child {
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut args = vec!["--incoming", uri.as_str()];
    args.extend_from_slice(extra);
    // A socket left by a killed destination is replaced by the new one's.
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(p).ok()?).into();
    let stale: Option<u64> = inode(&dir.join("mig.sock"));
    let mut child = spawn(dir, "two", &args);
    wait_for_path(&dir.join("mig.sock"), &mut child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while stale.is_some() && inode(&dir.join("mig.sock")) == stale {
        assert!(child.try_wait().unwrap().is_none() && Instant::now() < deadline, "the stale socket was not replaced: {}", err_of(dir, "two"));
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn letters(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(format!("{name}.log"))).unwrap_or_default()
}

fn wait_letters(dir: &Path, name: &str, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let got = letters(dir, name);
        assert!(!got.contains(&b'!'), "{name}: a page lost a write: {}", String::from_utf8_lossy(&got));
        if got.len() >= n {
            return got;
        }
        assert!(Instant::now() < deadline, "{name} printed {:?}", String::from_utf8_lossy(&got));
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn next_letter(b: u8) -> u8 {
    if b == b'z' {
        b'a'
    } else {
        b + 1
    }
}

fn migrate(api: &mut ApiClient, dir: &Path, bandwidth_mib_s: u64, compress: bool, auto_converge: bool) {
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let r = api.call(&Request::Migrate { uri, max_downtime_ms: 300, bandwidth_mib_s, compress, auto_converge }).unwrap();
    assert!(r.ok, "{r:?}");
}

/// Polls `migrate-status` until it is no longer under way.
fn outcome(api: &mut ApiClient) -> MigrationStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = api.call(&Request::MigrateStatus).unwrap().migration.unwrap();
        if !matches!(st.state, MigrationState::Setup | MigrationState::Active | MigrationState::SwitchOver) {
            return st;
        }
        assert!(Instant::now() < deadline, "still migrating: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn err_of(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default()
}

fn kernel(dir: &Path) -> PathBuf {
    let k = dir.join("kernel");
    std::fs::write(&k, bzimage_with(&dirty_and_check(4096, 100_000))).unwrap();
    k
}

#[test]
fn a_guest_dirtying_memory_moves_to_another_process_without_losing_a_write() {
    assert!(Path::new("/dev/kvm").exists(), "these tests need /dev/kvm");
    let dir = tmpdir("move");
    let k = kernel(&dir);
    let mut two = destination(&dir, &[]);
    let mut one = source(&dir, &k, &["--cpus", "2"]);
    wait_letters(&dir, "one", 10);
    // Compressed: the dirtied pages hold one number each and go small.
    migrate(&mut one.api, &dir, 0, true, false);
    // Progress until the source ends (it goes as soon as the destination holds the guest).
    let mut seen = Vec::new();
    while let Ok(r) = one.api.call(&Request::MigrateStatus) {
        // A source on its way out may answer that it is ending.
        let Some(st) = r.migration else { break };
        assert!(!matches!(st.state, MigrationState::Failed | MigrationState::Cancelled), "{st:?}\n{}\n{}", err_of(&dir, "one"), err_of(&dir, "two"));
        seen.push(st.state);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(seen.iter().all(|s| *s != MigrationState::None), "{seen:?}");
    // The source ends, saying how it went: the guest's pause, measured.
    let status = one.child.wait().unwrap();
    let said = err_of(&dir, "one");
    assert!(status.success(), "{said}");
    let how = said.lines().find_map(|l| l.strip_prefix("rvirt-vmm: migrated: ")).unwrap_or_else(|| panic!("{said}"));
    let paused: f64 = how.strip_prefix("guest paused ").and_then(|r| r.split(' ').next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{how}"));
    assert!(paused > 0.0 && paused < 5000.0, "{how}");
    let kib: u64 = how.split(", ").find_map(|f| f.strip_suffix(" KiB sent").or_else(|| f.split(" KiB sent").next().filter(|_| f.contains("KiB sent")))).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{how}"));
    // 16 MiB of dirtied pages, each holding one number: compressed far below their size.
    assert!(kib > 0 && kib < 8 << 10, "{how}");
    let before = letters(&dir, "one");
    let last = *before.last().unwrap();
    // The destination goes on with the next letter, every page as the guest left it.
    let after = wait_letters(&dir, "two", 15);
    assert_eq!(after[0], next_letter(last), "after {:?} came {:?}", last as char, String::from_utf8_lossy(&after[..10]));
    assert!(after.windows(2).all(|w| w[1] == next_letter(w[0])), "{}", String::from_utf8_lossy(&after));
    let mut api = ApiClient::connect(&dir.join("two.sock"), Duration::from_secs(10)).unwrap();
    let s = api.call(&Request::Status).unwrap().status.unwrap();
    assert_eq!((s.vcpus, s.memory_bytes), (2, 256 << 20));
    assert!(api.call(&Request::Stop).unwrap().ok);
    assert!(two.wait().unwrap().success());
    assert!(!dir.join("mig.sock").exists(), "the destination's socket is gone with it");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `--dirty-ring`, the vCPUs' rings replace KVM's bitmaps: rings of
/// 1024 entries fill many times a round of this guest (4096 pages), so the
/// vCPUs harvest their own as well as the migration thread; no write is lost.
#[test]
fn a_dirty_ring_tracks_what_the_guest_writes_as_the_bitmap_does() {
    assert!(Path::new("/dev/kvm").exists(), "these tests need /dev/kvm");
    let dir = tmpdir("ring");
    let k = kernel(&dir);
    // Sizes the ring cannot have are refused at start, saying why.
    let bad = Command::new(env!("CARGO_BIN_EXE_rvirt-vmm")).args(["--kernel", k.to_str().unwrap(), "--dirty-ring", "1000"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("a power of two from 1024 to 65536"), "{bad:?}");
    let mut two = destination(&dir, &[]);
    let mut one = source(&dir, &k, &["--cpus", "2", "--dirty-ring", "1024"]);
    wait_letters(&dir, "one", 10);
    migrate(&mut one.api, &dir, 0, false, false);
    let mut ring_full = 0;
    while let Ok(r) = one.api.call(&Request::Stats) {
        let Some(stats) = r.stats else { break };
        ring_full = ring_full.max(stats.exits.get("dirty-ring-full").copied().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(one.child.wait().unwrap().success(), "{}\n{}", err_of(&dir, "one"), err_of(&dir, "two"));
    assert!(ring_full > 0, "the vCPUs' rings filled and were harvested");
    let before = letters(&dir, "one");
    let after = wait_letters(&dir, "two", 15);
    assert_eq!(after[0], next_letter(*before.last().unwrap()));
    assert!(after.windows(2).all(|w| w[1] == next_letter(w[0])), "{}", String::from_utf8_lossy(&after));
    let mut api = ApiClient::connect(&dir.join("two.sock"), Duration::from_secs(10)).unwrap();
    assert!(api.call(&Request::Stop).unwrap().ok);
    assert!(two.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends `head` to a waiting destination; returns its answer (tag, text) and its exit message.
fn raw_stream(dir: &Path, head: &[u8]) -> (u32, String, String) {
    let mut dest = destination(dir, &[]);
    // The path appears once the destination listens.
    let mut s = std::os::unix::net::UnixStream::connect(dir.join("mig.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head).unwrap();
    let mut frame = [0u8; 8];
    s.read_exact(&mut frame).unwrap();
    let (tag, len) = (u32::from_le_bytes(frame[..4].try_into().unwrap()), u32::from_le_bytes(frame[4..].try_into().unwrap()));
    let mut text = vec![0u8; len as usize];
    s.read_exact(&mut text).unwrap();
    assert!(!dest.wait().unwrap().success());
    (tag, String::from_utf8_lossy(&text).into_owned(), err_of(dir, "two"))
}

#[test]
fn foreign_streams_refusals_and_cancels_leave_the_source_running() {
    assert!(Path::new("/dev/kvm").exists(), "these tests need /dev/kvm");
    let dir = tmpdir("refuse");
    // Not rvirt's, another version: refused at once, saying so, on both ends.
    let (tag, text, err) = raw_stream(&dir, b"GET / HTTP/1.1\r\n");
    assert_eq!(tag, 3, "REFUSE");
    assert!(text.contains("not an rvirt migration stream") && err.contains("not an rvirt migration stream"), "{text} / {err}");
    let mut head = rvirt_vmm::migration::MAGIC.to_vec();
    head.extend_from_slice(&99u32.to_le_bytes());
    let (tag, text, _) = raw_stream(&dir, &head);
    assert_eq!(tag, 3);
    assert!(text.contains("version 99; this VMM speaks version 1"), "{text}");
    // A file that is not a socket where the destination would listen is kept, and said so.
    let plain = dir.join("not-a-socket");
    std::fs::write(&plain, b"keep me").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rvirt-vmm")).arg("--incoming").arg(format!("unix:{}", plain.display())).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("a file that is not a socket is there"), "{out:?}");
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep me");

    let k = kernel(&dir);
    let mut one = source(&dir, &k, &[]);
    wait_letters(&dir, "one", 10);
    // The destination cannot take it (a console the VM has not): the source runs on.
    let mut two = destination(&dir, &["--console", "null"]);
    migrate(&mut one.api, &dir, 0, false, false);
    let st = outcome(&mut one.api);
    assert_eq!(st.state, MigrationState::Failed);
    assert!(st.error.as_deref().unwrap_or("").contains("the destination refused") && st.error.as_deref().unwrap_or("").contains("no virtio console"), "{st:?}");
    assert!(!two.wait().unwrap().success());
    let n = letters(&dir, "one").len();
    wait_letters(&dir, "one", n + 10);

    // A destination killed midway: the source finds out and runs on.
    let mut two = destination(&dir, &[]);
    migrate(&mut one.api, &dir, 4, false, false);
    std::thread::sleep(Duration::from_millis(700));
    two.kill().unwrap();
    two.wait().unwrap();
    let st = outcome(&mut one.api);
    assert_eq!(st.state, MigrationState::Failed, "{st:?}");
    assert!(st.error.as_deref().unwrap_or("").contains("migration: sending"), "{st:?}");
    let n = letters(&dir, "one").len();
    wait_letters(&dir, "one", n + 10);
    // One killed while it waits leaves its socket behind; the next destination replaces it.
    let mut two = destination(&dir, &[]);
    two.kill().unwrap();
    two.wait().unwrap();
    assert!(dir.join("mig.sock").exists());

    // A guest that dirties more than a 4 MiB/s link carries: auto-converge
    // holds its vCPUs off, more each pass; a cancel midway lets it run on at
    // full speed here, and the destination gives up.
    let mut two = destination(&dir, &[]);
    migrate(&mut one.api, &dir, 4, false, true);
    let deadline = Instant::now() + Duration::from_secs(60);
    let throttled = loop {
        let st = one.api.call(&Request::MigrateStatus).unwrap().migration.unwrap();
        if st.throttle_percent >= 30 {
            break st;
        }
        assert!(matches!(st.state, MigrationState::Setup | MigrationState::Active) && Instant::now() < deadline, "{st:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(throttled.iteration >= 2, "{throttled:?}");
    assert!(one.api.call(&Request::MigrateCancel).unwrap().ok);
    let st = outcome(&mut one.api);
    assert_eq!(st.state, MigrationState::Cancelled, "{st:?}");
    assert!(!two.wait().unwrap().success(), "the destination ends when the source goes");
    let n = letters(&dir, "one").len();
    wait_letters(&dir, "one", n + 10);
    let s = one.api.call(&Request::Status).unwrap().status.unwrap();
    assert_eq!(s.state, rvirt_api::RunState::Running);

    // Nowhere to go, and what cannot move yet: refused at once.
    let r = one.api.call(&Request::Migrate { uri: "ftp:x".into(), max_downtime_ms: 300, bandwidth_mib_s: 0, compress: false, auto_converge: false }).unwrap();
    assert!(!r.ok && r.error.as_deref().unwrap_or("").contains("unix:PATH or tcp:HOST:PORT"), "{r:?}");
    assert!(one.api.call(&Request::Stop).unwrap().ok);
    one.child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The images a guest writes change hands at the switch-over: the source
/// holds the write lock until then, the destination after; a destination
/// whose image is not the source's size is refused while the source runs.
#[test]
fn writable_disks_change_hands_at_the_switch_over() {
    use rvirt_block::lock::{held_by_others, WRITE};
    assert!(Path::new("/dev/kvm").exists(), "these tests need /dev/kvm");
    let dir = tmpdir("disks");
    let k = kernel(&dir);
    let (qcow2, base) = (dir.join("disk.qcow2"), dir.join("base.raw"));
    drop(rvirt_block::Qcow2Image::create(&qcow2, 8 << 20, &Default::default()).unwrap());
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let writable = format!("path={},format=qcow2", qcow2.display());
    let read_only = format!("path={},readonly=on", base.display());
    let mut one = source(&dir, &k, &["--disk", &writable, "--disk", &read_only]);
    wait_letters(&dir, "one", 10);
    assert_ne!(held_by_others(&qcow2).unwrap().held & WRITE, 0, "the source writes its image");

    // The destination's first disk is another image, of another size: refused before the source stops.
    let small = dir.join("small.qcow2");
    drop(rvirt_block::Qcow2Image::create(&small, 4 << 20, &Default::default()).unwrap());
    let mut two = destination(&dir, &["--disk", &format!("path={},format=qcow2", small.display()), "--disk", &read_only]);
    migrate(&mut one.api, &dir, 0, false, false);
    let st = outcome(&mut one.api);
    assert_eq!(st.state, MigrationState::Failed);
    assert!(st.error.as_deref().unwrap_or("").contains("is 4194304 bytes here, the source's image 8388608"), "{st:?}");
    assert!(!two.wait().unwrap().success());
    let n = letters(&dir, "one").len();
    wait_letters(&dir, "one", n + 10);

    // The same images: the destination waits without taking the write lock
    // (only a look at the image), and holds it once the guest is there.
    let mut two = destination(&dir, &[]);
    migrate(&mut one.api, &dir, 0, false, false);
    assert!(one.child.wait().unwrap().success(), "{}\n{}", err_of(&dir, "one"), err_of(&dir, "two"));
    let before = letters(&dir, "one");
    let after = wait_letters(&dir, "two", 10);
    assert_eq!(after[0], next_letter(*before.last().unwrap()));
    assert_ne!(held_by_others(&qcow2).unwrap().held & WRITE, 0, "the destination writes the image now");
    let mut api = ApiClient::connect(&dir.join("two.sock"), Duration::from_secs(10)).unwrap();
    let devices = api.call(&Request::Stats).unwrap();
    assert!(format!("{devices:?}").contains("disk0") && format!("{devices:?}").contains("disk1"), "{devices:?}");
    assert!(api.call(&Request::Stop).unwrap().ok);
    assert!(two.wait().unwrap().success());
    assert_eq!(held_by_others(&qcow2).unwrap().held, 0, "no lock outlives the VMMs");
    let _ = std::fs::remove_dir_all(&dir);
}
