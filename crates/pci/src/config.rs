//! One PCI function's configuration space (type-0 header).
//!
//! Holds the 64 registers, which bits of each the guest may change, the BARs
//! (with the all-ones sizing protocol) and the capability list.

use crate::{read_le, NUM_BARS};

/// Command register: respond to memory-space accesses.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: the device may master the bus (DMA, MSI).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: legacy INTx assertion disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: a capability list is present.
const STATUS_CAP_LIST: u32 = 1 << 4;
/// Where the capability list starts.
const FIRST_CAP_OFFSET: usize = 0x40;
const NUM_REGS: usize = 64;
const BAR0_REG: usize = 4;
const CAP_POINTER_REG: usize = 0xd;
const INTERRUPT_REG: usize = 0xf;

/// Class code triple: base class, subclass, programming interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciClass {
    /// Base class (0x06 bridge, 0x01 storage, 0x02 network, 0xff other...).
    pub class: u8,
    /// Subclass within it.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
}

/// The identity of a function, written into its header.
#[derive(Clone, Copy, Debug)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code.
    pub class: PciClass,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Interrupt pin: 0 none, 1 INTA#.
    pub interrupt_pin: u8,
}

/// How a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mem32,
    /// 64-bit memory BAR (takes two registers).
    Mem64,
}

#[derive(Clone, Copy, Debug)]
struct Bar {
    size: u64,
    kind: BarKind,
    addr: u64,
}

/// A BAR as currently decoded: where it is and how big.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBarInfo {
    /// BAR index (0-5).
    pub index: usize,
    /// Guest-physical base.
    pub addr: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

/// What a snapshot keeps of a configuration space: every register as the
/// guest left it and where each BAR is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciConfigState {
    /// The 64 registers.
    pub regs: Vec<u32>,
    /// Each BAR's address (None: no such BAR).
    pub bar_addrs: Vec<Option<u64>>,
}

/// A type-0 configuration space.
pub struct PciConfiguration {
    regs: [u32; NUM_REGS],
    writable: [u32; NUM_REGS],
    bars: [Option<Bar>; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfiguration {
    /// A configuration space for a function with identity `h`.
    pub fn new(h: &PciHeader) -> Self {
        let mut regs = [0u32; NUM_REGS];
        let mut writable = [0u32; NUM_REGS];
        regs[0] = u32::from(h.vendor_id) | (u32::from(h.device_id) << 16);
        regs[2] = u32::from(h.revision)
            | (u32::from(h.class.prog_if) << 8)
            | (u32::from(h.class.subclass) << 16)
            | (u32::from(h.class.class) << 24);
        regs[0xb] = u32::from(h.subsystem_vendor_id) | (u32::from(h.subsystem_id) << 16);
        regs[INTERRUPT_REG] = u32::from(h.interrupt_pin) << 8;
        // Command: I/O, memory, bus master, INTx disable. Cache line and latency timer.
        writable[1] = 0x0000_0407;
        writable[3] = 0x0000_ffff;
        // Interrupt line: scratch for the OS.
        writable[INTERRUPT_REG] = 0x0000_00ff;
        Self { regs, writable, bars: [None; NUM_BARS], last_cap: None, next_cap: FIRST_CAP_OFFSET }
    }

    /// Declares BAR `index` of `size` bytes (a power of two, at least 16).
    /// A 64-bit BAR also takes register `index + 1`.
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) {
        debug_assert!(size.is_power_of_two() && size >= 16);
        debug_assert!(index < NUM_BARS && (kind == BarKind::Mem32 || index + 1 < NUM_BARS));
        self.bars[index] = Some(Bar { size, kind, addr: 0 });
    }

    /// Places BAR `index` at `addr` (what firmware would do before the OS runs).
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) {
        if let Some(b) = self.bars[index].as_mut() {
            b.addr = addr & !(b.size - 1);
        }
    }

