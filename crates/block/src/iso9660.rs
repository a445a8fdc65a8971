//! Writing ISO 9660 images (ECMA-119) with Rock Ridge (RRIP 1.10) and
//! Joliet names: what cloud-init's NoCloud seed disc (volume id `cidata`,
//! files `user-data`, `meta-data`, `network-config`) needs, since plain
//! ISO 9660 names cannot spell `user-data`. One directory (the root), files
//! of up to 4 GiB - 1 each.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

const SECTOR: usize = 2048;
/// Sectors 0-15 are the system area.
const FIRST_DESCRIPTOR: u32 = 16;
/// Most files in the one directory (each needs two directory records).
pub const MAX_FILES: usize = 1024;

/// One file of the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IsoFile {
    /// Its name, as Rock Ridge and Joliet show it (1-64 characters, no `/`).
    pub name: String,
    /// Its contents.
    pub data: Vec<u8>,
}

fn both16(v: u16) -> [u8; 4] {
    let mut b = [0u8; 4];
    b[..2].copy_from_slice(&v.to_le_bytes());
    b[2..].copy_from_slice(&v.to_be_bytes());
    b
}

fn both32(v: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&v.to_le_bytes());
    b[4..].copy_from_slice(&v.to_be_bytes());
    b
}

/// A text field of `len` bytes, space padded.
fn text(s: &str, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(len).collect();
    v.resize(len, b' ');
    v
}

/// A Joliet (UCS-2 big-endian) text field of `len` bytes, space padded.
fn ucs2_field(s: &str, len: usize) -> Vec<u8> {
    let mut v = ucs2(s);
    v.truncate(len & !1);
    while v.len() + 1 < len {
        v.extend([0, b' ']);
    }
    v.resize(len, 0);
    v
}

fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|c| c.to_be_bytes()).collect()
}

/// The 8.3-free "level 2" ISO 9660 name: upper-case d-characters, a dot,
/// `;1`; distinct per file (a numeric suffix on clashes).
fn iso_names(files: &[IsoFile]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for f in files {
        let base: String = f
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
            .take(24)
            .collect();
        let mut name = base.clone();
        let mut n = 1;
        while out.iter().any(|o| o.trim_end_matches(".;1") == name) {
            name = format!("{base}{n}");
            n += 1;
        }
        out.push(format!("{name}.;1"));
    }
    out
}

/// A directory record: extent, size, flags, name, then `system_use`.
fn record(extent: u32, size: u32, dir: bool, name: &[u8], system_use: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8; 33];
    r[2..10].copy_from_slice(&both32(extent));
    r[10..18].copy_from_slice(&both32(size));
    // 2026-01-01 00:00:00 UTC: a fixed date keeps images reproducible.
    r[18..25].copy_from_slice(&[126, 1, 1, 0, 0, 0, 0]);
    r[25] = if dir { 0x02 } else { 0x00 };
    r[28..32].copy_from_slice(&both16(1));
    r[32] = name.len() as u8;
    r.extend_from_slice(name);
    if name.len() % 2 == 0 {
        r.push(0);
    }
    r.extend_from_slice(system_use);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r[0] = r.len() as u8;
    r
}

/// Rock Ridge PX: POSIX mode, links, owner.
fn rr_px(mode: u32, links: u32) -> Vec<u8> {
    let mut e = vec![b'P', b'X', 36, 1];
    e.extend(both32(mode));
    e.extend(both32(links));
    e.extend(both32(0));
    e.extend(both32(0));
    e
}

/// Rock Ridge NM: the file's real name.
fn rr_nm(name: &str) -> Vec<u8> {
    let mut e = vec![b'N', b'M', (5 + name.len()) as u8, 1, 0];
    e.extend_from_slice(name.as_bytes());
    e
}

const ER_ID: &str = "RRIP_1991A";
const ER_DES: &str = "THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS";
const ER_SRC: &str = "PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  SEE PUBLISHER IDENTIFIER IN PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION.";

/// The ER entry naming the extension, kept in a continuation area (too long for a record).
fn rr_er() -> Vec<u8> {
    let mut e = vec![b'E', b'R', 0, 1, ER_ID.len() as u8, ER_DES.len() as u8, ER_SRC.len() as u8, 1];
    e.extend_from_slice(ER_ID.as_bytes());
    e.extend_from_slice(ER_DES.as_bytes());
    e.extend_from_slice(ER_SRC.as_bytes());
    e[2] = e.len() as u8;
    e
}

