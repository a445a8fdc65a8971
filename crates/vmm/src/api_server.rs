//! The control API socket: served by `rvirt-lineserver` (one poll thread,
//! a few workers, every buffer bounded), which hands each parsed request to
//! the VMM's main thread, which owns the VM.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rvirt_lineserver::Line;

use rvirt_api::{parse_request, Request, Response, MAX_REQUEST_BYTES};
use vmm_sys_util::eventfd::EventFd;

use crate::{Error, Result};

/// How long a connection waits for the main thread to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A request waiting for the main thread, with the way back to its client.
pub struct ApiCall {
    /// The parsed request.
    pub request: Request,
    /// A descriptor the client sent with it (SCM_RIGHTS), if any.
    pub fd: Option<std::os::fd::OwnedFd>,
    reply: Sender<Response>,
}

impl ApiCall {
    /// Sends the answer back to the client.
    pub fn respond(self, response: Response) {
        let _ = self.reply.send(response);
    }
}

/// The listening socket and the queue of requests for the main thread.
pub struct ApiServer {
    path: PathBuf,
    calls: Mutex<Receiver<ApiCall>>,
    wakeup: Arc<EventFd>,
    server: rvirt_lineserver::Server,
}

fn sock_err(path: &Path, detail: impl ToString) -> Error {
    Error::ApiSocket { path: path.to_path_buf(), detail: detail.to_string() }
}

impl ApiServer {
    /// Listens on `path`. A stale socket left by a dead VMM is replaced; a
    /// live one, or any other kind of file, is an error.
    pub fn bind(path: &Path) -> Result<Self> {
        Self::listen(path)?.serve()
    }

    /// Binds `path` (as [`ApiServer::bind`]) without starting threads, so
    /// the socket can be made before the VMM enters its jail and served after.
    pub fn listen(path: &Path) -> Result<ApiListener> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(sock_err(path, "exists and is not a socket"));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(sock_err(path, "already in use by a running VMM"));
            }
            std::fs::remove_file(path).map_err(|e| sock_err(path, format!("cannot remove stale socket: {e}")))?;
        }
        // Mode 0600 from birth, whatever the umask: the API controls the VM.
        let listener = rvirt_lineserver::bind_with_mode(path, 0o600).map_err(|e| sock_err(path, e))?;
        Ok(ApiListener { path: path.to_path_buf(), listener })
    }
}

/// A bound API socket not served yet.
pub struct ApiListener {
    path: PathBuf,
    listener: std::os::unix::net::UnixListener,
}

impl ApiListener {
    /// Starts the threads that serve it.
    pub fn serve(self) -> Result<ApiServer> {
        let Self { path, listener } = self;
        let path = path.as_path();
        let wakeup = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| sock_err(path, e))?);
        let (tx, rx) = mpsc::channel::<ApiCall>();
        let main_wakeup = wakeup.clone();
        let tx = Mutex::new(tx);
        let handler: Arc<rvirt_lineserver::Handler> = Arc::new(move |line: Line| {
            let response = match line {
                Line::TooLong => Response::error(format!("malformed request: longer than {MAX_REQUEST_BYTES} bytes")),
                Line::Busy => Response::error("too many connections to this VMM"),
                Line::Request(bytes) => match std::str::from_utf8(bytes).map_err(|_| "malformed request: not UTF-8".to_string()).and_then(parse_request) {
                    Err(e) => Response::error(e),
                    Ok(request) => {
                        let (reply_tx, reply_rx) = mpsc::channel();
                        let fd = rvirt_lineserver::take_fds().into_iter().next();
                        let sent = tx.lock().unwrap_or_else(|e| e.into_inner()).send(ApiCall { request, fd, reply: reply_tx });
                        if sent.is_err() {
                            Response::error("the VM is shutting down")
                        } else {
                            let _ = main_wakeup.write(1);
                            reply_rx.recv_timeout(REPLY_TIMEOUT).unwrap_or_else(|_| Response::error("the VMM did not answer in time"))
                        }
                    }
                },
            };
            serde_json::to_vec(&response).unwrap_or_else(|_| br#"{"ok":false,"error":"internal error"}"#.to_vec())
        });
        let limits = rvirt_lineserver::Limits {
            max_line: MAX_REQUEST_BYTES,
            workers: 4,
            max_connections: 256,
            thread_start: Some(|| rvirt_sandbox::seccomp::enter_or_exit(rvirt_sandbox::ThreadKind::Api)),
            ..Default::default()
        };
        let server = rvirt_lineserver::spawn(listener, limits, handler).map_err(|e| sock_err(path, e))?;
        Ok(ApiServer { path: path.to_path_buf(), calls: Mutex::new(rx), wakeup, server })
    }
}

