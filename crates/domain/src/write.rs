//! Writing a [`DomainXml`] back as libvirt-style XML (`dumpxml`) and as
//! the VM configuration `rvirt-vmm` runs.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use rvirt_api::config::VmConfig;

use crate::xml::{BootMenu, CharDevice, DiskBus, DiskSource, DomainXml, ImageFormat, InterfaceKind, Kept, KeptXml, LifecycleAction, UnknownElement, VIRTIO_CONSOLE};

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

pub(crate) fn unknown_in(out: &mut String, unknown: &[UnknownElement], parent: &str, indent: &str) {
    for u in unknown.iter().filter(|u| u.parent == parent) {
        let _ = writeln!(out, "{indent}{}", u.xml);
    }
}

/// Attributes as written: rvirt's own, then the kept ones.
fn attrs_xml(own: &[(&str, String)], kept: Option<&Kept>) -> String {
    let mut a = String::new();
    for (n, v) in own.iter().map(|(n, v)| (*n, v.as_str())).chain(kept.into_iter().flat_map(|k| k.attrs.iter().map(|(n, v)| (n.as_str(), v.as_str())))) {
        let _ = write!(a, " {n}='{}'", esc(v));
    }
    a
}

/// An element's start tag on a line of its own.
fn start(o: &mut String, indent: &str, name: &str, own: &[(&str, String)], kept: Option<&Kept>) {
    let _ = writeln!(o, "{indent}<{name}{}>", attrs_xml(own, kept));
}

/// An element's kept children, then its end tag.
fn end(o: &mut String, indent: &str, name: &str, kept: Option<&Kept>) {
    for c in kept.into_iter().flat_map(|k| k.children.iter()) {
        let _ = writeln!(o, "{indent}  {}", c.xml);
    }
    let _ = writeln!(o, "{indent}</{name}>");
}

/// An element with text or nothing inside (kept children follow the text).
fn leaf(o: &mut String, indent: &str, name: &str, own: &[(&str, String)], text: Option<&str>, kept: Option<&Kept>) {
    let attrs = attrs_xml(own, kept);
    let children = kept.map(|k| k.children.as_slice()).unwrap_or_default();
    match text {
        Some(t) => {
            let _ = write!(o, "{indent}<{name}{attrs}>{}", esc(t));
            for c in children {
                o.push_str(&c.xml);
            }
            let _ = writeln!(o, "</{name}>");
        }
        None if children.is_empty() => {
            let _ = writeln!(o, "{indent}<{name}{attrs}/>");
        }
        None => {
            let _ = writeln!(o, "{indent}<{name}{attrs}>");
            end(o, indent, name, kept);
        }
    }
}

fn own(attrs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    attrs.iter().map(|(n, v)| (*n, v.to_string())).collect()
}

