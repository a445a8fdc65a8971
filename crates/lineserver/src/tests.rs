use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

fn socket(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("rvirt-lineserver-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Echoes requests upper-cased; "sleep" takes a while.
fn start(name: &str, limits: Limits) -> (PathBuf, Server) {
    let p = socket(name);
    let listener = UnixListener::bind(&p).unwrap();
    let handler: Arc<Handler> = Arc::new(|line: Line| match line {
        Line::Request(b"sleep") => {
            std::thread::sleep(Duration::from_millis(300));
            b"SLEPT".to_vec()
        }
        Line::Request(b"big") => vec![b'x'; 4 << 20],
        Line::Request(b"who") => peer().map(|p| format!("{} {} {}", p.pid, p.uid, p.gid)).unwrap_or_default().into_bytes(),
        Line::Request(r) => r.to_ascii_uppercase(),
        Line::TooLong => b"too long".to_vec(),
        Line::Busy => b"busy".to_vec(),
    });
    let server = spawn(listener, limits, handler).unwrap();
    (p, server)
}

fn ask(s: &mut BufReader<UnixStream>, req: &str) -> String {
    s.get_mut().write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    s.read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

fn connect(p: &PathBuf) -> BufReader<UnixStream> {
    let s = UnixStream::connect(p).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(s)
}

fn wait_for(server: &Server, what: &str, ok: impl Fn(Stats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok(server.stats()) {
        assert!(Instant::now() < deadline, "{what}: {:?}", server.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn handlers_know_who_sent_the_request() {
    let (p, _server) = start("peer", Limits::default());
    let mut c = connect(&p);
    // SAFETY: getuid and getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    assert_eq!(ask(&mut c, "who"), format!("{} {uid} {gid}", std::process::id()));
    assert_eq!(peer(), None, "only inside a handler");
}

#[test]
fn a_thousand_idle_connections_cost_no_threads_and_block_nobody() {
    let (p, server) = start("idle", Limits::default());
    let idle: Vec<UnixStream> = (0..1000).map(|_| UnixStream::connect(&p).unwrap()).collect();
    wait_for(&server, "all connected", |s| s.connections == 1000);
    let threads = std::fs::read_dir("/proc/self/task").unwrap().count();
    let mut c = connect(&p);
    assert_eq!(ask(&mut c, "hello"), "HELLO");
    // Pipelined requests on one connection are answered in order.
    c.get_mut().write_all(b"a\n\n  b  \nc\n").unwrap();
    for want in ["A", "B", "C"] {
        let mut line = String::new();
        c.read_line(&mut line).unwrap();
        assert_eq!(line.trim_end(), want);
    }
    assert!(threads < 100, "{threads} threads for 1,000 idle connections");
    drop(idle);
    wait_for(&server, "idle connections gone", |s| s.connections == 1);
}

#[test]
fn half_sent_lines_are_bounded_in_memory_and_time() {
    let limits = Limits { max_line: 1 << 20, max_buffered: 8 << 20, line_timeout: Duration::from_millis(500), ..Limits::default() };
    let (p, server) = start("partial", limits);
    // 40 clients each send 900 KiB of a line and stop: 36 MB if all were kept.
    let chunk = vec![b'y'; 900 << 10];
    let mut partial: Vec<UnixStream> = Vec::new();
    for _ in 0..40 {
        let mut s = UnixStream::connect(&p).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&chunk);
        partial.push(s);
    }
    let stats = server.stats();
    assert!(stats.peak_buffered <= (8 << 20) + (1 << 20), "peak {} bytes buffered", stats.peak_buffered);
    let mut c = connect(&p);
    assert_eq!(ask(&mut c, "still here"), "STILL HERE");
    // The line timeout closes whoever is left.
    wait_for(&server, "partial lines timed out", |s| s.buffered == 0 && s.connections <= 1);
}

#[test]
fn overlong_lines_get_an_answer_and_a_close() {
    let (p, _server) = start("long", Limits { max_line: 1000, ..Limits::default() });
    let mut c = connect(&p);
    c.get_mut().write_all(&vec![b'z'; 5000]).unwrap();
    let mut line = String::new();
    c.read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), "too long");
    line.clear();
    assert_eq!(c.read_line(&mut line).unwrap(), 0, "closed after the answer");
}

#[test]
fn a_full_server_says_so_and_a_slow_reader_blocks_nobody() {
    let (p, server) = start("full", Limits { max_connections: 3, write_timeout: Duration::from_millis(500), ..Limits::default() });
    let a = connect(&p);
    // Asks for 4 MiB and never reads it.
    a.get_ref().try_clone().unwrap().write_all(b"big\n").unwrap();
    let mut b = connect(&p);
    assert_eq!(ask(&mut b, "b"), "B");
    let _c = connect(&p);
    wait_for(&server, "three connected", |s| s.connections == 3);
    let mut d = connect(&p);
    let mut line = String::new();
    d.read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), "busy");
    // The stuck reader is closed once its write timeout passes.
    wait_for(&server, "slow reader dropped", |s| s.connections == 2);
    drop(a);
}

#[test]
fn a_client_that_half_closes_still_gets_its_answer() {
    let (p, _server) = start("halfclose", Limits::default());
    let mut c = connect(&p);
    c.get_mut().write_all(b"sleep\n").unwrap();
    c.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
    let mut line = String::new();
    c.read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), "SLEPT");
}

#[test]
fn clients_that_ask_and_never_read_are_bounded_too() {
    let limits = Limits { max_buffered: 16 << 20, write_timeout: Duration::from_secs(30), ..Limits::default() };
    let (p, server) = start("unread", limits);
    // Each asks for a 4 MiB answer and never reads it: 40 would hold 160 MiB.
    let mut askers = Vec::new();
    for _ in 0..40 {
        let mut s = UnixStream::connect(&p).unwrap();
        s.write_all(b"big\n").unwrap();
        askers.push(s);
    }
    wait_for(&server, "the largest holders closed", |s| s.dropped > 0);
    std::thread::sleep(Duration::from_millis(500));
    let stats = server.stats();
    assert!(stats.peak_buffered <= (16 << 20) + (5 << 20), "{stats:?}");
    assert!(stats.dropped > 0, "the largest holders were closed: {stats:?}");
    let mut c = connect(&p);
    assert_eq!(ask(&mut c, "fine"), "FINE");
}
