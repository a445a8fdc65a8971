//! `rvirt install`: a domain from a few virt-install-style options. Disk
//! images named with a size are created (raw or qcow2) when missing.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rvirt_domain::{
    BootDev, CharDevice, DiskBus, DiskSource, DomainXml, FirmwareDef, ImageFormat, Interface, InterfaceKind, LifecycleAction, VirtioDisk,
};

/// The options of `rvirt install`.
#[derive(Clone, Debug, Default)]
pub struct InstallOptions {
    /// Domain name.
    pub name: String,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Kernel to boot directly; None with `import`.
    pub kernel: Option<PathBuf>,
    /// Boot the disks through firmware (virt-install --import).
    pub import: bool,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// `path=F[,size=GiB][,format=raw|qcow2][,readonly=on][,serial=S][,cache=none]`.
    pub disks: Vec<String>,
    /// `bridge=BR[,mac=M]`, `tap=NAME[,mac=M]` or `none`.
    pub networks: Vec<String>,
    /// Add a virtio-rng.
    pub rng: bool,
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(std::env::current_dir().context("current directory")?.join(p))
}

fn pairs<'a>(what: &str, spec: &'a str) -> Result<Vec<(&'a str, &'a str)>> {
    spec.split(',')
        .map(|kv| kv.split_once('=').ok_or_else(|| anyhow::anyhow!("{what} '{spec}': '{kv}' is not KEY=VALUE")))
        .collect()
}

fn disk(spec: &str, index: usize) -> Result<VirtioDisk> {
    let mut path = None;
    let mut size_gib: Option<f64> = None;
    let mut d = VirtioDisk {
        source_kind: DiskSource::File,
        path: PathBuf::new(),
        cdrom: false,
        bus: DiskBus::Virtio,
        format: None,
        direct: false,
        target: format!("vd{}", (b'a' + index as u8) as char),
        readonly: false,
        shareable: false,
        serial: None,
        boot_order: None,
    };
    if index >= 26 {
        bail!("at most 26 disks");
    }
    for (k, v) in pairs("--disk", spec)? {
        match k {
            "path" => path = Some(absolute(Path::new(v))?),
            "size" => size_gib = Some(v.parse().ok().filter(|s: &f64| *s > 0.0).ok_or_else(|| anyhow::anyhow!("--disk size '{v}' is not a positive number of GiB"))?),
            "format" => {
                d.format = Some(match v {
                    "raw" => ImageFormat::Raw,
                    "qcow2" => ImageFormat::Qcow2,
                    _ => bail!("--disk format '{v}': raw or qcow2"),
                })
            }
            "readonly" | "ro" => d.readonly = matches!(v, "on" | "yes" | "true"),
            "serial" => d.serial = Some(v.to_string()),
            "cache" => d.direct = v == "none",
            _ => bail!("--disk: unknown key '{k}' (path, size, format, readonly, serial, cache)"),
        }
    }
    d.path = path.ok_or_else(|| anyhow::anyhow!("--disk '{spec}': path= is required"))?;
    if !d.path.exists() {
        let Some(gib) = size_gib else { bail!("--disk {}: no such file (give size=GiB to create it)", d.path.display()) };
        let bytes = (gib * (1u64 << 30) as f64) as u64 / 512 * 512;
        let format = *d.format.get_or_insert(ImageFormat::Qcow2);
        match format {
            ImageFormat::Raw => drop(rvirt_block::RawImage::create(&d.path, bytes)?),
            ImageFormat::Qcow2 => drop(rvirt_block::Qcow2Image::create(&d.path, bytes, &Default::default())?),
        }
    } else {
        if let Ok(meta) = std::fs::metadata(&d.path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_block_device() {
                d.source_kind = DiskSource::Block;
            }
        }
        // The user named this image, so it is probed now, once, and the
        // format is written into the definition: the domain's disk is never
        // probed again (by then the guest has written its first bytes).
        if d.format.is_none() {
            d.format = Some(match rvirt_block::probe_format(&d.path)? {
                rvirt_block::Format::Raw => ImageFormat::Raw,
                rvirt_block::Format::Qcow2 => ImageFormat::Qcow2,
            });
        }
    }
    Ok(d)
}

fn network(spec: &str) -> Result<Option<Interface>> {
    if spec == "none" {
        return Ok(None);
    }
    let mut i = Interface { kind: InterfaceKind::Ethernet, tap: None, mac: None, boot_order: None, model: None };
    for (k, v) in pairs("--network", spec)? {
        match k {
            "bridge" => i.kind = InterfaceKind::Bridge(v.to_string()),
            "tap" => i.tap = Some(v.to_string()),
            "mac" => i.mac = Some(v.to_string()),
            "model" if v == "virtio" => {}
            "network" => bail!("--network network={v}: libvirt networks are not implemented yet; use bridge=BR or tap=NAME"),
            _ => bail!("--network: unknown key '{k}' (bridge, tap, mac)"),
        }
    }
    Ok(Some(i))
}

