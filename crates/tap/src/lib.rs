//! Linux tap interfaces and bridges: the plumbing both the VMM (whose
//! virtio-net cards move frames through a tap) and rvirtd (which opens a
//! domain's taps itself and hands the VMM their descriptors) need.

use std::fs::{File, OpenOptions};
use std::io::{Error, ErrorKind};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The virtio-net header of virtio 1.x (with `num_buffers`) that every
/// frame through the tap carries.
pub const VNET_HDR_LEN: usize = 12;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETSNDBUF: libc::c_ulong = 0x4004_54d4;
/// Offload: the host may leave checksums to the receiver.
pub const TUN_F_CSUM: u32 = 0x01;
/// Offload: TCP segmentation over IPv4.
pub const TUN_F_TSO4: u32 = 0x02;
/// Offload: TCP segmentation over IPv6.
pub const TUN_F_TSO6: u32 = 0x04;
/// Offload: TSO with ECN.
pub const TUN_F_TSO_ECN: u32 = 0x08;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCGIFMTU: libc::c_ulong = 0x8921;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCGIFINDEX: libc::c_ulong = 0x8933;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// `struct ifreq` with its union as raw bytes (index, flags).
#[repr(C)]
struct IfReqData {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReqData {
    fn named(name: &str) -> Self {
        let mut r = Self { name: [0; 16], data: [0; 24] };
        let n = name.len().min(15);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }

    /// The union read as an `int` (`ifr_ifindex`, `ifr_mtu`).
    fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

/// A plain socket for interface ioctls.
fn if_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_ioctl(sock: &OwnedFd, request: libc::c_ulong, req: &mut IfReqData) -> std::io::Result<()> {
    // SAFETY: the interface ioctls used here read and write one ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut IfReqData) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A tap network interface opened with virtio-net headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// The MTU when the tap was opened.
    mtu: usize,
}

impl Tap {
    /// Opens tap `name`, creating it when it does not exist (which needs
    /// CAP_NET_ADMIN; an existing tap owned by the user does not).
    pub fn open(name: &str) -> std::io::Result<Self> {
        Self::from_fd(name, open_device(name)?)
    }

