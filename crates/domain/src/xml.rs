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

mod devices;
mod kept;
mod limits;
mod metadata;
mod network;
mod report;
mod os;
mod snapshot;
mod storage;
mod tune;
pub use kept::{Kept, KeptXml};
pub(crate) use devices::VIRTIO_CONSOLE;
pub use limits::{MAX_DEPTH, MAX_UNKNOWN, MAX_XML_BYTES};
pub use network::{DhcpHost, DnsHost, ForwardMode, IpDef, NetworkDef};
pub use os::{BootDev, BootMenu, FirmwareDef};
pub use snapshot::{valid_snapshot_name, SnapshotDef, SnapshotDisk, SnapshotDiskKind, SnapshotState, MAX_SNAPSHOT_NAME};
pub use storage::{valid_volume_name, Permissions, PoolDef, PoolSizes, VolumeBacking, VolumeDef, MAX_VOLUME_NAME};
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

/// Every problem found in a definition, in document order: a user fixes
/// them in one go rather than one per attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmlErrors(pub Vec<XmlError>);

impl std::fmt::Display for XmlErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            all => {
                write!(f, "{} problems in the definition:", all.len())?;
                for e in all {
                    write!(f, "\n  {e}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for XmlErrors {}

impl From<XmlError> for XmlErrors {
    fn from(e: XmlError) -> Self {
        Self(vec![e])
    }
}

impl XmlErrors {
    /// The first problem (there is always one).
    pub fn first(&self) -> Option<&XmlError> {
        self.0.first()
    }
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

impl ImageFormat {
    /// The name libvirt's XML and qemu-img use (`raw`, `qcow2`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
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
    /// What the definition says about the disk that rvirt does not act on
    /// (`<driver name>`, `<address>`, ...), written back by `dumpxml`.
    pub kept: KeptXml,
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
    /// `<link state>`: whether the cable is in (none: as libvirt, up).
    pub link_up: Option<bool>,
    /// What the definition says about the card that rvirt does not act on
    /// (`<address>`, `<script>`, ...), written back by `dumpxml`.
    pub kept: KeptXml,
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
    /// `<title>`: a short line for people (virsh desc --title).
    pub title: Option<String>,
    /// `<description>`: free text for people (virsh desc).
    pub description: Option<String>,
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
    /// Attributes and children of the elements rvirt interprets that it
    /// does not act on (`<vcpu placement>`, `<serial><target><model>`, ...),
    /// by element path.
    pub kept: KeptXml,
    /// Namespace declarations on `<domain>` (prefix, URI; no prefix: the
    /// default namespace), kept so unknown elements that use them
    /// (vagrant's `<qemu:commandline>`) stay well-formed in `dumpxml`.
    pub namespaces: Vec<(Option<String>, String)>,
}

/// Parsing context: the source text and its line numbers.
struct Cx<'input> {
    src: &'input str,
    lines: limits::LineIndex<'input>,
    /// Prefixed namespaces in scope where a kept element sits: declared on
    /// an element rvirt rewrites (`<devices xmlns:foo=…>`), they move to
    /// `<domain>` so what is kept stays well-formed.
    inherited: std::cell::RefCell<Vec<(String, String)>>,
}

impl<'input> Cx<'input> {
    fn new(src: &'input str) -> Self {
        Self { src, lines: limits::LineIndex::new(src), inherited: Default::default() }
    }

    fn line(&self, n: Node) -> u32 {
        self.lines.line(n.range().start)
    }

    fn err(&self, n: Node, path: &str, message: impl Into<String>) -> XmlError {
        XmlError { line: self.line(n), element: path.to_string(), message: message.into() }
    }

    fn unknown(&self, parent: &str, n: Node) -> UnknownElement {
        if let Some(p) = n.parent_element() {
            let mut inherited = self.inherited.borrow_mut();
            // Never a default namespace: on <domain> it would capture libvirt's own elements.
            for ns in p.namespaces().filter(|ns| ns.name().is_some_and(|p| p != "xml")) {
                let entry = (ns.name().unwrap_or_default().to_string(), ns.uri().to_string());
                if !inherited.contains(&entry) {
                    inherited.push(entry);
                }
            }
        }
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

/// libvirt's namespace (the default one of its own documents).
const LIBVIRT_NS: &str = "http://libvirt.org/schemas/domain/1.0";

/// `xml` parsed, once its size and depth are known to be within bounds:
/// how every document rvirt reads starts.
fn checked_document(xml: &str) -> Result<Document<'_>, XmlError> {
    limits::check_shape(xml)?;
    Document::parse(xml).map_err(|e| XmlError { line: e.pos().row, element: String::new(), message: format!("not well-formed XML: {e}") })
}

/// Text made safe for an element or a single-quoted attribute of the XML rvirt writes.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;")
}

/// An element with no attributes, children or text: absent, as libvirt reads it.
fn is_empty(n: Node) -> bool {
    n.attributes().len() == 0 && !n.children().any(|c| c.is_element()) && n.text().unwrap_or("").trim().is_empty()
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
    /// [`DomainXml::unknown`] (and attributes in [`DomainXml::kept`]); the
    /// caller should show [`DomainXml::unknown_report`] to the user. Every
    /// problem is reported, not just the first.
    pub fn parse(xml: &str) -> Result<Self, XmlErrors> {
        let doc = checked_document(xml)?;
        let cx = Cx::new(xml);
        let root = doc.root_element();
        if root.tag_name().name() != "domain" {
            return Err(cx.err(root, root.tag_name().name(), "the root element must be <domain>").into());
        }
        let mut errors = Vec::new();
        let emulated = match root.attribute("type") {
            Some("kvm") => false,
            Some("qemu") => true,
            Some(t) => {
                errors.push(cx.err(root, "domain", format!("type='{t}' is not supported: rvirt runs type='kvm' (and type='qemu') domains")));
                false
            }
            None => {
                errors.push(cx.err(root, "domain", "the type='kvm' attribute is required"));
                false
            }
        };
        let mut d = DomainXml {
            emulated,
            name: String::new(),
            uuid: Uuid::nil(),
            title: None,
            description: None,
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
            kept: KeptXml::default(),
            namespaces: root
                .namespaces()
                .filter(|ns| ns.name() != Some("xml"))
                .map(|ns| (ns.name().map(str::to_string), ns.uri().to_string()))
                .collect(),
        };

        d.kept.attrs(&cx, "domain", root, &["type"]);
        let mut current: Option<(u64, Node)> = None;
        let mut seen = std::collections::BTreeSet::new();
        for n in elements(root) {
            // As libvirt reads them, empty elements (`<uuid/>`, `<description></description>`) are absent.
            if is_empty(n) {
                continue;
            }
            if let Err(e) = d.parse_top(&cx, n, &mut seen, &mut current, &mut errors) {
                errors.push(e);
            }
        }
        if d.name.is_empty() && !seen.contains("name") {
            errors.push(cx.err(root, "domain", "<name> is required"));
        }
        if d.memory_kib == 0 && !seen.contains("memory") {
            errors.push(cx.err(root, "domain", "<memory> is required"));
        }
        for check in [d.check_boot_orders(&cx, root), d.check_tuning(&cx, root)] {
            if let Err(e) = check {
                errors.push(e);
            }
        }
        d.current_memory_kib = match current {
            None => d.memory_kib,
            Some((c, n)) if c > d.memory_kib && d.memory_kib > 0 => {
                errors.push(cx.err(n, "currentMemory", format!("{c} KiB is more than <memory> ({} KiB)", d.memory_kib)));
                d.memory_kib
            }
            Some((c, n)) if c < d.memory_kib && !d.memballoon => {
                errors.push(cx.err(n, "currentMemory", "less than <memory> needs a memory balloon, but <memballoon model='none'/> removed it"));
                d.memory_kib
            }
            Some((c, _)) => c,
        };
        for (p, uri) in cx.inherited.take() {
            if !d.namespaces.iter().any(|(q, _)| q.as_deref() == Some(p.as_str())) {
                d.namespaces.push((Some(p), uri));
            }
        }
        let unknown = d.unknown.len() + d.kept_children().count();
        if unknown > MAX_UNKNOWN {
            errors.push(XmlError { line: 0, element: String::new(), message: format!("{unknown} unsupported elements; at most {MAX_UNKNOWN} are kept") });
        }
        if !errors.is_empty() {
            errors.sort_by_key(|e| e.line);
            return Err(XmlErrors(errors));
        }
        if d.uuid.is_nil() {
            d.uuid = Uuid::new_v4();
        }
        Ok(d)
    }

    /// One element under `<domain>`.
    fn parse_top<'a, 'input>(
        &mut self,
        cx: &Cx,
        n: Node<'a, 'input>,
        seen: &mut std::collections::BTreeSet<&'a str>,
        current: &mut Option<(u64, Node<'a, 'input>)>,
        errors: &mut Vec<XmlError>,
    ) -> Result<(), XmlError> {
        let tag = n.tag_name().name();
        let repeatable = matches!(tag, "devices");
        let known = matches!(
            tag,
            "name" | "uuid" | "title" | "description" | "memory" | "currentMemory" | "vcpu" | "os" | "on_poweroff" | "on_reboot" | "on_crash" | "devices" | "memtune" | "cputune"
        );
        if n.tag_name().namespace().is_some_and(|ns| ns != LIBVIRT_NS) {
            // Another application's element (`<qemu:commandline>`): kept whatever its name.
            self.unknown.push(cx.unknown("domain", n));
            return Ok(());
        }
        if known && !repeatable && !seen.insert(tag) {
            return Err(cx.err(n, tag, "appears twice"));
        }
        let interpreted: &[&str] = match tag {
            "memory" | "currentMemory" => &["unit"],
            "vcpu" => &["current"],
            "os" => &["firmware"],
            _ => &[],
        };
        if known && !matches!(tag, "devices" | "memtune" | "cputune") {
            self.kept.attrs(cx, tag, n, interpreted);
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
                self.name = name;
            }
            "uuid" => {
                let t = n.text().unwrap_or("").trim();
                self.uuid = Uuid::parse_str(t).map_err(|_| cx.err(n, "uuid", format!("'{t}' is not a UUID")))?;
            }
            "title" => {
                let t = n.text().unwrap_or("");
                if t.contains('\n') {
                    return Err(cx.err(n, "title", "a title is one line"));
                }
                self.title = Some(t.to_string());
            }
            "description" => self.description = Some(n.text().unwrap_or("").to_string()),
            "memory" => self.memory_kib = memory_kib(cx, n, "memory")?,
            "currentMemory" => *current = Some((memory_kib(cx, n, "currentMemory")?, n)),
            "vcpu" => {
                let t = cx.text(n, "vcpu")?;
                self.vcpus = match t.parse::<u32>() {
                    Ok(v) if (1..=MAX_VCPUS).contains(&v) => v,
                    _ => return Err(cx.err(n, "vcpu", format!("'{t}' is not a vCPU count from 1 to {MAX_VCPUS}"))),
                };
                if let Some(c) = n.attribute("current") {
                    if c != t {
                        return Err(cx.err(n, "vcpu", "current='...' below the maximum (vCPU hotplug) is not supported"));
                    }
                }
            }
            "os" => self.parse_os(cx, n, errors),
            "on_poweroff" => self.on_poweroff = lifecycle(cx, n, tag, &[LifecycleAction::Destroy, LifecycleAction::Restart])?,
            "on_reboot" => self.on_reboot = lifecycle(cx, n, tag, &[LifecycleAction::Restart, LifecycleAction::Destroy])?,
            "on_crash" => {
                self.on_crash = lifecycle(cx, n, tag, &[LifecycleAction::Destroy, LifecycleAction::Restart, LifecycleAction::Preserve])?
            }
            "devices" => self.parse_devices(cx, n, errors),
            "memtune" => self.parse_memtune(cx, n)?,
            "cputune" => self.parse_cputune(cx, n)?,
            _ => self.unknown.push(cx.unknown("domain", n)),
        }
        Ok(())
    }

    /// Every kept child element, of the domain's elements and of each device.
    pub fn kept_children(&self) -> impl Iterator<Item = &UnknownElement> {
        self.kept
            .children()
            .chain(self.disks.iter().flat_map(|d| d.kept.children()))
            .chain(self.interfaces.iter().flat_map(|i| i.kept.children()))
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

}


#[cfg(test)]
mod tests;
