//! `<devices>`: disks, network cards, serial ports and consoles, rng and
//! balloon; everything else in it is kept verbatim.

use std::path::PathBuf;

use roxmltree::Node;

use super::*;

impl DomainXml {
    pub(super) fn parse_devices(&mut self, cx: &Cx, devices: Node, errors: &mut Vec<XmlError>) {
        self.kept.attrs(cx, "devices", devices, &[]);
        for n in elements(devices) {
            if let Err(e) = self.parse_device(cx, n) {
                errors.push(e);
            }
        }
    }

    /// One element under `<devices>`.
    fn parse_device(&mut self, cx: &Cx, n: Node) -> Result<(), XmlError> {
        // What rvirt has one of (COM1, the serial port's console, the rng, the
        // balloon) is read once; a second is kept verbatim and named in the report.
        let once = match n.tag_name().name() {
            "serial" => Some("devices/serial"),
            "console" if elements(n).find(|c| c.has_tag_name("target")).and_then(|t| t.attribute("type")).unwrap_or("serial") == "serial" => Some("devices/console"),
            "rng" => Some("devices/rng"),
            _ => None,
        };
        if let Some(p) = once {
            if self.kept.has(p) {
                self.unknown.push(cx.unknown("devices", n));
                return Ok(());
            }
            self.kept.mark(p);
        }
        match n.tag_name().name() {
            "disk" => {
                let disk = parse_disk(cx, n)?;
                if let Some(other) = self.disks.iter().find(|d| d.target == disk.target) {
                    return Err(cx.err(n, "devices/disk", format!("target dev='{}' is used twice (also by {})", disk.target, other.path.display())));
                }
                self.disks.push(disk);
            }
            "interface" => {
                let i = parse_interface(cx, n)?;
                if let Some(tap) = &i.tap {
                    if self.interfaces.iter().any(|o| o.tap.as_ref() == Some(tap)) {
                        return Err(cx.err(n, "devices/interface", format!("target dev='{tap}' is used twice")));
                    }
                }
                self.interfaces.push(i);
            }
            // COM1 is the <serial>; a serial console met before it only mirrors it.
            "serial" => self.serial = Some(parse_char(cx, n, "devices/serial", &mut self.kept)?),
            "console" => {
                let path = "devices/console";
                let target = elements(n).find(|c| c.has_tag_name("target")).and_then(|t| t.attribute("type"));
                match target.unwrap_or("serial") {
                    // libvirt's console on the first serial port is the serial port itself.
                    "serial" => {
                        let dev = parse_char(cx, n, path, &mut self.kept)?;
                        if self.serial.is_none() {
                            self.serial = Some(dev);
                        }
                    }
                    "virtio" => {
                        if self.virtio_console.is_some() {
                            return Err(cx.err(n, path, "only one virtio console is supported"));
                        }
                        self.virtio_console = Some(parse_char(cx, n, VIRTIO_CONSOLE, &mut self.kept)?);
                    }
                    t => return Err(cx.err(n, path, format!("target type='{t}' is not supported (serial or virtio)"))),
                }
            }
            "rng" => {
                let path = "devices/rng";
                if n.attribute("model") != Some("virtio") {
                    return Err(cx.err(n, path, "model='virtio' is required"));
                }
                self.kept.attrs(cx, path, n, &["model"]);
                for c in elements(n) {
                    if c.has_tag_name("backend") {
                        let src = c.text().unwrap_or("/dev/urandom").trim();
                        if c.attribute("model").unwrap_or("random") != "random" || !matches!(src, "/dev/urandom" | "/dev/random" | "") {
                            return Err(cx.err(c, "devices/rng/backend", "only <backend model='random'>/dev/urandom</backend> is supported"));
                        }
                    } else {
                        self.kept.child(cx, path, path, c);
                    }
                }
                self.rng = true;
            }
            "memballoon" => {
                let path = "devices/memballoon";
                if self.kept.has(path) {
                    return Err(cx.err(n, path, "appears twice (a domain has one balloon)"));
                }
                self.kept.mark(path);
                match n.attribute("model") {
                    Some("virtio") => self.memballoon = true,
                    Some("none") => self.memballoon = false,
                    Some(m) => return Err(cx.err(n, path, format!("model='{m}' is not supported (virtio or none)"))),
                    None => return Err(cx.err(n, path, "the model='virtio' attribute is required")),
                }
                self.kept.attrs(cx, path, n, &["model"]);
                for c in elements(n) {
                    self.kept.child(cx, path, path, c);
                }
            }
            _ => self.unknown.push(cx.unknown("devices", n)),
        }
        Ok(())
    }
}

