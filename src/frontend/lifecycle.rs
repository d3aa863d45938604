//! The process's lifecycle as one set of phases, and every transition between them.
//!
//! ```text
//!   Serving ──SIGUSR2──▶ Upgrading ──the new process serves──▶ Draining (handed over)
//!      ▲                     │
//!      └──fails, times out───┘
//!   Serving or Upgrading ──stop signal──▶ Draining (stopped)
//! ```
//!
//! While draining, the listeners are closed and open connections finish, or are cut at the
//! drain deadline; the loop returns once none is left. A stop signal while draining exits at
//! once, except the first one after a hand-over: that one (systemd stopping the whole group,
//! say) only confirms what the upgrade started.
//!
//! `Lifecycle` decides and keeps the phase; the listener loop carries out what a transition
//! asks of the rest of the process (`Next`).

use std::io::{self, Read};
use std::time::{Duration, Instant};

use mio::{Interest, Registry};

use crate::frontend::ports::PortSource;
use crate::frontend::tokens::UPGRADE_READY;
use crate::metrics::Endpoint;
use crate::sys::upgrade::{self, Exec, Upgrade};

/// How long a new process may take to start serving before an upgrade is abandoned.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

enum Phase {
    /// Accepting and relaying.
    Serving,
    /// Still serving, while a new process started on our listeners gets ready.
    Upgrading(InProgress),
    /// Listeners closed; open connections finish or are cut at `until`.
    Draining { until: Instant, cause: Cause },
}

/// Why the process drains.
enum Cause {
    /// A stop signal.
    Stopped,
    /// A new process serves in our place. `confirmed`: a stop signal has come since, so the
    /// next one exits at once.
    HandedOver { confirmed: bool },
}

/// An upgrade in progress: the new process, its readiness pipe, and when we give up on it.
struct InProgress {
    up: Upgrade,
    deadline: Instant,
}

/// What a transition asks of the listener loop.
#[must_use]
pub(super) enum Next {
    /// Nothing beyond what the lifecycle did itself.
    Carry,
    /// Close the listeners and drain every open connection until this instant.
    Drain(Instant),
    /// Exit now, cutting whatever is open.
    ExitNow,
}

pub(super) struct Lifecycle {
    phase: Phase,
    /// How to start our successor; None if it could not be determined (upgrades refused).
    exec: Option<Exec>,
    /// The metrics endpoint, handed over with the listeners.
    metrics: Option<Endpoint>,
    drain_timeout: Duration,
}

impl Lifecycle {
    pub(super) fn new(
        exec: Option<Exec>,
        metrics: Option<Endpoint>,
        drain_timeout: Duration,
    ) -> Lifecycle {
        Lifecycle {
            phase: Phase::Serving,
            exec,
            metrics,
            drain_timeout,
        }
    }

