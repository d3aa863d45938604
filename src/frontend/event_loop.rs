//! The listener loop: one mio `Poll` for signals, config reload ticks, drain deadlines, and
//! resuming accepts paused at the connection bound or after an accept error. It does not accept:
//! the relay threads do, from the doors the mode opened (`relay::accept`), so a new connection
//! costs no hand-off between threads. The loop is the only thread that opens and closes
//! listeners (through the mode's `PortSource`) and swaps the routing table the relay threads
//! route by. A reload is built by the config plane (`plane`) on a thread of its own; the loop
//! only swaps the new table in and applies its port change. What the signals do to the process
//! as a whole (stop, upgrade) is decided in `lifecycle`; the loop carries it out.

use std::collections::HashSet;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use crate::backends::clients::ClientCounts;
use crate::backends::resolver::Resolver;
use crate::backends::routing::Routes;
use crate::cli::Settings;
use crate::frontend::lifecycle::{Lifecycle, Next};
use crate::frontend::plane::{Change, LoopEnd, Verdict};
use crate::frontend::ports::PortSource;
use crate::frontend::signals::{self, SignalPipes};
use crate::frontend::tokens::{
    PLANE, REOPEN_PIPE, SIGHUP_PIPE, STOP_PIPE, UPGRADE_PIPE, UPGRADE_READY, WAKE,
};
use crate::metrics::Published;
use crate::relay::accept::Accepting;
use crate::relay::conns::{Conns, Ports};
use crate::relay::doors::Doors;
use crate::relay::park::Lot;
use crate::relay::pool::Pool;
use crate::relay::session::{self, Context, Session, Task, Timeouts};
use crate::relay::slots::Slots;
use crate::relay::transfer::Carriers;

pub(super) struct Loop {
    settings: Settings,
    source: Box<dyn PortSource>,
    plane: LoopEnd,
    slots: Arc<Slots>,
    conns: Arc<Conns>,
    /// The relay threads' accepting: the routing table they route by (the config plane builds
    /// the next one), and the doors held paused.
    accepting: Arc<Accepting>,
    lifecycle: Lifecycle,
    signals: SignalPipes,
    /// When the next connection being drained (a removed port, a stop) is due to be cut.
    next_drain: Option<Instant>,
}

/// What the loop shares with the relay threads: the bound, the open connections it drains, and
/// their accepting.
pub(super) struct Relay {
    /// The connection bound.
    pub(super) slots: Arc<Slots>,
    pub(super) conns: Arc<Conns>,
    pub(super) accepting: Arc<Accepting>,
}

impl Relay {
    /// The relay threads (`threads` of them, not started yet) and what the loop shares with
    /// them: connections wait in `lot`, and come in through `doors`, routed by `routes` and
    /// counted under `slots` and --max-connections-per-client; the relay may hold `pipes`
    /// kernel pipes at once.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn build(
        settings: &Settings,
        threads: usize,
        pipes: usize,
        lot: Arc<Lot<Box<Session>>>,
        doors: Arc<Doors>,
        routes: Arc<Routes>,
        published: &Published,
        resolver: &Resolver,
        slots: Arc<Slots>,
    ) -> (Pool<Task>, Relay) {
        let conns = Arc::new(Conns::default());
        let clients = (settings.max_connections_per_client > 0)
            .then(|| ClientCounts::new(settings.max_connections_per_client));
        let accepting = Arc::new(Accepting::new(
            doors,
            routes,
            Arc::clone(&slots),
            clients,
            Arc::clone(&published.unrouted),
            Arc::clone(&published.accept_paused),
        ));
        let cx = Context {
            timeouts: Timeouts {
                connect: settings.connect_timeout,
                idle: settings.idle_timeout,
                preread: settings.preread_timeout,
            },
            carriers: Carriers::new(pipes),
            conns: Arc::clone(&conns),
            unrouted: Arc::clone(&published.unrouted),
            slots: Arc::clone(&slots),
            lot: Arc::clone(&lot),
            resolver: resolver.clone(),
            accepting: Arc::clone(&accepting),
        };
        let pool = Pool::new(threads, lot, move |task, turn| {
            session::run(task, &cx, turn)
        });
        let relay = Relay {
            slots,
            conns,
            accepting,
        };
        (pool, relay)
    }
}

impl Loop {
    /// A loop over `source`'s listeners, whose connections the relay threads route by the
    /// table `relay.accepting` holds until the config plane (`plane`, its pipe registered)
    /// sends another, with nothing draining.
    pub(super) fn new(
        settings: Settings,
        source: Box<dyn PortSource>,
        plane: LoopEnd,
        relay: Relay,
        lifecycle: Lifecycle,
        signals: SignalPipes,
    ) -> Loop {
        Loop {
            settings,
            source,
            plane,
            slots: relay.slots,
            conns: relay.conns,
            accepting: relay.accepting,
            lifecycle,
            signals,
            next_drain: None,
        }
    }

    /// A SIGHUP that came while starting: the file may have changed since it was read, so
    /// reload it before serving.
    pub(super) fn reload_if_hup_arrived(&mut self) {
        if signals::arrived(&mut self.signals.hup) {
            crate::info!(
                "SIGHUP during start-up: reloading {}",
                self.settings.config.display()
            );
            self.plane.reloads.request();
        }
    }

    /// True once the listeners were handed to a new process (which then owns the pid file).
    pub(super) fn handed_over(&self) -> bool {
        self.lifecycle.handed_over()
    }

