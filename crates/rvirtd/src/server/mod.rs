//! rvirtd's front ends: its own management socket (one JSON request per
//! line, served by `rvirt-lineserver`: one poll thread, a pool of workers,
//! every buffer bounded), and libvirt's remote protocol ([`libvirt`]) for
//! virsh, virt-install and python-libvirt; and a TLS listener ([`tls`])
//! that carries either protocol to remote clients. All call the same [`Manager`].

pub mod libvirt;
pub mod tls;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rvirt_domain::protocol::{parse_request, Response, MAX_REQUEST_BYTES};
use rvirt_lineserver::Line;

use crate::manager::Manager;

/// Binds the daemon's socket at `path`: mode 0600, or 0660 owned by `group`
/// when given, so only root (or the daemon's user) and that group reach it.
/// A socket file nobody answers on (a daemon that died) is replaced; one a
/// live daemon answers on is an error.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    let gid = group.map(group_id).transpose()?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    bind_mode(path, mode, gid)
}

/// Binds the read-only socket at `path`, mode 0666: any local user may list
/// domains and read their state and definitions there (libvirt's
/// `libvirt-sock-ro`), and nothing else.
pub fn bind_read_only(path: &Path) -> Result<UnixListener> {
    bind_mode(path, 0o666, None)
}

fn bind_mode(path: &Path, mode: u32, gid: Option<u32>) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("another rvirtd is already listening on {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = rvirt_lineserver::bind_with_mode(path, mode).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| format!("chgrp {}", path.display()))?;
    }
    Ok(listener)
}

fn group_id(name: &str) -> Result<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let c = std::ffi::CString::new(name).context("group name")?;
    // SAFETY: getgrnam returns a pointer to static storage or null; read at once.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    if g.is_null() {
        bail!("no group named '{name}'");
    }
    // SAFETY: non-null pointer from getgrnam.
    Ok(unsafe { (*g).gr_gid })
}

/// The bounds the management socket keeps (see `rvirt_lineserver::Limits`):
/// idle clients cost a descriptor, not a thread; partial requests are capped
/// in size, total memory and time. 16 workers answer requests, so 16
/// clients in long waits (`shutdown --timeout`) delay the rest, as
/// libvirtd's worker pool does.
pub fn limits() -> rvirt_lineserver::Limits {
    rvirt_lineserver::Limits { max_line: MAX_REQUEST_BYTES, workers: 16, ..rvirt_lineserver::Limits::default() }
}

/// Who sent a request, for the log.
pub(crate) enum Origin {
    /// A local client on one of the daemon's sockets.
    Local(rvirt_lineserver::Peer),
    /// A remote client (its address and certificate name).
    Remote(String),
}

/// Answers one request line from `origin` with the bytes of the response:
/// parsed and handled by `mgr`, or refused when `read_only` and the
/// request changes something. Each request is logged with its origin.
pub(crate) fn respond(mgr: &Manager, read_only: bool, line: Line, origin: Origin) -> Vec<u8> {
    let response = match line {
        Line::TooLong => Response::error(format!("request longer than {MAX_REQUEST_BYTES} bytes")),
        Line::Busy => Response::error("rvirtd has too many clients connected; try again"),
        Line::Request(bytes) => match std::str::from_utf8(bytes) {
            Err(_) => Response::error("malformed request: not UTF-8"),
            Ok(text) => match parse_request(text) {
                Ok(req) => {
                    let socket = if read_only { "read-only" } else { "read-write" };
                    match &origin {
                        Origin::Local(peer) => tracing::info!(pid = peer.pid, uid = peer.uid, gid = peer.gid, socket, request = req.name(), "request"),
                        Origin::Remote(who) => tracing::info!(client = %who, socket, request = req.name(), "request"),
                    }
                    if read_only && !req.is_read_only() {
                        Response::error(format!(
                            "'{}' changes domains, which the read-only socket does not allow; use the read-write socket (root or the daemon's group)",
                            req.name()
                        ))
                    } else {
                        mgr.handle(req)
                    }
                }
                Err(e) => Response::error(e),
            },
        },
    };
    serde_json::to_vec(&response).unwrap_or_else(|_| br#"{"ok":false,"error":"internal error"}"#.to_vec())
}

/// The handler of one socket (see [`respond`]).
fn handler(mgr: Arc<Manager>, read_only: bool) -> Arc<rvirt_lineserver::Handler> {
    Arc::new(move |line: Line| respond(&mgr, read_only, line, Origin::Local(rvirt_lineserver::peer().unwrap_or_default())))
}

/// Accepts connections with `accept` on a thread named `name` and serves
/// each with `serve` on a thread of its own (`conn_name`), at most `max` at
/// once: the next is closed at once. `what` names the listener in the log.
pub(crate) fn accept_bounded<S: Send + 'static>(
    name: &str,
    conn_name: &'static str,
    what: &'static str,
    max: usize,
    mut accept: impl FnMut() -> std::io::Result<S> + Send + 'static,
    serve: impl Fn(S) + Send + Sync + 'static,
) -> Result<()> {
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let serve = Arc::new(serve);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || loop {
            use std::sync::atomic::Ordering::SeqCst;
            let Ok(conn) = accept() else {
                // Out of descriptors, most likely: wait rather than spin.
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            };
            if active.fetch_add(1, SeqCst) >= max {
                active.fetch_sub(1, SeqCst);
                tracing::warn!("{what}: {max} clients already connected; one more refused");
                continue;
            }
            let (serve, count) = (serve.clone(), active.clone());
            let spawned = std::thread::Builder::new().name(conn_name.into()).spawn(move || {
                serve(conn);
                count.fetch_sub(1, SeqCst);
            });
            if spawned.is_err() {
                active.fetch_sub(1, SeqCst);
                tracing::error!("{what}: no thread for a new client");
            }
        })
        .with_context(|| format!("starting the {what}'s thread"))?;
    Ok(())
}

/// Serves clients on the read-write socket (and the read-only one, if
/// bound) until the process ends.
pub fn serve(listener: UnixListener, read_only: Option<UnixListener>, mgr: Arc<Manager>) -> Result<()> {
    rvirt_lineserver::raise_fd_limit();
    if let Some(ro) = read_only {
        rvirt_lineserver::spawn(ro, limits(), handler(mgr.clone(), true)).context("starting the read-only socket server")?;
    }
    let handler = handler(mgr, false);
    rvirt_lineserver::spawn(listener, limits(), handler).context("starting the socket server")?;
    loop {
        std::thread::park();
    }
}
