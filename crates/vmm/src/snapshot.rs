//! Snapshots of a running VM on disk: `DIR/state` (a [`state_file`] of
//! [`VmSnapshot`]: the vCPUs, KVM's VM-wide state and each platform
//! device's state under its id in the device tree) and `DIR/memory`
//! (guest RAM, region after region, sparse where the guest's pages are
//! zero), or both in one file ([`rvirt_api::saved`]) written into a
//! descriptor. `rvirt-vmm --restore DIR|FILE` maps the memory
//! copy-on-write, so N clones share the pages none of them changed.
//!
//! Virtio devices are stopped for the save (every request they took
//! completes) and restarted where their rings are. A VM that booted
//! through firmware keeps the firmware image in its state.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use crate::config::{Boot, VmConfig};
use crate::state_file;
use crate::vcpu_state::MachineState;
use crate::{memory, Error, Result};

/// The state file's name in a snapshot directory.
pub const STATE: &str = "state";
/// The memory file's name.
pub const MEMORY: &str = "memory";

/// Everything of a VM but its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// What the VM was built from (each card with the MAC it had): a
    /// restore builds the same machine and devices from it.
    pub config: VmConfig,
    /// What KVM holds.
    pub machine: MachineState,
    /// Each device's state by its id in the device tree.
    pub devices: BTreeMap<String, Vec<u8>>,
    /// The firmware image the VM booted through (mapped read-only at the
    /// top of 4 GiB), when it did.
    pub firmware_rom: Option<Vec<u8>>,
}

/// What a snapshot took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Bytes of memory written (zero chunks are holes).
    pub memory_bytes: u64,
}

fn create(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Writes `snap` and `mem` into `dir` (made if missing; refused if it holds
/// a snapshot already). The state file is written last: a directory with
/// one holds a whole snapshot. On failure nothing is left behind.
pub fn write(dir: &Path, snap: &VmSnapshot, mem: &GuestMemoryMmap) -> Result<Written> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Config(format!("snapshot directory {}: {e}", dir.display())))?;
    let (state_path, memory_path) = (dir.join(STATE), dir.join(MEMORY));
    if state_path.exists() || memory_path.exists() {
        return Err(Error::Config(format!("{} holds a snapshot already; give an empty or new directory", dir.display())));
    }
    let bytes = state_file::encode(snap).map_err(|e| Error::Device(e.to_string()))?;
    let result = (|| {
        let memory_file = create(&memory_path)?;
        let written = memory::save_guest_memory(mem, &memory_file, 0)?;
        memory_file.sync_all().map_err(|e| Error::Memory(format!("{}: {e}", memory_path.display())))?;
        let mut state_file = create(&state_path)?;
        std::io::Write::write_all(&mut state_file, &bytes).and_then(|()| state_file.sync_all()).map_err(|e| Error::Config(format!("{}: {e}", state_path.display())))?;
        Ok(Written { state_bytes: bytes.len() as u64, memory_bytes: written })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&state_path);
        let _ = std::fs::remove_file(&memory_path);
    }
    result
}

/// Writes `snap` and `mem` as one file ([`rvirt_api::saved`]) into `file`
/// (emptied first) with `note` kept for the manager. The header goes last,
/// after everything else is on disk: a file without it is refused by a
/// restore.
pub fn write_file(file: &File, snap: &VmSnapshot, mem: &GuestMemoryMmap, note: &str) -> Result<Written> {
    use std::os::unix::fs::FileExt;
    use rvirt_api::saved::Layout;
    let bytes = state_file::encode(snap).map_err(|e| Error::Device(e.to_string()))?;
    let io = |e: std::io::Error| Error::Memory(format!("writing the saved VM: {e}"));
    let ram: u64 = vm_memory::GuestMemoryBackend::iter(mem).map(|r| vm_memory::GuestMemoryRegion::len(r)).sum();
    let layout = Layout::plan(note.len() as u64, bytes.len() as u64, ram);
    file.set_len(0).map_err(io)?;
    file.write_all_at(note.as_bytes(), rvirt_api::saved::HEADER_LEN).map_err(io)?;
    file.write_all_at(&bytes, layout.state_offset).map_err(io)?;
    let written = memory::save_guest_memory(mem, file, layout.memory_offset)?;
    file.sync_all().map_err(io)?;
    file.write_all_at(&layout.encode(), 0).and_then(|()| file.sync_all()).map_err(io)?;
    Ok(Written { state_bytes: bytes.len() as u64, memory_bytes: written })
}

