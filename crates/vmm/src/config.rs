//! What a VM is made of, as given on the command line, checked before any
//! resource is taken.

use std::path::PathBuf;

use crate::Error;

/// Where the guest's COM1 goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// The VMM's stdin/stdout (raw mode when stdin is a terminal).
    Stdio,
    /// Appended to a file; no input.
    File(PathBuf),
    /// A new pseudo-terminal; its path is printed on stderr.
    Pty,
    /// Discarded.
    Null,
}

impl SerialMode {
    /// Parses a console backend given to `option` (`--serial`, `--console`),
    /// naming that option in the error.
    pub fn parse_for(option: &str, s: &str) -> Result<Self, Error> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "pty" => Ok(Self::Pty),
            "null" | "off" | "none" => Ok(Self::Null),
            _ => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(Error::Config(format!("invalid {option} '{s}': expected stdio, file=PATH, pty or null"))),
            },
        }
    }
}

impl std::str::FromStr for SerialMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse_for("--serial", s)
    }
}

/// What a guest reboot does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnReboot {
    /// Reset the machine and boot the same kernel again.
    Restart,
    /// End the VMM with exit code 0.
    Exit,
}

impl std::str::FromStr for OnReboot {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "restart" => Ok(Self::Restart),
            "exit" => Ok(Self::Exit),
            _ => Err(Error::Config(format!("invalid --on-reboot '{s}': expected restart or exit"))),
        }
    }
}

/// Which controller a disk is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskBus {
    /// Its own virtio-blk device (`vdX` in Linux).
    Virtio,
    /// A target on the virtio-scsi controller (`sdX`, `srX`).
    Scsi,
}

/// What kind of drive a disk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Media {
    /// A hard disk.
    Disk,
    /// A CD-ROM drive: read-only, removable, possibly empty.
    Cdrom,
}

/// A disk, from `--disk path=F[,format=raw|qcow2][,readonly=on][,serial=S][,direct=on]
/// [,bus=virtio|scsi][,media=disk|cdrom][,boot=N][,backing=F:FMT]...[,probe_backing=on][,shareable=on]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file; empty for a CD-ROM drive without a disc.
    pub path: PathBuf,
    /// virtio-blk or virtio-scsi.
    pub bus: DiskBus,
    /// Disk or CD-ROM.
    pub media: Media,
    /// Image format. Never probed: a guest writes its disk's first bytes,
    /// so a disk without a format is raw (libvirt's rule).
    pub format: Option<rvirt_block::Format>,
    /// The backing chain below a qcow2 image, top first, as resolved by the
    /// caller (rvirtd): when given, no file is opened by a name read from an image.
    pub backing: Vec<rvirt_block::Layer>,
    /// Guess the format of a backing file the image does not record (opt-in).
    pub probe_backing: bool,
    /// Other VMs may write the image at once (`<shareable/>`).
    pub shareable: bool,
    /// Refuse guest writes (and open the file read-only).
    pub read_only: bool,
    /// Serial number the guest reads (up to 20 bytes).
    pub serial: Option<String>,
    /// Bypass the host page cache (O_DIRECT, cache=none; raw and qcow2).
    pub direct: bool,
    /// Place in the firmware's boot order (`boot=N`, lowest first).
    pub boot_index: Option<u16>,
}

/// Splits `a=b,c=d` into pairs, naming the option in errors. As in QEMU,
/// `,,` stands for a comma inside a value (a path with commas).
fn key_values(option: &str, s: &str) -> Result<Vec<(String, String)>, Error> {
    let mut items = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                items.last_mut().map(|i| i.push(','));
            }
            ',' => items.push(String::new()),
            c => {
                items.last_mut().map(|i| i.push(c));
            }
        }
    }
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| Error::Config(format!("invalid {option} '{s}': '{kv}' is not KEY=VALUE")))
        })
        .collect()
}

/// Escapes a value for a `KEY=VALUE,...` option (commas doubled).
pub fn escape_value(v: &str) -> String {
    v.replace(',', ",,")
}

