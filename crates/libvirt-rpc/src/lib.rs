//! libvirt's RPC wire format, written from `virnetprotocol.x` and
//! `remote_protocol.x`: XDR encoding ([`xdr`]) and the framing of every
//! message ([`message`]: length, header, payload, error replies). rvirtd
//! builds its libvirt front end (issue 21) on it; every length a peer sends
//! is checked against libvirt's own limits before anything is allocated.

pub mod message;
pub mod remote;
pub mod xdr;

pub use message::{Header, MessageError, MessageStatus, MessageType, Packet, RemoteError};
pub use remote::RemoteDomain;
pub use xdr::{Decoder, Encoder, XdrError};
