//! The everyday domain commands beyond the lifecycle (virsh's names and
//! output): disks and cards of a definition, memory and vCPUs, renaming,
//! descriptions, devices in the stored definition, link state, reset and
//! the figures of a running domain.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use rvirt_domain::protocol::{BlockInfo, DeviceCounters, Request, Response, VcpuCounts, VcpuThread};
use rvirt_domain::{DiskSource, DomainXml, InterfaceKind};

use crate::Connection;

/// Where a change goes: virsh's `--live`, `--config`, `--current`.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct AffectArgs {
    /// The running domain.
    #[arg(long)]
    pub live: bool,
    /// The stored definition (the next start).
    #[arg(long)]
    pub config: bool,
    /// Whichever the domain has now (the default).
    #[arg(long, conflicts_with_all = ["live", "config"])]
    pub current: bool,
}

/// The commands of this module.
#[derive(Subcommand, Debug)]
pub enum EverydayCommand {
    /// A domain's disks: target and source (virsh domblklist).
    Domblklist {
        /// Name, id or UUID.
        domain: String,
        /// Also the type and device of each disk.
        #[arg(long)]
        details: bool,
        /// The stored definition rather than the running one.
        #[arg(long)]
        inactive: bool,
    },
    /// A domain's network cards (virsh domiflist).
    Domiflist {
        /// Name, id or UUID.
        domain: String,
        /// The stored definition rather than the running one.
        #[arg(long)]
        inactive: bool,
    },
    /// A disk's capacity, allocation and physical size (virsh domblkinfo).
    Domblkinfo {
        /// Name, id or UUID.
        domain: String,
        /// The disk's target (vda) or source path.
        disk: String,
    },
    /// A running domain's disk counters (virsh domblkstat).
    Domblkstat {
        /// Name, id or UUID.
        domain: String,
        /// The disk's target or source path.
        disk: String,
    },
    /// A running domain's card counters (virsh domifstat).
    Domifstat {
        /// Name, id or UUID.
        domain: String,
        /// The card's tap or MAC address.
        interface: String,
    },
    /// Figures of domains by group, with libvirt's names (virsh domstats).
    Domstats {
        /// Names, ids or UUIDs (none: every domain).
        domains: Vec<String>,
        /// The state group.
        #[arg(long)]
        state: bool,
        /// CPU time.
        #[arg(long)]
        cpu_total: bool,
        /// The balloon and the guest's memory figures.
        #[arg(long)]
        balloon: bool,
        /// vCPUs.
        #[arg(long)]
        vcpu: bool,
        /// Network cards.
        #[arg(long)]
        interface: bool,
        /// Disks.
        #[arg(long)]
        block: bool,
        /// Only running and paused domains.
        #[arg(long)]
        list_active: bool,
    },
    /// A running domain's memory figures (virsh dommemstat).
    Dommemstat {
        /// Name, id or UUID.
        domain: String,
    },
    /// Set the memory the guest has, in KiB (virsh setmem; live through the balloon).
    Setmem {
        /// Name, id or UUID.
        domain: String,
        /// KiB (a K, M or G suffix for other units).
        size: String,
        /// Where the change goes.
        #[command(flatten)]
        affect: AffectArgs,
    },
    /// Set the most memory the guest may have, in KiB (virsh setmaxmem; stored definition).
    Setmaxmem {
        /// Name, id or UUID.
        domain: String,
        /// KiB (a K, M or G suffix for other units).
        size: String,
        /// Where the change goes.
        #[command(flatten)]
        affect: AffectArgs,
    },
    /// Set the number of vCPUs (virsh setvcpus; stored definition).
    Setvcpus {
        /// Name, id or UUID.
        domain: String,
        /// vCPUs.
        count: u32,
        /// Accepted as virsh's: rvirt's maximum and current counts are one.
        #[arg(long)]
        maximum: bool,
        /// Where the change goes.
        #[command(flatten)]
        affect: AffectArgs,
    },
    /// vCPU counts of the stored and the running definition (virsh vcpucount).
    Vcpucount {
        /// Name, id or UUID.
        domain: String,
    },
    /// Each vCPU's state, host CPU, CPU time and affinity (virsh vcpuinfo).
    Vcpuinfo {
        /// Name, id or UUID.
        domain: String,
    },
    /// Press a running domain's reset button (virsh reset).
    Reset {
        /// Name, id or UUID.
        domain: String,
    },
    /// Rename a stopped domain (virsh domrename).
    Domrename {
        /// Name, id or UUID.
        domain: String,
        /// The new name.
        new_name: String,
    },
    /// Show or set a domain's description or title (virsh desc).
    Desc {
        /// Name, id or UUID.
        domain: String,
        /// The title rather than the description.
        #[arg(long)]
        title: bool,
        /// The new text (empty removes it).
        #[arg(long)]
        new_desc: Option<String>,
        /// Where the change goes.
        #[command(flatten)]
        affect: AffectArgs,
    },
    /// Show, set or remove an application's element in <metadata> (virsh metadata).
    Metadata {
        /// Name, id or UUID.
        domain: String,
        /// The application's namespace URI.
        uri: String,
        /// The namespace prefix to store the element under (with --set).
        #[arg(long)]
        key: Option<String>,
        /// The element (XML) to store.
        #[arg(long)]
        set: Option<String>,
        /// Remove the element.
        #[arg(long, conflicts_with = "set")]
        remove: bool,
        /// Where the change goes.
        #[command(flatten)]
        affect: AffectArgs,
    },
    /// Add a <disk> or <interface> from an XML file to a stopped domain's definition (virsh attach-device).
    AttachDevice {
        /// Name, id or UUID.
        domain: String,
        /// The device's XML file.
        file: std::path::PathBuf,
        /// Where the change goes.
        #[command(flatten)]
        affect: AffectArgs,
    },
    /// Remove a <disk> or <interface> described in an XML file (virsh detach-device).
    DetachDevice {
        /// Name, id or UUID.
        domain: String,
        /// The device's XML file.
        file: std::path::PathBuf,
        /// Where the change goes.
        #[command(flatten)]
        affect: AffectArgs,
    },
    /// Add a disk to the definition (virsh attach-disk).
    AttachDisk {
        /// Name, id or UUID.
        domain: String,
        /// The image (absolute path).
        source: std::path::PathBuf,
        /// The guest's name for it (vdb, sdc, ...).
        target: String,
        /// raw or qcow2.
        #[arg(long, visible_alias = "subdriver")]
        driver_type: Option<String>,
        /// cdrom for a CD-ROM drive.
        #[arg(long = "type", value_name = "DEVICE")]
        type_: Option<String>,
        /// The bus (virtio, scsi, sata, ide).
        #[arg(long)]
        targetbus: Option<String>,
        /// A read-only disk.
        #[arg(long)]
        mode: Option<String>,
        /// Where the change goes.
        #[command(flatten)]
        affect: AffectArgs,
    },
    /// Add a network card to the definition (virsh attach-interface).
    AttachInterface {
        /// Name, id or UUID.
        domain: String,
        /// network, bridge or ethernet.
        r#type: String,
        /// The network or bridge.
        source: String,
        /// Its MAC address.
        #[arg(long)]
        mac: Option<String>,
        /// Its model (virtio).
        #[arg(long)]
        model: Option<String>,
        /// Where the change goes.
        #[command(flatten)]
        affect: AffectArgs,
    },
    /// Plug a card's cable in or out (virsh domif-setlink).
    DomifSetlink {
        /// Name, id or UUID.
        domain: String,
        /// The card's tap or MAC address.
        interface: String,
        /// up or down.
        state: String,
        /// Where the change goes.
        #[command(flatten)]
        affect: AffectArgs,
    },
}