fn on_off(option: &str, key: &str, v: &str) -> Result<bool, Error> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(Error::Config(format!("invalid {option} {key}={v}: expected on or off"))),
    }
}

impl DiskConfig {
    /// A raw virtio disk at `path` with every option at its default.
    fn plain(path: PathBuf) -> Self {
        DiskConfig {
            path,
            bus: DiskBus::Virtio,
            media: Media::Disk,
            format: None,
            backing: Vec::new(),
            probe_backing: false,
            shareable: false,
            read_only: false,
            serial: None,
            direct: false,
            boot_index: None,
        }
    }

    /// A CD-ROM drive holding the disc `path` (what `change-media` inserts).
    pub fn cdrom(path: PathBuf) -> Self {
        DiskConfig { bus: DiskBus::Scsi, media: Media::Cdrom, read_only: true, ..Self::plain(path) }
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let mut d = DiskConfig::plain(PathBuf::new());
        let format = |v: &str| rvirt_block::Format::parse(v).map_err(|e| Error::Config(format!("--disk: {e}")));
        for (k, v) in key_values("--disk", s)? {
            let (k, v) = (k.as_str(), v.as_str());
            match k {
                "path" => d.path = PathBuf::from(v),
                "bus" => {
                    d.bus = match v {
                        "virtio" => DiskBus::Virtio,
                        "scsi" => DiskBus::Scsi,
                        _ => return Err(Error::Config(format!("--disk bus='{v}': expected virtio or scsi"))),
                    }
                }
                "media" => {
                    d.media = match v {
                        "disk" => Media::Disk,
                        "cdrom" => Media::Cdrom,
                        _ => return Err(Error::Config(format!("--disk media='{v}': expected disk or cdrom"))),
                    }
                }
                "format" => d.format = Some(format(v)?),
                "backing" => {
                    let (p, f) = v.rsplit_once(':').filter(|(p, _)| !p.is_empty()).ok_or_else(|| {
                        Error::Config(format!("--disk backing='{v}': expected PATH:FORMAT (the format is never guessed)"))
                    })?;
                    d.backing.push(rvirt_block::Layer { path: PathBuf::from(p), format: format(f)? });
                }
                "probe_backing" => d.probe_backing = on_off("--disk", k, v)?,
                "shareable" => d.shareable = on_off("--disk", k, v)?,
                "readonly" => d.read_only = on_off("--disk", k, v)?,
                "direct" => d.direct = on_off("--disk", k, v)?,
                "boot" => {
                    d.boot_index = Some(v.parse::<u16>().map_err(|_| Error::Config(format!("--disk boot='{v}': expected a number 0-65535")))?)
                }
                "serial" if v.len() <= 20 && v.bytes().all(|b| b.is_ascii_graphic()) => d.serial = Some(v.into()),
                "serial" => return Err(Error::Config(format!("--disk serial '{v}': at most 20 printable characters"))),
                _ => {
                    return Err(Error::Config(format!(
                        "--disk: unknown key '{k}' (expected path, format, backing, probe_backing, shareable, readonly, serial, direct, boot, bus, media)"
                    )))
                }
            }
        }
        if !d.backing.is_empty() && d.format != Some(rvirt_block::Format::Qcow2) {
            return Err(Error::Config(format!("--disk '{s}': backing= needs format=qcow2")));
        }
        if d.media == Media::Cdrom {
            // A CD-ROM drive is a SCSI unit and never written; it may be empty.
            if s.split(',').any(|kv| kv == "bus=virtio") {
                return Err(Error::Config(format!("--disk '{s}': media=cdrom is a SCSI unit (bus=scsi)")));
            }
            if d.direct || d.shareable || !d.backing.is_empty() {
                return Err(Error::Config(format!("--disk '{s}': direct, shareable and backing do not apply to a CD-ROM")));
            }
            d.bus = DiskBus::Scsi;
            d.read_only = true;
        } else if d.path.as_os_str().is_empty() {
            return Err(Error::Config(format!("--disk '{s}': path=FILE is required (only a CD-ROM drive may be empty)")));
        }
        Ok(d)
    }
}

