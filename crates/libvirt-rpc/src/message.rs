//! The frame of every libvirt RPC message: a 4-byte length (counting
//! itself), a 24-byte header (program, version, procedure, type, serial,
//! status), then the payload; and the error a failed call is answered with.

use std::io::Read;

use crate::xdr::{Decoder, Encoder, XdrError};

/// The `remote` program: every virConnect*/virDomain* call.
pub const REMOTE_PROGRAM: u32 = 0x2000_8086;
/// The `remote` program's version.
pub const REMOTE_VERSION: u32 = 1;
/// The keepalive program ("keep").
pub const KEEPALIVE_PROGRAM: u32 = 0x6b65_6570;
/// The keepalive program's version.
pub const KEEPALIVE_VERSION: u32 = 1;
/// Largest message without its length word (`VIR_NET_MESSAGE_MAX`, 32 MiB).
pub const MESSAGE_MAX: usize = 32 << 20;
/// Bytes of the length word.
pub const LEN_BYTES: usize = 4;
/// Bytes of the header.
pub const HEADER_BYTES: usize = 24;
/// libvirt's error code for a procedure the server does not implement;
/// clients (virtinst) probe features with calls that get it.
pub const VIR_ERR_NO_SUPPORT: i32 = 3;
/// `VIR_ERR_ERROR`: the level of an error (not a warning).
pub const VIR_ERR_LEVEL_ERROR: i32 = 2;

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// The connection failed or ended inside a message.
    #[error("reading a libvirt message: {0}")]
    Io(#[from] std::io::Error),
    /// The length word is below a header's size or over the limit.
    #[error("libvirt message length {0} is outside {min}..={1}", min = LEN_BYTES + HEADER_BYTES)]
    BadLength(u32, usize),
    /// The header does not decode.
    #[error(transparent)]
    Xdr(#[from] XdrError),
    /// A type or status number libvirt does not define.
    #[error("libvirt message header: unknown {what} {value}")]
    Unknown {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: i32,
    },
}

/// `virNetMessageType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageType {
    /// A call expecting a reply.
    Call = 0,
    /// The reply to a call.
    Reply = 1,
    /// An event or keepalive, no reply.
    Message = 2,
    /// Stream data (console).
    Stream = 3,
    /// A call carrying descriptors.
    CallWithFds = 4,
    /// A reply carrying descriptors.
    ReplyWithFds = 5,
}

/// `virNetMessageStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageStatus {
    /// Success (and every call's status).
    Ok = 0,
    /// The payload is a [`RemoteError`].
    Error = 1,
    /// More stream data follows.
    Continue = 2,
}

/// `virNetMessageHeader`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Program number ([`REMOTE_PROGRAM`], [`KEEPALIVE_PROGRAM`]).
    pub prog: u32,
    /// Program version.
    pub vers: u32,
    /// Procedure number within the program.
    pub proc_: i32,
    /// Call, reply, message or stream.
    pub kind: MessageType,
    /// Matches a reply to its call.
    pub serial: u32,
    /// Ok, error or continue.
    pub status: MessageStatus,
}

impl Header {
    fn encode(&self, e: &mut Encoder) {
        e.u32(self.prog).u32(self.vers).i32(self.proc_).i32(self.kind as i32).u32(self.serial).i32(self.status as i32);
    }

    fn decode(d: &mut Decoder) -> Result<Self, MessageError> {
        let (prog, vers, proc_) = (d.u32()?, d.u32()?, d.i32()?);
        let kind = match d.i32()? {
            0 => MessageType::Call,
            1 => MessageType::Reply,
            2 => MessageType::Message,
            3 => MessageType::Stream,
            4 => MessageType::CallWithFds,
            5 => MessageType::ReplyWithFds,
            v => return Err(MessageError::Unknown { what: "message type", value: v }),
        };
        let serial = d.u32()?;
        let status = match d.i32()? {
            0 => MessageStatus::Ok,
            1 => MessageStatus::Error,
            2 => MessageStatus::Continue,
            v => return Err(MessageError::Unknown { what: "status", value: v }),
        };
        Ok(Self { prog, vers, proc_, kind, serial, status })
    }

    /// The header of the reply to this call, with `status`.
    pub fn reply(&self, status: MessageStatus) -> Self {
        Self { kind: MessageType::Reply, status, ..*self }
    }
}

/// One message: its header and XDR payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// The header.
    pub header: Header,
    /// The payload, XDR-encoded.
    pub payload: Vec<u8>,
}

impl Packet {
    /// The message as sent: length word, header, payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        e.u32((LEN_BYTES + HEADER_BYTES + self.payload.len()) as u32);
        self.header.encode(&mut e);
        let mut out = e.into_bytes();
        out.extend_from_slice(&self.payload);
        out
    }

    /// Reads one message. The length is checked before the body is read or
    /// any memory set aside for it.
    pub fn read_from(r: &mut impl Read) -> Result<Self, MessageError> {
        Self::read_limited(r, MESSAGE_MAX)
    }

    /// [`Packet::read_from`] with a lower limit on the body (header and
    /// payload): a server knows how large the calls it serves can be.
    pub fn read_limited(r: &mut impl Read, max_body: usize) -> Result<Self, MessageError> {
        let max_body = max_body.min(MESSAGE_MAX);
        let mut len = [0u8; LEN_BYTES];
        r.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len);
        let body = (len as usize)
            .checked_sub(LEN_BYTES)
            .filter(|b| (HEADER_BYTES..=max_body).contains(b))
            .ok_or(MessageError::BadLength(len, LEN_BYTES + max_body))?;
        let mut buf = vec![0u8; body];
        r.read_exact(&mut buf)?;
        let mut d = Decoder::new(&buf);
        let header = Header::decode(&mut d)?;
        Ok(Self { header, payload: buf[HEADER_BYTES..].to_vec() })
    }
}

