//! The everyday commands on one domain beyond its lifecycle: memory and
//! vCPU counts, renaming, descriptions, devices in the stored definition,
//! link state, reset, and the figures users ask a running domain for.
//!
//! Changes follow libvirt's flags: `live` acts on the running domain,
//! `config` on the stored definition, neither on whichever the domain has
//! now (running: live). What rvirt cannot do to a running domain (memory or
//! vCPU hotplug, device hotplug) is refused with that reason.

use std::path::Path;
use std::time::{Duration, Instant};

use rvirt_api::Request as VmmRequest;
use rvirt_domain::protocol::{Affect, BlockInfo, DeviceCounters, VcpuCounts, VcpuThread};
use rvirt_domain::{DomainXml, Interface, VirtioDisk, MAX_VCPUS};

use super::{lock, parse_checked, vmm_call, Lifecycle, Manager};

/// How long `dommemstat` waits for the guest's driver to post fresh figures.
const STATS_WAIT: Duration = Duration::from_secs(1);

/// The smallest memory `setmem` gives a guest: below it, a guest is not
/// ballooned but starved.
const MIN_MEMORY_KIB: u64 = 16 << 10;

/// The one device in a `<disk>` or `<interface>` element.
enum Device {
    Disk(VirtioDisk),
    Interface(Interface),
}

/// Parses one `<disk>` or `<interface>` element as it would sit in `<devices>`.
fn parse_device(xml: &str) -> Result<Device, String> {
    let text = xml.trim();
    let body = text.strip_prefix("<?xml").map_or(text, |r| r.split_once("?>").map_or(r, |(_, b)| b.trim_start()));
    let wrapped = format!("<domain type='kvm'><name>device</name><memory>65536</memory><devices>{body}</devices></domain>");
    let mut d = DomainXml::parse(&wrapped).map_err(|e| e.to_string().replace("line 1: ", ""))?;
    if let Some(u) = d.unknown.first() {
        return Err(format!("<{}> cannot be attached or detached: rvirt changes <disk> and <interface> devices", u.name));
    }
    match (d.disks.pop(), d.interfaces.pop(), d.disks.is_empty() && d.interfaces.is_empty()) {
        (Some(disk), None, true) => Ok(Device::Disk(disk)),
        (None, Some(card), true) => Ok(Device::Interface(card)),
        _ => Err("give exactly one <disk> or <interface> element".into()),
    }
}

/// Reads `/proc/PID/task/TID/stat` fields after the command name: state
/// (index 0), utime + stime (11, 12) and the CPU last run on (36).
fn task_stat(path: &Path) -> Option<(String, u64, u32)> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((f.first()?.to_string(), ticks, f.get(36)?.parse().ok()?))
}

/// The vCPU threads (named `vcpuN`) of `pid` and its children (a jailed
/// VMM runs under its reaper), by vCPU number.
fn vcpu_threads(pid: u32) -> Vec<(u32, std::path::PathBuf)> {
    let pids = std::iter::once(pid).chain(crate::process::children(pid));
    let mut found = Vec::new();
    for p in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if let Some(n) = comm.trim().strip_prefix("vcpu").and_then(|n| n.parse::<u32>().ok()) {
                found.push((n, t.path()));
            }
        }
    }
    found.sort();
    found
}

/// libvirt's one-letter process states in its words.
fn state_word(s: &str) -> &'static str {
    match s {
        "R" => "running",
        "S" | "D" => "sleeping",
        "T" | "t" => "stopped",
        _ => "unknown",
    }
}

impl Manager {
    /// Where a change with `affect` goes for domain `key`: (name, live,
    /// config), refusing what the domain does not have.
    fn resolve(&self, key: &str, affect: Affect) -> Result<(String, bool, bool), String> {
        let g = lock(&self.inner);
        let name = g.find(key)?;
        let d = &g.domains[&name];
        let active = d.run.is_some();
        let (live, config) = if !affect.live && !affect.config { (active, !active) } else { (affect.live, affect.config) };
        if live && !active {
            return Err(format!("domain '{name}' is not running"));
        }
        if config && !d.persistent {
            return Err(format!("domain '{name}' is transient: it has no stored definition to change"));
        }
        Ok((name, live, config))
    }

