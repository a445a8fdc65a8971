//! The rvirt-vmm control API.
//!
//! One Unix stream socket per VM (`rvirt-vmm --api-socket PATH`). Each request
//! is one line of JSON, answered by one line of JSON; a connection may carry
//! any number of requests. The wire format is documented in `docs/api.md`.
//! Management (rvirtd) drives VMs only through this API and the CLI, so the
//! types here are the contract between the two layers.


pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod saved;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The firmware a VM without a kernel boots through, unless told otherwise:
/// Debian's SeaBIOS (package `seabios`). The VMM's default, and the image
/// rvirtd checks for before it starts a domain that boots its disks.
pub const DEFAULT_FIRMWARE: &str = "/usr/share/seabios/bios-256k.bin";

/// Largest request line the VMM accepts, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A command sent to a running VMM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// Report run state, vCPUs, memory and uptime.
    Status,
    /// Stop running guest vCPUs (the guest keeps its state).
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// Press the ACPI power button: a cooperative guest powers itself off.
    Shutdown,
    /// End the VM at once, like pulling the plug.
    Stop,
    /// Press the reset button: the guest restarts at once on fresh devices
    /// (a VMM run with `--on-reboot exit` exits instead, as for a guest's
    /// own reset).
    Reset,
    /// Report VM-exit and per-device counters.
    Stats,
    /// Report each vCPU's registers, run state and local APIC (timer,
    /// pending interrupts): what a hung guest is waiting for. The vCPUs
    /// stop for the moment it takes.
    VcpuState,
    /// Set the balloon's target: how much guest memory the guest gives back to the host.
    Balloon {
        /// Bytes the guest should give up (0 deflates the balloon completely).
        target_bytes: u64,
    },
    /// The balloon driver's memory statistics (free, total, available,
    /// caches, swapping, faults); also asks it for fresh ones, which a
    /// later call sees as a higher `generation`.
    BalloonStats,
    /// Set a network card's link up or down, as the guest sees it.
    SetLink {
        /// Device name, e.g. `net0`.
        device: String,
        /// Link state.
        up: bool,
    },
    /// Eject the disc of a CD-ROM drive, or insert one: the guest sees the
    /// media change as a real drive reports it.
    ChangeMedia {
        /// The drive, by its `--disk` position: `disk0`, `disk1`, ...
        device: String,
        /// The image to insert (read-only, raw ISO); none ejects.
        #[serde(default)]
        path: Option<std::path::PathBuf>,
        /// Eject even though the guest locked the tray.
        #[serde(default)]
        force: bool,
        /// The disc is the descriptor sent with the request (SCM_RIGHTS);
        /// `path` only names it. A jailed VMM can open no path.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fd: bool,
    },
    /// Pause the VM and write a snapshot of it into the directory `path`
    /// (made if missing; its files `state` and `memory`), for
    /// `rvirt-vmm --restore`. The VM stays paused unless `resume`.
    Snapshot {
        /// The snapshot's directory (must not hold one already); with `fd`
        /// only the name of the file sent.
        path: std::path::PathBuf,
        /// Let the VM run on once the snapshot is written.
        #[serde(default)]
        resume: bool,
        /// The snapshot goes, as one file ([`saved`]), into the descriptor
        /// sent with the request (SCM_RIGHTS, open for reading and
        /// writing): the only way a jailed VMM writes one.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fd: bool,
        /// Text kept in the one-file form for whoever reads it (rvirtd: the
        /// domain's XML); the VMM never reads it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        /// Also take an internal snapshot of this name in every writable
        /// disk while the VM is paused (qcow2 only: a writable disk of
        /// another format refuses the whole snapshot before the pause).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk_snapshot: Option<String>,
    },
    /// Continue writable disk `device` (`diskN`, by `--disk` position) in
    /// the qcow2 overlay sent with the request (SCM_RIGHTS, open read-write;
    /// made by the caller with the disk's image as its backing file): the
    /// image stops changing, a `--disk-only` snapshot of a running VM. The
    /// VM is paused for the switch and runs on.
    DiskOverlay {
        /// The disk.
        device: String,
        /// The overlay's name (the descriptor is the file).
        path: std::path::PathBuf,
    },
    /// Delete the internal snapshot `name` from every writable disk that
    /// holds one of that name (the images this VMM has open and locked:
    /// nobody else may change them while it runs).
    DeleteDiskSnapshot {
        /// The snapshot's name (never an id).
        name: String,
    },
    /// Move the running VM to a VMM waiting with `--incoming` at `uri`
    /// (`unix:PATH` or `tcp:HOST:PORT`): memory is copied while the guest
    /// runs, pages it dirties meanwhile again, until the rest fits
    /// `max_downtime_ms`; then a short stop. Answers at once; follow it
    /// with `migrate-status`. On success the VMM ends.
    Migrate {
        /// Where the destination waits.
        uri: String,
        /// Longest pause the guest may see, in milliseconds.
        #[serde(default = "default_max_downtime_ms")]
        max_downtime_ms: u64,
        /// Cap on the link's use, in MiB/s (0: none).
        #[serde(default)]
        bandwidth_mib_s: u64,
        /// Compress pages with zstd (pages of zeros are never sent whole).
        #[serde(default)]
        compress: bool,
        /// Slow the guest's vCPUs down while it dirties memory faster than
        /// the link carries it, so the migration converges.
        #[serde(default)]
        auto_converge: bool,
    },
    /// How the migration is going (or how it ended).
    MigrateStatus,
    /// Stop the migration under way; the VM runs on here.
    MigrateCancel,
}

