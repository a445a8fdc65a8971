//! `<os>`: how a domain boots. With `<kernel>` rvirt-vmm loads it directly;
//! without, SeaBIOS boots the domain's disks, steered by `<loader>`,
//! `<boot dev>`, `<bootmenu>` and `<bios>`. UEFI (`firmware='efi'`, a
//! pflash `<loader>`) is recorded so the domain defines, and refused at
//! start.

use std::path::PathBuf;

use roxmltree::Node;

use super::{elements, Cx, DomainXml, XmlError};

/// A `<boot dev>` device class, in libvirt's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootDev {
    /// `fd`: floppy.
    Floppy,
    /// `hd`: hard disk.
    Disk,
    /// `cdrom`.
    Cdrom,
    /// `network`: PXE.
    Network,
}

impl BootDev {
    /// libvirt's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Floppy => "fd",
            Self::Disk => "hd",
            Self::Cdrom => "cdrom",
            Self::Network => "network",
        }
    }

    /// The letter rvirt-vmm's `--boot-order` (and QEMU's `-boot order`) uses.
    pub fn letter(self) -> char {
        match self {
            Self::Floppy => 'a',
            Self::Disk => 'c',
            Self::Cdrom => 'd',
            Self::Network => 'n',
        }
    }
}

/// `<bootmenu enable=… timeout=…>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootMenu {
    /// `enable='yes'`.
    pub enable: bool,
    /// `timeout` in milliseconds (0-65535), when given.
    pub timeout_ms: Option<u16>,
}

/// What `<os>` says about firmware boot (all of it is kept for `dumpxml`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FirmwareDef {
    /// `<os firmware='…'>` as written (`bios` or `efi`).
    pub os_firmware: Option<String>,
    /// `<loader type='rom'>PATH</loader>`: the BIOS image (Debian's SeaBIOS when absent).
    pub loader: Option<PathBuf>,
    /// `<boot dev>` in order (at most 4, none twice).
    pub boot_devs: Vec<BootDev>,
    /// `<bootmenu>`.
    pub bootmenu: Option<BootMenu>,
    /// `<bios useserial>`: SeaBIOS always uses the serial console here; kept.
    pub bios_useserial: Option<bool>,
    /// `<bios rebootTimeout>` in ms: -1 never reboots after a failed boot.
    pub reboot_timeout_ms: Option<i32>,
    /// Why this definition asks for UEFI (`firmware='efi'`, a pflash
    /// loader), which rvirt cannot start yet; None when it does not.
    pub uefi: Option<String>,
}

/// libvirt's limit on `<boot dev>` elements.
const MAX_BOOT_DEVS: usize = 4;

fn yes_no(cx: &Cx, n: Node, path: &str, attr: &str) -> Result<Option<bool>, XmlError> {
    match n.attribute(attr) {
        None => Ok(None),
        Some("yes") => Ok(Some(true)),
        Some("no") => Ok(Some(false)),
        Some(v) => Err(cx.err(n, path, format!("{attr}='{v}' must be yes or no"))),
    }
}

/// An optional path element's text: empty means absent, as libvirt reads
/// the `<kernel></kernel>` Vagrant writes.
fn optional_path(cx: &Cx, n: Node, path: &str) -> Result<Option<PathBuf>, XmlError> {
    match n.text().map(str::trim).unwrap_or("") {
        "" => Ok(None),
        t => cx.path(n, path, t).map(Some),
    }
}

impl DomainXml {
    pub(super) fn parse_os(&mut self, cx: &Cx, os: Node, errors: &mut Vec<XmlError>) {
        match os.attribute("firmware") {
            None => {}
            Some(f @ "bios") => self.firmware.os_firmware = Some(f.to_string()),
            Some(f @ "efi") => {
                self.firmware.os_firmware = Some(f.to_string());
                self.firmware.uefi = Some("<os firmware='efi'>".into());
            }
            Some(f) => errors.push(cx.err(os, "os", format!("firmware='{f}' is not supported (bios or efi)"))),
        }
        for n in elements(os) {
            let tag = n.tag_name().name();
            if matches!(tag, "kernel" | "initrd" | "cmdline") && super::is_empty(n) {
                continue;
            }
            if let Err(e) = self.parse_os_child(cx, n) {
                errors.push(e);
            }
        }
        if self.kernel.is_none() && (self.initrd.is_some() || self.cmdline.is_some()) {
            errors.push(cx.err(os, "os", "<initrd> and <cmdline> need a <kernel>"));
        }
        if self.kernel.is_some() && (self.firmware.loader.is_some() || self.firmware.uefi.is_some()) {
            errors.push(cx.err(os, "os", "<kernel> with firmware (<loader>, firmware='efi'): rvirt loads kernels directly, without firmware"));
        }
    }

