//! What a definition says that rvirt reads past: the attributes and child
//! elements of each element it interprets, kept so `dumpxml` gives them
//! back as written (libvirt, and the next user of the XML, may need them).

use std::collections::BTreeMap;

use roxmltree::Node;

use super::{Cx, UnknownElement};

/// One element's attributes and children that rvirt does not act on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    /// Attributes by qualified name as written, with their (unescaped) values, in order.
    pub attrs: Vec<(String, String)>,
    /// Child elements, verbatim, in order.
    pub children: Vec<UnknownElement>,
}

impl Kept {
    /// Whether there is nothing to write back.
    pub fn is_empty(&self) -> bool {
        self.attrs.is_empty() && self.children.is_empty()
    }

    /// The value of the kept attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// The kept parts of a device (or of the whole domain), by the path of the
/// element they belong to: `""` for the device element itself, `driver`,
/// `source`, ... for its children (`os/type`, `devices/serial`, ... for the
/// domain's).
#[derive(Clone, Debug, Default)]
pub struct KeptXml(pub BTreeMap<String, Kept>);

/// Equal when the same things are kept (the marks of elements seen with
/// nothing to keep do not count).
impl PartialEq for KeptXml {
    fn eq(&self, other: &Self) -> bool {
        fn kept(k: &KeptXml) -> Vec<(&String, &Kept)> {
            k.0.iter().filter(|(_, v)| !v.is_empty()).collect()
        }
        kept(self) == kept(other)
    }
}

impl Eq for KeptXml {}

impl KeptXml {
    /// What is kept for the element at `path`, if anything.
    pub fn get(&self, path: &str) -> Option<&Kept> {
        self.0.get(path).filter(|k| !k.is_empty())
    }

    /// Records the attributes of `n` other than `interpreted` (and
    /// namespace declarations) under `path`. A second element at the same
    /// path replaces the first's, as its typed values do (so no element is
    /// ever written with an attribute twice).
    pub(super) fn attrs(&mut self, cx: &Cx, path: &str, n: Node, interpreted: &[&str]) {
        let attrs: Vec<(String, String)> = n
            .attributes()
            .filter(|a| a.namespace().is_some() || !interpreted.contains(&a.name()))
            .map(|a| (cx.src[a.range_qname()].to_string(), a.value().to_string()))
            .collect();
        if !attrs.is_empty() {
            self.0.entry(path.to_string()).or_default().attrs = attrs;
        }
    }

    /// Whether anything was recorded for `path` (even nothing but the mark).
    pub(super) fn has(&self, path: &str) -> bool {
        self.0.contains_key(path)
    }

    /// Marks `path` as seen (an element that may appear only once).
    pub(super) fn mark(&mut self, path: &str) {
        self.0.entry(path.to_string()).or_default();
    }

    /// Records what rvirt does not act on in child `c` (tag `tag`) of a
    /// device: its other attributes, and its own children verbatim.
    pub(super) fn interpreted_child(&mut self, cx: &Cx, tag: &str, cpath: &str, c: Node, interpreted: &[&str]) {
        self.attrs(cx, tag, c, interpreted);
        for grandchild in c.children().filter(|g| g.is_element()) {
            self.child(cx, tag, cpath, grandchild);
        }
    }

    /// Records the child element `c` of the element at `path`, verbatim.
    pub(super) fn child(&mut self, cx: &Cx, path: &str, parent: &str, c: Node) {
        self.0.entry(path.to_string()).or_default().children.push(cx.unknown(parent, c));
    }

    /// Every kept child element, wherever it sits.
    pub fn children(&self) -> impl Iterator<Item = &UnknownElement> {
        self.0.values().flat_map(|k| k.children.iter())
    }

    /// Every kept attribute with the path of its element.
    pub fn attributes(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.0.iter().flat_map(|(p, k)| k.attrs.iter().map(move |(n, v)| (p.as_str(), n.as_str(), v.as_str())))
    }
}
