//! The VM's platform devices by stable id, the buses they sit on, and the
//! seam their state is saved and restored through (Cloud Hypervisor's
//! device manager and device tree): a snapshot keeps each device's state
//! under its id; a restore gives it to the device of the same id in a VM
//! built again from the same configuration, and refuses when the two VMs'
//! devices differ.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rvirt_devices::bus::lock;
use rvirt_devices::persist::Persist;
use rvirt_devices::{Bus, BusDevice};
use rvirt_virtio_devices::transport::VirtioPciState;
use rvirt_virtio_devices::VirtioPciDevice;

use crate::{state_file, Error, Result};

/// What a device occupies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// Ports `base..base + len`.
    Pio {
        /// First port.
        base: u64,
        /// Number of ports.
        len: u64,
    },
    /// Guest-physical `base..base + len`.
    Mmio {
        /// First address.
        base: u64,
        /// Bytes.
        len: u64,
    },
    /// A slot on PCI bus 0 (its BARs are wherever the guest puts them).
    PciSlot(usize),
}

/// A device whose state is saved under its id.
trait Stateful: Send + Sync {
    /// Stops the device's own activity (worker threads) before a save.
    fn quiesce(&self) {}
    /// Restarts what [`Stateful::quiesce`] stopped.
    fn resume(&self) -> std::result::Result<(), String> {
        Ok(())
    }
    /// The device's state, encoded.
    fn save(&self) -> std::result::Result<Vec<u8>, String>;
    /// Puts encoded state back.
    fn restore(&self, bytes: &[u8]) -> std::result::Result<(), String>;
}

/// A virtio device with its PCI transport.
struct VirtioNode(Arc<Mutex<VirtioPciDevice>>);

impl Stateful for VirtioNode {
    fn quiesce(&self) {
        lock(&self.0).quiesce();
    }

    fn resume(&self) -> std::result::Result<(), String> {
        lock(&self.0).resume()
    }

    fn save(&self) -> std::result::Result<Vec<u8>, String> {
        state_file::to_bytes(&lock(&self.0).save()).map_err(|e| e.to_string())
    }

    fn restore(&self, bytes: &[u8]) -> std::result::Result<(), String> {
        let state = state_file::from_bytes::<VirtioPciState>(bytes).map_err(|e| e.to_string())?;
        lock(&self.0).restore(&state)
    }
}

impl<T: Persist + Send> Stateful for Mutex<T> {
    fn save(&self) -> std::result::Result<Vec<u8>, String> {
        let state = rvirt_devices::bus::lock(self).save();
        state_file::to_bytes(&state).map_err(|e| e.to_string())
    }

    fn restore(&self, bytes: &[u8]) -> std::result::Result<(), String> {
        let state = state_file::from_bytes::<T::State>(bytes).map_err(|e| e.to_string())?;
        rvirt_devices::bus::lock(self).restore(state).map_err(|e| e.to_string())
    }
}

/// One device in the tree.
pub struct DeviceNode {
    /// Its stable id (`com1`, `cmos`, `ged`, …).
    pub id: String,
    /// Ports and memory it answers on.
    pub resources: Vec<Resource>,
    state: Option<Arc<dyn Stateful>>,
}

/// Builds the VM's buses, recording each device under its id.
#[derive(Default)]
pub struct DeviceManager {
    io_bus: Bus,
    mmio_bus: Bus,
    nodes: Vec<DeviceNode>,
}

impl DeviceManager {
    /// No devices yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn node(&mut self, id: &str, resource: Resource, state: Option<Arc<dyn Stateful>>) -> Result<()> {
        if self.nodes.iter().any(|n| n.id == id) {
            return Err(Error::Device(format!("two devices with id {id}")));
        }
        self.nodes.push(DeviceNode { id: id.to_string(), resources: vec![resource], state });
        Ok(())
    }

    fn insert(&mut self, id: &str, dev: Arc<Mutex<dyn BusDevice>>, r: Resource, state: Option<Arc<dyn Stateful>>) -> Result<()> {
        let placed = match r {
            Resource::Pio { base, len } => self.io_bus.insert(dev, base, len),
            Resource::Mmio { base, len } => self.mmio_bus.insert(dev, base, len),
            Resource::PciSlot(slot) => return Err(Error::Device(format!("{id}: PCI slot {slot} is not on a bus of the device manager"))),
        };
        placed.map_err(|e| Error::Device(format!("{id}: {e}")))?;
        self.node(id, r, state)
    }

    /// A device without state of its own on ports or memory (`r`).
    pub fn add(&mut self, id: &str, dev: Arc<Mutex<impl BusDevice + 'static>>, r: Resource) -> Result<()> {
        self.insert(id, dev, r, None)
    }

    /// A device whose state a snapshot keeps.
    pub fn add_stateful<D: BusDevice + Persist + 'static>(&mut self, id: &str, dev: Arc<Mutex<D>>, r: Resource) -> Result<()> {
        let state: Arc<dyn Stateful> = dev.clone();
        self.insert(id, dev, r, Some(state))
    }

    /// A virtio device in PCI slot `slot` (on the PCI bus, not the port or
    /// memory bus): its transport's and its own state are saved, its worker
    /// stopped around the save.
    pub fn add_virtio(&mut self, id: &str, slot: usize, transport: Arc<Mutex<VirtioPciDevice>>) -> Result<()> {
        self.node(id, Resource::PciSlot(slot), Some(Arc::new(VirtioNode(transport))))
    }

    /// The buses, for the vCPUs, and the device tree, for saving and restoring.
    pub fn finish(self) -> (Arc<Bus>, Arc<Bus>, Devices) {
        (Arc::new(self.io_bus), Arc::new(self.mmio_bus), Devices { nodes: self.nodes })
    }
}