/// A serial port or console: `path` names its kept parts.
fn char_device(o: &mut String, tag: &str, dev: &CharDevice, target: &[(&'static str, &str)], kept: &KeptXml, path: &str) {
    let (ty, source) = match dev {
        CharDevice::Pty => ("pty", None),
        CharDevice::Null => ("null", None),
        CharDevice::File(f) => ("file", Some(f)),
    };
    start(o, "    ", tag, &own(&[("type", ty)]), kept.get(path));
    if let Some(f) = source {
        leaf(o, "      ", "source", &own(&[("path", &f.to_string_lossy())]), None, kept.get(&format!("{path}/source")));
    }
    leaf(o, "      ", "target", &own(target), None, kept.get(&format!("{path}/target")));
    end(o, "    ", tag, kept.get(path));
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
    /// The definition as libvirt-style XML; unknown elements, and the
    /// attributes and children rvirt does not act on, come back verbatim
    /// where they were. Writing what this writes gives the same bytes again.
    pub fn to_xml(&self) -> String {
        let mut o = String::new();
        let k = &self.kept;
        let mut decls = String::new();
        for (prefix, uri) in &self.namespaces {
            match prefix {
                Some(p) => decls += &format!(" xmlns:{}='{}'", esc(p), esc(uri)),
                None => decls += &format!(" xmlns='{}'", esc(uri)),
            }
        }
        let _ = writeln!(o, "<domain type='{}'{decls}{}>", if self.emulated { "qemu" } else { "kvm" }, attrs_xml(&[], k.get("domain")));
        leaf(&mut o, "  ", "name", &[], Some(&self.name), k.get("name"));
        leaf(&mut o, "  ", "uuid", &[], Some(&self.uuid.to_string()), k.get("uuid"));
        if let Some(t) = &self.title {
            leaf(&mut o, "  ", "title", &[], Some(t), k.get("title"));
        }
        if let Some(d) = &self.description {
            leaf(&mut o, "  ", "description", &[], Some(d), k.get("description"));
        }
        let unit = || own(&[("unit", "KiB")]);
        leaf(&mut o, "  ", "memory", &unit(), Some(&self.memory_kib.to_string()), k.get("memory"));
        leaf(&mut o, "  ", "currentMemory", &unit(), Some(&self.current_memory_kib.to_string()), k.get("currentMemory"));
        leaf(&mut o, "  ", "vcpu", &[], Some(&self.vcpus.to_string()), k.get("vcpu"));
        self.tuning_xml(&mut o);
        let fw = &self.firmware;
        let os_attrs = fw.os_firmware.as_deref().map(|f| own(&[("firmware", f)])).unwrap_or_default();
        start(&mut o, "  ", "os", &os_attrs, k.get("os"));
        let mut ty = own(&[("arch", self.arch.as_deref().unwrap_or("x86_64"))]);
        if let Some(m) = &self.machine {
            ty.push(("machine", m.clone()));
        }
        leaf(&mut o, "    ", "type", &ty, Some("hvm"), k.get("os/type"));
        if let Some(l) = &fw.loader {
            leaf(&mut o, "    ", "loader", &own(&[("type", "rom")]), Some(&l.to_string_lossy()), k.get("os/loader"));
        }
        for (tag, v) in [("kernel", self.kernel.as_ref()), ("initrd", self.initrd.as_ref())] {
            if let Some(v) = v {
                leaf(&mut o, "    ", tag, &[], Some(&v.to_string_lossy()), k.get(&format!("os/{tag}")));
            }
        }
        if let Some(c) = &self.cmdline {
            leaf(&mut o, "    ", "cmdline", &[], Some(c), k.get("os/cmdline"));
        }
        for d in &fw.boot_devs {
            leaf(&mut o, "    ", "boot", &own(&[("dev", d.name())]), None, None);
        }
        if let Some(m) = &fw.bootmenu {
            let mut a = own(&[("enable", if m.enable { "yes" } else { "no" })]);
            if let Some(t) = m.timeout_ms {
                a.push(("timeout", t.to_string()));
            }
            leaf(&mut o, "    ", "bootmenu", &a, None, k.get("os/bootmenu"));
        }
        if fw.bios_useserial.is_some() || fw.reboot_timeout_ms.is_some() {
            let mut a = Vec::new();
            if let Some(u) = fw.bios_useserial {
                a.push(("useserial", if u { "yes" } else { "no" }.to_string()));
            }
            if let Some(t) = fw.reboot_timeout_ms {
                a.push(("rebootTimeout", t.to_string()));
            }
            leaf(&mut o, "    ", "bios", &a, None, k.get("os/bios"));
        }
        unknown_in(&mut o, &self.unknown, "os", "    ");
        end(&mut o, "  ", "os", k.get("os"));
        unknown_in(&mut o, &self.unknown, "domain", "  ");
        for (tag, a) in [("on_poweroff", self.on_poweroff), ("on_reboot", self.on_reboot), ("on_crash", self.on_crash)] {
            leaf(&mut o, "  ", tag, &[], Some(a.name()), k.get(tag));
        }
        start(&mut o, "  ", "devices", &[], k.get("devices"));
        for d in &self.disks {
            let dk = &d.kept;
            let ty = match d.source_kind {
                DiskSource::File => "file",
                DiskSource::Block => "block",
            };
            start(&mut o, "    ", "disk", &own(&[("type", ty), ("device", if d.cdrom { "cdrom" } else { "disk" })]), dk.get(""));
            let mut driver = Vec::new();
            if let Some(f) = d.format {
                driver.push(("type", f.name().to_string()));
            }
            if d.direct && dk.get("driver").and_then(|k| k.attr("cache")).is_none() {
                driver.push(("cache", "none".to_string()));
            }
            if !driver.is_empty() || dk.get("driver").is_some() {
                leaf(&mut o, "      ", "driver", &driver, None, dk.get("driver"));
            }
            if !d.path.as_os_str().is_empty() {
                let key = if d.source_kind == DiskSource::File { "file" } else { "dev" };
                leaf(&mut o, "      ", "source", &own(&[(key, &d.path.to_string_lossy())]), None, dk.get("source"));
            }
            leaf(&mut o, "      ", "target", &own(&[("dev", &d.target), ("bus", d.bus.name())]), None, dk.get("target"));
            if d.readonly {
                leaf(&mut o, "      ", "readonly", &[], None, dk.get("readonly"));
            }
            if d.shareable {
                leaf(&mut o, "      ", "shareable", &[], None, dk.get("shareable"));
            }
            if let Some(s) = &d.serial {
                leaf(&mut o, "      ", "serial", &[], Some(s), dk.get("serial"));
            }
            if let Some(b) = d.boot_order {
                leaf(&mut o, "      ", "boot", &own(&[("order", &b.to_string())]), None, dk.get("boot"));
            }
            end(&mut o, "    ", "disk", dk.get(""));
        }
        for i in &self.interfaces {
            let ik = &i.kept;
            let (ty, source) = match &i.kind {
                InterfaceKind::Ethernet => ("ethernet", None),
                InterfaceKind::Bridge(b) => ("bridge", Some(own(&[("bridge", b)]))),
                InterfaceKind::Network(n) => ("network", Some(own(&[("network", n)]))),
                InterfaceKind::Direct { dev, mode } => ("direct", Some(own(&[("dev", dev), ("mode", mode)]))),
            };
            start(&mut o, "    ", "interface", &own(&[("type", ty)]), ik.get(""));
            if let Some(src) = source {
                leaf(&mut o, "      ", "source", &src, None, ik.get("source"));
            }
            if let Some(m) = &i.mac {
                leaf(&mut o, "      ", "mac", &own(&[("address", m)]), None, ik.get("mac"));
            }
            if let Some(t) = &i.tap {
                leaf(&mut o, "      ", "target", &own(&[("dev", t)]), None, ik.get("target"));
            }
            leaf(&mut o, "      ", "model", &own(&[("type", i.model.as_deref().unwrap_or("virtio"))]), None, ik.get("model"));
            if let Some(b) = i.boot_order {
                leaf(&mut o, "      ", "boot", &own(&[("order", &b.to_string())]), None, ik.get("boot"));
            }
            if let Some(up) = i.link_up {
                leaf(&mut o, "      ", "link", &own(&[("state", if up { "up" } else { "down" })]), None, ik.get("link"));
            }
            end(&mut o, "    ", "interface", ik.get(""));
        }
        if let Some(s) = &self.serial {
            char_device(&mut o, "serial", s, &[("port", "0")], k, "devices/serial");
            char_device(&mut o, "console", s, &[("type", "serial"), ("port", "0")], k, "devices/console");
        }
        if let Some(c) = &self.virtio_console {
            char_device(&mut o, "console", c, &[("type", "virtio"), ("port", "0")], k, VIRTIO_CONSOLE);
        }
        if self.rng {
            start(&mut o, "    ", "rng", &own(&[("model", "virtio")]), k.get("devices/rng"));
            let _ = writeln!(o, "      <backend model='random'>/dev/urandom</backend>");
            end(&mut o, "    ", "rng", k.get("devices/rng"));
        }
        leaf(&mut o, "    ", "memballoon", &own(&[("model", if self.memballoon { "virtio" } else { "none" })]), None, k.get("devices/memballoon"));
        unknown_in(&mut o, &self.unknown, "devices", "    ");
        end(&mut o, "  ", "devices", k.get("devices"));
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

    /// The VM configuration that runs this domain (network interfaces
    /// resolved first with [`DomainXml::with_network_bridges`]): the value
    /// rvirtd hands `rvirt-vmm --config`. Fails only for a MAC address or
    /// vCPU count the VMM cannot take.
    pub fn vm_config(&self, launch: &VmmLaunch) -> Result<VmConfig, String> {
        use rvirt_api::config as c;
        let boot = match &self.kernel {
            Some(k) => c::Boot::Kernel {
                kernel: k.clone(),
                initrd: self.initrd.clone(),
                cmdline: self.cmdline.clone().unwrap_or_else(|| c::DEFAULT_CMDLINE.into()),
            },
            None => self.firmware_boot(),
        };
        let mut cfg = VmConfig::with_boot(boot);
        cfg.uuid = Some(*self.uuid.as_bytes());
        cfg.vcpus = u8::try_from(self.vcpus).map_err(|_| format!("{} vCPUs: rvirt-vmm takes at most 254", self.vcpus))?;
        cfg.memory_bytes = self.memory_kib.saturating_mul(1024);
        cfg.api_socket = Some(launch.api_socket.to_path_buf());
        cfg.on_reboot = if self.on_reboot == LifecycleAction::Restart { c::OnReboot::Restart } else { c::OnReboot::Exit };
        cfg.serial = self.serial.as_ref().map_or(c::SerialMode::Null, char_mode);
        let fmt = |f: ImageFormat| if f == ImageFormat::Raw { c::ImageFormat::Raw } else { c::ImageFormat::Qcow2 };
        for (i, d) in self.disks.iter().enumerate() {
            // A disk without a format is raw: the VMM is told so, never left to guess.
            let mut disk = if d.cdrom {
                c::DiskConfig::cdrom(d.path.clone())
            } else {
                c::DiskConfig {
                    bus: if d.bus == DiskBus::Virtio { c::DiskBus::Virtio } else { c::DiskBus::Scsi },
                    shareable: d.shareable,
                    read_only: d.readonly,
                    direct: d.direct,
                    ..c::DiskConfig::plain(d.path.clone())
                }
            };
            if !d.path.as_os_str().is_empty() {
                disk.format = Some(fmt(d.format.unwrap_or(ImageFormat::Raw)));
            }
            disk.backing = launch.chains.get(i).map(Vec::as_slice).unwrap_or_default().iter().map(|(path, f)| c::BackingFile { path: path.clone(), format: fmt(*f) }).collect();
            disk.serial = d.serial.clone();
            // The firmware's bootorder ranks from 0; libvirt's orders start at 1.
            if let (None, Some(b)) = (&self.kernel, d.boot_order) {
                disk.boot_index = Some(b.saturating_sub(1).min(u32::from(u16::MAX)) as u16);
            }
            cfg.disks.push(disk);
        }
        for (n, (i, tap)) in self.interfaces.iter().zip(launch.taps).enumerate() {
            let mac = i.mac.as_deref().map(|m| parse_mac(m).ok_or_else(|| format!("interface {n}: '{m}' is not a MAC address"))).transpose()?;
            cfg.nets.push(c::NetConfig {
                tap: tap.clone(),
                fd: launch.tap_fds.get(n).copied(),
                mac,
                bridge: match &i.kind {
                    InterfaceKind::Bridge(b) => Some(b.clone()),
                    _ => None,
                },
                link_up: i.link_up != Some(false),
            });
        }
        cfg.rng = self.rng;
        cfg.balloon = self.memballoon;
        cfg.console = self.virtio_console.as_ref().map(char_mode);
        cfg.vcpu_pins = self.tuning.vcpupin.iter().filter_map(|(v, set)| Some((u8::try_from(*v).ok()?, set.cpus.clone()))).collect();
        cfg.emulator_pin = self.tuning.emulatorpin.as_ref().map(|set| set.cpus.clone());
        Ok(cfg)
    }
}

impl DomainXml {
    /// Firmware boot: the loader, `<boot dev>` in order, the boot menu and
    /// the reboot timeout.
    fn firmware_boot(&self) -> rvirt_api::config::Boot {
        use rvirt_api::config::BootDevice;
        let fw = &self.firmware;
        let default_order = vec![BootDevice::Disk, BootDevice::Cdrom];
        // CMOS holds three classes; libvirt allows four (the fourth is never reached in practice).
        let order: Vec<BootDevice> = fw
            .boot_devs
            .iter()
            .take(3)
            .map(|d| match d.letter() {
                'a' => BootDevice::Floppy,
                'd' => BootDevice::Cdrom,
                'n' => BootDevice::Network,
                _ => BootDevice::Disk,
            })
            .collect();
        rvirt_api::config::Boot::Firmware {
            path: fw.loader.clone().unwrap_or_else(|| PathBuf::from(rvirt_api::DEFAULT_FIRMWARE)),
            reboot_timeout_ms: fw.reboot_timeout_ms.and_then(|t| u32::try_from(t).ok()),
            order: if order.is_empty() { default_order } else { order },
            // libvirt's default wait when no timeout is given is the firmware's (SeaBIOS: 2.5 s).
            menu_ms: match fw.bootmenu {
                Some(BootMenu { enable: true, timeout_ms }) => Some(timeout_ms.unwrap_or(2500)),
                _ => None,
            },
        }
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for m in &mut mac {
        let p = parts.next().filter(|p| p.len() == 2)?;
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn char_mode(c: &CharDevice) -> rvirt_api::config::SerialMode {
    use rvirt_api::config::SerialMode;
    match c {
        CharDevice::Pty => SerialMode::Pty,
        CharDevice::Null => SerialMode::Null,
        CharDevice::File(f) => SerialMode::File(f.clone()),
    }
}
