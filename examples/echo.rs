//! A small TCP echo server for trying flyproxy out (`make run` starts it) and for the benchmark:
//! `cargo run --release --example echo -- 127.0.0.1:7001 127.0.0.1:7002 ...`
//! Each address gets a listener; each connection gets a thread that echoes until EOF and then
//! closes its write side, so half-close through the proxy can be seen working.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;

fn serve(mut s: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

fn main() {
    let addrs: Vec<String> = std::env::args().skip(1).collect();
    if addrs.is_empty() {
        eprintln!("usage: echo ADDR [ADDR...]   e.g. echo 127.0.0.1:7001");
        std::process::exit(2);
    }
    let mut handles = Vec::new();
    for addr in addrs {
        let listener = match TcpListener::bind(&addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("echo: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        eprintln!("echo: listening on {addr}");
        handles.push(thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                thread::spawn(move || serve(conn));
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
}
