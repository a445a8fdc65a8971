//! rvirt-block against the real QEMU tools (Debian's qemu-utils): images we
//! write must pass `qemu-img check` and read back the same through `qemu-io`;
//! images QEMU writes (zero, compressed, backed clusters) must read the same
//! through us as through `qemu-img convert`.


use rvirt_block::qcow2::{CreateOptions, Qcow2Image};
use rvirt_block::{BlockBackend, Format, ImageOptions, RawImage};

mod common;
use common::*;

#[test]
fn our_writes_pass_qemu_img_check_and_read_back_in_qemu_io() {
    let d = tmpdir("ours");
    // direct: opened with O_DIRECT (cache=none), metadata and data through aligned bounce buffers.
    for (cluster_bits, direct) in [(16u32, false), (9, false), (16, true), (9, true)] {
        let p = d.join(format!("c{cluster_bits}-{direct}.qcow2"));
        drop(Qcow2Image::create(&p, 32 << 20, &CreateOptions { cluster_bits, ..Default::default() }).unwrap());
        let img = reopen_qcow2(&p, &ImageOptions { direct, ..Default::default() });
        img.write_at(&vec![0xaa; 4096], 0).unwrap();
        img.write_at(&vec![0xbb; 100_000], 65_000).unwrap(); // crosses clusters
        img.write_at(&vec![0xcc; 2 << 20], 8 << 20).unwrap(); // many clusters, many refcount blocks at 512 B
        img.write_at(&vec![0xdd; 512], (32 << 20) - 512).unwrap(); // last sector
        img.write_at(&vec![0xee; 10], 4090).unwrap(); // rewrite in place
        img.write_zeroes(9 << 20, 65536).unwrap();
        img.flush().unwrap();
        drop(img);
        assert_check_clean(&p);
        qemu_io(&p, "qcow2", "read -P 0xaa 0 4090");
        qemu_io(&p, "qcow2", "read -P 0xee 4090 10");
        qemu_io(&p, "qcow2", "read -P 0xbb 65000 100000");
        qemu_io(&p, "qcow2", "read -P 0xcc 8M 1M");
        qemu_io(&p, "qcow2", "read -P 0 9M 64k");
        qemu_io(&p, "qcow2", "read -P 0xcc 9280k 832k");
        qemu_io(&p, "qcow2", "read -P 0xdd 33553920 512");
        qemu_io(&p, "qcow2", "read -P 0 1M 1M");
        let info = qemu_img(&["info", "--output", "json", p.to_str().unwrap()]);
        assert!(info.contains("\"virtual-size\": 33554432"), "{info}");
        assert!(info.contains(&format!("\"cluster-size\": {}", 1u64 << cluster_bits)), "{info}");
    }
}

#[test]
fn we_read_what_qemu_writes_zero_and_compressed_clusters() {
    let d = tmpdir("theirs");
    let p = d.join("q.qcow2");
    qemu_img(&["create", "-f", "qcow2", p.to_str().unwrap(), "8M"]);
    qemu_io(&p, "qcow2", "write -P 0x11 0 1M");
    qemu_io(&p, "qcow2", "write -z 256k 128k");
    qemu_io(&p, "qcow2", "write -c -P 0x22 2M 64k");
    qemu_io(&p, "qcow2", "write -c -P 0x33 3M 128k");
    qemu_io(&p, "qcow2", "write -P 0x44 7M 1000");
    let expected = qemu_contents(&p, "qcow2");
    let ours = Qcow2Image::open(&p, true).unwrap();
    assert!(our_contents(&ours) == expected, "contents differ from qemu-img convert");
    // Overwriting a compressed cluster makes it a normal one and frees the old.
    drop(ours);
    let rw = reopen_qcow2(&p, &ImageOptions::default());
    rw.write_at(&[0x55; 100], 2 << 20).unwrap();
    rw.flush().unwrap();
    drop(rw);
    assert_check_clean(&p);
    qemu_io(&p, "qcow2", "read -P 0x55 2M 100");
    qemu_io(&p, "qcow2", "read -P 0x22 2097252 65436");
}

#[test]
fn zstd_compressed_images_read_correctly() {
    let d = tmpdir("zstd");
    let p = d.join("z.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-o", "compression_type=zstd", p.to_str().unwrap(), "4M"]);
    qemu_io(&p, "qcow2", "write -c -P 0x66 0 256k");
    let expected = qemu_contents(&p, "qcow2");
    let ours = Qcow2Image::open(&p, true).unwrap();
    assert_eq!(ours.header().compression, rvirt_block::qcow2::Compression::Zstd);
    assert!(our_contents(&ours) == expected);
}

#[test]
fn backing_chains_read_through_and_copy_on_write() {
    let d = tmpdir("chain");
    let base = d.join("base.raw");
    let mid = d.join("mid.qcow2");
    let top = d.join("top.qcow2");
    {
        let b = RawImage::create(&base, 4 << 20).unwrap();
        b.write_at(&vec![0x01; 4 << 20], 0).unwrap();
    }
    qemu_img(&["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid.to_str().unwrap()]);
    qemu_io(&mid, "qcow2", "write -P 0x02 1M 64k");
    // Our own overlay on QEMU's, with a partial-cluster write (copy-on-write from below).
    let img = Qcow2Image::create(&top, 4 << 20, &CreateOptions { backing: Some(("mid.qcow2".into(), Format::Qcow2)), ..Default::default() }).unwrap();
    img.write_at(&[0x03; 512], (1 << 20) + 1024).unwrap();
    img.write_zeroes(2 << 20, 65536).unwrap();
    img.flush().unwrap();
    let ours = our_contents(&img);
    drop(img);
    assert_check_clean(&top);
    let expected = qemu_contents(&top, "qcow2");
    assert!(ours == expected, "chain contents differ from qemu-img convert");
    assert_eq!(ours[0], 0x01);
    assert_eq!(ours[(1 << 20) + 1023], 0x02);
    assert_eq!(ours[(1 << 20) + 1024], 0x03);
    assert_eq!(ours[2 << 20], 0x00);
    let (ok, text) = run("qemu-img", &["compare", top.to_str().unwrap(), top.with_extension("qemu.raw").to_str().unwrap()]);
    assert!(ok && text.contains("identical"), "{text}");
    let info = qemu_img(&["info", "--output", "json", top.to_str().unwrap()]);
    assert!(info.contains("\"backing-filename\": \"mid.qcow2\"") && info.contains("\"backing-filename-format\": \"qcow2\""), "{info}");
}

#[test]
fn corrupt_tables_give_errors_not_panics() {
    let d = tmpdir("corrupt");
    let p = d.join("c.qcow2");
    qemu_img(&["create", "-f", "qcow2", p.to_str().unwrap(), "4M"]);
    qemu_io(&p, "qcow2", "write -P 0x11 0 64k");
    // Point the first L1 entry past the end of the file.
    let mut bytes = std::fs::read(&p).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    bytes[l1..l1 + 8].copy_from_slice(&((1u64 << 63) | (1 << 40)).to_be_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let img = Qcow2Image::open(&p, true).unwrap();
    let mut b = [0u8; 16];
    let e = img.read_at(&mut b, 0).unwrap_err().to_string();
    assert!(e.contains("L2 table offset") && e.contains("c.qcow2"), "{e}");
    // A truncated file is refused at open.
    std::fs::write(&p, &bytes[..60]).unwrap();
    assert!(Qcow2Image::open(&p, true).err().unwrap().to_string().contains("not a qcow2"));
}