/// QEMU's default downtime limit, kept as rvirt's.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 300;

fn default_max_downtime_ms() -> u64 {
    DEFAULT_MAX_DOWNTIME_MS
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    /// None was asked for.
    #[default]
    None,
    /// Connecting and checking the destination.
    Setup,
    /// Copying memory while the guest runs.
    Active,
    /// The guest is stopped for the last pages and the device state.
    SwitchOver,
    /// The destination runs the guest; this VMM ends.
    Completed,
    /// It failed; the guest runs on here (`error` says why).
    Failed,
    /// Cancelled; the guest runs on here.
    Cancelled,
}

/// The answer to `migrate-status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Where it is.
    pub state: MigrationState,
    /// Passes over memory so far (the first copies everything).
    pub iteration: u32,
    /// Bytes sent (pages and state).
    pub bytes_sent: u64,
    /// Bytes of memory dirtied and not yet sent, at the last count.
    pub remaining_bytes: u64,
    /// How fast the guest dirtied memory in the last pass, bytes per second.
    pub dirty_rate: u64,
    /// The pause the rest would take at the measured link speed, in ms.
    pub expected_downtime_ms: u64,
    /// The guest's pause, measured, once completed: from the pause until
    /// the destination said it holds the guest.
    pub downtime_ms: Option<f64>,
    /// The part of that pause until the last byte left this VMM (what QEMU
    /// reports as its downtime), once completed.
    #[serde(default)]
    pub downtime_sent_ms: Option<f64>,
    /// Share of the time auto-converge holds the vCPUs off, in percent.
    pub throttle_percent: u8,
    /// Milliseconds since the request.
    pub total_ms: f64,
    /// Why it failed.
    pub error: Option<String>,
}

/// What a `snapshot` wrote and how long the VM was paused for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Bytes of guest memory written (pages of zeroes are holes in the file).
    pub memory_bytes: u64,
    /// Milliseconds from the pause to the snapshot on disk.
    pub millis: f64,
}

/// Whether the guest's vCPUs are running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// vCPUs are executing guest code.
    Running,
    /// vCPUs are parked by a `pause` request.
    Paused,
}

/// The answer to [`Request::Status`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Running or paused.
    pub state: RunState,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Seconds since the VM was started (or last rebooted).
    pub uptime_seconds: f64,
    /// The VMM's process ID.
    pub pid: u32,
    /// The balloon, when the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonStatus>,
    /// The pty the serial console is on (`--serial pty`), for clients to attach to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_pty: Option<String>,
}

/// The balloon's state in [`VmStatus`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatus {
    /// What the host asked the guest to give up, in bytes.
    pub target_bytes: u64,
    /// What the guest reports it has given up, in bytes.
    pub actual_bytes: u64,
}

