//! libvirt's connection URIs, as far as rvirt serves them:
//! `qemu:///system` (local), `qemu+unix:///system?socket=PATH`,
//! `qemu+tls://host[:port]/system[?pkipath=DIR&no_verify=1]` and
//! `qemu+ssh://[user@]host[:port]/system[?keyfile=FILE&no_verify=1&no_tty=1]`.

use std::path::PathBuf;

use crate::pki::ClientPki;
use crate::RemoteError;

/// How to reach the daemon a URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// This host's socket (`socket=` names one; otherwise the default).
    Local {
        /// The socket given with `?socket=`.
        socket: Option<PathBuf>,
    },
    /// TLS to a remote daemon.
    Tls(TlsTarget),
    /// ssh to a remote host, where a helper joins the daemon's socket.
    Ssh(SshTarget),
}

/// A TLS connection's far end and credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsTarget {
    /// Host name or address (checked against the server's certificate).
    pub host: String,
    /// Port (16514 unless given).
    pub port: u16,
    /// The client's CA, certificate and key.
    pub pki: ClientPki,
    /// `no_verify=1`: the server's certificate is not checked.
    pub no_verify: bool,
}

/// An ssh connection's far end, as libvirt's client runs ssh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// `user@` in the URI.
    pub user: Option<String>,
    /// Host name or address.
    pub host: String,
    /// Port, when not ssh's own default.
    pub port: Option<u16>,
    /// `keyfile=`: ssh's `-i`.
    pub keyfile: Option<PathBuf>,
    /// `no_verify=1`: ssh's `StrictHostKeyChecking=no`.
    pub no_verify: bool,
    /// `no_tty=1`: ssh's `BatchMode=yes` (no password prompts).
    pub no_tty: bool,
    /// `command=`: the ssh binary.
    pub command: Option<String>,
}

impl SshTarget {
    /// ssh's arguments as libvirt's client gives them, followed by the
    /// command to run on the far side.
    pub fn ssh_args(&self, remote_command: &str) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(p) = self.port {
            a.extend(["-p".into(), p.to_string()]);
        }
        if let Some(u) = &self.user {
            a.extend(["-l".into(), u.clone()]);
        }
        if let Some(k) = &self.keyfile {
            a.extend(["-i".into(), k.display().to_string()]);
        }
        a.extend(["-T".into(), "-e".into(), "none".into()]);
        if self.no_verify {
            a.extend(["-o".into(), "StrictHostKeyChecking=no".into()]);
        }
        if self.no_tty {
            a.extend(["-o".into(), "BatchMode=yes".into()]);
        }
        a.extend(["--".into(), self.host.clone(), remote_command.into()]);
        a
    }
}

/// Parses a connection URI. Plain TCP (`qemu+tcp`) and other drivers are
/// refused with a reason.
pub fn parse(text: &str) -> Result<Transport, RemoteError> {
    let bad = |reason: &str| RemoteError::Uri { uri: text.to_string(), reason: reason.to_string() };
    let u = url::Url::parse(text).map_err(|e| bad(&e.to_string()))?;
    let (driver, transport) = match u.scheme().split_once('+') {
        Some((d, t)) => (d, Some(t)),
        None => (u.scheme(), None),
    };
    if driver != "qemu" {
        return Err(bad("rvirt serves the 'qemu' driver only (qemu:///system and its remote forms)"));
    }
    if u.path() != "/system" {
        return Err(bad("rvirtd is a system daemon: the path must be /system"));
    }
    let mut socket = None;
    let mut pkipath = None;
    let mut keyfile = None;
    let (mut no_verify, mut no_tty, mut command) = (false, false, None);
    for (k, v) in u.query_pairs() {
        let flag = || v != "0";
        match k.as_ref() {
            "socket" => socket = Some(PathBuf::from(v.as_ref())),
            "pkipath" => pkipath = Some(PathBuf::from(v.as_ref())),
            "keyfile" => keyfile = Some(PathBuf::from(v.as_ref())),
            "no_verify" => no_verify = flag(),
            "no_tty" => no_tty = flag(),
            "command" => command = Some(v.into_owned()),
            // libvirt's other parameters (name, sshauth, mode, proxy, …) change nothing here.
            _ => {}
        }
    }
    let host = || -> Result<String, RemoteError> {
        let h = u.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("a remote transport needs a host"))?;
        Ok(h.trim_start_matches('[').trim_end_matches(']').to_string())
    };
    match transport {
        None | Some("unix") => {
            if u.host_str().is_some_and(|h| !h.is_empty()) {
                return Err(bad("a host without a transport: write qemu+tls://HOST/system or qemu+ssh://HOST/system"));
            }
            Ok(Transport::Local { socket })
        }
        Some("tls") => Ok(Transport::Tls(TlsTarget {
            host: host()?,
            port: u.port().unwrap_or(crate::tls::DEFAULT_PORT),
            pki: pkipath.map(|d| ClientPki::in_dir(&d)).unwrap_or_else(ClientPki::default_for_user),
            no_verify,
        })),
        Some("ssh") => Ok(Transport::Ssh(SshTarget {
            user: Some(u.username()).filter(|s| !s.is_empty()).map(str::to_string),
            host: host()?,
            port: u.port(),
            keyfile,
            no_verify,
            no_tty,
            command,
        })),
        Some("tcp") => Err(bad("plain TCP carries no encryption or authentication and rvirtd does not offer it: use qemu+tls:// or qemu+ssh://")),
        Some(other) => Err(bad(&format!("unknown transport '{other}' (rvirt has unix, tls and ssh)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_s_uris_name_their_transport() {
        assert_eq!(parse("qemu:///system").unwrap(), Transport::Local { socket: None });
        assert_eq!(parse("qemu+unix:///system?socket=/tmp/s").unwrap(), Transport::Local { socket: Some("/tmp/s".into()) });
        let Transport::Tls(t) = parse("qemu+tls://10.1.2.3:1234/system?pkipath=/p&no_verify=1").unwrap() else { panic!() };
        assert_eq!((t.host.as_str(), t.port, t.no_verify), ("10.1.2.3", 1234, true));
        assert_eq!(t.pki, ClientPki::in_dir(std::path::Path::new("/p")));
        let Transport::Tls(t) = parse("qemu+tls://[fd00::1]/system").unwrap() else { panic!() };
        assert_eq!((t.host.as_str(), t.port), ("fd00::1", 16514));
        let Transport::Ssh(s) = parse("qemu+ssh://admin@host.example:2222/system?keyfile=/k&no_verify=1").unwrap() else { panic!() };
        assert_eq!(
            s.ssh_args("cmd"),
            ["-p", "2222", "-l", "admin", "-i", "/k", "-T", "-e", "none", "-o", "StrictHostKeyChecking=no", "--", "host.example", "cmd"]
        );
    }

    #[test]
    fn what_rvirt_does_not_serve_is_refused_with_a_reason() {
        for (uri, why) in [
            ("qemu+tcp://h/system", "plain TCP"),
            ("qemu:///session", "/system"),
            ("xen:///system", "'qemu' driver"),
            ("qemu+tls:///system", "needs a host"),
            ("qemu://h/system", "without a transport"),
            ("qemu+foo://h/system", "unknown transport"),
            ("not a uri", "connection URI"),
        ] {
            let e = parse(uri).unwrap_err().to_string();
            assert!(e.contains(why), "{uri}: {e}");
        }
    }
}
