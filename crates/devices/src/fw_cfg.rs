//! QEMU's firmware configuration device (fw_cfg), as SeaBIOS reads it.
//!
//! Firmware learns the machine from it: the vCPU count, the memory map
//! (`etc/e820`), the ACPI tables and how to link them (`etc/table-loader`),
//! the boot order. The interface follows QEMU's `docs/specs/fw_cfg.rst`:
//! a 16-bit selector at port 0x510, a byte-wide data port at 0x511, and the
//! DMA interface at 0x514 (the guest writes the big-endian address of a
//! `{control, length, address}` descriptor; writing the low half starts it).
//! Items are read-only: DMA writes are refused with the error bit, as QEMU
//! does for items it does not let the guest change.

use std::collections::BTreeMap;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// First I/O port of the device (selector; data at +1, DMA at +4).
pub const FW_CFG_PORT: u64 = 0x510;
/// Ports the device decodes: selector, data, and the 8-byte DMA address.
pub const FW_CFG_PORT_LEN: u64 = 12;

/// "QEMU": read through the data port, tells firmware fw_cfg is there.
pub const SIGNATURE: u16 = 0x0000;
/// Interface features: bit 0 traditional ports, bit 1 DMA.
pub const ID: u16 = 0x0001;
/// The machine's UUID (16 bytes, as SMBIOS stores it).
pub const UUID: u16 = 0x0002;
/// RAM size (legacy; firmware prefers `etc/e820`).
pub const RAM_SIZE: u16 = 0x0003;
/// Non-zero when the machine has no display.
pub const NOGRAPHIC: u16 = 0x0004;
/// vCPUs present at boot (SeaBIOS waits for exactly this many).
pub const NB_CPUS: u16 = 0x0005;
/// NUMA nodes (a 64-bit count, then per-CPU and per-node data).
pub const NUMA: u16 = 0x000d;
/// Non-zero shows SeaBIOS's boot menu (and waits for a key).
pub const BOOT_MENU: u16 = 0x000e;
/// Highest vCPU count the machine can have.
pub const MAX_CPUS: u16 = 0x000f;
/// The file directory: a big-endian count, then 64-byte entries.
pub const FILE_DIR: u16 = 0x0019;
/// Selector of the first named file.
pub const FILE_FIRST: u16 = 0x0020;
/// Legacy SMBIOS fields and tables (u16 count, then entries), from which
/// SeaBIOS builds its SMBIOS tables: how the domain UUID reaches type 1.
pub const SMBIOS_ENTRIES: u16 = 0x8001;
/// Whether the PIT's IRQ 0 is routed to IOAPIC pin 2 (for the MP table).
pub const IRQ0_OVERRIDE: u16 = 0x8002;
/// Legacy e820 reservations (a count; zero when `etc/e820` is given).
pub const E820_TABLE: u16 = 0x8003;

/// Longest file name, without its NUL.
pub const MAX_NAME: usize = 55;
/// Most files the directory may list.
pub const MAX_FILES: usize = 256;

const DMA_ERROR: u32 = 1;
const DMA_READ: u32 = 2;
const DMA_SKIP: u32 = 4;
const DMA_SELECT: u32 = 8;
const DMA_WRITE: u32 = 0x10;
/// What reads of the DMA address port return ("QEMU CFG"), as in QEMU.
const DMA_SIGNATURE: [u8; 8] = *b"QEMU CFG";
/// Zeroes written per step when a read runs past an item's end.
const ZERO_CHUNK: usize = 4096;

/// Why an item or file could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    /// The name is empty, too long or not printable ASCII.
    #[error("fw_cfg file name '{0}' must be 1 to 55 printable ASCII characters")]
    BadName(String),
    /// A file of that name is already there.
    #[error("fw_cfg file '{0}' is given twice")]
    Duplicate(String),
    /// More than [`MAX_FILES`] files.
    #[error("fw_cfg holds at most {MAX_FILES} files")]
    TooManyFiles,
    /// An item is larger than the 32-bit size the directory can state.
    #[error("fw_cfg item '{0}' is larger than 4 GiB")]
    TooLarge(String),
}