/// One directory's extent: `.`, `..`, then the files' records, none
/// crossing a sector boundary (as ECMA-119 requires).
fn directory(self_extent: u32, self_size: u32, dot_su: &[u8], dotdot_su: &[u8], files: &[Vec<u8>]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend(record(self_extent, self_size, true, &[0], dot_su));
    d.extend(record(self_extent, self_size, true, &[1], dotdot_su));
    for r in files {
        let room = SECTOR - d.len() % SECTOR;
        if r.len() > room {
            d.resize(d.len() + room, 0);
        }
        d.extend_from_slice(r);
    }
    d.resize(d.len().div_ceil(SECTOR) * SECTOR, 0);
    d
}

/// The bytes a directory takes (`directory()` with placeholder extents).
fn directory_len(dot_su: &[u8], files: &[Vec<u8>]) -> usize {
    directory(0, 0, dot_su, &[], files).len()
}

/// A path table with the root alone (little- or big-endian extent).
fn path_table(root: u32, big_endian: bool) -> Vec<u8> {
    let mut t = vec![1, 0];
    t.extend(if big_endian { root.to_be_bytes() } else { root.to_le_bytes() });
    t.extend(if big_endian { 1u16.to_be_bytes() } else { 1u16.to_le_bytes() });
    t.extend([0, 0]);
    let mut s = vec![0u8; SECTOR];
    s[..t.len()].copy_from_slice(&t);
    s
}

/// A primary (`joliet` false) or Joliet supplementary volume descriptor.
fn volume_descriptor(joliet: bool, volume_id: &str, sectors: u32, path_tables: (u32, u32), root: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; SECTOR];
    d[0] = if joliet { 2 } else { 1 };
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    let field = |d: &mut Vec<u8>, at: usize, len: usize, s: &str| {
        let v = if joliet { ucs2_field(s, len) } else { text(s, len) };
        d[at..at + len].copy_from_slice(&v);
    };
    field(&mut d, 8, 32, "LINUX");
    field(&mut d, 40, 32, volume_id);
    d[80..88].copy_from_slice(&both32(sectors));
    if joliet {
        d[88..91].copy_from_slice(b"%/E"); // UCS-2 level 3
    }
    d[120..124].copy_from_slice(&both16(1));
    d[124..128].copy_from_slice(&both16(1));
    d[128..132].copy_from_slice(&both16(SECTOR as u16));
    d[132..140].copy_from_slice(&both32(10));
    d[140..144].copy_from_slice(&path_tables.0.to_le_bytes());
    d[148..152].copy_from_slice(&path_tables.1.to_be_bytes());
    d[156..156 + root.len()].copy_from_slice(root);
    for (at, len) in [(190, 128), (318, 128), (446, 128), (702, 37), (739, 37), (776, 37)] {
        field(&mut d, at, len, "");
    }
    field(&mut d, 574, 128, "RVIRT");
    for at in [813, 830, 864] {
        d[at..at + 17].copy_from_slice(b"2026010100000000\0");
    }
    d[847..864].copy_from_slice(b"0000000000000000\0");
    d[881] = 1;
    d
}

/// Checks a file name for Rock Ridge and Joliet.
fn check_name(name: &str) -> Result<()> {
    let n = name.chars().count();
    if n == 0 || n > 64 || name.contains('/') || name.contains('\0') || name == "." || name == ".." {
        return Err(Error::Request(format!("'{name}' cannot be a file name on the disc (1-64 characters, no '/')")));
    }
    Ok(())
}