/// A virtio network card on a tap, from `--net tap=NAME[,mac=52:54:00:..][,bridge=BR][,fd=N]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Tap interface name (created when missing and permitted).
    pub tap: String,
    /// An inherited descriptor of the tap, opened by the parent (rvirtd),
    /// used instead of opening the tap by name.
    pub fd: Option<i32>,
    /// MAC address; a random locally administered one when not given.
    pub mac: Option<[u8; 6]>,
    /// A Linux bridge the tap joins (and is brought up on) at start.
    pub bridge: Option<String>,
    /// The link state the guest sees at start (`link=down`: cable out); the
    /// API's `set-link` changes it, and it stays so across guest reboots.
    pub link_up: bool,
}

/// Parses the number of a descriptor the VMM inherits: above 2 (0-2 are
/// its standard streams) and below the kernel's limit on any process.
pub fn parse_inherited_fd(option: &str, s: &str) -> Result<i32, Error> {
    match s.parse::<i32>() {
        Ok(n) if (3..1 << 20).contains(&n) => Ok(n),
        _ => Err(Error::Config(format!("{option}: '{s}' is not an inherited descriptor number (3 or more)"))),
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], Error> {
    let bad = || Error::Config(format!("invalid MAC address '{s}': expected six hex bytes like 52:54:00:12:34:56"));
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(Error::Config(format!("invalid MAC address '{s}': a multicast address cannot be a card's")));
    }
    Ok(mac)
}

impl std::str::FromStr for NetConfig {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let mut n = NetConfig { tap: String::new(), fd: None, mac: None, bridge: None, link_up: true };
        for (k, v) in key_values("--net", s)? {
            let (k, v) = (k.as_str(), v.as_str());
            match k {
                "tap" => n.tap = v.into(),
                "mac" => n.mac = Some(parse_mac(v)?),
                "bridge" if !v.is_empty() && v.len() <= 15 => n.bridge = Some(v.into()),
                "bridge" => return Err(Error::Config(format!("--net: bridge '{v}' is not an interface name (1-15 characters)"))),
                "fd" => n.fd = Some(parse_inherited_fd("--net", v)?),
                "link" => {
                    n.link_up = match v {
                        "up" => true,
                        "down" => false,
                        _ => return Err(Error::Config(format!("--net: link='{v}' is not up or down"))),
                    }
                }
                _ => return Err(Error::Config(format!("--net: unknown key '{k}' (expected tap, mac, bridge, fd, link)"))),
            }
        }
        if n.tap.is_empty() || n.tap.len() > 15 {
            return Err(Error::Config(format!("--net '{s}': tap=NAME (1-15 characters) is required")));
        }
        Ok(n)
    }
}

/// Largest vCPU count: APIC IDs are 8-bit in the MADT entries we emit.
pub const MAX_VCPUS: u8 = 254;

pub use rvirt_api::DEFAULT_FIRMWARE;

/// How the VM starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// The VMM loads a Linux kernel and starts it at its entry point.
    Kernel {
        /// Kernel image: bzImage or ELF vmlinux with a PVH note.
        kernel: PathBuf,
        /// Optional initramfs.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
    /// The VM continues from a snapshot (`--restore DIR`): its memory,
    /// vCPUs and devices as they were; vCPU count, memory size and UUID
    /// come from the snapshot.
    Restore {
        /// The snapshot's directory.
        dir: PathBuf,
        /// Read the memory into fresh RAM instead of mapping the file
        /// copy-on-write.
        copy_memory: bool,
    },
    /// vCPUs start at the reset vector of a firmware image (SeaBIOS),
    /// which boots from the guest's own disks.
    Firmware {
        /// The image.
        path: PathBuf,
        /// Milliseconds before a failed boot is retried by a reboot
        /// (libvirt's `<bios rebootTimeout>`); None waits for ever.
        reboot_timeout_ms: Option<u32>,
        /// Device classes to try, in order, for devices the per-disk boot
        /// order leaves out (libvirt's `<boot dev>`, QEMU's `-boot order`).
        order: Vec<BootDevice>,
        /// Show the firmware's boot menu for this many milliseconds
        /// (`<bootmenu enable='yes' timeout>`); None: no menu.
        menu_ms: Option<u16>,
    },
}

