//! Disk images under hostile guests and concurrent users: a guest-written
//! qcow2 header cannot make the VMM open a host file, two domains cannot
//! write one image, and neither rvirt-img nor QEMU's tools change an image a
//! running VMM holds (nor does rvirt-img change one `qemu-io` holds).

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use rvirt_lab::procfs::open_files;
use support::*;

fn run(cmd: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    run(Path::new("qemu-img"), args)
}

#[test]
fn a_guest_written_qcow2_header_cannot_make_the_vmm_open_a_host_file() {
    let dir = scratch("probe");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, "root:$6$not-for-guests\n").unwrap();
    // What a guest can write into the first sector of its raw disk: a qcow2
    // header naming a host file as its (raw) backing file.
    let header = dir.join("header.qcow2");
    let (ok, out) = qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", secret.to_str().unwrap(), header.to_str().unwrap(), "64M"]);
    assert!(ok, "{out}");
    let disk = dir.join("guest.raw");
    let mut bytes = std::fs::read(&header).unwrap();
    bytes.resize(8 << 20, 0);
    std::fs::write(&disk, &bytes).unwrap();
    // The definition gives no format, as `rvirt install` used to write it.
    let f = d.xml_file("victim", &domain_xml("victim", &k.idle, &disk_xml(&disk, "", "")));
    d.ok(&["define", f.to_str().unwrap()]);
    d.ok(&["start", "victim"]);
    let files = open_files(d.jailed_vmm_pid("victim"));
    let disk_real = std::fs::canonicalize(&disk).unwrap();
    assert!(files.contains(&disk_real), "the disk itself is open: {files:?}");
    let secret_real = std::fs::canonicalize(&secret).unwrap();
    assert!(!files.contains(&secret_real), "the VMM opened the file a guest named: {files:?}");
    assert!(d.ok(&["dumpxml", "victim"]).contains("<disk"), "still a disk");
    d.ok(&["destroy", "victim"]);
    // The VMM run by hand draws the same line.
    let mut vmm = Command::new(&bins().vmm)
        .args(["--kernel", k.idle.to_str().unwrap(), "--memory", "64M", "--serial", "null", "--disk"])
        .arg(format!("path={}", disk.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let files = open_files(vmm.id());
    let _ = vmm.kill();
    let _ = vmm.wait();
    assert!(files.contains(&disk_real) && !files.contains(&secret_real), "{files:?}");
}

#[test]
fn two_domains_cannot_write_one_image_unless_both_share_it() {
    let dir = scratch("share");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let img = dir.join("one.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    for (name, extra) in [("first", ""), ("second", ""), ("s1", "<shareable/>"), ("s2", "<shareable/>")] {
        let f = d.xml_file(name, &domain_xml(name, &k.idle, &disk_xml(&img, "<driver name='qemu' type='raw'/>", extra)));
        d.ok(&["define", f.to_str().unwrap()]);
    }
    d.ok(&["start", "first"]);
    let out = d.rvirt(&["start", "second"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("domain 'second'") && out.stderr.contains("running domain 'first'") && out.stderr.contains("one.raw"), "{}", out.stderr);
    assert_eq!(d.state("second"), "shut off (unknown)");
    // Without rvirtd, the image lock stops a second VMM.
    let (ok, err) = run(&bins().vmm, &["--kernel", k.idle.to_str().unwrap(), "--memory", "64M", "--disk", &format!("path={},format=raw", img.display())]);
    assert!(!ok && err.contains("in use"), "{err}");
    d.ok(&["destroy", "first"]);
    d.ok(&["start", "s1"]);
    d.ok(&["start", "s2"]);
    d.ok(&["destroy", "s1"]);
    d.ok(&["destroy", "s2"]);
}

#[test]
fn tools_cannot_change_an_image_a_running_vmm_holds() {
    let dir = scratch("held");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let img = dir.join("held.qcow2");
    let s = img.to_str().unwrap();
    assert!(run(&bins().img, &["create", "-f", "qcow2", s, "16M"]).0);
    let f = d.xml_file("holder", &domain_xml("holder", &k.idle, &disk_xml(&img, "<driver name='qemu' type='qcow2'/>", "")));
    d.ok(&["define", f.to_str().unwrap()]);
    d.ok(&["start", "holder"]);
    for args in [vec!["resize", s, "+1M"], vec!["snapshot", "-c", "snap", s], vec!["info", s], vec!["check", s], vec!["commit", s]] {
        let (ok, out) = run(&bins().img, &args);
        assert!(!ok && out.contains("in use"), "rvirt-img {args:?} on a running disk:\n{out}");
    }
    let (ok, out) = qemu_img(&["info", s]);
    assert!(!ok && out.contains("Failed to get shared \"write\" lock"), "qemu-img info:\n{out}");
    let (ok, out) = qemu_img(&["info", "-U", s]);
    assert!(ok && out.contains("virtual size: 16 MiB"), "{out}");
    let (ok, out) = run(&bins().img, &["info", "-U", s]);
    assert!(ok && out.contains("virtual size: 16 MiB"), "{out}");
    let (ok, out) = run(&bins().img, &["resize", "-U", s, "+1M"]);
    assert!(!ok && out.contains("read-only"), "-U does not let a writer in:\n{out}");
    d.ok(&["destroy", "holder"]);
    let (ok, out) = run(&bins().img, &["resize", s, "+1M"]);
    assert!(ok, "free again once the VMM is gone:\n{out}");
}