    /// Applies `f` to a copy of the stored definition of `name` and stores
    /// it if the whole definition is still valid; the domain's running
    /// definition is left alone.
    fn edit_stored(&self, name: &str, f: impl FnOnce(&mut DomainXml) -> Result<(), String>) -> Result<(), String> {
        let mut g = lock(&self.inner);
        let d = g.domains.get_mut(name).ok_or_else(|| format!("domain '{name}' vanished"))?;
        let mut def = d.def.clone();
        f(&mut def)?;
        let def = parse_checked(&def.to_xml())?;
        self.store.save_definition(name, &def.to_xml()).map_err(|e| format!("{e:#}"))?;
        // No lifecycle event: libvirt sends DEFINED only for a definition
        // given whole (define, rename), not for one setting changed.
        d.def = def;
        Ok(())
    }

    /// Applies `f` to the running definition of `name` (what dumpxml shows
    /// and a restarted daemon reloads), after the VMM carried the change out.
    fn edit_live(&self, name: &str, f: impl FnOnce(&mut DomainXml)) {
        self.update_run(name, |d| {
            if let Some(r) = d.run.as_mut() {
                f(&mut r.def);
                r.record.xml = r.def.to_xml();
            }
        });
    }

    /// `setmem`: the memory the guest has, through the balloon (live) and
    /// as `<currentMemory>` (config).
    pub fn set_memory(&self, key: &str, kib: u64, affect: Affect) -> Result<String, String> {
        let (name, live, config) = self.resolve(key, affect)?;
        if kib < MIN_MEMORY_KIB {
            return Err(format!("{kib} KiB is too little memory for a guest (at least {MIN_MEMORY_KIB} KiB)"));
        }
        if config {
            // Checked before the live change, so both happen or neither.
            let stored = lock(&self.inner).domains.get(&name).map_or(0, |d| d.def.memory_kib);
            if kib > stored {
                return Err(format!("{kib} KiB is more than the stored maximum memory ({stored} KiB)"));
            }
        }
        if live {
            let (socket, max, balloon) = {
                let g = lock(&self.inner);
                let r = g.domains[&name].run.as_ref().ok_or_else(|| format!("domain '{name}' is not running"))?;
                (r.record.api_socket.clone(), r.def.memory_kib, r.def.memballoon)
            };
            if !balloon {
                return Err(format!("domain '{name}' has no memory balloon (<memballoon model='none'/>): its memory cannot change while it runs"));
            }
            if kib > max {
                return Err(format!("{kib} KiB is more than the domain's maximum memory ({max} KiB); raise it with setmaxmem --config"));
            }
            vmm_call(&socket, &VmmRequest::Balloon { target_bytes: (max - kib) * 1024 }, Duration::from_secs(5)).map_err(|e| format!("domain '{name}': {e}"))?;
            self.edit_live(&name, |d| d.current_memory_kib = kib);
        }
        if config {
            self.edit_stored(&name, |d| {
                if kib > d.memory_kib {
                    return Err(format!("{kib} KiB is more than the domain's maximum memory ({} KiB)", d.memory_kib));
                }
                d.current_memory_kib = kib;
                Ok(())
            })?;
        }
        Ok(name)
    }

    /// `setmaxmem`: `<memory>` of the stored definition (a running guest's
    /// RAM is fixed: rvirt has no memory hotplug).
    pub fn set_max_memory(&self, key: &str, kib: u64, affect: Affect) -> Result<String, String> {
        let (name, live, config) = self.resolve(key, affect)?;
        if live {
            return Err(format!("domain '{name}' is running: its maximum memory cannot change (rvirt has no memory hotplug); use --config for the next start"));
        }
        if kib < MIN_MEMORY_KIB {
            return Err(format!("{kib} KiB is too little memory for a guest (at least {MIN_MEMORY_KIB} KiB)"));
        }
        if config {
            self.edit_stored(&name, |d| {
                d.memory_kib = kib;
                d.current_memory_kib = d.current_memory_kib.min(kib);
                Ok(())
            })?;
        }
        Ok(name)
    }

