//! The MMC commands of a CD-ROM drive that SeaBIOS and Linux's `sr` send:
//! READ TOC, READ DISC INFORMATION, GET CONFIGURATION, GET EVENT STATUS
//! NOTIFICATION and MECHANISM STATUS, and the capabilities mode page. One
//! data track, one session, as an ISO image is.

use crate::{be16, reply, CmdResult, Kind, Lun, Sense};

/// Discs larger than a CD (80 minutes of 2048-byte sectors) are DVDs.
const CD_MAX_BYTES: u64 = 80 * 60 * 75 * 2048;
const PROFILE_CDROM: u16 = 0x0008;
const PROFILE_DVDROM: u16 = 0x0010;

pub(crate) fn execute(lun: &mut Lun, op: u8, cdb: &[u8], data_in: &mut [&mut [u8]]) -> CmdResult {
    if lun.kind != Kind::Cdrom {
        return Err(Sense::INVALID_OPCODE);
    }
    match op {
        crate::op::READ_TOC => read_toc(lun, cdb, data_in),
        crate::op::READ_DISC_INFORMATION => {
            lun.ready()?;
            let mut r = vec![0u8; 34];
            r[0..2].copy_from_slice(&32u16.to_be_bytes());
            r[2] = 0x0e; // last session complete, disc complete
            r[3] = 1; // first track
            r[4] = 1; // sessions
            r[5] = 1; // first track of the last session
            r[6] = 1; // last track of the last session
            Ok(reply(data_in, &r, usize::from(be16(&cdb[7..9]))))
        }
        crate::op::GET_CONFIGURATION => get_configuration(lun, cdb, data_in),
        crate::op::GET_EVENT_STATUS => {
            if cdb[1] & 0x01 == 0 {
                // Asynchronous notification is not offered.
                return Err(Sense::INVALID_FIELD);
            }
            let alloc = usize::from(be16(&cdb[7..9]));
            const MEDIA_CLASS: u8 = 0x10;
            if cdb[4] & MEDIA_CLASS == 0 {
                // No event of a requested class: NEA, no data.
                return Ok(reply(data_in, &[0, 2, 0x80, MEDIA_CLASS], alloc));
            }
            let status = u8::from(lun.medium.is_some()) << 1 | u8::from(lun.tray_open);
            let event = std::mem::take(&mut lun.media_event);
            Ok(reply(data_in, &[0, 6, 0x04, MEDIA_CLASS, event, status, 0, 0], alloc))
        }
        crate::op::MECHANISM_STATUS => {
            let mut r = [0u8; 8];
            if lun.tray_open {
                r[1] = 0x10;
            }
            Ok(reply(data_in, &r, usize::from(be16(&cdb[8..10]))))
        }
        _ => Err(Sense::INVALID_OPCODE),
    }
}

/// A block address as minutes, seconds and frames (with the 2-second
/// pregap, as MMC counts), in the 4-byte TOC form.
fn msf(lba: u64) -> [u8; 4] {
    let f = lba + 150;
    let m = (f / (75 * 60)).min(255) as u8;
    [0, m, ((f / 75) % 60) as u8, (f % 75) as u8]
}

fn read_toc(lun: &Lun, cdb: &[u8], data_in: &mut [&mut [u8]]) -> CmdResult {
    let blocks = lun.ready()?;
    let use_msf = cdb[1] & 0x02 != 0;
    let alloc = usize::from(be16(&cdb[7..9]));
    let addr = |lba: u64| if use_msf { msf(lba) } else { (lba.min(u64::from(u32::MAX)) as u32).to_be_bytes() };
    let format = match cdb[2] & 0x0f {
        0 if cdb[9] >> 6 != 0 => cdb[9] >> 6, // the older place of the format field
        f => f,
    };
    let mut r = vec![0u8, 0];
    match format {
        0 => {
            if cdb[6] > 1 && cdb[6] != 0xaa {
                return Err(Sense::INVALID_FIELD);
            }
            r.extend([1, 1]);
            if cdb[6] <= 1 {
                r.extend([0, 0x14, 1, 0]); // track 1: data, ADR 1
                r.extend(addr(0));
            }
            r.extend([0, 0x14, 0xaa, 0]); // lead-out
            r.extend(addr(blocks));
        }
        1 => {
            // Multi-session information: one session, its first track at 0.
            r.extend([1, 1, 0, 0x14, 1, 0]);
            r.extend(addr(0));
        }
        _ => return Err(Sense::INVALID_FIELD),
    }
    let len = (r.len() - 2) as u16;
    r[0..2].copy_from_slice(&len.to_be_bytes());
    Ok(reply(data_in, &r, alloc))
}

fn get_configuration(lun: &Lun, cdb: &[u8], data_in: &mut [&mut [u8]]) -> CmdResult {
    let rt = cdb[1] & 0x03;
    let start = be16(&cdb[2..4]);
    let alloc = usize::from(be16(&cdb[7..9]));
    let current = match &lun.medium {
        None => 0,
        Some(m) if m.size() > CD_MAX_BYTES => PROFILE_DVDROM,
        Some(_) => PROFILE_CDROM,
    };
    let profile = |p: u16| {
        let mut d = p.to_be_bytes().to_vec();
        d.extend([u8::from(p == current), 0]);
        d
    };
    let mut features: Vec<(u16, Vec<u8>)> = Vec::new();
    let mut list = profile(PROFILE_DVDROM);
    list.extend(profile(PROFILE_CDROM));
    features.push((0x0000, list));
    // Core: SCSI physical interface, device busy events.
    features.push((0x0001, vec![0, 0, 0, 1, 0x01, 0, 0, 0]));
    // Removable medium: tray, eject, lock (and whether it is locked).
    features.push((0x0003, vec![0x29 | u8::from(lun.prevent_removal) << 2, 0, 0, 0]));
    let mut r = vec![0u8; 8];
    r[6..8].copy_from_slice(&current.to_be_bytes());
    for (code, body) in features {
        let wanted = match rt {
            0 | 1 => code >= start,
            2 => code == start,
            _ => return Err(Sense::INVALID_FIELD),
        };
        if wanted {
            r.extend(code.to_be_bytes());
            // Version 0 (2 for Profile List? kept 0), persistent and current.
            r.push(0x03);
            r.push(body.len() as u8);
            r.extend(body);
        }
    }
    let len = (r.len() - 4) as u32;
    r[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(reply(data_in, &r, alloc))
}

/// Mode page 0x2A (CD capabilities and mechanical status).
pub(crate) fn capabilities_page() -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x2a;
    p[1] = 18;
    p[2] = 0x00; // reads CD-ROM (nothing beyond)
    p[6] = 0x29; // tray loading mechanism, eject, lock
    p[8..10].copy_from_slice(&706u16.to_be_bytes()); // max read speed, KB/s (4x)
    p[12..14].copy_from_slice(&512u16.to_be_bytes()); // buffer, KiB
    p[14..16].copy_from_slice(&706u16.to_be_bytes()); // current read speed
    p
}
