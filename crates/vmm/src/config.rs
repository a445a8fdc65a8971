//! What a VM is made of, as given on the command line, checked before any
//! resource is taken.

use std::path::PathBuf;

use crate::Error;

/// Where the guest's COM1 goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// The VMM's stdin/stdout (raw mode when stdin is a terminal).
    Stdio,
    /// Appended to a file; no input.
    File(PathBuf),
    /// A new pseudo-terminal; its path is printed on stderr.
    Pty,
    /// Discarded.
    Null,
}

impl std::str::FromStr for SerialMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "pty" => Ok(Self::Pty),
            "null" | "off" | "none" => Ok(Self::Null),
            _ => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(Error::Config(format!(
                    "invalid --serial '{s}': expected stdio, file=PATH, pty or null"
                ))),
            },
        }
    }
}

/// What a guest reboot does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnReboot {
    /// Reset the machine and boot the same kernel again.
    Restart,
    /// End the VMM with exit code 0.
    Exit,
}

impl std::str::FromStr for OnReboot {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "restart" => Ok(Self::Restart),
            "exit" => Ok(Self::Exit),
            _ => Err(Error::Config(format!("invalid --on-reboot '{s}': expected restart or exit"))),
        }
    }
}

/// Largest vCPU count: APIC IDs are 8-bit in the MADT entries we emit.
pub const MAX_VCPUS: u8 = 254;

/// A complete, validated description of one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image: bzImage or ELF vmlinux with a PVH note.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// COM1 backend.
    pub serial: SerialMode,
    /// Control API socket path.
    pub api_socket: Option<PathBuf>,
    /// Guest reboot behaviour.
    pub on_reboot: OnReboot,
}

/// The command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
            vcpus: 1,
            memory_bytes: 512 << 20,
            serial: SerialMode::Stdio,
            api_socket: None,
            on_reboot: OnReboot::Restart,
        }
    }

    /// Checks values that do not need the host: vCPU count, memory size,
    /// command line length.
    pub fn validate(&self) -> Result<(), Error> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!("--cpus must be between 1 and {MAX_VCPUS}")));
        }
        rvirt_arch::MemoryLayout::new(self.memory_bytes).map_err(|e| Error::Config(format!("--memory: {e}")))?;
        if self.cmdline.len() >= rvirt_arch::layout::CMDLINE_MAX_SIZE {
            return Err(Error::Config(format!(
                "--cmdline is {} bytes; the limit is {}",
                self.cmdline.len(),
                rvirt_arch::layout::CMDLINE_MAX_SIZE - 1
            )));
        }
        if self.cmdline.bytes().any(|b| b == 0) {
            return Err(Error::Config("--cmdline contains a NUL byte".into()));
        }
        Ok(())
    }
}

/// Parses a memory size the way QEMU does: a plain number is MiB; suffixes
/// `K`, `M`, `G`, `T` (optionally followed by `B` or `iB`) are binary units.
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let bad = || Error::Config(format!("invalid memory size '{s}': expected e.g. 512M, 2G or 1024 (MiB)"));
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit.strip_suffix("IB").or_else(|| unit.strip_suffix('B')).unwrap_or(&unit);
    let shift = match unit {
        "" | "M" => 20,
        "K" => 10,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("512").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096k").unwrap(), 4 << 20);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        for bad in ["", "M", "12X", "-1G", "1.5G", "99999999999999999999G", "18446744073709551615T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serial_modes() {
        assert_eq!("stdio".parse::<SerialMode>().unwrap(), SerialMode::Stdio);
        assert_eq!("file=/tmp/x".parse::<SerialMode>().unwrap(), SerialMode::File("/tmp/x".into()));
        assert_eq!("null".parse::<SerialMode>().unwrap(), SerialMode::Null);
        assert_eq!("pty".parse::<SerialMode>().unwrap(), SerialMode::Pty);
        assert!("file=".parse::<SerialMode>().is_err());
        assert!("tcp:1234".parse::<SerialMode>().unwrap_err().to_string().contains("tcp:1234"));
    }

    #[test]
    fn validation() {
        let mut c = VmConfig::new("/k");
        c.validate().unwrap();
        c.vcpus = 0;
        assert!(c.validate().unwrap_err().to_string().contains("--cpus"));
        c.vcpus = 2;
        c.memory_bytes = 1 << 20;
        assert!(c.validate().unwrap_err().to_string().contains("--memory"));
        c.memory_bytes = 64 << 20;
        c.cmdline = "x".repeat(70000);
        assert!(c.validate().unwrap_err().to_string().contains("--cmdline"));
        c.cmdline = "a\0b".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn on_reboot() {
        assert_eq!("exit".parse::<OnReboot>().unwrap(), OnReboot::Exit);
        assert!("halt".parse::<OnReboot>().is_err());
    }
}
