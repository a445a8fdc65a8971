//! Tiny hand-made guests run on this host's real /dev/kvm through the whole
//! VMM: kernel loading, vCPU setup, PIO exits, the UART and the ACPI/i8042
//! registers. (Stock Linux guests need the nested lab; see crates/lab.)
//!
//! The guests are 64-bit code placed at the bzImage 64-bit entry point, so
//! they start in long mode exactly as a real kernel does.

use std::path::PathBuf;

use rvirt_lab::guests::{bzimage_with, out_byte, power_off, print, HALT_FOREVER, TRIPLE_FAULT};
use rvirt_vmm::{OnReboot, SerialMode, VmConfig, VmExit};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rvirt-host-kvm-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A 64 MiB VM running `code`, in a fresh directory holding its kernel,
/// its serial output (`serial.log`) and its API socket (`api.sock`).
fn guest_config(name: &str, code: &[u8], on_reboot: OnReboot) -> (PathBuf, VmConfig) {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (the project's CI machines have it)"
    );
    let dir = tmpdir(name);
    let kernel = dir.join("kernel");
    std::fs::write(&kernel, bzimage_with(code)).unwrap();
    let mut cfg = VmConfig::new(&kernel);
    cfg.memory_bytes = 64 << 20;
    cfg.serial = SerialMode::File(dir.join("serial.log"));
    cfg.on_reboot = on_reboot;
    cfg.api_socket = Some(dir.join("api.sock"));
    (dir, cfg)
}

