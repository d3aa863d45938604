//! The listener loop: one mio `Poll` that accepts connections from the mode's listeners, hands
//! them to the relay pool, and handles signals, config reload ticks, drain deadlines and the
//! connection bound. It is the only thread that touches the routing table and the listeners,
//! so neither needs a lock. A reload is built by the config plane (`plane`) on a thread of
//! its own; the loop only swaps the new table in and applies its port change. What the
//! signals do to the process as a whole (stop, upgrade) is decided in `lifecycle`; the loop
//! carries it out.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use crate::backends::clients::ClientCounts;
use crate::backends::routing::{Routes, Unrouted};
use crate::cli::Settings;
use crate::frontend::lifecycle::{Lifecycle, Next};
use crate::frontend::plane::{Change, LoopEnd, Verdict};
use crate::frontend::ports::{Accepted, PortSource};
use crate::frontend::signals::{self, SignalPipes};
use crate::frontend::tokens::{
    PLANE, REOPEN_PIPE, SIGHUP_PIPE, STOP_PIPE, UPGRADE_PIPE, UPGRADE_READY, WAKE,
};
use crate::metrics::Published;
use crate::relay::conns::{Conns, Ports};
use crate::relay::per_client::{self, ClientSlots};
use crate::relay::pool::Pool;
use crate::relay::session::{Incoming, Task};
use crate::relay::slots::Slots;

/// Connections accepted from one listener before the loop looks at the others, so one busy
/// port cannot starve the rest (or the signals).
const ACCEPT_BATCH: usize = 64;

pub(super) struct Loop {
    settings: Settings,
    source: Box<dyn PortSource>,
    /// The routing table in force (the config plane builds the next one).
    routes: Arc<Routes>,
    plane: LoopEnd,
    pool: Pool<Task>,
    slots: Arc<Slots>,
    /// Open connections per client address, with --max-connections-per-client; None without
    /// a limit.
    clients: Option<Arc<ClientCounts>>,
    conns: Arc<Conns>,
    /// What the metrics endpoint reads of the loop's state.
    published: Arc<Published>,
    lifecycle: Lifecycle,
    signals: SignalPipes,
    /// Listeners that may have connections waiting: readiness is edge-triggered, so a listener
    /// we stopped draining early (batch, bound, back-off) stays here until it says WouldBlock.
    ready: HashSet<Token>,
    /// Accepting is paused after an error such as EMFILE, until then.
    backoff_until: Option<Instant>,
    backoff: Duration,
    /// When the next connection being drained (a removed port, a stop) is due to be cut.
    next_drain: Option<Instant>,
}

/// Where the loop hands accepted connections, and what it counts and drains them with.
pub(super) struct Relay {
    pub(super) pool: Pool<Task>,
    /// The connection bound.
    pub(super) slots: Arc<Slots>,
    /// With --max-connections-per-client; None without a limit.
    pub(super) clients: Option<Arc<ClientCounts>>,
    pub(super) conns: Arc<Conns>,
}

