//! What a definition asks for that rvirt does not do: one warning per kind
//! (every line it appears on), elements and attributes alike.

use std::collections::BTreeMap;

use super::*;

/// Child elements rvirt keeps without a word: libvirt's bookkeeping (PCI
/// and drive addresses, device aliases, the emulator path, its own view of
/// a backing chain) or text for people.
const SILENT: &[&str] = &["address", "alias", "emulator", "backingStore", "description", "title", "metadata", "model", "resource", "seclabel"];

/// Attributes whose loss changes what the guest sees or what the host
/// does, by (element, attribute), with what the user should know.
const BEHAVIOUR_ATTRS: &[(&str, &str, &str)] = &[
    ("vcpu", "cpuset", "vCPUs are not confined to these host CPUs (use <cputune><vcpupin> or <emulatorpin>)"),
    ("vcpu", "placement", "vCPU placement is not automatic"),
    ("memory", "dumpCore", "core dumps of rvirt-vmm are always off"),
    ("driver", "discard", "the guest's discards do not reach the image"),
    ("driver", "detect_zeroes", "zero writes are written as data"),
    ("driver", "io", "the I/O method is rvirt's own"),
    ("driver", "iothread", "disks are served by rvirt's own device threads"),
    ("driver", "queues", "devices have one queue pair"),
    ("driver", "error_policy", "an I/O error is reported to the guest"),
    ("driver", "rerror_policy", "a read error is reported to the guest"),
    ("source", "portgroup", "the network's portgroup settings (VLAN, bandwidth) are not applied"),
    ("source", "startupPolicy", "a missing disk image stops the domain from starting"),
];

impl DomainXml {
    /// The text of the unknown-element report, one line per kind of thing
    /// rvirt keeps but does not act on (empty when none). `<graphics>` and
    /// `<video>` share one line saying what it means to have no screen; a
    /// UEFI request and network boot get theirs.
    pub fn unknown_report(&self) -> Vec<String> {
        let screen = |u: &UnknownElement| u.parent == "devices" && matches!(u.name.as_str(), "graphics" | "video");
        // (where, element) -> lines, in the order first seen.
        let mut kinds: Vec<((String, String), Vec<u32>)> = Vec::new();
        let elements = self.unknown.iter().chain(self.kept_children()).filter(|u| !screen(u) && !SILENT.contains(&u.name.as_str()));
        for u in elements {
            let key = (u.parent.clone(), u.name.clone());
            match kinds.iter_mut().find(|(k, _)| *k == key) {
                Some((_, lines)) => lines.push(u.line),
                None => kinds.push((key, vec![u.line])),
            }
        }
        let mut out: Vec<String> = kinds
            .into_iter()
            .map(|((parent, name), lines)| match name.as_str() {
                "serial" if parent == "devices" => format!("{}: rvirt has one serial port (COM1); further <serial> ports are kept, but have no effect", lines_text(&lines)),
                "console" | "rng" if parent == "devices" => format!("{}: rvirt has one <{name}> of this kind; further ones are kept, but have no effect", lines_text(&lines)),
                _ => format!("{}: <{name}> in <{parent}> is not supported by rvirt; kept, but it has no effect", lines_text(&lines)),
            })
            .collect();
        let screens: Vec<String> = self.unknown.iter().filter(|u| screen(u)).map(|u| format!("<{}> (line {})", u.name, u.line)).collect();
        if !screens.is_empty() {
            out.push(format!(
                "{}: rvirt has no display; the guest's console is its serial port (rvirt console). Installers that only draw on a screen will be invisible; kept, but no effect",
                screens.join(", ")
            ));
        }
        out.extend(self.attribute_report());
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

    /// One line per kind of ignored attribute that changes behaviour, with
    /// how many elements carry it.
    fn attribute_report(&self) -> Vec<String> {
        let mut seen: BTreeMap<(&str, &str), (usize, &str)> = BTreeMap::new();
        let kept = std::iter::once(&self.kept).chain(self.disks.iter().map(|d| &d.kept)).chain(self.interfaces.iter().map(|i| &i.kept));
        for k in kept {
            for (path, attr, _) in k.attributes() {
                let element = path.rsplit('/').next().unwrap_or(path);
                if let Some((e, a, why)) = BEHAVIOUR_ATTRS.iter().find(|(e, a, _)| *e == element && *a == attr) {
                    // placement='static' is what rvirt does anyway.
                    if (*e, *a) == ("vcpu", "placement") && k.get(path).and_then(|k| k.attr(attr)) == Some("static") {
                        continue;
                    }
                    seen.entry((e, a)).or_insert((0, why)).0 += 1;
                }
            }
        }
        seen.into_iter()
            .map(|((e, a), (count, why))| {
                let times = if count > 1 { format!(" (on {count} elements)") } else { String::new() };
                format!("<{e} {a}='…'>{times} is not supported by rvirt and is ignored: {why}")
            })
            .collect()
    }
}

/// `line 3` or `lines 3, 9, 12`.
fn lines_text(lines: &[u32]) -> String {
    match lines {
        [one] => format!("line {one}"),
        many => format!("lines {}", many.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")),
    }
}