/// A class of boot device, as SeaBIOS ranks them from CMOS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootDevice {
    /// `a`: floppy (rvirt has none; kept so the order means what it says).
    Floppy,
    /// `c`: hard disk.
    Disk,
    /// `d`: CD-ROM.
    Cdrom,
    /// `n`: network (an option ROM's boot entry).
    Network,
}

impl BootDevice {
    /// The code SeaBIOS reads from CMOS 0x3D/0x38.
    pub fn cmos_code(self) -> u8 {
        match self {
            Self::Floppy => 1,
            Self::Disk => 2,
            Self::Cdrom => 3,
            Self::Network => 4,
        }
    }
}

/// Parses QEMU's `-boot order=` letters (`a` floppy, `c` disk, `d` CD-ROM,
/// `n` network), at most three (what CMOS holds), none twice.
pub fn parse_boot_order(s: &str) -> Result<Vec<BootDevice>, Error> {
    let bad = |why: &str| Error::Config(format!("--boot-order '{s}': {why} (letters a, c, d, n, e.g. 'dc')"));
    let mut v = Vec::new();
    for c in s.chars() {
        let d = match c {
            'a' => BootDevice::Floppy,
            'c' => BootDevice::Disk,
            'd' => BootDevice::Cdrom,
            'n' => BootDevice::Network,
            _ => return Err(bad(&format!("'{c}' is not a boot device"))),
        };
        if v.contains(&d) {
            return Err(bad(&format!("'{c}' appears twice")));
        }
        v.push(d);
    }
    if v.is_empty() || v.len() > 3 {
        return Err(bad("one to three devices"));
    }
    Ok(v)
}

/// A complete, validated description of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// What runs first: a kernel or firmware.
    pub boot: Boot,
    /// The machine's UUID (SMBIOS, fw_cfg), when it has one.
    pub uuid: Option<[u8; 16]>,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// COM1 backend.
    pub serial: SerialMode,
    /// Control API socket path.
    pub api_socket: Option<PathBuf>,
    /// Guest reboot behaviour.
    pub on_reboot: OnReboot,
    /// Virtio disks, in PCI slot order.
    pub disks: Vec<DiskConfig>,
    /// Virtio network cards.
    pub nets: Vec<NetConfig>,
    /// A virtio entropy device.
    pub rng: bool,
    /// A virtio memory balloon.
    pub balloon: bool,
    /// A virtio console (hvc0) and where it goes.
    pub console: Option<SerialMode>,
    /// What a forbidden system call does (`Off` unless asked: a VMM run
    /// inside another program, such as a test, must not filter its threads).
    pub seccomp: rvirt_sandbox::SeccompMode,
    /// The jail the VMM enters once its files are open, if any.
    pub jail: Option<rvirt_sandbox::Jail>,
    /// Host CPUs for each pinned vCPU (libvirt's `<vcpupin>`).
    pub vcpu_pins: Vec<(u8, Vec<usize>)>,
    /// Host CPUs for every other thread (`<emulatorpin>`).
    pub emulator_pin: Option<Vec<usize>>,
}

