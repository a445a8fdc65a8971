//! `<interface type='direct'>`: a macvtap interface on a host interface,
//! made by rvirtd when the domain starts (iproute2, as networks are) and
//! opened through its character device `/dev/tapN`, whose descriptor the
//! VMM gets like any tap's. Unlike a tap, a macvtap outlives its
//! descriptors, so rvirtd deletes it when the domain's VMM ends (or fails
//! to start, or ended while no daemon watched).

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use rvirt_domain::{DomainXml, InterfaceKind};

/// Runs `ip args`, returning an error with what it printed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("running ip: {e} (Debian package iproute2)"))?;
    if !out.status.success() {
        return Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// The index of interface `name` in the daemon's network namespace, if it
/// exists (asked of the kernel: /sys shows the namespace it was mounted in).
fn index_of(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Whether interface `name` is a macvtap (so rvirtd may delete it).
fn is_macvtap(name: &str) -> bool {
    Command::new("ip")
        .args(["-d", "-o", "link", "show", "dev", name])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).split_whitespace().any(|w| w == "macvtap"))
}

/// Makes macvtap `name` on host interface `dev` in `mode` with the card's
/// `mac`, brings it up and opens its character device with virtio-net
/// headers (a macvtap's default). An interface of that name already there
/// is refused, never taken over: it may be another VM's.
pub fn create_and_open(dev: &str, name: &str, mac: &str, mode: &str) -> Result<OwnedFd, String> {
    if index_of(dev).is_none() {
        return Err(format!("direct interface: host interface '{dev}' does not exist"));
    }
    if index_of(name).is_some() {
        let what = if is_macvtap(name) { "a macvtap (another VM's, or left over: ip link del it)" } else { "not a macvtap" };
        return Err(format!("direct interface: '{name}' already exists, {what}"));
    }
    ip(&["link", "add", "link", dev, "name", name, "address", mac, "type", "macvtap", "mode", mode]).map_err(|e| {
        if e.contains("Unknown device type") || e.contains("not supported") {
            format!("direct interface: this kernel has no macvtap (modprobe macvtap): {e}")
        } else {
            format!("direct interface on '{dev}': {e}")
        }
    })?;
    let opened = (|| {
        ip(&["link", "set", name, "up"])?;
        let index = index_of(name).ok_or_else(|| format!("macvtap '{name}' vanished as it was made"))?;
        let node = format!("/dev/tap{index}");
        // devtmpfs (or udev) makes the node as the interface appears.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(&node) {
                Ok(f) => return Ok(OwnedFd::from(f)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("macvtap '{name}': {node}: {e}")),
            }
        }
    })();
    if opened.is_err() {
        let _ = ip(&["link", "del", name]);
    }
    opened
}

/// Deletes the macvtaps named (those rvirtd made), if still there.
pub fn remove(names: &[&str]) {
    for name in names {
        if is_macvtap(name) {
            if let Err(e) = ip(&["link", "del", name]) {
                tracing::warn!("macvtap {name} was not removed: {e}");
            }
        }
    }
}

/// Deletes the macvtaps of `def`'s direct interfaces (`taps`: their names,
/// in interface order), made for a VMM that has ended or failed to start.
pub fn remove_for(def: &DomainXml, taps: &[String]) {
    let names: Vec<&str> = def.interfaces.iter().zip(taps).filter(|(i, _)| matches!(i.kind, InterfaceKind::Direct { .. })).map(|(_, t)| t.as_str()).collect();
    remove(&names);
}