    /// `setvcpus`: the vCPU count of the stored definition (no vCPU hotplug).
    pub fn set_vcpus(&self, key: &str, count: u32, affect: Affect) -> Result<String, String> {
        let (name, live, config) = self.resolve(key, affect)?;
        if live {
            return Err(format!("domain '{name}' is running: its vCPUs cannot change (rvirt has no vCPU hotplug); use --config for the next start"));
        }
        if !(1..=MAX_VCPUS).contains(&count) {
            return Err(format!("{count} is not a vCPU count from 1 to {MAX_VCPUS}"));
        }
        if config {
            self.edit_stored(&name, |d| {
                d.vcpus = count;
                Ok(())
            })?;
        }
        Ok(name)
    }

    /// `vcpucount`.
    pub fn vcpu_counts(&self, key: &str) -> Result<VcpuCounts, String> {
        let g = lock(&self.inner);
        let name = g.find(key)?;
        let d = &g.domains[&name];
        Ok(VcpuCounts { config: d.persistent.then_some(d.def.vcpus), live: d.run.as_ref().map(|r| r.def.vcpus) })
    }

    /// `vcpuinfo`: each vCPU thread of a running domain.
    pub fn vcpu_threads(&self, key: &str) -> Result<Vec<VcpuThread>, String> {
        let pid = {
            let g = lock(&self.inner);
            let name = g.find(key)?;
            g.domains[&name].run.as_ref().map(|r| r.record.pid).ok_or_else(|| format!("domain '{name}' is not running"))?
        };
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Ok(vcpu_threads(pid)
            .into_iter()
            .filter_map(|(vcpu, task)| {
                let (state, ticks, cpu) = task_stat(&task.join("stat"))?;
                let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
                let affinity = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or("").trim().to_string();
                Some(VcpuThread { vcpu, state: state_word(&state).into(), cpu, cpu_seconds: ticks as f64 / hz, affinity })
            })
            .collect())
    }

    /// Each vCPU's allowed host CPUs (`0-3,6`): the running threads', or
    /// (with `config`, or for a stopped domain) what `<cputune><vcpupin>`
    /// says, all online host CPUs where it says nothing.
    pub fn vcpu_pins(&self, key: &str, affect: Affect) -> Result<Vec<String>, String> {
        let (running, def) = {
            let g = lock(&self.inner);
            let name = g.find(key)?;
            let d = &g.domains[&name];
            (d.run.is_some() && !affect.config, d.run.as_ref().filter(|_| !affect.config).map_or(&d.def, |r| &r.def).clone())
        };
        if running {
            return Ok(self.vcpu_threads(key)?.into_iter().map(|t| t.affinity).collect());
        }
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_else(|_| "0".into()).trim().to_string();
        Ok((0..def.vcpus).map(|v| def.tuning.vcpupin.iter().find(|(n, _)| *n == v).map_or_else(|| online.clone(), |(_, set)| set.list())).collect())
    }

