//! Sense data: why a command ended in CHECK CONDITION (SPC-4, fixed format).

/// A sense key with its additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    /// Sense key (0x2 NOT READY, 0x5 ILLEGAL REQUEST, 0x6 UNIT ATTENTION, ...).
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

/// Length of fixed-format sense data.
pub const FIXED_SENSE_LEN: usize = 18;

impl Sense {
    /// No sense: nothing to report (REQUEST SENSE with nothing pending).
    pub const NO_SENSE: Sense = Sense { key: 0x0, asc: 0x00, ascq: 0x00 };
    /// The opcode is not one this unit knows.
    pub const INVALID_OPCODE: Sense = Sense { key: 0x5, asc: 0x20, ascq: 0x00 };
    /// A field of the CDB is invalid (or the CDB is too short).
    pub const INVALID_FIELD: Sense = Sense { key: 0x5, asc: 0x24, ascq: 0x00 };
    /// A field of the parameter list (data-out) is invalid.
    pub const INVALID_PARAMETER: Sense = Sense { key: 0x5, asc: 0x26, ascq: 0x00 };
    /// The parameter list is shorter than the CDB says.
    pub const PARAMETER_LIST_LENGTH: Sense = Sense { key: 0x5, asc: 0x1a, ascq: 0x00 };
    /// An LBA past the end of the medium.
    pub const LBA_OUT_OF_RANGE: Sense = Sense { key: 0x5, asc: 0x21, ascq: 0x00 };
    /// The LUN does not exist.
    pub const LUN_NOT_SUPPORTED: Sense = Sense { key: 0x5, asc: 0x25, ascq: 0x00 };
    /// A command for a CD-ROM only (or a disk only) sent to the other.
    pub const INCOMPATIBLE_MEDIUM: Sense = Sense { key: 0x5, asc: 0x30, ascq: 0x02 };
    /// Eject refused: the guest locked the tray (PREVENT ALLOW MEDIUM REMOVAL).
    pub const REMOVAL_PREVENTED: Sense = Sense { key: 0x5, asc: 0x53, ascq: 0x02 };
    /// No disc, tray closed.
    pub const NO_MEDIUM_TRAY_CLOSED: Sense = Sense { key: 0x2, asc: 0x3a, ascq: 0x01 };
    /// No disc, tray open.
    pub const NO_MEDIUM_TRAY_OPEN: Sense = Sense { key: 0x2, asc: 0x3a, ascq: 0x02 };
    /// A new disc went in: the guest must re-read capacity and TOC.
    pub const MEDIUM_CHANGED: Sense = Sense { key: 0x6, asc: 0x28, ascq: 0x00 };
    /// The unit was reset or powered on (the first command after start).
    pub const POWER_ON_RESET: Sense = Sense { key: 0x6, asc: 0x29, ascq: 0x00 };
    /// The medium is write-protected.
    pub const WRITE_PROTECTED: Sense = Sense { key: 0x7, asc: 0x27, ascq: 0x00 };
    /// The image could not be read.
    pub const READ_ERROR: Sense = Sense { key: 0x3, asc: 0x11, ascq: 0x00 };
    /// The image could not be written.
    pub const WRITE_ERROR: Sense = Sense { key: 0x3, asc: 0x0c, ascq: 0x00 };

    /// Fixed-format sense data (response code 0x70, current error).
    pub fn fixed(self) -> [u8; FIXED_SENSE_LEN] {
        let mut s = [0u8; FIXED_SENSE_LEN];
        s[0] = 0x70;
        s[2] = self.key;
        s[7] = (FIXED_SENSE_LEN - 8) as u8;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }
}
