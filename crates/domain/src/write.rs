//! Writing a [`DomainXml`] back as libvirt-style XML (`dumpxml`) and as an
//! `rvirt-vmm` command line.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::xml::{BootMenu, CharDevice, DiskBus, DiskSource, DomainXml, ImageFormat, InterfaceKind, LifecycleAction, UnknownElement};

/// Escapes text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

fn p(path: &Path) -> String {
    esc(&path.to_string_lossy())
}

pub(crate) fn unknown_in(out: &mut String, unknown: &[UnknownElement], parent: &str, indent: &str) {
    for u in unknown.iter().filter(|u| u.parent == parent) {
        let _ = writeln!(out, "{indent}{}", u.xml);
    }
}

fn char_device(out: &mut String, tag: &str, dev: &CharDevice, target: &str) {
    let (ty, source) = match dev {
        CharDevice::Pty => ("pty", None),
        CharDevice::Null => ("null", None),
        CharDevice::File(f) => ("file", Some(f)),
    };
    let _ = writeln!(out, "    <{tag} type='{ty}'>");
    if let Some(f) = source {
        let _ = writeln!(out, "      <source path='{}'/>", p(f));
    }
    let _ = writeln!(out, "      {target}");
    let _ = writeln!(out, "    </{tag}>");
}

/// What rvirtd decided for one start of a domain: where the VMM's control
/// socket goes and the tap names it picked for interfaces without one.
#[derive(Clone, Debug)]
pub struct VmmLaunch<'a> {
    /// The `--api-socket` path.
    pub api_socket: &'a Path,
    /// One tap name per interface, in order.
    pub taps: &'a [String],
    /// Each tap's descriptor, opened by the daemon and inherited by the VMM,
    /// in the same order (empty: the VMM opens the taps by name).
    pub tap_fds: &'a [i32],
    /// One backing chain per disk, in order (top first; empty for none),
    /// resolved by the daemon so the VMM opens no file named in an image.
    pub chains: &'a [Vec<(PathBuf, ImageFormat)>],
}