fn parse_disk(cx: &Cx, n: Node) -> Result<VirtioDisk, XmlError> {
    let path = "devices/disk";
    let source_kind = match n.attribute("type").unwrap_or("file") {
        "file" => DiskSource::File,
        "block" => DiskSource::Block,
        t => return Err(cx.err(n, path, format!("type='{t}' is not supported (file or block)"))),
    };
    let cdrom = match n.attribute("device").unwrap_or("disk") {
        "disk" => false,
        "cdrom" => true,
        dev => return Err(cx.err(n, path, format!("device='{dev}' is not supported (disk or cdrom)"))),
    };
    let mut disk = VirtioDisk {
        source_kind,
        path: PathBuf::new(),
        cdrom,
        bus: DiskBus::Virtio,
        format: None,
        direct: false,
        target: String::new(),
        readonly: false,
        shareable: false,
        serial: None,
        boot_order: None,
        kept: KeptXml::default(),
    };
    disk.kept.attrs(cx, "", n, &["type", "device"]);
    for c in elements(n) {
        let tag = c.tag_name().name();
        let cpath = format!("{path}/{tag}");
        let interpreted: &[&str] = match tag {
            "source" => &["file", "dev"],
            // cache= is kept as written; rvirt reads it for O_DIRECT.
            "driver" => &["type"],
            "target" => &["dev", "bus"],
            "boot" => &["order"],
            "readonly" | "shareable" | "serial" => &[],
            "transient" => return Err(cx.err(c, &cpath, "is not supported: rvirt would keep what the guest writes")),
            _ => {
                disk.kept.child(cx, "", path, c);
                continue;
            }
        };
        disk.kept.interpreted_child(cx, tag, &cpath, c, interpreted);
        match tag {
            "source" => {
                let key = if source_kind == DiskSource::File { "file" } else { "dev" };
                // A CD-ROM drive may have a <source> without a disc (libvirt's empty tray).
                match c.attribute(key) {
                    None if cdrom => {}
                    _ => disk.path = cx.path(c, &cpath, cx.attr(c, &cpath, key)?)?,
                }
            }
            "driver" => {
                disk.format = match c.attribute("type") {
                    None => None,
                    Some("raw") => Some(ImageFormat::Raw),
                    Some("qcow2") => Some(ImageFormat::Qcow2),
                    Some(t) => return Err(cx.err(c, &cpath, format!("type='{t}' is not supported (raw or qcow2)"))),
                };
                disk.direct = match c.attribute("cache") {
                    None | Some("default") | Some("writeback") => false,
                    Some("none") | Some("directsync") => true,
                    Some(t) => return Err(cx.err(c, &cpath, format!("cache='{t}' is not supported (writeback, none)"))),
                };
            }
            "target" => {
                let dev = cx.attr(c, &cpath, "dev")?;
                let prefix = dev.get(..2).unwrap_or("");
                if !matches!(prefix, "vd" | "sd" | "hd") || dev.len() < 3 || !dev[2..].chars().all(|ch| ch.is_ascii_lowercase()) {
                    return Err(cx.err(c, &cpath, format!("dev='{dev}' is not a disk name (vda, sda, hda, ...)")));
                }
                // libvirt's default bus follows the name: vd virtio, sd scsi, hd ide.
                let default = match prefix {
                    "vd" => "virtio",
                    "sd" => "scsi",
                    _ => "ide",
                };
                disk.bus = match c.attribute("bus").unwrap_or(default) {
                    "virtio" => DiskBus::Virtio,
                    "scsi" => DiskBus::Scsi,
                    "sata" => DiskBus::Sata,
                    "ide" => DiskBus::Ide,
                    b => return Err(cx.err(c, &cpath, format!("bus='{b}' is not supported (virtio, scsi, sata, ide)"))),
                };
                disk.target = dev.to_string();
            }
            "readonly" => disk.readonly = true,
            "shareable" => disk.shareable = true,
            "serial" => {
                let s = c.text().unwrap_or("").trim().to_string();
                if s.len() > 20 || !s.is_ascii() {
                    return Err(cx.err(c, &cpath, "a disk serial is up to 20 ASCII characters"));
                }
                disk.serial = (!s.is_empty()).then_some(s);
            }
            "boot" => disk.boot_order = Some(boot_order(cx, c, &cpath)?),
            _ => {}
        }
    }
    if disk.path.as_os_str().is_empty() && !disk.cdrom {
        return Err(cx.err(n, path, "<source> is required (only a CD-ROM drive may be empty)"));
    }
    if disk.cdrom {
        if disk.bus == DiskBus::Virtio {
            return Err(cx.err(n, path, "a CD-ROM drive needs bus='scsi', 'sata' or 'ide'"));
        }
        // cache='none' and <shareable/> (virt-manager writes them) are kept
        // for dumpxml; a read-only disc needs neither.
        disk.readonly = true;
    }
    if disk.target.is_empty() {
        return Err(cx.err(n, path, "<target dev='vdX'/> is required"));
    }
    if disk.path.to_string_lossy().contains(',') || disk.serial.as_deref().is_some_and(|s| s.contains([',', '='])) {
        return Err(cx.err(n, path, "commas in disk paths and serials are not supported"));
    }
    Ok(disk)
}

