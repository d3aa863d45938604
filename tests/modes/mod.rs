//! A test written once for both modes. `two_modes!(name, body)` defines the tests
//! `name::simple` and `name::bpf`; each runs `body` (a function or closure taking an `Env`)
//! in its mode: simple mode on the test's thread, bpf mode on a thread in a network namespace
//! of its own (`netns::run`: skipped without root, a failure in CI). Filter one mode with
//! nextest as `-E 'test(/::bpf$/)'`. (tests/shared_ports.rs has a variant that runs simple
//! mode in a namespace too.)
//!
//! (A module per test rather than `name_simple` and `name_bpf`: `macro_rules!` cannot join
//! identifiers, and the crate takes no dependency for that.)
//!
//! A test crate that uses it declares `mod common; mod netns; mod modes;`.

#![allow(dead_code)]

use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;

use crate::common::{free_port, free_ports, Proxy, TempDir, BIN};
use crate::netns;

/// Define `$name::simple` and `$name::bpf`, each running `$body` with the `Env` of its mode.
#[macro_export]
macro_rules! two_modes {
    ($(#[$attr:meta])* $name:ident, $body:expr) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn simple() {
                $crate::modes::in_mode(
                    $crate::modes::Mode::Simple,
                    concat!(stringify!($name), "::simple"),
                    $body,
                );
            }

            #[test]
            fn bpf() {
                $crate::modes::in_mode(
                    $crate::modes::Mode::Bpf,
                    concat!(stringify!($name), "::bpf"),
                    $body,
                );
            }
        }
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Simple,
    Bpf,
}

/// What a test body needs to know about the mode it runs in.
pub struct Env {
    pub mode: Mode,
    /// bpf mode: the test's own network namespace.
    pub ns: Option<netns::Netns>,
    /// bpf mode: the next frontend port to hand out (any port is free in our own namespace;
    /// these stay below the ephemeral range and away from the listener and metrics ports).
    next_port: Cell<u16>,
}

/// Port of `--metrics` in bpf mode (the namespace is ours).
pub const NETNS_METRICS_PORT: u16 = 9100;

/// Run `body` in `mode`: simple mode on this thread; bpf mode on a thread in a network
/// namespace of its own.
pub fn in_mode(mode: Mode, test: &'static str, body: impl FnOnce(Env) + Send + 'static) {
    match mode {
        Mode::Simple => body(Env {
            mode,
            ns: None,
            next_port: Cell::new(0),
        }),
        Mode::Bpf => netns::run(test, move |ns| {
            body(Env {
                mode,
                ns: Some(ns),
                next_port: Cell::new(20_000),
            })
        }),
    }
}

impl Env {
    /// `n` frontend ports nobody listens on.
    pub fn ports(&self, n: usize) -> Vec<u16> {
        match self.mode {
            Mode::Simple => free_ports(n),
            Mode::Bpf => (0..n)
                .map(|_| {
                    let p = self.next_port.get();
                    self.next_port.set(p + 1);
                    p
                })
                .collect(),
        }
    }

    /// An address for `--metrics`.
    pub fn metrics_addr(&self) -> SocketAddr {
        let port = match self.mode {
            Mode::Simple => free_port(),
            Mode::Bpf => NETNS_METRICS_PORT,
        };
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    /// Start the proxy in this mode on `nports` frontend ports with the config `make_config`
    /// builds from them, and wait until it serves. (Simple mode starts again on other ports
    /// if one was taken meanwhile.)
    pub fn start_on(
        &self,
        nports: usize,
        args: &[&str],
        make_config: impl Fn(&[u16]) -> String,
    ) -> Proxy {
        match self.mode {
            Mode::Simple => Proxy::start(nports, args, make_config),
            Mode::Bpf => {
                let ports = self.ports(nports);
                self.start(&ports, &make_config(&ports), args)
            }
        }
    }

    /// Start the proxy in this mode on `config_json` (which serves `ports`) and wait until it
    /// serves.
    pub fn start(&self, ports: &[u16], config_json: &str, args: &[&str]) -> Proxy {
        self.start_with(ports, config_json, args, |_| {})
    }

    /// [`Env::start`], letting `adjust` change the command first.
    pub fn start_with(
        &self,
        ports: &[u16],
        config_json: &str,
        args: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Proxy {
        let mut p = match self.mode {
            Mode::Simple => {
                let dir = TempDir::new("reliability");
                let cfg = dir.write("config.json", config_json);
                let mut cmd = Command::new(BIN);
                cmd.arg("simple").arg("-c").arg(&cfg).args(args);
                adjust(&mut cmd);
                let mut p = Proxy::spawn_cmd(cmd, dir, cfg);
                if let Err(log) = p.wait_started() {
                    panic!("flyproxy did not start:\n{log}");
                }
                p
            }
            Mode::Bpf => {
                let p = netns::spawn_with(config_json, args, adjust);
                p.wait_log("started mode=bpf", |l| {
                    l.contains(" INFO  started mode=bpf ")
                });
                p
            }
        };
        p.ports = ports.to_vec();
        p
    }
}