/// Collects items and files; [`FwCfgBuilder::build`] makes the device.
#[derive(Debug, Default)]
pub struct FwCfgBuilder {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, Vec<u8>)>,
}

impl FwCfgBuilder {
    /// The signature and DMA feature bits, nothing else.
    pub fn new() -> Self {
        let mut b = Self::default();
        b.items.insert(SIGNATURE, b"QEMU".to_vec());
        b.items.insert(ID, 3u32.to_le_bytes().to_vec());
        b
    }

    /// Sets the numbered item `key` (below [`FILE_FIRST`] or arch-local).
    pub fn item(&mut self, key: u16, data: Vec<u8>) -> &mut Self {
        self.items.insert(key, data);
        self
    }

    /// Adds the named file `name`.
    pub fn file(&mut self, name: &str, data: Vec<u8>) -> Result<&mut Self, FwCfgError> {
        if name.is_empty() || name.len() > MAX_NAME || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(FwCfgError::BadName(name.into()));
        }
        if self.files.iter().any(|(n, _)| n == name) {
            return Err(FwCfgError::Duplicate(name.into()));
        }
        if self.files.len() == MAX_FILES {
            return Err(FwCfgError::TooManyFiles);
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge(name.into()));
        }
        self.files.push((name.into(), data));
        Ok(self)
    }

    /// The device, reading and writing DMA descriptors in `mem`. Files are
    /// numbered in name order, as QEMU sorts them.
    pub fn build(mut self, mem: GuestMemoryMmap) -> FwCfg {
        self.files.sort_by(|a, b| a.0.cmp(&b.0));
        let mut dir = (self.files.len() as u32).to_be_bytes().to_vec();
        for (i, (name, data)) in self.files.iter().enumerate() {
            dir.extend_from_slice(&(data.len() as u32).to_be_bytes());
            dir.extend_from_slice(&(FILE_FIRST + i as u16).to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; MAX_NAME + 1];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        self.items.insert(FILE_DIR, dir);
        for (i, (_, data)) in self.files.into_iter().enumerate() {
            self.items.insert(FILE_FIRST + i as u16, data);
        }
        FwCfg { items: self.items, selected: SIGNATURE, offset: 0, dma_high: 0, mem }
    }
}

/// The device on the I/O bus at [`FW_CFG_PORT`].
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    selected: u16,
    offset: usize,
    dma_high: u32,
    mem: GuestMemoryMmap,
}

impl crate::persist::Persist for FwCfg {
    type State = crate::persist::FwCfgState;

    fn save(&self) -> Self::State {
        crate::persist::FwCfgState { selected: self.selected, offset: self.offset as u64, dma_high: self.dma_high }
    }

    fn restore(&mut self, state: Self::State) -> Result<(), crate::persist::RestoreError> {
        // An offset past the item reads zeroes, as it would have; no bound needed beyond usize.
        self.offset = usize::try_from(state.offset)
            .map_err(|_| crate::persist::RestoreError { device: "fw_cfg", reason: format!("offset {} is out of range", state.offset) })?;
        self.selected = state.selected;
        self.dma_high = state.dma_high;
        Ok(())
    }
}

impl FwCfg {
    fn select(&mut self, key: u16) {
        self.selected = key;
        self.offset = 0;
    }

    fn current(&self) -> &[u8] {
        self.items.get(&self.selected).map_or(&[], Vec::as_slice)
    }

    /// Next byte of the selected item; 0 past its end or for a missing item.
    fn next_byte(&mut self) -> u8 {
        let b = self.current().get(self.offset).copied().unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        b
    }

