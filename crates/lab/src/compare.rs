//! The two VMMs the lab's comparisons run side by side, spelled once:
//! rvirt-vmm, and QEMU's microvm as the reference, on the same kernel and
//! initramfs with 2 vCPUs and 512 MiB. A comparison is only fair while both
//! keep the same shape, so benchmarks and examples take them from here.
//!
//! Each command line ends with the guest's kernel command line, which is
//! `$CMD` in the L1 script; device options follow.

use anyhow::{Context, Result};

use crate::{L1Spec, Lab};

/// rvirt-vmm booting `/l2/vmlinuz` with `/l2/initrd.gz`.
pub const RVIRT_L2: &str = "rvirt-vmm --kernel /l2/vmlinuz --initrd /l2/initrd.gz --cpus 2 --memory 512M --cmdline \"$CMD\"";

/// QEMU's microvm with PCIe, booting the same kernel and initramfs.
pub const QEMU_L2: &str = "qemu-system-x86_64 -M microvm,pcie=on,accel=kvm -cpu host -bios /usr/share/qemu/bios-microvm.bin \
                           -smp 2 -m 512M -no-reboot -nographic -kernel /l2/vmlinuz -initrd /l2/initrd.gz -append \"$CMD\"";

/// rvirt's virtio-blk on `/tmp/disk.raw`.
pub const RVIRT_DISK: &str = "--disk path=/tmp/disk.raw";

/// QEMU's virtio-blk-pci on `/tmp/disk.raw` (its default page-cache mode, as rvirt's).
pub const QEMU_DISK: &str = "-drive file=/tmp/disk.raw,format=raw,if=none,id=d0 -device virtio-blk-pci,drive=d0";

/// rvirt's virtio-scsi with `/tmp/disk.raw` as its disk.
pub const RVIRT_SCSI: &str = "--disk path=/tmp/disk.raw,bus=scsi";

/// QEMU's virtio-scsi-pci with `/tmp/disk.raw` as a scsi-hd (page-cache mode, as rvirt's).
pub const QEMU_SCSI: &str =
    "-drive file=/tmp/disk.raw,format=raw,if=none,id=d0 -device virtio-scsi-pci,id=scsi0 -device scsi-hd,drive=d0,bus=scsi0.0";

/// rvirt's virtio-net on `tap0`.
pub const RVIRT_NET: &str = "--net tap=tap0";

/// QEMU's virtio-net-pci on `tap0`, packets moved in user space as rvirt does (`vhost=off`).
pub const QEMU_NET: &str = "-netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off -device virtio-net-pci,netdev=n0,romfile=";

/// Replaces the words `RVIRT_L2`, `QEMU_L2`, `RVIRT_DISK`, `QEMU_DISK`,
/// `RVIRT_SCSI`, `QEMU_SCSI`, `RVIRT_NET` and `QEMU_NET` in an L1 script
/// with the options above.
pub fn expand(script: &str) -> String {
    [
        ("RVIRT_L2", RVIRT_L2),
        ("QEMU_L2", QEMU_L2),
        ("RVIRT_DISK", RVIRT_DISK),
        ("QEMU_DISK", QEMU_DISK),
        ("RVIRT_SCSI", RVIRT_SCSI),
        ("QEMU_SCSI", QEMU_SCSI),
        ("RVIRT_NET", RVIRT_NET),
        ("QEMU_NET", QEMU_NET),
    ]
        .iter()
        .fold(script.to_string(), |s, (word, text)| s.replace(word, text))
}

impl L1Spec {
    /// Adds what both VMMs need in L1: the L2 kernel, QEMU and its microvm firmware.
    pub fn with_both_vmms(self, lab: &Lab) -> Result<Self> {
        let bios = std::fs::canonicalize("/usr/share/qemu/bios-microvm.bin").context("QEMU's microvm firmware")?;
        Ok(self
            .file(&lab.kernel, "l2/vmlinuz")
            .file(bios, "usr/share/qemu/bios-microvm.bin")
            .binary("/usr/bin/qemu-system-x86_64", "usr/bin/qemu-system-x86_64"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_each_word_and_leaves_the_rest() {
        let s = expand("bench RVIRT disk 1 RVIRT_L2 RVIRT_DISK\nQEMU_L2 QEMU_NET\n");
        assert_eq!(s, format!("bench RVIRT disk 1 {RVIRT_L2} {RVIRT_DISK}\n{QEMU_L2} {QEMU_NET}\n"));
        assert!(!QEMU_L2.contains("  "), "the line continuation must not leave runs of spaces");
    }
}
