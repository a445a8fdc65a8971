use std::sync::Arc;

use rvirt_block::fuzzing::MemImage;

use super::fuzzing::patterned;
use super::*;

/// Runs `cdb` with a data-in buffer of `len` bytes (split in two to
/// exercise scatter), returning the completion and the bytes produced.
fn run(lun: &mut Lun, cdb: &[u8], out: &[u8], len: usize) -> (Completion, Vec<u8>) {
    let mut buf = vec![0u8; len];
    let (a, b) = buf.split_at_mut(len / 3);
    let c = lun.execute(cdb, &[out], &mut [a, b]);
    assert!(c.data_in_len <= len, "never more than the buffer");
    buf.truncate(c.data_in_len);
    (c, buf)
}

fn good(lun: &mut Lun, cdb: &[u8], len: usize) -> Vec<u8> {
    let (c, data) = run(lun, cdb, &[], len);
    assert_eq!(c.status, Status::Good, "{cdb:02x?}");
    data
}

fn sense(lun: &mut Lun, cdb: &[u8], out: &[u8]) -> Sense {
    match run(lun, cdb, out, 4096).0.status {
        Status::CheckCondition(s) => s,
        Status::Good => panic!("{cdb:02x?} succeeded"),
    }
}

fn disk(blocks: usize, read_only: bool) -> (Lun, Arc<MemImage>) {
    let img = patterned(blocks * 512, read_only);
    let mut lun = Lun::disk(img.clone(), "disk-serial-1");
    assert_eq!(sense(&mut lun, &[0; 6], &[]), Sense::POWER_ON_RESET, "the first command sees the reset");
    (lun, img)
}

#[test]
fn a_disk_identifies_itself_and_reports_its_capacity() {
    let (mut lun, _) = disk(2048, false);
    good(&mut lun, &[0; 6], 0);
    let inq = good(&mut lun, &[0x12, 0, 0, 0, 96, 0], 96);
    assert_eq!((inq[0], inq[1], inq.len()), (0x00, 0x00, 36), "direct access, not removable");
    assert_eq!(&inq[8..16], b"RVIRT   ");
    assert_eq!(&good(&mut lun, &[0x12, 0, 0, 0, 5, 0], 96)[..], &inq[..5], "cut to the allocation length");
    let pages = good(&mut lun, &[0x12, 1, 0x00, 0, 255, 0], 255);
    assert_eq!(&pages[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb2]);
    let serial = good(&mut lun, &[0x12, 1, 0x80, 0, 255, 0], 255);
    assert_eq!(&serial[4..], b"disk-serial-1");
    let id = good(&mut lun, &[0x12, 1, 0x83, 0, 255, 0], 255);
    assert_eq!((id[1], &id[8..16]), (0x83, &b"RVIRT   "[..]));
    let limits = good(&mut lun, &[0x12, 1, 0xb0, 0, 255, 0], 255);
    assert_eq!(u32::from_be_bytes(limits[24..28].try_into().unwrap()), MAX_UNMAP_DESCRIPTORS as u32);
    assert_eq!(good(&mut lun, &[0x12, 1, 0xb2, 0, 255, 0], 255)[5], 0x80, "LBPU");
    assert_eq!(sense(&mut lun, &[0x12, 1, 0x99, 0, 255, 0], &[]), Sense::INVALID_FIELD);
    let cap = good(&mut lun, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(cap, [0, 0, 0x07, 0xff, 0, 0, 2, 0], "last LBA 2047, 512-byte blocks");
    let mut rc16 = [0u8; 16];
    rc16[0] = 0x9e;
    rc16[1] = 0x10;
    rc16[13] = 32;
    let cap16 = good(&mut lun, &rc16, 32);
    assert_eq!(u64::from_be_bytes(cap16[..8].try_into().unwrap()), 2047);
    assert_eq!(cap16[14] & 0x80, 0x80, "LBPME");
    let luns = good(&mut lun, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], 64);
    assert_eq!(luns, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "LUN 0 only");
    let mode = good(&mut lun, &[0x1a, 0, 0x08, 0, 255, 0], 255);
    assert_eq!((mode[2], mode[4], mode[6] & 0x04), (0, 0x08, 0x04), "writable; caching page with WCE");
    let mode10 = good(&mut lun, &[0x5a, 0, 0x3f, 0, 0, 0, 0, 1, 0, 0], 256);
    assert_eq!(mode10[8], 0x08);
    assert_eq!(sense(&mut lun, &[0x1a, 0, 0x2a, 0, 255, 0], &[]), Sense::INVALID_FIELD, "no CD page on a disk");
    assert_eq!(good(&mut lun, &[0x03, 0, 0, 0, 18, 0], 18)[12], 0x24, "REQUEST SENSE: the last failure");
    good(&mut lun, &[0; 6], 0);
    assert_eq!(good(&mut lun, &[0x03, 0, 0, 0, 18, 0], 18)[2], 0, "REQUEST SENSE after a success: nothing");
}

