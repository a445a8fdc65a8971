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
    /// An installer ISO: the domain boots it while its disk has no bootloader.
    pub cdrom: Option<PathBuf>,
    /// `user-data=F[,meta-data=F][,network-config=F]`: a NoCloud seed is built and attached.
    pub cloud_init: Option<String>,
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
        kept: Default::default(),
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
    let mut i = Interface { kind: InterfaceKind::Ethernet, tap: None, mac: None, boot_order: None, model: None, link_up: None, kept: Default::default() };
    for (k, v) in pairs("--network", spec)? {
        match k {
            "bridge" => i.kind = InterfaceKind::Bridge(v.to_string()),
            "tap" => i.tap = Some(v.to_string()),
            "mac" => i.mac = Some(v.to_string()),
            "model" if v == "virtio" => {}
            "network" => i.kind = InterfaceKind::Network(v.to_string()),
            _ => bail!("--network: unknown key '{k}' (network, bridge, tap, mac)"),
        }
    }
    Ok(Some(i))
}

/// Builds the NoCloud seed `--cloud-init user-data=F[,meta-data=F][,network-config=F]`
/// names, beside the first disk (or in the working directory) as
/// `NAME-cidata.iso`; returns its path.
fn cloud_init_seed(spec: &str, o: &InstallOptions) -> Result<PathBuf> {
    let (mut user, mut meta, mut net) = (None, None, None);
    for (k, v) in pairs("--cloud-init", spec)? {
        let data = std::fs::read(v).with_context(|| format!("--cloud-init {k}={v}"))?;
        match k {
            "user-data" => user = Some(data),
            "meta-data" => meta = Some(data),
            "network-config" => net = Some(data),
            _ => bail!("--cloud-init: unknown key '{k}' (user-data, meta-data, network-config)"),
        }
    }
    let user = user.ok_or_else(|| anyhow::anyhow!("--cloud-init '{spec}': user-data=FILE is required"))?;
    let meta = meta.unwrap_or_else(|| format!("instance-id: {}\nlocal-hostname: {}\n", o.name, o.name).into_bytes());
    let dir = o
        .disks
        .first()
        .and_then(|s| pairs("--disk", s).ok()?.into_iter().find(|(k, _)| *k == "path").map(|(_, v)| PathBuf::from(v)))
        .and_then(|p| absolute(&p).ok()?.parent().map(Path::to_path_buf))
        .map_or_else(|| std::env::current_dir().context("current directory"), Ok)?;
    let path = dir.join(format!("{}-cidata.iso", o.name));
    let image = rvirt_block::iso9660::cloud_init_seed(&user, Some(&meta), net.as_deref())?;
    std::fs::write(&path, image).with_context(|| format!("writing the seed {}", path.display()))?;
    Ok(path)
}