    /// Serve until the process has drained after a stop or a hand-over. An error means
    /// waiting for events failed.
    pub(super) fn run(&mut self, poll: &mut Poll) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut next_tick = Instant::now() + self.settings.reload_interval;
        loop {
            let now = Instant::now();
            let mut wake_at = next_tick;
            for t in [
                self.next_drain,
                self.lifecycle.drain_deadline(),
                self.accepting.backoff_until(),
                self.lifecycle.upgrade_deadline(),
            ]
            .into_iter()
            .flatten()
            {
                wake_at = wake_at.min(t);
            }
            let timeout = wake_at.saturating_duration_since(now);
            if let Err(e) = poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            for event in events.iter() {
                self.event(poll, event.token());
            }

            let now = Instant::now();
            let draining = self.lifecycle.is_draining();
            if !draining {
                // A slot came back at the bound (WAKE), or the back-off after an accept error
                // is over: arm the doors held paused again.
                self.accepting.resume(now);
            }
            if now >= next_tick {
                next_tick = now + self.settings.reload_interval;
                if !draining {
                    self.source.tick();
                    self.plane.reloads.tick();
                }
            }
            self.lifecycle.upgrade_timer(poll.registry(), now);
            if self.next_drain.is_some_and(|d| now >= d) {
                let (cut, next) = self.conns.cut_expired(now);
                if cut > 0 {
                    crate::info!("drain timeout: closed {cut} connections");
                }
                self.next_drain = next;
            }
            if self.drained(now) {
                return Ok(());
            }
        }
    }

    /// One readiness event: a signal, a wake-up, the upgrade's new process, or a listener.
    fn event(&mut self, poll: &Poll, token: Token) {
        match token {
            SIGHUP_PIPE => {
                signals::arrived(&mut self.signals.hup);
                if self.lifecycle.is_draining() {
                    // Draining: nothing would accept on a port a reload added.
                    crate::info!("SIGHUP ignored: stopping");
                } else {
                    crate::info!("SIGHUP: reloading {}", self.settings.config.display());
                    self.plane.reloads.request();
                }
            }
            STOP_PIPE => {
                signals::arrived(&mut self.signals.stop);
                let next = self.lifecycle.stop_signal(poll.registry());
                self.carry_out(next);
            }
            UPGRADE_PIPE => {
                signals::arrived(&mut self.signals.upgrade);
                self.lifecycle
                    .upgrade_signal(poll.registry(), self.source.as_ref());
            }
            REOPEN_PIPE => {
                signals::arrived(&mut self.signals.reopen);
                crate::info!("SIGUSR1: reopening the log files");
                crate::sys::log::reopen();
            }
            UPGRADE_READY => {
                let next = self.lifecycle.upgrade_progress(poll.registry());
                self.carry_out(next);
            }
            // A slot came back at the bound, or a relay thread started a back-off: `run` looks.
            WAKE => {}
            PLANE => {
                signals::arrived(&mut self.plane.pipe);
                while let Ok(change) = self.plane.changes.try_recv() {
                    let verdict = self.apply(change);
                    // The plane waits for it; gone only if the plane is (the process exits).
                    let _ = self.plane.verdicts.send(verdict);
                }
            }
            _ => {}
        }
    }

    /// While draining: true once every connection is done, or the drain deadline is past.
    fn drained(&self, now: Instant) -> bool {
        let Some(deadline) = self.lifecycle.drain_deadline() else {
            return false;
        };
        let active = self.slots.taken();
        if active == 0 {
            crate::info!("stopped: every connection finished");
            return true;
        }
        // Connections cut at the drain deadline end within moments; give their threads a
        // second to log, then go regardless.
        if now >= deadline + Duration::from_secs(1) {
            crate::warn!("stopped: drain timeout passed with {active} connections still open");
            return true;
        }
        false
    }

    /// Do what a lifecycle transition asks of the rest of the process.
    fn carry_out(&mut self, next: Next) {
        match next {
            Next::Carry => {}
            Next::Drain(until) => {
                self.slots.wake_on_every_release();
                self.source.stop();
                let n = self.conns.drain(Ports::All, until);
                self.next_drain = Some(self.next_drain.map_or(until, |d| d.min(until)));
                crate::info!(
                    "stopping: listeners closed, {n} connections draining for up to {:?}",
                    self.settings.drain_timeout
                );
            }
            Next::ExitNow => {
                let open = self.conns.len();
                crate::warn!("second stop signal: exiting now, {open} connections cut");
                crate::sys::log::flush();
                std::process::exit(1);
            }
        }
    }

    /// Swap in the config plane's new table and apply its port change; the table no longer
    /// in force goes back to the plane, to be dropped there. A port change that fails leaves
    /// everything as it was.
    fn apply(&mut self, change: Change) -> Verdict {
        if self.lifecycle.is_draining() {
            // The listeners are closed: nothing would accept on a port the change adds.
            return Verdict {
                refused: Some("the proxy is stopping".into()),
                dropped: change.routes,
            };
        }
        if let Err(e) = self.source.apply(&change.ports) {
            return Verdict {
                refused: Some(e.to_string()),
                dropped: change.routes,
            };
        }
        let old = self.accepting.set_routes(change.routes);
        if !change.ports_removed.is_empty() {
            let removed: HashSet<u16> = change.ports_removed.iter().copied().collect();
            let at = Instant::now() + self.settings.drain_timeout;
            let n = self.conns.drain(Ports::Some(removed), at);
            // Set even when none is open now: one accepted just before may register late.
            self.next_drain = Some(self.next_drain.map_or(at, |d| d.min(at)));
            if n > 0 {
                crate::info!(
                    "reload: {n} connections on removed ports draining for up to {:?}",
                    self.settings.drain_timeout
                );
            }
        }
        Verdict {
            refused: None,
            dropped: old,
        }
    }
}