impl Loop {
    /// A loop over `source`'s listeners, routing by `routes` until the config plane
    /// (`plane`, its pipe registered) sends another, with nothing yet ready to accept and
    /// nothing draining.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        settings: Settings,
        source: Box<dyn PortSource>,
        routes: Arc<Routes>,
        plane: LoopEnd,
        published: Arc<Published>,
        relay: Relay,
        lifecycle: Lifecycle,
        signals: SignalPipes,
    ) -> Loop {
        Loop {
            settings,
            source,
            routes,
            plane,
            pool: relay.pool,
            slots: relay.slots,
            clients: relay.clients,
            conns: relay.conns,
            published,
            lifecycle,
            signals,
            ready: HashSet::new(),
            backoff_until: None,
            backoff: Duration::ZERO,
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
                self.backoff_until,
                self.lifecycle.upgrade_deadline(),
            ]
            .into_iter()
            .flatten()
            {
                wake_at = wake_at.min(t);
            }
            let timeout = if !self.ready.is_empty() && self.can_accept(now) {
                Duration::ZERO
            } else {
                wake_at.saturating_duration_since(now)
            };
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
                self.accept_ready(now);
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
                self.carry_out(poll, next);
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
                self.carry_out(poll, next);
            }
            WAKE => {}
            PLANE => {
                signals::arrived(&mut self.plane.pipe);
                while let Ok(change) = self.plane.changes.try_recv() {
                    let verdict = self.apply(poll, change);
                    // The plane waits for it; gone only if the plane is (the process exits).
                    let _ = self.plane.verdicts.send(verdict);
                }
            }
            listener => {
                self.ready.insert(listener);
            }
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
    fn carry_out(&mut self, poll: &Poll, next: Next) {
        match next {
            Next::Carry => {}
            Next::Drain(until) => {
                self.slots.wake_on_every_release();
                self.source.stop(poll.registry());
                self.ready.clear();
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

    fn can_accept(&self, now: Instant) -> bool {
        self.backoff_until.is_none_or(|t| now >= t) && !self.slots.is_full()
    }

    /// Accept from every listener that may have connections waiting, within the bound.
    fn accept_ready(&mut self, now: Instant) {
        if self.ready.is_empty() {
            return;
        }
        if self.backoff_until.is_some_and(|t| now < t) {
            return;
        }
        self.backoff_until = None;
        let tokens: Vec<Token> = self.ready.iter().copied().collect();
        for token in tokens {
            let mut accepted = 0;
            loop {
                if self.slots.is_full() {
                    if !self.published.accept_paused.swap(true, Ordering::Relaxed) {
                        crate::warn!(
                            "connection limit reached ({}): new connections wait in the kernel backlog",
                            self.slots.max()
                        );
                    }
                    return;
                }
                if self.published.accept_paused.swap(false, Ordering::Relaxed) {
                    crate::info!("below the connection limit again: accepting");
                }
                if accepted == ACCEPT_BATCH {
                    break;
                }
                match self.source.accept(token) {
                    Ok(Some(conn)) => {
                        accepted += 1;
                        self.backoff = Duration::ZERO;
                        self.dispatch(conn);
                    }
                    Ok(None) => {
                        self.ready.remove(&token);
                        break;
                    }
                    Err(e) => {
                        if self.accept_error(e, now) {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Decide what an accept error means; true if accepting should pause for a while.
    fn accept_error(&mut self, e: io::Error, now: Instant) -> bool {
        match e.raw_os_error() {
            // The client gave up before we got to it, or a signal: nothing wrong with us.
            Some(libc::ECONNABORTED) | Some(libc::EINTR) | Some(libc::EPROTO) => false,
            // Out of descriptors or memory: the connection stays queued in the kernel. Back off
            // (doubling up to a second) instead of spinning on the same error.
            _ => {
                self.backoff =
                    (self.backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                self.backoff_until = Some(now + self.backoff);
                crate::error!("accept failed: {e}; pausing accepts for {:?}", self.backoff);
                true
            }
        }
    }

    fn dispatch(&mut self, conn: Accepted) {
        let port = conn.local.port();
        let Some(table) = self.routes.port(port) else {
            // bpf mode, a port removed from the config while the kernel still queued a
            // connection for it. Closing it is what a removed listener would have done.
            crate::debug!(
                "conn client={} port={port}: port no longer configured, closed",
                conn.peer,
            );
            return;
        };
        let Some(binding) = table.lookup(conn.local.ip()) else {
            // A wildcard listener of the port took a connection to an address no app on it
            // answers (simple mode), or the config changed while it was queued: reset at once,
            // as a refused connection would be.
            self.published.unrouted.count(port, Unrouted::NoApp);
            crate::debug!(
                "conn client={} local={}: no app on this address, reset",
                conn.peer,
                conn.local
            );
            crate::sys::net::reset(conn.stream);
            return;
        };
        let binding = Arc::clone(binding);
        // Per-client limits first, before the connection takes a slot or a thread: a client at
        // its limit is closed at once and costs nothing more. Where the app is picked by the
        // server name, only the global limit and the largest of the apps' (if every app has
        // one) are known yet; the session checks the app's.
        let app = (!binding.needs_server_name())
            .then(|| binding.default_app())
            .flatten();
        let apps = binding.per_client.as_ref();
        let client_slots =
            match ClientSlots::take(self.clients.as_ref(), apps, app.map(|a| &**a), conn.peer) {
                Ok(slots) => slots,
                Err(reached) => {
                    per_client::refuse_client_limit(
                        app.map(|a| &**a),
                        conn.stream,
                        conn.peer,
                        port,
                        reached,
                    );
                    return;
                }
            };
        self.slots.take();
        let job = Incoming {
            client: conn.stream,
            peer: conn.peer,
            local: conn.local,
            binding,
            accepted: Instant::now(),
            client_slots,
        };
        if let Err((task, e)) = self.pool.submit(Task::New(job)) {
            if let Task::New(job) = task {
                crate::error!(
                    "conn local={} client={}: no relay thread: {e}; closed",
                    job.local,
                    job.peer
                );
            }
            // No thread took the job, so the pool will not give its slot back.
            self.slots.cancel();
        }
    }

    /// Swap in the config plane's new table and apply its port change; the table no longer
    /// in force goes back to the plane, to be dropped there. A port change that fails leaves
    /// everything as it was.
    fn apply(&mut self, poll: &Poll, change: Change) -> Verdict {
        if self.lifecycle.is_draining() {
            // The listeners are closed: nothing would accept on a port the change adds.
            return Verdict {
                refused: Some("the proxy is stopping".into()),
                dropped: change.routes,
            };
        }
        if let Err(e) = self.source.apply(poll.registry(), &change.ports) {
            return Verdict {
                refused: Some(e.to_string()),
                dropped: change.routes,
            };
        }
        let old = std::mem::replace(&mut self.routes, change.routes);
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
