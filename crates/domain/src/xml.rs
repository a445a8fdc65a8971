//! Parsing and validating libvirt-style domain XML.
//!
//! The subset (documented in docs/domain-xml.md): `name`, `uuid`, `memory`,
//! `currentMemory`, `vcpu`, `os` (`type`, `kernel`, `initrd`, `cmdline`,
//! `loader`, `boot`, `bootmenu`, `bios`),
//! `on_poweroff`/`on_reboot`/`on_crash`, and under `devices`: `disk`,
//! `interface`, `serial`, `console`, `rng`, `memballoon`. Anything else is
//! kept verbatim (and written back by `dumpxml`) and listed in
//! [`DomainXml::unknown`] so the user hears it has no effect. Values rvirt
//! cannot honour are errors naming the element and its line.

use std::path::PathBuf;

use roxmltree::{Document, Node};
use uuid::Uuid;

mod limits;
mod network;
mod os;
mod tune;
pub use limits::{MAX_DEPTH, MAX_UNKNOWN, MAX_XML_BYTES};
pub use network::{DhcpHost, DnsHost, ForwardMode, IpDef, NetworkDef};
pub use os::{BootDev, BootMenu, FirmwareDef};
pub use tune::{CpuSet, Tuning};

/// Most vCPUs a domain may have (rvirt-vmm's limit).
pub const MAX_VCPUS: u32 = 254;

/// Why a definition was refused: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", location(*.line, .element))]
pub struct XmlError {
    /// 1-based line of the offending element (0: not tied to one).
    pub line: u32,
    /// The element, like `memory` or `devices/disk/source`.
    pub element: String,
    /// What is wrong.
    pub message: String,
}

fn location(line: u32, element: &str) -> String {
    match (line, element.is_empty()) {
        (0, true) => String::new(),
        (0, false) => format!("<{element}>: "),
        (l, true) => format!("line {l}: "),
        (l, false) => format!("line {l}: <{element}>: "),
    }
}

/// What happens when the guest powers off, reboots or crashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleAction {
    /// The domain stops (`shut off`).
    Destroy,
    /// The domain starts again.
    Restart,
    /// The domain stays as it is for inspection (`crashed`); only for `on_crash`.
    Preserve,
}

impl LifecycleAction {
    /// libvirt's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Destroy => "destroy",
            Self::Restart => "restart",
            Self::Preserve => "preserve",
        }
    }
}

/// Where a disk's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskSource {
    /// `<disk type='file'>`: `<source file=.../>`.
    File,
    /// `<disk type='block'>`: `<source dev=.../>`.
    Block,
}

/// Disk image formats rvirt-vmm opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// A plain file or device.
    Raw,
    /// qcow2.
    Qcow2,
}

/// The bus a disk's `<target bus>` names. Everything but virtio becomes a
/// unit on rvirt's virtio-scsi controller; the name is kept for `dumpxml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskBus {
    /// `virtio`: its own virtio-blk device.
    Virtio,
    /// `scsi`.
    Scsi,
    /// `sata` (served as SCSI).
    Sata,
    /// `ide` (served as SCSI).
    Ide,
}

impl DiskBus {
    /// libvirt's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Virtio => "virtio",
            Self::Scsi => "scsi",
            Self::Sata => "sata",
            Self::Ide => "ide",
        }
    }
}

/// A disk: a virtio-blk disk, or a disk or CD-ROM drive on virtio-scsi.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioDisk {
    /// File or block device.
    pub source_kind: DiskSource,
    /// Absolute path of the image; empty for a CD-ROM drive without a disc.
    pub path: PathBuf,
    /// `<disk device='cdrom'>`: a read-only, removable CD-ROM drive.
    pub cdrom: bool,
    /// `<target bus>`.
    pub bus: DiskBus,
    /// `<driver type=...>`; raw when absent (a guest-writable disk is never probed).
    pub format: Option<ImageFormat>,
    /// `<driver cache='none'|'directsync'>`: O_DIRECT.
    pub direct: bool,
    /// `<target dev=...>` (`vda`, `vdb`, ...), the guest's name for it.
    pub target: String,
    /// `<readonly/>`.
    pub readonly: bool,
    /// `<shareable/>`: other domains may write the image at the same time.
    pub shareable: bool,
    /// `<serial>`.
    pub serial: Option<String>,
    /// `<boot order='N'>`: its place in the firmware's boot order.
    pub boot_order: Option<u32>,
}