impl ApiServer {

    /// Readable when requests are queued.
    pub fn wakeup_fd(&self) -> &EventFd {
        &self.wakeup
    }

    /// Takes every queued request.
    pub fn drain(&self) -> Vec<ApiCall> {
        let _ = self.wakeup.read();
        let rx = rvirt_devices::bus::lock(&self.calls);
        rx.try_iter().collect()
    }

    /// Waits (briefly) until answers already given have been written to their clients.
    pub fn flush(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.server.stats().in_progress > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rvirt_api::ApiClient;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    fn tmp_path(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rvirt-apisrv-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join("api.sock")
    }

    #[test]
    fn requests_reach_the_main_thread_and_errors_do_not() {
        let p = tmp_path("flow");
        let server = Arc::new(ApiServer::bind(&p).unwrap());
        let s2 = server.clone();
        let main = std::thread::spawn(move || loop {
            for call in s2.drain() {
                let done = call.request == Request::Stop;
                call.respond(Response::ok());
                if done {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        });
        let mut c = ApiClient::connect(&p, Duration::from_secs(5)).unwrap();
        assert!(c.call(&Request::Status).unwrap().ok);
        // A malformed line is answered on the same connection, which stays usable.
        let mut raw = UnixStream::connect(&p).unwrap();
        raw.write_all(b"{\"command\":\"fly\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(raw.try_clone().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("malformed request"), "{line}");
        assert!(c.call(&Request::Stop).unwrap().ok);
        main.join().unwrap();
    }

    #[test]
    fn a_thousand_idle_connections_do_not_stop_the_api_answering() {
        let p = tmp_path("idle");
        let server = Arc::new(ApiServer::bind(&p).unwrap());
        let s2 = server.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let main = std::thread::spawn(move || {
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                for call in s2.drain() {
                    call.respond(Response::ok());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        // 200 idle clients held open: the API still answers.
        let idle: Vec<UnixStream> = (0..200).map(|_| UnixStream::connect(&p).unwrap()).collect();
        let mut c = ApiClient::connect(&p, Duration::from_secs(5)).unwrap();
        assert!(c.call(&Request::Status).unwrap().ok);
        // Past the cap of 256, more clients are told so and closed at once.
        let extra: Vec<UnixStream> = (0..800).filter_map(|_| UnixStream::connect(&p).ok()).collect();
        let mut answer = String::new();
        BufReader::new(extra.last().unwrap().try_clone().unwrap()).read_line(&mut answer).unwrap();
        assert!(answer.contains("too many connections"), "{answer}");
        assert!(server.server.stats().connections <= 256, "{:?}", server.server.stats());
        assert!(c.call(&Request::Status).unwrap().ok);
        drop((idle, extra));
        let threads = std::fs::read_dir("/proc/self/task").unwrap().count();
        assert!(threads < 100, "{threads} threads");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        main.join().unwrap();
    }

    #[test]
    fn oversized_lines_are_refused_and_closed() {
        let p = tmp_path("big");
        let _server = ApiServer::bind(&p).unwrap();
        let mut raw = UnixStream::connect(&p).unwrap();
        let junk = vec![b'a'; MAX_REQUEST_BYTES + 100];
        let _ = raw.write_all(&junk);
        let mut line = String::new();
        BufReader::new(raw).read_line(&mut line).unwrap();
        assert!(line.contains("\"ok\":false"), "{line}");
    }

    #[test]
    fn refuses_regular_files_and_live_sockets_but_replaces_stale_ones() {
        let p = tmp_path("files");
        std::fs::write(&p, b"precious").unwrap();
        let e = ApiServer::bind(&p).err().unwrap().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        std::fs::remove_file(&p).unwrap();

        let live = ApiServer::bind(&p).unwrap();
        assert!(ApiServer::bind(&p).err().unwrap().to_string().contains("in use"));
        drop(live);
        assert!(!p.exists(), "socket removed on drop");

        // A socket file whose listener is gone.
        drop(UnixListener::bind(&p).unwrap());
        let _again = ApiServer::bind(&p).unwrap();
    }

    #[test]
    fn unusable_directory_is_reported() {
        let e = ApiServer::bind(Path::new("/nonexistent/dir/api.sock")).err().unwrap().to_string();
        assert!(e.starts_with("API socket /nonexistent/dir/api.sock"), "{e}");
    }
}