    /// `update-device`: what virsh changes through it on a card (its link
    /// state: domif-setlink) or a CD-ROM drive (its disc: change-media).
    pub fn update_device(&self, key: &str, xml: &str, affect: Affect, force: bool) -> Result<String, String> {
        let (name, live, config) = self.resolve(key, affect)?;
        match parse_device(xml)? {
            Device::Interface(card) => {
                let mac = card.mac.clone().ok_or("the card to update needs its <mac address>")?;
                // Only the link state changes here: anything else would need hotplug.
                {
                    let g = lock(&self.inner);
                    let d = &g.domains[&name];
                    let def = if live { d.run.as_ref().map_or(&d.def, |r| &r.def) } else { &d.def };
                    let now = def.interfaces.iter().find(|x| x.mac.as_deref() == Some(mac.as_str())).ok_or_else(|| format!("domain '{name}' has no card with MAC address {mac}"))?;
                    if now.kind != card.kind || now.model != card.model {
                        return Err(format!("only a card's link state can change while it is defined (card {mac}); rvirt has no device hotplug yet"));
                    }
                }
                self.set_link(&name, &mac, card.link_up.unwrap_or(true), Affect { live, config })
            }
            Device::Disk(disk) if disk.cdrom => {
                let path = (!disk.path.as_os_str().is_empty()).then_some(disk.path.clone());
                if live {
                    self.change_media(&name, &disk.target, path.as_deref(), force)?;
                }
                if config {
                    self.edit_stored(&name, |d| {
                        let drive = d.disks.iter_mut().find(|x| x.target == disk.target && x.cdrom).ok_or_else(|| format!("no CD-ROM drive {}", disk.target))?;
                        drive.path = path.clone().unwrap_or_default();
                        Ok(())
                    })?;
                }
                Ok(name)
            }
            Device::Disk(disk) => Err(format!("disk {} is not a CD-ROM drive: only a drive's disc can be changed while it is defined", disk.target)),
        }
    }

    /// `reset`: the reset button of a running domain.
    pub fn reset(&self, key: &str) -> Result<String, String> {
        let (name, socket) = self.active(key)?;
        vmm_call(&socket, &VmmRequest::Reset, Duration::from_secs(5)).map_err(|e| format!("domain '{name}': {e}"))?;
        Ok(name)
    }

    /// `domrename`: a stopped, stored domain takes a new name (its
    /// autostart mark goes with it).
    pub fn rename(&self, key: &str, new_name: &str) -> Result<String, String> {
        let mut g = lock(&self.inner);
        let name = g.find(key)?;
        let d = &g.domains[&name];
        if d.run.is_some() {
            return Err(format!("domain '{name}' is running: only a stopped domain can be renamed"));
        }
        if !d.persistent {
            return Err(format!("domain '{name}' is transient: it has no stored definition to rename"));
        }
        if g.domains.contains_key(new_name) {
            return Err(format!("a domain called '{new_name}' already exists"));
        }
        if self.store.managed_save(&name).exists() || !self.snapshots.load(&name).snaps.is_empty() {
            return Err(format!("domain '{name}' has a managed save or snapshots, which are kept under its name: remove them first"));
        }
        let mut def = d.def.clone();
        def.name = new_name.to_string();
        // The new name is checked as any name in a definition is.
        let def = parse_checked(&def.to_xml())?;
        let autostart = self.store.autostart(&name);
        self.store.save_definition(new_name, &def.to_xml()).map_err(|e| format!("{e:#}"))?;
        if let Err(e) = self.store.remove_definition(&name) {
            let _ = self.store.remove_definition(new_name);
            return Err(format!("{e:#}"));
        }
        if autostart {
            if let Err(e) = self.store.set_autostart(new_name, true) {
                tracing::error!("{e:#}: '{new_name}' lost its autostart mark in the rename");
            }
        }
        let Some(mut old) = g.domains.remove(&name) else { return Err(format!("domain '{name}' vanished")) };
        self.emit(&name, &old.def, None, Lifecycle::Undefined);
        self.emit(new_name, &def, None, Lifecycle::Defined { updated: false });
        old.def = def;
        g.domains.insert(new_name.to_string(), old);
        Ok(new_name.to_string())
    }