impl DomainXml {
    /// The definition as libvirt-style XML; unknown elements come back
    /// verbatim where they were.
    pub fn to_xml(&self) -> String {
        let mut o = String::new();
        let mut decls = String::new();
        for (prefix, uri) in &self.namespaces {
            match prefix {
                Some(p) => decls += &format!(" xmlns:{}='{}'", esc(p), esc(uri)),
                None => decls += &format!(" xmlns='{}'", esc(uri)),
            }
        }
        let _ = writeln!(o, "<domain type='{}'{decls}>", if self.emulated { "qemu" } else { "kvm" });
        let _ = writeln!(o, "  <name>{}</name>", esc(&self.name));
        let _ = writeln!(o, "  <uuid>{}</uuid>", self.uuid);
        let _ = writeln!(o, "  <memory unit='KiB'>{}</memory>", self.memory_kib);
        let _ = writeln!(o, "  <currentMemory unit='KiB'>{}</currentMemory>", self.current_memory_kib);
        let _ = writeln!(o, "  <vcpu>{}</vcpu>", self.vcpus);
        self.tuning_xml(&mut o);
        let fw = &self.firmware;
        match &fw.os_firmware {
            Some(f) => {
                let _ = writeln!(o, "  <os firmware='{}'>", esc(f));
            }
            None => {
                let _ = writeln!(o, "  <os>");
            }
        }
        let machine = self.machine.as_deref().map(|m| format!(" machine='{}'", esc(m))).unwrap_or_default();
        let _ = writeln!(o, "    <type arch='{}'{machine}>hvm</type>", esc(self.arch.as_deref().unwrap_or("x86_64")));
        if let Some(l) = &fw.loader {
            let _ = writeln!(o, "    <loader type='rom'>{}</loader>", p(l));
        }
        if let Some(k) = &self.kernel {
            let _ = writeln!(o, "    <kernel>{}</kernel>", p(k));
        }
        if let Some(i) = &self.initrd {
            let _ = writeln!(o, "    <initrd>{}</initrd>", p(i));
        }
        if let Some(c) = &self.cmdline {
            let _ = writeln!(o, "    <cmdline>{}</cmdline>", esc(c));
        }
        for d in &fw.boot_devs {
            let _ = writeln!(o, "    <boot dev='{}'/>", d.name());
        }
        if let Some(m) = &fw.bootmenu {
            let timeout = m.timeout_ms.map(|t| format!(" timeout='{t}'")).unwrap_or_default();
            let _ = writeln!(o, "    <bootmenu enable='{}'{timeout}/>", if m.enable { "yes" } else { "no" });
        }
        if fw.bios_useserial.is_some() || fw.reboot_timeout_ms.is_some() {
            let mut bios = String::from("<bios");
            if let Some(u) = fw.bios_useserial {
                bios += if u { " useserial='yes'" } else { " useserial='no'" };
            }
            if let Some(t) = fw.reboot_timeout_ms {
                bios += &format!(" rebootTimeout='{t}'");
            }
            let _ = writeln!(o, "    {bios}/>");
        }
        unknown_in(&mut o, &self.unknown, "os", "    ");
        let _ = writeln!(o, "  </os>");
        unknown_in(&mut o, &self.unknown, "domain", "  ");
        let _ = writeln!(o, "  <on_poweroff>{}</on_poweroff>", self.on_poweroff.name());
        let _ = writeln!(o, "  <on_reboot>{}</on_reboot>", self.on_reboot.name());
        let _ = writeln!(o, "  <on_crash>{}</on_crash>", self.on_crash.name());
        let _ = writeln!(o, "  <devices>");
        for d in &self.disks {
            let (ty, key) = match d.source_kind {
                DiskSource::File => ("file", "file"),
                DiskSource::Block => ("block", "dev"),
            };
            let _ = writeln!(o, "    <disk type='{ty}' device='{}'>", if d.cdrom { "cdrom" } else { "disk" });
            let mut driver = String::from("<driver name='rvirt'");
            if let Some(f) = d.format {
                driver += match f {
                    ImageFormat::Raw => " type='raw'",
                    ImageFormat::Qcow2 => " type='qcow2'",
                };
            }
            if d.direct {
                driver += " cache='none'";
            }
            let _ = writeln!(o, "      {driver}/>");
            if !d.path.as_os_str().is_empty() {
                let _ = writeln!(o, "      <source {key}='{}'/>", p(&d.path));
            }
            let _ = writeln!(o, "      <target dev='{}' bus='{}'/>", esc(&d.target), d.bus.name());
            if d.readonly {
                let _ = writeln!(o, "      <readonly/>");
            }
            if d.shareable {
                let _ = writeln!(o, "      <shareable/>");
            }
            if let Some(s) = &d.serial {
                let _ = writeln!(o, "      <serial>{}</serial>", esc(s));
            }
            if let Some(b) = d.boot_order {
                let _ = writeln!(o, "      <boot order='{b}'/>");
            }
            let _ = writeln!(o, "    </disk>");
        }
        for i in &self.interfaces {
            match &i.kind {
                InterfaceKind::Ethernet => {
                    let _ = writeln!(o, "    <interface type='ethernet'>");
                }
                InterfaceKind::Bridge(b) => {
                    let _ = writeln!(o, "    <interface type='bridge'>");
                    let _ = writeln!(o, "      <source bridge='{}'/>", esc(b));
                }
                InterfaceKind::Network(n) => {
                    let _ = writeln!(o, "    <interface type='network'>");
                    let _ = writeln!(o, "      <source network='{}'/>", esc(n));
                }
                InterfaceKind::Direct { dev, mode } => {
                    let _ = writeln!(o, "    <interface type='direct'>");
                    let _ = writeln!(o, "      <source dev='{}' mode='{}'/>", esc(dev), esc(mode));
                }
            }
            if let Some(m) = &i.mac {
                let _ = writeln!(o, "      <mac address='{}'/>", esc(m));
            }
            if let Some(t) = &i.tap {
                let _ = writeln!(o, "      <target dev='{}'/>", esc(t));
            }
            let _ = writeln!(o, "      <model type='{}'/>", esc(i.model.as_deref().unwrap_or("virtio")));
            if let Some(b) = i.boot_order {
                let _ = writeln!(o, "      <boot order='{b}'/>");
            }
            let _ = writeln!(o, "    </interface>");
        }
        if let Some(s) = &self.serial {
            char_device(&mut o, "serial", s, "<target port='0'/>");
            char_device(&mut o, "console", s, "<target type='serial' port='0'/>");
        }
        if let Some(c) = &self.virtio_console {
            char_device(&mut o, "console", c, "<target type='virtio' port='0'/>");
        }
        if self.rng {
            let _ = writeln!(o, "    <rng model='virtio'>");
            let _ = writeln!(o, "      <backend model='random'>/dev/urandom</backend>");
            let _ = writeln!(o, "    </rng>");
        }
        let _ = writeln!(o, "    <memballoon model='{}'/>", if self.memballoon { "virtio" } else { "none" });
        unknown_in(&mut o, &self.unknown, "devices", "    ");
        let _ = writeln!(o, "  </devices>");
        let _ = writeln!(o, "</domain>");
        o
    }

    /// This definition with each `<interface type='network'>` turned into
    /// the bridge its network has now (`bridge_of`), as the VMM is started:
    /// the VMM knows bridges, not rvirt's networks.
    pub fn with_network_bridges(&self, bridge_of: impl Fn(&str) -> Result<String, String>) -> Result<DomainXml, String> {
        let mut d = self.clone();
        for i in &mut d.interfaces {
            if let InterfaceKind::Network(n) = &i.kind {
                i.kind = InterfaceKind::Bridge(bridge_of(n)?);
            }
        }
        Ok(d)
    }