/// `virNetMessageError`, the payload of a reply with status error.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteError {
    /// `virErrorNumber` (e.g. [`VIR_ERR_NO_SUPPORT`]).
    pub code: i32,
    /// `virErrorDomain`: which part of libvirt raised it.
    pub domain: i32,
    /// The message users see.
    pub message: Option<String>,
    /// `virErrorLevel`.
    pub level: i32,
    /// Extra strings some errors carry.
    pub str1: Option<String>,
}

impl RemoteError {
    /// An error of `code` with `message`.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self { code, message: Some(message.into()), level: VIR_ERR_LEVEL_ERROR, ..Self::default() }
    }

    /// The XDR payload (no domain or network object attached).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        e.i32(self.code).i32(self.domain).opt_string(self.message.as_deref()).i32(self.level);
        e.bool(false); // dom
        e.opt_string(self.str1.as_deref()).opt_string(None).opt_string(None);
        e.i32(0).i32(0); // int1, int2
        e.bool(false); // net
        e.into_bytes()
    }

    /// Decodes an error payload (a client's view, for tests and tools).
    pub fn decode(data: &[u8]) -> Result<Self, XdrError> {
        let mut d = Decoder::new(data);
        let (code, domain) = (d.i32()?, d.i32()?);
        let message = d.opt_string()?.map(str::to_string);
        let level = d.i32()?;
        if d.bool()? {
            return Err(XdrError::Invalid { what: "error with a domain object (not read here)" });
        }
        let str1 = d.opt_string()?.map(str::to_string);
        Ok(Self { code, domain, message, level, str1 })
    }

    /// The reply that answers `call` with this error.
    pub fn reply_to(&self, call: &Header) -> Packet {
        Packet { header: call.reply(MessageStatus::Error), payload: self.encode() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(proc_: i32, serial: u32, payload: Vec<u8>) -> Packet {
        let header = Header { prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc_, kind: MessageType::Call, serial, status: MessageStatus::Ok };
        Packet { header, payload }
    }

    #[test]
    fn a_call_is_framed_as_libvirt_frames_it() {
        // REMOTE_PROC_CONNECT_OPEN (1), serial 0: remote_connect_open_args
        // { remote_string name; unsigned int flags } for "qemu:///system".
        let mut args = Encoder::new();
        args.opt_string(Some("qemu:///system")).u32(0);
        let bytes = call(1, 0, args.into_bytes()).encode();
        assert_eq!(&bytes[..4], &(bytes.len() as u32).to_be_bytes(), "the length counts itself");
        assert_eq!(&bytes[4..28], &[0x20, 0x00, 0x80, 0x86, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[28..36], &[0, 0, 0, 1, 0, 0, 0, 14], "present, 14 bytes");
        assert_eq!(bytes.len(), 28 + 8 + 16 + 4);
        let back = Packet::read_from(&mut &bytes[..]).unwrap();
        assert_eq!(back, call(1, 0, bytes[28..].to_vec()));
    }

    #[test]
    fn unimplemented_calls_get_no_support_errors_a_client_can_read() {
        let c = call(999, 7, Vec::new());
        let reply = RemoteError::new(VIR_ERR_NO_SUPPORT, "this function is not supported by rvirtd: procedure 999").reply_to(&c.header);
        let back = Packet::read_from(&mut &reply.encode()[..]).unwrap();
        assert_eq!(back.header, Header { kind: MessageType::Reply, status: MessageStatus::Error, ..c.header });
        let err = RemoteError::decode(&back.payload).unwrap();
        assert_eq!(err.code, 3);
        assert_eq!(err.level, VIR_ERR_LEVEL_ERROR);
        assert!(err.message.unwrap().contains("procedure 999"));
    }

    #[test]
    fn hostile_frames_are_refused_before_their_bodies_are_read() {
        for len in [0u32, 3, 27, (LEN_BYTES + MESSAGE_MAX + 1) as u32, u32::MAX] {
            let mut bytes = len.to_be_bytes().to_vec();
            bytes.extend_from_slice(&[0; 64]);
            let e = Packet::read_from(&mut &bytes[..]).unwrap_err();
            assert!(matches!(e, MessageError::BadLength(l, _) if l == len), "{len}: {e}");
        }
        // A server's own lower limit.
        let big = call(1, 1, vec![0; 4096]).encode();
        assert!(matches!(Packet::read_limited(&mut &big[..], 1024).unwrap_err(), MessageError::BadLength(_, 1028)));
        assert!(Packet::read_limited(&mut &big[..], 8192).is_ok());
        // A frame cut short, and header fields libvirt does not define.
        let mut good = call(1, 1, vec![0; 8]).encode();
        assert!(matches!(Packet::read_from(&mut &good[..20]).unwrap_err(), MessageError::Io(_)));
        good[16] = 9; // type
        assert!(matches!(Packet::read_from(&mut &good[..]).unwrap_err(), MessageError::Unknown { what: "message type", .. }));
    }
}