/// The answer to [`Request::BalloonStats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// The driver's figures by name (`free-memory`, `total-memory`,
    /// `available-memory`, `disk-caches`, `swap-in`, `swap-out` in bytes;
    /// `major-faults`, `minor-faults`, `hugetlb-*` counts); empty until it
    /// posts some (a driver without the statistics queue never does).
    pub values: BTreeMap<String, u64>,
    /// How many sets of figures the driver has posted.
    pub generation: u64,
    /// When the last set came, in seconds since the epoch (0: never).
    pub updated_unix: u64,
    /// What the guest has given up, in bytes.
    pub actual_bytes: u64,
}

/// Counters of one device in [`VmStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    /// Requests completed.
    pub requests: u64,
    /// Bytes moved to the guest (disk reads, received frames, entropy).
    pub bytes_to_guest: u64,
    /// Bytes moved from the guest (disk writes, sent frames, console output).
    pub bytes_from_guest: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Requests that moved bytes to the guest (disk reads, received frames).
    #[serde(default)]
    pub reads: u64,
    /// Requests that moved bytes from the guest (disk writes, sent frames).
    #[serde(default)]
    pub writes: u64,
}

/// The answer to [`Request::Stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    /// VM exits handled in user space, by KVM exit reason (`io`, `mmio`, `shutdown`, ...).
    pub exits: BTreeMap<String, u64>,
    /// Per-device counters by device name (`disk0`, `net0`, `rng`, ...).
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceStats>,
}

/// One reply line. `ok` says whether the request succeeded; `error` explains a failure.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// True when the request was carried out.
    pub ok: bool,
    /// Why the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Present in the answer to `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VmStatus>,
    /// Present in the answer to `stats`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<VmStats>,
    /// Present in the answer to `balloon-stats`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_stats: Option<BalloonStats>,
    /// Present in the answer to `vcpu-state`: one multi-line report per vCPU, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<Vec<String>>,
    /// Present in the answer to `snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotInfo>,
    /// Present in the answer to `migrate-status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
}

impl Response {
    /// A bare success.
    pub fn ok() -> Self {
        Self { ok: true, ..Default::default() }
    }

    /// A failure explained by `msg`.
    pub fn error(msg: impl Into<String>) -> Self {
        Self { ok: false, error: Some(msg.into()), ..Default::default() }
    }
}

/// Parses one request line, or says what is wrong with it.
pub fn parse_request(line: &str) -> Result<Request, String> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
    }
    let value: serde_json::Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("malformed request: {e}"))?;
    let req: Request =
        serde_json::from_value(value.clone()).map_err(|e| format!("malformed request: {e}"))?;
    // serde ignores unknown fields of unit variants in tagged enums; a typo in
    // an argument name must not be silently dropped, so compare key sets.
    let known = serde_json::to_value(&req).map_err(|e| format!("malformed request: {e}"))?;
    if let (Some(given), Some(known)) = (value.as_object(), known.as_object()) {
        if let Some(extra) = given.keys().find(|k| !known.contains_key(*k)) {
            return Err(format!("malformed request: unknown field `{extra}`"));
        }
    }
    Ok(req)
}

/// Errors of the API client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached or the connection broke.
    #[error("API socket {path}: {source}")]
    Io {
        /// Socket path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The VMM answered with something that is not a response.
    #[error("API socket {path}: bad response: {detail}")]
    Protocol {
        /// Socket path.
        path: String,
        /// What was wrong.
        detail: String,
    },
}

/// A blocking connection to one VMM's control socket.
pub struct ApiClient {
    path: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ApiClient {
    /// Connects to the socket at `path`; requests time out after `timeout`.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, ClientError> {
        let p = path.as_ref().display().to_string();
        let io = |source| ClientError::Io { path: p.clone(), source };
        let stream = UnixStream::connect(path.as_ref()).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(Self { path: p, reader: BufReader::new(stream), writer })
    }

