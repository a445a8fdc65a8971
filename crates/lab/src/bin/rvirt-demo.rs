//! `rvirt-demo`: the whole stack on one screen. It builds a disk image with
//! its own bootloader from Debian packages (MBR, SYSLINUX, Debian's kernel,
//! an ext4 root; cached), starts rvirtd, defines and starts a domain from
//! that disk with `rvirt install --import` (it boots through SeaBIOS), and
//! attaches you to its serial console with `rvirt console`. Ctrl-] detaches
//! to a shell where the other rvirt commands work on it.
//!
//! On a host with VT-x/AMD-V this runs directly on this host's /dev/kvm.
//! Otherwise (like the PVM hosts this project is developed on) it runs
//! inside the nested lab: QEMU TCG with emulated SVM, the stack inside.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::Context;
use rvirt_lab::{L1Spec, Lab, SEABIOS};

/// The demo disk's `/sbin/init`: a greeting and a shell.
const GUEST_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
hostname demo
echo
echo "Welcome to an rvirt guest booted from its own disk: $(uname -sr), $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB, root on $(awk '$2 == "/" {print $1}' /proc/mounts)."
echo "Type 'poweroff -f' to power it off; Ctrl-] detaches the console."
exec setsid cttyhack sh -l
"#;

/// The demo itself, run by a shell with `rvirtd`, `rvirt` and the disk at
/// `$DISK`: the daemon, the domain, the console, then a shell.
const DEMO_SCRIPT: &str = r#"
rvirtd $RVIRTD_ARGS > "$STATE/rvirtd.log" 2>&1 &
for i in $(seq 1 100); do rvirt list >/dev/null 2>&1 && break; sleep 0.1; done
rvirt install --name demo --memory 512 --vcpus 2 --import --disk "path=$DISK" || exit 1
echo "rvirt-demo: rvirtd runs domain 'demo' from its disk (SeaBIOS, SYSLINUX, Debian's kernel); its console:"
rvirt console demo
echo
echo "rvirt-demo: detached. Try: rvirt list --all, rvirt dominfo demo, rvirt dumpxml demo, rvirt console demo."
echo "rvirt-demo: 'exit' ends the demo."
PS1='rvirt-demo$ ' sh
rvirt destroy demo >/dev/null 2>&1
kill $! 2>/dev/null
"#;

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

/// The demo disk, built once and cached beside the lab's kernel.
fn demo_disk(lab: &Lab) -> anyhow::Result<PathBuf> {
    let disk = lab.cache.join("demo-disk.raw");
    if !disk.exists() {
        eprintln!("rvirt-demo: building the demo disk (MBR, SYSLINUX, Debian's kernel, ext4 root)");
        let tmp = lab.cache.join("demo-disk.raw.new");
        lab.boot_disk("demo-root", "quiet", GUEST_INIT, 0xde30_0001).write(&tmp)?;
        std::fs::rename(&tmp, &disk)?;
    }
    Ok(disk)
}

fn run() -> anyhow::Result<ExitCode> {
    let lab = Lab::get()?;
    let disk = demo_disk(&lab)?;
    if host_has_hw_virt() && Path::new("/dev/kvm").exists() {
        eprintln!("rvirt-demo: running the stack directly on this host's /dev/kvm");
        let state = std::env::temp_dir().join(format!("rvirt-demo-{}", std::process::id()));
        std::fs::create_dir_all(&state)?;
        let copy = state.join("demo.raw");
        std::fs::copy(&disk, &copy).context("copying the demo disk")?;
        let bin = lab.vmm.parent().context("the binaries' directory")?;
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let socket = state.join("rvirtd.sock");
        let st = Command::new("sh")
            .arg("-c")
            .arg(DEMO_SCRIPT)
            .env("PATH", path)
            .env("STATE", &state)
            .env("DISK", &copy)
            .env("RVIRT_CONNECT", &socket)
            .env("RVIRTD_ARGS", format!("--state-dir {} --socket {} --allow-path {}", state.display(), socket.display(), state.display()))
            .status()?;
        let _ = std::fs::remove_dir_all(&state);
        return Ok(if st.success() { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    eprintln!("rvirt-demo: this host's CPU has no VT-x/AMD-V for stock kernels; using the nested lab");
    eprintln!("rvirt-demo: (QEMU TCG boots a KVM host, which runs rvirtd and the VM; expect about a minute)");
    let script = format!(
        // L1 kernel messages (its KVM reporting guest MSR writes) stay off the demo screen.
        "echo 1 > /proc/sys/kernel/printk\nmkdir -p /var/lib /run\nexport STATE=/tmp DISK=/l2/demo.raw RVIRTD_ARGS=\"--allow-path /l2\"\nsetsid cttyhack sh -c '{}'\n",
        DEMO_SCRIPT.replace('\'', r"'\''")
    );
    let spec = L1Spec::new("demo", &script)
        .file(&disk, "l2/demo.raw")
        .file(SEABIOS, &SEABIOS[1..])
        .binary(&lab.rvirtd, "bin/rvirtd")
        .binary(&lab.rvirt, "bin/rvirt");
    lab.run_interactive(&spec)?;
    Ok(ExitCode::SUCCESS)
}