    /// Carries out the DMA descriptor at `at` and writes its status back.
    fn dma(&mut self, at: u64) {
        let mut desc = [0u8; 16];
        if self.mem.read_slice(&mut desc, GuestAddress(at)).is_err() {
            tracing::warn!("fw_cfg: DMA descriptor at {at:#x} is outside guest memory");
            return;
        }
        let control = u32::from_be_bytes([desc[0], desc[1], desc[2], desc[3]]);
        let len = u32::from_be_bytes([desc[4], desc[5], desc[6], desc[7]]);
        let addr = u64::from_be_bytes([desc[8], desc[9], desc[10], desc[11], desc[12], desc[13], desc[14], desc[15]]);
        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let ok = if control & DMA_READ != 0 {
            self.dma_read(addr, len)
        } else if control & DMA_WRITE != 0 {
            false
        } else if control & DMA_SKIP != 0 {
            self.offset = self.offset.saturating_add(len as usize);
            true
        } else {
            true
        };
        let status = if ok { 0u32 } else { DMA_ERROR };
        let _ = self.mem.write_slice(&status.to_be_bytes(), GuestAddress(at));
        crate::dirty::mark(at, 4);
        if ok && control & DMA_READ != 0 {
            crate::dirty::mark(addr, u64::from(len));
        }
    }

    /// Copies `len` bytes of the item to `addr`, zeroes past its end. The
    /// whole range must be guest RAM; nothing is written otherwise.
    fn dma_read(&mut self, addr: u64, len: u32) -> bool {
        let len = len as usize;
        let fits = len == 0 || GuestAddress(addr).checked_add(len as u64 - 1).is_some_and(|_| self.mem.check_range(GuestAddress(addr), len));
        if !fits {
            return false;
        }
        let item = self.current();
        let start = self.offset.min(item.len());
        let n = (item.len() - start).min(len);
        if n > 0 && self.mem.write_slice(&item[start..start + n], GuestAddress(addr)).is_err() {
            return false;
        }
        let zeros = [0u8; ZERO_CHUNK];
        let mut done = n;
        while done < len {
            let step = (len - done).min(ZERO_CHUNK);
            if self.mem.write_slice(&zeros[..step], GuestAddress(addr + done as u64)).is_err() {
                return false;
            }
            done += step;
        }
        self.offset = self.offset.saturating_add(len);
        true
    }
}

impl crate::BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            1 => data.iter_mut().for_each(|b| *b = self.next_byte()),
            4..=11 => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = DMA_SIGNATURE.get(offset as usize - 4 + i).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (0, 1) => self.select(u16::from(data[0])),
            (4, 4) => self.dma_high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
            (8, 4) => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let at = (u64::from(self.dma_high) << 32) | u64::from(low);
                self.dma_high = 0;
                self.dma(at);
            }
            _ => {}
        }
    }
}

/// Where [`TableLoader::allocate`] asks firmware to put a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zone {
    /// Anywhere in RAM (SeaBIOS: high memory).
    High = 1,
    /// The F segment (0xE0000-0xFFFFF), where the OS scans for the RSDP.
    FSeg = 2,
}

/// Size of one `etc/table-loader` command.
const LOADER_ENTRY: usize = 128;
/// Room for a file name in a loader command.
const LOADER_NAME: usize = 56;

/// Builds `etc/table-loader`: the script by which firmware places fw_cfg
/// files in guest memory, patches the pointers between them and fixes
/// checksums (QEMU's `hw/acpi/bios-linker-loader.c` format, which SeaBIOS
/// and OVMF run).
#[derive(Default)]
pub struct TableLoader {
    commands: Vec<u8>,
}

impl TableLoader {
    /// An empty script.
    pub fn new() -> Self {
        Self::default()
    }

    fn command(&mut self, kind: u32, body: &[u8]) {
        let mut e = [0u8; LOADER_ENTRY];
        e[..4].copy_from_slice(&kind.to_le_bytes());
        e[4..4 + body.len()].copy_from_slice(body);
        self.commands.extend_from_slice(&e);
    }

    fn name(name: &str) -> [u8; LOADER_NAME] {
        let mut n = [0u8; LOADER_NAME];
        let len = name.len().min(LOADER_NAME - 1);
        n[..len].copy_from_slice(&name.as_bytes()[..len]);
        n
    }

    /// Load `file` into memory aligned to `align` bytes, in `zone`.
    pub fn allocate(&mut self, file: &str, align: u32, zone: Zone) {
        let mut b = Self::name(file).to_vec();
        b.extend_from_slice(&align.to_le_bytes());
        b.push(zone as u8);
        self.command(1, &b);
    }

