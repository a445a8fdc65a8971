//! The one-file form of a VM snapshot (a "saved VM"): what `virsh save`,
//! `managedsave` and a running domain's internal snapshot leave, written by
//! the VMM into a descriptor its manager opened and read back by
//! `rvirt-vmm --restore FILE`. The manager reads the note (the domain's
//! XML) without knowing anything else of the format.
//!
//! ```text
//! 0        header (64 bytes, written last: a file without it is no saved VM)
//! 64       note (UTF-8, the manager's)
//! ...      state (the VMM's versioned state file)
//! 4 KiB-aligned: memory (guest RAM, region after region, sparse), to the end
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;

/// The first bytes of a saved VM.
pub const MAGIC: [u8; 8] = *b"RVIRTSAV";
/// The layout's version; others are refused.
pub const VERSION: u32 = 1;
/// Bytes of the header.
pub const HEADER_LEN: u64 = 64;
/// Largest note accepted (the domain XML; libvirt's own limit is 10 MiB).
pub const MAX_NOTE: u64 = 10 << 20;
/// Largest state accepted (the VMM's own limit on its state file, with room).
pub const MAX_STATE: u64 = 80 << 20;
/// Memory starts on a page boundary, so it can be mapped.
pub const ALIGN: u64 = 4096;

/// Why a file is not a usable saved VM.
#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    /// Reading the file failed.
    #[error("reading the saved VM: {0}")]
    Io(#[from] std::io::Error),
    /// It is not one, or not one this version reads, or it is damaged.
    #[error("not a saved VM this version reads: {0}")]
    Format(String),
}

/// Where the parts of a saved VM lie, as byte offsets and lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of the note, at [`HEADER_LEN`].
    pub note_len: u64,
    /// Offset of the state.
    pub state_offset: u64,
    /// Bytes of the state.
    pub state_len: u64,
    /// Offset of the memory (a multiple of [`ALIGN`]).
    pub memory_offset: u64,
    /// Bytes of memory (the guest's RAM).
    pub memory_len: u64,
}

impl Layout {
    /// The layout for a note, a state and RAM of these sizes.
    pub fn plan(note_len: u64, state_len: u64, memory_len: u64) -> Self {
        let state_offset = HEADER_LEN + note_len;
        let memory_offset = (state_offset + state_len).div_ceil(ALIGN) * ALIGN;
        Self { note_len, state_offset, state_len, memory_offset, memory_len }
    }

    /// The header naming this layout.
    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        for (i, v) in [self.note_len, self.state_offset, self.state_len, self.memory_offset, self.memory_len].into_iter().enumerate() {
            h[16 + i * 8..24 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        h
    }

    /// Reads and checks the header of `file`: every part inside the file,
    /// in order, within its limit.
    pub fn read(file: &File) -> Result<Self, SavedError> {
        let len = file.metadata()?.len();
        let mut h = [0u8; HEADER_LEN as usize];
        if len < HEADER_LEN {
            return Err(SavedError::Format(format!("{len} bytes, shorter than a header")));
        }
        file.read_exact_at(&mut h, 0)?;
        if h[..8] != MAGIC {
            return Err(SavedError::Format("no saved-VM header (not one, or its save did not finish)".into()));
        }
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if version != VERSION {
            return Err(SavedError::Format(format!("version {version}; this one reads {VERSION}")));
        }
        let field = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[16 + i * 8..24 + i * 8]);
            u64::from_le_bytes(b)
        };
        let l = Self { note_len: field(0), state_offset: field(1), state_len: field(2), memory_offset: field(3), memory_len: field(4) };
        let bad = |why: &str| Err(SavedError::Format(why.to_string()));
        if l.note_len > MAX_NOTE || l.state_len > MAX_STATE {
            return bad("a part is larger than any saved VM's");
        }
        if l.state_offset != HEADER_LEN + l.note_len || l.memory_offset % ALIGN != 0 || l.memory_offset < l.state_offset + l.state_len {
            return bad("its parts overlap or are out of order");
        }
        if l.memory_offset.checked_add(l.memory_len) != Some(len) {
            return bad(&format!("{len} bytes, but its memory ends at {}", l.memory_offset.saturating_add(l.memory_len)));
        }
        Ok(l)
    }

    /// Reads the note (the manager's text).
    pub fn read_note(&self, file: &File) -> Result<String, SavedError> {
        let mut b = vec![0u8; self.note_len as usize];
        file.read_exact_at(&mut b, HEADER_LEN)?;
        String::from_utf8(b).map_err(|_| SavedError::Format("its note is not UTF-8".into()))
    }

    /// Reads the state (the VMM's).
    pub fn read_state(&self, file: &File) -> Result<Vec<u8>, SavedError> {
        let mut b = vec![0u8; self.state_len as usize];
        file.read_exact_at(&mut b, self.state_offset)?;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8], len: u64) -> File {
        let path = std::env::temp_dir().join(format!("rvirt-saved-{}-{}", std::process::id(), len));
        let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(bytes).unwrap();
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn a_layout_reads_back_and_damage_is_refused() {
        let l = Layout::plan(5, 100, 8192);
        assert_eq!((l.state_offset, l.memory_offset), (69, 4096));
        let mut bytes = l.encode().to_vec();
        bytes.extend_from_slice(b"<dom>");
        bytes.extend_from_slice(&[7u8; 100]);
        let f = file_with(&bytes, 4096 + 8192);
        let back = Layout::read(&f).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.read_note(&f).unwrap(), "<dom>");
        assert_eq!(back.read_state(&f).unwrap(), vec![7u8; 100]);
        // Truncated: the memory is not all there.
        let e = Layout::read(&file_with(&bytes, 4096 + 4096)).unwrap_err().to_string();
        assert!(e.contains("its memory ends at 12288"), "{e}");
        // No header (a save that did not finish leaves zeros there).
        let e = Layout::read(&file_with(&[0u8; 64], 4096)).unwrap_err().to_string();
        assert!(e.contains("no saved-VM header"), "{e}");
        let e = Layout::read(&file_with(b"RVIRT", 5)).unwrap_err().to_string();
        assert!(e.contains("shorter than a header"), "{e}");
        // A note that claims more than any could be.
        let mut huge = Layout::plan(MAX_NOTE + 1, 0, 0).encode().to_vec();
        huge.resize(64, 0);
        let e = Layout::read(&file_with(&huge, 1 << 20)).unwrap_err().to_string();
        assert!(e.contains("larger than any"), "{e}");
        // Memory that would overlap the state.
        let mut o = l;
        o.memory_offset = 0;
        let e = Layout::read(&file_with(&o.encode(), 8192)).unwrap_err().to_string();
        assert!(e.contains("overlap"), "{e}");
        let mut v = l.encode();
        v[8] = 9;
        let e = Layout::read(&file_with(&v, 4096 + 8192)).unwrap_err().to_string();
        assert!(e.contains("version 9"), "{e}");
    }
}