    /// `desc`: reads the description (or title) of the running or stored
    /// definition, or sets it (an empty text removes it).
    pub fn desc(&self, key: &str, title: bool, set: Option<&str>, affect: Affect) -> Result<(String, Option<String>), String> {
        fn field(d: &mut DomainXml, title: bool) -> &mut Option<String> {
            if title {
                &mut d.title
            } else {
                &mut d.description
            }
        }
        let Some(text) = set else {
            let g = lock(&self.inner);
            let name = g.find(key)?;
            let d = &g.domains[&name];
            let mut def = if affect.config { d.def.clone() } else { d.run.as_ref().map_or(&d.def, |r| &r.def).clone() };
            return Ok((name, field(&mut def, title).clone()));
        };
        if title && text.contains('\n') {
            return Err("a title is one line".into());
        }
        let value = (!text.is_empty()).then(|| text.to_string());
        let (name, live, config) = self.resolve(key, affect)?;
        if live {
            let v = value.clone();
            self.edit_live(&name, |d| *field(d, title) = v);
        }
        if config {
            self.edit_stored(&name, |d| {
                *field(d, title) = value;
                Ok(())
            })?;
        }
        Ok((name, None))
    }

    /// `metadata`: reads an application's element (running definition, or
    /// the stored one with `config`), or sets it (`Some`) or removes it.
    pub fn metadata(&self, key: &str, uri: &str, change: Option<(&str, Option<&str>)>, affect: Affect) -> Result<(String, Option<String>), String> {
        let Some((prefix, xml)) = change else {
            let g = lock(&self.inner);
            let name = g.find(key)?;
            let d = &g.domains[&name];
            let def = if affect.config { &d.def } else { d.run.as_ref().map_or(&d.def, |r| &r.def) };
            let found = def.metadata_element(uri).ok_or_else(|| format!("metadata not found: domain '{name}' has no metadata with namespace URI '{uri}'"))?;
            return Ok((name, Some(found)));
        };
        let (name, live, config) = self.resolve(key, affect)?;
        // Checked on a copy first: the live change cannot fail halfway.
        let mut probe = DomainXml::parse("<domain type='kvm'><name>probe</name><memory>65536</memory></domain>").map_err(|e| e.to_string())?;
        probe.set_metadata_element(uri, prefix, xml)?;
        if live {
            let mut result = Ok(());
            self.edit_live(&name, |d| result = d.set_metadata_element(uri, prefix, xml));
            result?;
        }
        if config {
            self.edit_stored(&name, |d| d.set_metadata_element(uri, prefix, xml))?;
        }
        Ok((name, None))
    }

    /// `attach-device --config`: a disk or card added to the stored definition.
    pub fn attach_device(&self, key: &str, xml: &str, affect: Affect) -> Result<String, String> {
        let (name, live, config) = self.resolve(key, affect)?;
        if live {
            return Err(format!("domain '{name}' is running and rvirt has no device hotplug yet: use --config (the device appears at the next start)"));
        }
        let device = parse_device(xml)?;
        if config {
            self.edit_stored(&name, |d| {
                match device {
                    Device::Disk(disk) => {
                        if let Some(other) = d.disks.iter().find(|x| x.target == disk.target) {
                            return Err(format!("target dev='{}' is already used by {}", disk.target, other.path.display()));
                        }
                        d.disks.push(disk);
                    }
                    Device::Interface(i) => {
                        if let Some(m) = i.mac.as_deref().filter(|m| d.interfaces.iter().any(|x| x.mac.as_deref() == Some(*m))) {
                            return Err(format!("a card with MAC address {m} is already there"));
                        }
                        d.interfaces.push(i);
                    }
                }
                Ok(())
            })?;
        }
        Ok(name)
    }

