//! `cargo bench -p rvirtd --bench hostile`: what hostile clients cost.
//! - `define` and `list` round trips on the protocol with no other client
//!   connected, and with 1,000 idle connections held open;
//! - parsing a domain definition of 1 KiB, 100 KiB and 1 MiB (made of
//!   unsupported elements, the shape that used to be quadratic), and of a
//!   1 MiB `<metadata>` of 40,000 small elements: time per KiB should stay flat.

#[path = "../tests/support/mod.rs"]
mod support;

use std::os::unix::net::UnixStream;
use std::time::Instant;

use rvirt_client::Connection;
use rvirt_domain::protocol::Request;
use rvirt_domain::DomainXml;
use rvirt_lab::stats::upper_median;
use support::{domain_xml, kernels, scratch, Daemon};

/// Median define and list round trips (ms) over `runs`, with the same 100
/// domains defined throughout (each define is undone before the next).
fn round_trips(conn: &mut Connection, kernel: &std::path::Path, runs: usize) -> (f64, f64) {
    let (mut def, mut list) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let xml = domain_xml("probe", kernel, "");
        let t = Instant::now();
        assert!(conn.call(&Request::Define { xml }).unwrap().ok);
        def.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(conn.call(&Request::Undefine { domain: "probe".into(), managed_save: false, snapshots_metadata: false }).unwrap().ok);
        let t = Instant::now();
        assert!(conn.call(&Request::List { all: true }).unwrap().ok);
        list.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    (upper_median(def), upper_median(list))
}

fn head(name: &str) -> String {
    format!("<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><os><kernel>/boot/vmlinuz</kernel></os>")
}

fn main() {
    let dir = scratch("hostile-bench");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let mut conn = Connection::open(&d.socket).unwrap();
    for i in 0..100 {
        assert!(conn.call(&Request::Define { xml: domain_xml(&format!("d{i:03}"), &k.idle, "") }).unwrap().ok);
    }
    const RUNS: usize = 201;
    let (d0, l0) = round_trips(&mut conn, &k.idle, RUNS);
    let idle: Vec<UnixStream> = (0..1000).map(|_| UnixStream::connect(&d.socket).unwrap()).collect();
    let (d1, l1) = round_trips(&mut conn, &k.idle, RUNS);
    drop(idle);
    println!("rvirtd round trips, median of {RUNS} (ms):");
    println!("  {:<26} {:>8} {:>8}", "", "define", "list");
    println!("  {:<26} {:>8.3} {:>8.3}", "no other client", d0, l0);
    println!("  {:<26} {:>8.3} {:>8.3}", "1,000 idle connections", d1, l1);
    println!("  {:<26} {:>8.2} {:>8.2}", "ratio", d1 / d0, l1 / l0);

    println!("domain XML parse, median of 21:");
    let unknowns = |n: usize, each: usize| format!("{}{}</domain>", head("p"), (0..n).map(|i| format!("<u{i}>{}</u{i}>\n", "x".repeat(each))).collect::<String>());
    let metadata = format!("{}<metadata>{}</metadata></domain>", head("m"), "<app:item xmlns:app='urn:x' k='v'/>\n".repeat(29_000));
    let cases = [
        ("1 KiB", format!("{}</domain>", head("small")) + &" ".repeat(900)),
        ("100 KiB, 100 unknown", unknowns(100, 1000)),
        ("1 MiB, 1,000 unknown", unknowns(1000, 1040)),
        ("1 MiB <metadata>", metadata),
    ];
    for (label, xml) in cases {
        let times: Vec<f64> = (0..21)
            .map(|_| {
                let t = Instant::now();
                DomainXml::parse(&xml).unwrap();
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        let ms = upper_median(times);
        println!("  {label:<22} {:>8} bytes {:>9.3} ms {:>8.4} ms/KiB", xml.len(), ms, ms / (xml.len() as f64 / 1024.0));
    }
}
