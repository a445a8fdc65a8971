//! The command line's options turned into the shared [`VmConfig`]
//! (`rvirt_api::config`), and the checks made before any resource is taken.

use std::path::PathBuf;

use crate::Error;

pub use rvirt_api::config::{
    BackingFile, Boot, BootDevice, DiskBus, DiskConfig, ImageFormat, JailConfig, Media, NetConfig, OnReboot, SeccompMode,
    SerialMode, VmConfig, DEFAULT_CMDLINE,
};

/// Parses a console backend given to `option` (`--serial`, `--console`):
/// stdio, file=PATH, pty or null, naming the option in the error.
pub fn parse_serial(option: &str, s: &str) -> Result<SerialMode, Error> {
    match s {
        "stdio" => Ok(SerialMode::Stdio),
        "pty" => Ok(SerialMode::Pty),
        "null" | "off" | "none" => Ok(SerialMode::Null),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
            _ => Err(Error::Config(format!("invalid {option} '{s}': expected stdio, file=PATH, pty or null"))),
        },
    }
}

/// Parses `--on-reboot`: restart or exit.
pub fn parse_on_reboot(s: &str) -> Result<OnReboot, Error> {
    match s {
        "restart" => Ok(OnReboot::Restart),
        "exit" => Ok(OnReboot::Exit),
        _ => Err(Error::Config(format!("invalid --on-reboot '{s}': expected restart or exit"))),
    }
}

/// Parses `--seccomp`: kill, log or off.
pub fn parse_seccomp(s: &str) -> Result<SeccompMode, Error> {
    match s {
        "kill" => Ok(SeccompMode::Kill),
        "log" => Ok(SeccompMode::Log),
        "off" => Ok(SeccompMode::Off),
        _ => Err(Error::Config(format!("--seccomp must be kill, log or off, not '{s}'"))),
    }
}

/// The image library's name for a format.
pub fn block_format(f: ImageFormat) -> rvirt_block::Format {
    match f {
        ImageFormat::Raw => rvirt_block::Format::Raw,
        ImageFormat::Qcow2 => rvirt_block::Format::Qcow2,
    }
}

/// The sandbox's seccomp mode for the configured one.
pub fn sandbox_seccomp(m: SeccompMode) -> rvirt_sandbox::SeccompMode {
    match m {
        SeccompMode::Kill => rvirt_sandbox::SeccompMode::Kill,
        SeccompMode::Log => rvirt_sandbox::SeccompMode::Log,
        SeccompMode::Off => rvirt_sandbox::SeccompMode::Off,
    }
}

/// The sandbox's jail for the configured one.
pub fn sandbox_jail(j: &JailConfig) -> rvirt_sandbox::Jail {
    rvirt_sandbox::Jail { root: j.root.clone(), user: j.user }
}

