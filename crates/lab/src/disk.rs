//! Bootable disk images as users' VMs have them, made from Debian packages:
//! an MBR partition table with SYSLINUX's boot code, a FAT boot partition
//! holding SYSLINUX, the kernel and an initramfs, and an ext4 root
//! filesystem with busybox and the guest's `/sbin/init`. Firmware tests boot
//! these through SeaBIOS exactly as a disk from an installer would boot.
//!
//! Needs `syslinux`, `syslinux-common`, `mtools`, `dosfstools` and
//! `e2fsprogs` (crates/lab/setup.sh installs them); no mounts, no root.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{insmod_lines, l2_initramfs, tempdir, Initramfs, Lab};

/// SYSLINUX's MBR boot code: boots the active partition.
const SYSLINUX_MBR: &str = "/usr/lib/syslinux/mbr/mbr.bin";
/// The first partition starts at 1 MiB, as partitioning tools place it.
const FIRST_LBA: u64 = 2048;
const SECTOR: u64 = 512;

/// The description of one bootable disk.
pub struct BootDisk {
    /// The kernel SYSLINUX loads (Debian's bzImage).
    pub kernel: PathBuf,
    /// Kernel modules the initramfs loads before it looks for the root
    /// filesystem (virtio_pci and virtio_blk are modules in Debian's kernel).
    pub modules: Vec<PathBuf>,
    /// The root filesystem's label; the kernel command line names it.
    pub root_label: String,
    /// Extra kernel command-line words after `console=ttyS0 root=LABEL=…`.
    pub append: String,
    /// The root filesystem's `/sbin/init` (busybox shell).
    pub init: String,
    /// The MBR disk signature (distinct per disk, as tools make them).
    pub signature: u32,
}

/// The initramfs init: loads the modules, finds the root filesystem by the
/// label on the command line (as Debian's initramfs-tools does), mounts it
/// and hands over to its `/sbin/init`.
const INITRAMFS_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
INSMOD
label=$(sed -n 's/.*root=LABEL=\([^ ]*\).*/\1/p' /proc/cmdline)
dev=
for i in $(seq 1 100); do dev=$(findfs "LABEL=$label" 2>/dev/null) && break; sleep 0.1; done
[ -n "$dev" ] || { echo "@@L2-ROOT-NOT-FOUND=$label"; poweroff -f; }
mkdir -p /newroot
mount -t ext4 -o rw "$dev" /newroot || { echo "@@L2-ROOT-MOUNT-FAILED=$dev"; poweroff -f; }
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"#;

impl BootDisk {
    /// Writes the disk image to `out` (raw).
    pub fn write(&self, out: &Path) -> Result<()> {
        let work = tempdir("bootdisk")?;
        let result = self.write_in(&work, out);
        let _ = std::fs::remove_dir_all(&work);
        result
    }

    fn write_in(&self, work: &Path, out: &Path) -> Result<()> {
        let init = INITRAMFS_INIT.replace("INSMOD\n", &insmod_lines(&self.modules));
        let initrd = l2_initramfs(&init, &self.modules)?;
        let initrd_path = work.join("initrd.gz");
        std::fs::write(&initrd_path, &initrd)?;

        // The boot partition: FAT16 with the kernel, the initramfs, SYSLINUX
        // and its configuration (serial console first, no menu, no wait).
        let payload = std::fs::metadata(&self.kernel)?.len() + initrd.len() as u64;
        let boot_mib = (payload >> 20) + 8;
        let boot = work.join("boot.img");
        run(Command::new("mkfs.fat")
            .args(["-F", "16", "-n", "BOOT", "-h", &FIRST_LBA.to_string(), "-C"])
            .arg(&boot)
            .arg((boot_mib * 1024).to_string()))?;
        let cfg = work.join("syslinux.cfg");
        std::fs::write(
            &cfg,
            format!(
                "SERIAL 0 115200\nCONSOLE 0\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\n\
                 LABEL linux\n  KERNEL /vmlinuz\n  INITRD /initrd.gz\n  \
                 APPEND console=ttyS0 root=LABEL={} panic=-1 {}\n",
                self.root_label, self.append
            ),
        )?;
        for (src, name) in [(self.kernel.as_path(), "vmlinuz"), (initrd_path.as_path(), "initrd.gz"), (cfg.as_path(), "syslinux.cfg")] {
            run(Command::new("mcopy").arg("-i").arg(&boot).arg(src).arg(format!("::{name}")))?;
        }
        run(Command::new("syslinux").arg("--install").arg(&boot))?;

        // The root filesystem: busybox, the init, the usual mount points.
        let tree = work.join("root");
        let mut root = Initramfs::new(&tree)?;
        root.add_busybox()?;
        root.add_bytes(self.init.as_bytes(), "sbin/init", 0o755)?;
        let root_img = work.join("root.img");
        run(Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", &self.root_label, "-d"])
            .arg(&tree)
            .arg(&root_img)
            .arg("16M"))?;

        let boot_len = std::fs::metadata(&boot)?.len();
        let root_len = std::fs::metadata(&root_img)?.len();
        let boot_sectors = boot_len / SECTOR;
        let root_lba = FIRST_LBA + boot_sectors.div_ceil(FIRST_LBA) * FIRST_LBA;
        let root_sectors = root_len / SECTOR;
        let mbr_code = std::fs::read(SYSLINUX_MBR).with_context(|| format!("{SYSLINUX_MBR} (package syslinux-common)"))?;
        let mbr = mbr(&mbr_code, self.signature, &[
            Partition { active: true, kind: 0x0e, lba: FIRST_LBA, sectors: boot_sectors },
            Partition { active: false, kind: 0x83, lba: root_lba, sectors: root_sectors },
        ])?;

        let f = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        f.set_len((root_lba + root_sectors) * SECTOR + (1 << 20))?;
        use std::os::unix::fs::FileExt;
        f.write_all_at(&mbr, 0)?;
        f.write_all_at(&std::fs::read(&boot)?, FIRST_LBA * SECTOR)?;
        f.write_all_at(&std::fs::read(&root_img)?, root_lba * SECTOR)?;
        f.sync_all()?;
        Ok(())
    }
}