/// The definition `rvirt install` defines, checked as the daemon will check it.
pub fn build(o: &InstallOptions) -> Result<DomainXml> {
    if o.name.is_empty() {
        bail!("--name is required");
    }
    match (&o.kernel, o.import) {
        (Some(_), true) => bail!("--kernel and --import do not go together: --import boots the disk's own bootloader"),
        (None, false) => bail!("give --kernel to boot a kernel directly, or --import to boot an installed disk through firmware"),
        (None, true) if o.disks.is_empty() => bail!("--import needs a --disk holding an installed system"),
        _ => {}
    }
    let mut firmware = FirmwareDef::default();
    if o.import {
        firmware.boot_devs.push(BootDev::Disk);
    }
    let mut d = DomainXml {
        emulated: false,
        name: o.name.clone(),
        uuid: Default::default(),
        memory_kib: o.memory_mib.checked_mul(1024).ok_or_else(|| anyhow::anyhow!("--memory is too large"))?,
        current_memory_kib: 0,
        vcpus: o.vcpus,
        arch: None,
        machine: None,
        kernel: o.kernel.as_deref().map(absolute).transpose()?,
        initrd: o.initrd.as_deref().map(absolute).transpose()?,
        cmdline: o.cmdline.clone(),
        firmware,
        on_poweroff: LifecycleAction::Destroy,
        on_reboot: LifecycleAction::Restart,
        on_crash: LifecycleAction::Destroy,
        disks: Vec::new(),
        interfaces: Vec::new(),
        serial: Some(CharDevice::Pty),
        virtio_console: None,
        rng: o.rng,
        memballoon: true,
        unknown: Vec::new(),
        namespaces: Vec::new(),
    };
    d.current_memory_kib = d.memory_kib;
    for (i, spec) in o.disks.iter().enumerate() {
        d.disks.push(disk(spec, i)?);
    }
    for spec in &o.networks {
        d.interfaces.extend(network(spec)?);
    }
    // Same rules as a hand-written definition (and a fresh UUID).
    let xml = d.to_xml().replace(&format!("<uuid>{}</uuid>\n", d.uuid), "");
    DomainXml::parse(&xml).map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_options_become_a_valid_definition_and_create_disks() {
        let dir = std::env::temp_dir().join(format!("rvirt-install-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("root.qcow2");
        let o = InstallOptions {
            name: "vm1".into(),
            memory_mib: 256,
            vcpus: 2,
            kernel: Some("/boot/vmlinuz".into()),
            import: false,
            initrd: None,
            cmdline: Some("console=ttyS0".into()),
            disks: vec![format!("path={},size=0.01", img.display())],
            networks: vec!["bridge=br0,mac=52:54:00:00:00:01".into(), "none".into()],
            rng: true,
        };
        let d = build(&o).unwrap();
        assert_eq!((d.memory_kib, d.vcpus, d.disks.len(), d.interfaces.len()), (256 << 10, 2, 1, 1));
        assert!(!d.uuid.is_nil());
        assert_eq!(d.disks[0].format, Some(ImageFormat::Qcow2));
        assert_eq!(&std::fs::read(&img).unwrap()[..4], b"QFI\xfb", "a qcow2 image was created");
        assert_eq!(d.serial, Some(CharDevice::Pty));
        // An existing image gets the format it has written into the XML.
        let existing = InstallOptions { disks: vec![format!("path={}", img.display())], ..o.clone() };
        assert_eq!(build(&existing).unwrap().disks[0].format, Some(ImageFormat::Qcow2));
        let vmdk = dir.join("foreign.vmdk");
        std::fs::write(&vmdk, b"KDMV\x01\0\0\0 and the rest of a sparse extent header").unwrap();
        let foreign = InstallOptions { disks: vec![format!("path={}", vmdk.display())], ..o.clone() };
        assert!(build(&foreign).unwrap_err().to_string().contains("vmdk format"));
        let missing = InstallOptions { disks: vec!["path=/nonexistent/x.raw".into()], ..o.clone() };
        assert!(build(&missing).unwrap_err().to_string().contains("give size=GiB"));
        let bad = InstallOptions { networks: vec!["network=default".into()], disks: vec![], ..o.clone() };
        assert!(build(&bad).unwrap_err().to_string().contains("not implemented"));
        let bad = InstallOptions { vcpus: 0, disks: vec![], ..o.clone() };
        assert!(build(&bad).unwrap_err().to_string().contains("vCPU count"));
        // --import boots the existing disk through firmware, its format written down.
        let import = InstallOptions { kernel: None, import: true, cmdline: None, disks: vec![format!("path={}", img.display())], ..o.clone() };
        let d = build(&import).unwrap();
        assert!(d.boots_firmware() && d.firmware.boot_devs == [BootDev::Disk], "{}", d.to_xml());
        assert_eq!(d.disks[0].format, Some(ImageFormat::Qcow2));
        for (bad, why) in [
            (InstallOptions { disks: vec![], ..import.clone() }, "--import needs a --disk"),
            (InstallOptions { kernel: Some("/k".into()), ..import.clone() }, "do not go together"),
            (InstallOptions { import: false, ..import }, "give --kernel"),
        ] {
            assert!(build(&bad).unwrap_err().to_string().contains(why), "{why}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