/// Parses a memory size as virsh does: KiB by default, or with a unit suffix.
pub fn parse_kib(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| anyhow::anyhow!("'{s}' is not a size (KiB, or a number with K, M, G or T)"))?;
    let per = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "k" | "kib" | "kb" => 1,
        "m" | "mib" | "mb" => 1 << 10,
        "g" | "gib" | "gb" => 1 << 20,
        "t" | "tib" | "tb" => 1 << 30,
        "b" => return Ok(n.div_ceil(1024)),
        u => bail!("'{u}' is not a size unit (K, M, G, T)"),
    };
    n.checked_mul(per).ok_or_else(|| anyhow::anyhow!("'{s}' is too large"))
}

/// Escapes an attribute value written into device XML.
fn attr(s: &str) -> String {
    s.replace('&', "&amp;").replace('\'', "&apos;").replace('<', "&lt;").replace('"', "&quot;")
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len()).map(|i| rows.iter().map(|r| r[i].len()).chain([header[i].len()]).max().unwrap_or(0)).collect();
    let line = |cells: Vec<&str>| -> String {
        let s: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        format!(" {}\n", s.join("   ").trim_end())
    };
    let mut out = line(header.to_vec());
    out += &"-".repeat(widths.iter().sum::<usize>() + 3 * widths.len());
    out.push('\n');
    for r in rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

