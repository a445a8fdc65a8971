//! The everyday commands on hand-made guests on this host's /dev/kvm,
//! through both of rvirtd's front ends: Debian's virsh (libvirt's protocol)
//! and rvirt (rvirtd's own socket). Memory through the real balloon device
//! with a driver that has the statistics queue; vCPUs, reset, renaming,
//! descriptions and metadata, devices in the stored definition, link
//! state, block sizes and list filters.

mod support;

use std::time::{Duration, Instant};

use rvirt_lab::guests::{bzimage_with, virtio_balloon_stats_driver, STATS_AVAILABLE, STATS_FREE, STATS_TOTAL};
use support::*;

/// The value of `key` in `virsh dommemstat` / `rvirt dommemstat` output.
fn stat(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(&format!("{key} ")).and_then(|v| v.trim().parse().ok()))
}

#[test]
fn memory_goes_through_the_balloon_and_its_statistics_come_fresh() {
    let dir = scratch("ev-memory");
    let d = Daemon::start(&dir);
    let kernel = dir.join("stats.bzImage");
    std::fs::write(&kernel, bzimage_with(&virtio_balloon_stats_driver())).unwrap();
    let f = d.xml_file("mem", &domain_xml("mem", &kernel, "<devices><memballoon model='virtio'/></devices>"));
    d.ok(&["define", f.to_str().unwrap()]);
    d.ok(&["start", "mem"]);

    // The driver posts its figures soon after it starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let out = virsh_ok(&d, &["dommemstat", "mem"]);
        if stat(&out, "unused").is_some() {
            break out;
        }
        assert!(Instant::now() < deadline, "no guest figures:\n{out}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(stat(&first, "unused"), Some(STATS_FREE / 1024), "{first}");
    assert_eq!(stat(&first, "available"), Some(STATS_TOTAL / 1024), "{first}");
    assert_eq!(stat(&first, "usable"), Some(STATS_AVAILABLE / 1024), "{first}");
    assert_eq!(stat(&first, "actual"), Some(65536), "{first}");
    assert!(stat(&first, "rss").is_some_and(|r| r > 0) && stat(&first, "last_update").is_some(), "{first}");
    // Every call asks the driver again: its refill count grows.
    let faults = |t: &str| stat(t, "major_fault").unwrap_or_else(|| panic!("no major_fault in {t}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let again = d.ok(&["dommemstat", "mem"]);
        if faults(&again) > faults(&first) {
            break;
        }
        assert!(Instant::now() < deadline, "no fresh figures: {first} then {again}");
    }

    // setmem: the balloon's target, which the driver acknowledges.
    virsh_ok(&d, &["setmem", "mem", "32768", "--live"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stat(&d.ok(&["dommemstat", "mem"]), "actual") != Some(32768) {
        assert!(Instant::now() < deadline, "the guest did not reach 32 MiB");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(field(&virsh_ok(&d, &["dominfo", "mem"]), "Used memory:"), "32768 KiB");
    assert!(virsh_ok(&d, &["dumpxml", "mem"]).contains("<currentMemory unit='KiB'>32768</currentMemory>"), "the live XML follows");
    assert!(virsh_ok(&d, &["dumpxml", "--inactive", "mem"]).contains("<currentMemory unit='KiB'>65536</currentMemory>"), "the stored one does not");
    d.ok(&["setmem", "mem", "48M", "--live", "--config"]);
    assert!(d.ok(&["dumpxml", "--inactive", "mem"]).contains("<currentMemory unit='KiB'>49152</currentMemory>"));
    virsh_fails(&d, &["setmem", "mem", "131072", "--live"], "more than the domain's maximum memory");
    d.fails(&["setmem", "mem", "1024"], "too little memory");
    // The maximum is fixed while it runs; the stored definition takes it.
    virsh_fails(&d, &["setmaxmem", "mem", "131072"], "no memory hotplug");
    virsh_ok(&d, &["setmaxmem", "mem", "131072", "--config"]);
    assert!(d.ok(&["dumpxml", "--inactive", "mem"]).contains("<memory unit='KiB'>131072</memory>"));
    // domstats: the balloon group carries the driver's figures; both front ends agree on the names.
    let ours = d.ok(&["domstats", "mem", "--balloon", "--vcpu"]);
    let theirs = virsh_ok(&d, &["domstats", "mem", "--balloon", "--vcpu"]);
    for want in ["Domain: 'mem'", "balloon.current=", "balloon.maximum=65536", "balloon.unused=", "balloon.usable=", "balloon.last-update=", "vcpu.current=1", "vcpu.0.state=1", "vcpu.0.time="] {
        assert!(ours.contains(want) && theirs.contains(want), "'{want}' in\n{ours}\nand\n{theirs}");
    }
    let keys = |t: &str| t.lines().filter_map(|l| l.trim().split_once('=').map(|(k, _)| k.to_string())).collect::<Vec<_>>();
    assert_eq!(keys(&ours), keys(&theirs), "the same figures in the same order");
    assert!(d.ok(&["domstats", "--list-active", "--state"]).contains("state.state=1"));
    // The read-only socket refuses changes.
    let o = virsh_at(&uri(&d, true), &["setmem", "mem", "40000", "--live"]);
    assert!(o.code != 0 && o.stderr.contains("read only access prevents"), "{o:?}");
    d.ok(&["destroy", "mem"]);
    virsh_fails(&d, &["dommemstat", "mem"], "domain is not running");
    virsh_fails(&d, &["setmem", "mem", "40000", "--live"], "not running");
}

#[test]
fn vcpus_reset_rename_and_descriptions() {
    let dir = scratch("ev-vcpus");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let serial = dir.join("serial.log");
    let devices = format!("<devices><serial type='file'><source path='{}'/></serial></devices>", serial.display());
    let f = d.xml_file("web", &domain_xml("web", &k.idle, &devices));
    virsh_ok(&d, &["define", f.to_str().unwrap()]);
    virsh_ok(&d, &["start", "web"]);
    let wait_hellos = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::read_to_string(&serial).unwrap_or_default().matches("hello").count() < n {
            assert!(Instant::now() < deadline, "{n} boots: {}", std::fs::read_to_string(&serial).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_hellos(1);

    // vCPUs: the running count is fixed; the stored one changes.
    let count = virsh_ok(&d, &["vcpucount", "web"]);
    for want in [["maximum", "config", "1"], ["maximum", "live", "1"], ["current", "config", "1"], ["current", "live", "1"]] {
        assert!(count.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == want), "{want:?} in\n{count}");
    }
    virsh_fails(&d, &["setvcpus", "web", "2", "--live"], "no vCPU hotplug");
    virsh_ok(&d, &["setvcpus", "web", "2", "--config"]);
    let count = d.ok(&["vcpucount", "web"]);
    assert!(count.contains("current  config          2") && count.contains("current  live            1"), "{count}");
    let info = virsh_ok(&d, &["vcpuinfo", "web"]);
    assert_eq!(field(&info, "VCPU:"), "0");
    assert_eq!(field(&info, "State:"), "running");
    assert!(field(&info, "CPU Affinity:").contains('y'), "{info}");
    let ours = d.ok(&["vcpuinfo", "web"]);
    assert_eq!(field(&ours, "VCPU:"), "0");
    assert!(!field(&ours, "CPU Affinity:").is_empty(), "{ours}");
    let pins = virsh_ok(&d, &["vcpupin", "web", "--config"]);
    assert!(pins.contains(" 0 ") && pins.contains(" 1 "), "two vCPUs in the stored definition: {pins}");

    // reset: the guest starts again (its banner twice), the domain keeps running.
    virsh_ok(&d, &["reset", "web"]);
    wait_hellos(2);
    assert!(d.state("web").starts_with("running"), "{}", d.state("web"));
    d.ok(&["reset", "web"]);
    wait_hellos(3);

    // Descriptions: live and stored apart.
    virsh_ok(&d, &["desc", "web", "--title", "--live", "--new-desc", "Front end"]);
    assert_eq!(virsh_ok(&d, &["desc", "web", "--title"]).trim(), "Front end");
    assert!(virsh_ok(&d, &["desc", "web", "--title", "--config"]).contains("No title"), "the stored definition has none");
    d.ok(&["desc", "web", "--config", "--new-desc", "serves & caches\nline two"]);
    assert_eq!(virsh_ok(&d, &["desc", "web", "--config"]).trim_end(), "serves & caches\nline two");
    assert!(d.ok(&["dumpxml", "--inactive", "web"]).contains("<description>serves &amp; caches\nline two</description>"));
    // (virsh refuses that itself; rvirtd does for every client.)
    virsh_fails(&d, &["desc", "web", "--title", "--new-desc", "two\nlines"], "can't contain newlines");
    d.fails(&["desc", "web", "--title", "--new-desc", "two\nlines"], "one line");
    // Metadata: an application's element, by namespace.
    let uri_app = "http://example.org/app/1.0";
    virsh_ok(&d, &["metadata", "web", uri_app, "--key", "app", "--set", "<app owner='ops'><tier>web</tier></app>", "--config"]);
    let m = virsh_ok(&d, &["metadata", "web", uri_app, "--config"]);
    assert!(m.contains("owner='ops'") && m.contains("<tier>web</tier>"), "{m}");
    assert!(d.ok(&["metadata", "web", uri_app, "--config"]).contains("<tier>web</tier>"));
    virsh_fails(&d, &["metadata", "web", "http://example.org/other", "--config"], "metadata not found");
    virsh_ok(&d, &["metadata", "web", uri_app, "--remove", "--config"]);
    virsh_fails(&d, &["metadata", "web", uri_app, "--config"], "metadata not found");

    // domrename: only stopped; the autostart mark follows.
    virsh_fails(&d, &["domrename", "web", "www"], "only a stopped domain");
    virsh_ok(&d, &["destroy", "web"]);
    virsh_ok(&d, &["autostart", "web"]);
    virsh_ok(&d, &["domrename", "web", "www"]);
    assert!(virsh_ok(&d, &["dumpxml", "www"]).contains("<name>www</name>"));
    assert_eq!(field(&virsh_ok(&d, &["dominfo", "www"]), "Autostart:"), "enable");
    virsh_fails(&d, &["dominfo", "web"], "failed to get domain 'web'");
    d.fails(&["domrename", "www", "42"], "not a valid name");
    let f2 = d.xml_file("other", &domain_xml("other", &k.idle, ""));
    d.ok(&["define", f2.to_str().unwrap()]);
    d.fails(&["domrename", "www", "other"], "already exists");
    // The rename and the new vCPU count survive a daemon restart.
    let mut d = d;
    d.restart();
    assert!(d.ok(&["dumpxml", "www"]).contains("<vcpu>2</vcpu>"));

    // It is marked for autostart under its new name: the restarted daemon starts it.
    d.wait_state("www", "running");
    // List filters, as virsh filters.
    assert_eq!(d.ok(&["list", "--state-running", "--name"]).trim(), "www");
    assert_eq!(virsh_ok(&d, &["list", "--state-running", "--name"]).trim(), "www");
    assert_eq!(d.ok(&["list", "--inactive", "--name"]).trim(), "other");
    assert_eq!(virsh_ok(&d, &["list", "--inactive", "--name"]).trim(), "other");
    assert_eq!(d.ok(&["list", "--autostart", "--name"]).trim(), "www");
    let uuid = virsh_ok(&d, &["domuuid", "www"]).trim().to_string();
    assert!(d.ok(&["list", "--all", "--uuid"]).lines().any(|l| l.trim() == uuid));
    assert!(d.ok(&["list", "--state-shutoff"]).contains("other") && !d.ok(&["list", "--state-shutoff"]).contains("www"));
}

#[test]
fn devices_in_the_stored_definition_links_and_block_sizes() {
    let dir = scratch("ev-devices");
    let d = Daemon::start_in_netns(&dir);
    let k = kernels(&dir);
    let disk = dir.join("data.qcow2");
    let made = std::process::Command::new(&bins().img).args(["create", "-f", "qcow2"]).arg(&disk).arg("10M").output().unwrap();
    assert!(made.status.success(), "{made:?}");
    let root = dir.join("root.raw");
    std::fs::write(&root, vec![0u8; 1 << 20]).unwrap();
    let devices = format!(
        "<devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda'/></disk>\
         <interface type='ethernet'><mac address='52:54:00:00:00:31'/><target dev='evtap0'/></interface></devices>",
        root.display()
    );
    let f = d.xml_file("box", &domain_xml("box", &k.idle, &devices));
    virsh_ok(&d, &["define", f.to_str().unwrap()]);

    // attach and detach in the stored definition (virsh's own XML builders).
    virsh_ok(&d, &["attach-disk", "box", disk.to_str().unwrap(), "vdb", "--driver", "qemu", "--subdriver", "qcow2", "--config"]);
    let list = virsh_ok(&d, &["domblklist", "box"]);
    assert!(list.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["vdb", disk.to_str().unwrap()]), "{list}");
    assert!(d.ok(&["domblklist", "box"]).contains(disk.to_str().unwrap()));
    virsh_fails(&d, &["attach-disk", "box", disk.to_str().unwrap(), "vdb", "--config"], "already used");
    virsh_ok(&d, &["attach-interface", "box", "bridge", "br-none", "--mac", "52:54:00:00:00:32", "--model", "virtio", "--config"]);
    let ifs = virsh_ok(&d, &["domiflist", "box"]);
    assert!(ifs.contains("52:54:00:00:00:32") && ifs.contains("br-none"), "{ifs}");
    virsh_ok(&d, &["detach-interface", "box", "bridge", "--mac", "52:54:00:00:00:32", "--config"]);
    assert!(!virsh_ok(&d, &["domiflist", "box"]).contains("52:54:00:00:00:32"));
    let dev = dir.join("cdrom.xml");
    std::fs::write(&dev, "<disk type='file' device='cdrom'><target dev='sdc' bus='scsi'/><readonly/></disk>").unwrap();
    d.ok(&["attach-device", "box", dev.to_str().unwrap(), "--config"]);
    assert!(d.ok(&["domblklist", "box", "--details"]).lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["file", "cdrom", "sdc", "-"]));
    d.ok(&["detach-device", "box", dev.to_str().unwrap(), "--config"]);
    let graphics = dir.join("graphics.xml");
    std::fs::write(&graphics, "<graphics type='vnc'/>").unwrap();
    virsh_fails(&d, &["attach-device", "box", graphics.to_str().unwrap(), "--config"], "cannot be attached");

    // domblkinfo: the qcow2's guest size, what it takes on the host, the file's size.
    let info = virsh_ok(&d, &["domblkinfo", "box", "vdb"]);
    assert_eq!(field(&info, "Capacity:"), "10485760");
    assert_eq!(field(&info, "Physical:"), std::fs::metadata(&disk).unwrap().len().to_string());
    assert!(field(&info, "Allocation:").parse::<u64>().unwrap() > 0);
    assert_eq!(field(&d.ok(&["domblkinfo", "box", disk.to_str().unwrap()]), "Capacity:"), "10485760");
    virsh_fails(&d, &["domblkinfo", "box", "vdz"], "has no disk 'vdz'");
    // rvirtd reads a disk for domblkinfo only where the domain could read it.
    virsh_ok(&d, &["attach-disk", "box", "/etc/shadow", "vdc", "--config"]);
    virsh_fails(&d, &["domblkinfo", "box", "vdc"], "is outside the directories domains may use");
    virsh_ok(&d, &["detach-disk", "box", "vdc", "--config"]);

    // A running domain: no hotplug yet, said so; links go up and down live.
    virsh_ok(&d, &["start", "box"]);
    virsh_fails(&d, &["attach-disk", "box", disk.to_str().unwrap(), "vdc"], "hotplug");
    d.fails(&["attach-device", "box", dev.to_str().unwrap()], "no device hotplug yet");
    assert_eq!(virsh_ok(&d, &["domif-getlink", "box", "52:54:00:00:00:31"]).split_whitespace().last(), Some("up"));
    virsh_ok(&d, &["domif-setlink", "box", "52:54:00:00:00:31", "down"]);
    assert_eq!(virsh_ok(&d, &["domif-getlink", "box", "52:54:00:00:00:31"]).split_whitespace().last(), Some("down"));
    assert!(virsh_ok(&d, &["dumpxml", "box"]).contains("<link state='down'/>"));
    d.fails(&["domif-setlink", "box", "evtap0", "sideways"], "link state 'sideways' is not up or down");
    d.fails(&["domif-setlink", "box", "nosuch0", "down"], "has no card 'nosuch0'");
    d.ok(&["domif-setlink", "box", "evtap0", "up"]);
    assert!(!d.ok(&["dumpxml", "box"]).contains("<link state='down'/>"));
    // The stored definition's link state reaches the VMM at the next start.
    d.ok(&["domif-setlink", "box", "52:54:00:00:00:31", "down", "--config"]);
    virsh_ok(&d, &["destroy", "box"]);
    virsh_ok(&d, &["start", "box"]);
    assert!(virsh_ok(&d, &["dumpxml", "box"]).contains("<link state='down'/>"));
    // The VMM gets its configuration as one value (`--config FILE`): the card starts with its cable out.
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", d.vmm_pid("box"))).unwrap();
    let args: Vec<&str> = cmdline.split('\0').collect();
    let config = args.iter().position(|a| *a == "--config").and_then(|i| args.get(i + 1)).unwrap_or_else(|| panic!("{args:?}"));
    let cfg = rvirt_api::config::VmConfig::from_json(&std::fs::read_to_string(config).unwrap()).unwrap();
    assert!(!cfg.nets[0].link_up, "{cfg:?}");
    // Counters per device: reads and writes apart.
    let stats = d.ok(&["domblkstat", "box", "vda"]);
    assert!(stats.contains("vda rd_req 0") && stats.contains("vda wr_bytes 0"), "{stats}");
    let net = virsh_ok(&d, &["domifstat", "box", "evtap0"]);
    assert!(net.contains("evtap0 rx_packets") && net.contains("evtap0 tx_bytes"), "{net}");
    virsh_ok(&d, &["destroy", "box"]);
}
