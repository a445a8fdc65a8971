//! Domain lifecycles with real rvirt-vmm processes running hand-made guests
//! on this host's /dev/kvm (stock Linux guests: crates/lab/tests/rvirtd.rs).

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{domain_xml, kernels, scratch, Daemon};

/// Whether `pid` runs (a zombie nobody reaped yet does not).
fn alive(pid: i32) -> bool {
    rvirtd::process::proc_stat(pid as u32).is_some()
}

#[test]
fn a_domain_runs_pauses_resumes_and_is_destroyed() {
    let dir = scratch("life");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let serial = dir.join("serial-idle.log");
    let f = d.xml_file("idle", &domain_xml("idle", &k.idle, &format!("  <devices><serial type='file'><source path='{}'/></serial></devices>", serial.display())));
    d.ok(&["define", f.to_str().unwrap()]);
    assert_eq!(d.ok(&["start", "idle"]).trim(), "Domain 'idle' started");
    assert_eq!(d.state("idle"), "running (booted)");
    let list = d.ok(&["list"]);
    let row: Vec<&str> = list.lines().nth(2).unwrap().split_whitespace().collect();
    assert_eq!(row[1..], ["idle", "running"], "{list}");
    let id = row[0].to_string();
    let pid = d.vmm_pid("idle");
    assert!(alive(pid));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&serial).unwrap_or_default() != "hello\n" {
        assert!(Instant::now() < deadline, "the guest's serial output did not arrive");
        std::thread::sleep(Duration::from_millis(20));
    }

    d.fails(&["start", "idle"], "domain 'idle' is already running");
    // Undefined while running, it runs on as a transient domain; defined
    // again (same name and UUID) it is persistent once more.
    assert_eq!(d.ok(&["undefine", "idle"]).trim(), "Domain 'idle' has been undefined");
    assert!(d.ok(&["dominfo", "idle"]).contains("Persistent:     no"));
    assert_eq!(d.state("idle"), "running (booted)");
    d.fails(&["undefine", "idle"], "is transient");
    let again = d.xml_file("idle-again", &d.ok(&["dumpxml", "idle"]));
    d.ok(&["define", again.to_str().unwrap()]);
    assert!(d.ok(&["dominfo", "idle"]).contains("Persistent:     yes"));
    assert_eq!(d.ok(&["suspend", &id]).trim(), "Domain 'idle' suspended", "domains are found by id too");
    assert_eq!(d.state("idle"), "paused (user)");
    d.ok(&["resume", "idle"]);
    assert_eq!(d.state("idle"), "running (unpaused)");
    let info = d.ok(&["dominfo", "idle"]);
    assert!(info.contains(&format!("Id:             {id}")) && info.contains("Max memory:     65536 KiB") && info.contains("CPU time:"), "{info}");

    // This guest has no ACPI handling: a bounded shutdown says so and leaves it running.
    d.fails(&["shutdown", "idle", "--timeout", "1"], "did not shut down within 1 s (the guest may ignore ACPI; 'destroy' stops it at once)");
    assert_eq!(d.state("idle"), "running (unpaused)");
    assert_eq!(d.ok(&["destroy", "idle"]).trim(), "Domain 'idle' destroyed");
    assert_eq!(d.state("idle"), "shut off (destroyed)");
    assert!(!alive(pid), "the VMM is gone");
    d.fails(&["suspend", "idle"], "is not running");
    d.fails(&["destroy", "idle"], "is not running");
    // It starts again with a new id.
    d.ok(&["start", "idle"]);
    assert_ne!(d.ok(&["list"]).lines().nth(2).unwrap().split_whitespace().next().unwrap(), id);
    d.ok(&["destroy", "idle"]);
}