/// `domblklist`.
pub fn blk_list(d: &DomainXml, details: bool) -> String {
    let rows: Vec<Vec<String>> = d
        .disks
        .iter()
        .map(|x| {
            let source = if x.path.as_os_str().is_empty() { "-".to_string() } else { x.path.display().to_string() };
            let ty = if x.source_kind == DiskSource::File { "file" } else { "block" };
            let dev = if x.cdrom { "cdrom" } else { "disk" };
            if details {
                vec![ty.into(), dev.into(), x.target.clone(), source]
            } else {
                vec![x.target.clone(), source]
            }
        })
        .collect();
    if details {
        table(&["Type", "Device", "Target", "Source"], &rows)
    } else {
        table(&["Target", "Source"], &rows)
    }
}

/// `domiflist`.
pub fn if_list(d: &DomainXml) -> String {
    let rows: Vec<Vec<String>> = d
        .interfaces
        .iter()
        .map(|i| {
            let (ty, source) = match &i.kind {
                InterfaceKind::Ethernet => ("ethernet", "-".to_string()),
                InterfaceKind::Bridge(b) => ("bridge", b.clone()),
                InterfaceKind::Network(n) => ("network", n.clone()),
                InterfaceKind::Direct { dev, .. } => ("direct", dev.clone()),
            };
            let model = i.model.clone().unwrap_or_else(|| "virtio".into());
            vec![i.tap.clone().unwrap_or_else(|| "-".into()), ty.into(), source, model, i.mac.clone().unwrap_or_else(|| "-".into())]
        })
        .collect();
    table(&["Interface", "Type", "Source", "Model", "MAC"], &rows)
}

fn vcpu_count(c: &VcpuCounts) -> String {
    let mut out = String::new();
    for (what, v) in [("maximum", c.config), ("maximum", c.live), ("current", c.config), ("current", c.live)].iter().enumerate().map(|(i, (w, v))| ((*w, if i % 2 == 0 { "config" } else { "live" }), *v)) {
        if let Some(v) = v {
            out += &format!("{:<8} {:<7} {v:>9}\n", what.0, what.1);
        }
    }
    out
}

fn vcpu_info(rows: &[VcpuThread]) -> String {
    let mut out = String::new();
    for (i, t) in rows.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out += &format!("VCPU:           {}\nCPU:            {}\nState:          {}\nCPU time:       {:.1}s\nCPU Affinity:   {}\n", t.vcpu, t.cpu, t.state, t.cpu_seconds, t.affinity);
    }
    out
}

