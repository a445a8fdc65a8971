//! The management socket: one thread per client, one JSON request per line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rvirt_domain::protocol::{parse_request, Response, MAX_REQUEST_BYTES};

use crate::manager::Manager;

/// Binds the daemon's socket at `path`: mode 0600, or 0660 owned by `group`
/// when given, so only root (or the daemon's user) and that group reach it.
/// A socket file nobody answers on (a daemon that died) is replaced; one a
/// live daemon answers on is an error.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("another rvirtd is already listening on {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let gid = group.map(group_id).transpose()?;
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
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

/// Accepts clients for ever.
pub fn serve(listener: UnixListener, mgr: Arc<Manager>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let mgr = mgr.clone();
                let spawned = std::thread::Builder::new().name("client".into()).spawn(move || client(stream, &mgr));
                if let Err(e) = spawned {
                    tracing::error!("cannot start a client thread: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

fn client(stream: UnixStream, mgr: &Manager) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        // One byte more than allowed tells an overlong request from a full one.
        match (&mut reader).take(MAX_REQUEST_BYTES as u64 + 1).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let overlong = line.len() > MAX_REQUEST_BYTES;
        let response = if overlong {
            Response::error(format!("request longer than {MAX_REQUEST_BYTES} bytes"))
        } else {
            match std::str::from_utf8(&line) {
                Err(_) => Response::error("malformed request: not UTF-8"),
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => match parse_request(text.trim()) {
                    Ok(req) => mgr.handle(req),
                    Err(e) => Response::error(e),
                },
            }
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| br#"{"ok":false,"error":"internal error"}"#.to_vec());
        out.push(b'\n');
        if writer.write_all(&out).is_err() || overlong {
            return;
        }
    }
}
