//! libvirt's storage XML: a pool (`<pool type='dir'>`, a directory of
//! images) and a volume (`<volume>`, one image in it), parsed with
//! line-numbered errors and written back the way `virsh pool-dumpxml` and
//! `vol-dumpxml` show them.

use std::fmt::Write;
use std::path::{Component, Path, PathBuf};

use roxmltree::Node;
use uuid::Uuid;

use super::{checked_document, elements, escape, unit_bytes, valid_name, Cx, ImageFormat, UnknownElement, XmlError};

/// Longest volume name (a file name).
pub const MAX_VOLUME_NAME: usize = 255;

/// Owner, group and mode a pool's directory or a volume's file has (`<permissions>`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    /// File mode bits (`0711`).
    pub mode: Option<u32>,
    /// Owner uid.
    pub owner: Option<u32>,
    /// Group gid.
    pub group: Option<u32>,
}

/// Sizes a pool reports: its filesystem's, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolSizes {
    /// The filesystem's size.
    pub capacity: u64,
    /// Bytes in use on it.
    pub allocation: u64,
    /// Bytes free for new volumes.
    pub available: u64,
}

/// A storage pool: a directory whose files are the volumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolDef {
    /// Its name (`default`).
    pub name: String,
    /// Its UUID (made up when the XML has none).
    pub uuid: Uuid,
    /// The directory (`<target><path>`), absolute and without `..`.
    pub target: PathBuf,
    /// What `pool-build` gives the directory.
    pub permissions: Permissions,
    /// Elements rvirt does not use, kept verbatim.
    pub unknown: Vec<UnknownElement>,
}

/// The backing file of a volume (`<backingStore>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeBacking {
    /// The backing image.
    pub path: PathBuf,
    /// Its format (probed when absent).
    pub format: Option<ImageFormat>,
}

/// A volume: what `vol-create` asks for, or what `vol-dumpxml` shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeDef {
    /// Its file name in the pool.
    pub name: String,
    /// Its virtual size in bytes (required to create one, except as a clone).
    pub capacity: Option<u64>,
    /// Bytes allocated on the host (asked for: preallocated).
    pub allocation: Option<u64>,
    /// raw or qcow2 (raw when absent, as libvirt's dir pools).
    pub format: Option<ImageFormat>,
    /// The image it is an overlay of.
    pub backing: Option<VolumeBacking>,
    /// qcow2 `compat` (`0.10` or `1.1`).
    pub compat: Option<String>,
    /// qcow2 lazy refcounts (`<features><lazy_refcounts/>`).
    pub lazy_refcounts: bool,
    /// qcow2 extended L2 entries (`<features><extended_l2/>`).
    pub extended_l2: bool,
    /// qcow2 cluster size in bytes.
    pub cluster_size: Option<u64>,
    /// Where it is (shown, never read: a volume is always in its pool's directory).
    pub path: Option<PathBuf>,
    /// The file's length (shown only).
    pub physical: Option<u64>,
    /// The file's owner and mode (shown only).
    pub permissions: Permissions,
}

fn bytes(cx: &Cx, n: Node, path: &str) -> Result<u64, XmlError> {
    let unit = n.attribute("unit").unwrap_or("bytes");
    let per = match unit {
        "B" => Some(1),
        "EiB" | "E" => Some(1 << 60),
        "PiB" | "P" => Some(1 << 50),
        u => unit_bytes(u),
    }
    .ok_or_else(|| cx.err(n, path, format!("unknown unit '{unit}' (use bytes, KiB, MiB, GiB, ...)")))?;
    let text = cx.text(n, path)?;
    let v: u64 = text.parse().map_err(|_| cx.err(n, path, format!("'{text}' is not a whole number")))?;
    v.checked_mul(per).ok_or_else(|| cx.err(n, path, "too large"))
}

/// An absolute path without `.` or `..` parts, as given.
fn absolute(cx: &Cx, n: Node, path: &str) -> Result<PathBuf, XmlError> {
    let t = cx.text(n, path)?;
    let p = Path::new(&t);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) || t.contains('\0') {
        return Err(cx.err(n, path, format!("'{t}' is not an absolute path without . or .. parts")));
    }
    Ok(p.components().collect())
}

