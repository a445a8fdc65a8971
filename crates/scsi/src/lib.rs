//! SCSI logical units for rvirt-vmm's virtio-scsi controller: a disk (SBC)
//! or a CD-ROM (MMC) over any image of the image library, executing the
//! commands SeaBIOS and Linux send. Everything here is guest input: a CDB
//! of any length and content, and data buffers of any size, get a status
//! and sense data, never a panic, and no reply is longer than the guest's
//! allocation length or its buffer.

#[doc(hidden)]
pub mod fuzzing;
mod mmc;
mod sense;

use std::sync::Arc;

use rvirt_block::BlockBackend;

pub use sense::{Sense, FIXED_SENSE_LEN};

/// What kind of unit a LUN is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A direct-access block device (`sdX` in Linux), 512-byte blocks.
    Disk,
    /// A CD-ROM (`srX`), 2048-byte blocks, removable, possibly empty.
    Cdrom,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// GOOD.
    Good,
    /// CHECK CONDITION, with the sense data to return.
    CheckCondition(Sense),
}

/// The outcome of one command: its status and how many bytes of data-in
/// it produced (the rest of the buffer is the residual).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// GOOD or CHECK CONDITION.
    pub status: Status,
    /// Bytes written to the data-in buffer.
    pub data_in_len: usize,
}

impl Completion {
    fn good(n: usize) -> Self {
        Self { status: Status::Good, data_in_len: n }
    }
    fn check(s: Sense) -> Self {
        Self { status: Status::CheckCondition(s), data_in_len: 0 }
    }
}

/// Command result inside the unit: a sense on failure.
type CmdResult = Result<usize, Sense>;

/// Largest UNMAP parameter list read (8-byte header + 16-byte descriptors).
const MAX_UNMAP_LIST: usize = 8 + 16 * MAX_UNMAP_DESCRIPTORS;
/// UNMAP descriptors accepted per command (reported in the Block Limits VPD page).
pub const MAX_UNMAP_DESCRIPTORS: usize = 256;
/// Largest transfer of one READ or WRITE, in bytes (reported in Block Limits).
pub const MAX_TRANSFER_BYTES: u64 = 32 << 20;

const VENDOR: &[u8; 8] = b"RVIRT   ";
const REVISION: &[u8; 4] = b"1.0 ";

/// One logical unit.
pub struct Lun {
    kind: Kind,
    medium: Option<Arc<dyn BlockBackend>>,
    serial: String,
    /// A unit attention to report before anything else.
    attention: Option<Sense>,
    /// The sense of the last command that failed, for REQUEST SENSE: a
    /// driver that ignores autosense (SeaBIOS) asks for it after each
    /// CHECK CONDITION, and stops waiting for an empty drive only when it
    /// hears MEDIUM NOT PRESENT.
    last_sense: Option<Sense>,
    /// The guest locked the tray.
    prevent_removal: bool,
    /// The tray is open (only meaningful without a medium).
    tray_open: bool,
    /// A media event for GET EVENT STATUS NOTIFICATION (MMC: 2 new media, 3 removal).
    media_event: u8,
}

impl Lun {
    /// A disk over `image`.
    pub fn disk(image: Arc<dyn BlockBackend>, serial: &str) -> Self {
        Self::new(Kind::Disk, Some(image), serial)
    }

    /// A CD-ROM drive, with `image` as its disc or empty.
    pub fn cdrom(image: Option<Arc<dyn BlockBackend>>, serial: &str) -> Self {
        Self::new(Kind::Cdrom, image, serial)
    }

    fn new(kind: Kind, medium: Option<Arc<dyn BlockBackend>>, serial: &str) -> Self {
        let serial: String = serial.chars().filter(|c| c.is_ascii_graphic()).take(20).collect();
        Self {
            kind,
            medium,
            serial,
            attention: Some(Sense::POWER_ON_RESET),
            last_sense: None,
            prevent_removal: false,
            tray_open: false,
            media_event: 0,
        }
    }

    /// Disk or CD-ROM.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The medium's image, when there is one.
    pub fn medium(&self) -> Option<&Arc<dyn BlockBackend>> {
        self.medium.as_ref()
    }

    /// Bytes per logical block.
    pub fn block_size(&self) -> u64 {
        match self.kind {
            Kind::Disk => 512,
            Kind::Cdrom => 2048,
        }
    }