fn parse_interface(cx: &Cx, n: Node) -> Result<Interface, XmlError> {
    let path = "devices/interface";
    let ty = cx.attr(n, path, "type")?;
    match ty {
        "ethernet" | "bridge" | "network" | "direct" => {}
        "user" => {
            return Err(cx.err(n, path, "type='user' (QEMU's user-mode networking) is not supported: use <interface type='network'><source network='default'/></interface>, a NAT network"))
        }
        _ => return Err(cx.err(n, path, format!("type='{ty}' is not supported (ethernet, bridge, network or direct)"))),
    }
    let mut bridge = None;
    let mut network = None;
    let mut direct = None;
    let mut i = Interface { kind: InterfaceKind::Ethernet, tap: None, mac: None, boot_order: None, model: None, link_up: None, kept: KeptXml::default() };
    i.kept.attrs(cx, "", n, &["type"]);
    for c in elements(n) {
        let tag = c.tag_name().name();
        let cpath = format!("{path}/{tag}");
        let interpreted: &[&str] = match tag {
            "source" => match ty {
                "bridge" => &["bridge"],
                "network" => &["network"],
                "direct" => &["dev", "mode"],
                _ => &[],
            },
            "target" => &["dev"],
            "mac" => &["address"],
            "model" => &["type"],
            "boot" => &["order"],
            "link" => &["state"],
            _ => {
                i.kept.child(cx, "", path, c);
                continue;
            }
        };
        i.kept.interpreted_child(cx, tag, &cpath, c, interpreted);
        match tag {
            "source" if ty == "bridge" => bridge = Some(cx.attr(c, &cpath, "bridge")?.to_string()),
            "source" if ty == "direct" => {
                let dev = cx.attr(c, &cpath, "dev")?;
                if !valid_ifname(dev) {
                    return Err(cx.err(c, &cpath, format!("dev='{dev}' is not an interface name (1-15 letters, digits, -_.)")));
                }
                let mode = c.attribute("mode").unwrap_or("vepa");
                if !["vepa", "bridge", "private", "passthrough"].contains(&mode) {
                    return Err(cx.err(c, &cpath, format!("mode='{mode}' is not a macvtap mode (vepa, bridge, private or passthrough)")));
                }
                direct = Some((dev.to_string(), mode.to_string()));
            }
            "source" if ty == "network" => network = Some(cx.attr(c, &cpath, "network")?.to_string()),
            "target" => {
                let dev = cx.attr(c, &cpath, "dev")?;
                if !valid_ifname(dev) {
                    return Err(cx.err(c, &cpath, format!("dev='{dev}' is not an interface name (1-15 letters, digits, -_.)")));
                }
                i.tap = Some(dev.to_string());
            }
            "mac" => {
                let m = cx.attr(c, &cpath, "address")?;
                if !valid_mac(m) {
                    return Err(cx.err(c, &cpath, format!("'{m}' is not a unicast MAC address like 52:54:00:12:34:56")));
                }
                i.mac = Some(m.to_ascii_lowercase());
            }
            "model" => match c.attribute("type") {
                Some("virtio") => {}
                Some(m @ ("e1000" | "e1000e" | "rtl8139")) => i.model = Some(m.to_string()),
                Some(other) => return Err(cx.err(c, &cpath, format!("type='{other}' is not supported (virtio; e1000, e1000e and rtl8139 are served as virtio)"))),
                None => return Err(cx.err(c, &cpath, "the type='virtio' attribute is required")),
            },
            "boot" => i.boot_order = Some(boot_order(cx, c, &cpath)?),
            "link" => {
                i.link_up = match c.attribute("state") {
                    Some("up") => Some(true),
                    Some("down") => Some(false),
                    Some(s) => return Err(cx.err(c, &cpath, format!("state='{s}' is not up or down"))),
                    None => return Err(cx.err(c, &cpath, "the state='up|down' attribute is required")),
                }
            }
            _ => {}
        }
    }
    i.kind = match ty {
        "bridge" => {
            let b = bridge.ok_or_else(|| cx.err(n, path, "type='bridge' needs <source bridge='NAME'/>"))?;
            if !valid_ifname(&b) {
                return Err(cx.err(n, path, format!("bridge '{b}' is not an interface name")));
            }
            InterfaceKind::Bridge(b)
        }
        "network" => {
            let name = network.ok_or_else(|| cx.err(n, path, "type='network' needs <source network='NAME'/>"))?;
            if !valid_name(&name) {
                return Err(cx.err(n, path, format!("network '{name}' is not a network name")));
            }
            InterfaceKind::Network(name)
        }
        "direct" => {
            let (dev, mode) = direct.ok_or_else(|| cx.err(n, path, "type='direct' needs <source dev='HOST-INTERFACE' mode='bridge'/>"))?;
            InterfaceKind::Direct { dev, mode }
        }
        _ => InterfaceKind::Ethernet,
    };
    Ok(i)
}

