//! Bounds on a definition checked before it is parsed, and line numbers
//! that cost one pass over the text however many are asked for.
//!
//! A definition comes from a local client, who may be hostile: a few
//! kilobytes nested thousands deep would overflow the parser's stack, and a
//! line number computed from the start for each of 40,000 unknown elements
//! made a 1 MiB definition take a minute.

use std::cell::Cell;

use super::XmlError;

/// Largest definition accepted (libvirt's RPC carries up to 32 MiB; real
/// definitions are a few KiB, a vagrant one with metadata tens of KiB).
pub const MAX_XML_BYTES: usize = 4 << 20;
/// Deepest element nesting accepted (libxml2's default limit).
pub const MAX_DEPTH: usize = 256;
/// Most unsupported elements kept from one definition.
pub const MAX_UNKNOWN: usize = 1024;

fn too(message: String) -> XmlError {
    XmlError { line: 0, element: String::new(), message }
}

/// Refuses a definition over [`MAX_XML_BYTES`] or nested deeper than
/// [`MAX_DEPTH`], in one pass and without recursion. Comments, CDATA,
/// processing instructions, declarations and quoted attribute values are
/// skipped; malformed text is left for the parser to name.
pub fn check_shape(xml: &str) -> Result<(), XmlError> {
    if xml.len() > MAX_XML_BYTES {
        return Err(too(format!("the definition is {} bytes; at most {MAX_XML_BYTES} are accepted", xml.len())));
    }
    let b = xml.as_bytes();
    let (mut i, mut depth) = (0usize, 0usize);
    let skip_to = |from: usize, end: &[u8]| -> usize {
        b[from..].windows(end.len()).position(|w| w == end).map_or(b.len(), |p| from + p + end.len())
    };
    while i < b.len() {
        if b[i] != b'<' {
            i += 1;
            continue;
        }
        let rest = &b[i..];
        if rest.starts_with(b"<!--") {
            i = skip_to(i + 4, b"-->");
        } else if rest.starts_with(b"<![CDATA[") {
            i = skip_to(i + 9, b"]]>");
        } else if rest.starts_with(b"<?") {
            i = skip_to(i + 2, b"?>");
        } else if rest.starts_with(b"<!") {
            i = skip_to(i + 2, b">");
        } else if rest.starts_with(b"</") {
            depth = depth.saturating_sub(1);
            i = skip_to(i + 2, b">");
        } else {
            // A start tag: find its end outside quoted values.
            let mut j = i + 1;
            let mut quote = None;
            while j < b.len() {
                match (quote, b[j]) {
                    (None, q @ (b'"' | b'\'')) => quote = Some(q),
                    (Some(q), c) if c == q => quote = None,
                    (None, b'>') => break,
                    _ => {}
                }
                j += 1;
            }
            let empty = j > i + 1 && j < b.len() && b[j - 1] == b'/';
            if !empty {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(too(format!("elements are nested more than {MAX_DEPTH} deep")));
                }
            }
            i = j + 1;
        }
    }
    Ok(())
}

/// Line numbers of byte offsets, asked for mostly in increasing order:
/// each question counts newlines from the previous answer, so a whole
/// document's worth of questions costs one pass.
pub struct LineIndex<'a> {
    text: &'a str,
    last: Cell<(usize, u32)>,
}

impl<'a> LineIndex<'a> {
    /// An index over `text`.
    pub fn new(text: &'a str) -> Self {
        Self { text, last: Cell::new((0, 1)) }
    }

    /// The 1-based line of byte `offset`.
    pub fn line(&self, offset: usize) -> u32 {
        let offset = offset.min(self.text.len());
        let (mut from, mut line) = self.last.get();
        if offset < from {
            (from, line) = (0, 1);
        }
        line += self.text.as_bytes()[from..offset].iter().filter(|&&c| c == b'\n').count() as u32;
        self.last.set((offset, line));
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_is_counted_without_being_fooled() {
        let nest = |n: usize| format!("{}{}", "<a>".repeat(n), "</a>".repeat(n));
        check_shape(&nest(MAX_DEPTH)).unwrap();
        assert!(check_shape(&nest(MAX_DEPTH + 1)).unwrap_err().to_string().contains("nested more than"));
        // Siblings, empty elements, comments, CDATA and quoted '>' add no depth.
        let flat = format!("<d x='>' y=\"<b>\">{}<!-- <a><a> --><![CDATA[<a><a>]]><?pi <a> ?></d>", "<e/><f></f>".repeat(10_000));
        check_shape(&flat).unwrap();
        assert!(check_shape(&"x".repeat(MAX_XML_BYTES + 1)).unwrap_err().to_string().contains("at most"));
    }

    #[test]
    fn lines_in_any_order() {
        let idx = LineIndex::new("a\nb\nc\n");
        assert_eq!((idx.line(0), idx.line(2), idx.line(4), idx.line(1), idx.line(100)), (1, 2, 3, 1, 4));
    }
}
