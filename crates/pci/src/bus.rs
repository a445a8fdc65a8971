//! Bus 0: its slots, configuration access (ports and ECAM), and routing of
//! guest accesses to whichever BAR decodes an address.

use std::sync::{Arc, Mutex, RwLock};

use rvirt_devices::bus::lock;
use rvirt_devices::BusDevice;

use crate::config::{PciClass, PciConfiguration, PciHeader};
use crate::{read_le, write_le, Error, PciBarInfo, PciDevice, Result, SLOTS};

/// A device on the bus, shared by the configuration paths and the BAR window.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Decoded {
    slot: usize,
    bar: PciBarInfo,
}

/// Bus 0 with up to 32 single-function devices; slot 0 is the host bridge.
pub struct PciBus {
    slots: Vec<Option<SharedPciDevice>>,
    decoded: RwLock<Vec<Decoded>>,
    window: (u64, u64),
    next_bar: Mutex<u64>,
}

impl PciBus {
    /// A bus whose BARs are placed inside `window_start..window_end`.
    pub fn new(window_start: u64, window_end: u64) -> Self {
        let mut slots: Vec<Option<SharedPciDevice>> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(PciHostBridge::new())));
        Self { slots, decoded: RwLock::new(Vec::new()), window: (window_start, window_end), next_bar: Mutex::new(window_start) }
    }

    /// Reserves a naturally aligned `size`-byte range of the window for a BAR.
    pub fn allocate_bar(&self, size: u64) -> Result<u64> {
        let mut next = lock(&self.next_bar);
        let start = next.checked_next_multiple_of(size).ok_or(Error::WindowExhausted(size))?;
        let end = start.checked_add(size).filter(|e| *e <= self.window.1).ok_or(Error::WindowExhausted(size))?;
        *next = end;
        Ok(start)
    }

    /// The slot [`PciBus::add_device`] will use next.
    pub fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(Option::is_none)
    }

    /// Plugs `device` into the lowest free slot; returns the slot.
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<usize> {
        let slot = self.slots.iter().position(Option::is_none).ok_or(Error::NoFreeSlot)?;
        self.slots[slot] = Some(device);
        self.refresh(slot);
        Ok(slot)
    }

    /// Slots that hold a device (for the DSDT and the MADT's interrupt routing).
    pub fn occupied_slots(&self) -> Vec<usize> {
        (0..SLOTS).filter(|s| self.slots[*s].is_some()).collect()
    }

    fn device(&self, slot: usize, function: usize) -> Option<&SharedPciDevice> {
        if function != 0 {
            return None;
        }
        self.slots.get(slot)?.as_ref()
    }

    /// Reads configuration register `reg` of `slot`/`function`; all ones when empty.
    pub fn read_config(&self, slot: usize, function: usize, reg: usize) -> u32 {
        match self.device(slot, function) {
            Some(d) => lock(d).read_config_register(reg),
            None => 0xffff_ffff,
        }
    }

    /// Writes configuration space of `slot`/`function` at byte `offset`.
    pub fn write_config(&self, slot: usize, function: usize, offset: u64, data: &[u8]) {
        if let Some(d) = self.device(slot, function) {
            lock(d).write_config(offset, data);
            self.refresh(slot);
        }
    }

    /// Re-reads which BARs every device decodes (after a restore put their
    /// configuration back behind the bus's back) and tells each about moves.
    pub fn refresh_all(&self) {
        for slot in 0..self.slots.len() {
            self.refresh(slot);
        }
    }

    /// Re-reads which BARs `slot` decodes and tells the device about moves.
    fn refresh(&self, slot: usize) {
        let Some(dev) = self.slots[slot].as_ref() else { return };
        let mut dev = lock(dev);
        let now = dev.decoded_bars();
        let mut decoded = self.decoded.write().unwrap_or_else(|e| e.into_inner());
        let before: Vec<Decoded> = decoded.iter().filter(|d| d.slot == slot).copied().collect();
        for i in 0..crate::NUM_BARS {
            let old = before.iter().find(|d| d.bar.index == i).map(|d| d.bar.addr);
            let new = now.iter().find(|b| b.index == i).map(|b| b.addr);
            if old != new {
                dev.bar_moved(i, old, new);
            }
        }
        decoded.retain(|d| d.slot != slot);
        decoded.extend(now.into_iter().map(|bar| Decoded { slot, bar }));
    }

    fn find_bar(&self, addr: u64, len: usize) -> Option<(SharedPciDevice, usize, u64)> {
        let decoded = self.decoded.read().unwrap_or_else(|e| e.into_inner());
        let d = decoded.iter().find(|d| {
            addr >= d.bar.addr && addr.checked_add(len as u64).is_some_and(|end| end <= d.bar.addr + d.bar.size)
        })?;
        Some((self.slots[d.slot].clone()?, d.bar.index, addr - d.bar.addr))
    }
}

/// Configuration mechanism #1: the address register at 0xCF8 and the data window at 0xCFC.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: u32,
    /// Where a write to the reset control register (byte 0xCF9) goes.
    reset: Option<Arc<dyn rvirt_devices::PlatformControl>>,
}