#[test]
fn reads_writes_unmap_and_their_bounds() {
    let (mut lun, img) = disk(64, false);
    // WRITE(10) of two blocks at LBA 3, then READ(16) of them back.
    let data: Vec<u8> = (0..1024).map(|i| (i * 7) as u8).collect();
    let (c, _) = run(&mut lun, &[0x2a, 0, 0, 0, 0, 3, 0, 0, 2, 0], &data, 0);
    assert_eq!(c.status, Status::Good);
    let mut r16 = [0u8; 16];
    r16[0] = 0x88;
    r16[9] = 3;
    r16[13] = 2;
    assert_eq!(good(&mut lun, &r16, 1024 + 100), data, "the rest of the buffer is residual");
    // READ(6) of 1 block at LBA 5 reads the image's pattern.
    assert_eq!(good(&mut lun, &[0x08, 0, 0, 5, 1, 0], 512), vec![5u8; 512]);
    assert_eq!(sense(&mut lun, &[0x28, 0, 0, 0, 0, 63, 0, 0, 2, 0], &[]), Sense::LBA_OUT_OF_RANGE);
    assert_eq!(sense(&mut lun, &[0x28, 0, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0], &[]), Sense::LBA_OUT_OF_RANGE);
    let mut huge = [0u8; 16];
    huge[0] = 0x88;
    huge[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    huge[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(sense(&mut lun, &huge, &[]), Sense::LBA_OUT_OF_RANGE, "no overflow");
    let (c, _) = run(&mut lun, &[0x28, 0, 0, 0, 0, 0, 0, 0, 4, 0], &[], 1000);
    assert_eq!(c.status, Status::CheckCondition(Sense::INVALID_FIELD), "a buffer shorter than the transfer");
    let (c, _) = run(&mut lun, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 4, 0], &[1, 2, 3], 0);
    assert_eq!(c.status, Status::CheckCondition(Sense::INVALID_FIELD), "data-out shorter than the transfer");
    // UNMAP blocks 10..12: they read as zeros after.
    let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
    list.extend(10u64.to_be_bytes());
    list.extend(2u32.to_be_bytes());
    list.extend([0; 4]);
    let (c, _) = run(&mut lun, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list, 0);
    assert_eq!(c.status, Status::Good);
    assert!(img.data.lock().unwrap()[10 * 512..12 * 512].iter().all(|&b| b == 0));
    assert_eq!(img.data.lock().unwrap()[12 * 512], 12, "nothing past the range");
    let mut bad = list.clone();
    bad[8..16].copy_from_slice(&63u64.to_be_bytes());
    assert_eq!(sense(&mut lun, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &bad), Sense::LBA_OUT_OF_RANGE);
    assert_eq!(sense(&mut lun, &[0x42, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0], &list), Sense::INVALID_FIELD, "a list over the limit");
    assert_eq!(sense(&mut lun, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list[..10]), Sense::PARAMETER_LIST_LENGTH);
    good(&mut lun, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0);

    let (mut ro, _) = disk(8, true);
    assert_eq!(sense(&mut ro, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0; 512]), Sense::WRITE_PROTECTED);
    assert_eq!(sense(&mut ro, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list), Sense::WRITE_PROTECTED);
    assert_eq!(good(&mut ro, &[0x1a, 0, 0x08, 0, 255, 0], 255)[2], 0x80, "WP in the mode header");
}

