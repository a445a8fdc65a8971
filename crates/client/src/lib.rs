//! The library behind `rvirt`, the virsh-like client: a connection to
//! rvirtd, local or remote ([`Connection`]), the text each command prints ([`format`]), the
//! serial console attachment ([`console`]) and the virt-install-like domain
//! builder ([`install`]).

pub mod console;
pub mod everyday;
pub mod format;
pub mod install;
pub mod snapshots;
pub mod storage;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{bail, Context, Result};
use rvirt_domain::protocol::{Request, Response, DEFAULT_SOCKET};
use rvirt_remote::uri::{self, Transport};

/// A byte stream to the daemon, whatever carries it.
trait Duplex: Read + Write + Send {}
impl<T: Read + Write + Send> Duplex for T {}

/// ssh's standard input and output, as one stream.
struct SshPipe {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

impl Read for SshPipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stdout.read(buf)
    }
}

impl Write for SshPipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stdin.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stdin.flush()
    }
}

impl Drop for SshPipe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `rvirt` runs on the far side of ssh: the helper rvirtd ships,
/// joined to rvirtd's own socket.
pub const SSH_REMOTE_COMMAND: &str = "virt-ssh-helper --rvirt 'qemu:///system'";

/// A connection to rvirtd: its local socket, or a remote daemon over TLS
/// or ssh.
pub struct Connection {
    name: String,
    remote: bool,
    stream: BufReader<Box<dyn Duplex>>,
}

impl Connection {
    /// Connects to the daemon at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path).with_context(|| {
            format!("cannot connect to rvirtd at {} (is rvirtd running? --connect names another socket or a URI)", path.display())
        })?;
        Ok(Self { name: path.display().to_string(), remote: false, stream: BufReader::new(Box::new(stream)) })
    }

    /// Connects to what `target` names: a socket path, or a libvirt URI
    /// (`qemu:///system`, `qemu+unix:///system?socket=PATH`,
    /// `qemu+tls://HOST[:PORT]/system[?pkipath=DIR]`,
    /// `qemu+ssh://[USER@]HOST[:PORT]/system[?keyfile=FILE]`).
    pub fn connect(target: &str) -> Result<Self> {
        if !target.contains("://") {
            return Self::open(Path::new(target));
        }
        match uri::parse(target)? {
            Transport::Local { socket } => Self::open(socket.as_deref().unwrap_or(Path::new(DEFAULT_SOCKET))),
            Transport::Tls(t) => {
                let s = rvirt_remote::tls::connect(&t.host, t.port, &t.pki, !t.no_verify)?;
                Ok(Self { name: target.to_string(), remote: true, stream: BufReader::new(Box::new(s)) })
            }
            Transport::Ssh(t) => {
                let mut child = Command::new(t.command.as_deref().unwrap_or("ssh"))
                    .args(t.ssh_args(SSH_REMOTE_COMMAND))
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .context("running ssh")?;
                let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                    bail!("ssh's pipes");
                };
                let pipe = SshPipe { child, stdin, stdout };
                Ok(Self { name: target.to_string(), remote: true, stream: BufReader::new(Box::new(pipe)) })
            }
        }
    }

    /// Whether the daemon is on another host (its files and ptys are there).
    pub fn is_remote(&self) -> bool {
        self.remote
    }

    /// Sends `req`; returns the response whether or not it reports success.
    pub fn call(&mut self, req: &Request) -> Result<Response> {
        let mut line = serde_json::to_string(req)?;
        line.push('\n');
        let w = self.stream.get_mut();
        w.write_all(line.as_bytes()).and_then(|_| w.flush()).with_context(|| format!("writing to {}", self.name))?;
        // Answers carry at most a few definitions; a bound keeps a broken
        // daemon from filling the client's memory.
        const MAX_ANSWER: u64 = 64 << 20;
        let mut answer = String::new();
        let n = (&mut self.stream).take(MAX_ANSWER).read_line(&mut answer).with_context(|| format!("reading from {}", self.name))?;
        if n == 0 {
            bail!("rvirtd closed the connection without answering");
        }
        if !answer.ends_with('\n') && n as u64 >= MAX_ANSWER {
            bail!("rvirtd's answer is longer than {MAX_ANSWER} bytes");
        }
        serde_json::from_str(&answer).with_context(|| format!("rvirtd's answer is not a response: {}", answer.trim()))
    }

    /// Sends `req` and turns a refusal into an error carrying the daemon's message.
    pub fn expect(&mut self, req: &Request) -> Result<Response> {
        let r = self.call(req)?;
        if !r.ok {
            bail!("{}", r.error.unwrap_or_else(|| "the request failed".into()));
        }
        Ok(r)
    }
}
