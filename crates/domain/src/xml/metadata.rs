//! `<metadata>`: applications keep their own elements in a definition, each
//! in a namespace of its own (virsh metadata, libvirt's
//! `virDomainGetMetadata`/`SetMetadata` with an URI). rvirt keeps the
//! element verbatim; these read and replace one application's child.

use roxmltree::Document;

use super::{DomainXml, UnknownElement};

/// Whether `key` can be an XML namespace prefix.
fn valid_prefix(key: &str) -> bool {
    let mut chars = key.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !key.to_ascii_lowercase().starts_with("xml")
}

impl DomainXml {
    fn metadata_index(&self) -> Option<usize> {
        self.unknown.iter().position(|u| u.parent == "domain" && u.name == "metadata")
    }

    /// The kept `<metadata>` inside an element that declares the domain's
    /// namespaces, so prefixes declared on `<domain>` resolve.
    fn metadata_doc(&self) -> Option<String> {
        let m = &self.unknown[self.metadata_index()?];
        let decls: String = self
            .namespaces
            .iter()
            .map(|(p, u)| match p {
                Some(p) => format!(" xmlns:{p}='{}'", u.replace('\'', "&apos;")),
                None => format!(" xmlns='{}'", u.replace('\'', "&apos;")),
            })
            .collect();
        Some(format!("<r{decls}>{}</r>", m.xml))
    }

    /// The child of `<metadata>` in namespace `uri`, as written.
    pub fn metadata_element(&self, uri: &str) -> Option<String> {
        let text = self.metadata_doc()?;
        let doc = Document::parse(&text).ok()?;
        let meta = doc.root_element().first_element_child()?;
        let found = meta.children().find(|c| c.is_element() && c.tag_name().namespace() == Some(uri))?;
        Some(text[found.range()].to_string())
    }

    /// Puts `xml` (one element) into `<metadata>` as the child of namespace
    /// `uri` (prefix `key`), replacing the one there; `None` removes it.
    pub fn set_metadata_element(&mut self, uri: &str, key: &str, xml: Option<&str>) -> Result<(), String> {
        if uri.is_empty() {
            return Err("metadata needs a namespace URI".into());
        }
        let new = match xml {
            Some(x) => {
                if !valid_prefix(key) {
                    return Err(format!("'{key}' is not a namespace prefix (letters, digits, _-.)"));
                }
                let doc = Document::parse(x.trim()).map_err(|e| format!("the metadata is not well-formed XML: {e}"))?;
                let root = doc.root_element();
                if root.tag_name().namespace().is_some() || root.namespaces().any(|n| n.name().is_none()) {
                    return Err("the metadata element must not carry a namespace of its own: the URI gives it one".into());
                }
                // The element and everything unprefixed in it go into `uri`, under prefix `key` on the element.
                let src = x.trim();
                let name = root.tag_name().name();
                let esc = |v: &str| v.replace('&', "&amp;").replace('\'', "&apos;").replace('<', "&lt;");
                let attrs: String = root.attributes().map(|a| format!(" {}='{}'", &src[a.range_qname()], esc(a.value()))).collect();
                let inner = match (root.first_child(), root.last_child()) {
                    (Some(f), Some(l)) => &src[f.range().start..l.range().end],
                    _ => "",
                };
                let uri = esc(uri);
                Some(format!("<{key}:{name} xmlns:{key}='{uri}' xmlns='{uri}'{attrs}>{inner}</{key}:{name}>"))
            }
            None => None,
        };
        let mut kept = Vec::new();
        if let Some(text) = self.metadata_doc() {
            let doc = Document::parse(&text).map_err(|e| format!("the stored <metadata> does not parse: {e}"))?;
            if let Some(meta) = doc.root_element().first_element_child() {
                kept = meta.children().filter(|c| c.is_element() && c.tag_name().namespace() != Some(uri)).map(|c| text[c.range()].to_string()).collect();
            }
        }
        kept.extend(new);
        let index = self.metadata_index();
        if kept.is_empty() {
            if let Some(i) = index {
                self.unknown.remove(i);
            }
            return Ok(());
        }
        let xml = format!("<metadata>\n    {}\n  </metadata>", kept.join("\n    "));
        match index {
            Some(i) => self.unknown[i].xml = xml,
            None => self.unknown.push(UnknownElement { parent: "domain".into(), name: "metadata".into(), line: 0, xml }),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_application_s_element_is_read_replaced_and_removed_leaving_the_others() {
        let mut d = DomainXml::parse(
            "<domain type='kvm'><name>m</name><memory>65536</memory><metadata>\
             <libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'><libosinfo:os id='x'/></libosinfo:libosinfo>\
             </metadata></domain>",
        )
        .unwrap();
        let osinfo = "http://libosinfo.org/xmlns/libvirt/domain/1.0";
        assert!(d.metadata_element(osinfo).unwrap().contains("<libosinfo:os id='x'/>"));
        assert_eq!(d.metadata_element("http://example.org/app"), None);
        d.set_metadata_element("http://example.org/app", "app", Some("<app owner='me'><tier>web</tier></app>")).unwrap();
        let again = DomainXml::parse(&d.to_xml()).unwrap();
        let app = again.metadata_element("http://example.org/app").unwrap();
        assert!(app.starts_with("<app:app xmlns:app='http://example.org/app'") && app.contains("owner='me'") && app.contains("<tier>web</tier>"), "{app}");
        assert!(again.metadata_element(osinfo).is_some(), "the other application's element stays");
        assert_eq!(DomainXml::parse(&again.to_xml()).unwrap().to_xml(), again.to_xml(), "byte-stable");
        let mut d = again;
        d.set_metadata_element("http://example.org/app", "app", Some("<app/>")).unwrap();
        assert!(d.metadata_element("http://example.org/app").unwrap().contains("<app:app"), "replaced");
        d.set_metadata_element("http://example.org/app", "app", None).unwrap();
        d.set_metadata_element(osinfo, "x", None).unwrap();
        assert!(!d.to_xml().contains("metadata"), "no children, no <metadata>");
        assert!(d.set_metadata_element("u", "1bad", Some("<a/>")).unwrap_err().contains("prefix"));
        assert!(d.set_metadata_element("u", "k", Some("<a>")).unwrap_err().contains("well-formed"));
    }
}