/// Splits `a=b,c=d` into pairs, naming the option in errors. As in QEMU,
/// `,,` stands for a comma inside a value (a path with commas).
fn key_values(option: &str, s: &str) -> Result<Vec<(String, String)>, Error> {
    rvirt_api::config::split_options(s)
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

/// Parses `--disk path=F[,format=raw|qcow2][,readonly=on][,serial=S][,direct=on]
/// [,bus=virtio|scsi][,media=disk|cdrom][,boot=N][,backing=F:FMT]...[,probe_backing=on][,shareable=on]`.
pub fn parse_disk(s: &str) -> Result<DiskConfig, Error> {
    let mut d = DiskConfig::plain(PathBuf::new());
    let format = |v: &str| match rvirt_block::Format::parse(v) {
        Ok(rvirt_block::Format::Raw) => Ok(ImageFormat::Raw),
        Ok(rvirt_block::Format::Qcow2) => Ok(ImageFormat::Qcow2),
        Err(e) => Err(Error::Config(format!("--disk: {e}"))),
    };
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
                d.backing.push(BackingFile { path: PathBuf::from(p), format: format(f)? });
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
    if !d.backing.is_empty() && d.format != Some(ImageFormat::Qcow2) {
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

/// Parses `--net tap=NAME[,mac=52:54:00:..][,bridge=BR][,fd=N][,link=up|down]`.
pub fn parse_net(s: &str) -> Result<NetConfig, Error> {
    let mut n = NetConfig::on_tap("");
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

/// Largest vCPU count: APIC IDs are 8-bit in the MADT entries we emit.
pub const MAX_VCPUS: u8 = 254;

pub use rvirt_api::DEFAULT_FIRMWARE;

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

/// Checks values of `cfg` that do not need the host: vCPU count, memory
/// size, command line length, device count.
pub fn validate(cfg: &VmConfig) -> Result<(), Error> {
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(Error::Config(format!("--cpus must be between 1 and {MAX_VCPUS}")));
    }
    if let Some((v, _)) = cfg.vcpu_pins.iter().find(|(v, _)| *v >= cfg.vcpus) {
        return Err(Error::Config(format!("--vcpu-pin {v}: the VM has {} vCPUs (numbered from 0)", cfg.vcpus)));
    }
    rvirt_arch::MemoryLayout::new(cfg.memory_bytes).map_err(|e| Error::Config(format!("--memory: {e}")))?;
    if let Some(n) = cfg.dirty_ring {
        crate::dirty_ring::check_entries(n)?;
    }
    if let Boot::Kernel { cmdline, .. } = &cfg.boot {
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
    if cfg.console == Some(SerialMode::Stdio) && cfg.serial == SerialMode::Stdio {
        return Err(Error::Config("--console stdio needs --serial to be something else than stdio".into()));
    }
    let devices = cfg.disks.len() + cfg.nets.len() + usize::from(cfg.rng) + usize::from(cfg.balloon);
    if devices + usize::from(cfg.console.is_some()) > MAX_PCI_DEVICES {
        return Err(Error::Config(format!("at most {MAX_PCI_DEVICES} virtio devices fit on the PCI bus")));
    }
    for (i, a) in cfg.nets.iter().enumerate() {
        if cfg.nets[..i].iter().any(|b| b.tap == a.tap) {
            return Err(Error::Config(format!("tap '{}' is given to two --net cards", a.tap)));
        }
    }
    Ok(())
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
        assert_eq!(parse_serial("--serial", "stdio").unwrap(), SerialMode::Stdio);
        assert_eq!(parse_serial("--serial", "file=/tmp/x").unwrap(), SerialMode::File("/tmp/x".into()));
        assert_eq!(parse_serial("--serial", "null").unwrap(), SerialMode::Null);
        assert_eq!(parse_serial("--serial", "pty").unwrap(), SerialMode::Pty);
        assert!(parse_serial("--serial", "file=").is_err());
        assert!(parse_serial("--serial", "tcp:1234").unwrap_err().to_string().contains("tcp:1234"));
    }

    #[test]
    fn validation() {
        let mut c = VmConfig::new("/k");
        validate(&c).unwrap();
        c.vcpus = 0;
        assert!(validate(&c).unwrap_err().to_string().contains("--cpus"));
        c.vcpus = 2;
        c.memory_bytes = 1 << 20;
        assert!(validate(&c).unwrap_err().to_string().contains("--memory"));
        c.memory_bytes = 64 << 20;
        let kernel = |cmdline: &str| Boot::Kernel { kernel: "/k".into(), initrd: None, cmdline: cmdline.into() };
        c.boot = kernel(&"x".repeat(70000));
        assert!(validate(&c).unwrap_err().to_string().contains("--cmdline"));
        c.boot = kernel("a\0b");
        assert!(validate(&c).is_err());
        c.boot = Boot::Firmware {
            path: "/usr/share/seabios/bios-256k.bin".into(),
            reboot_timeout_ms: Some(5000),
            order: vec![BootDevice::Cdrom, BootDevice::Disk],
            menu_ms: Some(3000),
        };
        validate(&c).unwrap();
    }

    #[test]
    fn disks() {
        let d = parse_disk("path=/img/a.qcow2,format=qcow2,readonly=on,serial=abc,direct=off").unwrap();
        assert_eq!(d.path, PathBuf::from("/img/a.qcow2"));
        assert_eq!(d.format, Some(ImageFormat::Qcow2));
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
            let e = parse_disk(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn disk_chains_and_commas() {
        let d = parse_disk("path=/i/top,,1.qcow2,format=qcow2,backing=/i/mid:x.qcow2:qcow2,backing=/i/base.raw:raw,shareable=on").unwrap();
        assert_eq!(d.path, PathBuf::from("/i/top,1.qcow2"));
        let chain: Vec<(&str, ImageFormat)> = d.backing.iter().map(|l| (l.path.to_str().unwrap(), l.format)).collect();
        assert_eq!(chain, [("/i/mid:x.qcow2", ImageFormat::Qcow2), ("/i/base.raw", ImageFormat::Raw)]);
        assert!(d.shareable && !d.probe_backing);
        assert_eq!(escape_value("/a,b"), "/a,,b");
        // No format: raw, never probed.
        assert_eq!(parse_disk("path=/x").unwrap().format, None);
        assert_eq!(parse_disk("path=/x,boot=2").unwrap().boot_index, Some(2));
        assert!(parse_disk("path=/x,boot=first").unwrap_err().to_string().contains("boot='first'"));
    }

    #[test]
    fn nets_and_macs() {
        let n = parse_net("tap=tap0,mac=52:54:00:AB:cd:01").unwrap();
        assert_eq!(n, NetConfig { tap: "tap0".into(), fd: None, mac: Some([0x52, 0x54, 0, 0xab, 0xcd, 1]), bridge: None, link_up: true });
        assert!(!parse_net(&"tap=t1,link=down").unwrap().link_up);
        assert!(parse_net(&"tap=t1,link=sideways").unwrap_err().to_string().contains("not up or down"));
        let b = parse_net("tap=vnet3,bridge=br0,fd=7").unwrap();
        assert_eq!((b.bridge.as_deref(), b.fd), (Some("br0"), Some(7)));
        for bad in ["2", "-1", "seven", "99999999999"] {
            let e = parse_net(&format!("tap=t,fd={bad}")).unwrap_err().to_string();
            assert!(e.contains("not an inherited descriptor number"), "{e}");
        }
        assert!(parse_net(&"tap=t,bridge=").is_err());
        for bad in ["mac=52:54:00:00:00:01", "tap=", "tap=averyveryverylongname", "tap=t,mac=52:54:00:00:00", "tap=t,mac=01:00:00:00:00:00", "tap=t,mac=zz:00:00:00:00:00"] {
            assert!(parse_net(&bad).is_err(), "{bad}");
        }
        let mut c = VmConfig::new("/k");
        c.nets = vec![n.clone(), n];
        assert!(validate(&c).unwrap_err().to_string().contains("two --net"));
        let mut c = VmConfig::new("/k");
        c.console = Some(SerialMode::Stdio);
        assert!(validate(&c).is_err());
    }

    #[test]
    fn scsi_disks_and_cdrom_drives() {
        let d = parse_disk("path=/x.iso,media=cdrom").unwrap();
        assert_eq!((d.bus, d.media, d.read_only), (DiskBus::Scsi, Media::Cdrom, true), "a CD-ROM is a read-only SCSI unit");
        assert_eq!(parse_disk("path=/x.iso,media=cdrom").unwrap(), DiskConfig::cdrom("/x.iso".into()), "the API's drive is the CLI's");
        let empty = parse_disk("media=cdrom").unwrap();
        assert!(empty.path.as_os_str().is_empty(), "an empty drive");
        assert_eq!(parse_disk("path=/d,bus=scsi").unwrap().bus, DiskBus::Scsi);
        for (bad, why) in [
            ("path=/x,media=cdrom,bus=virtio", "bus=scsi"),
            ("path=/x,media=floppy", "media='floppy'"),
            ("path=/x,bus=ide", "bus='ide'"),
            ("bus=scsi", "only a CD-ROM drive may be empty"),
            ("path=/x,media=cdrom,direct=on", "do not apply to a CD-ROM"),
        ] {
            let e = parse_disk(bad).unwrap_err().to_string();
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
        assert_eq!(parse_on_reboot("exit").unwrap(), OnReboot::Exit);
        assert!(parse_on_reboot("halt").is_err());
    }
}