    /// Sends `req` and waits for its response.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let mut line = serde_json::to_string(req).map_err(|e| self.protocol(e.to_string()))?;
        line.push('\n');
        self.writer.write_all(line.as_bytes()).map_err(|e| self.io(e))?;
        self.read_answer()
    }

    /// Reads the response line to the request just sent.
    fn read_answer(&mut self) -> Result<Response, ClientError> {
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer).map_err(|e| self.io(e))?;
        if n == 0 {
            return Err(self.protocol("connection closed before a response".into()));
        }
        serde_json::from_str(&answer).map_err(|e| self.protocol(format!("{e}: {}", answer.trim())))
    }

    /// Sends `req` with `fd` attached (SCM_RIGHTS) and waits for its
    /// response: how rvirtd hands a jailed VMM a file it cannot open itself.
    pub fn call_with_fd(&mut self, req: &Request, fd: std::os::fd::BorrowedFd<'_>) -> Result<Response, ClientError> {
        use std::os::fd::AsRawFd;
        let mut line = serde_json::to_string(req).map_err(|e| self.protocol(e.to_string()))?;
        line.push('\n');
        let bytes = line.as_bytes();
        // The descriptor travels with the first bytes; the rest follow as usual.
        let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
        let mut control = vec![0u8; space];
        // SAFETY: msghdr is plain data; every pointer set below refers to live buffers of this frame.
        let sent = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd.as_raw_fd());
            libc::sendmsg(self.writer.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
        };
        if sent < 0 {
            return Err(self.io(std::io::Error::last_os_error()));
        }
        self.writer.write_all(&bytes[sent as usize..]).map_err(|e| self.io(e))?;
        self.read_answer()
    }

    fn io(&self, source: std::io::Error) -> ClientError {
        ClientError::Io { path: self.path.clone(), source }
    }

    fn protocol(&self, detail: String) -> ClientError {
        ClientError::Protocol { path: self.path.clone(), detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_use_kebab_case_commands() {
        assert_eq!(serde_json::to_string(&Request::Pause).unwrap(), r#"{"command":"pause"}"#);
        assert_eq!(parse_request(r#"{"command":"stats"}"#), Ok(Request::Stats));
        assert_eq!(parse_request(r#"{"command":"vcpu-state"}"#), Ok(Request::VcpuState));
        assert_eq!(parse_request(" {\"command\":\"shutdown\"}\n"), Ok(Request::Shutdown));
        assert_eq!(
            parse_request(r#"{"command":"balloon","target_bytes":1048576}"#),
            Ok(Request::Balloon { target_bytes: 1 << 20 })
        );
        assert_eq!(
            parse_request(r#"{"command":"set-link","device":"net0","up":false}"#),
            Ok(Request::SetLink { device: "net0".into(), up: false })
        );
        assert!(parse_request(r#"{"command":"balloon"}"#).is_err());
        assert!(parse_request(r#"{"command":"balloon","target_bytes":-1}"#).is_err());
    }

    #[test]
    fn bad_requests_are_explained() {
        for bad in ["", "{", r#"{"command":"explode"}"#, r#"{"cmd":"pause"}"#, r#"{"command":"pause","x":1}"#, "[]"] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.starts_with("malformed request"), "{bad}: {e}");
        }
        let huge = "x".repeat(MAX_REQUEST_BYTES + 1);
        assert!(parse_request(&huge).unwrap_err().contains("longer"));
    }

    #[test]
    fn responses_round_trip_and_omit_empty_fields() {
        let r = Response {
            status: Some(VmStatus {
                state: RunState::Paused,
                vcpus: 2,
                memory_bytes: 512 << 20,
                uptime_seconds: 1.5,
                pid: 42,
                balloon: None,
                serial_pty: Some("/dev/pts/3".into()),
            }),
            ..Response::ok()
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains(r#""state":"paused""#), "{s}");
        assert!(!s.contains("error"));
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), r);
        assert_eq!(serde_json::to_string(&Response::error("no")).unwrap(), r#"{"ok":false,"error":"no"}"#);
    }

    #[test]
    fn client_reports_missing_socket() {
        let e = ApiClient::connect("/nonexistent/rvirt.sock", Duration::from_secs(1)).err().unwrap();
        assert!(e.to_string().contains("/nonexistent/rvirt.sock"));
    }

    #[test]
    fn client_talks_to_a_server() {
        let dir = std::env::temp_dir().join(format!("rvirt-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            for _ in 0..2 {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let resp = match parse_request(&line) {
                    Ok(Request::Pause) => Response::ok(),
                    Ok(other) => Response::error(format!("{other:?}")),
                    Err(e) => Response::error(e),
                };
                writeln!(w, "{}", serde_json::to_string(&resp).unwrap()).unwrap();
            }
        });
        let mut c = ApiClient::connect(&path, Duration::from_secs(5)).unwrap();
        assert!(c.call(&Request::Pause).unwrap().ok);
        assert_eq!(c.call(&Request::Stop).unwrap().error.as_deref(), Some("Stop"));
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