#[test]
fn a_cdrom_reports_its_disc_and_media_changes() {
    let mut cd = Lun::cdrom(None, "cd0");
    assert_eq!(sense(&mut cd, &[0; 6], &[]), Sense::POWER_ON_RESET);
    let inq = good(&mut cd, &[0x12, 0, 0, 0, 36, 0], 36);
    assert_eq!((inq[0], inq[1] & 0x80), (0x05, 0x80), "CD-ROM, removable");
    assert_eq!(sense(&mut cd, &[0; 6], &[]), Sense::NO_MEDIUM_TRAY_CLOSED);
    let req = good(&mut cd, &[0x03, 0, 0, 0, 18, 0], 18);
    assert_eq!((req[2], req[12], req[13]), (0x2, 0x3a, 0x01), "REQUEST SENSE gives the last failure (SeaBIOS ignores autosense)");
    assert_eq!(good(&mut cd, &[0x03, 0, 0, 0, 18, 0], 18)[2], 0, "once");
    assert_eq!(sense(&mut cd, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]), Sense::NO_MEDIUM_TRAY_CLOSED);
    let gesn = [0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0];
    assert_eq!(good(&mut cd, &gesn, 8), [0, 6, 4, 0x10, 0, 0, 0, 0], "no disc, no event");
    assert_eq!(good(&mut cd, &[0x46, 0, 0, 0, 0, 0, 0, 0, 64, 0], 64)[6..8], [0, 0], "no current profile");

    // The host inserts a 1 MiB ISO: unit attention, then a "new media" event.
    let iso = patterned(1 << 20, true);
    cd.insert(iso).unwrap();
    assert_eq!(good(&mut cd, &gesn, 8)[4..6], [2, 2], "new media, present");
    assert_eq!(good(&mut cd, &gesn, 8)[4], 0, "reported once");
    assert_eq!(sense(&mut cd, &[0; 6], &[]), Sense::MEDIUM_CHANGED);
    good(&mut cd, &[0; 6], 0);
    assert_eq!(good(&mut cd, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8), [0, 0, 1, 0xff, 0, 0, 8, 0], "511 blocks of 2048");
    let toc = good(&mut cd, &[0x43, 0, 0, 0, 0, 0, 0, 0, 255, 0], 255);
    assert_eq!(toc, [0, 18, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0, 0, 0x14, 0xaa, 0, 0, 0, 2, 0], "track 1 at 0, lead-out at 512");
    let toc_msf = good(&mut cd, &[0x43, 2, 0, 0, 0, 0, 0, 0, 255, 0], 255);
    assert_eq!(&toc_msf[16..20], &[0, 0, 8, 62], "512 + 150 frames = 0:08:62");
    assert_eq!(good(&mut cd, &[0x43, 0, 1, 0, 0, 0, 0, 0, 12, 0], 12)[0..4], [0, 10, 1, 1], "session info");
    assert_eq!(good(&mut cd, &[0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0], 34)[2], 0x0e);
    let conf = good(&mut cd, &[0x46, 0, 0, 0, 0, 0, 0, 0x01, 0, 0], 256);
    assert_eq!(conf[6..8], [0, 8], "current profile: CD-ROM");
    assert_eq!(u32::from_be_bytes(conf[0..4].try_into().unwrap()) as usize, conf.len() - 4);
    assert_eq!(good(&mut cd, &[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 255, 0], 255)[8], 0x2a);
    // READ(10) of block 1 gets the image's bytes at 2048.
    let block1: Vec<u8> = (2048..4096).map(|i| (i / 512) as u8).collect();
    assert!(good(&mut cd, &[0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0], 2048) == block1, "block 1 is bytes 2048..4096");
    assert_eq!(sense(&mut cd, &[0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0], &[0; 2048]), Sense::WRITE_PROTECTED);

    // The guest locks the tray: its eject and the host's are refused, a forced one is not.
    good(&mut cd, &[0x1e, 0, 0, 0, 1, 0], 0);
    assert_eq!(sense(&mut cd, &[0x1b, 0, 0, 0, 0x02, 0], &[]), Sense::REMOVAL_PREVENTED);
    assert!(cd.eject(false).is_err());
    assert_eq!(good(&mut cd, &gesn, 8)[4], 1, "the guest hears an eject request");
    good(&mut cd, &[0x1e, 0, 0, 0, 0, 0], 0);
    good(&mut cd, &[0x1b, 0, 0, 0, 0x02, 0], 0);
    assert_eq!(sense(&mut cd, &[0; 6], &[]), Sense::NO_MEDIUM_TRAY_OPEN, "ejected by the guest");
    assert_eq!(good(&mut cd, &gesn, 8)[4..6], [3, 1], "media removal; tray open");
    assert_eq!(good(&mut cd, &[0xbd, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], 8)[1], 0x10, "door open");
    good(&mut cd, &[0x1b, 0, 0, 0, 0x03, 0], 0);
    assert_eq!(sense(&mut cd, &[0; 6], &[]), Sense::NO_MEDIUM_TRAY_CLOSED, "closed again, still empty");
    assert!(cd.eject(true).is_ok());

    let (mut d, _) = disk(8, false);
    assert_eq!(sense(&mut d, &[0x43, 0, 0, 0, 0, 0, 0, 0, 255, 0], &[]), Sense::INVALID_OPCODE, "no TOC on a disk");
    assert!(d.eject(true).is_err() && d.insert(patterned(512, true)).is_err());
}