    /// `detach-device --config`: a disk (matched by target) or card
    /// (matched by MAC, else by being the only one of its kind) removed
    /// from the stored definition.
    pub fn detach_device(&self, key: &str, xml: &str, affect: Affect) -> Result<String, String> {
        let (name, live, config) = self.resolve(key, affect)?;
        if live {
            return Err(format!("domain '{name}' is running and rvirt has no device hotplug yet: use --config (the device goes at the next start)"));
        }
        let device = parse_device(xml)?;
        if config {
            self.edit_stored(&name, |d| {
                match device {
                    Device::Disk(disk) => {
                        let i = d.disks.iter().position(|x| x.target == disk.target).ok_or_else(|| format!("no disk with target dev='{}'", disk.target))?;
                        d.disks.remove(i);
                    }
                    Device::Interface(card) => {
                        let matches: Vec<usize> = d
                            .interfaces
                            .iter()
                            .enumerate()
                            .filter(|(_, x)| match &card.mac {
                                Some(m) => x.mac.as_ref() == Some(m),
                                None => x.kind == card.kind,
                            })
                            .map(|(i, _)| i)
                            .collect();
                        match matches.as_slice() {
                            [i] => {
                                d.interfaces.remove(*i);
                            }
                            [] => return Err("no matching card (give its <mac address>)".into()),
                            _ => return Err("several cards match: give the <mac address> of the one to remove".into()),
                        }
                    }
                }
                Ok(())
            })?;
        }
        Ok(name)
    }