    /// When connections still open are cut, while draining.
    pub(super) fn drain_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Draining { until, .. } => Some(until),
            _ => None,
        }
    }

    pub(super) fn is_draining(&self) -> bool {
        self.drain_deadline().is_some()
    }

    /// When an upgrade in progress is given up.
    pub(super) fn upgrade_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Upgrading(u) => Some(u.deadline),
            _ => None,
        }
    }

    /// A new process took over from this one.
    pub(super) fn handed_over(&self) -> bool {
        matches!(
            self.phase,
            Phase::Draining {
                cause: Cause::HandedOver { .. },
                ..
            }
        )
    }

    /// SIGTERM, SIGINT or SIGQUIT.
    pub(super) fn stop_signal(&mut self, registry: &Registry) -> Next {
        match &mut self.phase {
            Phase::Draining {
                cause: Cause::HandedOver { confirmed },
                ..
            } if !*confirmed => {
                // Draining after an upgrade was our own doing: the first stop signal (systemd
                // stopping the whole group, say) only confirms it.
                *confirmed = true;
                crate::info!("stop signal: already draining after an upgrade");
                Next::Carry
            }
            Phase::Draining { .. } => Next::ExitNow,
            Phase::Serving | Phase::Upgrading(_) => {
                // A new process not yet serving is abandoned: stopping means no process of
                // ours serves any more.
                self.abandon_upgrade(
                    registry,
                    "was abandoned: this process was told to stop",
                    true,
                );
                self.drain(Cause::Stopped)
            }
        }
    }

    /// SIGUSR2: start the binary anew with `source`'s listeners; see `sys::upgrade`.
    pub(super) fn upgrade_signal(&mut self, registry: &Registry, source: &dyn PortSource) {
        match self.phase {
            Phase::Draining { .. } => {
                crate::warn!("SIGUSR2 ignored: already stopping");
                return;
            }
            Phase::Upgrading(_) => {
                crate::warn!("SIGUSR2 ignored: an upgrade is already in progress");
                return;
            }
            Phase::Serving => {}
        }
        let Some(exec) = &self.exec else {
            crate::error!(
                "upgrade refused: the path of this binary could not be determined at start"
            );
            return;
        };
        let listeners = source.handover();
        let metrics = self.metrics.as_ref().map(Endpoint::socket);
        match upgrade::spawn(exec, &listeners, metrics) {
            Ok(mut up) => {
                crate::info!(
                    "upgrade: started {} as pid {} with {} listeners; waiting for it to serve",
                    exec.exe.display(),
                    up.child.id(),
                    listeners.len()
                );
                if let Err(e) = registry.register(&mut up.ready, UPGRADE_READY, Interest::READABLE)
                {
                    crate::error!("upgrade: cannot watch the new process: {e}");
                }
                self.phase = Phase::Upgrading(InProgress {
                    up,
                    deadline: Instant::now() + UPGRADE_TIMEOUT,
                });
            }
            Err(e) => crate::error!(
                "upgrade failed: cannot start {}: {e}; carrying on",
                exec.exe.display()
            ),
        }
    }

    /// The new process wrote to its readiness pipe, or closed it.
    pub(super) fn upgrade_progress(&mut self, registry: &Registry) -> Next {
        let Phase::Upgrading(progress) = &mut self.phase else {
            return Next::Carry;
        };
        let mut buf = [0u8; 8];
        let ready = loop {
            match progress.up.ready.read(&mut buf) {
                Ok(0) => break Some(false),
                Ok(_) if buf.contains(&b'R') => break Some(true),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(_) => break Some(false),
            }
        };
        match ready {
            None => Next::Carry,
            Some(false) => {
                self.abandon_upgrade(registry, "exited before it was serving", false);
                Next::Carry
            }
            Some(true) => {
                let _ = registry.deregister(&mut progress.up.ready);
                let pid = progress.up.child.id();
                crate::info!(
                    "upgrade: pid {pid} is serving; this process stops accepting and drains"
                );
                // Tell systemd the service now lives on in the new process. Only the main pid
                // may say so (NotifyAccess=main), so it has to come from us.
                let _ = crate::sys::systemd::notify(&format!("MAINPID={pid}\nREADY=1"));
                // The new process serves /metrics on the same socket from now on.
                if let Some(m) = &self.metrics {
                    m.hand_over();
                }
                self.drain(Cause::HandedOver { confirmed: false })
            }
        }
    }

    /// Give up on an upgrade that is late.
    pub(super) fn upgrade_timer(&mut self, registry: &Registry, now: Instant) {
        if self.upgrade_deadline().is_some_and(|d| now >= d) {
            self.abandon_upgrade(registry, "was not serving within the upgrade timeout", true);
        }
    }

    /// Give up on an upgrade, if one is in progress: the old process (this one) carries on as
    /// before. `kill` ends the new process at once; otherwise it is exiting already and gets a
    /// moment to finish writing its own error.
    fn abandon_upgrade(&mut self, registry: &Registry, why: &str, kill: bool) {
        if !matches!(self.phase, Phase::Upgrading(_)) {
            return;
        }
        let Phase::Upgrading(mut failed) = std::mem::replace(&mut self.phase, Phase::Serving)
        else {
            return;
        };
        let _ = registry.deregister(&mut failed.up.ready);
        let child = &mut failed.up.child;
        // Give a process that is exiting a moment to finish (and write its own error), then
        // make sure nothing lingers half-started.
        if kill {
            let _ = child.kill();
        }
        let until = Instant::now() + Duration::from_secs(2);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status.to_string(),
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    break child
                        .wait()
                        .map_or_else(|e| e.to_string(), |s| s.to_string());
                }
            }
        };
        crate::error!(
            "upgrade failed: new process {} {why} ({status}); this process carries on serving",
            child.id()
        );
    }

    /// Enter the draining phase (ending an upgrade in progress, whose new process has been
    /// dealt with by then).
    fn drain(&mut self, cause: Cause) -> Next {
        let until = Instant::now() + self.drain_timeout;
        self.phase = Phase::Draining { until, cause };
        Next::Drain(until)
    }
}