    fn parse_os_child(&mut self, cx: &Cx, n: Node) -> Result<(), XmlError> {
        let tag = n.tag_name().name();
        let path = format!("os/{tag}");
        let interpreted: &[&str] = match tag {
            "type" => &["arch", "machine"],
            "loader" => &["type"],
            "boot" => &["dev"],
            "bootmenu" => &["enable", "timeout"],
            "bios" => &["useserial", "rebootTimeout"],
            _ => &[],
        };
        // <boot> repeats; what libvirt puts on it besides dev is nothing.
        if matches!(tag, "type" | "loader" | "kernel" | "initrd" | "cmdline" | "bootmenu" | "bios") && !(tag == "loader" && n.attribute("type") == Some("pflash")) {
            self.kept.attrs(cx, &path, n, interpreted);
        }
        {
            match tag {
                "type" => {
                    let t = cx.text(n, &path)?;
                    if t != "hvm" {
                        return Err(cx.err(n, &path, format!("'{t}' is not supported (rvirt runs hvm guests)")));
                    }
                    match n.attribute("arch") {
                        None | Some("x86_64") => {}
                        // A 32-bit guest runs on the same x86-64 vCPUs.
                        Some(a @ "i686") => self.arch = Some(a.to_string()),
                        Some(a) => return Err(cx.err(n, &path, format!("arch='{a}' is not supported (x86_64 or i686)"))),
                    }
                    self.machine = n.attribute("machine").map(str::to_string);
                }
                "kernel" => self.kernel = optional_path(cx, n, &path)?,
                "initrd" => self.initrd = optional_path(cx, n, &path)?,
                "cmdline" => {
                    let t = n.text().unwrap_or("").trim();
                    self.cmdline = (!t.is_empty()).then(|| t.to_string());
                }
                "loader" => match n.attribute("type").unwrap_or("rom") {
                    "rom" => self.firmware.loader = optional_path(cx, n, &path)?,
                    "pflash" => {
                        self.firmware.uefi = Some("<loader type='pflash'>".into());
                        self.unknown.push(cx.unknown("os", n));
                    }
                    t => return Err(cx.err(n, &path, format!("type='{t}' is not supported (rom, or pflash for UEFI)"))),
                },
                "boot" => {
                    let dev = match cx.attr(n, &path, "dev")? {
                        "hd" => BootDev::Disk,
                        "cdrom" => BootDev::Cdrom,
                        "network" => BootDev::Network,
                        "fd" => BootDev::Floppy,
                        d => return Err(cx.err(n, &path, format!("dev='{d}' is not a boot device (hd, cdrom, network, fd)"))),
                    };
                    if self.firmware.boot_devs.contains(&dev) {
                        return Err(cx.err(n, &path, format!("dev='{}' appears twice", dev.name())));
                    }
                    if self.firmware.boot_devs.len() == MAX_BOOT_DEVS {
                        return Err(cx.err(n, &path, format!("at most {MAX_BOOT_DEVS} boot devices")));
                    }
                    self.firmware.boot_devs.push(dev);
                }
                "bootmenu" => {
                    let enable = yes_no(cx, n, &path, "enable")?
                        .ok_or_else(|| cx.err(n, &path, "the enable='yes|no' attribute is required"))?;
                    let timeout_ms = match n.attribute("timeout") {
                        None => None,
                        Some(t) => Some(t.parse::<u16>().map_err(|_| cx.err(n, &path, format!("timeout='{t}' is not 0-65535 milliseconds")))?),
                    };
                    self.firmware.bootmenu = Some(BootMenu { enable, timeout_ms });
                }
                "bios" => {
                    self.firmware.bios_useserial = yes_no(cx, n, &path, "useserial")?;
                    if let Some(t) = n.attribute("rebootTimeout") {
                        self.firmware.reboot_timeout_ms = match t.parse::<i32>() {
                            Ok(v) if (-1..=65535).contains(&v) => Some(v),
                            _ => return Err(cx.err(n, &path, format!("rebootTimeout='{t}' is not -1 (never) or 0-65535 milliseconds"))),
                        };
                    }
                }
                _ => self.unknown.push(cx.unknown("os", n)),
            }
        }
        Ok(())
    }

    /// Whether the domain boots through firmware (no `<kernel>`).
    pub fn boots_firmware(&self) -> bool {
        self.kernel.is_none()
    }
}