/// One MBR partition entry.
struct Partition {
    active: bool,
    kind: u8,
    lba: u64,
    sectors: u64,
}

/// The first sector: boot code, disk signature, four entries, 0x55AA.
/// CHS fields hold the "use LBA" maximum, as tools write for large disks.
fn mbr(code: &[u8], signature: u32, parts: &[Partition]) -> Result<Vec<u8>> {
    if code.len() > 440 || parts.len() > 4 {
        bail!("MBR boot code of {} bytes or {} partitions do not fit", code.len(), parts.len());
    }
    let mut s = vec![0u8; 512];
    s[..code.len()].copy_from_slice(code);
    s[440..444].copy_from_slice(&signature.to_le_bytes());
    for (i, p) in parts.iter().enumerate() {
        let e = &mut s[446 + i * 16..462 + i * 16];
        e[0] = if p.active { 0x80 } else { 0 };
        e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[4] = p.kind;
        e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[8..12].copy_from_slice(&u32::try_from(p.lba)?.to_le_bytes());
        e[12..16].copy_from_slice(&u32::try_from(p.sectors)?.to_le_bytes());
    }
    s[510] = 0x55;
    s[511] = 0xaa;
    Ok(s)
}

/// Runs a tool and names it, with its error output, when it fails.
fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{:?} failed ({}): {}", cmd, out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Lab {
    /// A bootable disk with Debian's kernel (virtio_pci, virtio_blk and the
    /// virtio-scsi stack in its initramfs, so it boots as `vda` or `sda`)
    /// and `init` as the root filesystem's `/sbin/init`.
    pub fn boot_disk(&self, root_label: &str, append: &str, init: &str, signature: u32) -> BootDisk {
        BootDisk {
            kernel: self.kernel.clone(),
            modules: self.virtio_modules(&["virtio_blk", "virtio_scsi"]),
            root_label: root_label.to_string(),
            append: append.to_string(),
            init: init.to_string(),
            signature,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mbr_carries_code_signature_and_lba_entries() {
        let code = vec![0xeb; 440];
        let s = mbr(&code, 0x1234_5678, &[
            Partition { active: true, kind: 0x0e, lba: 2048, sectors: 40960 },
            Partition { active: false, kind: 0x83, lba: 43008, sectors: 32768 },
        ])
        .unwrap();
        assert_eq!(&s[..440], &code[..]);
        assert_eq!(&s[440..444], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(s[446], 0x80);
        assert_eq!(s[450], 0x0e);
        assert_eq!(u32::from_le_bytes(s[454..458].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(s[458..462].try_into().unwrap()), 40960);
        assert_eq!(s[462], 0);
        assert_eq!(s[466], 0x83);
        assert_eq!(u32::from_le_bytes(s[470..474].try_into().unwrap()), 43008);
        assert_eq!(&s[478..510], &[0u8; 32][..]);
        assert_eq!(&s[510..], &[0x55, 0xaa]);
        assert!(mbr(&[0; 441], 0, &[]).is_err());
    }
}