    /// The `rvirt-vmm` arguments that run this domain (network interfaces
    /// resolved first with [`DomainXml::with_network_bridges`]).
    pub fn vmm_args(&self, launch: &VmmLaunch) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--uuid".into(),
            self.uuid.to_string(),
            "--cpus".into(),
            self.vcpus.to_string(),
            "--memory".into(),
            format!("{}K", self.memory_kib),
            "--api-socket".into(),
            launch.api_socket.to_string_lossy().into_owned(),
            "--on-reboot".into(),
            if self.on_reboot == LifecycleAction::Restart { "restart" } else { "exit" }.into(),
            "--serial".into(),
            match &self.serial {
                Some(c) => char_mode(c),
                None => "null".into(),
            },
        ];
        match &self.kernel {
            Some(k) => {
                a.extend(["--kernel".into(), k.to_string_lossy().into_owned()]);
                if let Some(i) = &self.initrd {
                    a.extend(["--initrd".into(), i.to_string_lossy().into_owned()]);
                }
                if let Some(c) = &self.cmdline {
                    a.extend(["--cmdline".into(), c.clone()]);
                }
            }
            None => a.extend(self.firmware_args()),
        }
        let fmt = |f: ImageFormat| if f == ImageFormat::Raw { "raw" } else { "qcow2" };
        // Commas in values are doubled, as QEMU-style options expect.
        let escape = |p: &Path| p.to_string_lossy().replace(',', ",,");
        for (i, d) in self.disks.iter().enumerate() {
            // A disk without a format is raw: the VMM is told so, never left to guess.
            let mut spec = if d.path.as_os_str().is_empty() {
                String::from("media=cdrom")
            } else {
                format!("path={},format={}", escape(&d.path), fmt(d.format.unwrap_or(ImageFormat::Raw)))
            };
            if d.cdrom && !d.path.as_os_str().is_empty() {
                spec += ",media=cdrom";
            } else if !d.cdrom && d.bus != DiskBus::Virtio {
                spec += ",bus=scsi";
            }
            for (path, f) in launch.chains.get(i).map(Vec::as_slice).unwrap_or_default() {
                spec += &format!(",backing={}:{}", escape(path), fmt(*f));
            }
            if d.shareable && !d.cdrom {
                spec += ",shareable=on";
            }
            if d.readonly && !d.cdrom {
                spec += ",readonly=on";
            }
            if d.direct && !d.cdrom {
                spec += ",direct=on";
            }
            if let Some(s) = &d.serial {
                spec += &format!(",serial={s}");
            }
            // The firmware's bootorder ranks from 0; libvirt's orders start at 1.
            if let (None, Some(b)) = (&self.kernel, d.boot_order) {
                spec += &format!(",boot={}", b.saturating_sub(1).min(u32::from(u16::MAX)));
            }
            a.extend(["--disk".into(), spec]);
        }
        for (n, (i, tap)) in self.interfaces.iter().zip(launch.taps).enumerate() {
            let mut spec = format!("tap={tap}");
            if let Some(fd) = launch.tap_fds.get(n) {
                spec += &format!(",fd={fd}");
            }
            if let Some(m) = &i.mac {
                spec += &format!(",mac={m}");
            }
            if let InterfaceKind::Bridge(b) = &i.kind {
                spec += &format!(",bridge={b}");
            }
            a.extend(["--net".into(), spec]);
        }
        if self.rng {
            a.push("--rng".into());
        }
        if self.memballoon {
            a.push("--balloon".into());
        }
        if let Some(c) = &self.virtio_console {
            a.extend(["--console".into(), char_mode(c)]);
        }
        for (v, set) in &self.tuning.vcpupin {
            a.extend(["--vcpu-pin".into(), format!("{v}:{}", set.list())]);
        }
        if let Some(set) = &self.tuning.emulatorpin {
            a.extend(["--emulator-pin".into(), set.list()]);
        }
        a
    }
}

impl DomainXml {
    /// The VMM arguments for firmware boot: the loader, `<boot dev>` as
    /// letters, the boot menu and the reboot timeout.
    fn firmware_args(&self) -> Vec<String> {
        let fw = &self.firmware;
        let mut a = Vec::new();
        if let Some(l) = &fw.loader {
            a.extend(["--firmware".into(), l.to_string_lossy().into_owned()]);
        }
        // CMOS holds three classes; libvirt allows four (the fourth is never reached in practice).
        let order: String = fw.boot_devs.iter().take(3).map(|d| d.letter()).collect();
        if !order.is_empty() {
            a.extend(["--boot-order".into(), order]);
        }
        if let Some(BootMenu { enable: true, timeout_ms }) = fw.bootmenu {
            // libvirt's default wait when no timeout is given is the firmware's (SeaBIOS: 2.5 s).
            a.extend(["--boot-menu".into(), timeout_ms.unwrap_or(2500).to_string()]);
        }
        if let Some(t) = fw.reboot_timeout_ms {
            if let Ok(ms) = u32::try_from(t) {
                a.extend(["--reboot-timeout".into(), ms.to_string()]);
            }
        }
        a
    }
}

fn char_mode(c: &CharDevice) -> String {
    match c {
        CharDevice::Pty => "pty".into(),
        CharDevice::Null => "null".into(),
        CharDevice::File(f) => format!("file={}", f.to_string_lossy()),
    }
}
