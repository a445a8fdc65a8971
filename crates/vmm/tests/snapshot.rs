//! Snapshots through the control API and `--restore`, on this host's
//! /dev/kvm with a hand-made guest that prints the alphabet over and over:
//! the restored guest's first letter must be the one after the last the
//! snapshotted guest printed (it continues exactly where it was), two
//! clones of one snapshot run side by side, and damaged snapshots are
//! refused saying what is wrong.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rvirt_api::{ApiClient, Request};
use rvirt_lab::guests::{bzimage_with, print_alphabet};
use rvirt_vmm::config::Boot;
use rvirt_vmm::{SerialMode, VmConfig, VmExit};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rvirt-snap-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn wait_for(log: &Path, len: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = std::fs::read(log).unwrap_or_default();
        if got.len() >= len {
            return got;
        }
        assert!(Instant::now() < deadline, "{} printed {} bytes", log.display(), got.len());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A VMM running `cfg` on a thread, with its API.
struct Running {
    vmm: std::thread::JoinHandle<rvirt_vmm::Result<VmExit>>,
    api: ApiClient,
}

fn start(cfg: VmConfig) -> Running {
    let sock = cfg.api_socket.clone().unwrap();
    let vmm = std::thread::spawn(move || rvirt_vmm::run(&cfg));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if vmm.is_finished() {
            panic!("the VMM ended: {:?}", vmm.join().unwrap());
        }
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    let api = ApiClient::connect(&sock, Duration::from_secs(10)).unwrap();
    Running { vmm, api }
}

impl Running {
    fn stop(mut self) {
        assert!(self.api.call(&Request::Stop).unwrap().ok);
        assert_eq!(self.vmm.join().unwrap().unwrap(), VmExit::Stopped);
    }
}

fn restore_cfg(dir: &Path, snap: &Path, name: &str) -> VmConfig {
    let mut cfg = VmConfig::new("/nonexistent");
    cfg.boot = Boot::Restore { dir: snap.to_path_buf(), copy_memory: false };
    cfg.serial = SerialMode::File(dir.join(format!("{name}.log")));
    cfg.api_socket = Some(dir.join(format!("{name}.sock")));
    cfg
}

/// The rvirt-vmm binary with `args`, its serial port in `dir/NAME.log`,
/// stderr in `dir/NAME.err`, and a client of its API once it listens.
fn spawn_binary(dir: &Path, args: &[&str], name: &str) -> (std::process::Child, ApiClient) {
    let sock = dir.join(format!("{name}.sock"));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_rvirt-vmm"))
        .args(args)
        .arg("--serial")
        .arg(format!("file={}", dir.join(format!("{name}.log")).display()))
        .arg("--api-socket")
        .arg(&sock)
        .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "{name}: {}", std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, ApiClient::connect(&sock, Duration::from_secs(10)).unwrap())
}

fn next_letter(b: u8) -> u8 {
    if b == b'z' {
        b'a'
    } else {
        b + 1
    }
}

