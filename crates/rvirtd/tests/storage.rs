//! rvirtd's storage pools and volumes through libvirt's remote protocol,
//! driven by Debian's `virsh`, `virt-install` and python3-libvirt (and
//! through rvirtd's own, by `rvirt`), checked with Debian's `qemu-img`:
//! what users of libvirt's directory pools do.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use support::*;

/// `qemu-img info --output json` of `path`.
fn qemu_info(path: &Path) -> serde_json::Value {
    let o = Command::new("qemu-img").args(["info", "-U", "--output", "json"]).arg(path).output().expect("qemu-img (Debian package qemu-utils)");
    assert!(o.status.success(), "qemu-img info {}: {}", path.display(), String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Whether `qemu-img check` finds `path` clean.
fn qemu_check_clean(path: &Path) -> bool {
    Command::new("qemu-img").args(["check", "-q"]).arg(path).status().is_ok_and(|s| s.success())
}

/// The rows of a virsh table (after its header and rule), split on whitespace.
fn rows(table: &str) -> Vec<Vec<String>> {
    table.lines().skip_while(|l| !l.starts_with("---")).skip(1).filter(|l| !l.trim().is_empty()).map(|l| l.split_whitespace().map(str::to_string).collect()).collect()
}

#[test]
fn virsh_manages_directory_pools_and_their_volumes() {
    let dir = scratch("lv-pool");
    let mut d = Daemon::start(&dir);
    let images = dir.join("images");
    let target = images.to_str().unwrap();

    // Defined, built and started as `virsh pool-define-as` users do.
    let out = virsh_ok(&d, &["pool-define-as", "images", "dir", "--target", target]);
    assert!(out.contains("Pool images defined"), "{out}");
    assert_eq!(rows(&virsh_ok(&d, &["pool-list", "--all"])), [["images", "inactive", "no"]]);
    virsh_fails(&d, &["vol-list", "images"], "is not active");
    virsh_fails(&d, &["pool-start", "images"], "cannot open directory");
    assert!(virsh_ok(&d, &["pool-build", "images"]).contains("Pool images built"));
    assert_eq!(std::fs::metadata(&images).unwrap().permissions().mode() & 0o7777, 0o711, "libvirt's mode for a built pool");
    assert!(virsh_ok(&d, &["pool-start", "images"]).contains("Pool images started"));
    virsh_fails(&d, &["pool-start", "images"], "already active");
    virsh_ok(&d, &["pool-autostart", "images"]);
    assert_eq!(rows(&virsh_ok(&d, &["pool-list"])), [["images", "active", "yes"]]);
    let info = virsh_ok(&d, &["pool-info", "images"]);
    assert_eq!((field(&info, "State:"), field(&info, "Persistent:"), field(&info, "Autostart:")), ("running".into(), "yes".into(), "yes".into()));
    assert!(!field(&info, "Capacity:").starts_with("0.00"), "{info}");
    let xml = virsh_ok(&d, &["pool-dumpxml", "images"]);
    assert!(xml.contains(&format!("<path>{target}</path>")) && xml.contains("<mode>0711</mode>") && xml.contains("<available unit='bytes'>"), "{xml}");

    // Volumes of each kind, read back by qemu-img.
    assert!(virsh_ok(&d, &["vol-create-as", "images", "a.qcow2", "1G", "--format", "qcow2"]).contains("Vol a.qcow2 created"));
    let a = images.join("a.qcow2");
    let ai = qemu_info(&a);
    assert_eq!((ai["format"].as_str(), ai["virtual-size"].as_u64()), (Some("qcow2"), Some(1 << 30)));
    assert!(qemu_check_clean(&a));
    assert_eq!(std::fs::metadata(&a).unwrap().mode() & 0o777, 0o600);
    virsh_ok(&d, &["vol-create-as", "images", "b.raw", "64M", "--allocation", "16M"]);
    let b = images.join("b.raw");
    let bm = std::fs::metadata(&b).unwrap();
    assert!(bm.len() == 64 << 20 && bm.blocks() * 512 >= 16 << 20 && bm.blocks() * 512 < 64 << 20, "sparse but 16 MiB allocated: {} blocks", bm.blocks());
    virsh_ok(&d, &["vol-create-as", "images", "c.qcow2", "1G", "--format", "qcow2", "--backing-vol", "a.qcow2", "--backing-vol-format", "qcow2"]);
    let ci = qemu_info(&images.join("c.qcow2"));
    assert_eq!((ci["backing-filename"].as_str(), ci["backing-filename-format"].as_str()), (Some(a.to_str().unwrap()), Some("qcow2")), "{ci}");
    virsh_ok(&d, &["vol-create-as", "images", "m.qcow2", "8M", "--format", "qcow2", "--prealloc-metadata"]);
    // Metadata preallocation maps every cluster: the file spans the whole disk (sparse).
    let m = images.join("m.qcow2");
    assert!(std::fs::metadata(&m).unwrap().len() > 8 << 20 && qemu_check_clean(&m), "metadata preallocated: {}", qemu_info(&m));
    virsh_fails(&d, &["vol-create-as", "images", "a.qcow2", "1G"], "already exists");
    virsh_fails(&d, &["vol-create-as", "images", "../escape", "1G"], "not a usable volume name");
    virsh_fails(&d, &["vol-create-as", "images", "v.vmdk", "1G", "--format", "vmdk"], "format 'vmdk' is not supported");
    assert!(!dir.join("escape").exists());

    let listed = rows(&virsh_ok(&d, &["vol-list", "images", "--details"]));
    let names: Vec<&str> = listed.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["a.qcow2", "b.raw", "c.qcow2", "m.qcow2"]);
    assert_eq!(listed[0][1], a.to_str().unwrap());
    let vi = virsh_ok(&d, &["vol-info", "--pool", "images", "a.qcow2"]);
    assert_eq!((field(&vi, "Type:"), field(&vi, "Capacity:")), ("file".into(), "1.00 GiB".into()));
    let vx = virsh_ok(&d, &["vol-dumpxml", "--pool", "images", "c.qcow2"]);
    assert!(vx.contains("<capacity unit='bytes'>1073741824</capacity>") && vx.contains("<format type='qcow2'/>") && vx.contains(&format!("<backingStore>\n    <path>{}</path>", a.display())), "{vx}");
    assert_eq!(virsh_ok(&d, &["vol-path", "--pool", "images", "a.qcow2"]).trim(), a.to_str().unwrap());
    assert_eq!(virsh_ok(&d, &["vol-key", "--pool", "images", "a.qcow2"]).trim(), a.to_str().unwrap());
    assert_eq!(field(&virsh_ok(&d, &["vol-info", a.to_str().unwrap()]), "Name:"), "a.qcow2", "found by its path");
    assert_eq!(virsh_ok(&d, &["vol-pool", a.to_str().unwrap()]).trim(), "images");

    // A file made by hand is a volume; a symlink (to a host file) never is.
    assert!(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(images.join("hand.qcow2")).arg("32M").status().unwrap().success());
    std::os::unix::fs::symlink("/etc/passwd", images.join("link")).unwrap();
    virsh_ok(&d, &["pool-refresh", "images"]);
    let names = virsh_ok(&d, &["vol-list", "images"]);
    assert!(names.contains("hand.qcow2") && !names.contains("link"), "{names}");
    assert_eq!(field(&virsh_ok(&d, &["vol-info", "--pool", "images", "hand.qcow2"]), "Capacity:"), "32.00 MiB");
    virsh_fails(&d, &["vol-wipe", "--pool", "images", "link"], "Storage volume not found");
    virsh_fails(&d, &["vol-delete", "--pool", "images", "link"], "Storage volume not found");

    // Resize, clone, wipe, delete.
    virsh_ok(&d, &["vol-resize", "--pool", "images", "a.qcow2", "2G"]);
    assert_eq!(qemu_info(&a)["virtual-size"].as_u64(), Some(2 << 30));
    virsh_fails(&d, &["vol-resize", "--pool", "images", "a.qcow2", "1G"], "shrink");
    virsh_ok(&d, &["vol-resize", "--pool", "images", "a.qcow2", "1G", "--shrink"]);
    virsh_ok(&d, &["vol-resize", "--pool", "images", "b.raw", "+64M", "--delta"]);
    assert_eq!(std::fs::metadata(&b).unwrap().len(), 128 << 20);
    assert!(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 0 1M"]).arg(&a).stdout(Stdio::null()).status().unwrap().success());
    assert!(virsh_ok(&d, &["vol-clone", "--pool", "images", "a.qcow2", "e.qcow2"]).contains("Vol e.qcow2 cloned from a.qcow2"));
    let e = images.join("e.qcow2");
    assert!(Command::new("qemu-img").args(["compare", "-q"]).arg(&a).arg(&e).status().unwrap().success(), "the clone reads the same");
    assert!(qemu_check_clean(&e));
    std::fs::write(&b, vec![0x77u8; 1 << 20]).unwrap();
    virsh_ok(&d, &["vol-resize", "--pool", "images", "b.raw", "4M"]);
    virsh_ok(&d, &["vol-wipe", "--pool", "images", "b.raw"]);
    let wiped = std::fs::read(&b).unwrap();
    assert!(wiped.len() == 4 << 20 && wiped.iter().all(|x| *x == 0));
    virsh_ok(&d, &["vol-wipe", "--pool", "images", "a.qcow2"]);
    let ai = qemu_info(&a);
    assert_eq!((ai["format"].as_str(), ai["virtual-size"].as_u64()), (Some("qcow2"), Some(1 << 30)), "still an image of its size");
    assert!(qemu_check_clean(&a));
    let o = Command::new("qemu-io").args(["-f", "qcow2", "-c", "read -P 0 0 1M"]).arg(&a).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("read 1048576/1048576"), "the wiped image reads zeros: {o:?}");
    assert!(virsh_ok(&d, &["vol-delete", "--pool", "images", "c.qcow2"]).contains("Vol c.qcow2 deleted"));
    assert!(!images.join("c.qcow2").exists() && std::fs::symlink_metadata(images.join("link")).is_ok());

    // vol-upload and vol-download carry a file's bytes through libvirt streams, whole or in part.
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let up = dir.join("up.bin");
    std::fs::write(&up, &data).unwrap();
    virsh_ok(&d, &["vol-create-as", "images", "up.raw", "0"]);
    virsh_ok(&d, &["vol-upload", "--pool", "images", "up.raw", up.to_str().unwrap()]);
    assert!(std::fs::read(images.join("up.raw")).unwrap() == data, "the volume holds what was uploaded");
    let down = dir.join("down.bin");
    virsh_ok(&d, &["vol-download", "--pool", "images", "up.raw", down.to_str().unwrap()]);
    assert!(std::fs::read(&down).unwrap() == data, "the download is the volume");
    virsh_ok(&d, &["vol-download", "--pool", "images", "up.raw", down.to_str().unwrap(), "--offset", "1048576", "--length", "4096"]);
    assert!(std::fs::read(&down).unwrap() == data[1 << 20..(1 << 20) + 4096]);
    std::fs::write(&up, b"patched").unwrap();
    virsh_ok(&d, &["vol-upload", "--pool", "images", "up.raw", up.to_str().unwrap(), "--offset", "100"]);
    let now = std::fs::read(images.join("up.raw")).unwrap();
    assert!(now.len() == data.len() && &now[100..107] == b"patched" && now[..100] == data[..100] && now[107..] == data[107..]);
    // A volume another program writes (qemu-io holds its lock) takes no upload.
    let mut holder = Command::new("qemu-io").args(["-f", "raw"]).arg(images.join("up.raw")).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    virsh_fails(&d, &["vol-upload", "--pool", "images", "up.raw", up.to_str().unwrap()], "in use");
    drop(holder.stdin.take());
    let _ = holder.wait();
    assert!(std::fs::read(images.join("up.raw")).unwrap() == now, "nothing was written");
    virsh_ok(&d, &["vol-delete", "--pool", "images", "up.raw"]);

    // A read-only connection looks, never changes.
    let ro = uri(&d, true);
    assert!(virsh_at(&ro, &["vol-list", "images"]).stdout.contains("a.qcow2"));
    let refused = virsh_at(&ro, &["vol-delete", "--pool", "images", "a.qcow2"]);
    assert!(refused.code != 0 && refused.stderr.contains("read only access prevents"), "{refused:?}");
    let refused = virsh_at(&ro, &["vol-download", "--pool", "images", "a.qcow2", down.to_str().unwrap()]);
    assert!(refused.code != 0 && refused.stderr.contains("read only access prevents"), "a disk's bytes are not for read-only connections: {refused:?}");

    // Pools outside the directories domains may write are refused, and nothing is made there.
    let outside = "/var/tmp/rvirt-pool-test-outside";
    virsh_ok(&d, &["pool-define-as", "outside", "dir", "--target", outside]);
    virsh_fails(&d, &["pool-build", "outside"], "outside the directories");
    assert!(!Path::new(outside).exists());
    virsh_fails(&d, &["pool-start", "outside"], "cannot open directory");
    virsh_ok(&d, &["pool-undefine", "outside"]);
    virsh_fails(&d, &["pool-define-as", "again", "dir", "--target", target], "Storage source conflict with pool: 'images'");

    // A transient pool, built and started at once, is gone when destroyed; pool-delete removes an empty directory.
    let scratch_pool = dir.join("scratch");
    virsh_ok(&d, &["pool-create-as", "scratch", "dir", "--target", scratch_pool.to_str().unwrap(), "--build"]);
    assert!(scratch_pool.is_dir());
    assert_eq!(field(&virsh_ok(&d, &["pool-info", "scratch"]), "Persistent:"), "no");
    virsh_ok(&d, &["pool-destroy", "scratch"]);
    virsh_fails(&d, &["pool-info", "scratch"], "Storage pool not found");
    virsh_ok(&d, &["pool-define-as", "scratch", "dir", "--target", scratch_pool.to_str().unwrap()]);
    virsh_ok(&d, &["pool-delete", "scratch"]);
    assert!(!scratch_pool.exists());
    virsh_ok(&d, &["pool-undefine", "scratch"]);

    // A restarted daemon keeps the pool active, and autostarts it.
    d.restart();
    assert_eq!(rows(&virsh_ok(&d, &["pool-list", "--all"])), [["images", "active", "yes"]]);
    virsh_ok(&d, &["pool-destroy", "images"]);
    virsh_fails(&d, &["vol-info", "--pool", "images", "a.qcow2"], "is not active");
    d.restart();
    assert_eq!(rows(&virsh_ok(&d, &["pool-list", "--all"])), [["images", "active", "yes"]], "autostarted");
    virsh_ok(&d, &["pool-autostart", "--disable", "images"]);
    virsh_ok(&d, &["pool-destroy", "images"]);
    virsh_ok(&d, &["pool-undefine", "images"]);
    assert!(virsh_ok(&d, &["pool-list", "--all", "--name"]).trim().is_empty());
    assert!(a.exists(), "a pool's files outlive it");
}

#[test]
fn virt_install_and_python_libvirt_make_volumes_in_a_pool() {
    let dir = scratch("lv-vipool");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let images = dir.join("images");
    virsh_ok(&d, &["pool-define-as", "images", "dir", "--target", images.to_str().unwrap()]);
    virsh_ok(&d, &["pool-build", "images"]);
    virsh_ok(&d, &["pool-start", "images"]);
    let out = Command::new("virt-install")
        .args(["--connect", &uri(&d, false), "--name", "vp", "--memory", "64", "--vcpus", "1", "--import"])
        .arg("--boot")
        .arg(format!("kernel={}", k.idle.display()))
        .args(["--disk", "pool=images,size=1,format=qcow2", "--network", "none", "--graphics", "none", "--noautoconsole", "--osinfo", "linux2022"])
        .stdin(Stdio::null())
        .output()
        .expect("running virt-install (Debian package virtinst)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("Domain creation completed"), "{text}\n--- daemon log ---\n{}", d.log());
    let disk = images.join("vp.qcow2");
    let info = qemu_info(&disk);
    assert_eq!((info["format"].as_str(), info["virtual-size"].as_u64()), (Some("qcow2"), Some(1 << 30)), "{info}");
    let xml = virsh_ok(&d, &["dumpxml", "vp"]);
    assert!(xml.contains(&format!("<source file='{}'", disk.display())), "{xml}");
    assert_eq!(rows(&virsh_ok(&d, &["vol-list", "images"])), [["vp.qcow2", disk.to_str().unwrap()]]);
    // python-libvirt sees the same pool and volume, and makes one the way applications do.
    let script = r#"
import sys, libvirt
c = libvirt.open(sys.argv[1])
p = c.storagePoolLookupByName("images")
assert p.isActive() == 1 and p.isPersistent() == 1, p.info()
state, capacity, allocation, available = p.info()
assert state == libvirt.VIR_STORAGE_POOL_RUNNING and capacity > 0 and available <= capacity
names = [v.name() for v in p.listAllVolumes()]
assert names == ["vp.qcow2"], names
v = p.storageVolLookupByName("vp.qcow2")
assert v.info()[0] == libvirt.VIR_STORAGE_VOL_FILE and v.info()[1] == 1 << 30, v.info()
assert c.storageVolLookupByPath(v.path()).name() == "vp.qcow2"
n = p.createXML("<volume><name>py.raw</name><capacity unit='M'>8</capacity></volume>", 0)
assert n.info()[1] == 8 << 20 and n.key() == n.path()
n.delete(0)
try:
    p.storageVolLookupByName("py.raw")
    raise SystemExit("still there")
except libvirt.libvirtError as e:
    assert e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL, e
print("python-libvirt ok")
"#;
    let out = Command::new("/usr/bin/python3").arg("-c").arg(script).arg(uri(&d, false)).output().expect("python3 (Debian's, with python3-libvirt)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("python-libvirt ok"), "{text}{}\n--- daemon log ---\n{}", String::from_utf8_lossy(&out.stderr), d.log());
    virsh_ok(&d, &["destroy", "vp"]);
    // The volume of a domain that is gone can go too (virsh undefine --remove-all-storage).
    let out = virsh_ok(&d, &["undefine", "vp", "--remove-all-storage"]);
    assert!(out.contains("Volume 'vda'") && out.contains("removed"), "{out}");
    assert!(!disk.exists());
}

#[test]
fn rvirt_manages_pools_and_volumes_as_virsh_does() {
    let dir = scratch("rv-pool");
    let d = Daemon::start(&dir);
    let images = dir.join("images");
    let target = images.to_str().unwrap();
    assert!(d.ok(&["pool-define-as", "images", "dir", "--target", target]).contains("Pool images defined"));
    d.fails(&["pool-define-as", "lvm", "logical", "--target", target], "pool type 'logical' is not supported");
    assert!(d.ok(&["pool-start", "images", "--build"]).contains("Pool images started"));
    d.ok(&["pool-autostart", "images"]);
    assert_eq!(rows(&d.ok(&["pool-list"])), [["images", "active", "yes"]]);
    let info = d.ok(&["pool-info", "images"]);
    assert_eq!((field(&info, "State:"), field(&info, "Persistent:")), ("running".into(), "yes".into()));
    assert!(d.ok(&["pool-dumpxml", "images"]).contains(&format!("<path>{target}</path>")));

    assert!(d.ok(&["vol-create-as", "images", "a.qcow2", "1G", "--format", "qcow2"]).contains("Vol a.qcow2 created"));
    d.ok(&["vol-create-as", "images", "top.qcow2", "1G", "--format", "qcow2", "--backing-vol", "a.qcow2", "--backing-vol-format", "qcow2"]);
    let a = images.join("a.qcow2");
    assert_eq!(qemu_info(&images.join("top.qcow2"))["backing-filename"].as_str(), Some(a.to_str().unwrap()));
    let listed = rows(&d.ok(&["vol-list", "images", "--details"]));
    assert_eq!(listed[0][..5], ["a.qcow2", a.to_str().unwrap(), "file", "1.00", "GiB"]);
    assert_eq!(field(&d.ok(&["vol-info", "a.qcow2", "--pool", "images"]), "Capacity:"), "1.00 GiB");
    assert_eq!(d.ok(&["vol-path", "a.qcow2", "--pool", "images"]).trim(), a.to_str().unwrap());
    assert!(d.ok(&["vol-dumpxml", "top.qcow2", "--pool", "images"]).contains("<backingStore>"));
    d.ok(&["vol-resize", "a.qcow2", "1G", "--pool", "images", "--delta"]);
    assert_eq!(qemu_info(&a)["virtual-size"].as_u64(), Some(2 << 30));
    d.fails(&["vol-resize", "a.qcow2", "1G", "--pool", "images"], "shrink");
    assert!(d.ok(&["vol-clone", "a.qcow2", "b.qcow2", "--pool", "images"]).contains("Vol b.qcow2 cloned from a.qcow2"));
    assert!(qemu_check_clean(&images.join("b.qcow2")));
    d.ok(&["vol-wipe", "b.qcow2", "--pool", "images"]);
    assert!(d.ok(&["vol-delete", "b.qcow2", "--pool", "images"]).contains("Vol b.qcow2 deleted"));
    d.fails(&["vol-info", "b.qcow2", "--pool", "images"], "Storage volume not found");
    d.fails(&["vol-create-as", "images", "x", "1Q"], "unknown unit");

    // The read-only socket lists but changes nothing.
    let ro = Command::new(&bins().rvirt).arg("--connect").arg(dir.join("rvirtd-ro.sock")).args(["vol-delete", "a.qcow2", "--pool", "images"]).output().unwrap();
    assert!(!ro.status.success() && a.exists(), "{}", String::from_utf8_lossy(&ro.stderr));
    d.ok(&["pool-destroy", "images"]);
    d.ok(&["pool-undefine", "images"]);
    assert!(rows(&d.ok(&["pool-list", "--all"])).is_empty());
}
