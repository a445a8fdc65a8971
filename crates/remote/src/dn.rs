//! Client certificate names and libvirt's `tls_allowed_dn_list`: the
//! subject is written as GnuTLS's `gnutls_x509_crt_get_dn` writes it
//! (`C=GB,O=Example,CN=client`: attributes in the certificate's order,
//! RFC 4514 escaping), and matched against patterns with `*` and `?`.

use x509_parser::prelude::{FromDer, X509Certificate};

/// The subject of a DER certificate as libvirt's allow-list sees it; `None`
/// when the certificate cannot be parsed.
pub fn subject(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut out = String::new();
    for rdn in cert.subject().iter_rdn() {
        if !out.is_empty() {
            out.push(',');
        }
        for (i, attr) in rdn.iter().enumerate() {
            if i > 0 {
                out.push('+');
            }
            let oid = attr.attr_type().to_id_string();
            out.push_str(short_name(&oid).unwrap_or(&oid));
            out.push('=');
            match attr.as_str() {
                Ok(v) => escape_into(&mut out, v),
                // Not a string type: RFC 4514's '#' and the value's hex.
                Err(_) => {
                    out.push('#');
                    for b in attr.attr_value().data.iter() {
                        out.push_str(&format!("{b:02x}"));
                    }
                }
            }
        }
    }
    Some(out)
}

/// GnuTLS's short names for the attributes certificates carry.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.42" => "GN",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "EMAIL",
        _ => return None,
    })
}

/// Appends `v` with RFC 4514's escapes.
fn escape_into(out: &mut String, v: &str) {
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';') || (i == 0 && (c == '#' || c == ' ')) || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

/// libvirt's `tls_allowed_dn_list`: which client certificates (already
/// signed by the CA) may connect. An empty list allows every one, as
/// libvirt does when the list is unset.
#[derive(Debug, Clone, Default)]
pub struct DnAllowList(Vec<String>);

impl DnAllowList {
    /// A list of patterns (`*` any run of characters, `?` any one).
    pub fn new(patterns: Vec<String>) -> Self {
        Self(patterns)
    }

    /// Whether a client whose subject is `dn` may connect.
    pub fn allows(&self, dn: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|p| glob(p.as_bytes(), dn.as_bytes()))
    }
}

/// Shell-style matching of `*` and `?` (GLib's `g_pattern_match_simple`,
/// which libvirt uses), in time linear in the pattern times the text.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            // Let the last '*' take one more character.
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_glib_does() {
        assert!(glob(b"C=GB,O=Example,CN=*", b"C=GB,O=Example,CN=client1"));
        assert!(glob(b"*CN=client?", b"C=GB,CN=client1"));
        assert!(!glob(b"*CN=client?", b"C=GB,CN=client12"));
        assert!(glob(b"*", b""));
        assert!(!glob(b"C=GB", b"C=GBX"));
        assert!(glob(b"a*b*c", b"aXXbYYbZc"));
        assert!(!glob(b"a*b*c", b"aXXbYYbZ"));
        // Long runs of '*' against a long text stay quick.
        let text = "a".repeat(4000);
        assert!(!glob(format!("{}b", "*a".repeat(50)).as_bytes(), text.as_bytes()));
    }

    #[test]
    fn an_empty_list_allows_every_signed_client() {
        assert!(DnAllowList::default().allows("CN=anyone"));
        let l = DnAllowList::new(vec!["O=Example,CN=admin".into()]);
        assert!(l.allows("O=Example,CN=admin"));
        assert!(!l.allows("O=Example,CN=admin2"));
    }

    #[test]
    fn values_are_escaped_as_rfc_4514_says() {
        let mut s = String::new();
        escape_into(&mut s, " a,b+c\\ ");
        assert_eq!(s, "\\ a\\,b\\+c\\\\\\ ");
    }

    #[test]
    fn garbage_is_no_certificate() {
        assert_eq!(subject(b"not a certificate"), None);
    }
}
