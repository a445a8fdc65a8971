//! What a VM is made of, as one typed value: `rvirt-vmm`'s command line
//! builds it, rvirtd builds it from a domain definition and hands it over
//! as JSON (`rvirt-vmm --config FILE`), and a snapshot keeps it beside the
//! VM's state so a restore builds the same devices. No crate writes option
//! strings for another to parse.
//!
//! Checking a value against the host (files, taps, limits) is the VMM's.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where a guest console (COM1 or the virtio console) goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
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

/// What a guest reboot does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnReboot {
    /// Reset the machine and boot the same kernel again.
    Restart,
    /// End the VMM with exit code 0.
    Exit,
}

/// Which controller a disk is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBus {
    /// Its own virtio-blk device (`vdX` in Linux).
    Virtio,
    /// A target on the virtio-scsi controller (`sdX`, `srX`).
    Scsi,
}

/// What kind of drive a disk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Media {
    /// A hard disk.
    Disk,
    /// A CD-ROM drive: read-only, removable, possibly empty.
    Cdrom,
}

/// A disk image's format, always given (never probed: a guest writes its
/// disk's first bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageFormat {
    /// A plain file or block device.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

/// One file of a backing chain, with its format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackingFile {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
}

/// A disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image file; empty for a CD-ROM drive without a disc.
    pub path: PathBuf,
    /// virtio-blk or virtio-scsi.
    pub bus: DiskBus,
    /// Disk or CD-ROM.
    pub media: Media,
    /// Image format; a disk without one is raw (libvirt's rule).
    pub format: Option<ImageFormat>,
    /// The backing chain below a qcow2 image, top first, as resolved by the
    /// caller (rvirtd): when given, no file is opened by a name read from an image.
    pub backing: Vec<BackingFile>,
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
    /// Place in the firmware's boot order (lowest first).
    pub boot_index: Option<u16>,
}

impl DiskConfig {
    /// A raw virtio disk at `path` with every option at its default.
    pub fn plain(path: PathBuf) -> Self {
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

    /// A CD-ROM drive holding the disc `path` (empty: no disc).
    pub fn cdrom(path: PathBuf) -> Self {
        DiskConfig { bus: DiskBus::Scsi, media: Media::Cdrom, read_only: true, ..Self::plain(path) }
    }
}

/// A virtio network card on a tap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// The link state the guest sees at start (false: cable out); the
    /// API's `set-link` changes it, and it stays so across guest reboots.
    pub link_up: bool,
}

impl NetConfig {
    /// A card on `tap` with a random MAC, link up.
    pub fn on_tap(tap: impl Into<String>) -> Self {
        Self { tap: tap.into(), fd: None, mac: None, bridge: None, link_up: true }
    }
}

/// A class of boot device, as SeaBIOS ranks them from CMOS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
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

/// How the VM starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
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
    /// vCPUs and devices as they were; the rest of the configuration is
    /// the snapshot's, with the backends given again.
    Restore {
        /// The snapshot's directory.
        dir: PathBuf,
        /// Read the memory into fresh RAM instead of mapping the file
        /// copy-on-write.
        copy_memory: bool,
    },
    /// The VM arrives from another VMM's `migrate` (`--incoming URI`:
    /// `unix:PATH` or `tcp:HOST:PORT`): its configuration, memory and state
    /// come from the stream; the rest of this configuration gives backends.
    Incoming {
        /// Where to wait for the source.
        uri: String,
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
        /// Show the firmware's boot menu for this many milliseconds; None: no menu.
        menu_ms: Option<u16>,
    },
}

/// What a forbidden system call does in the VMM's threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeccompMode {
    /// Stop the VMM.
    Kill,
    /// Allow it; the kernel's audit log records it.
    Log,
    /// No filters (a VMM run inside another program, such as a test).
    #[default]
    Off,
}

/// The jail the VMM enters once its files are open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// The directory the jail's empty root is mounted over.
    pub root: PathBuf,
    /// The unprivileged uid and gid to run as; None keeps uid 0 without capabilities.
    pub user: Option<(u32, u32)>,
}

/// The command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