    /// Blocks on the medium (0 without one).
    pub fn blocks(&self) -> u64 {
        self.medium.as_ref().map_or(0, |m| m.size() / self.block_size())
    }

    /// Host-side eject (`change-media --eject`): refused while the guest
    /// holds the tray locked, unless `force`.
    pub fn eject(&mut self, force: bool) -> Result<(), &'static str> {
        if self.kind != Kind::Cdrom {
            return Err("only a CD-ROM drive has removable media");
        }
        if self.prevent_removal && !force {
            // As a drive's eject button does: the guest hears an eject
            // request (a media event) and may unlock and eject itself.
            self.media_event = 1;
            return Err("the guest has locked the tray (asked it to eject; try again, or force)");
        }
        if self.medium.take().is_some() {
            self.media_event = 3;
            self.attention = Some(Sense::MEDIUM_CHANGED);
        }
        Ok(())
    }

    /// Host-side insert (`change-media --insert`): a new disc, which the
    /// guest learns of through a unit attention and a media event.
    pub fn insert(&mut self, image: Arc<dyn BlockBackend>) -> Result<(), &'static str> {
        if self.kind != Kind::Cdrom {
            return Err("only a CD-ROM drive has removable media");
        }
        self.medium = Some(image);
        self.tray_open = false;
        self.media_event = 2;
        self.attention = Some(Sense::MEDIUM_CHANGED);
        Ok(())
    }

    /// Executes one command. `data_out` is what the guest sent (WRITE data,
    /// parameter lists), `data_in` where replies go.
    pub fn execute(&mut self, cdb: &[u8], data_out: &[&[u8]], data_in: &mut [&mut [u8]]) -> Completion {
        let Some(&op) = cdb.first() else { return Completion::check(Sense::INVALID_FIELD) };
        if cdb.len() < cdb_len(op) {
            return Completion::check(Sense::INVALID_FIELD);
        }
        // INQUIRY, REPORT LUNS and REQUEST SENSE are answered even with a
        // unit attention pending; anything else reports it first.
        let result = match self.attention {
            Some(ua) if !matches!(op, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE | op::GET_EVENT_STATUS) => {
                self.attention = None;
                Err(ua)
            }
            _ => self.dispatch(op, cdb, data_out, data_in),
        };
        match result {
            Ok(n) => {
                if op != op::REQUEST_SENSE {
                    self.last_sense = None;
                }
                Completion::good(n)
            }
            Err(s) => {
                self.last_sense = Some(s);
                Completion::check(s)
            }
        }
    }

    fn dispatch(&mut self, op: u8, cdb: &[u8], data_out: &[&[u8]], data_in: &mut [&mut [u8]]) -> CmdResult {
        match op {
            op::TEST_UNIT_READY => self.ready().map(|_| 0),
            op::REQUEST_SENSE => {
                let sense = self.attention.take().or(self.last_sense.take()).unwrap_or(Sense::NO_SENSE);
                Ok(reply(data_in, &sense.fixed(), usize::from(cdb[4])))
            }
            op::INQUIRY => self.inquiry(cdb, data_in),
            op::REPORT_LUNS => {
                let alloc = be32(&cdb[6..10]) as usize;
                // One LUN, 0: list length 8, then its 8-byte entry.
                let mut r = vec![0u8; 16];
                r[3] = 8;
                Ok(reply(data_in, &r, alloc))
            }
            op::READ_CAPACITY_10 => {
                let last = self.ready()?.saturating_sub(1);
                let mut r = [0u8; 8];
                r[..4].copy_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
                r[4..].copy_from_slice(&(self.block_size() as u32).to_be_bytes());
                Ok(reply(data_in, &r, 8))
            }
            op::SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == 0x10 => {
                let last = self.ready()?.saturating_sub(1);
                let mut r = [0u8; 32];
                r[..8].copy_from_slice(&last.to_be_bytes());
                r[8..12].copy_from_slice(&(self.block_size() as u32).to_be_bytes());
                if self.kind == Kind::Disk && !self.read_only() {
                    r[14] = 0x80; // LBPME: UNMAP works
                }
                Ok(reply(data_in, &r, be32(&cdb[10..14]) as usize))
            }
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => {
                let (lba, blocks) = rw_fields(cdb);
                self.read(lba, blocks, data_in)
            }
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
                let (lba, blocks) = rw_fields(cdb);
                self.write(lba, blocks, data_out)
            }
            op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => {
                self.ready()?;
                let m = self.medium.as_ref().ok_or(Sense::NO_MEDIUM_TRAY_CLOSED)?;
                m.flush().map_err(|e| io_error("flush", e, Sense::WRITE_ERROR))?;
                Ok(0)
            }
            op::UNMAP => self.unmap(cdb, data_out),
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => self.mode_sense(op, cdb, data_in),
            op::PREVENT_ALLOW_MEDIUM_REMOVAL => {
                self.prevent_removal = cdb[4] & 0x03 != 0;
                Ok(0)
            }
            op::START_STOP_UNIT => self.start_stop(cdb),
            op::READ_TOC | op::READ_DISC_INFORMATION | op::GET_CONFIGURATION | op::GET_EVENT_STATUS | op::MECHANISM_STATUS => {
                mmc::execute(self, op, cdb, data_in)
            }
            _ => Err(Sense::INVALID_OPCODE),
        }
    }

    fn read_only(&self) -> bool {
        self.kind == Kind::Cdrom || self.medium.as_ref().is_none_or(|m| m.is_read_only())
    }

    /// Blocks on the medium, or NOT READY without one.
    fn ready(&self) -> Result<u64, Sense> {
        match &self.medium {
            Some(_) => Ok(self.blocks()),
            None if self.tray_open => Err(Sense::NO_MEDIUM_TRAY_OPEN),
            None => Err(Sense::NO_MEDIUM_TRAY_CLOSED),
        }
    }

    /// Checks `blocks` at `lba` against the medium and the transfer limit;
    /// returns (byte offset, byte length).
    fn extent(&self, lba: u64, blocks: u64) -> Result<(u64, u64), Sense> {
        let total = self.ready()?;
        match lba.checked_add(blocks) {
            Some(end) if end <= total => {}
            _ => return Err(Sense::LBA_OUT_OF_RANGE),
        }
        let len = blocks * self.block_size();
        if len > MAX_TRANSFER_BYTES {
            return Err(Sense::INVALID_FIELD);
        }
        Ok((lba * self.block_size(), len))
    }

    fn read(&mut self, lba: u64, blocks: u64, data_in: &mut [&mut [u8]]) -> CmdResult {
        let (offset, len) = self.extent(lba, blocks)?;
        let len = len as usize;
        if total_len_mut(data_in) < len {
            return Err(Sense::INVALID_FIELD);
        }
        let Some(m) = self.medium.clone() else { return Err(Sense::NO_MEDIUM_TRAY_CLOSED) };
        let mut bufs = carve_mut(data_in, len);
        m.read_vectored_at(&mut bufs, offset).map_err(|e| io_error("read", e, Sense::READ_ERROR))?;
        Ok(len)
    }

    fn write(&mut self, lba: u64, blocks: u64, data_out: &[&[u8]]) -> CmdResult {
        let (offset, len) = self.extent(lba, blocks)?;
        if self.read_only() {
            return Err(Sense::WRITE_PROTECTED);
        }
        let len = len as usize;
        if data_out.iter().map(|b| b.len()).sum::<usize>() < len {
            return Err(Sense::INVALID_FIELD);
        }
        let Some(m) = self.medium.clone() else { return Err(Sense::NO_MEDIUM_TRAY_CLOSED) };
        let bufs = carve(data_out, len);
        m.write_vectored_at(&bufs, offset).map_err(|e| io_error("write", e, Sense::WRITE_ERROR))?;
        Ok(0)
    }

    fn unmap(&mut self, cdb: &[u8], data_out: &[&[u8]]) -> CmdResult {
        if self.kind != Kind::Disk {
            return Err(Sense::INVALID_OPCODE);
        }
        if self.read_only() {
            return Err(Sense::WRITE_PROTECTED);
        }
        let list_len = usize::from(be16(&cdb[7..9]));
        if list_len == 0 {
            return Ok(0);
        }
        if !(8..=MAX_UNMAP_LIST).contains(&list_len) {
            return Err(Sense::INVALID_FIELD);
        }
        let list = gather(data_out, list_len);
        if list.len() < list_len {
            return Err(Sense::PARAMETER_LIST_LENGTH);
        }
        let descriptors = usize::from(be16(&list[2..4])) / 16;
        if 8 + descriptors * 16 > list.len() {
            return Err(Sense::INVALID_PARAMETER);
        }
        let Some(m) = self.medium.clone() else { return Err(Sense::NO_MEDIUM_TRAY_CLOSED) };
        for d in list[8..8 + descriptors * 16].chunks_exact(16) {
            let lba = u64::from_be_bytes(d[0..8].try_into().unwrap_or([0; 8]));
            let blocks = u64::from(be32(&d[8..12]));
            let total = self.blocks();
            match lba.checked_add(blocks) {
                Some(end) if end <= total => {}
                _ => return Err(Sense::LBA_OUT_OF_RANGE),
            }
            if blocks > 0 {
                m.discard(lba * self.block_size(), blocks * self.block_size()).map_err(|e| io_error("discard", e, Sense::WRITE_ERROR))?;
            }
        }
        Ok(0)
    }

    fn start_stop(&mut self, cdb: &[u8]) -> CmdResult {
        let (load_eject, start) = (cdb[4] & 0x02 != 0, cdb[4] & 0x01 != 0);
        if !load_eject || self.kind != Kind::Cdrom {
            return Ok(0);
        }
        if start {
            self.tray_open = false;
        } else {
            if self.prevent_removal {
                return Err(Sense::REMOVAL_PREVENTED);
            }
            if self.medium.take().is_some() {
                self.media_event = 3;
            }
            self.tray_open = true;
        }
        Ok(0)
    }

    fn inquiry(&self, cdb: &[u8], data_in: &mut [&mut [u8]]) -> CmdResult {
        let alloc = usize::from(be16(&cdb[3..5]));
        let evpd = cdb[1] & 0x01 != 0;
        let page = cdb[2];
        let ptype = match self.kind {
            Kind::Disk => 0x00,
            Kind::Cdrom => 0x05,
        };
        if !evpd {
            if page != 0 {
                return Err(Sense::INVALID_FIELD);
            }
            let mut r = vec![0u8; 36];
            r[0] = ptype;
            r[1] = if self.kind == Kind::Cdrom { 0x80 } else { 0 }; // RMB
            r[2] = 0x05; // SPC-3
            r[3] = 0x02; // response data format 2
            r[4] = (r.len() - 5) as u8;
            r[7] = 0x02; // CMDQUE
            r[8..16].copy_from_slice(VENDOR);
            let product: &[u8; 16] = match self.kind {
                Kind::Disk => b"VIRTUAL DISK    ",
                Kind::Cdrom => b"VIRTUAL CD-ROM  ",
            };
            r[16..32].copy_from_slice(product);
            r[32..36].copy_from_slice(REVISION);
            return Ok(reply(data_in, &r, alloc));
        }
        let mut pages = vec![0x00, 0x80, 0x83];
        if self.kind == Kind::Disk {
            pages.extend([0xb0, 0xb2]);
        }
        let body: Vec<u8> = match page {
            0x00 => pages.clone(),
            0x80 => self.serial.as_bytes().to_vec(),
            0x83 => {
                // One T10 vendor-ID designator: vendor, then the serial (or "rvirt").
                let id = if self.serial.is_empty() { "rvirt" } else { &self.serial };
                let mut d = vec![0x02, 0x01, 0x00, (8 + id.len()) as u8];
                d.extend_from_slice(VENDOR);
                d.extend_from_slice(id.as_bytes());
                d
            }
            0xb0 if self.kind == Kind::Disk => {
                let mut b = vec![0u8; 60];
                let max_blocks = (MAX_TRANSFER_BYTES / self.block_size()) as u32;
                b[4..8].copy_from_slice(&max_blocks.to_be_bytes()); // maximum transfer length
                b[16..20].copy_from_slice(&u32::MAX.to_be_bytes()); // maximum UNMAP LBA count
                b[20..24].copy_from_slice(&(MAX_UNMAP_DESCRIPTORS as u32).to_be_bytes());
                b[24..28].copy_from_slice(&8u32.to_be_bytes()); // optimal unmap granularity: 4 KiB
                b
            }
            0xb2 if self.kind == Kind::Disk => {
                // LBPU: UNMAP discards (when the disk is writable); no threshold.
                vec![0x00, if self.read_only() { 0x00 } else { 0x80 }, 0x00, 0x00]
            }
            _ => return Err(Sense::INVALID_FIELD),
        };
        let mut r = vec![ptype, page];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend(body);
        Ok(reply(data_in, &r, alloc))
    }

    fn mode_sense(&self, op: u8, cdb: &[u8], data_in: &mut [&mut [u8]]) -> CmdResult {
        let page = cdb[2] & 0x3f;
        let control = cdb[2] >> 6;
        if control == 1 {
            // Changeable values: nothing is changeable; the same pages with zeros would do,
            // but no guest rvirt serves asks for them.
            return Err(Sense::INVALID_FIELD);
        }
        let mut pages = Vec::new();
        if matches!(page, 0x08 | 0x3f) {
            // Caching: write cache enabled (WCE), as the image is written back.
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 18;
            p[2] = 0x04;
            pages.extend(p);
        }
        if matches!(page, 0x2a | 0x3f) && self.kind == Kind::Cdrom {
            pages.extend(mmc::capabilities_page());
        }
        if pages.is_empty() {
            return Err(Sense::INVALID_FIELD);
        }
        let wp = if self.read_only() { 0x80 } else { 0 };
        let r = if op == op::MODE_SENSE_6 {
            let mut r = vec![(3 + pages.len()).min(255) as u8, 0, wp, 0];
            r.extend(pages);
            r.truncate(256);
            return Ok(reply(data_in, &r, usize::from(cdb[4])));
        } else {
            let mut r = vec![0u8; 8];
            r[0..2].copy_from_slice(&((6 + pages.len()) as u16).to_be_bytes());
            r[3] = wp;
            r.extend(pages);
            r
        };
        Ok(reply(data_in, &r, usize::from(be16(&cdb[7..9]))))
    }
}

