//! The writer's output read back by independent readers: Debian's isoinfo
//! (genisoimage) and xorriso. (An integration test, in a process of its own:
//! the readers it spawns would briefly hold, between fork and exec, the
//! image descriptors and locks of the library's unit tests running beside.)

use std::process::Command;

use rvirt_block::iso9660::*;

/// An ISO 9660 logical sector.
const SECTOR: usize = 2048;

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rvirt-iso-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (crates/lab/setup.sh installs genisoimage and xorriso)"));
    assert!(o.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_cloud_init_seed_reads_back_with_its_real_names_through_rock_ridge_and_joliet() {
    let dir = scratch("seed");
    let user_data = b"#cloud-config\npassword: rvirt\nchpasswd: { expire: False }\n".to_vec();
    let big: Vec<u8> = (0..5000u32).map(|i| (i * 31) as u8).collect();
    let iso = dir.join("seed.iso");
    std::fs::write(&iso, cloud_init_seed(&user_data, None, Some(&big)).unwrap()).unwrap();
    // util-linux's blkid is how cloud-init finds its seed.
    let probe = run(Command::new("blkid").arg("-p").arg(&iso));
    assert!(probe.contains(r#"LABEL="cidata""#) && probe.contains(r#"TYPE="iso9660""#), "{probe}");
    let pvd = run(Command::new("isoinfo").arg("-d").arg("-i").arg(&iso));
    assert!(pvd.contains("Volume id: cidata"), "{pvd}");
    assert!(pvd.contains("Rock Ridge signatures version 1 found"), "{pvd}");
    assert!(pvd.contains("Joliet with UCS level 3 found"), "{pvd}");
    for flag in ["-R", "-J"] {
        let list = run(Command::new("isoinfo").arg(flag).arg("-f").arg("-i").arg(&iso));
        let mut names: Vec<&str> = list.lines().collect();
        names.sort();
        assert_eq!(names, ["/meta-data", "/network-config", "/user-data"], "{flag}: {list}");
        let got = Command::new("isoinfo").arg(flag).args(["-x", "/user-data", "-i"]).arg(&iso).output().unwrap().stdout;
        assert_eq!(got, user_data, "{flag}");
        let got = Command::new("isoinfo").arg(flag).args(["-x", "/network-config", "-i"]).arg(&iso).output().unwrap().stdout;
        assert_eq!(got, big, "{flag}: a file over two sectors");
    }
    let meta = Command::new("isoinfo").args(["-R", "-x", "/meta-data", "-i"]).arg(&iso).output().unwrap().stdout;
    assert_eq!(meta, b"instance-id: rvirt-seed\n");
    // xorriso checks the whole image's structure and reads files back too.
    let out = dir.join("user-data.out");
    run(Command::new("xorriso").args(["-abort_on", "FAILURE", "-indev"]).arg(&iso).args(["-osirrox", "on", "-extract", "/user-data"]).arg(&out));
    assert_eq!(std::fs::read(&out).unwrap(), user_data);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn many_files_span_directory_sectors_and_names_stay_distinct() {
    let dir = scratch("many");
    let files: Vec<IsoFile> =
        (0..120).map(|i| IsoFile { name: format!("a-file-with-a-long-name-number-{i:03}.txt"), data: format!("{i}\n").into_bytes() }).collect();
    let iso = dir.join("many.iso");
    write(&iso, "MANY", &files).unwrap();
    for flag in ["-R", "-J"] {
        let list = run(Command::new("isoinfo").arg(flag).arg("-f").arg("-i").arg(&iso));
        assert_eq!(list.lines().count(), 120, "{flag}: {list}");
        let got = Command::new("isoinfo").arg(flag).args(["-x", "/a-file-with-a-long-name-number-077.txt", "-i"]).arg(&iso).output().unwrap().stdout;
        assert_eq!(got, b"77\n", "{flag}");
    }
    let plain = run(Command::new("isoinfo").arg("-f").arg("-i").arg(&iso));
    let mut names: Vec<&str> = plain.lines().collect();
    names.dedup();
    assert_eq!(names.len(), 120, "ISO 9660 names are distinct too:\n{plain}");
    // Written again with one file: replaced whole, no temporary left behind.
    write(&iso, "ONE", &files[..1]).unwrap();
    assert_eq!(run(Command::new("isoinfo").args(["-R", "-f", "-i"]).arg(&iso)).lines().count(), 1);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no .part file");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_names_and_volume_ids_are_refused() {
    let f = |n: &str| vec![IsoFile { name: n.into(), data: vec![] }];
    for bad in ["", "a/b", ".", "..", &"x".repeat(65)] {
        assert!(build("V", &f(bad)).is_err(), "{bad:?}");
    }
    let twice = [f("a"), f("a")].concat();
    assert!(build("V", &twice).unwrap_err().to_string().contains("twice"));
    assert!(build("", &f("a")).is_err() && build(&"V".repeat(33), &f("a")).is_err() && build("a b", &f("a")).is_err());
    let img = build("V", &[]).unwrap();
    assert_eq!(img.len() % SECTOR, 0);
    assert_eq!(&img[16 * SECTOR + 1..16 * SECTOR + 6], b"CD001");
}