/// How a network card reaches the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InterfaceKind {
    /// `<interface type='ethernet'>`: a tap, nothing else.
    Ethernet,
    /// `<interface type='bridge'>`: a tap added to this Linux bridge.
    Bridge(String),
    /// `<interface type='network'>`: a tap on this rvirt network's bridge.
    Network(String),
    /// `<interface type='direct'>`: a macvtap on host interface `dev`,
    /// straight onto its wire without a bridge.
    Direct {
        /// The host interface (`<source dev>`).
        dev: String,
        /// `<source mode>`: vepa (libvirt's default), bridge, private or passthrough.
        mode: String,
    },
}

/// A virtio network card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    /// Ethernet or bridge.
    pub kind: InterfaceKind,
    /// `<target dev=...>`: the tap's name; chosen by rvirtd when absent.
    pub tap: Option<String>,
    /// `<mac address=...>`.
    pub mac: Option<String>,
    /// `<boot order='N'>`: kept; rvirt has no network boot ROM yet.
    pub boot_order: Option<u32>,
    /// `<model type>` when not virtio (e1000, e1000e, rtl8139): served as virtio-net.
    pub model: Option<String>,
}

/// Where a serial port or console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CharDevice {
    /// A pseudo-terminal (`rvirt console` attaches to it).
    Pty,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    Null,
}

/// An element rvirt does not implement, kept so `dumpxml` gives it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownElement {
    /// `domain`, `os` or `devices`: where it sits.
    pub parent: String,
    /// Its tag name.
    pub name: String,
    /// Its line in the XML it came from.
    pub line: u32,
    /// Its text, verbatim.
    pub xml: String,
}

/// A domain definition: what rvirtd stores and starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainXml {
    /// `type='qemu'` (emulation in libvirt): kept, but run with KVM like `type='kvm'`.
    pub emulated: bool,
    /// Unique name; also the file name of the stored definition.
    pub name: String,
    /// Unique id (generated when the XML has none).
    pub uuid: Uuid,
    /// Guest RAM in KiB (`<memory>`).
    pub memory_kib: u64,
    /// RAM the guest starts with, the rest ballooned (`<currentMemory>`).
    pub current_memory_kib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// `<os><type arch>` when not x86_64 (`i686`).
    pub arch: Option<String>,
    /// `<os><type machine>`, kept as written (rvirt has one machine type).
    pub machine: Option<String>,
    /// `<os><kernel>`: booted directly; without it, firmware boots the disks.
    pub kernel: Option<PathBuf>,
    /// `<os><initrd>`.
    pub initrd: Option<PathBuf>,
    /// `<os><cmdline>`.
    pub cmdline: Option<String>,
    /// Firmware boot: `<loader>`, `<boot dev>`, `<bootmenu>`, `<bios>`, UEFI requests.
    pub firmware: FirmwareDef,
    /// `<on_poweroff>` (destroy or restart).
    pub on_poweroff: LifecycleAction,
    /// `<on_reboot>` (restart or destroy).
    pub on_reboot: LifecycleAction,
    /// `<on_crash>` (destroy, restart or preserve).
    pub on_crash: LifecycleAction,
    /// Virtio disks, in order.
    pub disks: Vec<VirtioDisk>,
    /// Virtio network cards, in order.
    pub interfaces: Vec<Interface>,
    /// The first serial port (COM1, the guest's ttyS0).
    pub serial: Option<CharDevice>,
    /// A virtio console (`<console><target type='virtio'/>`, hvc0).
    pub virtio_console: Option<CharDevice>,
    /// `<rng model='virtio'>` fed from the host's urandom.
    pub rng: bool,
    /// `<memballoon model='virtio'>` (libvirt's default; `model='none'` removes it).
    pub memballoon: bool,
    /// `<memtune>` and `<cputune>`.
    pub tuning: Tuning,
    /// Elements kept but not acted on.
    pub unknown: Vec<UnknownElement>,
    /// Namespace declarations on `<domain>` (prefix, URI; no prefix: the
    /// default namespace), kept so unknown elements that use them
    /// (vagrant's `<qemu:commandline>`) stay well-formed in `dumpxml`.
    pub namespaces: Vec<(Option<String>, String)>,
}

