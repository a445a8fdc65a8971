//! The library behind `rvirt`, the virsh-like client: a connection to
//! rvirtd ([`Connection`]), the text each command prints ([`format`]), the
//! serial console attachment ([`console`]) and the virt-install-like domain
//! builder ([`install`]).

pub mod console;
pub mod everyday;
pub mod format;
pub mod install;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rvirt_domain::protocol::{Request, Response};

/// A connection to rvirtd's socket.
pub struct Connection {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Connection {
    /// Connects to the daemon at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path).with_context(|| {
            format!("cannot connect to rvirtd at {} (is rvirtd running? --connect names another socket)", path.display())
        })?;
        let writer = stream.try_clone()?;
        Ok(Self { path: path.to_path_buf(), reader: BufReader::new(stream), writer })
    }

    /// Sends `req`; returns the response whether or not it reports success.
    pub fn call(&mut self, req: &Request) -> Result<Response> {
        let mut line = serde_json::to_string(req)?;
        line.push('\n');
        self.writer.write_all(line.as_bytes()).with_context(|| format!("writing to {}", self.path.display()))?;
        // Answers carry at most a few definitions; a bound keeps a broken
        // daemon from filling the client's memory.
        const MAX_ANSWER: u64 = 64 << 20;
        let mut answer = String::new();
        let n = std::io::Read::take(&mut self.reader, MAX_ANSWER).read_line(&mut answer).with_context(|| format!("reading from {}", self.path.display()))?;
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