#[cfg(test)]
mod tests {
    //! Every transition the diagram above shows, and the ones it refuses. An upgrade's "new
    //! process" is `/bin/sh -c SCRIPT`, started through the real `upgrade::spawn`: the script
    //! writes the readiness byte, exits early, or never answers.

    use super::*;
    use std::ffi::OsString;
    use std::net::SocketAddr;
    use std::os::fd::RawFd;

    use mio::Poll;

    use crate::backends::routing::Routes;
    use crate::frontend::ports::{PortChange, PortError};

    /// A port source with no listeners: the lifecycle only asks it for what to hand over.
    struct NoPorts;

    impl PortSource for NoPorts {
        fn apply(&mut self, _: &PortChange) -> Result<(), PortError> {
            Ok(())
        }
        fn serve_all(&mut self, _: &Routes) -> Result<(), PortError> {
            Ok(())
        }
        fn stop(&mut self) {}
        fn listeners(&self) -> usize {
            0
        }
        fn handover(&self) -> Vec<(SocketAddr, RawFd)> {
            Vec::new()
        }
    }

    /// The phase, in words, so an assertion failure says where the lifecycle is.
    fn phase(l: &Lifecycle) -> &'static str {
        match l.phase {
            Phase::Serving => "serving",
            Phase::Upgrading(_) => "upgrading",
            Phase::Draining {
                cause: Cause::Stopped,
                ..
            } => "draining (stopped)",
            Phase::Draining {
                cause: Cause::HandedOver { confirmed: false },
                ..
            } => "draining (handed over)",
            Phase::Draining {
                cause: Cause::HandedOver { confirmed: true },
                ..
            } => "draining (handed over, confirmed)",
        }
    }

    /// A lifecycle whose upgrades run `sh -c script` (None: upgrades refused).
    fn lifecycle(script: Option<&str>) -> Lifecycle {
        // bash, not sh: dash redirects only to a one-digit descriptor (`>&12` is "Bad fd
        // number"), and in a test process where earlier tests left descriptors open (a health
        // checker's, under `cargo test`) the readiness socket is past 9.
        let exec = script.map(|s| Exec {
            exe: "/bin/bash".into(),
            args: vec![OsString::from("-c"), OsString::from(s)],
        });
        Lifecycle::new(exec, None, Duration::from_secs(5))
    }

    const SERVES: &str = "printf R >&\"$FLYPROXY_READY_FD\"";
    const FAILS: &str = "exit 3";
    const HANGS: &str = "exec sleep 30";

    /// SIGUSR2 from Serving, which must reach Upgrading.
    fn upgrading(script: &str, poll: &Poll) -> Lifecycle {
        let mut l = lifecycle(Some(script));
        l.upgrade_signal(poll.registry(), &NoPorts);
        assert_eq!(phase(&l), "upgrading");
        assert!(l.upgrade_deadline().is_some() && !l.is_draining());
        l
    }

    /// Feed the new process's readiness pipe to the lifecycle until it leaves Upgrading.
    fn until_the_new_process_answers(l: &mut Lifecycle, poll: &Poll) -> Next {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let next = l.upgrade_progress(poll.registry());
            if !matches!(l.phase, Phase::Upgrading(_)) {
                return next;
            }
            assert!(Instant::now() < until, "the new process never answered");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn serving_stop_drains_and_a_second_stop_exits_now() {
        let poll = Poll::new().unwrap();
        let mut l = lifecycle(None);
        assert_eq!(phase(&l), "serving");
        assert!(l.drain_deadline().is_none() && l.upgrade_deadline().is_none());
        let before = Instant::now();
        let Next::Drain(until) = l.stop_signal(poll.registry()) else {
            panic!("a stop while serving must drain");
        };
        assert!(
            until >= before + Duration::from_secs(5),
            "the drain timeout"
        );
        assert_eq!(phase(&l), "draining (stopped)");
        assert_eq!(l.drain_deadline(), Some(until));
        assert!(l.is_draining() && !l.handed_over());
        assert!(matches!(l.stop_signal(poll.registry()), Next::ExitNow));
    }

    #[test]
    fn an_upgrade_without_a_known_binary_is_refused() {
        let poll = Poll::new().unwrap();
        let mut l = lifecycle(None);
        l.upgrade_signal(poll.registry(), &NoPorts);
        assert_eq!(phase(&l), "serving");
    }

    #[test]
    fn no_upgrade_while_draining() {
        let poll = Poll::new().unwrap();
        let mut l = lifecycle(Some(SERVES));
        let _ = l.stop_signal(poll.registry());
        l.upgrade_signal(poll.registry(), &NoPorts);
        assert_eq!(phase(&l), "draining (stopped)");
    }

    #[test]
    fn readiness_news_while_serving_changes_nothing() {
        let poll = Poll::new().unwrap();
        let mut l = lifecycle(Some(SERVES));
        assert!(matches!(l.upgrade_progress(poll.registry()), Next::Carry));
        l.upgrade_timer(poll.registry(), Instant::now() + Duration::from_secs(3600));
        assert_eq!(phase(&l), "serving");
    }

    #[test]
    fn upgrading_then_the_new_process_serves_hands_over() {
        let poll = Poll::new().unwrap();
        let mut l = upgrading(SERVES, &poll);
        // A second SIGUSR2 while one is in progress is ignored.
        l.upgrade_signal(poll.registry(), &NoPorts);
        assert_eq!(phase(&l), "upgrading");
        let next = until_the_new_process_answers(&mut l, &poll);
        assert!(matches!(next, Next::Drain(_)), "a hand-over drains");
        assert_eq!(phase(&l), "draining (handed over)");
        assert!(l.handed_over());
        // The first stop after a hand-over only confirms it; the next exits at once.
        assert!(matches!(l.stop_signal(poll.registry()), Next::Carry));
        assert_eq!(phase(&l), "draining (handed over, confirmed)");
        assert!(matches!(l.stop_signal(poll.registry()), Next::ExitNow));
    }

    #[test]
    fn upgrading_then_the_new_process_fails_serves_on() {
        let poll = Poll::new().unwrap();
        let mut l = upgrading(FAILS, &poll);
        let next = until_the_new_process_answers(&mut l, &poll);
        assert!(matches!(next, Next::Carry));
        assert_eq!(phase(&l), "serving");
        assert!(l.upgrade_deadline().is_none());
    }

    #[test]
    fn upgrading_then_the_timeout_serves_on() {
        let poll = Poll::new().unwrap();
        let mut l = upgrading(HANGS, &poll);
        // Not yet due: nothing changes.
        l.upgrade_timer(poll.registry(), Instant::now());
        assert_eq!(phase(&l), "upgrading");
        let due = l.upgrade_deadline().unwrap();
        l.upgrade_timer(poll.registry(), due);
        assert_eq!(phase(&l), "serving");
    }

    #[test]
    fn upgrading_then_a_stop_abandons_the_upgrade_and_drains() {
        let poll = Poll::new().unwrap();
        let mut l = upgrading(HANGS, &poll);
        assert!(matches!(l.stop_signal(poll.registry()), Next::Drain(_)));
        assert_eq!(phase(&l), "draining (stopped)");
        assert!(!l.handed_over() && l.upgrade_deadline().is_none());
    }
}