fn blk_info(b: &BlockInfo) -> String {
    format!("Capacity:       {}\nAllocation:     {}\nPhysical:       {}\n", b.capacity, b.allocation, b.physical)
}

fn blk_stat(dev: &str, c: &DeviceCounters) -> String {
    [("rd_req", c.reads), ("rd_bytes", c.read_bytes), ("wr_req", c.writes), ("wr_bytes", c.write_bytes), ("errs", c.errors)]
        .iter()
        .map(|(k, v)| format!("{dev} {k} {v}\n"))
        .collect()
}

fn if_stat(dev: &str, c: &DeviceCounters) -> String {
    [("rx_bytes", c.read_bytes), ("rx_packets", c.reads), ("tx_bytes", c.write_bytes), ("tx_packets", c.writes), ("tx_errs", c.errors)]
        .iter()
        .map(|(k, v)| format!("{dev} {k} {v}\n"))
        .collect()
}

/// What to print for a response.
pub type Text = Box<dyn FnOnce(&Response) -> String>;

fn named(r: &Response) -> String {
    r.name.clone().unwrap_or_default()
}

/// What a command does.
pub enum Action {
    /// Sends the request and prints its answer so.
    Call(Request, Text),
    /// Prints this (the commands that only read a definition).
    Print(String),
}