/// The whole image in memory.
pub fn build(volume_id: &str, files: &[IsoFile]) -> Result<Vec<u8>> {
    if files.len() > MAX_FILES {
        return Err(Error::Request(format!("at most {MAX_FILES} files on a disc")));
    }
    for (i, f) in files.iter().enumerate() {
        check_name(&f.name)?;
        if files[..i].iter().any(|g| g.name == f.name) {
            return Err(Error::Request(format!("'{}' is on the disc twice", f.name)));
        }
        if u32::try_from(f.data.len()).is_err() {
            return Err(Error::Request(format!("'{}' is larger than 4 GiB", f.name)));
        }
    }
    if volume_id.is_empty() || volume_id.len() > 32 || !volume_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Request(format!("'{volume_id}' is not a volume id (1-32 printable characters)")));
    }
    let names = iso_names(files);
    // Layout: descriptors 16-18, path tables 19-22, the Rock Ridge
    // continuation area 23, the two root directories, then the files.
    let continuation = FIRST_DESCRIPTOR + 7;
    let er = rr_er();
    let mut ce = vec![b'C', b'E', 28, 1];
    ce.extend(both32(continuation));
    ce.extend(both32(0));
    ce.extend(both32(er.len() as u32));
    let sp = [b'S', b'P', 7, 1, 0xbe, 0xef, 0];
    let dir_px = rr_px(0o40555, 2);
    let dot_su: Vec<u8> = [&sp[..], &ce, &dir_px].concat();
    // Placeholder records to size the directories.
    let iso_recs = |extents: &[u32]| -> Vec<Vec<u8>> {
        files
            .iter()
            .zip(&names)
            .zip(extents)
            .map(|((f, n), &e)| record(e, f.data.len() as u32, false, n.as_bytes(), &[rr_px(0o100444, 1), rr_nm(&f.name)].concat()))
            .collect()
    };
    let joliet_recs = |extents: &[u32]| -> Vec<Vec<u8>> {
        files.iter().zip(extents).map(|(f, &e)| record(e, f.data.len() as u32, false, &ucs2(&f.name), &[])).collect()
    };
    let zeros = vec![0u32; files.len()];
    let iso_root = continuation + 1;
    let iso_dir_len = directory_len(&dot_su, &iso_recs(&zeros));
    let joliet_root = iso_root + (iso_dir_len / SECTOR) as u32;
    let joliet_dir_len = directory_len(&[], &joliet_recs(&zeros));
    let mut next = joliet_root + (joliet_dir_len / SECTOR) as u32;
    let mut extents = Vec::with_capacity(files.len());
    for f in files {
        extents.push(next);
        let sectors = u32::try_from(f.data.len().div_ceil(SECTOR)).map_err(|_| Error::Request("the disc is too large".into()))?;
        next = next.checked_add(sectors).ok_or_else(|| Error::Request("the disc is too large".into()))?;
    }
    let total = next;
    let iso_dir = directory(iso_root, iso_dir_len as u32, &dot_su, &dir_px, &iso_recs(&extents));
    let joliet_dir = directory(joliet_root, joliet_dir_len as u32, &[], &[], &joliet_recs(&extents));
    let root_record = |extent: u32, len: usize| record(extent, len as u32, true, &[0], &[]);

    let mut img = Vec::with_capacity(total as usize * SECTOR);
    img.resize(FIRST_DESCRIPTOR as usize * SECTOR, 0);
    img.extend(volume_descriptor(false, volume_id, total, (FIRST_DESCRIPTOR + 3, FIRST_DESCRIPTOR + 4), &root_record(iso_root, iso_dir_len)));
    img.extend(volume_descriptor(true, volume_id, total, (FIRST_DESCRIPTOR + 5, FIRST_DESCRIPTOR + 6), &root_record(joliet_root, joliet_dir_len)));
    let mut terminator = vec![0u8; SECTOR];
    terminator[0] = 255;
    terminator[1..6].copy_from_slice(b"CD001");
    terminator[6] = 1;
    img.extend(terminator);
    img.extend(path_table(iso_root, false));
    img.extend(path_table(iso_root, true));
    img.extend(path_table(joliet_root, false));
    img.extend(path_table(joliet_root, true));
    let mut ca = er;
    ca.resize(SECTOR, 0);
    img.extend(ca);
    img.extend(iso_dir);
    img.extend(joliet_dir);
    for f in files {
        img.extend_from_slice(&f.data);
        img.resize(img.len().div_ceil(SECTOR) * SECTOR, 0);
    }
    debug_assert_eq!(img.len(), total as usize * SECTOR);
    Ok(img)
}

/// Writes the image to `out` (under a temporary name, renamed when
/// complete: an existing file is replaced whole or not at all).
pub fn write(out: &Path, volume_id: &str, files: &[IsoFile]) -> Result<()> {
    let img = build(volume_id, files)?;
    let tmp = out.with_extension("iso.part");
    let io = |e: std::io::Error| Error::Io { path: out.display().to_string(), source: e };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io)?;
    let done = f.write_all(&img).and_then(|_| f.sync_all()).and_then(|_| std::fs::rename(&tmp, out));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

/// A cloud-init NoCloud seed: volume id `cidata` with `user-data`,
/// `meta-data` (an instance id is made up when not given) and, when given,
/// `network-config`.
pub fn cloud_init_seed(user_data: &[u8], meta_data: Option<&[u8]>, network_config: Option<&[u8]>) -> Result<Vec<u8>> {
    let mut files = vec![
        IsoFile { name: "user-data".into(), data: user_data.to_vec() },
        IsoFile { name: "meta-data".into(), data: meta_data.map_or_else(|| b"instance-id: rvirt-seed\n".to_vec(), <[u8]>::to_vec) },
    ];
    if let Some(n) = network_config {
        files.push(IsoFile { name: "network-config".into(), data: n.to_vec() });
    }
    build("cidata", &files)
}