    /// Add where `src` was placed to the `size`-byte little-endian value
    /// at `offset` in `dest`.
    pub fn add_pointer(&mut self, dest: &str, src: &str, offset: u32, size: u8) {
        let mut b = Self::name(dest).to_vec();
        b.extend_from_slice(&Self::name(src));
        b.extend_from_slice(&offset.to_le_bytes());
        b.push(size);
        self.command(2, &b);
    }

    /// Set the byte at `offset` in `file` so that `len` bytes from `start` sum to zero.
    pub fn add_checksum(&mut self, file: &str, offset: u32, start: u32, len: u32) {
        let mut b = Self::name(file).to_vec();
        for v in [offset, start, len] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        self.command(3, &b);
    }

    /// The script, for the `etc/table-loader` file.
    pub fn into_bytes(self) -> Vec<u8> {
        self.commands
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn device() -> FwCfg {
        let mut b = FwCfgBuilder::new();
        b.item(NB_CPUS, 2u16.to_le_bytes().to_vec());
        b.file("etc/zeta", vec![9; 10]).unwrap();
        b.file("bootorder", b"/pci@i0cf8/*@1\nHALT".to_vec()).unwrap();
        b.build(mem())
    }

    #[test]
    fn a_read_in_progress_continues_after_a_save_and_restore() {
        use crate::persist::Persist;
        let mut a = device();
        let head = read_item(&mut a, SIGNATURE, 2);
        assert_eq!(head, b"QE");
        let saved = a.save();
        let mut b = device();
        b.restore(saved.clone()).unwrap();
        assert_eq!(b.save(), saved);
        let rest: Vec<u8> = (0..2).map(|_| {
            let mut x = [0u8];
            b.read(1, &mut x);
            x[0]
        }).collect();
        assert_eq!(rest, b"MU", "the signature goes on where it stopped");
    }

    fn read_item(d: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        d.write(0, &key.to_le_bytes());
        (0..len).map(|_| {
            let mut b = [0u8];
            d.read(1, &mut b);
            b[0]
        }).collect()
    }

    /// Writes a DMA descriptor at 0x1000 and starts it; returns the status word.
    fn dma(d: &mut FwCfg, control: u32, len: u32, addr: u64) -> u32 {
        let mut desc = control.to_be_bytes().to_vec();
        desc.extend_from_slice(&len.to_be_bytes());
        desc.extend_from_slice(&addr.to_be_bytes());
        d.mem.write_slice(&desc, GuestAddress(0x1000)).unwrap();
        d.write(4, &0u32.to_be_bytes());
        d.write(8, &0x1000u32.to_be_bytes());
        let mut s = [0u8; 4];
        d.mem.read_slice(&mut s, GuestAddress(0x1000)).unwrap();
        u32::from_be_bytes(s)
    }

    #[test]
    fn signature_id_and_items_through_the_data_port() {
        let mut d = device();
        assert_eq!(read_item(&mut d, SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut d, ID, 4), 3u32.to_le_bytes());
        assert_eq!(read_item(&mut d, NB_CPUS, 2), [2, 0]);
        assert_eq!(read_item(&mut d, 0x1234, 3), [0, 0, 0], "a missing item reads as zeros");
        let mut sig = [0u8; 8];
        d.read(4, &mut sig[..4]);
        d.read(8, &mut sig[4..]);
        assert_eq!(&sig, b"QEMU CFG");
    }

    #[test]
    fn the_directory_lists_files_sorted_with_their_selectors() {
        let mut d = device();
        let dir = read_item(&mut d, FILE_DIR, 4 + 2 * 64);
        assert_eq!(u32::from_be_bytes(dir[..4].try_into().unwrap()), 2);
        let entry = |i: usize| {
            let e = &dir[4 + i * 64..4 + (i + 1) * 64];
            let name = std::str::from_utf8(&e[8..]).unwrap().trim_end_matches('\0').to_string();
            (u32::from_be_bytes(e[..4].try_into().unwrap()), u16::from_be_bytes([e[4], e[5]]), name)
        };
        assert_eq!(entry(0), (19, FILE_FIRST, "bootorder".into()));
        assert_eq!(entry(1), (10, FILE_FIRST + 1, "etc/zeta".into()));
        assert_eq!(read_item(&mut d, FILE_FIRST + 1, 11), [9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0]);
    }

    #[test]
    fn dma_select_read_skip_and_zero_fill() {
        let mut d = device();
        d.mem.write_slice(&[0xaa; 64], GuestAddress(0x2000)).unwrap();
        let sel = |key: u16| (u32::from(key) << 16) | DMA_SELECT;
        assert_eq!(dma(&mut d, sel(FILE_FIRST) | DMA_READ, 4, 0x2000), 0);
        assert_eq!(dma(&mut d, DMA_SKIP, 2, 0), 0);
        assert_eq!(dma(&mut d, DMA_READ, 20, 0x2004), 0, "reading on, past the end");
        let mut got = [0u8; 26];
        d.mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(&got[..4], b"/pci");
        assert_eq!(&got[4..17], b"0cf8/*@1\nHALT", "two bytes skipped");
        assert_eq!(&got[17..24], &[0; 7], "zeros past the end");
        assert_eq!(&got[24..], &[0xaa, 0xaa], "nothing past the requested length");
    }

    #[test]
    fn dma_with_bad_addresses_lengths_or_writes_sets_the_error_bit() {
        let mut d = device();
        let sel = (u32::from(FILE_FIRST) << 16) | DMA_SELECT;
        assert_eq!(dma(&mut d, sel | DMA_READ, 16, (1 << 20) - 8), DMA_ERROR, "runs off the end of RAM");
        assert_eq!(dma(&mut d, sel | DMA_READ, u32::MAX, 0x2000), DMA_ERROR, "4 GiB into 1 MiB of RAM");
        assert_eq!(dma(&mut d, sel | DMA_READ, 8, u64::MAX - 4), DMA_ERROR, "address wraps");
        assert_eq!(dma(&mut d, sel | DMA_WRITE, 4, 0x2000), DMA_ERROR, "items are read-only");
        let mut untouched = [0u8; 8];
        d.mem.read_slice(&mut untouched, GuestAddress((1 << 20) - 8)).unwrap();
        assert_eq!(untouched, [0; 8]);
        // A descriptor outside RAM is ignored; the device keeps working.
        d.write(4, &0xffff_ffffu32.to_be_bytes());
        d.write(8, &0u32.to_be_bytes());
        assert_eq!(dma(&mut d, sel | DMA_READ, 4, 0x2000), 0);
    }

    #[test]
    fn bad_file_names_and_duplicates_are_refused() {
        let mut b = FwCfgBuilder::new();
        assert!(b.file("", vec![]).is_err());
        assert!(b.file(&"x".repeat(56), vec![]).is_err());
        assert!(b.file("a b", vec![]).is_err());
        b.file("a", vec![]).unwrap();
        assert_eq!(b.file("a", vec![]).unwrap_err(), FwCfgError::Duplicate("a".into()));
    }

    #[test]
    fn loader_commands_are_128_bytes_each() {
        let mut l = TableLoader::new();
        l.allocate("etc/acpi/rsdp", 16, Zone::FSeg);
        l.add_pointer("etc/acpi/rsdp", "etc/acpi/tables", 24, 8);
        l.add_checksum("etc/acpi/rsdp", 8, 0, 20);
        let b = l.into_bytes();
        assert_eq!(b.len(), 3 * 128);
        assert_eq!(&b[..4], &1u32.to_le_bytes());
        assert_eq!(&b[4..17], b"etc/acpi/rsdp");
        assert_eq!(&b[60..64], &16u32.to_le_bytes());
        assert_eq!(b[64], 2);
        assert_eq!(&b[128 + 60..128 + 75], b"etc/acpi/tables");
        assert_eq!(&b[128 + 116..128 + 120], &24u32.to_le_bytes());
        assert_eq!(b[128 + 120], 8);
        assert_eq!(&b[256 + 60..256 + 72], &[8, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0]);
    }
}