/// Parsing context: the source text and its line numbers.
struct Cx<'input> {
    src: &'input str,
    lines: limits::LineIndex<'input>,
}

impl<'input> Cx<'input> {
    fn line(&self, n: Node) -> u32 {
        self.lines.line(n.range().start)
    }

    fn err(&self, n: Node, path: &str, message: impl Into<String>) -> XmlError {
        XmlError { line: self.line(n), element: path.to_string(), message: message.into() }
    }

    fn unknown(&self, parent: &str, n: Node) -> UnknownElement {
        UnknownElement {
            parent: parent.to_string(),
            name: n.tag_name().name().to_string(),
            line: self.line(n),
            xml: self.src[n.range()].to_string(),
        }
    }

    fn text(&self, n: Node, path: &str) -> Result<String, XmlError> {
        let t = n.text().unwrap_or("").trim();
        if t.is_empty() {
            return Err(self.err(n, path, "must not be empty"));
        }
        Ok(t.to_string())
    }

    fn attr<'n>(&self, n: Node<'n, 'input>, path: &str, name: &str) -> Result<&'n str, XmlError> {
        n.attribute(name).ok_or_else(|| self.err(n, path, format!("the {name}='...' attribute is required")))
    }

    fn path(&self, n: Node, path: &str, what: &str) -> Result<PathBuf, XmlError> {
        let p = PathBuf::from(what);
        if !p.is_absolute() {
            return Err(self.err(n, path, format!("'{what}' must be an absolute path (rvirtd does not share your working directory)")));
        }
        Ok(p)
    }
}

fn elements<'a, 'input>(n: Node<'a, 'input>) -> impl Iterator<Item = Node<'a, 'input>> {
    n.children().filter(|c| c.is_element())
}

/// Bytes per unit of libvirt's `unit` attribute (default KiB).
fn unit_bytes(unit: &str) -> Option<u64> {
    Some(match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "K" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    })
}

fn memory_kib(cx: &Cx, n: Node, path: &str) -> Result<u64, XmlError> {
    let unit = n.attribute("unit").unwrap_or("KiB");
    let per = unit_bytes(unit).ok_or_else(|| cx.err(n, path, format!("unknown unit '{unit}' (use KiB, MiB, GiB, ...)")))?;
    let text = cx.text(n, path)?;
    let v: u64 = text.parse().map_err(|_| cx.err(n, path, format!("'{text}' is not a whole number")))?;
    let bytes = v.checked_mul(per).ok_or_else(|| cx.err(n, path, "too large"))?;
    let kib = bytes.div_ceil(1024);
    if kib == 0 {
        return Err(cx.err(n, path, "must be more than zero"));
    }
    Ok(kib)
}

fn lifecycle(cx: &Cx, n: Node, path: &str, allowed: &[LifecycleAction]) -> Result<LifecycleAction, XmlError> {
    let t = cx.text(n, path)?;
    allowed.iter().copied().find(|a| a.name() == t).ok_or_else(|| {
        let names: Vec<&str> = allowed.iter().map(|a| a.name()).collect();
        cx.err(n, path, format!("'{t}' is not supported (expected {})", names.join(" or ")))
    })
}

/// Checks a name used for files and taps: letters, digits and `-_.+:`.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.bytes().all(|c| c.is_ascii_digit())
        && Uuid::parse_str(s).is_err()
        && !s.starts_with('.')
        && !s.starts_with('-')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+:".contains(c))
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty() && s.len() <= 15 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts.iter().all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
        && u8::from_str_radix(parts[0], 16).map(|b| b & 1 == 0).unwrap_or(false)
}