    /// `domif-setlink`: a card's cable in or out, live through the VMM and
    /// as `<link state>` in the definition.
    pub fn set_link(&self, key: &str, interface: &str, up: bool, affect: Affect) -> Result<String, String> {
        let (name, live, config) = self.resolve(key, affect)?;
        let find = |d: &DomainXml, taps: &[String]| {
            d.interfaces.iter().enumerate().position(|(i, x)| {
                x.mac.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(interface)) || x.tap.as_deref() == Some(interface) || taps.get(i).is_some_and(|t| t == interface)
            })
        };
        if live {
            let (socket, index) = {
                let g = lock(&self.inner);
                let r = g.domains[&name].run.as_ref().ok_or_else(|| format!("domain '{name}' is not running"))?;
                (r.record.api_socket.clone(), find(&r.def, &r.record.taps))
            };
            let index = index.ok_or_else(|| format!("domain '{name}' has no card '{interface}' (name it by its tap or MAC address)"))?;
            vmm_call(&socket, &VmmRequest::SetLink { device: format!("net{index}"), up }, Duration::from_secs(5)).map_err(|e| format!("domain '{name}': {e}"))?;
            self.edit_live(&name, |d| {
                if let Some(i) = d.interfaces.get_mut(index) {
                    i.link_up = Some(up);
                }
            });
        }
        if config {
            self.edit_stored(&name, |d| {
                let i = find(d, &[]).ok_or_else(|| format!("the stored definition has no card '{interface}'"))?;
                d.interfaces[i].link_up = Some(up);
                Ok(())
            })?;
        }
        Ok(name)
    }

    /// `dommemstat`: the balloon's size, the VMM's resident memory and the
    /// guest driver's own figures (fresh ones when it answers within a
    /// second), by virsh's names, in KiB (counts as they are).
    pub fn memory_stats(&self, key: &str) -> Result<Vec<(String, u64)>, String> {
        self.memory_stats_waiting(key, STATS_WAIT)
    }

    /// [`Manager::memory_stats`] with the figures the driver last posted
    /// (no wait: for reading many domains at once).
    pub fn memory_stats_now(&self, key: &str) -> Result<Vec<(String, u64)>, String> {
        self.memory_stats_waiting(key, Duration::ZERO)
    }

    fn memory_stats_waiting(&self, key: &str, wait: Duration) -> Result<Vec<(String, u64)>, String> {
        let (name, socket) = self.active(key)?;
        let (max_kib, pid, balloon) = {
            let g = lock(&self.inner);
            let r = g.domains[&name].run.as_ref().ok_or_else(|| format!("domain '{name}' is not running"))?;
            (r.def.memory_kib, r.record.pid, r.def.memballoon)
        };
        let mut out = Vec::new();
        if balloon {
            let ask = || -> Result<rvirt_api::BalloonStats, String> {
                let r = vmm_call(&socket, &VmmRequest::BalloonStats, Duration::from_secs(5)).map_err(|e| format!("domain '{name}': {e}"))?;
                r.balloon_stats.ok_or_else(|| format!("domain '{name}': the VMM sent no balloon statistics"))
            };
            let first = ask()?;
            let deadline = Instant::now() + wait;
            let mut latest = first.clone();
            // A driver with the statistics queue answers the request the first call made.
            while first.generation > 0 && latest.generation == first.generation && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
                latest = ask()?;
            }
            let kib = |k: &str| latest.values.get(k).map(|v| v / 1024);
            let count = |k: &str| latest.values.get(k).copied();
            for (virsh, v) in [
                ("swap_in", kib("swap-in")),
                ("swap_out", kib("swap-out")),
                ("major_fault", count("major-faults")),
                ("minor_fault", count("minor-faults")),
                ("unused", kib("free-memory")),
                ("available", kib("total-memory")),
                ("usable", kib("available-memory")),
                ("disk_caches", kib("disk-caches")),
                ("hugetlb_pgalloc", count("hugetlb-allocations")),
                ("hugetlb_pgfail", count("hugetlb-failures")),
            ] {
                if let Some(v) = v {
                    out.push((virsh.to_string(), v));
                }
            }
            out.push(("actual".into(), max_kib.saturating_sub(latest.actual_bytes / 1024)));
            if latest.updated_unix > 0 {
                out.push(("last_update".into(), latest.updated_unix));
            }
        } else {
            out.push(("actual".into(), max_kib));
        }
        if let Some(rss) = crate::process::rss_kib(pid) {
            out.push(("rss".into(), rss));
        }
        Ok(out)
    }

    /// `domblkinfo`: a disk's guest size, what its image occupies and the
    /// host file's size, read without disturbing a running VMM's lock, and
    /// only from where the path policy allows the domain to read.
    pub fn block_info(&self, key: &str, disk: &str) -> Result<BlockInfo, String> {
        let (name, target) = {
            let g = lock(&self.inner);
            let name = g.find(key)?;
            let d = &g.domains[&name];
            let def = d.run.as_ref().map_or(&d.def, |r| &r.def);
            let x = def
                .disks
                .iter()
                .find(|x| x.target == disk || (!x.path.as_os_str().is_empty() && x.path == Path::new(disk)))
                .ok_or_else(|| format!("domain '{name}' has no disk '{disk}'"))?;
            (name, x.clone())
        };
        if target.path.as_os_str().is_empty() {
            return Ok(BlockInfo { capacity: 0, allocation: 0, physical: 0 });
        }
        let format = match target.format.unwrap_or(rvirt_domain::ImageFormat::Raw) {
            rvirt_domain::ImageFormat::Raw => rvirt_block::Format::Raw,
            rvirt_domain::ImageFormat::Qcow2 => rvirt_block::Format::Qcow2,
        };
        let opts = rvirt_block::ImageOptions {
            read_only: true,
            locking: rvirt_block::Locking::ForceShare,
            backing: rvirt_block::BackingPolicy::Ignore,
            direct: false,
        };
        // rvirtd reads it as root: only where the path policy would let the domain read it.
        let real = self.policy.check("disk", &target.path, false).map_err(|e| format!("domain '{name}': {e}"))?;
        let image = rvirt_block::open_with(&real, format, &opts).map_err(|e| format!("domain '{name}': {e}"))?;
        let meta = std::fs::metadata(&real).map_err(|e| format!("domain '{name}': {}: {e}", target.path.display()))?;
        let physical = if meta.is_file() { meta.len() } else { image.size() };
        use std::os::unix::fs::MetadataExt;
        let allocation = if meta.is_file() { meta.blocks() * 512 } else { physical };
        Ok(BlockInfo { capacity: image.size(), allocation, physical })
    }

    /// `domblkstat` / `domifstat`: a running domain's counters of one disk or card.
    pub fn device_counters(&self, key: &str, device: &str) -> Result<DeviceCounters, String> {
        let c = self.device_stats(key, device)?;
        Ok(DeviceCounters { reads: c.reads, read_bytes: c.bytes_to_guest, writes: c.writes, write_bytes: c.bytes_from_guest, errors: c.errors })
    }
}