/// The definition `rvirt install` defines, checked as the daemon will check it.
pub fn build(o: &InstallOptions) -> Result<DomainXml> {
    if o.name.is_empty() {
        bail!("--name is required");
    }
    let firmware_boot = o.import || o.cdrom.is_some();
    match (&o.kernel, firmware_boot) {
        (Some(_), true) => bail!("--kernel does not go with --import or --cdrom: those boot through firmware"),
        (None, false) => bail!("give --kernel to boot a kernel directly, --import to boot an installed disk, or --cdrom to boot an installer"),
        (None, true) if o.import && o.disks.is_empty() => bail!("--import needs a --disk holding an installed system"),
        _ => {}
    }
    if o.import && o.cdrom.is_some() {
        bail!("--import and --cdrom do not go together: --import boots an installed disk");
    }
    let mut firmware = FirmwareDef::default();
    if firmware_boot {
        // The disk first: while it has no bootloader the firmware goes on to
        // the CD, so the installer boots until it has installed one.
        firmware.boot_devs.push(BootDev::Disk);
        if o.cdrom.is_some() {
            firmware.boot_devs.push(BootDev::Cdrom);
        }
    }
    let mut d = DomainXml {
        emulated: false,
        name: o.name.clone(),
        uuid: Default::default(),
        title: None,
        description: None,
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
        tuning: Default::default(),
        unknown: Vec::new(),
        kept: Default::default(),
        namespaces: Vec::new(),
    };
    d.current_memory_kib = d.memory_kib;
    for (i, spec) in o.disks.iter().enumerate() {
        d.disks.push(disk(spec, i)?);
    }
    let mut scsi = 0u8;
    let mut cd = |path: PathBuf| -> Result<VirtioDisk> {
        let target = format!("sd{}", (b'a' + scsi) as char);
        scsi += 1;
        Ok(VirtioDisk {
            source_kind: DiskSource::File,
            path,
            cdrom: true,
            bus: DiskBus::Scsi,
            format: Some(ImageFormat::Raw),
            direct: false,
            target,
            readonly: true,
            shareable: false,
            serial: None,
            boot_order: None,
            kept: Default::default(),
        })
    };
    if let Some(iso) = &o.cdrom {
        let iso = absolute(iso)?;
        std::fs::metadata(&iso).with_context(|| format!("--cdrom {}", iso.display()))?;
        d.disks.push(cd(iso)?);
    }
    if let Some(spec) = &o.cloud_init {
        let seed = cloud_init_seed(spec, o)?;
        d.disks.push(cd(seed)?);
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
            cdrom: None,
            cloud_init: None,
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
        // A card on an rvirt network (virt-install's --network network=NAME).
        let net = InstallOptions { networks: vec!["network=default".into()], disks: vec![], ..o.clone() };
        assert_eq!(build(&net).unwrap().interfaces[0].kind, InterfaceKind::Network("default".into()));
        let bad = InstallOptions { networks: vec!["switch=x".into()], disks: vec![], ..o.clone() };
        assert!(build(&bad).unwrap_err().to_string().contains("unknown key 'switch'"));
        let bad = InstallOptions { vcpus: 0, disks: vec![], ..o.clone() };
        assert!(build(&bad).unwrap_err().to_string().contains("vCPU count"));
        // --import boots the existing disk through firmware, its format written down.
        let import = InstallOptions { kernel: None, import: true, cmdline: None, disks: vec![format!("path={}", img.display())], ..o.clone() };
        let d = build(&import).unwrap();
        assert!(d.boots_firmware() && d.firmware.boot_devs == [BootDev::Disk], "{}", d.to_xml());
        assert_eq!(d.disks[0].format, Some(ImageFormat::Qcow2));
        for (bad, why) in [
            (InstallOptions { disks: vec![], ..import.clone() }, "--import needs a --disk"),
            (InstallOptions { kernel: Some("/k".into()), ..import.clone() }, "--kernel does not go with --import or --cdrom"),
            (InstallOptions { import: false, ..import }, "give --kernel"),
        ] {
            assert!(build(&bad).unwrap_err().to_string().contains(why), "{why}");
        }
        // --cdrom: the installer in a CD-ROM drive, tried after the (empty) disk.
        let iso = dir.join("installer.iso");
        std::fs::write(&iso, vec![0u8; 4096]).unwrap();
        let fresh = dir.join("fresh.qcow2");
        let install = InstallOptions {
            kernel: None,
            cmdline: None,
            cdrom: Some(iso.clone()),
            disks: vec![format!("path={},size=0.01", fresh.display())],
            ..o.clone()
        };
        let d = build(&install).unwrap();
        assert_eq!(d.firmware.boot_devs, [BootDev::Disk, BootDev::Cdrom]);
        let cd = &d.disks[1];
        assert!(cd.cdrom && cd.readonly && cd.bus == DiskBus::Scsi && cd.path == iso && cd.target == "sda", "{}", d.to_xml());
        assert!(build(&InstallOptions { import: true, ..install.clone() }).unwrap_err().to_string().contains("do not go together"));
        // --cloud-init: a seed beside the first disk, attached as a second CD-ROM drive.
        let user = dir.join("user-data.yaml");
        std::fs::write(&user, "#cloud-config\n").unwrap();
        let seeded = InstallOptions { cloud_init: Some(format!("user-data={}", user.display())), ..install.clone() };
        let d = build(&seeded).unwrap();
        let seed = dir.join("vm1-cidata.iso");
        assert_eq!(d.disks[2].path, seed);
        assert_eq!(d.disks[2].target, "sdb");
        let listing = std::process::Command::new("isoinfo").args(["-R", "-f", "-i"]).arg(&seed).output().unwrap();
        let mut names: Vec<String> = String::from_utf8_lossy(&listing.stdout).lines().map(String::from).collect();
        names.sort();
        assert_eq!(names, ["/meta-data", "/user-data"]);
        let bad = InstallOptions { cloud_init: Some("meta-data=/etc/hostname".into()), ..install };
        assert!(build(&bad).unwrap_err().to_string().contains("user-data=FILE is required"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
