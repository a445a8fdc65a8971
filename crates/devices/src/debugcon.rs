//! QEMU's debug console at port 0x402: where SeaBIOS writes its log.
//!
//! Reading the port returns 0xE9, which tells SeaBIOS the console is there.
//! Each line the firmware writes goes to the VMM log (info level, target
//! `firmware`); a failed boot ("No bootable device") is a warning, so it is
//! seen with the default log level. Lines are cut at [`MAX_LINE`] bytes and
//! go through the VMM's rate-limited log like any guest-triggered message.

/// The port SeaBIOS's QEMU build writes to.
pub const DEBUGCON_PORT: u64 = 0x402;
/// What a read returns: QEMU's "debug console present" answer.
pub const DEBUGCON_READBACK: u8 = 0xe9;
/// Longest line kept before it is logged anyway.
pub const MAX_LINE: usize = 256;

/// Firmware messages that mean the guest will not boot.
const BOOT_FAILURES: [&str; 2] = ["No bootable device", "Boot failed"];

/// The debug console: a line buffer in front of the log.
#[derive(Default)]
pub struct DebugCon {
    line: Vec<u8>,
    /// Every line logged, for the tests to read.
    #[cfg(test)]
    recorded: Vec<String>,
}

impl DebugCon {
    /// A console logging what the firmware writes.
    pub fn new() -> Self {
        Self::default()
    }

    fn flush(&mut self) {
        let text = String::from_utf8_lossy(&self.line).trim_end().to_string();
        self.line.clear();
        if text.is_empty() {
            return;
        }
        if BOOT_FAILURES.iter().any(|f| text.contains(f)) {
            tracing::warn!(target: "firmware", "{text}");
        } else {
            tracing::info!(target: "firmware", "{text}");
        }
        #[cfg(test)]
        self.recorded.push(text);
    }
}

impl crate::BusDevice for DebugCon {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(DEBUGCON_READBACK);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        for &b in data {
            if b == b'\n' || self.line.len() == MAX_LINE {
                self.flush();
            }
            if b != b'\n' && b != b'\r' {
                self.line.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;

    #[test]
    fn answers_e9_and_splits_lines_with_a_bound() {
        let mut c = DebugCon::new();
        let mut b = [0u8];
        c.read(0, &mut b);
        assert_eq!(b[0], 0xe9);
        for byte in b"SeaBIOS (version 1.16.2)\r\nNo bootable device.\n".iter().chain(&[b'x'; 600]) {
            c.write(0, &[*byte]);
        }
        let r = &c.recorded;
        assert_eq!(r[..2], ["SeaBIOS (version 1.16.2)".to_string(), "No bootable device.".to_string()]);
        assert_eq!(r.len(), 4, "600 bytes without a newline: two full lines logged, the rest kept");
        assert!(r[2..].iter().all(|l| l.len() == MAX_LINE));
    }
}