/// The VM's device tree.
pub struct Devices {
    nodes: Vec<DeviceNode>,
}

impl Devices {
    /// Every device, in the order they were added.
    pub fn nodes(&self) -> &[DeviceNode] {
        &self.nodes
    }

    /// Stops every device's own activity (the vCPUs paused): once it
    /// returns no device changes guest memory, and every request a device
    /// took is complete.
    pub fn quiesce(&self) {
        for s in self.nodes.iter().filter_map(|n| n.state.as_ref()) {
            s.quiesce();
        }
    }

    /// Restarts what [`Devices::quiesce`] stopped; the first failure is named.
    pub fn resume(&self) -> Result<()> {
        let mut first = Ok(());
        for n in &self.nodes {
            if let Some(s) = &n.state {
                if let Err(e) = s.resume() {
                    tracing::error!("{}: cannot restart after the snapshot: {e}", n.id);
                    first = first.and(Err(Error::Device(format!("{}: {e}", n.id))));
                }
            }
        }
        first
    }

    /// Each stateful device's state by id (the VM paused, devices quiesced).
    pub fn save(&self) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for n in &self.nodes {
            if let Some(s) = &n.state {
                out.insert(n.id.clone(), s.save().map_err(|e| Error::Device(format!("{}: {e}", n.id)))?);
            }
        }
        Ok(out)
    }

    /// Gives each device its saved state. The saved devices and this VM's
    /// stateful devices must be the same set; the first difference is named.
    pub fn restore(&self, saved: &BTreeMap<String, Vec<u8>>) -> Result<()> {
        let ours: Vec<&str> = self.nodes.iter().filter(|n| n.state.is_some()).map(|n| n.id.as_str()).collect();
        if let Some(extra) = saved.keys().find(|k| !ours.contains(&k.as_str())) {
            return Err(Error::Config(format!("the snapshot has state for device {extra}, which this VM does not have")));
        }
        if let Some(missing) = ours.iter().find(|id| !saved.contains_key(**id)) {
            return Err(Error::Config(format!("the snapshot has no state for device {missing} of this VM")));
        }
        for n in &self.nodes {
            if let (Some(s), Some(bytes)) = (&n.state, saved.get(&n.id)) {
                s.restore(bytes).map_err(|e| Error::Device(format!("{}: {e}", n.id)))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rvirt_devices::persist::{GedState, RestoreError};

    /// A register whose value is its state.
    struct Register(u32);

    impl BusDevice for Register {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(self.0 as u8);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0 = u32::from(data[0]);
        }
    }

    impl Persist for Register {
        type State = GedState;
        fn save(&self) -> GedState {
            GedState { pending: self.0 }
        }
        fn restore(&mut self, s: GedState) -> std::result::Result<(), RestoreError> {
            if s.pending > 255 {
                return Err(RestoreError { device: "register", reason: "too large".into() });
            }
            self.0 = s.pending;
            Ok(())
        }
    }

    fn machine(value: u32) -> (Arc<Bus>, Devices) {
        let mut m = DeviceManager::new();
        m.add_stateful("reg", Arc::new(Mutex::new(Register(value))), Resource::Pio { base: 0x10, len: 1 }).unwrap();
        m.add("plain", Arc::new(Mutex::new(Register(0))), Resource::Mmio { base: 0x1000, len: 4 }).unwrap();
        let (io, _, devices) = m.finish();
        (io, devices)
    }

    #[test]
    fn state_moves_by_id_between_two_builds_of_one_machine() {
        let (_, one) = machine(42);
        let saved = one.save().unwrap();
        assert_eq!(saved.keys().collect::<Vec<_>>(), ["reg"], "only devices with state are saved");
        let (io, two) = machine(0);
        two.restore(&saved).unwrap();
        let mut b = [0u8];
        io.read(0x10, &mut b);
        assert_eq!(b[0], 42);
        assert_eq!(two.nodes().iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["reg", "plain"]);
    }

    #[test]
    fn a_different_device_set_or_bad_state_is_refused_by_name() {
        let (_, one) = machine(1);
        let mut saved = one.save().unwrap();
        saved.insert("net9".into(), vec![]);
        assert!(one.restore(&saved).unwrap_err().to_string().contains("device net9"));
        assert!(one.restore(&BTreeMap::new()).unwrap_err().to_string().contains("no state for device reg"));
        let bad = BTreeMap::from([("reg".to_string(), state_file::to_bytes(&GedState { pending: 999 }).unwrap())]);
        assert!(one.restore(&bad).unwrap_err().to_string().contains("too large"));
        let garbage = BTreeMap::from([("reg".to_string(), vec![1u8])]);
        let e = one.restore(&garbage).unwrap_err().to_string();
        assert!(e.contains("reg: "), "names the device: {e}");
        let mut m = DeviceManager::new();
        m.add("x", Arc::new(Mutex::new(Register(0))), Resource::Pio { base: 0, len: 1 }).unwrap();
        assert!(m.add("x", Arc::new(Mutex::new(Register(0))), Resource::Pio { base: 8, len: 1 }).is_err(), "ids are unique");
        assert!(m.add("y", Arc::new(Mutex::new(Register(0))), Resource::Pio { base: 0, len: 1 }).is_err(), "ranges do not overlap");
    }
}