impl DomainXml {
    /// Parses and validates `xml`. Elements outside the subset are kept in
    /// [`DomainXml::unknown`]; the caller should show them to the user.
    pub fn parse(xml: &str) -> Result<Self, XmlError> {
        limits::check_shape(xml)?;
        let doc = Document::parse(xml).map_err(|e| XmlError {
            line: e.pos().row,
            element: String::new(),
            message: format!("not well-formed XML: {e}"),
        })?;
        let cx = Cx { src: xml, lines: limits::LineIndex::new(xml) };
        let root = doc.root_element();
        if root.tag_name().name() != "domain" {
            return Err(cx.err(root, root.tag_name().name(), "the root element must be <domain>"));
        }
        let emulated = match root.attribute("type") {
            Some("kvm") => false,
            Some("qemu") => true,
            Some(t) => return Err(cx.err(root, "domain", format!("type='{t}' is not supported: rvirt runs type='kvm' (and type='qemu') domains"))),
            None => return Err(cx.err(root, "domain", "the type='kvm' attribute is required")),
        };
        let mut d = DomainXml {
            emulated,
            name: String::new(),
            uuid: Uuid::nil(),
            memory_kib: 0,
            current_memory_kib: 0,
            vcpus: 1,
            arch: None,
            machine: None,
            kernel: None,
            initrd: None,
            cmdline: None,
            firmware: FirmwareDef::default(),
            on_poweroff: LifecycleAction::Destroy,
            on_reboot: LifecycleAction::Restart,
            on_crash: LifecycleAction::Destroy,
            disks: Vec::new(),
            interfaces: Vec::new(),
            serial: None,
            virtio_console: None,
            rng: false,
            memballoon: true,
            tuning: Tuning::default(),
            unknown: Vec::new(),
            namespaces: root
                .namespaces()
                .filter(|ns| ns.name() != Some("xml"))
                .map(|ns| (ns.name().map(str::to_string), ns.uri().to_string()))
                .collect(),
        };
        let mut current: Option<(u64, Node)> = None;
        let mut seen = std::collections::BTreeSet::new();
        for n in elements(root) {
            let tag = n.tag_name().name();
            let repeatable = matches!(tag, "devices");
            let known = matches!(
                tag,
                "name" | "uuid" | "memory" | "currentMemory" | "vcpu" | "os" | "on_poweroff" | "on_reboot" | "on_crash" | "devices" | "memtune" | "cputune"
            );
            if known && !repeatable && !seen.insert(tag) {
                return Err(cx.err(n, tag, "appears twice"));
            }
            match tag {
                "name" => {
                    let name = cx.text(n, "name")?;
                    if !valid_name(&name) {
                        return Err(cx.err(
                            n,
                            "name",
                            format!("'{name}' is not a valid name (up to 64 letters, digits and -_.+:, not starting with . or -, not all digits, not a UUID: those name domains by id and UUID)"),
                        ));
                    }
                    d.name = name;
                }
                "uuid" => {
                    // An empty <uuid/> (Vagrant writes one) gets a generated UUID, as in libvirt.
                    let t = n.text().unwrap_or("").trim();
                    if !t.is_empty() {
                        d.uuid = Uuid::parse_str(t).map_err(|_| cx.err(n, "uuid", format!("'{t}' is not a UUID")))?;
                    }
                }
                "memory" => d.memory_kib = memory_kib(&cx, n, "memory")?,
                "currentMemory" => current = Some((memory_kib(&cx, n, "currentMemory")?, n)),
                "vcpu" => {
                    let t = cx.text(n, "vcpu")?;
                    d.vcpus = match t.parse::<u32>() {
                        Ok(v) if (1..=MAX_VCPUS).contains(&v) => v,
                        _ => return Err(cx.err(n, "vcpu", format!("'{t}' is not a vCPU count from 1 to {MAX_VCPUS}"))),
                    };
                    if let Some(c) = n.attribute("current") {
                        if c != t {
                            return Err(cx.err(n, "vcpu", "current='...' below the maximum (vCPU hotplug) is not supported"));
                        }
                    }
                }
                "os" => d.parse_os(&cx, n)?,
                "on_poweroff" => {
                    d.on_poweroff = lifecycle(&cx, n, tag, &[LifecycleAction::Destroy, LifecycleAction::Restart])?
                }
                "on_reboot" => d.on_reboot = lifecycle(&cx, n, tag, &[LifecycleAction::Restart, LifecycleAction::Destroy])?,
                "on_crash" => {
                    d.on_crash = lifecycle(
                        &cx,
                        n,
                        tag,
                        &[LifecycleAction::Destroy, LifecycleAction::Restart, LifecycleAction::Preserve],
                    )?
                }
                "devices" => d.parse_devices(&cx, n)?,
                "memtune" => d.parse_memtune(&cx, n)?,
                "cputune" => d.parse_cputune(&cx, n)?,
                _ => d.unknown.push(cx.unknown("domain", n)),
            }
        }
        if d.name.is_empty() {
            return Err(cx.err(root, "domain", "<name> is required"));
        }
        if d.memory_kib == 0 {
            return Err(cx.err(root, "domain", "<memory> is required"));
        }
        d.check_boot_orders(&cx, root)?;
        d.check_tuning(&cx, root)?;
        d.current_memory_kib = match current {
            None => d.memory_kib,
            Some((c, n)) if c > d.memory_kib => {
                return Err(cx.err(n, "currentMemory", format!("{c} KiB is more than <memory> ({} KiB)", d.memory_kib)))
            }
            Some((c, n)) if c < d.memory_kib && !d.memballoon => {
                return Err(cx.err(n, "currentMemory", "less than <memory> needs a memory balloon, but <memballoon model='none'/> removed it"))
            }
            Some((c, _)) => c,
        };
        if d.unknown.len() > MAX_UNKNOWN {
            return Err(XmlError {
                line: 0,
                element: String::new(),
                message: format!("{} unsupported elements; at most {MAX_UNKNOWN} are kept", d.unknown.len()),
            });
        }
        if d.uuid.is_nil() {
            d.uuid = Uuid::new_v4();
        }
        Ok(d)
    }

