//! The backends, run as child processes (`flyproxy-reliability backend ...`) so that a fault can
//! kill one for real. A fixed set of threads each blocks in accept() and serves one connection
//! at a time, so a million short connections cost no thread creation (the example echo server
//! starts a thread per connection).
//!
//! Modes: `echo` sends back every byte, then shuts its write side down after the client's EOF;
//! `reset` reads the first bytes and resets the connection (SO_LINGER 0), a backend fault.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};

use crate::procs::set_linger_zero;

fn echo(mut s: TcpStream) {
    // A connection that hangs (it must not) frees its thread after a while all the same.
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(60)));
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    // Nothing more can arrive after the client's EOF, so closing now sends a FIN, not a reset.
    let _ = s.shutdown(Shutdown::Write);
}

fn reset(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    let _ = s.read(&mut buf);
    set_linger_zero(&s);
}

/// `backend ADDR THREADS MODE`
pub fn main(args: &[String]) -> ! {
    let [addr, threads, mode] = args else {
        eprintln!("usage: backend ADDR THREADS echo|reset");
        std::process::exit(2);
    };
    let threads: usize = threads.parse().expect("THREADS");
    let serve: fn(TcpStream) = match mode.as_str() {
        "echo" => echo,
        "reset" => reset,
        _ => {
            eprintln!("backend: unknown mode {mode}");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("backend: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let mut handles = Vec::new();
    for i in 0..threads {
        let l = listener.try_clone().expect("listener clone");
        handles.push(
            std::thread::Builder::new()
                .name(format!("be-{i}"))
                .stack_size(128 * 1024)
                .spawn(move || loop {
                    match l.accept() {
                        Ok((s, _)) => serve(s),
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                    }
                })
                .expect("backend thread"),
        );
    }
    for h in handles {
        let _ = h.join();
    }
    std::process::exit(0)
}