/// Parses a CPU list as rvirt-vmm takes it: `0,2,5` or ranges `0-3`.
pub fn parse_cpu_list(what: &str, s: &str) -> Result<Vec<usize>, Error> {
    let bad = || Error::Config(format!("{what}: '{s}' is not a list of host CPUs (0,2,4-7)"));
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
        if a > b || b >= libc::CPU_SETSIZE as usize {
            return Err(bad());
        }
        cpus.extend(a..=b);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Virtio devices that fit on bus 0 beside the host bridge.
pub const MAX_PCI_DEVICES: usize = 31;

/// The command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self::with_boot(Boot::Kernel { kernel: kernel.into(), initrd: None, cmdline: DEFAULT_CMDLINE.into() })
    }

    /// A config with defaults, booting through the firmware image `firmware`.
    pub fn firmware(firmware: impl Into<PathBuf>) -> Self {
        Self::with_boot(Boot::Firmware {
            path: firmware.into(),
            reboot_timeout_ms: None,
            order: vec![BootDevice::Disk, BootDevice::Cdrom],
            menu_ms: None,
        })
    }

    fn with_boot(boot: Boot) -> Self {
        Self {
            boot,
            uuid: None,
            vcpus: 1,
            memory_bytes: 512 << 20,
            serial: SerialMode::Stdio,
            api_socket: None,
            on_reboot: OnReboot::Restart,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            balloon: false,
            console: None,
            seccomp: rvirt_sandbox::SeccompMode::Off,
            jail: None,
            vcpu_pins: Vec::new(),
            emulator_pin: None,
        }
    }

    /// Checks values that do not need the host: vCPU count, memory size,
    /// command line length.
    pub fn validate(&self) -> Result<(), Error> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!("--cpus must be between 1 and {MAX_VCPUS}")));
        }
        if let Some((v, _)) = self.vcpu_pins.iter().find(|(v, _)| *v >= self.vcpus) {
            return Err(Error::Config(format!("--vcpu-pin {v}: the VM has {} vCPUs (numbered from 0)", self.vcpus)));
        }
        rvirt_arch::MemoryLayout::new(self.memory_bytes).map_err(|e| Error::Config(format!("--memory: {e}")))?;
        if let Boot::Kernel { cmdline, .. } = &self.boot {
            if cmdline.len() >= rvirt_arch::layout::CMDLINE_MAX_SIZE {
                return Err(Error::Config(format!(
                    "--cmdline is {} bytes; the limit is {}",
                    cmdline.len(),
                    rvirt_arch::layout::CMDLINE_MAX_SIZE - 1
                )));
            }
            if cmdline.bytes().any(|b| b == 0) {
                return Err(Error::Config("--cmdline contains a NUL byte".into()));
            }
        }
        if self.console == Some(SerialMode::Stdio) && self.serial == SerialMode::Stdio {
            return Err(Error::Config("--console stdio needs --serial to be something else than stdio".into()));
        }
        let devices = self.disks.len() + self.nets.len() + usize::from(self.rng) + usize::from(self.balloon);
        if devices + usize::from(self.console.is_some()) > MAX_PCI_DEVICES {
            return Err(Error::Config(format!("at most {MAX_PCI_DEVICES} virtio devices fit on the PCI bus")));
        }
        for (i, a) in self.nets.iter().enumerate() {
            if self.nets[..i].iter().any(|b| b.tap == a.tap) {
                return Err(Error::Config(format!("tap '{}' is given to two --net cards", a.tap)));
            }
        }
        Ok(())
    }
}