/// `<boot order='N'>`, N from 1.
fn boot_order(cx: &Cx, n: Node, path: &str) -> Result<u32, XmlError> {
    let t = cx.attr(n, path, "order")?;
    match t.parse::<u32>() {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(cx.err(n, path, format!("order='{t}' is not a number from 1"))),
    }
}

fn tag_is_console(n: Node) -> bool {
    n.has_tag_name("console")
}

/// The kept-parts path of the virtio console (the other `<console>` is the serial port's).
pub(crate) const VIRTIO_CONSOLE: &str = "devices/console[virtio]";

/// A serial port or console; what rvirt does not act on goes to `kept`
/// under `path` (the element), `path/source` and `path/target`.
fn parse_char(cx: &Cx, n: Node, path: &str, kept: &mut KeptXml) -> Result<CharDevice, XmlError> {
    let ty = n.attribute("type").unwrap_or("pty");
    let dev = match ty {
        "pty" => CharDevice::Pty,
        "null" => CharDevice::Null,
        "file" => {
            let src = elements(n)
                .find(|c| c.has_tag_name("source"))
                .ok_or_else(|| cx.err(n, path, "type='file' needs <source path='...'/>"))?;
            let p = cx.attr(src, &format!("{path}/source"), "path")?;
            CharDevice::File(cx.path(src, &format!("{path}/source"), p)?)
        }
        t => return Err(cx.err(n, path, format!("type='{t}' is not supported (pty, file or null)"))),
    };
    kept.attrs(cx, path, n, &["type"]);
    for c in elements(n) {
        let tag = c.tag_name().name();
        let cpath = format!("{path}/{tag}");
        match tag {
            // A pty's path is where the last run put it: not part of the definition.
            "source" if ty == "pty" => {}
            "source" => kept.attrs(cx, &cpath, c, &["path"]),
            // A serial port's target type (isa-serial) is libvirt's to keep; a console's says what it is.
            "target" if tag_is_console(n) => kept.attrs(cx, &cpath, c, &["type", "port"]),
            "target" => kept.attrs(cx, &cpath, c, &["port"]),
            _ => {
                kept.child(cx, path, path, c);
                continue;
            }
        }
        for grandchild in elements(c) {
            kept.child(cx, &cpath, &cpath, grandchild);
        }
    }
    Ok(dev)
}