/// Opcodes.
mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const UNMAP: u8 = 0x42;
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS: u8 = 0x4a;
    pub const READ_DISC_INFORMATION: u8 = 0x51;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const MECHANISM_STATUS: u8 = 0xbd;
}

/// The CDB length an opcode's group implies (SPC-4 4.2.5.1).
fn cdb_len(op: u8) -> usize {
    match op >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 6,
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// (LBA, blocks) of a READ or WRITE of any size (the CDB length is checked).
fn rw_fields(cdb: &[u8]) -> (u64, u64) {
    match cdb[0] >> 5 {
        // READ(6)/WRITE(6): 21-bit LBA, 0 blocks means 256.
        0 => {
            let lba = u64::from(u32::from_be_bytes([0, cdb[1] & 0x1f, cdb[2], cdb[3]]));
            let n = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            (lba, n)
        }
        1 => (u64::from(be32(&cdb[2..6])), u64::from(be16(&cdb[7..9]))),
        5 => (u64::from(be32(&cdb[2..6])), u64::from(be32(&cdb[6..10]))),
        _ => (u64::from_be_bytes(cdb[2..10].try_into().unwrap_or([0; 8])), u64::from(be32(&cdb[10..14]))),
    }
}

fn total_len_mut(bufs: &[&mut [u8]]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// The first `len` bytes of `bufs` as slices.
fn carve_mut<'a>(bufs: &'a mut [&mut [u8]], len: usize) -> Vec<&'a mut [u8]> {
    let mut left = len;
    let mut out = Vec::new();
    for b in bufs.iter_mut() {
        if left == 0 {
            break;
        }
        let n = b.len().min(left);
        out.push(&mut b[..n]);
        left -= n;
    }
    out
}

fn carve<'a>(bufs: &[&'a [u8]], len: usize) -> Vec<&'a [u8]> {
    let mut left = len;
    let mut out = Vec::new();
    for b in bufs {
        if left == 0 {
            break;
        }
        let n = b.len().min(left);
        out.push(&b[..n]);
        left -= n;
    }
    out
}

/// Up to `len` bytes of `bufs`, copied.
fn gather(bufs: &[&[u8]], len: usize) -> Vec<u8> {
    carve(bufs, len).concat()
}

/// Copies `data`, cut to the allocation length, into `data_in`; returns
/// the bytes copied.
fn reply(data_in: &mut [&mut [u8]], data: &[u8], alloc: usize) -> usize {
    let mut src = &data[..data.len().min(alloc)];
    let mut n = 0;
    for b in data_in.iter_mut() {
        if src.is_empty() {
            break;
        }
        let k = b.len().min(src.len());
        b[..k].copy_from_slice(&src[..k]);
        src = &src[k..];
        n += k;
    }
    n
}

fn io_error(what: &str, e: rvirt_block::Error, sense: Sense) -> Sense {
    tracing::warn!("scsi: {what} failed: {e}");
    sense
}

#[cfg(test)]
mod tests;