/// Waits up to a minute for the guest's serial output to reach `len` bytes.
fn wait_for_output(log: &std::path::Path, len: usize, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string(log).unwrap_or_default().len() < len {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A guest running on its own thread, with its control API connected.
struct RunningGuest {
    dir: PathBuf,
    log: PathBuf,
    vmm: std::thread::JoinHandle<rvirt_vmm::Result<VmExit>>,
    api: rvirt_api::ApiClient,
}

impl RunningGuest {
    /// Starts `code` and waits until its serial output reaches `len` bytes.
    fn start(name: &str, code: &[u8], on_reboot: OnReboot, len: usize, what: &str) -> Self {
        let (dir, cfg) = guest_config(name, code, on_reboot);
        let (log, sock) = (dir.join("serial.log"), dir.join("api.sock"));
        let vmm = std::thread::spawn(move || rvirt_vmm::run(&cfg));
        wait_for_output(&log, len, what);
        let api = rvirt_api::ApiClient::connect(&sock, std::time::Duration::from_secs(10)).unwrap();
        Self { dir, log, vmm, api }
    }

    /// Stops the VM through the API, checks it ended as stopped, and
    /// returns its serial output.
    fn stop(mut self) -> String {
        assert!(self.api.call(&rvirt_api::Request::Stop).unwrap().ok);
        assert_eq!(self.vmm.join().unwrap().unwrap(), VmExit::Stopped);
        let text = std::fs::read_to_string(&self.log).unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
        text
    }
}

fn run_guest(name: &str, code: Vec<u8>, on_reboot: OnReboot) -> (VmExit, String) {
    let (dir, cfg) = guest_config(name, &code, on_reboot);
    let log = dir.join("serial.log");
    let exit = rvirt_vmm::run(&cfg).unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!dir.join("api.sock").exists(), "API socket is removed on exit");
    let _ = std::fs::remove_dir_all(&dir);
    (exit, text)
}

#[test]
fn port_io_reaches_the_uart_and_acpi_s5_powers_off() {
    let mut code = print(b"hello from a KVM guest\n");
    code.extend(power_off());
    code.extend(HALT_FOREVER);
    let (exit, text) = run_guest("poweroff", code, OnReboot::Restart);
    assert_eq!(exit, VmExit::PowerOff);
    assert_eq!(text, "hello from a KVM guest\n");
}

/// The speaker port is KVM's in-kernel one (registered only with
/// KVM_PIT_SPEAKER_DUMMY, despite the name): without it port 0x61 reads 0,
/// the output of channel 2 never rises and firmware calibrating its TSC
/// there spins for ever (SeaBIOS does when kvmclock is not stable).
#[test]
fn pit_channel_2_output_rises_through_the_speaker_port() {
    let (exit, text) = run_guest("pit-channel-2", rvirt_lab::guests::pit_channel2_probe(), OnReboot::Exit);
    assert_eq!(exit, VmExit::PowerOff);
    assert_eq!(text, "T2OUT");
}

#[test]
fn i8042_reset_exits_when_asked_to() {
    let mut code = print(b"R");
    code.extend(out_byte(0x64, 0xfe));
    code.extend(HALT_FOREVER);
    let (exit, text) = run_guest("i8042-reset", code, OnReboot::Exit);
    assert_eq!(exit, VmExit::Reset);
    assert_eq!(text, "R");
}

#[test]
fn acpi_reset_register_ends_the_vmm_with_on_reboot_exit() {
    let mut code = print(b"A");
    code.extend(out_byte(0x602, 1)); // FADT RESET_REG, RESET_VALUE
    code.extend(HALT_FOREVER);
    let (exit, text) = run_guest("acpi-reset", code, OnReboot::Exit);
    assert_eq!(exit, VmExit::Reset);
    assert_eq!(text, "A");
}

#[test]
fn reboot_with_restart_boots_again_on_fresh_devices() {
    // Each boot reads CMOS byte 0x40: zero on a fresh machine. It prints
    // "B", sets the byte and resets. If devices survived a restart, the next
    // boot would see the byte set and print "stale" instead.
    let mut body = print(b"B");
    body.extend([0xb0, 0x40, 0xe6, 0x70, 0xb0, 0x01, 0xe6, 0x71]); // CMOS[0x40] = 1
    body.extend(out_byte(0x602, 1));
    body.extend(HALT_FOREVER);
    let mut stale = print(b"stale");
    stale.extend(HALT_FOREVER);
    // mov al,0x40; out 0x70,al; in al,0x71; test al,al; jnz stale
    let mut code = vec![0xb0, 0x40, 0xe6, 0x70, 0xe4, 0x71, 0x84, 0xc0, 0x75, body.len() as u8];
    code.extend(body);
    code.extend(stale);

    let guest = RunningGuest::start("restart", &code, OnReboot::Restart, 3, "the guest did not boot three times");
    let text = guest.stop();
    assert!(text.starts_with("BBB") && !text.contains("stale"), "{text}");
}

#[test]
fn triple_fault_is_reported_as_a_crash() {
    // ud2 with no IDT: #UD -> #DF -> triple fault.
    let mut code = print(b"X");
    code.extend(TRIPLE_FAULT);
    let (exit, text) = run_guest("triple", code, OnReboot::Restart);
    assert!(matches!(exit, VmExit::Crashed(ref why) if why.contains("triple fault")), "{exit:?}");
    assert_eq!(text, "X");
}

#[test]
fn vcpu_state_reports_a_halted_guest_and_keeps_it_running() {
    let mut code = print(b"S");
    code.extend(HALT_FOREVER);
    let mut guest = RunningGuest::start("vcpu-state", &code, OnReboot::Restart, 1, "the guest did not print");
    let api = &mut guest.api;
    let r = api.call(&rvirt_api::Request::VcpuState).unwrap();
    assert!(r.ok, "{r:?}");
    let reports = r.vcpus.unwrap();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(reports[0].contains("vCPU 0 state") && reports[0].contains("rip=") && reports[0].contains("run state:"), "{}", reports[0]);
    let status = api.call(&rvirt_api::Request::Status).unwrap().status.unwrap();
    assert_eq!(status.state, rvirt_api::RunState::Running, "a report must not leave the VM paused");
    // A paused VM stays paused.
    assert!(api.call(&rvirt_api::Request::Pause).unwrap().ok);
    assert!(api.call(&rvirt_api::Request::VcpuState).unwrap().ok);
    assert_eq!(api.call(&rvirt_api::Request::Status).unwrap().status.unwrap().state, rvirt_api::RunState::Paused);
    guest.stop();
}

#[test]
fn a_guest_flooding_the_log_is_rate_limited_and_capped() {
    let dir = tmpdir("flood");
    let kernel = dir.join("flood.bzImage");
    // Asks for sleep state S1 (unsupported: a warning each time) in a tight loop:
    // mov dx, 0x600; mov al, SLP_EN | S1; top: out dx, al; jmp top
    let code = [0x66, 0xba, 0x00, 0x06, 0xb0, (1 << 5) | (1 << 2), 0xee, 0xeb, 0xfd];
    std::fs::write(&kernel, bzimage_with(&code)).unwrap();
    let log = dir.join("vmm.log");
    let mut vmm = std::process::Command::new(env!("CARGO_BIN_EXE_rvirt-vmm"))
        .args(["--memory", "64M", "--serial", "null", "--kernel"])
        .arg(&kernel)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let _ = vmm.kill();
    let _ = vmm.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let warnings = text.lines().filter(|l| l.contains("unsupported sleep type")).count();
    assert!(warnings >= 10, "the guest's warnings do reach the log ({warnings}):\n{text}");
    assert!(text.len() < 256 << 10, "{} bytes of log in 3 s", text.len());
    assert!(text.contains("lines dropped") || warnings < 200, "dropped lines are counted:\n{}", &text[text.len().saturating_sub(500)..]);
}

/// The VMM process's peak resident set (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).expect("VmHWM in /proc/PID/status");
    kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

#[test]
fn a_balloon_chain_bomb_from_the_guest_cannot_grow_the_vmm() {
    use rvirt_lab::guests::{virtio_balloon_chain_bomb, BOMB_AT_LIMIT_BYTES};
    let dir = tmpdir("balloon-bomb");
    let kernel = dir.join("bomb.bzImage");
    std::fs::write(&kernel, bzimage_with(&virtio_balloon_chain_bomb())).unwrap();
    let (serial, sock) = (dir.join("serial.log"), dir.join("api.sock"));
    let mut vmm = std::process::Command::new(env!("CARGO_BIN_EXE_rvirt-vmm"))
        .args(["--memory", "64M", "--balloon", "--serial"])
        .arg(format!("file={}", serial.display()))
        .arg("--api-socket")
        .arg(&sock)
        .arg("--kernel")
        .arg(&kernel)
        .stderr(std::fs::File::create(dir.join("vmm.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let out = loop {
        let out = std::fs::read_to_string(&serial).unwrap_or_default();
        if out.ends_with('\n') || std::time::Instant::now() > deadline {
            break out;
        }
        assert!(vmm.try_wait().unwrap().is_none(), "the VMM ended: {}", std::fs::read_to_string(dir.join("vmm.log")).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(out, "used 2\n", "the device returns both chains and stays up");
    let peak = peak_rss(vmm.id());
    let mut api = rvirt_api::ApiClient::connect(&sock, std::time::Duration::from_secs(10)).unwrap();
    let stats = api.call(&rvirt_api::Request::Stats).unwrap().stats.unwrap();
    let balloon = stats.devices.iter().find(|(name, _)| name.contains("balloon")).expect("balloon counters").1;
    let _ = vmm.kill();
    let _ = vmm.wait();
    // The 6 GiB list is refused whole; the list at the limit is served in
    // chunks, each naming one page: released once per 4,096-PFN chunk.
    assert_eq!(balloon.errors, 1, "{balloon:?}");
    assert_eq!(balloon.requests, 1, "{balloon:?}");
    assert_eq!(balloon.bytes_from_guest, u64::from(BOMB_AT_LIMIT_BYTES / 4 / 4096) * 4096, "{balloon:?}");
    // 64 MiB of guest (32 MiB of it touched) plus the VMM's own few MiB.
    assert!(peak < 128 << 20, "the VMM's peak RSS reached {} MiB", peak >> 20);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs rvirt-vmm through Debian's SeaBIOS with `disks` (raw images in
/// `dir`) until it exits or a minute passes; returns (exit status,
/// serial output, VMM log).
fn run_firmware(dir: &std::path::Path, disks: &[(&str, Vec<u8>, Option<u16>)], args: &[&str]) -> (Option<i32>, String, String) {
    let (serial, log) = (dir.join("serial.log"), dir.join("vmm.log"));
    let _ = std::fs::remove_file(&serial);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rvirt-vmm"));
    cmd.args(["--memory", "128M", "--serial"]).arg(format!("file={}", serial.display())).args(args);
    for (name, content, boot) in disks {
        let p = dir.join(name);
        let mut image = content.clone();
        image.resize(1 << 20, 0);
        std::fs::write(&p, image).unwrap();
        let boot = boot.map(|b| format!(",boot={b}")).unwrap_or_default();
        cmd.arg("--disk").arg(format!("path={},format=raw{boot}", p.display()));
    }
    let mut vmm = cmd.stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = vmm.try_wait().unwrap() {
            break s.code();
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("No bootable device") || std::time::Instant::now() > deadline {
            let _ = vmm.kill();
            let _ = vmm.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(&serial).unwrap_or_default(), std::fs::read_to_string(&log).unwrap())
}

#[test]
fn firmware_boots_the_disk_the_boot_order_names() {
    use rvirt_lab::guests::{boot_sector, real_mode_print_and_power_off};
    assert!(std::path::Path::new(rvirt_vmm::config::DEFAULT_FIRMWARE).exists(), "Debian's seabios package (crates/lab/setup.sh installs it)");
    let dir = tmpdir("firmware-order");
    let disk = |tag: &str| boot_sector(&real_mode_print_and_power_off(format!("<booted {tag}>").as_bytes()));
    for (first, second) in [("a", "b"), ("b", "a")] {
        let order = |tag: &str| Some(if tag == first { 1 } else { 2 });
        let (status, serial, log) = run_firmware(&dir, &[("a.raw", disk("a"), order("a")), ("b.raw", disk("b"), order("b"))], &[]);
        assert_eq!(status, Some(0), "the boot sector powers off through ACPI:\n{log}\n{serial}");
        assert!(serial.contains("SeaBIOS") && serial.contains("Booting from Hard Disk"), "firmware on the serial console:\n{serial}");
        // SeaBIOS's serial console flushes its own text lazily, so it may
        // land inside the boot sector's; compare without its punctuation.
        let plain: String = serial.chars().filter(|c| !matches!(c, '.' | '\r' | '\n' | ' ')).collect();
        assert!(plain.contains(&format!("<booted{first}>")) && !plain.contains(&format!("<booted{second}>")), "boot order {first} then {second}:\n{serial}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_disk_without_a_bootloader_is_reported_not_spun_on() {
    let dir = tmpdir("firmware-nothing");
    let start = std::time::Instant::now();
    let (status, serial, log) = run_firmware(&dir, &[("blank.raw", vec![0u8; 512], None)], &[]);
    assert_eq!(status, None, "the VMM was still waiting (and was stopped by the test)");
    assert!(log.contains("WARN") && log.contains("No bootable device"), "a warning in the VMM log:\n{log}");
    assert!(serial.contains("No bootable device"), "and on the console:\n{serial}");
    assert!(start.elapsed() < std::time::Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_boot_menu_is_offered_only_when_asked_for() {
    use rvirt_lab::guests::{boot_sector, real_mode_print_and_power_off};
    let dir = tmpdir("firmware-menu");
    let disk = || vec![("a.raw", boot_sector(&real_mode_print_and_power_off(b"<booted>")), None)];
    let (status, serial, log) = run_firmware(&dir, &disk(), &["--boot-menu", "300"]);
    assert_eq!(status, Some(0), "{log}\n{serial}");
    assert!(serial.contains("Press ESC for boot menu"), "the menu's prompt on the console:\n{serial}");
    let (status, serial, log) = run_firmware(&dir, &disk(), &[]);
    assert_eq!(status, Some(0), "{log}\n{serial}");
    assert!(!serial.contains("boot menu"), "no menu by default (it would hold every boot):\n{serial}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SeaBIOS's own virtio-scsi driver (INQUIRY, TEST UNIT READY, READ
/// CAPACITY, READ(10) through our SCSI units) boots a disk on the SCSI
/// controller, scanning past the targets that answer BAD_TARGET; the boot
/// order names SCSI units by controller slot and target.
#[test]
fn firmware_boots_a_disk_on_the_scsi_controller() {
    use rvirt_lab::guests::{boot_sector, real_mode_print_and_power_off};
    let dir = tmpdir("firmware-scsi");
    let image = |tag: &str| {
        let mut s = boot_sector(&real_mode_print_and_power_off(format!("<booted {tag}>").as_bytes()));
        s.resize(1 << 20, 0);
        s
    };
    let (blk, scsi) = (dir.join("blk.raw"), dir.join("scsi.raw"));
    std::fs::write(&blk, image("virtio-blk")).unwrap();
    std::fs::write(&scsi, image("virtio-scsi")).unwrap();
    let empty_cd = "--disk=media=cdrom".to_string();
    for (blk_boot, scsi_boot, want) in [(None, None, "virtio-scsi"), (Some(1), Some(0), "virtio-scsi"), (Some(0), Some(1), "virtio-blk")] {
        let spec = |p: &std::path::Path, extra: &str, b: Option<u16>| {
            format!("--disk=path={},format=raw{extra}{}", p.display(), b.map(|b| format!(",boot={b}")).unwrap_or_default())
        };
        // Without indexes SeaBIOS boots its first hard disk; make that the SCSI one by leaving virtio-blk out.
        let mut args = vec![empty_cd.clone(), spec(&scsi, ",bus=scsi", scsi_boot)];
        if blk_boot.is_some() {
            args.push(spec(&blk, "", blk_boot));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, serial, log) = run_firmware(&dir, &[], &args);
        assert_eq!(status, Some(0), "{log}\n{serial}");
        let plain: String = serial.chars().filter(|c| !matches!(c, '.' | '\r' | '\n' | ' ')).collect();
        assert!(plain.contains(&format!("<booted{}>", want.replace(' ', ""))), "want {want}:\n{serial}\n{log}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// cache=none on qcow2: the image is opened O_DIRECT and its clusters and
/// tables read through aligned bounce buffers; SeaBIOS boots from it.
#[test]
fn firmware_boots_a_qcow2_disk_opened_with_o_direct() {
    use rvirt_lab::guests::{boot_sector, real_mode_print_and_power_off};
    let dir = tmpdir("firmware-qcow2-direct");
    let mut sector = boot_sector(&real_mode_print_and_power_off(b"<booted qcow2>"));
    sector.resize(1 << 20, 0);
    let raw = dir.join("boot.raw");
    std::fs::write(&raw, sector).unwrap();
    let qcow2 = dir.join("boot.qcow2");
    let made = std::process::Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096"]).arg(&raw).arg(&qcow2).status().unwrap();
    assert!(made.success());
    // A persistent bitmap (qemu-img's): the VMM holds it in use while running and stores it at exit.
    let added = std::process::Command::new("qemu-img").args(["bitmap", "--add"]).arg(&qcow2).arg("backup").status().unwrap();
    assert!(added.success());
    let arg = format!("--disk=path={},format=qcow2,direct=on", qcow2.display());
    let (status, serial, log) = run_firmware(&dir, &[], &[&arg]);
    assert_eq!(status, Some(0), "{log}\n{serial}");
    let plain: String = serial.chars().filter(|c| !matches!(c, '.' | '\r' | '\n' | ' ')).collect();
    assert!(plain.contains("<bootedqcow2>"), "{serial}\n{log}");
    let info = std::process::Command::new("qemu-img").args(["info", "--output=json"]).arg(&qcow2).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format-specific"]["data"]["bitmaps"], serde_json::json!([{"flags": ["auto"], "name": "backup", "granularity": 4096}]), "stored, not left in use");
    let check = std::process::Command::new("qemu-img").arg("check").arg(&qcow2).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    let _ = std::fs::remove_dir_all(&dir);
}

/// El Torito: SeaBIOS boots a CD-ROM drive's disc (a no-emulation boot
/// image in a plain ISO and in a hybrid one, made with Debian's xorriso),
/// and the CMOS boot order (`--boot-order`) picks CD or disk.
#[test]
fn firmware_boots_el_torito_discs_and_the_boot_order_picks_cd_or_disk() {
    use rvirt_lab::guests::{boot_sector, el_torito_iso, real_mode_print_and_power_off, without_firmware_punctuation};
    let dir = tmpdir("firmware-cd");
    let mut disk = boot_sector(&real_mode_print_and_power_off(b"<booted from disk>"));
    disk.resize(1 << 20, 0);
    std::fs::write(dir.join("disk.raw"), disk).unwrap();
    let (plain, hybrid) = (dir.join("plain.iso"), dir.join("hybrid.iso"));
    let code = real_mode_print_and_power_off(b"<booted from CD>");
    el_torito_iso(&code, &plain, false).unwrap();
    el_torito_iso(&code, &hybrid, true).unwrap();
    let disk = format!("--disk=path={},format=raw", dir.join("disk.raw").display());
    for (cd, order, want) in [(&plain, "d", "CD"), (&hybrid, "d", "CD"), (&plain, "dc", "CD"), (&plain, "cd", "disk")] {
        let cd = format!("--disk=path={},media=cdrom", cd.display());
        let args = [cd.as_str(), disk.as_str(), "--boot-order", order];
        let (status, serial, log) = run_firmware(&dir, &[], &args);
        assert_eq!(status, Some(0), "{args:?}\n{log}\n{serial}");
        let plain_text = without_firmware_punctuation(&serial);
        assert!(plain_text.contains(&format!("<booted from {want}>")), "{args:?} boots the {want}:\n{serial}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A disc inserted through the API stays in the drive across a guest reset,
/// as in a real drive: SeaBIOS finds nothing to boot, resets after
/// --reboot-timeout, and the next firmware run boots the disc put in meanwhile.
#[test]
fn an_inserted_disc_stays_in_the_drive_across_a_reset() {
    use rvirt_lab::guests::{el_torito_iso, real_mode_print_and_power_off, without_firmware_punctuation};
    let dir = tmpdir("media-reset");
    let iso = dir.join("late.iso");
    el_torito_iso(&real_mode_print_and_power_off(b"<booted the inserted disc>"), &iso, false).unwrap();
    let (serial, sock) = (dir.join("serial.log"), dir.join("api.sock"));
    let mut vmm = std::process::Command::new(env!("CARGO_BIN_EXE_rvirt-vmm"))
        .args(["--memory", "64M", "--disk", "media=cdrom", "--boot-order", "d", "--reboot-timeout", "300", "--serial"])
        .arg(format!("file={}", serial.display()))
        .arg("--api-socket")
        .arg(&sock)
        .stderr(std::fs::File::create(dir.join("vmm.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // Wait for the first failed boot, then insert.
    while !std::fs::read_to_string(&serial).unwrap_or_default().contains("No bootable device") {
        assert!(std::time::Instant::now() < deadline, "no first boot attempt");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut api = rvirt_api::ApiClient::connect(&sock, std::time::Duration::from_secs(5)).unwrap();
    let req = rvirt_api::Request::ChangeMedia { device: "disk0".into(), path: Some(iso.clone()), force: false, fd: false };
    assert!(api.call(&req).unwrap().ok);
    let status = loop {
        if let Some(s) = vmm.try_wait().unwrap() {
            break s.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = vmm.kill();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    let plain = without_firmware_punctuation(&text);
    let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
    assert_eq!(status, Some(0), "the disc booted after the reset and powered off:\n{text}\n{log}");
    assert!(plain.contains("<booted the inserted disc>"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A hand-made driver with the balloon's statistics queue: the device holds
/// its buffer, hands it back whenever the API asks for figures, and the
/// driver's fresh figures arrive as the next generation; a target is
/// acknowledged through `actual`, as the status reports.
#[test]
fn the_balloon_statistics_queue_gives_fresh_figures_on_each_request() {
    use rvirt_lab::guests::{virtio_balloon_stats_driver, STATS_AVAILABLE, STATS_FREE, STATS_TOTAL};
    let (dir, mut cfg) = guest_config("balloon-stats", &virtio_balloon_stats_driver(), OnReboot::Exit);
    cfg.balloon = true;
    let sock = dir.join("api.sock");
    let vmm = std::thread::spawn(move || rvirt_vmm::run(&cfg));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline && !vmm.is_finished(), "the VMM did not come up");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut api = rvirt_api::ApiClient::connect(&sock, std::time::Duration::from_secs(10)).unwrap();
    let stats = |api: &mut rvirt_api::ApiClient| api.call(&rvirt_api::Request::BalloonStats).unwrap().balloon_stats.unwrap();
    let mut s = stats(&mut api);
    while s.generation == 0 {
        assert!(std::time::Instant::now() < deadline, "the driver never posted its figures");
        std::thread::sleep(std::time::Duration::from_millis(20));
        s = stats(&mut api);
    }
    assert_eq!(s.values.get("free-memory"), Some(&STATS_FREE), "{s:?}");
    assert_eq!(s.values.get("total-memory"), Some(&STATS_TOTAL), "{s:?}");
    assert_eq!(s.values.get("available-memory"), Some(&STATS_AVAILABLE), "{s:?}");
    assert!(s.updated_unix > 1_700_000_000, "{s:?}");
    // Each request hands the buffer back; the driver counts the times it refilled it.
    for _ in 0..3 {
        let before = s.generation;
        while s.generation == before {
            assert!(std::time::Instant::now() < deadline, "no fresh figures after generation {before}");
            std::thread::sleep(std::time::Duration::from_millis(5));
            s = stats(&mut api);
        }
        assert_eq!(s.values.get("major-faults"), Some(&(s.generation - 1)), "generation {} is the driver's refill number {}: {s:?}", s.generation, s.generation - 1);
    }
    assert!(api.call(&rvirt_api::Request::Balloon { target_bytes: 16 << 20 }).unwrap().ok);
    let status = |api: &mut rvirt_api::ApiClient| api.call(&rvirt_api::Request::Status).unwrap().status.unwrap().balloon.unwrap();
    while status(&mut api).actual_bytes != 16 << 20 {
        assert!(std::time::Instant::now() < deadline, "the target was not acknowledged");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(stats(&mut api).actual_bytes, 16 << 20);
    assert!(api.call(&rvirt_api::Request::Stop).unwrap().ok);
    assert_eq!(vmm.join().unwrap().unwrap(), VmExit::Stopped);
    let _ = std::fs::remove_dir_all(&dir);
}
