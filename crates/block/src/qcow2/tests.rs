//! Unit tests of the qcow2 image: headers, refcounts, writes and chains.

use super::*;
use crate::{BackingPolicy, ImageOptions};

fn tmp(name: &str) -> PathBuf {
    crate::test_path("qcow2", name)
}

#[test]
fn header_round_trips() {
    let p = tmp("h.qcow2");
    let img = Qcow2Image::create(&p, 1 << 30, &CreateOptions::default()).unwrap();
    let h = img.header().clone();
    assert_eq!((h.version, h.cluster_bits, h.size, h.l1_size, h.refcount_order), (3, 16, 1 << 30, 2, 4));
    let bytes = h.to_bytes();
    assert_eq!(Header::parse(&bytes, 1 << 20, "x").unwrap(), h);
}

#[test]
fn refcount_packing_for_every_width() {
    for order in 0..=6u32 {
        let bits = 1u64 << order;
        let mut block = vec![0u8; 64];
        let max = if bits == 64 { u64::MAX } else { (1 << bits) - 1 };
        for idx in 0..(64 * 8 / bits).min(20) {
            refcount::put_refcount(&mut block, idx, bits, max.min(idx + 1));
        }
        for idx in 0..(64 * 8 / bits).min(20) {
            assert_eq!(refcount::get_refcount(&block, idx, bits), max.min(idx + 1), "order {order} idx {idx}");
        }
    }
}

#[test]
fn bad_headers_are_named() {
    let p = tmp("bad.qcow2");
    let img = Qcow2Image::create(&p, 1 << 20, &CreateOptions::default()).unwrap();
    let good = img.header().to_bytes();
    let len = 4 * 65536;
    let mutate = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        Header::parse(&b, len, "img").unwrap_err().to_string()
    };
    assert!(mutate(&|b| b[0] = b'X').contains("not a qcow2"));
    assert!(mutate(&|b| b[7] = 9).contains("version 9"));
    assert!(mutate(&|b| b[23] = 40).contains("cluster bits 40"));
    assert!(mutate(&|b| b[35] = 1).contains("encrypted"));
    assert!(mutate(&|b| b[24..32].copy_from_slice(&(1u64 << 62).to_be_bytes())).contains("32 MiB"));
    assert!(mutate(&|b| b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes())).contains("past the end"));
    assert!(mutate(&|b| b[40..48].copy_from_slice(&0u64.to_be_bytes())).contains("overlaps the header"));
    // A misplaced refcount table is not the header's to refuse: reads go on, `check -r all` rebuilds it.
    let mut b = good.clone();
    b[48..56].copy_from_slice(&12345u64.to_be_bytes());
    assert!(Header::parse(&b, len, "img").unwrap().refcount_table_problem(len).unwrap().contains("misaligned"));
    assert_eq!(Header::parse(&good, len, "img").unwrap().refcount_table_problem(len), None);
    assert!(mutate(&|b| b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes())).contains("unknown incompatible"));
    assert!(mutate(&|b| b[99] = 9).contains("refcount order 9"));
    assert!(mutate(&|b| b.truncate(50)).contains("truncated"));
    assert!(Header::parse(&good, 100, "img").unwrap_err().to_string().contains("past the end"));
}

#[test]
fn write_read_and_map() {
    let p = tmp("rw.qcow2");
    let img = Qcow2Image::create(&p, 8 << 20, &CreateOptions::default()).unwrap();
    img.write_at(&[0xaa; 1000], 70_000).unwrap();
    let mut b = vec![0u8; 3000];
    img.read_at(&mut b, 69_000).unwrap();
    assert!(b[..1000].iter().all(|&x| x == 0));
    assert!(b[1000..2000].iter().all(|&x| x == 0xaa));
    assert!(b[2000..].iter().all(|&x| x == 0));
    let m = img.map(0, 8 << 20).unwrap();
    assert_eq!(m[1], Extent { offset: 65536, length: 65536, kind: ExtentKind::Data });
    img.write_zeroes(65536, 65536).unwrap();
    img.read_at(&mut b, 69_000).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    drop(img);
    let again = Qcow2Image::open(&p, true).unwrap();
    again.read_at(&mut b, 69_000).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert!(matches!(again.write_at(&[1], 0), Err(Error::ReadOnly(_))));
    let mut big = vec![0u8; 2];
    assert!(again.read_at(&mut big, (8 << 20) - 1).is_err());
}

#[test]
fn refused_create_leaves_no_file() {
    // 512-byte clusters: an L1 table for 16 GiB needs 512 clusters, more
    // than one refcount block (256 entries) can count.
    let p = tmp("toobig.qcow2");
    let _ = std::fs::remove_file(&p);
    let e = Qcow2Image::create(&p, 16 << 30, &CreateOptions { cluster_bits: 9, ..Default::default() }).err().unwrap();
    assert!(e.to_string().contains("use larger clusters"), "{e}");
    assert!(!p.exists(), "a refused create must not leave a file behind");
}

#[test]
fn an_overlay_opened_alone_never_uncovers_or_drops_its_backing_data() {
    let base = tmp("alone-base.raw");
    std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    let top = tmp("alone-top.qcow2");
    let _ = std::fs::remove_file(&top);
    drop(Qcow2Image::create(&top, 1 << 20, &CreateOptions { backing: Some(("alone-base.raw".into(), Format::Raw)), ..Default::default() }).unwrap());
    let alone = Qcow2Image::open_with(&top, &ImageOptions { backing: BackingPolicy::Ignore, ..ImageOptions::default() }).unwrap();
    assert!(alone.write_at(&[1u8; 100], 0).unwrap_err().to_string().contains("needs the backing file open"));
    alone.discard(65536, 65536).unwrap();
    drop(alone);
    let full = Qcow2Image::open(&top, true).unwrap();
    let mut b = vec![0u8; 65536];
    full.read_at(&mut b, 65536).unwrap();
    assert!(b.iter().all(|&x| x == 0), "a discard over a backing file reads as zeros");
    full.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 7), "the refused write changed nothing");
}

#[test]
fn backing_chain_loop_is_refused() {
    let a = tmp("loop-a.qcow2");
    let b = tmp("loop-b.qcow2");
    Qcow2Image::create(&a, 1 << 20, &CreateOptions { backing: Some(("loop-b.qcow2".into(), Format::Qcow2)), ..Default::default() }).err();
    Qcow2Image::create(&b, 1 << 20, &CreateOptions { backing: Some(("loop-a.qcow2".into(), Format::Qcow2)), ..Default::default() }).err();
    let e = Qcow2Image::open(&a, true).err().unwrap().to_string();
    assert!(e.contains("loops"), "{e}");
}