/// Reset control register (0xCF9): RST_CPU, the bit that starts a reset.
const RESET_CPU: u8 = 0x04;

impl PciConfigIo {
    /// Configuration ports for `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus, address: 0, reset: None }
    }

    /// Also the PC's reset control register at 0xCF9: a byte write with
    /// RST_CPU set resets the machine (firmware resets this way, SeaBIOS
    /// after a failed boot).
    pub fn with_reset_control(mut self, control: Arc<dyn rvirt_devices::PlatformControl>) -> Self {
        self.reset = Some(control);
        self
    }

    fn target(&self) -> Option<(usize, usize, usize)> {
        let a = self.address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        (enabled && bus == 0).then_some((((a >> 11) & 0x1f) as usize, ((a >> 8) & 7) as usize, ((a >> 2) & 0x3f) as usize))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                write_le(data, u64::from(self.address));
            } else {
                data.fill(0xff);
            }
            return;
        }
        let within = (offset - 4) as usize;
        let value = match self.target() {
            Some((slot, f, reg)) => self.bus.read_config(slot, f, reg),
            None => 0xffff_ffff,
        };
        write_le(data, u64::from(value >> (within * 8)));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 4 {
            // Only dword writes change the address; a byte at 0xCF9 is the reset control register.
            if offset == 0 && data.len() == 4 {
                self.address = read_le(data) as u32;
            } else if offset == 1 && data.len() == 1 && data[0] & RESET_CPU != 0 {
                if let Some(r) = &self.reset {
                    r.request(rvirt_devices::PlatformRequest::Reset);
                }
            }
            return;
        }
        if let Some((slot, f, reg)) = self.target() {
            self.bus.write_config(slot, f, (reg * 4) as u64 + (offset - 4), data);
        }
    }
}

/// ECAM (memory-mapped configuration, described to the guest by the MCFG table) for bus 0.
pub struct PciConfigMmio {
    bus: Arc<PciBus>,
}

impl PciConfigMmio {
    /// The ECAM window of `bus`.
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus }
    }

    fn decode(offset: u64) -> (usize, usize, u64) {
        (((offset >> 15) & 0x1f) as usize, ((offset >> 12) & 7) as usize, offset & 0xfff)
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (slot, f, reg_off) = Self::decode(offset);
        if reg_off >= 0x100 {
            // No extended capabilities; absent functions read all ones.
            let v = if self.bus.device(slot, f).is_some() { 0 } else { u64::MAX };
            write_le(data, v);
            return;
        }
        let value = self.bus.read_config(slot, f, (reg_off / 4) as usize);
        write_le(data, u64::from(value >> ((reg_off % 4) * 8)));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (slot, f, reg_off) = Self::decode(offset);
        if reg_off < 0x100 {
            self.bus.write_config(slot, f, reg_off, data);
        }
    }
}

/// The MMIO window BARs live in: forwards each access to the BAR decoding it.
pub struct PciBarWindow {
    bus: Arc<PciBus>,
    start: u64,
}

impl PciBarWindow {
    /// A window starting at guest address `start` (where it is placed on the MMIO bus).
    pub fn new(bus: Arc<PciBus>, start: u64) -> Self {
        Self { bus, start }
    }
}

impl BusDevice for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.bus.find_bar(self.start + offset, data.len()) {
            Some((dev, bar, off)) => lock(&dev).read_bar(bar, off, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((dev, bar, off)) = self.bus.find_bar(self.start + offset, data.len()) {
            lock(&dev).write_bar(bar, off, data);
        }
    }
}