/// The request a command makes and how its answer is printed; the
/// commands that only read a definition (`domblklist`, `domiflist`) fetch
/// it through `conn` and answer at once.
pub fn request(cmd: &EverydayCommand, conn: &mut impl FnMut(&Request) -> Result<Response>) -> Result<Action> {
    use EverydayCommand as C;
    let dom = |d: &String| d.clone();
    let (req, text): (Request, Text) = match cmd {
        C::Domblklist { domain, details, inactive } => {
            let def = definition(conn, domain, *inactive)?;
            return Ok(Action::Print(blk_list(&def, *details)));
        }
        C::Domiflist { domain, inactive } => {
            let def = definition(conn, domain, *inactive)?;
            return Ok(Action::Print(if_list(&def)));
        }
        C::Domblkinfo { domain, disk } => (Request::BlkInfo { domain: dom(domain), disk: disk.clone() }, Box::new(|r| r.block_info.as_ref().map(blk_info).unwrap_or_default())),
        C::Domblkstat { domain, disk } => {
            let d = disk.clone();
            (Request::DevStat { domain: dom(domain), device: disk.clone() }, Box::new(move |r| r.counters.as_ref().map(|c| blk_stat(&d, c)).unwrap_or_default()))
        }
        C::Domifstat { domain, interface } => {
            let d = interface.clone();
            (Request::DevStat { domain: dom(domain), device: interface.clone() }, Box::new(move |r| r.counters.as_ref().map(|c| if_stat(&d, c)).unwrap_or_default()))
        }
        C::Domstats { domains, state, cpu_total, balloon, vcpu, interface, block, list_active } => {
            use rvirt_domain::protocol::StatGroups as G;
            let groups = [(*state, G::STATE), (*cpu_total, G::CPU_TOTAL), (*balloon, G::BALLOON), (*vcpu, G::VCPU), (*interface, G::INTERFACE), (*block, G::BLOCK)]
                .iter()
                .filter(|(on, _)| *on)
                .fold(0, |acc, (_, g)| acc | g);
            (
                Request::DomStats { domains: domains.clone(), groups, active: *list_active },
                Box::new(|r| {
                    let mut out = String::new();
                    for d in r.dom_stats.as_deref().unwrap_or_default() {
                        out += &format!("Domain: '{}'\n", d.name);
                        for (k, v) in &d.fields {
                            out += &format!("  {k}={v}\n");
                        }
                        out.push('\n');
                    }
                    out
                }),
            )
        }
        C::Dommemstat { domain } => (
            Request::MemStat { domain: dom(domain) },
            Box::new(|r| r.memory_stats.as_deref().unwrap_or_default().iter().map(|(k, v)| format!("{k} {v}\n")).collect()),
        ),
        C::Setmem { domain, size, affect } => {
            (Request::SetMemory { domain: dom(domain), kib: parse_kib(size)?, live: affect.live, config: affect.config }, Box::new(|_| String::new()))
        }
        C::Setmaxmem { domain, size, affect } => {
            (Request::SetMaxMemory { domain: dom(domain), kib: parse_kib(size)?, live: affect.live, config: affect.config }, Box::new(|_| String::new()))
        }
        C::Setvcpus { domain, count, maximum: _, affect } => {
            (Request::SetVcpus { domain: dom(domain), count: *count, live: affect.live, config: affect.config }, Box::new(|_| String::new()))
        }
        C::Vcpucount { domain } => (Request::VcpuCount { domain: dom(domain) }, Box::new(|r| r.vcpu_counts.as_ref().map(vcpu_count).unwrap_or_default())),
        C::Vcpuinfo { domain } => (Request::VcpuInfo { domain: dom(domain) }, Box::new(|r| vcpu_info(r.vcpu_threads.as_deref().unwrap_or_default()))),
        C::Reset { domain } => (Request::Reset { domain: dom(domain) }, Box::new(|r| format!("Domain '{}' was reset\n", named(r)))),
        C::Domrename { domain, new_name } => {
            (Request::Rename { domain: dom(domain), new_name: new_name.clone() }, Box::new(|_| "Domain successfully renamed\n".to_string()))
        }
        C::Desc { domain, title, new_desc, affect } => {
            let setting = new_desc.is_some();
            let req = Request::Desc { domain: dom(domain), title: *title, set: new_desc.clone(), live: affect.live, config: affect.config };
            let what = if *title { "title" } else { "description" };
            (
                req,
                Box::new(move |r| match (setting, &r.text) {
                    (true, _) => format!("Domain {what} updated successfully\n"),
                    (false, Some(t)) => format!("{t}\n"),
                    (false, None) => format!("No {what} for domain: {}\n", named(r)),
                }),
            )
        }
        C::Metadata { domain, uri, key, set, remove, affect } => {
            let reading = set.is_none() && !remove;
            let req = Request::Metadata { domain: dom(domain), uri: uri.clone(), key: key.clone(), set: set.clone(), remove: *remove, live: affect.live, config: affect.config };
            let uri = uri.clone();
            (
                req,
                Box::new(move |r| match (reading, &r.text) {
                    (false, _) => "Metadata modified\n".to_string(),
                    (true, Some(t)) => format!("{t}\n"),
                    (true, None) => format!("no metadata with namespace URI '{uri}'\n"),
                }),
            )
        }
        C::AttachDevice { domain, file, affect } => {
            let xml = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            (Request::AttachDevice { domain: dom(domain), xml, live: affect.live, config: affect.config }, Box::new(|_| "Device attached successfully\n".to_string()))
        }
        C::DetachDevice { domain, file, affect } => {
            let xml = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            (Request::DetachDevice { domain: dom(domain), xml, live: affect.live, config: affect.config }, Box::new(|_| "Device detached successfully\n".to_string()))
        }
        C::AttachDisk { domain, source, target, driver_type, type_, targetbus, mode, affect } => {
            let source = std::path::absolute(source)?;
            let device = type_.as_deref().unwrap_or("disk");
            let mut xml = format!("<disk type='file' device='{}'>", attr(device));
            if let Some(t) = driver_type {
                xml += &format!("<driver name='qemu' type='{}'/>", attr(t));
            }
            xml += &format!("<source file='{}'/>", attr(&source.to_string_lossy()));
            xml += &format!("<target dev='{}'", attr(target));
            if let Some(b) = targetbus {
                xml += &format!(" bus='{}'", attr(b));
            }
            xml += "/>";
            match mode.as_deref() {
                Some("readonly") => xml += "<readonly/>",
                Some("shareable") => xml += "<shareable/>",
                Some(m) => bail!("--mode '{m}' is not readonly or shareable"),
                None => {}
            }
            xml += "</disk>";
            (Request::AttachDevice { domain: dom(domain), xml, live: affect.live, config: affect.config }, Box::new(|_| "Disk attached successfully\n".to_string()))
        }
        C::AttachInterface { domain, r#type, source, mac, model, affect } => {
            let key = match r#type.as_str() {
                "network" => "network",
                "bridge" => "bridge",
                "direct" => "dev",
                t => bail!("interface type '{t}' is not network, bridge or direct"),
            };
            let mut xml = format!("<interface type='{}'><source {key}='{}'/>", attr(r#type), attr(source));
            if let Some(m) = mac {
                xml += &format!("<mac address='{}'/>", attr(m));
            }
            xml += &format!("<model type='{}'/></interface>", attr(model.as_deref().unwrap_or("virtio")));
            (Request::AttachDevice { domain: dom(domain), xml, live: affect.live, config: affect.config }, Box::new(|_| "Interface attached successfully\n".to_string()))
        }
        C::DomifSetlink { domain, interface, state, affect } => {
            let up = match state.as_str() {
                "up" => true,
                "down" => false,
                s => bail!("link state '{s}' is not up or down"),
            };
            let req = Request::SetLink { domain: dom(domain), interface: interface.clone(), up, live: affect.live, config: affect.config };
            (req, Box::new(|_| "Device updated successfully\n".to_string()))
        }
    };
    Ok(Action::Call(req, text))
}

/// The running (or with `inactive`, stored) definition of `domain`.
fn definition(conn: &mut impl FnMut(&Request) -> Result<Response>, domain: &str, inactive: bool) -> Result<DomainXml> {
    let xml = conn(&Request::DumpXml { domain: domain.to_string(), inactive })?.xml.unwrap_or_default();
    DomainXml::parse(&xml).map_err(|e| anyhow::anyhow!("the daemon's XML does not parse: {e}"))
}

/// Runs `cmd` on `conn`: the answer and how to print it, or the text itself.
pub fn run(cmd: &EverydayCommand, conn: &mut Connection) -> Result<Result<(Response, Text), String>> {
    match request(cmd, &mut |r| conn.expect(r))? {
        Action::Call(req, text) => Ok(Ok((conn.expect(&req)?, text))),
        Action::Print(s) => Ok(Err(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_virsh_reads_them() {
        assert_eq!(parse_kib("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_kib("512M").unwrap(), 512 << 10);
        assert_eq!(parse_kib("2G").unwrap(), 2 << 20);
        assert!(parse_kib("lots").is_err());
        assert!(parse_kib("5Q").is_err());
    }

    #[test]
    fn disk_and_card_lists_are_laid_out_like_virsh() {
        let d = DomainXml::parse(
            "<domain type='kvm'><name>t</name><memory>65536</memory><devices>\
             <disk><source file='/img/a.qcow2'/><target dev='vda'/></disk>\
             <disk device='cdrom'><target dev='sdb' bus='scsi'/></disk>\
             <interface type='network'><source network='default'/><mac address='52:54:00:00:00:01'/></interface></devices></domain>",
        )
        .unwrap();
        let b = blk_list(&d, false);
        let lines: Vec<&str> = b.lines().collect();
        assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), ["Target", "Source"]);
        assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), ["vda", "/img/a.qcow2"]);
        assert_eq!(lines[3].split_whitespace().collect::<Vec<_>>(), ["sdb", "-"]);
        let i = if_list(&d);
        assert_eq!(i.lines().nth(2).unwrap().split_whitespace().collect::<Vec<_>>(), ["-", "network", "default", "virtio", "52:54:00:00:00:01"]);
        let c = vcpu_count(&VcpuCounts { config: Some(2), live: None });
        assert_eq!(c, "maximum  config          2\ncurrent  config          2\n");
    }
}
