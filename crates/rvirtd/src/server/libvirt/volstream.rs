//! `virsh vol-upload` and `vol-download`: a libvirt stream between the
//! client and a volume's file. An upload writes what the client sends at
//! the offset asked for (the file grows as needed) under the image write
//! lock, so a running domain's disk is refused; a download sends the file's
//! bytes and then libvirt's end of stream (empty data). Either side may
//! end the stream early; a failed write ends it with libvirt's error.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rvirt_libvirt_rpc::remote::{err, FROM_STORAGE};
use rvirt_libvirt_rpc::{Header, MessageStatus, MessageType, Packet, RemoteError};

use super::Outbox;

/// Bytes of a volume per stream packet (libvirt's own limit is 256 KiB).
const CHUNK: usize = 256 << 10;

fn error(message: String) -> RemoteError {
    RemoteError { domain: FROM_STORAGE, ..RemoteError::new(err::OPERATION_FAILED, format!("operation failed: {message}")) }
}

/// An upload in progress: where the next bytes go, and how many more may come.
struct Upload {
    file: File,
    name: String,
    at: u64,
    /// Bytes still allowed (`None`: no limit, the stream decides).
    left: Option<u64>,
    /// A write failed and the client was told: later data is dropped.
    failed: bool,
}

/// A download opened by a call whose reply has not gone out yet.
struct PendingDownload {
    header: Header,
    file: File,
    name: String,
    at: u64,
    left: Option<u64>,
}

/// A download in progress: its sender thread and the flag that stops it.
struct Download {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Download {
    fn end(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The volume streams of one connection.
#[derive(Default)]
pub(crate) struct VolumeStreams {
    pending: Option<PendingDownload>,
    uploads: BTreeMap<u32, Upload>,
    downloads: BTreeMap<u32, Download>,
}

/// `length` 0 means "to the end", as in libvirt.
fn limit(length: u64) -> Option<u64> {
    (length != 0).then_some(length)
}

fn open(path: &Path, write: bool) -> Result<File, RemoteError> {
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| error(format!("cannot open volume '{}': {e}", path.display())))?;
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return Err(error(format!("volume '{}' is not a regular file", path.display())));
    }
    Ok(f)
}

impl VolumeStreams {
    /// Whether the stream with call serial `serial` is one of these.
    pub(crate) fn owns(&self, serial: u32) -> bool {
        self.uploads.contains_key(&serial) || self.downloads.contains_key(&serial)
    }

    /// Opens `path` for an upload by call `h`: data the client sends next goes to `offset` on.
    pub(crate) fn open_upload(&mut self, h: &Header, path: &Path, offset: u64, length: u64) -> Result<(), RemoteError> {
        let file = open(path, true)?;
        let lock = rvirt_block::lock::Permissions::for_image(false, true, rvirt_block::Locking::Exclusive);
        rvirt_block::lock::lock(&file, path, lock).map_err(|e| error(e.to_string()))?;
        self.uploads.insert(h.serial, Upload { file, name: path.display().to_string(), at: offset, left: limit(length), failed: false });
        Ok(())
    }

    /// Opens `path` for a download by call `h`; it starts once the call is answered.
    pub(crate) fn open_download(&mut self, h: &Header, path: &Path, offset: u64, length: u64) -> Result<(), RemoteError> {
        let file = open(path, false)?;
        self.pending = Some(PendingDownload { header: *h, file, name: path.display().to_string(), at: offset, left: limit(length) });
        Ok(())
    }

    /// Starts the download whose call was just answered, if any.
    pub(crate) fn start_pending(&mut self, out: &Arc<Outbox>) {
        let Some(p) = self.pending.take() else { return };
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, out, serial) = (stop.clone(), out.clone(), p.header.serial);
        match std::thread::Builder::new().name("libvirt-vol-download".into()).spawn(move || send_file(p, out, flag)) {
            Ok(t) => {
                self.downloads.insert(serial, Download { stop, thread: Some(t) });
            }
            Err(e) => tracing::warn!("volume download: no thread: {e}"),
        }
    }

    /// A stream packet from the client: an upload's data, or the end of a stream.
    pub(crate) fn from_client(&mut self, h: &Header, data: &[u8], out: &Arc<Outbox>) {
        match h.status {
            MessageStatus::Continue => {
                let Some(u) = self.uploads.get_mut(&h.serial) else {
                    tracing::debug!("stream data for serial {} that uploads nothing; dropped", h.serial);
                    return;
                };
                if u.failed {
                    return;
                }
                let written = match u.left {
                    Some(left) if data.len() as u64 > left => Err(format!("more data than the {} bytes asked for", left)),
                    _ => u.file.write_all_at(data, u.at).map_err(|e| format!("writing volume '{}' at {}: {e}", u.name, u.at)),
                };
                match written {
                    Ok(()) => {
                        u.at += data.len() as u64;
                        u.left = u.left.map(|l| l - data.len() as u64);
                    }
                    Err(e) => {
                        u.failed = true;
                        send_error(h, error(e), out);
                    }
                }
            }
            // Finish: what was written is made durable first, then confirmed
            // (an empty OK packet, as libvirtd sends). Abort: confirmed at once.
            MessageStatus::Ok | MessageStatus::Error => {
                if let Some(u) = self.uploads.remove(&h.serial) {
                    if h.status == MessageStatus::Ok && !u.failed {
                        if let Err(e) = u.file.sync_all() {
                            send_error(h, error(format!("flushing volume '{}': {e}", u.name)), out);
                            return;
                        }
                    }
                }
                if let Some(mut d) = self.downloads.remove(&h.serial) {
                    d.end();
                }
                let confirm = Header { kind: MessageType::Stream, status: MessageStatus::Ok, ..*h };
                out.send(&Packet { header: confirm, payload: Vec::new() });
            }
        }
    }

    /// Ends every stream (the connection is closing).
    pub(crate) fn stop_all(&mut self) {
        self.pending = None;
        self.uploads.clear();
        for (_, mut d) in std::mem::take(&mut self.downloads) {
            d.end();
        }
    }
}

fn send_error(call: &Header, e: RemoteError, out: &Outbox) {
    let header = Header { kind: MessageType::Stream, status: MessageStatus::Error, ..*call };
    out.send(&Packet { header, payload: e.encode() });
}

/// Sends the file from the offset asked for, then libvirt's end of stream
/// (empty data), unless the client ends the stream first.
fn send_file(p: PendingDownload, out: Arc<Outbox>, stop: Arc<AtomicBool>) {
    let header = |status| Header { kind: MessageType::Stream, status, ..p.header };
    let mut buf = vec![0u8; CHUNK];
    let (mut at, mut left) = (p.at, p.left);
    let file = &p.file;
    loop {
        if stop.load(Ordering::SeqCst) || out.is_closed() {
            return;
        }
        let want = left.map_or(CHUNK, |l| l.min(CHUNK as u64) as usize);
        if want == 0 {
            break;
        }
        let n = match file.read_at(&mut buf[..want], at) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                send_error(&p.header, error(format!("reading volume '{}' at {at}: {e}", p.name)), &out);
                return;
            }
        };
        if !out.send(&Packet { header: header(MessageStatus::Continue), payload: buf[..n].to_vec() }) {
            return;
        }
        at += n as u64;
        left = left.map(|l| l - n as u64);
    }
    out.send(&Packet { header: header(MessageStatus::Continue), payload: Vec::new() });
}
