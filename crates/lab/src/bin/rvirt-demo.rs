//! `rvirt-demo`: sets up and boots a demo Linux VM under rvirt-vmm with an
//! interactive shell on its serial console.
//!
//! On a host with VT-x/AMD-V the VM runs directly on this host's /dev/kvm.
//! Otherwise (like the PVM hosts this project is developed on) it runs
//! inside the nested lab: QEMU TCG with emulated SVM, rvirt-vmm inside.
//! In both cases `poweroff` in the guest ends the demo.

use std::process::{Command, ExitCode};

use rvirt_lab::{l2_initramfs, L1Spec, Lab};

const GUEST_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo
echo "Welcome to an rvirt guest: $(uname -sr), $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB."
echo "Type 'poweroff -f' to end the demo."
exec setsid cttyhack sh -l
"#;

const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

fn host_has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm"))))
        .unwrap_or(false)
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rvirt-demo: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let lab = Lab::get()?;
    let initrd_bytes = l2_initramfs(GUEST_INIT, &[])?;
    if host_has_hw_virt() && std::path::Path::new("/dev/kvm").exists() {
        let initrd = lab.cache.join("demo-initrd.gz");
        std::fs::write(&initrd, initrd_bytes)?;
        eprintln!("rvirt-demo: booting Debian's kernel directly on this host's /dev/kvm");
        let st = Command::new(&lab.vmm)
            .arg("--kernel")
            .arg(&lab.kernel)
            .arg("--initrd")
            .arg(&initrd)
            .args(["--cpus", "2", "--memory", "512M", "--cmdline", CMDLINE])
            .status()?;
        return Ok(if st.success() { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    eprintln!("rvirt-demo: this host's CPU has no VT-x/AMD-V for stock kernels; using the nested lab");
    eprintln!("rvirt-demo: (QEMU TCG boots a KVM host, which runs rvirt-vmm; expect about a minute)");
    let script = format!(
        "exec rvirt-vmm --kernel /l2/vmlinuz --initrd /l2/initrd.gz --cpus 2 --memory 512M --cmdline '{CMDLINE}' </dev/console >/dev/console 2>&1\n"
    );
    let spec = L1Spec::new("demo", &script).file(&lab.kernel, "l2/vmlinuz").blob("l2/initrd.gz", initrd_bytes);
    lab.run_interactive(&spec)?;
    Ok(ExitCode::SUCCESS)
}