    /// Takes a tap someone else opened (rvirtd, for a jailed VMM): `fd` must
    /// be a tap device attached to interface `name` with virtio-net headers.
    pub fn from_fd(name: &str, fd: OwnedFd) -> std::io::Result<Self> {
        let file = File::from(fd);
        let mut req = IfReq { name: [0; 16], flags: 0, _pad: [0; 22] };
        // SAFETY: TUNGETIFF writes one ifreq we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF, &mut req) } < 0 {
            let e = Error::last_os_error();
            return Err(Error::new(ErrorKind::InvalidInput, format!("tap '{name}': the descriptor is not an attached tap ({e})")));
        }
        let attached = req.name.iter().position(|&b| b == 0).map_or(&req.name[..], |n| &req.name[..n]);
        if attached != name.as_bytes() {
            let got = String::from_utf8_lossy(attached);
            return Err(Error::new(ErrorKind::InvalidInput, format!("tap '{name}': the descriptor is attached to '{got}'")));
        }
        if req.flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) != IFF_TAP | IFF_NO_PI | IFF_VNET_HDR {
            return Err(Error::new(ErrorKind::InvalidInput, format!("tap '{name}': opened without tap mode, no_pi or virtio-net headers")));
        }
        // SAFETY: F_SETFL on a descriptor we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(Error::last_os_error());
        }
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(Error::last_os_error());
        }
        // Every frame written stays charged to the tap's socket until the
        // host's stack has taken it; with the default send buffer (about
        // 200 KiB) three 64 KiB TSO frames in flight make writes fail.
        // Unlimited, as QEMU's default; back-pressure is EAGAIN below.
        let sndbuf = libc::c_int::MAX;
        // SAFETY: TUNSETSNDBUF reads an int we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETSNDBUF, &sndbuf) } < 0 {
            return Err(Error::last_os_error());
        }
        // Read now: a jailed VMM lives in an empty network namespace and
        // can no longer ask about the interface by name.
        let mut req = IfReqData::named(name);
        let mtu = if_socket().and_then(|s| ifreq_ioctl(&s, SIOCGIFMTU, &mut req)).map(|()| req.int().max(0) as usize).unwrap_or(1500);
        Ok(Self { file, name: name.into(), mtu })
    }

    /// A stand-in tap over any socket (a socketpair end), with no interface
    /// behind it: for tests and fuzzers of what moves frames through a tap.
    pub fn stand_in(fd: OwnedFd, name: &str, mtu: usize) -> Self {
        Self { file: File::from(fd), name: name.into(), mtu }
    }

    /// Tells the network where a card with address `mac` now is (after a
    /// migration or a restore put it behind this tap): a broadcast RARP
    /// request from `mac`, as QEMU announces a moved guest, so bridges and
    /// switches learn its port before the guest says anything.
    pub fn announce(&self, mac: [u8; 6]) -> std::io::Result<()> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x80, 0x35]); // RARP
        f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]); // Ethernet, IPv4, reverse request
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0; 4]);
        f.resize(VNET_HDR_LEN + 60, 0);
        std::io::Write::write_all(&mut &self.file, &f)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds the tap to Linux bridge `bridge` and brings it up, as libvirt
    /// does for `<interface type='bridge'>` (needs CAP_NET_ADMIN).
    pub fn attach_to_bridge(&self, bridge: &str) -> std::io::Result<()> {
        if bridge.is_empty() || bridge.len() >= 16 || bridge.contains(['/', ' ', '\0']) {
            return Err(Error::new(ErrorKind::InvalidInput, format!("invalid bridge name '{bridge}'")));
        }
        let sock = if_socket()?;
        let ctx = |what: &str, e: Error| Error::new(e.kind(), format!("tap '{}' {what} bridge '{bridge}': {e}", self.name));
        let mut req = IfReqData::named(&self.name);
        ifreq_ioctl(&sock, SIOCGIFINDEX, &mut req).map_err(|e| ctx("(index) for", e))?;
        let index = req.int();
        let mut br = IfReqData::named(bridge);
        br.data[..4].copy_from_slice(&index.to_ne_bytes());
        ifreq_ioctl(&sock, SIOCBRADDIF, &mut br).map_err(|e| match e.raw_os_error() {
            Some(libc::ENODEV) | Some(libc::EOPNOTSUPP) => Error::new(e.kind(), format!("bridge '{bridge}' does not exist or is not a bridge ({e})")),
            _ => ctx("joining", e),
        })?;
        let mut up = IfReqData::named(&self.name);
        ifreq_ioctl(&sock, SIOCGIFFLAGS, &mut up).map_err(|e| ctx("(flags) on", e))?;
        let flags = i16::from_ne_bytes([up.data[0], up.data[1]]) | libc::IFF_UP as i16;
        up.data[..2].copy_from_slice(&flags.to_ne_bytes());
        ifreq_ioctl(&sock, SIOCSIFFLAGS, &mut up).map_err(|e| ctx("(up) on", e))
    }

    /// The interface's MTU when it was opened: the largest frame payload it
    /// passes without GSO.
    pub fn mtu(&self) -> usize {
        self.mtu
    }

    /// Tells the tap which offloads (`TUN_F_*`) the guest accepts on receive.
    pub fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Opens `/dev/net/tun` attached to tap `name` with virtio-net headers,