    /// Per-device `<boot order>` values are distinct and, as in libvirt,
    /// not mixed with `<os><boot dev>`.
    fn check_boot_orders(&self, cx: &Cx, root: Node) -> Result<(), XmlError> {
        let orders: Vec<u32> =
            self.disks.iter().filter_map(|d| d.boot_order).chain(self.interfaces.iter().filter_map(|i| i.boot_order)).collect();
        if orders.is_empty() {
            return Ok(());
        }
        if !self.firmware.boot_devs.is_empty() {
            return Err(cx.err(root, "domain", "per-device <boot order> cannot be used together with <os><boot dev>"));
        }
        let mut sorted = orders.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(cx.err(root, "domain", format!("<boot order='{}'> is used by two devices", w[0])));
        }
        Ok(())
    }

    fn parse_devices(&mut self, cx: &Cx, devices: Node) -> Result<(), XmlError> {
        for n in elements(devices) {
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
                "serial" => {
                    if self.serial.is_some() {
                        return Err(cx.err(n, "devices/serial", "only one serial port is supported"));
                    }
                    self.serial = Some(parse_char(cx, n, "devices/serial")?);
                }
                "console" => {
                    let path = "devices/console";
                    let target = elements(n).find(|c| c.has_tag_name("target")).and_then(|t| t.attribute("type"));
                    let dev = parse_char(cx, n, path)?;
                    match target.unwrap_or("serial") {
                        // libvirt's console on the first serial port is the serial port itself.
                        "serial" => {
                            if self.serial.is_none() {
                                self.serial = Some(dev);
                            }
                        }
                        "virtio" => {
                            if self.virtio_console.is_some() {
                                return Err(cx.err(n, path, "only one virtio console is supported"));
                            }
                            self.virtio_console = Some(dev);
                        }
                        t => return Err(cx.err(n, path, format!("target type='{t}' is not supported (serial or virtio)"))),
                    }
                }
                "rng" => {
                    let path = "devices/rng";
                    if n.attribute("model") != Some("virtio") {
                        return Err(cx.err(n, path, "model='virtio' is required"));
                    }
                    if let Some(b) = elements(n).find(|c| c.has_tag_name("backend")) {
                        let src = b.text().unwrap_or("/dev/urandom").trim();
                        if b.attribute("model").unwrap_or("random") != "random" || !matches!(src, "/dev/urandom" | "/dev/random" | "") {
                            return Err(cx.err(b, "devices/rng/backend", "only <backend model='random'>/dev/urandom</backend> is supported"));
                        }
                    }
                    self.rng = true;
                }
                "memballoon" => match n.attribute("model") {
                    Some("virtio") => self.memballoon = true,
                    Some("none") => self.memballoon = false,
                    other => {
                        return Err(cx.err(n, "devices/memballoon", format!("model={other:?} is not supported (virtio or none)")))
                    }
                },
                _ => self.unknown.push(cx.unknown("devices", n)),
            }
        }
        Ok(())
    }

    /// The text of the unknown-element report, one line each (empty when
    /// none). `<graphics>` and `<video>` share one line saying what it means
    /// to have no screen; a UEFI request and network boot get theirs.
    pub fn unknown_report(&self) -> Vec<String> {
        let screen = |u: &&UnknownElement| u.parent == "devices" && matches!(u.name.as_str(), "graphics" | "video");
        let mut out: Vec<String> = self
            .unknown
            .iter()
            .filter(|u| !screen(u))
            .map(|u| format!("line {}: <{}> in <{}> is not supported by rvirt; kept, but it has no effect", u.line, u.name, u.parent))
            .collect();
        let screens: Vec<String> = self.unknown.iter().filter(screen).map(|u| format!("<{}> (line {})", u.name, u.line)).collect();
        if !screens.is_empty() {
            out.push(format!(
                "{}: rvirt has no display; the guest's console is its serial port (rvirt console). Installers that only draw on a screen will be invisible; kept, but no effect",
                screens.join(", ")
            ));
        }
        if self.emulated {
            out.push("type='qemu' asks for emulation; rvirt runs the domain with KVM acceleration".into());
        }
        let on_scsi: Vec<String> =
            self.disks.iter().filter(|d| matches!(d.bus, DiskBus::Sata | DiskBus::Ide)).map(|d| format!("{} (bus='{}')", d.target, d.bus.name())).collect();
        if !on_scsi.is_empty() {
            out.push(format!(
                "{}: rvirt has no SATA or IDE controller; the guest sees these as SCSI units on virtio-scsi (sdX, srX)",
                on_scsi.join(", ")
            ));
        }
        let models: Vec<&str> = self.interfaces.iter().filter_map(|i| i.model.as_deref()).collect();
        if !models.is_empty() {
            out.push(format!("<model type='{}'>: rvirt serves these network cards as virtio-net (the guest needs its virtio driver)", models.join("', '")));
        }
        if let Some(why) = &self.firmware.uefi {
            out.push(format!("{why}: UEFI firmware is not supported yet; the domain is defined but will not start (rvirt boots disks through SeaBIOS)"));
        }
        if self.interfaces.iter().any(|i| i.boot_order.is_some()) || self.firmware.boot_devs.contains(&BootDev::Network) {
            out.push("network boot (PXE) is not supported yet; the boot order skips network cards".into());
        }
        out
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
    };
    for c in elements(n) {
        let tag = c.tag_name().name();
        let cpath = format!("{path}/{tag}");
        match tag {
            "source" => {
                let key = if source_kind == DiskSource::File { "file" } else { "dev" };
                disk.path = cx.path(c, &cpath, cx.attr(c, &cpath, key)?)?;
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
                disk.serial = Some(s);
            }
            "boot" => disk.boot_order = Some(boot_order(cx, c, &cpath)?),
            "address" | "alias" => {}
            _ => return Err(cx.err(c, &cpath, "is not supported on disks")),
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
    if disk.direct && disk.format == Some(ImageFormat::Qcow2) {
        return Err(cx.err(n, path, "cache='none' is supported on raw disks only"));
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
    let mut i = Interface { kind: InterfaceKind::Ethernet, tap: None, mac: None, boot_order: None, model: None };
    for c in elements(n) {
        let tag = c.tag_name().name();
        let cpath = format!("{path}/{tag}");
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
            "source" if ty == "network" => {
                if c.attribute("portgroup").is_some() {
                    return Err(cx.err(c, &cpath, "portgroup= is not supported"));
                }
                network = Some(cx.attr(c, &cpath, "network")?.to_string());
            }
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
                other => return Err(cx.err(c, &cpath, format!("type={other:?} is not supported (virtio; e1000, e1000e and rtl8139 are served as virtio)"))),
            },
            "boot" => i.boot_order = Some(boot_order(cx, c, &cpath)?),
            "address" | "alias" => {}
            _ => return Err(cx.err(c, &cpath, "is not supported on interfaces")),
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

fn parse_char(cx: &Cx, n: Node, path: &str) -> Result<CharDevice, XmlError> {
    match n.attribute("type").unwrap_or("pty") {
        "pty" => Ok(CharDevice::Pty),
        "null" => Ok(CharDevice::Null),
        "file" => {
            let src = elements(n)
                .find(|c| c.has_tag_name("source"))
                .ok_or_else(|| cx.err(n, path, "type='file' needs <source path='...'/>"))?;
            let p = cx.attr(src, &format!("{path}/source"), "path")?;
            Ok(CharDevice::File(cx.path(src, &format!("{path}/source"), p)?))
        }
        t => Err(cx.err(n, path, format!("type='{t}' is not supported (pty, file or null)"))),
    }
}

#[cfg(test)]
mod tests;