/// The configuration a restore runs: the snapshot's machine, devices and
/// boot (a guest reboot boots as the VM first did, when its kernel or
/// firmware can still be opened), with the backends of `given` (the
/// restore's own options):
/// COM1, the API socket, the virtio console's backend, reboot action,
/// confinement and pinning; disks given again replace the saved ones'
/// files (same count, bus and media: clones each write their own copy);
/// cards given again replace their taps (same count; the MAC stays the
/// guest's). What does not fit is refused, saying what differs.
pub fn restored_config(given: &VmConfig, saved: &VmConfig) -> Result<VmConfig> {
    let bad = |why: String| Error::Config(format!("--restore: {why}"));
    let mut c = saved.clone();
    if matches!(c.boot, Boot::Restore { .. } | Boot::Incoming { .. }) {
        return Err(bad("the snapshot's configuration does not say how the VM booted".into()));
    }
    c.serial = given.serial.clone();
    c.api_socket = given.api_socket.clone();
    c.on_reboot = given.on_reboot;
    c.start_paused = given.start_paused;
    c.seccomp = given.seccomp;
    c.jail = given.jail.clone();
    c.vcpu_pins = given.vcpu_pins.clone();
    c.emulator_pin = given.emulator_pin.clone();
    match (&given.console, &mut c.console) {
        (Some(g), Some(s)) => *s = g.clone(),
        (Some(_), None) => return Err(bad("the snapshot's VM has no virtio console".into())),
        (None, _) => {}
    }
    if !given.disks.is_empty() {
        if given.disks.len() != saved.disks.len() {
            return Err(bad(format!("{} disks given; the snapshot's VM has {}", given.disks.len(), saved.disks.len())));
        }
        for (i, (g, s)) in given.disks.iter().zip(&mut c.disks).enumerate() {
            if (g.bus, g.media, g.read_only) != (s.bus, s.media, s.read_only) {
                return Err(bad(format!(
                    "disk{i} is {:?}/{:?}{} in the snapshot; the disk given is {:?}/{:?}{}",
                    s.bus,
                    s.media,
                    if s.read_only { " read-only" } else { "" },
                    g.bus,
                    g.media,
                    if g.read_only { " read-only" } else { "" }
                )));
            }
            s.path = g.path.clone();
            s.format = g.format;
            s.backing = g.backing.clone();
            s.probe_backing = g.probe_backing;
            s.shareable = g.shareable;
            s.direct = g.direct;
        }
    }
    if !given.nets.is_empty() {
        if given.nets.len() != saved.nets.len() {
            return Err(bad(format!("{} network cards given; the snapshot's VM has {}", given.nets.len(), saved.nets.len())));
        }
        for (i, (g, s)) in given.nets.iter().zip(&mut c.nets).enumerate() {
            if g.mac.is_some() && g.mac != s.mac {
                return Err(bad(format!("net{i}: the guest knows its card by the MAC the snapshot has; another cannot be given")));
            }
            s.tap = g.tap.clone();
            s.fd = g.fd;
            s.bridge = g.bridge.clone();
        }
    }
    Ok(c)
}