fn permissions(cx: &Cx, n: Node, path: &str) -> Result<Permissions, XmlError> {
    let mut p = Permissions::default();
    for c in elements(n) {
        let sub = format!("{path}/{}", c.tag_name().name());
        match c.tag_name().name() {
            "mode" => {
                let t = cx.text(c, &sub)?;
                p.mode = Some(u32::from_str_radix(&t, 8).ok().filter(|m| *m <= 0o7777).ok_or_else(|| cx.err(c, &sub, format!("'{t}' is not an octal file mode")))?);
            }
            "owner" | "group" => {
                let t = cx.text(c, &sub)?;
                // libvirt writes -1 for "leave as is".
                let id = if t == "-1" { None } else { Some(t.parse().map_err(|_| cx.err(c, &sub, format!("'{t}' is not a numeric id")))?) };
                if c.tag_name().name() == "owner" {
                    p.owner = id;
                } else {
                    p.group = id;
                }
            }
            _ => {}
        }
    }
    Ok(p)
}

fn format_type(cx: &Cx, n: Node, path: &str) -> Result<ImageFormat, XmlError> {
    match cx.attr(n, path, "type")? {
        "raw" => Ok(ImageFormat::Raw),
        "qcow2" => Ok(ImageFormat::Qcow2),
        other => Err(cx.err(n, path, format!("format '{other}' is not supported: rvirt's volumes are raw or qcow2"))),
    }
}

fn write_permissions(o: &mut String, indent: &str, p: &Permissions) {
    if *p == Permissions::default() {
        return;
    }
    let _ = writeln!(o, "{indent}<permissions>");
    if let Some(m) = p.mode {
        let _ = writeln!(o, "{indent}  <mode>{m:04o}</mode>");
    }
    for (tag, v) in [("owner", p.owner), ("group", p.group)] {
        if let Some(v) = v {
            let _ = writeln!(o, "{indent}  <{tag}>{v}</{tag}>");
        }
    }
    let _ = writeln!(o, "{indent}</permissions>");
}

/// Whether `name` can be a volume: one file name in the pool's directory.
pub fn valid_volume_name(name: &str) -> bool {
    // No leading dot: hidden files (and rvirt-img's files in the making) are not volumes.
    !name.is_empty() && name.len() <= MAX_VOLUME_NAME && !name.starts_with('.') && !name.contains('/') && !name.chars().any(char::is_control)
}

impl PoolDef {
    /// Parses and validates a pool definition.
    pub fn parse(xml: &str) -> Result<Self, XmlError> {
        let doc = checked_document(xml)?;
        let cx = Cx::new(xml);
        let root = doc.root_element();
        if root.tag_name().name() != "pool" {
            return Err(cx.err(root, root.tag_name().name(), "the root element must be <pool>"));
        }
        match root.attribute("type") {
            Some("dir") => {}
            Some(t) => return Err(cx.err(root, "pool", format!("pool type '{t}' is not supported: rvirt has directory pools (type='dir')"))),
            None => return Err(cx.err(root, "pool", "the type='...' attribute is required (rvirt has type='dir')")),
        }
        let mut p = PoolDef { name: String::new(), uuid: Uuid::new_v4(), target: PathBuf::new(), permissions: Permissions::default(), unknown: Vec::new() };
        for c in elements(root) {
            let tag = c.tag_name().name();
            match tag {
                "name" => {
                    let t = cx.text(c, "name")?;
                    if !valid_name(&t) {
                        return Err(cx.err(c, "name", format!("'{t}' is not a usable name (letters, digits and -_.+:, at most 64, not all digits or a UUID)")));
                    }
                    p.name = t;
                }
                "uuid" => {
                    let t = cx.text(c, "uuid")?;
                    p.uuid = Uuid::parse_str(&t).map_err(|_| cx.err(c, "uuid", format!("'{t}' is not a UUID")))?;
                }
                // What the pool reports, not what it is.
                "capacity" | "allocation" | "available" => {}
                "source" if !c.has_children() || elements(c).next().is_none() => {}
                "target" => {
                    for t in elements(c) {
                        match t.tag_name().name() {
                            "path" => p.target = absolute(&cx, t, "target/path")?,
                            "permissions" => p.permissions = permissions(&cx, t, "target/permissions")?,
                            _ => p.unknown.push(cx.unknown("target", t)),
                        }
                    }
                }
                _ => p.unknown.push(cx.unknown("pool", c)),
            }
        }
        if p.name.is_empty() {
            return Err(cx.err(root, "pool", "a pool needs a <name>"));
        }
        if p.target.as_os_str().is_empty() {
            return Err(cx.err(root, "pool", "a directory pool needs a <target><path>"));
        }
        Ok(p)
    }

