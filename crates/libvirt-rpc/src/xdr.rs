//! XDR (RFC 4506) as libvirt uses it: big-endian 4-byte units, strings and
//! opaque data padded to 4 bytes, optional values as a bool then the value.

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XdrError {
    /// The data ended inside a value.
    #[error("XDR: truncated: {what} needs {need} more bytes, {left} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes it needed.
        need: usize,
        /// Bytes there were.
        left: usize,
    },
    /// A length over the limit for that value.
    #[error("XDR: {what} of {len} bytes is over the limit of {max}")]
    TooLong {
        /// What was being read.
        what: &'static str,
        /// The length sent.
        len: u64,
        /// libvirt's limit.
        max: usize,
    },
    /// Bytes that are not what the type allows (a bool other than 0/1, a
    /// string that is not UTF-8, non-zero padding).
    #[error("XDR: bad {what}")]
    Invalid {
        /// What was wrong.
        what: &'static str,
    },
}

/// Longest string libvirt sends (`VIR_NET_MESSAGE_STRING_MAX`, 4 MiB).
pub const STRING_MAX: usize = 4 << 20;

fn pad(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Appends XDR values to a buffer.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// `unsigned int`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `int` (and enums).
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `unsigned hyper`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `hyper`.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `bool`.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u32(u32::from(v))
    }

    /// Variable-length opaque data: length, bytes, padding.
    pub fn opaque(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.fixed_opaque(v)
    }

    /// Fixed-length opaque data (a UUID): bytes and padding, no length.
    pub fn fixed_opaque(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self.buf.extend(std::iter::repeat_n(0u8, pad(v.len())));
        self
    }

    /// `string`.
    pub fn string(&mut self, v: &str) -> &mut Self {
        self.opaque(v.as_bytes())
    }

    /// An optional string (`remote_string`: a pointer, so a bool first).
    pub fn opt_string(&mut self, v: Option<&str>) -> &mut Self {
        self.bool(v.is_some());
        if let Some(s) = v {
            self.string(s);
        }
        self
    }
}

/// Reads XDR values from a byte slice, never past it.
#[derive(Debug)]
pub struct Decoder<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], XdrError> {
        if n > self.remaining() {
            return Err(XdrError::Truncated { what, need: n, left: self.remaining() });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn word<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], XdrError> {
        let mut b = [0u8; N];
        b.copy_from_slice(self.take(N, what)?);
        Ok(b)
    }

    /// `unsigned int`.
    pub fn u32(&mut self) -> Result<u32, XdrError> {
        Ok(u32::from_be_bytes(self.word("unsigned int")?))
    }

    /// `int` (and enums).
    pub fn i32(&mut self) -> Result<i32, XdrError> {
        Ok(i32::from_be_bytes(self.word("int")?))
    }

    /// `unsigned hyper`.
    pub fn u64(&mut self) -> Result<u64, XdrError> {
        Ok(u64::from_be_bytes(self.word("unsigned hyper")?))
    }

    /// `hyper`.
    pub fn i64(&mut self) -> Result<i64, XdrError> {
        Ok(i64::from_be_bytes(self.word("hyper")?))
    }

    /// `bool`: exactly 0 or 1.
    pub fn bool(&mut self) -> Result<bool, XdrError> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(XdrError::Invalid { what: "bool (neither 0 nor 1)" }),
        }
    }

    /// Fixed-length opaque data of `len` bytes and its padding (zero).
    pub fn fixed_opaque(&mut self, len: usize) -> Result<&'a [u8], XdrError> {
        let v = self.take(len, "opaque data")?;
        if self.take(pad(len), "padding")?.iter().any(|&b| b != 0) {
            return Err(XdrError::Invalid { what: "padding (not zero)" });
        }
        Ok(v)
    }

    /// Variable-length opaque data of at most `max` bytes.
    pub fn opaque(&mut self, max: usize) -> Result<&'a [u8], XdrError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(XdrError::TooLong { what: "opaque data", len: len as u64, max });
        }
        self.fixed_opaque(len)
    }

    /// `string` of at most [`STRING_MAX`] bytes, UTF-8.
    pub fn string(&mut self) -> Result<&'a str, XdrError> {
        let len = self.u32()? as usize;
        if len > STRING_MAX {
            return Err(XdrError::TooLong { what: "string", len: len as u64, max: STRING_MAX });
        }
        let b = self.fixed_opaque(len)?;
        std::str::from_utf8(b).map_err(|_| XdrError::Invalid { what: "string (not UTF-8)" })
    }

    /// An optional string.
    pub fn opt_string(&mut self) -> Result<Option<&'a str>, XdrError> {
        if self.bool()? {
            self.string().map(Some)
        } else {
            Ok(None)
        }
    }

    /// The length of an array of at most `max` elements (each then read by the caller).
    pub fn array_len(&mut self, max: usize) -> Result<usize, XdrError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(XdrError::TooLong { what: "array", len: len as u64, max });
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_encode_as_rfc_4506_says() {
        let mut e = Encoder::new();
        e.u32(1).i32(-2).u64(3).bool(true).string("abcde").opt_string(None).fixed_opaque(&[9; 16]);
        let b = e.into_bytes();
        assert_eq!(&b[..4], &[0, 0, 0, 1]);
        assert_eq!(&b[4..8], &[0xff, 0xff, 0xff, 0xfe]);
        assert_eq!(&b[8..16], &[0, 0, 0, 0, 0, 0, 0, 3]);
        assert_eq!(&b[16..20], &[0, 0, 0, 1]);
        // Length 5, "abcde", three bytes of padding.
        assert_eq!(&b[20..32], &[0, 0, 0, 5, b'a', b'b', b'c', b'd', b'e', 0, 0, 0]);
        assert_eq!(&b[32..36], &[0, 0, 0, 0], "an absent optional string is one false");
        assert_eq!(b.len(), 36 + 16);
        let mut d = Decoder::new(&b);
        assert_eq!((d.u32().unwrap(), d.i32().unwrap(), d.u64().unwrap(), d.bool().unwrap()), (1, -2, 3, true));
        assert_eq!(d.string().unwrap(), "abcde");
        assert_eq!(d.opt_string().unwrap(), None);
        assert_eq!(d.fixed_opaque(16).unwrap(), &[9; 16]);
        assert_eq!(d.remaining(), 0);
    }

    #[test]
    fn hostile_lengths_and_bytes_are_refused_without_allocating() {
        // A string claiming 4 GiB in an 8-byte message.
        let e = Decoder::new(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]).string().unwrap_err();
        assert!(matches!(e, XdrError::TooLong { .. }), "{e}");
        let e = Decoder::new(&[0, 0, 0, 8, b'a']).string().unwrap_err();
        assert!(matches!(e, XdrError::Truncated { .. }), "{e}");
        assert!(Decoder::new(&[0, 0, 0, 2]).bool().is_err());
        assert!(Decoder::new(&[0, 0, 0, 1, b'a', 1, 0, 0]).string().is_err(), "non-zero padding");
        assert!(Decoder::new(&[0, 0, 0, 2, 0xc3, 0x28, 0, 0]).string().is_err(), "not UTF-8");
        assert!(Decoder::new(&[0, 0, 1, 0]).array_len(16).is_err());
        assert!(Decoder::new(&[0, 0]).u32().is_err());
    }
}
