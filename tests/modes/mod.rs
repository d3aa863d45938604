//! A test written once for both modes. `two_modes!(name, body)` defines the tests
//! `name::simple` and `name::bpf`; each runs `body` (a function or closure taking an `Env`) on
//! a thread of its own in a network namespace of its own, so that a test may use fixed ports
//! and add addresses to `lo` and no two tests see each other's sockets. bpf mode needs that
//! namespace (root, a kernel with sk_lookup): without it the test is skipped with a message,
//! and in CI (`CI` set to anything but empty, `0` or `false`) it fails. Simple mode without
//! root runs on the host instead, unless the test is declared `two_modes!(netns name, body)`
//! (it adds addresses or uses fixed ports): then it is skipped (failed in CI) like bpf mode.
//! Filter one mode with nextest as `-E 'test(/::bpf$/)'`.
//!
//! (A module per test rather than `name_simple` and `name_bpf`: `macro_rules!` cannot join
//! identifiers, and the crate takes no dependency for that.)
//!
//! A test crate that uses it declares `mod common; mod netns; mod modes;`.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};

use crate::common::{free_port, free_ports, Launch};
use crate::netns;

pub use crate::common::Mode;

/// Define `$name::simple` and `$name::bpf`, each running `$body` with the `Env` of its mode.
#[macro_export]
macro_rules! two_modes {
    ($(#[$attr:meta])* netns $name:ident, $body:expr) => {
        $crate::two_modes!(@define $(#[$attr])* $name, true, $body);
    };
    ($(#[$attr:meta])* $name:ident, $body:expr) => {
        $crate::two_modes!(@define $(#[$attr])* $name, false, $body);
    };
    (@define $(#[$attr:meta])* $name:ident, $needs_netns:expr, $body:expr) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn simple() {
                $crate::modes::in_mode(
                    $crate::modes::Mode::Simple,
                    concat!(stringify!($name), "::simple"),
                    $needs_netns,
                    $body,
                );
            }

            #[test]
            fn bpf() {
                $crate::modes::in_mode(
                    $crate::modes::Mode::Bpf,
                    concat!(stringify!($name), "::bpf"),
                    $needs_netns,
                    $body,
                );
            }
        }
    };
}

/// What a test body needs to know about the mode it runs in.
pub struct Env {
    pub mode: Mode,
    /// bpf mode: the test's network namespace, to ask bpftool what is attached there. (Simple
    /// mode runs in a namespace of its own too where it can, but has nothing to ask.)
    pub ns: Option<netns::Netns>,
}

/// Run `body` in `mode` on a thread of its own, in a network namespace of its own (see the
/// module's comment for what happens where there can be none).
pub fn in_mode(
    mode: Mode,
    test: &'static str,
    needs_netns: bool,
    body: impl FnOnce(Env) + Send + 'static,
) {
    match mode {
        Mode::Bpf => netns::run(test, move |ns| body(Env { mode, ns: Some(ns) })),
        // Simple mode has nothing to ask bpftool: the namespace, if any, stays unnamed.
        Mode::Simple => netns::run_plain(test, needs_netns, move |_| body(Env { mode, ns: None })),
    }
}

impl Env {
    /// `n` frontend ports nobody listens on.
    pub fn ports(&self, n: usize) -> Vec<u16> {
        free_ports(n)
    }

    /// An address for `--metrics`.
    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
    }

    /// A proxy to start in this mode (the builder of tests/common).
    pub fn proxy(&self) -> Launch<'static> {
        Launch::new(self.mode)
    }
}