    /// The definition as `pool-dumpxml` shows it, with the sizes of its filesystem.
    pub fn to_xml(&self, sizes: PoolSizes) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "<pool type='dir'>");
        let _ = writeln!(o, "  <name>{}</name>", escape(&self.name));
        let _ = writeln!(o, "  <uuid>{}</uuid>", self.uuid);
        for (tag, v) in [("capacity", sizes.capacity), ("allocation", sizes.allocation), ("available", sizes.available)] {
            let _ = writeln!(o, "  <{tag} unit='bytes'>{v}</{tag}>");
        }
        let _ = writeln!(o, "  <source>\n  </source>");
        let _ = writeln!(o, "  <target>");
        let _ = writeln!(o, "    <path>{}</path>", escape(&self.target.to_string_lossy()));
        write_permissions(&mut o, "    ", &self.permissions);
        for u in self.unknown.iter().filter(|u| u.parent == "target") {
            let _ = writeln!(o, "    {}", u.xml);
        }
        let _ = writeln!(o, "  </target>");
        for u in self.unknown.iter().filter(|u| u.parent == "pool") {
            let _ = writeln!(o, "  {}", u.xml);
        }
        let _ = writeln!(o, "</pool>");
        o
    }
}

impl VolumeDef {
    /// Parses a volume definition as `vol-create` receives it.
    pub fn parse(xml: &str) -> Result<Self, XmlError> {
        let doc = checked_document(xml)?;
        let cx = Cx::new(xml);
        let root = doc.root_element();
        if root.tag_name().name() != "volume" {
            return Err(cx.err(root, root.tag_name().name(), "the root element must be <volume>"));
        }
        if let Some(t) = root.attribute("type").filter(|t| *t != "file") {
            return Err(cx.err(root, "volume", format!("volume type '{t}' is not supported: rvirt's volumes are files")));
        }
        let mut v = VolumeDef::default();
        for c in elements(root) {
            let tag = c.tag_name().name();
            match tag {
                "name" => {
                    let t = cx.text(c, "name")?;
                    if !valid_volume_name(&t) {
                        return Err(cx.err(c, "name", format!("'{t}' is not a usable volume name (a file name: no '/' or leading '.', at most {MAX_VOLUME_NAME} bytes)")));
                    }
                    v.name = t;
                }
                "capacity" => v.capacity = Some(bytes(&cx, c, "capacity")?),
                "allocation" => v.allocation = Some(bytes(&cx, c, "allocation")?),
                "target" => {
                    for t in elements(c) {
                        let sub = format!("target/{}", t.tag_name().name());
                        match t.tag_name().name() {
                            "format" => v.format = Some(format_type(&cx, t, &sub)?),
                            "compat" => {
                                let s = cx.text(t, &sub)?;
                                if s != "0.10" && s != "1.1" {
                                    return Err(cx.err(t, &sub, format!("compat '{s}' is not 0.10 or 1.1")));
                                }
                                v.compat = Some(s);
                            }
                            "clusterSize" => v.cluster_size = Some(bytes(&cx, t, &sub)?),
                            "features" => {
                                for f in elements(t) {
                                    match f.tag_name().name() {
                                        "lazy_refcounts" => v.lazy_refcounts = true,
                                        "extended_l2" => v.extended_l2 = true,
                                        other => return Err(cx.err(f, &sub, format!("feature '{other}' is not supported (lazy_refcounts, extended_l2)"))),
                                    }
                                }
                            }
                            "encryption" => return Err(cx.err(t, &sub, "encrypted volumes are not supported")),
                            "nocow" => return Err(cx.err(t, &sub, "nocow is not supported")),
                            // The path and key are the pool's to give; permissions and timestamps are shown only.
                            _ => {}
                        }
                    }
                }
                "backingStore" => {
                    let mut path = None;
                    let mut format = None;
                    for b in elements(c) {
                        let sub = format!("backingStore/{}", b.tag_name().name());
                        match b.tag_name().name() {
                            "path" => path = Some(absolute(&cx, b, &sub)?),
                            "format" => format = Some(format_type(&cx, b, &sub)?),
                            _ => {}
                        }
                    }
                    let path = path.ok_or_else(|| cx.err(c, "backingStore", "a backing store needs a <path>"))?;
                    v.backing = Some(VolumeBacking { path, format });
                }
                _ => {}
            }
        }
        if v.name.is_empty() {
            return Err(cx.err(root, "volume", "a volume needs a <name>"));
        }
        if v.format != Some(ImageFormat::Qcow2) {
            let qcow2_only = [(v.backing.is_some(), "a backing store"), (v.compat.is_some(), "compat"), (v.lazy_refcounts || v.extended_l2, "features"), (v.cluster_size.is_some(), "a cluster size")];
            if let Some((_, what)) = qcow2_only.iter().find(|(set, _)| *set) {
                return Err(cx.err(root, "volume", format!("{what} needs <format type='qcow2'/>")));
            }
        }
        Ok(v)
    }