#[test]
fn guest_power_off_crash_and_a_killed_vmm_follow_the_lifecycle_actions() {
    let dir = scratch("ends");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let define = |name: &str, kernel: &std::path::Path, extra: &str| {
        let f = d.xml_file(name, &domain_xml(name, kernel, extra));
        d.ok(&["define", f.to_str().unwrap()]);
    };
    define("off", &k.poweroff, "");
    d.ok(&["start", "off"]);
    d.wait_state("off", "shut off (shutdown)");

    define("keep", &k.crash, "  <on_crash>preserve</on_crash>");
    d.ok(&["start", "keep"]);
    d.wait_state("keep", "crashed (crashed)");
    assert!(d.ok(&["list"]).contains("keep"), "a crashed domain is listed without --all:\n{}", d.ok(&["list"]));
    d.ok(&["destroy", "keep"]);
    assert_eq!(d.state("keep"), "shut off (destroyed)");

    define("gone", &k.crash, "");
    d.ok(&["start", "gone"]);
    d.wait_state("gone", "shut off (crashed)");

    // on_crash restart: the domain comes back by itself, with a new id.
    define("again", &k.crash, "  <on_crash>restart</on_crash>");
    d.ok(&["start", "again"]);
    let mut restarts = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_log = 0;
    while restarts < 2 {
        assert!(Instant::now() < deadline, "no restarts:\n{}", d.log());
        let log = std::fs::read_to_string(d.state.join("log/again.log")).unwrap_or_default();
        let n = log.matches("triple fault").count();
        if n > last_log {
            restarts += 1;
            last_log = n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    d.ok(&["destroy", "again"]);
    assert_eq!(d.state("again"), "shut off (destroyed)");

    // A VMM killed from outside: the domain is shut off (on_crash destroy) and list says so.
    define("victim", &k.idle, "");
    d.ok(&["start", "victim"]);
    let pid = d.vmm_pid("victim");
    // SAFETY: killing the test's own child VMM.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    d.wait_state("victim", "shut off (crashed)");
    assert!(!d.ok(&["list"]).contains("victim"));
    assert!(d.ok(&["list", "--all"]).contains("victim"));

    // Starting with a missing kernel or disk is a clear error and changes nothing.
    define("nokernel", &dir.join("missing-kernel"), "");
    d.fails(&["start", "nokernel"], "kernel");
    d.fails(&["start", "nokernel"], "missing-kernel: No such file");
    define("nodisk", &k.idle, "  <devices><disk><source file='/nonexistent/d.raw'/><target dev='vda'/></disk></devices>");
    d.fails(&["start", "nodisk"], "disk image (vda) /nonexistent/d.raw");
    assert_eq!(d.state("nodisk"), "shut off (unknown)");
    // A VMM that refuses to start (not a kernel) fails the start with its own words.
    let junk = dir.join("junk-kernel");
    std::fs::write(&junk, b"this is not a kernel").unwrap();
    define("junk", &junk, "  <on_crash>restart</on_crash>");
    let o = d.rvirt(&["start", "junk"]);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("the VMM exited during start") && o.stderr.contains("rvirt-vmm:"), "{}", o.stderr);
    assert_eq!(d.state("junk"), "shut off (failed)", "a VMM that never ran is not restarted");
}

#[test]
fn transient_domains_and_the_serial_console() {
    let dir = scratch("cons");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let f = d.xml_file("chat", &domain_xml("chat", &k.chatter, "  <devices><serial type='pty'/></devices>"));
    assert_eq!(d.ok(&["create", f.to_str().unwrap()]).trim(), format!("Domain 'chat' created from {}", f.display()));
    assert!(d.ok(&["dominfo", "chat"]).contains("Persistent:     no"));
    d.fails(&["autostart", "chat"], "transient");
    d.fails(&["define", f.to_str().unwrap()], "already exists");

    // `rvirt console` with a pipe for stdin: read the guest's output, then Ctrl-].
    let mut child = Command::new(&support::bins().rvirt)
        .arg("--connect")
        .arg(&d.socket)
        .args(["console", "chat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    // A console that shows nothing must fail the test, not hang it.
    let pid = child.id() as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let finished = done.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(30));
        if !finished.load(std::sync::atomic::Ordering::SeqCst) {
            // SAFETY: kill has no memory effects; the child is not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while seen.iter().filter(|b| **b == b'x').count() < 3 {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "console closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&[0x1d]).unwrap();
    let st = child.wait().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(st.success(), "Ctrl-] detaches cleanly");
    assert_eq!(d.state("chat"), "running (booted)", "detaching leaves the domain running");

    d.ok(&["destroy", "chat"]);
    assert!(!d.ok(&["list", "--all"]).contains("chat"), "a transient domain vanishes when it stops");
    d.fails(&["console", "chat"], "no domain");

    let f = d.xml_file("quiet", &domain_xml("quiet", &k.idle, ""));
    d.ok(&["define", f.to_str().unwrap()]);
    d.ok(&["start", "quiet"]);
    d.fails(&["console", "quiet"], "has no serial console on a pty");
    d.ok(&["destroy", "quiet"]);
}

#[test]
fn a_restarted_daemon_finds_its_running_domains() {
    let dir = scratch("adopt");
    let mut d = Daemon::start(&dir);
    let k = kernels(&dir);
    let f = d.xml_file("stay", &domain_xml("stay", &k.idle, ""));
    d.ok(&["define", f.to_str().unwrap()]);
    d.ok(&["start", "stay"]);
    d.ok(&["suspend", "stay"]);
    let pid = d.vmm_pid("stay");
    let list = d.ok(&["list"]);
    d.kill();
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(pid), "the VMM outlives its daemon");
    d.restart();
    assert_eq!(d.ok(&["list"]), list, "same id, name and state after the restart");
    assert_eq!(d.vmm_pid("stay"), pid);
    d.ok(&["resume", "stay"]);
    assert_eq!(d.state("stay"), "running (unpaused)");
    // The adopted VMM is not our child: its end is still noticed.
    // SAFETY: killing the test's own VMM.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    d.wait_state("stay", "shut off (crashed)");
    d.ok(&["start", "stay"]);
    let pid = d.vmm_pid("stay");
    d.kill();
    d.restart();
    d.ok(&["destroy", "stay"]);
    assert!(!alive(pid));
}

#[test]
fn install_writes_the_definition_creates_the_disk_and_starts() {
    let dir = scratch("inst");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let disk = dir.join("inst.qcow2");
    let kernel = k.idle.to_str().unwrap();
    let disk_spec = format!("path={},size=0.0625", disk.display());
    let args = ["install", "--name", "inst", "--memory", "64", "--kernel", kernel, "--disk", &disk_spec, "--autostart"];
    let xml = d.ok(&[&args[..], &["--print-xml"]].concat());
    assert!(xml.contains("<name>inst</name>") && xml.contains("<memory unit='KiB'>65536</memory>"), "{xml}");
    assert!(d.ok(&["list", "--all"]).lines().count() == 2, "--print-xml defines nothing");
    assert_eq!(d.ok(&args).trim(), "Domain 'inst' defined and started");
    assert_eq!(d.state("inst"), "running (booted)");
    assert!(d.ok(&["dominfo", "inst"]).contains("Autostart:      enable"));
    // The running VMM holds the image as QEMU would: qemu-img needs -U to look.
    let locked = std::process::Command::new("qemu-img").args(["info"]).arg(&disk).output().unwrap();
    assert!(!locked.status.success() && String::from_utf8_lossy(&locked.stderr).contains("lock"), "qemu-img info without -U on a running disk");
    let img = std::process::Command::new("qemu-img").args(["info", "-U", "--output", "json"]).arg(&disk).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&img.stdout).unwrap();
    assert_eq!((info["format"].as_str(), info["virtual-size"].as_u64()), (Some("qcow2"), Some(64 << 20)), "qemu-img reads the new disk");
    d.fails(&["install", "--name", "inst", "--kernel", kernel], "already exists");
    d.fails(&["install", "--name", "x", "--kernel", kernel, "--disk", "path=/nonexistent/n.raw"], "give size=GiB");
    d.ok(&["destroy", "inst"]);
}

#[test]
fn a_state_directory_too_deep_for_vmm_sockets_is_a_clear_error() {
    let dir = scratch("deep");
    let state = dir.join("s".repeat(100));
    let d = Daemon::start_with_state(&dir, &state);
    let k = kernels(&dir);
    let f = d.xml_file("deep", &domain_xml("deep", &k.idle, ""));
    d.ok(&["define", f.to_str().unwrap()]);
    d.fails(&["start", "deep"], "the state directory's path is too long for a socket");
    assert_eq!(d.state("deep"), "shut off (unknown)");
}

/// A definition as virt-install writes it for an imported disk (no
/// `<kernel>`, the disk first in the boot order) boots the disk's own boot
/// code through SeaBIOS; UEFI definitions define but refuse to start.
#[test]
fn a_definition_without_a_kernel_boots_its_disk_through_firmware() {
    use rvirt_lab::guests::{boot_sector, real_mode_print_and_power_off};
    let dir = scratch("firmware");
    let d = Daemon::start(&dir);
    let disk = dir.join("disk.raw");
    let mut image = boot_sector(&real_mode_print_and_power_off(b"<booted from its disk>"));
    image.resize(1 << 20, 0);
    std::fs::write(&disk, image).unwrap();
    let serial = dir.join("serial.log");
    let xml = format!(
        r#"<domain type="kvm">
  <name>imported</name>
  <memory unit="MiB">64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch="x86_64" machine="q35">hvm</type>
  </os>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="raw"/>
      <source file="{}"/>
      <target dev="vda" bus="virtio"/>
      <boot order="1"/>
    </disk>
    <serial type="file"><source path="{}"/></serial>
    <graphics type="vnc" port="-1"/>
    <video><model type="virtio"/></video>
  </devices>
</domain>"#,
        disk.display(),
        serial.display()
    );
    let o = d.rvirt(&["define", d.xml_file("imported", &xml).to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stderr.matches("warning:").count(), 1, "one warning for the screen: {}", o.stderr);
    assert!(d.ok(&["dumpxml", "imported"]).contains("<boot order='1'/>"));
    d.ok(&["start", "imported"]);
    // The boot code powers off: on_poweroff destroy.
    d.wait_state("imported", "shut off");
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    let plain = rvirt_lab::guests::without_firmware_punctuation(&text);
    assert!(text.contains("SeaBIOS") && plain.contains("<booted from its disk>"), "{text}");
    let dump = d.ok(&["dumpxml", "imported"]);
    let uuid = dump.split("<uuid>").nth(1).unwrap().split("</uuid>").next().unwrap();
    assert!(text.contains(&format!("Machine UUID {uuid}")), "the domain's UUID in SMBIOS: {text}");

    // The same disk on bus='sata' beside an empty IDE CD-ROM drive: both
    // become units on virtio-scsi, and SeaBIOS boots the disk through it.
    let _ = std::fs::remove_file(&serial);
    let sata = xml
        .replace("imported", "sata")
        .replace(r#"<target dev="vda" bus="virtio"/>"#, r#"<target dev="sda" bus="sata"/>"#)
        .replace("<serial type", r#"<disk type="file" device="cdrom"><target dev="hdc" bus="ide"/></disk><serial type"#);
    let o = d.rvirt(&["define", d.xml_file("sata", &sata).to_str().unwrap()]);
    assert!(o.code == 0 && o.stderr.contains("rvirt has no SATA or IDE controller"), "{}", o.stderr);
    d.ok(&["start", "sata"]);
    d.wait_state("sata", "shut off");
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    let plain = rvirt_lab::guests::without_firmware_punctuation(&text);
    assert!(plain.contains("<booted from its disk>"), "a SATA disk boots through virtio-scsi: {text}");

    let uefi = xml.replace("<os>", "<os firmware=\"efi\">").replace("imported", "uefi");
    let o = d.rvirt(&["define", d.xml_file("uefi", &uefi).to_str().unwrap()]);
    assert_eq!(o.code, 0, "UEFI definitions define: {}", o.stderr);
    assert!(o.stderr.contains("UEFI firmware is not supported yet"), "{}", o.stderr);
    d.fails(&["start", "uefi"], "UEFI firmware is not supported yet");
    let noloader = xml.replace("<os>", "<os><loader type=\"rom\">/nonexistent/bios.bin</loader>").replace("imported", "noloader");
    d.ok(&["define", d.xml_file("noloader", &noloader).to_str().unwrap()]);
    d.fails(&["start", "noloader"], "firmware (<loader>) /nonexistent/bios.bin");
    assert_eq!(d.state("noloader"), "shut off (unknown)");
}

/// `rvirt change-media` on a running domain: insert and eject through the
/// VMM, the live XML follows; wrong drives and missing files are refused.
#[test]
fn change_media_inserts_and_ejects_a_running_domains_disc() {
    let dir = scratch("media");
    let d = Daemon::start(&dir);
    let iso = dir.join("disc.iso");
    std::fs::write(&iso, vec![0u8; 64 * 2048]).unwrap();
    let blank = dir.join("blank.raw");
    std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
    // No bootable device: SeaBIOS waits, the domain stays running.
    let xml = format!(
        "<domain type='kvm'><name>media</name><memory unit='MiB'>64</memory><os><type>hvm</type></os><devices>\
         <disk type='file'><source file='{}'/><target dev='sda' bus='sata'/></disk>\
         <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/></disk></devices></domain>",
        blank.display()
    );
    d.ok(&["define", d.xml_file("media", &xml).to_str().unwrap()]);
    d.fails(&["change-media", "media", "hdc", "--eject"], "not running");
    d.ok(&["start", "media"]);
    assert_eq!(d.ok(&["change-media", "media", "hdc", "--insert", iso.to_str().unwrap()]).trim(), "Successfully inserted media.");
    assert!(d.ok(&["dumpxml", "media"]).contains(&format!("<source file='{}'/>", iso.display())), "the live XML has the disc");
    assert_eq!(d.ok(&["change-media", "media", "hdc", "--eject"]).trim(), "Successfully ejected media.");
    assert!(!d.ok(&["dumpxml", "media"]).contains("disc.iso"));
    d.fails(&["change-media", "media", "sda", "--eject"], "sda is not a CD-ROM drive");
    d.fails(&["change-media", "media", "hdd", "--eject"], "has no drive hdd");
    d.fails(&["change-media", "media", "hdc", "--insert", "/nonexistent.iso"], "/nonexistent.iso");
    d.ok(&["destroy", "media"]);
}

/// `rvirt install --cdrom`: the installer boots while the new disk has no
/// bootloader; once "installed", the same definition boots the disk.
#[test]
fn install_from_cdrom_boots_the_installer_until_the_disk_has_a_bootloader() {
    use rvirt_lab::guests::{boot_sector, el_torito_iso, real_mode_print_and_power_off};
    let dir = scratch("install-cd");
    let d = Daemon::start(&dir);
    let iso = dir.join("installer.iso");
    el_torito_iso(&real_mode_print_and_power_off(b"<installer>"), &iso, false).unwrap();
    let disk = dir.join("new.raw");
    let serial = dir.join("serial.log");
    let xml = d.ok(&[
        "install", "--name", "inst", "--memory", "64", "--os-variant", "debian12", "--cdrom", iso.to_str().unwrap(),
        "--disk", &format!("path={},size=0.001,format=raw", disk.display()), "--print-xml",
    ]);
    let xml = xml.replacen("<serial type='pty'>", &format!("<serial type='file'><source path='{}'/>", serial.display()), 1);
    d.ok(&["define", d.xml_file("inst", &xml).to_str().unwrap()]);
    let booted = |what: &str| {
        let _ = std::fs::remove_file(&serial);
        d.ok(&["start", "inst"]);
        d.wait_state("inst", "shut off");
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        let plain = rvirt_lab::guests::without_firmware_punctuation(&text);
        let log = std::fs::read_to_string(d.state.join("log/inst.log")).unwrap_or_default();
        assert!(plain.contains(what), "want {what}:\n{text}\n--- VMM log ---\n{log}");
    };
    booted("<installer>");
    // The "installation" writes a bootloader to the disk.
    let mut mbr = boot_sector(&real_mode_print_and_power_off(b"<installed system>"));
    mbr.resize(4096, 0);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &mbr, 0).unwrap();
    booted("<installed system>");
}