#[test]
fn a_restored_guest_continues_where_the_snapshot_left_it_and_clones_run_side_by_side() {
    assert!(Path::new("/dev/kvm").exists(), "these tests need /dev/kvm");
    let dir = tmpdir("alphabet");
    let kernel = dir.join("kernel");
    std::fs::write(&kernel, bzimage_with(&print_alphabet(0x2000))).unwrap();
    let mut cfg = VmConfig::new(&kernel);
    cfg.memory_bytes = 128 << 20;
    cfg.vcpus = 2;
    cfg.serial = SerialMode::File(dir.join("one.log"));
    cfg.api_socket = Some(dir.join("one.sock"));
    let mut one = start(cfg.clone());
    wait_for(&dir.join("one.log"), 40);

    let snap = dir.join("snap");
    let r = one.api.call(&Request::Snapshot { path: snap.clone(), resume: false, fd: false, note: None, disk_snapshot: None }).unwrap();
    assert!(r.ok, "{r:?}");
    let info = r.snapshot.unwrap();
    assert!(info.state_bytes > 10_000 && info.memory_bytes > 0 && info.memory_bytes < 16 << 20, "{info:?}");
    assert_eq!(std::fs::metadata(snap.join("memory")).unwrap().len(), 128 << 20, "the memory file is the guest's RAM, sparse");
    // Paused: nothing more comes out.
    let printed = std::fs::read(dir.join("one.log")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(std::fs::read(dir.join("one.log")).unwrap(), printed, "the VM stays paused after a snapshot");
    let last = *printed.last().unwrap();
    // A second snapshot into the same directory is refused; the first stays whole.
    let r = one.api.call(&Request::Snapshot { path: snap.clone(), resume: true, fd: false, note: None, disk_snapshot: None }).unwrap();
    assert!(!r.ok && r.error.as_deref().unwrap_or("").contains("holds a snapshot already"), "{r:?}");
    one.stop();

    // Two clones from the one snapshot, side by side: each goes on with the next letter.
    let mut two = start(restore_cfg(&dir, &snap, "two"));
    let mut three = start(restore_cfg(&dir, &snap, "three"));
    for name in ["two", "three"] {
        let out = wait_for(&dir.join(format!("{name}.log")), 30);
        assert_eq!(out[0], next_letter(last), "{name} printed {:?} after {:?}", String::from_utf8_lossy(&out[..10]), last as char);
        assert!(out.windows(2).all(|w| w[1] == next_letter(w[0])), "{name} goes on through the alphabet");
    }
    // The restored VM is a VM like another: status, pause, resume.
    let st = two.api.call(&Request::Status).unwrap().status.unwrap();
    assert_eq!((st.vcpus, st.memory_bytes), (2, 128 << 20));
    assert!(two.api.call(&Request::Pause).unwrap().ok);
    assert!(three.api.call(&Request::Status).unwrap().ok);
    two.stop();
    three.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_guest_booted_through_seabios_continues_with_the_firmware_it_ran() {
    use rvirt_lab::guests::{boot_sector, real_mode_bios_print_alphabet};
    let dir = tmpdir("firmware");
    // The boot sector prints through SeaBIOS's int 0x14: the firmware in RAM must work after the restore.
    let mut disk = boot_sector(&real_mode_bios_print_alphabet(1));
    disk.resize(1 << 20, 0);
    std::fs::write(dir.join("disk.raw"), disk).unwrap();
    let mut cfg = VmConfig::firmware(rvirt_vmm::config::DEFAULT_FIRMWARE);
    cfg.memory_bytes = 128 << 20;
    cfg.disks.push(rvirt_vmm::config::DiskConfig::plain(dir.join("disk.raw")));
    cfg.serial = SerialMode::File(dir.join("one.log"));
    cfg.api_socket = Some(dir.join("one.sock"));
    let mut one = start(cfg);
    let letters = |log: &str| -> Vec<u8> {
        let text = std::fs::read(dir.join(log)).unwrap_or_default();
        // SeaBIOS flushes its own dots lazily, among the first letters.
        let at = text.windows(9).position(|w| w == b"Hard Disk").map_or(text.len(), |i| i + 9);
        text[at..].iter().copied().filter(u8::is_ascii_lowercase).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while letters("one.log").len() < 10 {
        assert!(Instant::now() < deadline, "no letters after the firmware booted the disk: {}", String::from_utf8_lossy(&std::fs::read(dir.join("one.log")).unwrap_or_default()));
        std::thread::sleep(Duration::from_millis(20));
    }
    let snap = dir.join("snap");
    let r = one.api.call(&Request::Snapshot { path: snap.clone(), resume: false, fd: false, note: None, disk_snapshot: None }).unwrap();
    assert!(r.ok, "{r:?}");
    let last = *letters("one.log").last().unwrap();
    one.stop();
    let two = start(restore_cfg(&dir, &snap, "two"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read(dir.join("two.log")).unwrap_or_default();
        let got: Vec<u8> = text.iter().copied().filter(u8::is_ascii_lowercase).collect();
        if got.len() >= 10 {
            assert_eq!(got[0], next_letter(last), "the restored guest goes on after {:?}: {:?}", last as char, String::from_utf8_lossy(&text));
            assert!(got.windows(2).all(|w| w[1] == next_letter(w[0])), "{:?}", String::from_utf8_lossy(&got));
            assert!(!text.windows(7).any(|w| w == b"SeaBIOS"), "the firmware did not start again");
            break;
        }
        assert!(Instant::now() < deadline, "the restored guest printed {:?}", String::from_utf8_lossy(&text));
        std::thread::sleep(Duration::from_millis(20));
    }
    two.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn damaged_snapshots_and_unsupported_vms_are_refused_saying_why() {
    assert!(Path::new("/dev/kvm").exists(), "these tests need /dev/kvm");
    let dir = tmpdir("damaged");
    let kernel = dir.join("kernel");
    std::fs::write(&kernel, bzimage_with(&print_alphabet(0x2000))).unwrap();
    let mut cfg = VmConfig::new(&kernel);
    cfg.memory_bytes = 64 << 20;
    cfg.serial = SerialMode::File(dir.join("one.log"));
    cfg.api_socket = Some(dir.join("one.sock"));
    let mut one = start(cfg.clone());
    wait_for(&dir.join("one.log"), 5);
    let good = dir.join("good");
    let r = one.api.call(&Request::Snapshot { path: good.clone(), resume: true, fd: false, note: None, disk_snapshot: None }).unwrap();
    assert!(r.ok, "{r:?}");
    // Resumed: it prints on.
    let n = std::fs::read(dir.join("one.log")).unwrap().len();
    wait_for(&dir.join("one.log"), n + 3);
    one.stop();

    // Virtio devices' state goes across: saved again from the restored VM, it is the same.
    let mut with_virtio = cfg.clone();
    (with_virtio.rng, with_virtio.balloon) = (true, true);
    with_virtio.console = Some(SerialMode::Null);
    with_virtio.disks.push(rvirt_vmm::config::DiskConfig::cdrom(PathBuf::new()));
    with_virtio.api_socket = Some(dir.join("virtio.sock"));
    let mut virtio = start(with_virtio);
    let r = virtio.api.call(&Request::Balloon { target_bytes: 32 << 20 }).unwrap();
    assert!(r.ok, "{r:?}");
    // A disc inserted through the API is in the restored VM's drive.
    std::fs::write(dir.join("disc.iso"), vec![0u8; 2048 * 16]).unwrap();
    let r = virtio.api.call(&Request::ChangeMedia { device: "disk0".into(), path: Some(dir.join("disc.iso")), force: false, fd: false }).unwrap();
    assert!(r.ok, "{r:?}");
    let r = virtio.api.call(&Request::Snapshot { path: dir.join("virtio-snap"), resume: false, fd: false, note: None, disk_snapshot: None }).unwrap();
    assert!(r.ok, "{r:?}");
    virtio.stop();
    let mut again = restore_cfg(&dir, &dir.join("virtio-snap"), "virtio-again");
    again.console = Some(SerialMode::Null);
    let mut virtio = start(again);
    let r = virtio.api.call(&Request::Snapshot { path: dir.join("virtio-snap2"), resume: false, fd: false, note: None, disk_snapshot: None }).unwrap();
    assert!(r.ok, "{r:?}");
    virtio.stop();
    let (one_state, _, _) = rvirt_vmm::snapshot::read(&dir.join("virtio-snap")).unwrap();
    let (two_state, _, _) = rvirt_vmm::snapshot::read(&dir.join("virtio-snap2")).unwrap();
    for id in ["rng", "balloon", "console", "scsi0"] {
        assert_eq!(one_state.devices.get(id), two_state.devices.get(id), "{id}");
    }
    assert_eq!(two_state.config.console, Some(SerialMode::Null));
    assert_eq!((one_state.config.disks[0].path.clone(), two_state.config.disks[0].path.clone()), (dir.join("disc.iso"), dir.join("disc.iso")));
    // The balloon's target, set through the API, is the restored device's.
    let balloon: rvirt_virtio_devices::transport::VirtioPciState = rvirt_vmm::state_file::from_bytes(&two_state.devices["balloon"]).unwrap();
    assert_eq!(balloon.device, rvirt_virtio_devices::DeviceState::Balloon { target_pages: (32 << 20) >> 12, actual_pages: 0 });
    // Devices given again must be the snapshot's.
    let mut wrong = restore_cfg(&dir, &dir.join("virtio-snap"), "wrong");
    wrong.disks.push(rvirt_vmm::config::DiskConfig::plain(dir.join("kernel")));
    let e = rvirt_vmm::run(&wrong).unwrap_err().to_string();
    assert!(e.contains("1 disks given; the snapshot's VM has 1") || e.contains("disk0 is Scsi/Cdrom"), "{e}");

    let copy = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["state", "memory"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        d
    };
    let fails = |snap: &Path, want: &str| {
        let e = rvirt_vmm::run(&restore_cfg(&dir, snap, "bad")).unwrap_err().to_string();
        assert!(e.contains(want), "{}: wanted '{want}' in: {e}", snap.display());
        assert!(e.contains(&snap.display().to_string()) || want.contains("memory"), "the error names the snapshot: {e}");
    };
    let state_len = std::fs::metadata(good.join("state")).unwrap().len();
    let truncated = copy("truncated");
    std::fs::OpenOptions::new().write(true).open(truncated.join("state")).unwrap().set_len(state_len / 2).unwrap();
    fails(&truncated, "truncated");
    let corrupted = copy("corrupted");
    let mut bytes = std::fs::read(corrupted.join("state")).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(corrupted.join("state"), &bytes).unwrap();
    fails(&corrupted, "corrupted");
    let foreign = copy("foreign");
    let mut bytes = std::fs::read(foreign.join("state")).unwrap();
    bytes[8] = 99;
    std::fs::write(foreign.join("state"), &bytes).unwrap();
    fails(&foreign, "format version 99");
    let short_memory = copy("short-memory");
    std::fs::OpenOptions::new().write(true).open(short_memory.join("memory")).unwrap().set_len(1 << 20).unwrap();
    fails(&short_memory, "memory holds 1048576 bytes");
    fails(&dir.join("missing"), "No such file");
    std::fs::write(dir.join("not-a-snapshot"), b"x").unwrap();
    let not = dir.join("not");
    std::fs::create_dir_all(&not).unwrap();
    std::fs::write(not.join("state"), b"QFI\xfb this is a qcow2 header, not a state file").unwrap();
    std::fs::write(not.join("memory"), b"").unwrap();
    fails(&not, "not an rvirt VM state file");
    // The good one still restores after all that.
    let mut again = start(restore_cfg(&dir, &good, "again"));
    wait_for(&dir.join("again.log"), 3);
    assert!(again.api.call(&Request::Status).unwrap().ok);
    again.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same through the `rvirt-vmm` binary, as rvirtd runs it: every
/// thread under its seccomp list (kill on a forbidden call).
#[test]
fn the_binary_snapshots_and_restores_under_its_seccomp_lists() {
    assert!(Path::new("/dev/kvm").exists(), "these tests need /dev/kvm");
    let dir = tmpdir("binary");
    let kernel = dir.join("kernel");
    std::fs::write(&kernel, bzimage_with(&print_alphabet(0x2000))).unwrap();
    let vmm = env!("CARGO_BIN_EXE_rvirt-vmm");
    let spawn = |args: &[&str], name: &str| spawn_binary(&dir, args, name);
    let (mut one, mut api) = spawn(&["--kernel", kernel.to_str().unwrap(), "--memory", "64M"], "one");
    wait_for(&dir.join("one.log"), 10);
    let snap = dir.join("snap");
    let r = api.call(&Request::Snapshot { path: snap.clone(), resume: false, fd: false, note: None, disk_snapshot: None }).unwrap();
    assert!(r.ok, "{r:?}\n{}", std::fs::read_to_string(dir.join("one.err")).unwrap_or_default());
    let last = *std::fs::read(dir.join("one.log")).unwrap().last().unwrap();
    assert!(api.call(&Request::Stop).unwrap().ok);
    assert!(one.wait().unwrap().success(), "{}", std::fs::read_to_string(dir.join("one.err")).unwrap_or_default());

    for (name, extra) in [("two", None), ("three", Some("--restore-copy-memory"))] {
        let mut args = vec!["--restore", snap.to_str().unwrap()];
        args.extend(extra);
        let (mut child, mut api) = spawn(&args, name);
        let out = wait_for(&dir.join(format!("{name}.log")), 5);
        assert_eq!(out[0], next_letter(last), "{name}: {:?}", String::from_utf8_lossy(&out));
        assert!(api.call(&Request::Stop).unwrap().ok);
        let status = child.wait().unwrap();
        assert!(status.success(), "{name}: {status:?} {}", std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default());
    }
    // --restore takes the VM's shape from the snapshot, not from the command line.
    let o = std::process::Command::new(vmm).args(["--restore", snap.to_str().unwrap(), "--memory", "1G"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("cannot be used with"), "{o:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_snapshot_into_a_descriptor_is_one_file_with_the_disks_internal_snapshots() {
    use std::os::fd::AsFd;
    assert!(Path::new("/dev/kvm").exists(), "these tests need /dev/kvm");
    let dir = tmpdir("onefile");
    let kernel = dir.join("kernel");
    std::fs::write(&kernel, bzimage_with(&print_alphabet(0x2000))).unwrap();
    let (qcow2, raw) = (dir.join("disk.qcow2"), dir.join("disk.raw"));
    drop(rvirt_block::Qcow2Image::create(&qcow2, 8 << 20, &Default::default()).unwrap());
    drop(rvirt_block::RawImage::create(&raw, 1 << 20).unwrap());
    let vmm = env!("CARGO_BIN_EXE_rvirt-vmm");
    let spawn = |args: &[&str], name: &str| spawn_binary(&dir, args, name);
    let disk = format!("path={},format=qcow2", qcow2.display());
    let (mut one, mut api) = spawn(&["--kernel", kernel.to_str().unwrap(), "--memory", "64M", "--disk", &disk], "one");
    wait_for(&dir.join("one.log"), 10);
    let saved = dir.join("vm.save");
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&saved).unwrap();
    let req = Request::Snapshot { path: saved.clone(), resume: true, fd: true, note: Some("<domain/>".into()), disk_snapshot: Some("s1".into()) };
    let r = api.call_with_fd(&req, file.as_fd()).unwrap();
    assert!(r.ok, "{r:?}\n{}", std::fs::read_to_string(dir.join("one.err")).unwrap_or_default());
    // One file: the note, the state, the memory; the disk holds the internal snapshot.
    let layout = rvirt_api::saved::Layout::read(&file).unwrap();
    assert_eq!((layout.read_note(&file).unwrap().as_str(), layout.memory_len), ("<domain/>", 64 << 20));
    // The same name again: refused, and nothing of the first is lost.
    let again = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.join("again.save")).unwrap();
    let r = api.call_with_fd(&req, again.as_fd()).unwrap();
    assert!(!r.ok && r.error.as_deref().unwrap_or("").contains("'s1' already exists"), "{r:?}");
    assert!(rvirt_api::saved::Layout::read(&again).is_err(), "a failed snapshot leaves no saved VM");
    // Without a descriptor sent, refused.
    let r = api.call(&Request::Snapshot { path: saved.clone(), resume: true, fd: true, note: None, disk_snapshot: None }).unwrap();
    assert!(!r.ok && r.error.as_deref().unwrap_or("").contains("no descriptor"), "{r:?}");
    // The letter the guest had printed when it was saved (it runs on after `resume`).
    assert!(api.call(&Request::Stop).unwrap().ok);
    assert!(one.wait().unwrap().success());
    let names: Vec<String> = rvirt_block::Qcow2Image::open(&qcow2, true).unwrap().snapshots().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s1"]);

    // Restored from the file (it continues), by path and as a passed descriptor.
    let (mut two, mut api) = spawn(&["--restore", saved.to_str().unwrap(), "--disk", &disk], "two");
    let out = wait_for(&dir.join("two.log"), 5);
    assert!(out.windows(2).all(|w| w[1] == next_letter(w[0])), "{:?}", String::from_utf8_lossy(&out));
    assert!(api.call(&Request::Stop).unwrap().ok);
    assert!(two.wait().unwrap().success(), "{}", std::fs::read_to_string(dir.join("two.err")).unwrap_or_default());

    // A raw writable disk refuses an internal snapshot before the VM pauses.
    let rawdisk = format!("path={},format=raw", raw.display());
    let (mut three, mut api) = spawn(&["--kernel", kernel.to_str().unwrap(), "--memory", "64M", "--disk", &rawdisk], "three");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.join("raw.save")).unwrap();
    let r = api.call_with_fd(&req, f.as_fd()).unwrap();
    assert!(!r.ok && r.error.as_deref().unwrap_or("").contains("is not qcow2"), "{r:?}");
    assert_eq!(api.call(&Request::Status).unwrap().status.unwrap().state, rvirt_api::RunState::Running);
    assert!(api.call(&Request::Stop).unwrap().ok);
    assert!(three.wait().unwrap().success());
    // A file that is not a saved VM is refused by --restore, saying why.
    std::fs::write(dir.join("junk"), b"not a saved vm at all, just text that is long enough to hold a header..").unwrap();
    let o = std::process::Command::new(vmm).args(["--restore", dir.join("junk").to_str().unwrap()]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no saved-VM header"), "{o:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