    /// The volume as `vol-dumpxml` shows it.
    pub fn to_xml(&self) -> String {
        let mut o = String::new();
        let path = self.path.as_deref().map(|p| escape(&p.to_string_lossy())).unwrap_or_default();
        let _ = writeln!(o, "<volume type='file'>");
        let _ = writeln!(o, "  <name>{}</name>", escape(&self.name));
        let _ = writeln!(o, "  <key>{path}</key>");
        for (tag, v) in [("capacity", self.capacity), ("allocation", self.allocation), ("physical", self.physical)] {
            if let Some(v) = v {
                let _ = writeln!(o, "  <{tag} unit='bytes'>{v}</{tag}>");
            }
        }
        let _ = writeln!(o, "  <target>");
        let _ = writeln!(o, "    <path>{path}</path>");
        let _ = writeln!(o, "    <format type='{}'/>", self.format.unwrap_or(ImageFormat::Raw).name());
        write_permissions(&mut o, "    ", &self.permissions);
        if let Some(c) = &self.compat {
            let _ = writeln!(o, "    <compat>{}</compat>", escape(c));
        }
        if let Some(c) = self.cluster_size {
            let _ = writeln!(o, "    <clusterSize unit='B'>{c}</clusterSize>");
        }
        if self.lazy_refcounts || self.extended_l2 {
            let _ = writeln!(o, "    <features>");
            for (on, tag) in [(self.lazy_refcounts, "lazy_refcounts"), (self.extended_l2, "extended_l2")] {
                if on {
                    let _ = writeln!(o, "      <{tag}/>");
                }
            }
            let _ = writeln!(o, "    </features>");
        }
        let _ = writeln!(o, "  </target>");
        if let Some(b) = &self.backing {
            let _ = writeln!(o, "  <backingStore>");
            let _ = writeln!(o, "    <path>{}</path>", escape(&b.path.to_string_lossy()));
            if let Some(f) = b.format {
                let _ = writeln!(o, "    <format type='{}'/>", f.name());
            }
            let _ = writeln!(o, "  </backingStore>");
        }
        let _ = writeln!(o, "</volume>");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_as_virsh_pool_define_as_writes_it_round_trips() {
        // virsh pool-define-as images dir --target /var/lib/rvirt/images
        let xml = "<pool type='dir'>\n  <name>images</name>\n  <source>\n  </source>\n  <target>\n    <path>/var/lib/rvirt/images/</path>\n  </target>\n</pool>\n";
        let p = PoolDef::parse(xml).unwrap();
        assert_eq!((p.name.as_str(), p.target.as_path()), ("images", Path::new("/var/lib/rvirt/images")));
        let sizes = PoolSizes { capacity: 10, allocation: 4, available: 6 };
        let out = p.to_xml(sizes);
        assert!(out.contains("<capacity unit='bytes'>10</capacity>") && out.contains(&format!("<uuid>{}</uuid>", p.uuid)), "{out}");
        let again = PoolDef::parse(&out).unwrap();
        assert_eq!(again, p);
        assert_eq!(again.to_xml(sizes), out);
        let with = PoolDef::parse("<pool type='dir'><name>p</name><target><path>/srv/p</path><permissions><mode>0755</mode><owner>107</owner><group>-1</group></permissions></target></pool>").unwrap();
        assert_eq!(with.permissions, Permissions { mode: Some(0o755), owner: Some(107), group: None });
        assert!(with.to_xml(sizes).contains("<mode>0755</mode>"));
    }

    #[test]
    fn bad_pools_say_what_is_wrong() {
        for (xml, want) in [
            ("<network/>", "root element must be <pool>"),
            ("<pool type='logical'><name>a</name></pool>", "pool type 'logical' is not supported"),
            ("<pool><name>a</name></pool>", "type='...' attribute is required"),
            ("<pool type='dir'><name>a</name></pool>", "needs a <target><path>"),
            ("<pool type='dir'><target><path>/a</path></target></pool>", "needs a <name>"),
            ("<pool type='dir'><name>a/b</name><target><path>/a</path></target></pool>", "not a usable name"),
            ("<pool type='dir'><name>a</name><target><path>images</path></target></pool>", "not an absolute path"),
            ("<pool type='dir'><name>a</name><target><path>/srv/../etc</path></target></pool>", "not an absolute path"),
            ("<pool type='dir'><name>a</name><target><path>/a</path><permissions><mode>999</mode></permissions></target></pool>", "not an octal file mode"),
        ] {
            let e = PoolDef::parse(xml).unwrap_err().to_string();
            assert!(e.contains(want), "{xml}: wanted '{want}', got: {e}");
        }
    }

    #[test]
    fn volumes_as_virsh_and_virt_install_write_them() {
        // virsh vol-create-as pool v.qcow2 1G --allocation 0 --format qcow2 --backing-vol ... --backing-vol-format raw
        let xml = "<volume>\n  <name>v.qcow2</name>\n  <capacity>1073741824</capacity>\n  <allocation>0</allocation>\n  <target>\n    <format type='qcow2'/>\n  </target>\n  <backingStore>\n    <path>/srv/p/base.raw</path>\n    <format type='raw'/>\n  </backingStore>\n</volume>\n";
        let v = VolumeDef::parse(xml).unwrap();
        assert_eq!((v.capacity, v.allocation, v.format), (Some(1 << 30), Some(0), Some(ImageFormat::Qcow2)));
        assert_eq!(v.backing, Some(VolumeBacking { path: "/srv/p/base.raw".into(), format: Some(ImageFormat::Raw) }));
        // virt-install's
        let vi = VolumeDef::parse("<volume>\n  <name>vi.qcow2</name>\n  <capacity>1073741824</capacity>\n  <allocation>0</allocation>\n  <target>\n    <format type=\"qcow2\"/>\n    <features>\n      <lazy_refcounts/>\n    </features>\n  </target>\n</volume>").unwrap();
        assert!(vi.lazy_refcounts && !vi.extended_l2);
        let units = VolumeDef::parse("<volume><name>r</name><capacity unit='G'>2</capacity><allocation unit='KiB'>4</allocation></volume>").unwrap();
        assert_eq!((units.capacity, units.allocation, units.format), (Some(2 << 30), Some(4096), None));
        // What vol-dumpxml shows parses back to the same volume.
        let mut shown = v.clone();
        shown.path = Some("/srv/p/v.qcow2".into());
        shown.compat = Some("1.1".into());
        shown.cluster_size = Some(65536);
        shown.physical = Some(196_624);
        shown.permissions = Permissions { mode: Some(0o600), owner: Some(0), group: Some(0) };
        let out = shown.to_xml();
        assert!(out.contains("<key>/srv/p/v.qcow2</key>") && out.contains("<clusterSize unit='B'>65536</clusterSize>") && out.contains("<mode>0600</mode>"), "{out}");
        let back = VolumeDef::parse(&out).unwrap();
        assert_eq!((back.capacity, back.format, back.compat.as_deref(), back.cluster_size, &back.backing), (Some(1 << 30), Some(ImageFormat::Qcow2), Some("1.1"), Some(65536), &v.backing));
    }

    #[test]
    fn bad_volumes_say_what_is_wrong() {
        for (xml, want) in [
            ("<volume><capacity>1</capacity></volume>", "needs a <name>"),
            ("<volume><name>../etc/passwd</name><capacity>1</capacity></volume>", "not a usable volume name"),
            ("<volume><name>..</name></volume>", "not a usable volume name"),
            ("<volume type='block'><name>a</name></volume>", "volume type 'block' is not supported"),
            ("<volume><name>a</name><target><format type='vmdk'/></target></volume>", "format 'vmdk' is not supported"),
            ("<volume><name>a</name><capacity unit='parsecs'>1</capacity></volume>", "unknown unit 'parsecs'"),
            ("<volume><name>a</name><capacity>-1</capacity></volume>", "not a whole number"),
            ("<volume><name>a</name><capacity unit='EiB'>99</capacity></volume>", "too large"),
            ("<volume><name>a</name><target><format type='qcow2'/><encryption format='luks'/></target></volume>", "encrypted volumes are not supported"),
            ("<volume><name>a</name><backingStore><path>/b</path></backingStore></volume>", "needs <format type='qcow2'/>"),
            ("<volume><name>a</name><target><format type='qcow2'/></target><backingStore><format type='raw'/></backingStore></volume>", "needs a <path>"),
            ("<volume><name>a</name><target><format type='qcow2'/><compat>2</compat></target></volume>", "not 0.10 or 1.1"),
        ] {
            let e = VolumeDef::parse(xml).unwrap_err().to_string();
            assert!(e.contains(want), "{xml}: wanted '{want}', got: {e}");
        }
        assert!(valid_volume_name("disk one.qcow2") && !valid_volume_name("a/b") && !valid_volume_name(&"x".repeat(256)) && !valid_volume_name("a\nb"));
    }
}