/// Parses a UUID written as 32 hex digits, with or without the usual dashes.
pub fn parse_uuid(s: &str) -> Result<[u8; 16], Error> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let bad = || Error::Config(format!("invalid --uuid '{s}': expected 32 hex digits like 4dea22b3-1d52-d8f3-2516-782e98ab3fa0"));
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Parses a memory size the way QEMU does: a plain number is MiB; suffixes
/// `K`, `M`, `G`, `T` (optionally followed by `B` or `iB`) are binary units.
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let bad = || Error::Config(format!("invalid memory size '{s}': expected e.g. 512M, 2G or 1024 (MiB)"));
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit.strip_suffix("IB").or_else(|| unit.strip_suffix('B')).unwrap_or(&unit);
    let shift = match unit {
        "" | "M" => 20,
        "K" => 10,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("512").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096k").unwrap(), 4 << 20);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        for bad in ["", "M", "12X", "-1G", "1.5G", "99999999999999999999G", "18446744073709551615T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serial_modes() {
        assert_eq!("stdio".parse::<SerialMode>().unwrap(), SerialMode::Stdio);
        assert_eq!("file=/tmp/x".parse::<SerialMode>().unwrap(), SerialMode::File("/tmp/x".into()));
        assert_eq!("null".parse::<SerialMode>().unwrap(), SerialMode::Null);
        assert_eq!("pty".parse::<SerialMode>().unwrap(), SerialMode::Pty);
        assert!("file=".parse::<SerialMode>().is_err());
        assert!("tcp:1234".parse::<SerialMode>().unwrap_err().to_string().contains("tcp:1234"));
    }

    #[test]
    fn validation() {
        let mut c = VmConfig::new("/k");
        c.validate().unwrap();
        c.vcpus = 0;
        assert!(c.validate().unwrap_err().to_string().contains("--cpus"));
        c.vcpus = 2;
        c.memory_bytes = 1 << 20;
        assert!(c.validate().unwrap_err().to_string().contains("--memory"));
        c.memory_bytes = 64 << 20;
        let kernel = |cmdline: &str| Boot::Kernel { kernel: "/k".into(), initrd: None, cmdline: cmdline.into() };
        c.boot = kernel(&"x".repeat(70000));
        assert!(c.validate().unwrap_err().to_string().contains("--cmdline"));
        c.boot = kernel("a\0b");
        assert!(c.validate().is_err());
        c.boot = Boot::Firmware {
            path: "/usr/share/seabios/bios-256k.bin".into(),
            reboot_timeout_ms: Some(5000),
            order: vec![BootDevice::Cdrom, BootDevice::Disk],
            menu_ms: Some(3000),
        };
        c.validate().unwrap();
    }

    #[test]
    fn disks() {
        let d: DiskConfig = "path=/img/a.qcow2,format=qcow2,readonly=on,serial=abc,direct=off".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/img/a.qcow2"));
        assert_eq!(d.format, Some(rvirt_block::Format::Qcow2));
        assert!(d.read_only && !d.direct);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        for (bad, needle) in [
            ("", "KEY=VALUE"),
            ("/img/a", "KEY=VALUE"),
            ("format=raw", "path=FILE"),
            ("path=a,format=vmdk", "vmdk"),
            ("path=a,readonly=maybe", "on or off"),
            ("path=a,cache=none", "unknown key 'cache'"),
            ("path=a,serial=123456789012345678901", "20"),
            ("path=a,format=qcow2,backing=/b", "PATH:FORMAT"),
            ("path=a,format=qcow2,backing=/b:vmdk", "vmdk"),
            ("path=a,backing=/b:raw", "needs format=qcow2"),
        ] {
            let e = bad.parse::<DiskConfig>().unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn disk_chains_and_commas() {
        let d: DiskConfig = "path=/i/top,,1.qcow2,format=qcow2,backing=/i/mid:x.qcow2:qcow2,backing=/i/base.raw:raw,shareable=on".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/i/top,1.qcow2"));
        let chain: Vec<(&str, rvirt_block::Format)> = d.backing.iter().map(|l| (l.path.to_str().unwrap(), l.format)).collect();
        assert_eq!(chain, [("/i/mid:x.qcow2", rvirt_block::Format::Qcow2), ("/i/base.raw", rvirt_block::Format::Raw)]);
        assert!(d.shareable && !d.probe_backing);
        assert_eq!(escape_value("/a,b"), "/a,,b");
        // No format: raw, never probed.
        assert_eq!("path=/x".parse::<DiskConfig>().unwrap().format, None);
        assert_eq!("path=/x,boot=2".parse::<DiskConfig>().unwrap().boot_index, Some(2));
        assert!("path=/x,boot=first".parse::<DiskConfig>().unwrap_err().to_string().contains("boot='first'"));
    }

    #[test]
    fn nets_and_macs() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(n, NetConfig { tap: "tap0".into(), fd: None, mac: Some([0x52, 0x54, 0, 0xab, 0xcd, 1]), bridge: None, link_up: true });
        assert!(!"tap=t1,link=down".parse::<NetConfig>().unwrap().link_up);
        assert!("tap=t1,link=sideways".parse::<NetConfig>().unwrap_err().to_string().contains("not up or down"));
        let b: NetConfig = "tap=vnet3,bridge=br0,fd=7".parse().unwrap();
        assert_eq!((b.bridge.as_deref(), b.fd), (Some("br0"), Some(7)));
        for bad in ["2", "-1", "seven", "99999999999"] {
            let e = format!("tap=t,fd={bad}").parse::<NetConfig>().unwrap_err().to_string();
            assert!(e.contains("not an inherited descriptor number"), "{e}");
        }
        assert!("tap=t,bridge=".parse::<NetConfig>().is_err());
        for bad in ["mac=52:54:00:00:00:01", "tap=", "tap=averyveryverylongname", "tap=t,mac=52:54:00:00:00", "tap=t,mac=01:00:00:00:00:00", "tap=t,mac=zz:00:00:00:00:00"] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
        let mut c = VmConfig::new("/k");
        c.nets = vec![n.clone(), n];
        assert!(c.validate().unwrap_err().to_string().contains("two --net"));
        let mut c = VmConfig::new("/k");
        c.console = Some(SerialMode::Stdio);
        assert!(c.validate().is_err());
    }

    #[test]
    fn scsi_disks_and_cdrom_drives() {
        let d: DiskConfig = "path=/x.iso,media=cdrom".parse().unwrap();
        assert_eq!((d.bus, d.media, d.read_only), (DiskBus::Scsi, Media::Cdrom, true), "a CD-ROM is a read-only SCSI unit");
        assert_eq!("path=/x.iso,media=cdrom".parse::<DiskConfig>().unwrap(), DiskConfig::cdrom("/x.iso".into()), "the API's drive is the CLI's");
        let empty: DiskConfig = "media=cdrom".parse().unwrap();
        assert!(empty.path.as_os_str().is_empty(), "an empty drive");
        assert_eq!("path=/d,bus=scsi".parse::<DiskConfig>().unwrap().bus, DiskBus::Scsi);
        for (bad, why) in [
            ("path=/x,media=cdrom,bus=virtio", "bus=scsi"),
            ("path=/x,media=floppy", "media='floppy'"),
            ("path=/x,bus=ide", "bus='ide'"),
            ("bus=scsi", "only a CD-ROM drive may be empty"),
            ("path=/x,media=cdrom,direct=on", "do not apply to a CD-ROM"),
        ] {
            let e = bad.parse::<DiskConfig>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn boot_order_letters() {
        use BootDevice::*;
        assert_eq!(parse_boot_order("dcn").unwrap(), vec![Cdrom, Disk, Network]);
        assert_eq!(parse_boot_order("c").unwrap(), vec![Disk]);
        for bad in ["", "cc", "x", "acdn", "C"] {
            assert!(parse_boot_order(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uuids() {
        let u = parse_uuid("4dea22b3-1d52-d8f3-2516-782e98ab3fa0").unwrap();
        assert_eq!(u[..4], [0x4d, 0xea, 0x22, 0xb3]);
        assert_eq!(parse_uuid("4dea22b31d52d8f32516782e98ab3fa0").unwrap(), u);
        for bad in ["", "4dea22b3", "4dea22b3-1d52-d8f3-2516-782e98ab3fa0aa", "zdea22b3-1d52-d8f3-2516-782e98ab3fa0"] {
            assert!(parse_uuid(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn on_reboot() {
        assert_eq!("exit".parse::<OnReboot>().unwrap(), OnReboot::Exit);
        assert!("halt".parse::<OnReboot>().is_err());
    }
}