/// Any bytes as a CDB, any data-out, any buffer: a status, never a panic,
/// never more data than the buffer holds.
#[test]
fn hostile_cdbs_get_sense_data_not_a_crash() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut d, _) = disk(64, false);
    let mut cd = Lun::cdrom(Some(patterned(64 * 2048, true)), "cd");
    let mut empty = Lun::cdrom(None, "");
    for round in 0..60_000u32 {
        let len = (next() % 20) as usize;
        let mut cdb: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if let Some(op) = cdb.first_mut() {
            // Half the time a known opcode, with random fields.
            if round % 2 == 0 {
                const OPS: [u8; 26] = [
                    0x00, 0x03, 0x08, 0x0a, 0x12, 0x1a, 0x1b, 0x1e, 0x25, 0x28, 0x2a, 0x35, 0x42, 0x43, 0x46, 0x4a, 0x51, 0x5a,
                    0x88, 0x8a, 0x91, 0x9e, 0xa0, 0xa8, 0xaa, 0xbd,
                ];
                *op = OPS[(next() % OPS.len() as u64) as usize];
            }
        }
        let out: Vec<u8> = (0..(next() % 600) as usize).map(|_| next() as u8).collect();
        let buf_len = (next() % 5000) as usize;
        for lun in [&mut d, &mut cd, &mut empty] {
            let mut buf = vec![0u8; buf_len];
            let c = lun.execute(&cdb, &[&out], &mut [&mut buf]);
            assert!(c.data_in_len <= buf_len);
            if let Status::CheckCondition(s) = c.status {
                assert_eq!(c.data_in_len, 0);
                assert!(s.key != 0, "{cdb:02x?}");
            }
        }
    }
}