/// A complete description of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// What runs first: a kernel, firmware, or a snapshot's state.
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
    /// Disks, in order (virtio ones in PCI slot order).
    pub disks: Vec<DiskConfig>,
    /// Virtio network cards.
    pub nets: Vec<NetConfig>,
    /// A virtio entropy device.
    pub rng: bool,
    /// A virtio memory balloon.
    pub balloon: bool,
    /// A virtio console (hvc0) and where it goes.
    pub console: Option<SerialMode>,
    /// What a forbidden system call does.
    pub seccomp: SeccompMode,
    /// The jail the VMM enters once its files are open, if any.
    pub jail: Option<JailConfig>,
    /// Host CPUs for each pinned vCPU (libvirt's `<vcpupin>`).
    pub vcpu_pins: Vec<(u8, Vec<usize>)>,
    /// Host CPUs for every other thread (`<emulatorpin>`).
    pub emulator_pin: Option<Vec<usize>>,
    /// Entries of each vCPU's KVM dirty ring, when a migration is to
    /// track dirty pages through rings instead of bitmaps (opt-in).
    #[serde(default)]
    pub dirty_ring: Option<u32>,
    /// The vCPUs wait for the API's `resume` before running any guest
    /// instruction (QEMU's `-S`): a domain restored or reverted paused.
    #[serde(default)]
    pub start_paused: bool,
}

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

    /// A config with defaults that starts as `boot` says: one vCPU, 512 MiB,
    /// COM1 on stdio, no devices, no seccomp, no jail.
    pub fn with_boot(boot: Boot) -> Self {
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
            seccomp: SeccompMode::Off,
            jail: None,
            vcpu_pins: Vec::new(),
            emulator_pin: None,
            dirty_ring: None,
            start_paused: false,
        }
    }

    /// The value as JSON (what rvirtd writes for `rvirt-vmm --config`);
    /// a path that is not UTF-8 cannot be written.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }

    /// Reads a value written by [`VmConfig::to_json`]; unknown fields are refused.
    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }
}

/// Splits a QEMU-style option string (`a=b,c=d`) at its commas; as in
/// QEMU, `,,` stands for a comma inside a value (a path with commas).
/// Shared by rvirt-vmm's `--disk`/`--net` and rvirt-img's `--image-opts`.
pub fn split_options(s: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                if let Some(i) = items.last_mut() {
                    i.push(',');
                }
            }
            ',' => items.push(String::new()),
            c => {
                if let Some(i) = items.last_mut() {
                    i.push(c);
                }
            }
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_strings_split_at_single_commas() {
        assert_eq!(split_options("path=/a,,b.qcow2,format=qcow2"), ["path=/a,b.qcow2", "format=qcow2"]);
        assert_eq!(split_options(""), [""]);
        assert_eq!(split_options("a=1,,,b=2"), ["a=1,", "b=2"]);
    }

    #[test]
    fn a_whole_config_round_trips_through_json_and_unknown_fields_are_refused() {
        let mut c = VmConfig::firmware("/fw.bin");
        c.uuid = Some([7; 16]);
        c.disks.push(DiskConfig {
            format: Some(ImageFormat::Qcow2),
            backing: vec![BackingFile { path: "/b.raw".into(), format: ImageFormat::Raw }],
            serial: Some("S1".into()),
            boot_index: Some(0),
            ..DiskConfig::plain("/a,b.qcow2".into())
        });
        c.disks.push(DiskConfig::cdrom(PathBuf::new()));
        c.nets.push(NetConfig { fd: Some(9), mac: Some([0x52, 0x54, 0, 1, 2, 3]), bridge: Some("br0".into()), link_up: false, ..NetConfig::on_tap("t0") });
        c.console = Some(SerialMode::File("/log".into()));
        c.jail = Some(JailConfig { root: "/j".into(), user: Some((1000, 1000)) });
        c.vcpu_pins = vec![(0, vec![1, 2])];
        c.seccomp = SeccompMode::Kill;
        let json = c.to_json().unwrap();
        assert_eq!(VmConfig::from_json(&json).unwrap(), c);
        let bad = json.replacen("\"rng\"", "\"rgn\"", 1);
        assert!(VmConfig::from_json(&bad).unwrap_err().to_string().contains("rgn"));
    }
}