/// The host bridge at 00:00.0; Linux looks for it before trusting port 0xCF8.
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl PciHostBridge {
    /// A host bridge (class 06/00). Its subsystem IDs are QEMU's "virtual
    /// machine" ones, which SeaBIOS checks before it reads fw_cfg.
    pub fn new() -> Self {
        Self {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: 0x1b36,
                device_id: 0x0008,
                revision: 0,
                class: PciClass { class: 0x06, subclass: 0x00, prog_if: 0 },
                subsystem_vendor_id: 0x1af4,
                subsystem_id: 0x1100,
                interrupt_pin: 0,
            }),
        }
    }
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for PciHostBridge {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn decoded_bars(&self) -> Vec<PciBarInfo> {
        Vec::new()
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BarKind, COMMAND_MEMORY};

    /// A device with one 4 KiB BAR that records accesses and moves.
    struct Probe {
        config: PciConfiguration,
        moves: Arc<Mutex<Vec<(Option<u64>, Option<u64>)>>>,
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl PciDevice for Probe {
        fn read_config_register(&mut self, reg: usize) -> u32 {
            self.config.read_reg(reg)
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn decoded_bars(&self) -> Vec<PciBarInfo> {
            self.config.decoded_bars()
        }
        fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
        fn bar_moved(&mut self, _bar: usize, old: Option<u64>, new: Option<u64>) {
            self.moves.lock().unwrap().push((old, new));
        }
    }

    fn bus_with_probe() -> (Arc<PciBus>, Arc<Mutex<Vec<(Option<u64>, Option<u64>)>>>) {
        let mut bus = PciBus::new(0xc000_0000, 0xd000_0000);
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            revision: 1,
            class: PciClass { class: 0xff, subclass: 0, prog_if: 0 },
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
            interrupt_pin: 1,
        });
        config.add_bar(0, 0x1000, BarKind::Mem64);
        let addr = bus.allocate_bar(0x1000).unwrap();
        config.set_bar_addr(0, addr);
        let moves = Arc::new(Mutex::new(Vec::new()));
        let probe = Probe { config, moves: moves.clone(), last_write: None };
        assert_eq!(bus.add_device(Arc::new(Mutex::new(probe))).unwrap(), 1);
        (Arc::new(bus), moves)
    }

    fn cf8(io: &mut PciConfigIo, slot: u32, reg: u32) -> u32 {
        io.write(0, &(0x8000_0000 | (slot << 11) | (reg << 2)).to_le_bytes());
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn port_and_ecam_access_agree() {
        let (bus, _) = bus_with_probe();
        let mut io = PciConfigIo::new(bus.clone());
        let mut ecam = PciConfigMmio::new(bus.clone());
        assert_eq!(cf8(&mut io, 0, 2) >> 8, 0x060000, "host bridge class");
        assert_eq!(cf8(&mut io, 0, 11), 0x1100_1af4, "QEMU machine subsystem, for SeaBIOS");
        assert_eq!(cf8(&mut io, 1, 0), 0x1044_1af4);
        assert_eq!(cf8(&mut io, 2, 0), 0xffff_ffff, "empty slot");
        let mut b = [0u8; 2];
        ecam.read((1 << 15) + 2, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x1044);
        let mut w = [0u8; 4];
        ecam.read((1 << 15) + 0x100, &mut w);
        assert_eq!(w, [0; 4], "no extended capabilities");
        ecam.read((3 << 15) | (1 << 12), &mut w);
        assert_eq!(w, [0xff; 4]);
        // Disabled address register and other buses read all ones.
        io.write(0, &0x0000_0800u32.to_le_bytes());
        io.read(4, &mut w);
        assert_eq!(w, [0xff; 4]);
        io.write(0, &0x8001_0000u32.to_le_bytes());
        io.read(4, &mut w);
        assert_eq!(w, [0xff; 4]);
    }

    #[test]
    fn a_byte_write_with_rst_cpu_at_0xcf9_resets_and_leaves_the_address_alone() {
        struct Requests(Mutex<Vec<rvirt_devices::PlatformRequest>>);
        impl rvirt_devices::PlatformControl for Requests {
            fn request(&self, r: rvirt_devices::PlatformRequest) {
                self.0.lock().unwrap().push(r);
            }
        }
        let (bus, _) = bus_with_probe();
        let reqs = Arc::new(Requests(Mutex::new(Vec::new())));
        let mut io = PciConfigIo::new(bus).with_reset_control(reqs.clone());
        assert_eq!(cf8(&mut io, 1, 0), 0x1044_1af4);
        io.write(1, &[0x02]);
        assert!(reqs.0.lock().unwrap().is_empty(), "SYS_RST alone prepares, does not reset");
        io.write(1, &[0x06]);
        assert_eq!(*reqs.0.lock().unwrap(), vec![rvirt_devices::PlatformRequest::Reset]);
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1044_1af4, "the config address is untouched");
    }

    #[test]
    fn bar_accesses_follow_the_bar_when_the_guest_moves_it() {
        let (bus, moves) = bus_with_probe();
        let mut window = PciBarWindow::new(bus.clone(), 0xc000_0000);
        let mut b = [0u8; 1];
        window.read(0x10, &mut b);
        assert_eq!(b, [0xff], "memory decoding is still off");
        let mut ecam = PciConfigMmio::new(bus.clone());
        ecam.write((1 << 15) + 4, &[COMMAND_MEMORY as u8]);
        window.read(0x10, &mut b);
        assert_eq!(b, [0x10]);
        // Move the BAR to 0xc010_0000.
        ecam.write((1 << 15) + 0x10, &0xc010_0000u32.to_le_bytes());
        window.read(0x10, &mut b);
        assert_eq!(b, [0xff]);
        window.read(0x10_0020, &mut b);
        assert_eq!(b, [0x20]);
        assert_eq!(*moves.lock().unwrap(), vec![(None, Some(0xc000_0000)), (Some(0xc000_0000), Some(0xc010_0000))]);
        // Accesses straddling the end of a BAR go nowhere.
        let mut w = [0u8; 4];
        window.read(0x10_0ffe, &mut w);
        assert_eq!(w, [0xff; 4]);
    }

    #[test]
    fn bar_allocation_is_aligned_and_bounded() {
        let bus = PciBus::new(0x1000, 0x10000);
        assert_eq!(bus.allocate_bar(0x10).unwrap(), 0x1000);
        assert_eq!(bus.allocate_bar(0x4000).unwrap(), 0x4000);
        assert!(bus.allocate_bar(0x10000).is_err());
    }
}