/// Reads the snapshot at `path`, a directory or one file (a file passed
/// as a descriptor counts as one): its state (checked: format, version,
/// checksum) and the file holding its memory, opened for mapping, with
/// the offset the memory starts at.
pub fn read(path: &Path) -> Result<(VmSnapshot, File, u64)> {
    let bad = |what: String| Error::Config(format!("--restore {}: {what}", path.display()));
    let passed = rvirt_block::file::passed(path, true, false).map_err(|e| bad(e.to_string()))?;
    let (snap, memory, base) = if passed.is_none() && path.is_dir() {
        let mut f = File::open(path.join(STATE)).map_err(|e| bad(format!("{STATE}: {e}")))?;
        // Never more than a state can be, however large the file claims to be.
        let limit = state_file::HEADER_LEN as u64 + state_file::MAX_PAYLOAD + 1;
        let mut bytes = Vec::new();
        (&mut f).take(limit).read_to_end(&mut bytes).map_err(|e| bad(format!("{STATE}: {e}")))?;
        let snap: VmSnapshot = state_file::decode(&bytes).map_err(|e| bad(e.to_string()))?;
        let memory = File::open(path.join(MEMORY)).map_err(|e| bad(format!("{MEMORY}: {e}")))?;
        (snap, memory, 0)
    } else {
        let file = match passed {
            Some(f) => f,
            None => crate::loader::open_input("saved VM", path)?,
        };
        let layout = rvirt_api::saved::Layout::read(&file).map_err(|e| bad(e.to_string()))?;
        let bytes = layout.read_state(&file).map_err(|e| bad(e.to_string()))?;
        let snap: VmSnapshot = state_file::decode(&bytes).map_err(|e| bad(e.to_string()))?;
        (snap, file, layout.memory_offset)
    };
    let len = memory.metadata().map_err(|e| bad(format!("{MEMORY}: {e}")))?.len().saturating_sub(base);
    if len != snap.config.memory_bytes {
        return Err(bad(format!("{MEMORY} holds {len} bytes; the snapshot's VM has {} bytes of RAM", snap.config.memory_bytes)));
    }
    if snap.machine.vcpus.len() != usize::from(snap.config.vcpus) {
        return Err(bad(format!("the state has {} vCPUs' registers for {} vCPUs", snap.machine.vcpus.len(), snap.config.vcpus)));
    }
    Ok((snap, memory, base))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskBus, DiskConfig, NetConfig, SerialMode};

    #[test]
    fn a_restore_takes_the_snapshot_s_machine_and_the_backends_given_again() {
        let mut saved = VmConfig::new("/k");
        (saved.vcpus, saved.memory_bytes, saved.rng) = (2, 256 << 20, true);
        saved.disks = vec![DiskConfig::plain("/a.raw".into())];
        saved.nets = vec![NetConfig { mac: Some([0x52, 0x54, 0, 1, 2, 3]), link_up: false, ..NetConfig::on_tap("t0") }];
        saved.console = Some(SerialMode::Pty);
        let mut given = VmConfig::with_boot(Boot::Restore { dir: "/s".into(), copy_memory: false });
        given.serial = SerialMode::Null;
        let c = restored_config(&given, &saved).unwrap();
        assert_eq!((c.vcpus, c.memory_bytes, c.rng, &c.disks, &c.nets), (2, 256 << 20, true, &saved.disks, &saved.nets));
        assert_eq!((&c.boot, &c.serial, &c.console), (&saved.boot, &SerialMode::Null, &Some(SerialMode::Pty)), "it boots as it first did");
        // A clone: its own copy of the disk, its own tap; the guest's MAC and link stay.
        given.disks = vec![DiskConfig::plain("/clone.raw".into())];
        given.nets = vec![NetConfig::on_tap("t9")];
        let c = restored_config(&given, &saved).unwrap();
        assert_eq!(c.disks[0].path.to_str(), Some("/clone.raw"));
        assert_eq!(c.nets[0], NetConfig { tap: "t9".into(), ..saved.nets[0].clone() });
        // What the guest would notice is refused.
        let refused = |g: &VmConfig, saved: &VmConfig, want: &str| {
            let e = restored_config(g, saved).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        let mut g = given.clone();
        g.disks[0].bus = DiskBus::Scsi;
        refused(&g, &saved, "disk0 is Virtio/Disk in the snapshot");
        let mut g = given.clone();
        g.nets[0].mac = Some([0x52, 0x54, 0, 9, 9, 9]);
        refused(&g, &saved, "net0: the guest knows its card by the MAC");
        let mut g = given.clone();
        g.nets.push(NetConfig::on_tap("t8"));
        refused(&g, &saved, "2 network cards given; the snapshot's VM has 1");
        saved.console = None;
        let mut g = given;
        g.console = Some(SerialMode::Null);
        refused(&g, &saved, "no virtio console");
    }
}
