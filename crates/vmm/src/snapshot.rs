//! Snapshots of a running VM on disk: `DIR/state` (a [`state_file`] of
//! [`VmSnapshot`]: the vCPUs, KVM's VM-wide state and each platform
//! device's state under its id in the device tree) and `DIR/memory`
//! (guest RAM, region after region, sparse where the guest's pages are
//! zero). `rvirt-vmm --restore DIR` maps the memory
//! file copy-on-write, so N clones share the pages none of them changed.
//!
//! For now the VM may have no virtio device and must have booted a kernel
//! (not firmware): the virtio transports' and firmware's state is the next
//! step; such a snapshot is refused, naming what it lacks.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

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
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// The machine's UUID.
    pub uuid: Option<[u8; 16]>,
    /// What KVM holds.
    pub machine: MachineState,
    /// Each platform device's state by its id in the device tree.
    pub devices: BTreeMap<String, Vec<u8>>,
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
        let written = memory::save_guest_memory(mem, &memory_file)?;
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

/// Reads the snapshot in `dir`: its state (checked: format, version,
/// checksum) and its memory file, opened for mapping.
pub fn read(dir: &Path) -> Result<(VmSnapshot, File)> {
    let state_path = dir.join(STATE);
    let bad = |what: String| Error::Config(format!("--restore {}: {what}", dir.display()));
    let mut f = File::open(&state_path).map_err(|e| bad(format!("{STATE}: {e}")))?;
    // Never more than a state can be, however large the file claims to be.
    let limit = state_file::HEADER_LEN as u64 + state_file::MAX_PAYLOAD + 1;
    let mut bytes = Vec::new();
    (&mut f).take(limit).read_to_end(&mut bytes).map_err(|e| bad(format!("{STATE}: {e}")))?;
    let snap: VmSnapshot = state_file::decode(&bytes).map_err(|e| bad(e.to_string()))?;
    let memory_path = dir.join(MEMORY);
    let memory = File::open(&memory_path).map_err(|e| bad(format!("{MEMORY}: {e}")))?;
    let len = memory.metadata().map_err(|e| bad(format!("{MEMORY}: {e}")))?.len();
    if len != snap.memory_bytes {
        return Err(bad(format!("{MEMORY} holds {len} bytes; the snapshot's VM has {} bytes of RAM", snap.memory_bytes)));
    }
    if snap.machine.vcpus.len() != usize::from(snap.vcpus) {
        return Err(bad(format!("the state has {} vCPUs' registers for {} vCPUs", snap.machine.vcpus.len(), snap.vcpus)));
    }
    Ok((snap, memory))
}
