//! `virsh console`: a libvirt stream (`DOMAIN_OPEN_CONSOLE`) joined to a
//! running domain's serial pty. The domain's output goes to the client as
//! stream data; what the client types goes to the pty; the end of either
//! side ends the stream as libvirt's daemon ends it (empty data).
//! One client holds a domain's console at a time, unless another forces it
//! away (`virsh console --force`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rvirt_libvirt_rpc::remote::err;
use rvirt_libvirt_rpc::{Header, MessageStatus, MessageType, Packet, RemoteError};

use super::Outbox;

/// Bytes of console output per stream packet.
const CHUNK: usize = 64 << 10;
/// How often a console's reader looks whether it should stop.
const POLL_MS: i32 = 200;

/// Which domain's console is held, and the flag that takes it away
/// (another client forcing it: the holder's stream ends).
static HELD: Mutex<BTreeMap<String, Arc<AtomicBool>>> = Mutex::new(BTreeMap::new());

fn held() -> std::sync::MutexGuard<'static, BTreeMap<String, Arc<AtomicBool>>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

/// A console opened by a call whose reply has not gone out yet.
struct Pending {
    header: Header,
    pty: File,
    name: String,
    taken: Arc<AtomicBool>,
}

/// A console stream in use.
struct Active {
    pty: File,
    name: String,
    /// Set when this client (or its connection) ends the stream.
    stop: Arc<AtomicBool>,
    /// Set when another client takes the console.
    taken: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Active {
    fn end(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
        let mut h = held();
        if h.get(&self.name).is_some_and(|s| Arc::ptr_eq(s, &self.taken)) {
            h.remove(&self.name);
        }
    }
}

/// The console streams of one connection.
#[derive(Default)]
pub(crate) struct Consoles {
    pending: Option<Pending>,
    active: BTreeMap<u32, Active>,
}

impl Consoles {
    /// Opens the pty at `pty_path` of domain `name` for the call `h`; the
    /// stream starts once the call's reply is sent ([`Consoles::start_pending`]).
    pub(crate) fn open(&mut self, h: &Header, name: &str, pty_path: &str, force: bool) -> Result<(), RemoteError> {
        let taken = Arc::new(AtomicBool::new(false));
        {
            let mut hd = held();
            if let Some(other) = hd.get(name) {
                if !force {
                    return Err(RemoteError::new(err::OPERATION_FAILED, format!("operation failed: Active console session exists for domain '{name}' (virsh console --force takes it)")));
                }
                other.store(true, Ordering::SeqCst);
            }
            hd.insert(name.to_string(), taken.clone());
        }
        let pty = OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC).open(pty_path).map_err(|e| {
            held().remove(name);
            RemoteError::new(err::OPERATION_FAILED, format!("domain '{name}': opening its console {pty_path}: {e}"))
        })?;
        self.pending = Some(Pending { header: *h, pty, name: name.to_string(), taken });
        Ok(())
    }

    /// Starts the stream whose call was just answered, if any.
    pub(crate) fn start_pending(&mut self, out: &Arc<Outbox>) {
        let Some(p) = self.pending.take() else { return };
        let reader = match p.pty.try_clone() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("console of '{}': {e}", p.name);
                return;
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (out, flags, header) = (out.clone(), (stop.clone(), p.taken.clone()), p.header);
        let thread = std::thread::Builder::new().name("libvirt-console".into()).spawn(move || pump(reader, header, out, flags.0, flags.1));
        match thread {
            Ok(t) => {
                self.active.insert(p.header.serial, Active { pty: p.pty, name: p.name, stop, taken: p.taken, reader: Some(t) });
            }
            Err(e) => {
                tracing::warn!("console of '{}': no thread: {e}", p.name);
                held().remove(&p.name);
            }
        }
    }

    /// A stream packet from the client: keys for the console, or its end.
    pub(crate) fn from_client(&mut self, h: &Header, data: &[u8], out: &Arc<Outbox>) {
        match h.status {
            MessageStatus::Continue => match self.active.get_mut(&h.serial) {
                // Non-blocking: a guest that reads nothing loses keys, never stalls this connection.
                Some(a) => {
                    if let Err(e) = a.pty.write_all(data) {
                        tracing::debug!("console of '{}': {} bytes of input dropped: {e}", a.name, data.len());
                    }
                }
                None => tracing::debug!("stream data for serial {} that has no console; dropped", h.serial),
            },
            // Finish or abort: the client waits for a confirmation (an
            // empty packet with status OK, as libvirtd sends), even for a
            // stream that has already ended here.
            MessageStatus::Ok | MessageStatus::Error => {
                if let Some(mut a) = self.active.remove(&h.serial) {
                    a.end();
                }
                let confirm = Header { kind: MessageType::Stream, status: MessageStatus::Ok, ..*h };
                out.send(&Packet { header: confirm, payload: Vec::new() });
            }
        }
    }

    /// Ends every stream (the connection is closing).
    pub(crate) fn stop_all(&mut self) {
        if let Some(p) = self.pending.take() {
            held().remove(&p.name);
        }
        for (_, mut a) in std::mem::take(&mut self.active) {
            a.end();
        }
    }
}

/// Sends what the domain writes to its console until the pty closes (the
/// domain stopped), another client forces the console away (both end the
/// stream with libvirt's empty packet), or the client ends it.
fn pump(mut pty: File, call: Header, out: Arc<Outbox>, stop: Arc<AtomicBool>, taken: Arc<AtomicBool>) {
    let header = |status| Header { kind: MessageType::Stream, status, ..call };
    let mut buf = vec![0u8; CHUNK];
    while !stop.load(Ordering::SeqCst) && !taken.load(Ordering::SeqCst) && !out.is_closed() {
        let mut pfd = libc::pollfd { fd: pty.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one pollfd we own, with a bounded timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
        if n <= 0 {
            continue;
        }
        match pty.read(&mut buf) {
            Ok(0) => {
                tracing::debug!(serial = call.serial, "console pty: end of file");
                break;
            }
            Ok(n) => {
                if !out.send(&Packet { header: header(MessageStatus::Continue), payload: buf[..n].to_vec() }) {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {}
            // EIO: the VMM closed its side (the domain stopped).
            Err(e) => {
                tracing::debug!(serial = call.serial, "console pty: {e}");
                break;
            }
        }
    }
    // End of stream (libvirt's: empty data with status CONTINUE; an OK
    // packet only confirms a client's finish), unless the client ended it.
    tracing::debug!(serial = call.serial, taken = taken.load(Ordering::SeqCst), "console stream ends");
    if !stop.swap(true, Ordering::SeqCst) {
        out.send(&Packet { header: header(MessageStatus::Continue), payload: Vec::new() });
    }
}