/// creating the interface when it does not exist (which needs
/// CAP_NET_ADMIN): the descriptor [`Tap::from_fd`] takes.
pub fn open_device(name: &str) -> std::io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= 16 || name.contains(['/', ' ', '\0']) {
        return Err(Error::new(ErrorKind::InvalidInput, format!("invalid tap name '{name}' (1-15 characters)")));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
    let mut req = IfReq { name: [0; 16], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        let e = Error::last_os_error();
        let hint = if e.raw_os_error() == Some(libc::EPERM) {
            format!(" (creating a tap needs CAP_NET_ADMIN; or create it first: ip tuntap add {name} mode tap user $USER)")
        } else {
            String::new()
        };
        return Err(Error::new(e.kind(), format!("tap '{name}': {e}{hint}")));
    }
    Ok(file.into())
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_is_a_broadcast_rarp_from_the_card() {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills two descriptors we then own.
        assert_eq!(unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors from socketpair, each owned once.
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from(OwnedFd::from_raw_fd(fds[1]))) };
        let tap = Tap::stand_in(ours, "t", 1500);
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        tap.announce(mac).unwrap();
        let mut buf = [0u8; 256];
        let n = std::io::Read::read(&mut &theirs, &mut buf).unwrap();
        let frame = &buf[VNET_HDR_LEN..n];
        assert_eq!(frame.len(), 60, "a minimum Ethernet frame");
        assert_eq!((&frame[..6], &frame[6..12], &frame[12..14]), (&[0xff; 6][..], &mac[..], &[0x80, 0x35][..]));
        assert_eq!((&frame[20..22], &frame[22..28], &frame[32..38]), (&[0, 3][..], &mac[..], &mac[..]), "reverse request, from and for the card");
    }

    fn ip(args: &[&str]) -> bool {
        std::process::Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false)
    }

    /// Runs `body` on a thread in a network namespace of its own (the `ip`
    /// commands it starts inherit it), never in the machine's; `false` when
    /// no namespace can be made here.
    fn in_private_netns(body: impl FnOnce() + Send + 'static) -> bool {
        let t = std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return false;
            }
            body();
            true
        });
        match t.join() {
            Ok(made) => made,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    #[test]
    fn tap_joins_a_bridge_and_comes_up() {
        if !in_private_netns(tap_joins_a_bridge) {
            eprintln!("note: no network namespace here; bridge attach not exercised");
        }
    }

    fn tap_joins_a_bridge() {
        let (br, tap) = (format!("rvbr{}", std::process::id() % 100000), format!("rvtp{}", std::process::id() % 100000));
        if !ip(&["link", "add", &br, "type", "bridge"]) {
            eprintln!("note: cannot create a bridge here (no CAP_NET_ADMIN); bridge attach not exercised");
            return;
        }
        let t = Tap::open(&tap).expect("open tap");
        assert_eq!(t.mtu(), 1500, "a new tap's MTU");
        t.attach_to_bridge(&br).expect("attach");
        // Asked of `ip`, which runs in this namespace (/sys shows the machine's).
        let out = std::process::Command::new("ip").args(["-o", "link", "show", "dev", &tap]).output().expect("ip link show");
        let link = String::from_utf8_lossy(&out.stdout);
        assert!(link.contains(&format!(" master {br} ")), "the tap has the bridge as its master: {link}");
        let flags = link.split_once('<').and_then(|(_, r)| r.split_once('>')).map(|(f, _)| f).unwrap_or("");
        assert!(flags.split(',').any(|f| f == "UP"), "the tap is up: {link}");
        let err = t.attach_to_bridge("rvnobridge0").unwrap_err().to_string();
        assert!(err.contains("rvnobridge0"), "{err}");
        assert!(t.attach_to_bridge("bad name").is_err());
        drop(t);
        ip(&["link", "del", &br]);
    }

    #[test]
    fn a_taps_mtu_is_read_when_it_is_opened() {
        if !in_private_netns(taps_mtu_is_read) {
            eprintln!("note: no network namespace here; MTU not exercised");
        }
    }

    fn taps_mtu_is_read() {
        let tap = format!("rvmt{}", std::process::id() % 100000);
        if !ip(&["tuntap", "add", &tap, "mode", "tap"]) {
            eprintln!("note: cannot create a tap here (no CAP_NET_ADMIN); MTU not exercised");
            return;
        }
        assert!(ip(&["link", "set", &tap, "mtu", "1400"]));
        let t = Tap::open(&tap).expect("open tap");
        // Read from the interface, not assumed (1500 is the default).
        assert_eq!(t.mtu(), 1400);
        drop(t);
        ip(&["link", "del", &tap]);
    }
    #[test]
    fn a_tap_is_taken_by_descriptor_only_as_the_tap_it_claims_to_be() {
        // Anything but an attached tap is refused, naming the tap.
        let null: OwnedFd = File::open("/dev/null").unwrap().into();
        let e = Tap::from_fd("vnet0", null).unwrap_err().to_string();
        assert!(e.contains("'vnet0'") && e.contains("not an attached tap"), "{e}");
        if !in_private_netns(tap_by_descriptor) {
            eprintln!("note: no network namespace here; taps by descriptor not exercised");
        }
    }

    fn tap_by_descriptor() {
        let tap = format!("rvfd{}", std::process::id() % 100000);
        let fd = match open_device(&tap) {
            Ok(fd) => fd,
            Err(e) => return eprintln!("note: cannot create a tap here ({e}); taps by descriptor not exercised"),
        };
        let other = fd.try_clone().unwrap();
        let e = Tap::from_fd("rvother0", other).unwrap_err().to_string();
        assert!(e.contains(&format!("attached to '{tap}'")), "{e}");
        let t = Tap::from_fd(&tap, fd).expect("the tap rvirtd opened");
        assert_eq!((t.name(), t.mtu()), (tap.as_str(), 1500));
        // SAFETY: F_GETFL on a descriptor the tap owns.
        let flags = unsafe { libc::fcntl(t.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0, "frames are moved without blocking");
        assert!(open_device("bad/name").is_err());
    }
}