    /// The address BAR `index` is programmed with.
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        self.bars.get(index).copied().flatten().map(|b| b.addr)
    }

    /// Appends a capability whose bytes are `body` (byte 0 is the capability
    /// ID, byte 1 is filled with the next pointer). `writable` gives the bits
    /// of each byte the guest may change (`None`: read-only). Returns its offset.
    pub fn add_capability(&mut self, body: &[u8], writable: Option<&[u8]>) -> usize {
        let offset = self.next_cap;
        let len = body.len().max(2);
        debug_assert!(offset + len <= NUM_REGS * 4, "capabilities overflow the configuration space");
        for (i, b) in body.iter().enumerate() {
            self.set_byte(offset + i, *b, false);
            if let Some(w) = writable.and_then(|w| w.get(i)) {
                self.set_byte(offset + i, *w, true);
            }
        }
        self.set_byte(offset + 1, 0, false);
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, offset as u8, false),
            None => {
                self.set_byte(CAP_POINTER_REG * 4, offset as u8, false);
                self.regs[1] |= STATUS_CAP_LIST << 16;
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = (offset + len + 3) & !3;
        offset
    }

    fn set_byte(&mut self, offset: usize, value: u8, mask: bool) {
        let (reg, shift) = (offset / 4, (offset % 4) * 8);
        let target = if mask { &mut self.writable[reg] } else { &mut self.regs[reg] };
        *target = (*target & !(0xff << shift)) | (u32::from(value) << shift);
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[1] as u16
    }

    /// Whether the function answers memory accesses to its BARs.
    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    /// Whether the OS disabled legacy INTx.
    pub fn intx_disabled(&self) -> bool {
        self.command() & COMMAND_INTX_DISABLE != 0
    }

    /// The registers and BAR addresses, for a snapshot.
    pub fn state(&self) -> PciConfigState {
        PciConfigState { regs: self.regs.to_vec(), bar_addrs: self.bars.iter().map(|b| b.map(|b| b.addr)).collect() }
    }

    /// Puts saved registers and BAR addresses back into the same function
    /// built again: refused when the identity (vendor, device, class) or
    /// the BARs declared differ.
    pub fn restore(&mut self, s: &PciConfigState) -> Result<(), String> {
        if s.regs.len() != NUM_REGS || s.bar_addrs.len() != NUM_BARS {
            return Err(format!("{} registers and {} BARs saved; a function has {NUM_REGS} and {NUM_BARS}", s.regs.len(), s.bar_addrs.len()));
        }
        if s.regs[0] != self.regs[0] || s.regs[2] != self.regs[2] {
            return Err(format!("saved function {:#010x} class {:#010x}, this one {:#010x} class {:#010x}", s.regs[0], s.regs[2], self.regs[0], self.regs[2]));
        }
        // Only what the guest may write can differ (capabilities, header layout).
        let fixed = (0..NUM_REGS).filter(|r| !(BAR0_REG..BAR0_REG + NUM_BARS).contains(r));
        if let Some(r) = fixed.into_iter().find(|&r| (s.regs[r] ^ self.regs[r]) & !self.writable[r] != 0) {
            return Err(format!("register {:#x} is {:#010x} saved, {:#010x} here, in bits the guest cannot write", r * 4, s.regs[r], self.regs[r]));
        }
        for (i, (b, addr)) in self.bars.iter_mut().zip(&s.bar_addrs).enumerate() {
            match (b, addr) {
                (Some(b), Some(a)) => b.addr = a & !(b.size - 1),
                (None, None) => {}
                _ => return Err(format!("BAR {i} is declared in one of the two functions only")),
            }
        }
        self.regs.copy_from_slice(&s.regs);
        Ok(())
    }

    /// The BARs decoded now.
    pub fn decoded_bars(&self) -> Vec<PciBarInfo> {
        if !self.memory_enabled() {
            return Vec::new();
        }
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(index, b)| b.filter(|b| b.addr != 0).map(|b| PciBarInfo { index, addr: b.addr, size: b.size }))
            .collect()
    }

    /// Which BAR (and whether its high half) register `reg` belongs to.
    fn bar_of_reg(&self, reg: usize) -> Option<(usize, bool)> {
        let i = reg.checked_sub(BAR0_REG).filter(|i| *i < NUM_BARS)?;
        if self.bars[i].is_some() {
            return Some((i, false));
        }
        match i.checked_sub(1).and_then(|p| self.bars[p]) {
            Some(b) if b.kind == BarKind::Mem64 => Some((i - 1, true)),
            _ => None,
        }
    }

    /// Reads register `reg` (out of range reads as all ones).
    pub fn read_reg(&self, reg: usize) -> u32 {
        if reg >= NUM_REGS {
            return 0xffff_ffff;
        }
        if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
            return match self.bar_of_reg(reg) {
                Some((i, high)) => {
                    let b = self.bars[i].unwrap_or(Bar { size: 0, kind: BarKind::Mem32, addr: 0 });
                    if high {
                        (b.addr >> 32) as u32
                    } else {
                        let flags = if b.kind == BarKind::Mem64 { 0b100 } else { 0 };
                        (b.addr as u32 & 0xffff_fff0) | flags
                    }
                }
                None => 0,
            };
        }
        self.regs[reg]
    }

    /// Writes `data` at byte `offset`; only writable bits change. A write of
    /// all ones to a BAR reads back its size mask (the sizing protocol).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(offset) = usize::try_from(offset) else { return };
        if data.is_empty() || data.len() > 4 || offset % data.len() != 0 || offset + data.len() > NUM_REGS * 4 {
            return;
        }
        let reg = offset / 4;
        let shift = (offset % 4) * 8;
        let len_mask = if data.len() == 4 { u32::MAX } else { ((1u32 << (data.len() * 8)) - 1) << shift };
        let value = (read_le(data) as u32) << shift;
        if let Some((i, high)) = self.bar_of_reg(reg) {
            let merged = (self.read_reg(reg) & !len_mask) | (value & len_mask);
            if let Some(b) = self.bars[i].as_mut() {
                let mask = !(b.size - 1);
                b.addr = if high {
                    ((u64::from(merged) << 32) | (b.addr & 0xffff_ffff)) & mask
                } else {
                    let low = u64::from(merged & 0xffff_fff0);
                    let base = if b.kind == BarKind::Mem64 { b.addr & !0xffff_ffff } else { 0 };
                    (base | low) & mask
                };
            }
            return;
        }
        let w = self.writable[reg] & len_mask;
        self.regs[reg] = (self.regs[reg] & !w) | (value & w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class: PciClass { class: 1, subclass: 0x80, prog_if: 0 },
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
            interrupt_pin: 1,
        }
    }

    /// A function as built, with a BAR and one capability of a writable byte.
    fn function() -> PciConfiguration {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(0, 0x8000, BarKind::Mem64);
        c.set_bar_addr(0, 0xc000_0000);
        c.add_capability(&[0x11, 0, 0, 0], Some(&[0, 0, 0, 0xc0]));
        c
    }

    #[test]
    fn the_guest_s_settings_move_into_the_same_function_built_again() {
        let mut one = function();
        one.write(0x10, &0xd000_0000u32.to_le_bytes());
        one.write(0x04, &0x0406u16.to_le_bytes());
        one.write(0x3c, &[11]);
        one.write(0x43, &[0x80]);
        let saved = one.state();
        let mut two = function();
        two.restore(&saved).unwrap();
        assert!((0..NUM_REGS).all(|r| one.read_reg(r) == two.read_reg(r)));
        assert_eq!(two.decoded_bars(), vec![PciBarInfo { index: 0, addr: 0xd000_0000, size: 0x8000 }]);
        // Another function, a changed read-only bit, a BAR it lacks: refused.
        let mut other = saved.clone();
        other.regs[0] = 0x1041_1af4;
        assert!(two.restore(&other).unwrap_err().contains("saved function 0x10411af4"));
        let mut other = saved.clone();
        other.regs[0x10] ^= 0x0100;
        assert!(two.restore(&other).unwrap_err().contains("register 0x40"));
        let mut other = saved.clone();
        other.bar_addrs[2] = Some(0x1000);
        assert!(two.restore(&other).unwrap_err().contains("BAR 2"));
        let mut other = saved;
        other.regs.pop();
        assert!(two.restore(&other).is_err());
    }

    #[test]
    fn identity_registers() {
        let c = PciConfiguration::new(&header());
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        assert_eq!(c.read_reg(2), 0x0180_0001);
        assert_eq!(c.read_reg(0xf) >> 8 & 0xff, 1);
        assert_eq!(c.read_reg(64), 0xffff_ffff);
    }

    #[test]
    fn sixty_four_bit_bar_sizing_and_placement() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(0, 0x8000, BarKind::Mem64);
        c.set_bar_addr(0, 0xc000_0000);
        assert_eq!(c.read_reg(4), 0xc000_0004);
        assert_eq!(c.read_reg(5), 0);
        // Sizing: all ones reads back the size mask.
        c.write(0x10, &u32::MAX.to_le_bytes());
        c.write(0x14, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_reg(4), 0xffff_8004);
        assert_eq!(c.read_reg(5), 0xffff_ffff);
        c.write(0x10, &0xd000_0000u32.to_le_bytes());
        c.write(0x14, &1u32.to_le_bytes());
        assert_eq!(c.bar_addr(0), Some(0x1_d000_0000));
        assert!(c.decoded_bars().is_empty(), "memory decoding is off");
        c.write(4, &[COMMAND_MEMORY as u8]);
        assert_eq!(c.decoded_bars(), vec![PciBarInfo { index: 0, addr: 0x1_d000_0000, size: 0x8000 }]);
        // An absent BAR is hardwired to zero.
        c.write(0x18, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_reg(6), 0);
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut c = PciConfiguration::new(&header());
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        c.write(0x3c, &[11]);
        assert_eq!(c.read_reg(0xf) & 0xff, 11);
        // Misaligned or oversized writes are dropped.
        c.write(0x3d, &[0, 0]);
        c.write(0x3c, &[0; 8]);
        c.write(0x3fe, &[0; 4]);
        assert_eq!(c.read_reg(0xf) & 0xffff, 0x10b);
    }

    #[test]
    fn capability_list_is_chained() {
        let mut c = PciConfiguration::new(&header());
        let a = c.add_capability(&[0x09, 0, 16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], None);
        let b = c.add_capability(&[0x11, 0, 0, 0], Some(&[0, 0, 0, 0xc0]));
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x50);
        assert_ne!(c.read_reg(1) & (STATUS_CAP_LIST << 16), 0);
        assert_eq!(c.read_reg(0xd) & 0xff, 0x40);
        assert_eq!(c.read_reg(0x10) >> 8 & 0xff, 0x50);
        assert_eq!(c.read_reg(0x14) >> 8 & 0xff, 0);
        c.write(0x52, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_reg(0x14) >> 16, 0xc000);
    }
}
