//! Domain snapshots, save/restore and managed save through rvirtd's
//! libvirt protocol, driven by Debian's virsh and checked with qemu-img, on
//! a hand-made guest on this host's /dev/kvm that prints the alphabet over
//! and over: after a revert or a restore it must go on with the letter
//! after the last one it printed at that moment.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

/// The serial log's bytes, once it has at least `n` more than `from`.
fn wait_log(log: &Path, from: usize, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = std::fs::read(log).unwrap_or_default();
        if got.len() >= from + n {
            return got;
        }
        assert!(Instant::now() < deadline, "{} has {} bytes, wanted {}", log.display(), got.len(), from + n);
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn next(b: u8) -> u8 {
    if b == b'z' {
        b'a'
    } else {
        b + 1
    }
}

/// The letter the guest printed last, after checking it stopped printing.
fn last_letter_when_stopped(log: &Path) -> (usize, u8) {
    let a = std::fs::read(log).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let b = std::fs::read(log).unwrap();
    assert_eq!(a.len(), b.len(), "the guest is stopped or paused: it prints nothing more");
    (b.len(), *b.last().expect("the guest printed"))
}

/// `qemu-img snapshot -l`'s snapshot names.
fn qemu_img_snapshots(image: &Path) -> Vec<String> {
    let o = Command::new("qemu-img").args(["snapshot", "-U", "-l"]).arg(image).output().expect("qemu-img (Debian's qemu-utils)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().skip(2).filter_map(|l| l.split_whitespace().nth(1).map(str::to_string)).collect()
}

fn qemu_img_check(image: &Path) {
    let o = Command::new("qemu-img").args(["check", "-U"]).arg(image).output().unwrap();
    assert!(o.status.success(), "qemu-img check {}: {}{}", image.display(), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

#[test]
fn virsh_takes_lists_reverts_and_deletes_snapshots_and_saves_domains() {
    let dir = scratch("snap");
    let mut d = Daemon::start(&dir);
    let kernel = dir.join("alphabet.bzImage");
    std::fs::write(&kernel, rvirt_lab::guests::bzimage_with(&rvirt_lab::guests::print_alphabet(0x4000))).unwrap();
    let image = dir.join("vda.qcow2");
    assert!(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("16M").status().unwrap().success());
    let log = dir.join("serial.log");
    let devices = format!(
        "<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk><serial type='file'><source path='{}'/></serial></devices>",
        image.display(),
        log.display()
    );
    let f = d.xml_file("abc", &domain_xml("abc", &kernel, &devices));
    virsh_ok(&d, &["define", f.to_str().unwrap()]);

    // A snapshot of the shut-off domain: its disk only.
    let out = virsh_ok(&d, &["snapshot-create-as", "abc", "off", "before the first boot"]);
    assert!(out.contains("Domain snapshot off created"), "{out}");
    assert_eq!(qemu_img_snapshots(&image), ["off"]);

    // Running: paused first, so the letter it stopped at is known.
    virsh_ok(&d, &["start", "abc"]);
    wait_log(&log, 0, 30);
    virsh_ok(&d, &["suspend", "abc"]);
    let (_, at_s1) = last_letter_when_stopped(&log);
    let out = virsh_ok(&d, &["snapshot-create-as", "--domain", "abc", "--name", "s1", "--description", "paused mid-alphabet"]);
    assert!(out.contains("Domain snapshot s1 created"), "{out}");
    assert_eq!(virsh_ok(&d, &["domstate", "abc"]).trim(), "paused", "a snapshot leaves a paused domain paused");
    assert_eq!(qemu_img_snapshots(&image), ["off", "s1"], "the running domain's disk has its internal snapshot");
    virsh_ok(&d, &["resume", "abc"]);
    let len = std::fs::read(&log).unwrap().len();
    wait_log(&log, len, 60);
    // A second one while it runs: a child of s1.
    virsh_ok(&d, &["snapshot-create-as", "abc", "s2"]);
    assert_eq!(virsh_ok(&d, &["snapshot-current", "--name", "abc"]).trim(), "s2");
    let info = virsh_ok(&d, &["snapshot-info", "abc", "s1"]);
    assert_eq!(field(&info, "State:"), "paused");
    assert_eq!(field(&info, "Location:"), "internal");
    assert_eq!(field(&info, "Parent:"), "off");
    assert_eq!(field(&info, "Children:"), "1");
    assert_eq!(field(&info, "Current:"), "no");
    assert_eq!(field(&info, "Metadata:"), "yes");
    assert_eq!(field(&virsh_ok(&d, &["snapshot-info", "abc", "--current"]), "State:"), "running");
    let tree = virsh_ok(&d, &["snapshot-list", "abc", "--tree"]);
    assert!(tree.starts_with("off\n") && tree.contains("s1") && tree.contains("s2"), "{tree}");
    let tree_lines: Vec<&str> = tree.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(tree_lines.iter().position(|l| l.contains("s1")) < tree_lines.iter().position(|l| l.contains("s2")), "{tree}");
    assert_eq!(virsh_ok(&d, &["snapshot-list", "abc", "--roots", "--name"]).trim(), "off");
    assert_eq!(virsh_ok(&d, &["snapshot-list", "abc", "--leaves", "--name"]).trim(), "s2");
    assert_eq!(virsh_ok(&d, &["snapshot-parent", "abc", "s2"]).trim(), "s1");
    let list = virsh_ok(&d, &["snapshot-list", "abc", "--parent"]);
    assert!(list.lines().any(|l| l.contains("s2") && l.contains("running") && l.trim_end().ends_with("s1")), "{list}");
    let xml = virsh_ok(&d, &["snapshot-dumpxml", "abc", "s1"]);
    for want in ["<name>s1</name>", "<description>paused mid-alphabet</description>", "<state>paused</state>", "<memory snapshot='internal'/>", "<disk name='vda' snapshot='internal'/>", "<name>abc</name>"] {
        assert!(xml.contains(want), "{want} in {xml}");
    }

    // Revert to s1: paused, as it was; resumed, it prints the letter after the one it had printed.
    virsh_ok(&d, &["snapshot-revert", "abc", "s1"]);
    assert_eq!(virsh_ok(&d, &["domstate", "--reason", "abc"]).trim(), "paused (from snapshot)");
    assert_eq!(virsh_ok(&d, &["snapshot-current", "--name", "abc"]).trim(), "s1");
    let (len, _) = last_letter_when_stopped(&log);
    virsh_ok(&d, &["resume", "abc"]);
    let out = wait_log(&log, len, 5);
    assert_eq!(out[len], next(at_s1), "after the revert the guest goes on from s1: {:?}", String::from_utf8_lossy(&out[len..]));
    qemu_img_check(&image);

    // Bad input, each refused saying why.
    virsh_fails(&d, &["snapshot-revert", "abc", "nope"], "no domain snapshot with matching name 'nope'");
    virsh_fails(&d, &["snapshot-create-as", "abc", "s1"], "has a snapshot named 's1' already");
    let bad = d.xml_file("bad-snap", "<domainsnapshot><name>x</name><memory snapshot='external' file='/m'/></domainsnapshot>");
    virsh_fails(&d, &["snapshot-create", "abc", bad.to_str().unwrap()], "snapshot='external'");
    let bad = d.xml_file("broken-snap", "<domainsnapshot><name>x</name>");
    virsh_fails(&d, &["snapshot-create", "abc", bad.to_str().unwrap()], "XML");

    // The tree, and which snapshot is current, survive a daemon restart.
    d.restart();
    assert_eq!(virsh_ok(&d, &["snapshot-current", "--name", "abc"]).trim(), "s1");
    assert_eq!(virsh_ok(&d, &["snapshot-list", "abc", "--name", "--topological"]).split_whitespace().collect::<Vec<_>>(), ["off", "s1", "s2"]);

    // snapshot-edit: virsh dumps the XML, runs $EDITOR on it and redefines the snapshot.
    let o = Command::new("virsh")
        .args(["-c", &uri(&d, false), "snapshot-edit", "abc", "s1"])
        .env("EDITOR", "sed -i s/mid-alphabet/edited/")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(virsh_ok(&d, &["snapshot-dumpxml", "abc", "s1"]).contains("<description>paused edited</description>"));
    assert_eq!(virsh_ok(&d, &["snapshot-current", "--name", "abc"]).trim(), "s1", "still current after the edit");

    // Deleting the current snapshot's parent: s1 (current) hangs from "off" now... its own parent goes.
    virsh_ok(&d, &["snapshot-create-as", "abc", "s3"]);
    virsh_ok(&d, &["snapshot-delete", "abc", "s1"]);
    assert_eq!(virsh_ok(&d, &["snapshot-parent", "abc", "s3"]).trim(), "off", "s3 hangs from what was above s1");
    assert_eq!(virsh_ok(&d, &["snapshot-parent", "abc", "s2"]).trim(), "off");
    assert_eq!(virsh_ok(&d, &["snapshot-current", "--name", "abc"]).trim(), "s3");
    assert!(!qemu_img_snapshots(&image).contains(&"s1".to_string()), "the running domain's image lost s1 too");
    // --children, then --metadata (the image keeps its snapshot).
    virsh_ok(&d, &["snapshot-delete", "abc", "s2"]);
    virsh_ok(&d, &["snapshot-delete", "abc", "s3", "--metadata"]);
    assert!(qemu_img_snapshots(&image).contains(&"s3".to_string()), "--metadata leaves the image's snapshot");
    assert_eq!(virsh_ok(&d, &["snapshot-list", "abc", "--name"]).trim(), "off");

    // save / restore: the guest goes on from where it was saved.
    let saved = dir.join("abc.save");
    let out = virsh_ok(&d, &["save", "abc", saved.to_str().unwrap()]);
    assert!(out.contains("Domain 'abc' saved to"), "{out}");
    assert_eq!(virsh_ok(&d, &["domstate", "--reason", "abc"]).trim(), "shut off (saved)");
    let (len, at_save) = last_letter_when_stopped(&log);
    assert!(virsh_ok(&d, &["save-image-dumpxml", saved.to_str().unwrap()]).contains("<name>abc</name>"));
    virsh_ok(&d, &["restore", saved.to_str().unwrap()]);
    let out = wait_log(&log, len, 5);
    assert_eq!(out[len], next(at_save), "after restore: {:?}", String::from_utf8_lossy(&out[len..]));
    assert_eq!(virsh_ok(&d, &["domstate", "--reason", "abc"]).trim(), "running (restored)");
    virsh_fails(&d, &["restore", dir.join("serial.log").to_str().unwrap()], "not a saved VM");

    // managedsave: listed, then continued by start.
    virsh_ok(&d, &["managedsave", "abc"]);
    let (len, at_save) = last_letter_when_stopped(&log);
    assert!(virsh_ok(&d, &["list", "--all", "--with-managed-save", "--name"]).contains("abc"));
    assert!(virsh_ok(&d, &["list", "--all", "--without-managed-save", "--name"]).trim().is_empty());
    assert_eq!(field(&virsh_ok(&d, &["dominfo", "abc"]), "Managed save:"), "yes");
    virsh_fails(&d, &["undefine", "abc"], "managed save");
    virsh_ok(&d, &["start", "abc"]);
    let out = wait_log(&log, len, 5);
    assert_eq!(out[len], next(at_save), "start after managedsave: {:?}", String::from_utf8_lossy(&out[len..]));
    assert_eq!(field(&virsh_ok(&d, &["dominfo", "abc"]), "Managed save:"), "no", "the managed save is used up");
    virsh_ok(&d, &["managedsave", "abc"]);
    virsh_ok(&d, &["managedsave-remove", "abc"]);
    virsh_ok(&d, &["start", "abc"]);
    let out = wait_log(&log, 0, 1);
    assert!(out.ends_with(b"a") || out.len() > len, "a fresh boot after managedsave-remove");
    virsh_ok(&d, &["destroy", "abc"]);

    // --disk-only of the shut-off domain: the disk continues in an overlay.
    virsh_ok(&d, &["snapshot-create-as", "abc", "ext", "--disk-only"]);
    let overlay = dir.join("vda.ext");
    assert!(overlay.exists());
    assert!(virsh_ok(&d, &["dumpxml", "abc"]).contains(&overlay.display().to_string()), "the definition names the overlay");
    let o = Command::new("qemu-img").args(["info", "-U"]).arg(&overlay).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("backing file: {}", image.display())), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(field(&virsh_ok(&d, &["snapshot-info", "abc", "ext"]), "Location:"), "external");
    virsh_fails(&d, &["snapshot-revert", "abc", "ext"], "external");
    // Running: the VMM switches to a second overlay while the guest goes on printing.
    virsh_ok(&d, &["start", "abc"]);
    let len = wait_log(&log, 0, 1).len();
    virsh_ok(&d, &["snapshot-create-as", "abc", "ext2", "--disk-only", "--diskspec", &format!("vda,snapshot=external,file={}", dir.join("top.qcow2").display())]);
    wait_log(&log, len, 20);
    assert_eq!(virsh_ok(&d, &["domstate", "abc"]).trim(), "running");
    let live = virsh_ok(&d, &["dumpxml", "abc"]);
    assert!(live.contains(&dir.join("top.qcow2").display().to_string()), "the live definition names the new overlay: {live}");
    assert!(virsh_ok(&d, &["dumpxml", "--inactive", "abc"]).contains("top.qcow2"), "and the stored one");
    assert!(virsh_ok(&d, &["snapshot-dumpxml", "abc", "ext2"]).contains("<state>disk-snapshot</state>"));
    let o = Command::new("qemu-img").args(["info", "-U", "--backing-chain"]).arg(dir.join("top.qcow2")).output().unwrap();
    let chain = String::from_utf8_lossy(&o.stdout);
    assert!(chain.contains(&format!("backing file: {}", overlay.display())) && chain.contains(&format!("backing file: {}", image.display())), "{chain}");
    virsh_ok(&d, &["destroy", "abc"]);
    qemu_img_check(&overlay);
    qemu_img_check(&dir.join("top.qcow2"));

    // Reverting a shut-off domain to the first snapshot: its disk and definition as then.
    virsh_ok(&d, &["snapshot-revert", "abc", "off"]);
    assert!(virsh_ok(&d, &["dumpxml", "abc"]).contains(&image.display().to_string()), "the definition of that moment");
    assert_eq!(virsh_ok(&d, &["domstate", "abc"]).trim(), "shut off");

    // undefine refuses to lose snapshots unless told.
    virsh_fails(&d, &["undefine", "abc"], "snapshots");
    virsh_ok(&d, &["undefine", "abc", "--snapshots-metadata"]);
    qemu_img_check(&image);
}

#[test]
fn a_raw_disk_refuses_internal_snapshots_saying_why() {
    let dir = scratch("snap-raw");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let disk = dir.join("raw.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let f = d.xml_file("raw", &domain_xml("raw", &k.idle, &disk_xml(&disk, "<driver name='qemu' type='raw'/>", "")));
    virsh_ok(&d, &["define", f.to_str().unwrap()]);
    virsh_fails(&d, &["snapshot-create-as", "raw", "s"], "raw images have no internal snapshots");
    virsh_ok(&d, &["start", "raw"]);
    virsh_fails(&d, &["snapshot-create-as", "raw", "s"], "raw images have no internal snapshots");
    assert_eq!(virsh_ok(&d, &["domstate", "raw"]).trim(), "running", "a refused snapshot leaves the guest running");
    // Leaving the raw disk out is a snapshot of memory only... for a running domain every writable disk goes with it.
    virsh_fails(&d, &["snapshot-create-as", "raw", "s", "--diskspec", "vda,snapshot=no"], "every writable disk");
    virsh_ok(&d, &["destroy", "raw"]);
    // Shut off, a --disk-only snapshot is the way for a raw disk.
    virsh_ok(&d, &["snapshot-create-as", "raw", "s", "--disk-only"]);
    assert!(dir.join("raw.s").exists());
    assert_eq!(virsh_ok(&d, &["snapshot-list", "raw", "--name"]).trim(), "s");
    virsh_fails(&d, &["snapshot-delete", "raw", "s"], "--metadata");
    virsh_ok(&d, &["snapshot-delete", "raw", "s", "--metadata"]);
    virsh_fails(&d, &["snapshot-info", "raw", "--current"], "current snapshot");
}
