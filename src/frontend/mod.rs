//! The listener loop: one mio `Poll` that accepts connections from the mode's listeners, hands
//! them to the relay pool, and handles signals, config reload ticks, drain deadlines and the
//! connection bound. It is the only thread that touches the routing table and the listeners,
//! so neither needs a lock.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Read};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub mod ports;
pub mod simple;

use mio::net::UnixStream;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::backends::health::Checker;
use crate::backends::routing::Routes;
use crate::cli::Settings;
use crate::config::{Config, ConfigError, Diff};
use crate::ops::metrics;
use crate::ops::upgrade::{self, Exec, ReadyPipe, Upgrade};
use crate::relay::conns::{Conns, Ports};
use crate::relay::pool::Pool;
use crate::relay::session::{self, Job, Shared};
use ports::{PortError, PortSource};

/// Readable when SIGHUP arrived (signal-hook writes a byte into the pipe from the handler).
const SIGHUP_PIPE: Token = Token(0);
/// Readable when SIGTERM or SIGINT arrived.
const STOP_PIPE: Token = Token(1);
/// Woken by a relay thread that gave back a slot the loop is waiting for.
const WAKE: Token = Token(2);
/// Readable when SIGUSR2 (upgrade) arrived.
const UPGRADE_PIPE: Token = Token(3);
/// The new process of an upgrade writes here once it serves (or closes it by dying).
const UPGRADE_READY: Token = Token(4);

/// How long a new process may take to start serving before an upgrade is abandoned.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections accepted from one listener before the loop looks at the others, so one busy
/// port cannot starve the rest (or the signals).
const ACCEPT_BATCH: usize = 64;

/// Descriptors kept aside for listeners, the config file, the poll and pipes.
const FD_RESERVE: u64 = 64;

/// Why the proxy could not start. `main` prints it and exits 1.
#[derive(Debug)]
pub enum StartError {
    Config(ConfigError),
    Port(PortError),
    /// Setting up the poll, signals or another OS resource failed.
    Os(&'static str, io::Error),
    /// The mode's own set-up failed (bpf: loading or attaching the program).
    Mode(String),
    /// The --pid-file cannot be written safely.
    PidFile(crate::ops::pidfile::PidFileError),
    /// Switching to --user/--group failed.
    User(crate::ops::user::UserError),
    /// The --metrics address could not be bound.
    Metrics(std::net::SocketAddr, io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "{e}"),
            StartError::Port(e) => write!(f, "cannot listen on {e}"),
            StartError::Os(what, e) => write!(f, "{what}: {e}"),
            StartError::Mode(m) => write!(f, "{m}"),
            StartError::PidFile(e) => write!(f, "--pid-file: {e}"),
            StartError::User(e) => write!(f, "--user: {e}"),
            StartError::Metrics(a, e) => write!(f, "--metrics {a}: cannot listen: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Run the proxy until it is told to stop. `make_source` builds the mode's port source once the
/// config is known to be valid, so nothing is set up for a config that will be refused.
/// `handed` is what a previous process handed over if this one was started by an upgrade.
pub fn run(
    settings: Settings,
    mode_name: &'static str,
    handed: Handed,
    make_source: impl FnOnce() -> Result<Box<dyn PortSource>, StartError>,
) -> Result<(), StartError> {
    // Signals first, before anything that can take time (reading and validating a large
    // config, loading the bpf program, binding thousands of ports): a SIGHUP now is a reload
    // once serving, a SIGTERM now a clean exit at the next step, and neither kills us.
    let mut poll = Poll::new().map_err(|e| StartError::Os("cannot create the event loop", e))?;
    let waker = Waker::new(poll.registry(), WAKE)
        .map_err(|e| StartError::Os("cannot create the event loop waker", e))?;
    let mut hup = signal_pipe(&poll, SIGHUP_PIPE, &[signal_hook::consts::SIGHUP])?;
    let mut stop = signal_pipe(
        &poll,
        STOP_PIPE,
        &[signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT],
    )?;
    let usr2 = signal_pipe(&poll, UPGRADE_PIPE, &[signal_hook::consts::SIGUSR2])?;
    let run_as = match &settings.user {
        Some(u) => {
            Some(crate::ops::user::lookup(u, settings.group.as_deref()).map_err(StartError::User)?)
        }
        None => None,
    };

    // Stat before loading: a change written while we start shows as a change at the first
    // tick instead of being taken for what we loaded.
    let loaded_sig = Watch::stat(&settings.config);
    let loaded = crate::config::read_file(&settings.config).map_err(|p| {
        StartError::Config(ConfigError {
            path: settings.config.clone(),
            problems: vec![p],
        })
    })?;
    let config = Config::parse(&settings.config, &loaded).map_err(StartError::Config)?;
    check_loops(&settings.config, &config).map_err(StartError::Config)?;
    if let Some(path) = &settings.pid_file {
        crate::ops::pidfile::check_dir(path).map_err(StartError::PidFile)?;
    }
    if stop_requested(&mut stop) {
        return stopped_starting();
    }
    let mut source = make_source()?;
    if stop_requested(&mut stop) {
        return stopped_starting();
    }

    let ports: Vec<u16> = config.ports().collect();
    source
        .apply(poll.registry(), &config, &ports, &[])
        .map_err(StartError::Port)?;
    if stop_requested(&mut stop) {
        return stopped_starting();
    }
    // Switch user first (it needs CAP_SETUID and CAP_SETGID), then keep only what the running
    // proxy needs, then pass that on to an upgrade's exec as the new user (the ambient set).
    let switched = match &run_as {
        Some(ids) => crate::ops::user::switch(ids).map_err(StartError::User)?,
        None => false,
    };
    let keep = drop_capabilities(mode_name, &settings)?;
    if let Some(ids) = &run_as {
        if switched {
            crate::ops::caps::regain(&keep)
                .map_err(|e| StartError::User(crate::ops::user::UserError::Caps(e)))?;
        }
        crate::info!("running as {ids}");
    }
    let max_connections = fit_fd_limit(settings.max_connections, source.listeners() as u64);

    let routes = Arc::new(Routes::new(&config, None));
    let shared = Arc::new(Shared {
        settings: settings.clone(),
        max_connections,
        conns: Conns::default(),
        active: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
        waker,
        routes: Mutex::new(Arc::clone(&routes)),
        reloads_ok: AtomicU64::new(0),
        reloads_rejected: AtomicU64::new(0),
        last_reload_ok_ms: AtomicU64::new(unix_ms()),
        accept_paused: AtomicBool::new(false),
        handed_over: AtomicBool::new(false),
    });
    let mut metrics_socket = None;
    if let Some(addr) = settings.metrics {
        let inherited = handed
            .metrics
            .filter(|l| l.local_addr().is_ok_and(|a| a == addr));
        let socket = metrics::start(addr, inherited, Arc::clone(&shared), source.lookup_stats())
            .map_err(|e| StartError::Metrics(addr, e))?;
        metrics_socket = Some(socket);
    }
    let pool = {
        let (s1, s2) = (Arc::clone(&shared), Arc::clone(&shared));
        Pool::new(
            max_connections,
            move |job| session::serve(job, &s1),
            move || s2.release_slot(),
        )
    };

    let checker =
        Checker::start().map_err(|e| StartError::Os("cannot start the health checker", e))?;
    checker.set(routes.backends());
    crate::info!(
        "started mode={mode_name} config={} {} max_connections={max_connections} pid={}",
        settings.config.display(),
        config.summary(),
        std::process::id()
    );
    if let Some(path) = &settings.pid_file {
        if let Err(e) = crate::ops::pidfile::write(path, std::process::id()) {
            crate::error!("--pid-file {}: {e}", path.display());
        }
    }
    // Type=notify: the service is up once the listeners are. After an upgrade systemd takes
    // this from the old process instead (see upgrade_progress).
    if let Err(e) =
        crate::ops::systemd::notify(&format!("READY=1\nSTATUS=serving {}", config.summary()))
    {
        crate::warn!("cannot notify systemd of readiness: {e}");
    }
    if let Some(ready) = handed.ready {
        crate::info!(
            "upgrade: serving with {} listeners taken over from the previous process",
            handed.adopted
        );
        ready.signal();
    }

    let mut lp = Loop {
        settings,
        shared,
        pool,
        source,
        routes,
        checker,
        config,
        watch: Watch::new(),
        ready: HashSet::new(),
        paused: false,
        backoff_until: None,
        backoff: Duration::ZERO,
        next_drain: None,
        stop_deadline: None,
        usr2,
        exec: handed.exec,
        upgrade: None,
        handed_over: false,
        told_to_stop: false,
        metrics_socket,
    };
    lp.watch.seen(loaded_sig, loaded);
    // A SIGHUP that came while we were starting: the file may have changed since we read it.
    if stop_requested(&mut hup) {
        crate::info!(
            "SIGHUP during start-up: reloading {}",
            lp.settings.config.display()
        );
        lp.reload(&poll, true);
    }
    let result = lp.run(&mut poll, &mut hup, &mut stop);
    lp.remove_pid_file();
    result
}

/// What `run` gets from `main` about upgrades.
pub struct Handed {
    /// How to start our successor; None if it could not be determined (upgrades refused).
    pub exec: Option<Exec>,
    /// Set if a previous process started us: tell it when we serve.
    pub ready: Option<ReadyPipe>,
    /// Listeners taken over from it.
    pub adopted: usize,
    /// Its --metrics listening socket, if it had one.
    pub metrics: Option<std::net::TcpListener>,
}

/// An upgrade in progress: the new process, its readiness pipe, and when we give up on it.
struct InProgress {
    up: Upgrade,
    deadline: Instant,
}

struct Loop {
    settings: Settings,
    shared: Arc<Shared>,
    pool: Pool<Job>,
    source: Box<dyn PortSource>,
    routes: Arc<Routes>,
    checker: Arc<Checker>,
    config: Config,
    watch: Watch,
    /// Listeners that may have connections waiting: readiness is edge-triggered, so a listener
    /// we stopped draining early (batch, bound, back-off) stays here until it says WouldBlock.
    ready: HashSet<Token>,
    /// Accepting is paused at the connection bound.
    paused: bool,
    /// Accepting is paused after an error such as EMFILE, until then.
    backoff_until: Option<Instant>,
    backoff: Duration,
    next_drain: Option<Instant>,
    /// Set on the first stop signal: exit once every connection is done, or at this instant.
    stop_deadline: Option<Instant>,
    usr2: UnixStream,
    exec: Option<Exec>,
    upgrade: Option<InProgress>,
    /// A new process took over: leave the pid file to it.
    handed_over: bool,
    /// A stop signal has been received (so the next one exits at once).
    told_to_stop: bool,
    /// The --metrics listening socket's address and fd, handed over on upgrade.
    metrics_socket: Option<(std::net::SocketAddr, std::os::fd::RawFd)>,
}

impl Loop {
    fn run(
        &mut self,
        poll: &mut Poll,
        hup: &mut UnixStream,
        stop: &mut UnixStream,
    ) -> Result<(), StartError> {
        let mut events = Events::with_capacity(1024);
        let mut next_tick = Instant::now() + self.settings.reload_interval;
        loop {
            let now = Instant::now();
            let mut wake_at = next_tick;
            let upgrade_deadline = self.upgrade.as_ref().map(|u| u.deadline);
            for t in [
                self.next_drain,
                self.stop_deadline,
                self.backoff_until,
                upgrade_deadline,
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
                    return Err(StartError::Os("event loop failed", e));
                }
            }
            for event in events.iter() {
                match event.token() {
                    SIGHUP_PIPE => {
                        drain_pipe(hup);
                        if self.stop_deadline.is_some() {
                            // Draining: nothing would accept on a port a reload added.
                            crate::info!("SIGHUP ignored: stopping");
                        } else {
                            crate::info!("SIGHUP: reloading {}", self.settings.config.display());
                            self.reload(poll, true);
                        }
                    }
                    STOP_PIPE => {
                        drain_pipe(stop);
                        if self.stop_deadline.is_some() && self.handed_over && !self.told_to_stop {
                            // Draining after an upgrade was our own doing: the first stop
                            // signal (systemd stopping the whole group, say) only confirms it.
                            self.told_to_stop = true;
                            crate::info!("stop signal: already draining after an upgrade");
                            continue;
                        }
                        if self.stop_deadline.is_some() {
                            let open = self.shared.conns.len();
                            crate::warn!("second stop signal: exiting now, {open} connections cut");
                            crate::ops::log::flush();
                            std::process::exit(1);
                        }
                        // A new process not yet serving is abandoned: stopping means no
                        // process of ours serves any more.
                        self.told_to_stop = true;
                        self.abandon_upgrade(
                            poll,
                            "was abandoned: this process was told to stop",
                            true,
                        );
                        self.begin_stop(poll);
                    }
                    UPGRADE_PIPE => {
                        drain_pipe(&mut self.usr2);
                        self.start_upgrade(poll);
                    }
                    UPGRADE_READY => self.upgrade_progress(poll),
                    WAKE => {}
                    listener => {
                        self.ready.insert(listener);
                    }
                }
            }

            let now = Instant::now();
            if self.stop_deadline.is_none() {
                self.accept_ready(now);
            }
            if now >= next_tick {
                next_tick = now + self.settings.reload_interval;
                if self.stop_deadline.is_none() {
                    self.source.tick();
                    if self.watch.changed(&self.settings.config) {
                        self.reload(poll, false);
                    }
                }
            }
            if self.upgrade.as_ref().is_some_and(|u| now >= u.deadline) {
                self.abandon_upgrade(poll, "was not serving within the upgrade timeout", true);
            }
            if self.next_drain.is_some_and(|d| now >= d) {
                let (cut, next) = self.shared.conns.cut_expired(now);
                if cut > 0 {
                    crate::info!("drain timeout: closed {cut} connections");
                }
                self.next_drain = next;
            }
            if let Some(deadline) = self.stop_deadline {
                let active = self.shared.active.load(Ordering::Acquire);
                if active == 0 {
                    crate::info!("stopped: every connection finished");
                    return Ok(());
                }
                // Connections cut at the drain deadline end within moments; give their threads
                // a second to log, then go regardless.
                if now >= deadline + Duration::from_secs(1) {
                    crate::warn!(
                        "stopped: drain timeout passed with {active} connections still open"
                    );
                    return Ok(());
                }
            }
        }
    }

    fn can_accept(&self, now: Instant) -> bool {
        self.backoff_until.is_none_or(|t| now >= t)
            && self.shared.active.load(Ordering::Acquire) < self.shared.max_connections
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
                if self.shared.active.load(Ordering::Acquire) >= self.shared.max_connections {
                    if !self.paused {
                        self.paused = true;
                        self.shared.accept_paused.store(true, Ordering::Relaxed);
                        crate::warn!(
                            "connection limit reached ({}): new connections wait in the kernel backlog",
                            self.shared.max_connections
                        );
                    }
                    return;
                }
                if self.paused {
                    self.paused = false;
                    self.shared.accept_paused.store(false, Ordering::Relaxed);
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

    fn dispatch(&mut self, conn: ports::Accepted) {
        let Some(app) = self.routes.app_for(conn.port) else {
            // bpf mode, a port removed from the config while the kernel still queued a
            // connection for it. Closing it is what a removed listener would have done.
            crate::debug!(
                "conn client={} port={}: port no longer configured, closed",
                conn.peer,
                conn.port
            );
            return;
        };
        self.shared.active.fetch_add(1, Ordering::AcqRel);
        let job = Job {
            client: conn.stream,
            peer: conn.peer,
            port: conn.port,
            app: Arc::clone(app),
            accepted: Instant::now(),
        };
        if let Err((job, e)) = self.pool.submit(job) {
            crate::error!(
                "conn app={} client={}: no relay thread: {e}; closed",
                job.app.name,
                job.peer
            );
            self.shared.active.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Re-read the config and apply it as a diff. Any error leaves the running config as it is.
    fn reload(&mut self, poll: &Poll, forced: bool) {
        let began = Instant::now();
        let path = self.settings.config.clone();
        // Stat before reading: a write that lands after the read then still shows as a change
        // at the next tick.
        let sig = Watch::stat(&path);
        let bytes = match crate::config::read_file(&path) {
            Ok(b) => b,
            Err(problem) => {
                // Logged once per distinct error (and on every SIGHUP, which asks): a path left
                // pointing at a directory must not write a line per tick forever.
                let message = problem.to_string();
                if self.watch.unreadable(sig, &message) || forced {
                    crate::error!(
                        "reload rejected: {}: {message}; keeping the running config",
                        path.display()
                    );
                    self.shared.reloads_rejected.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        };
        let parsed = Config::parse(&path, &bytes).and_then(|c| check_loops(&path, &c).map(|()| c));
        self.watch.seen(sig, bytes);
        let new = match parsed {
            Ok(c) => c,
            Err(e) => {
                for line in e.to_string().lines() {
                    crate::error!("reload rejected: {line}");
                }
                crate::error!("reload rejected: keeping the running config");
                self.shared.reloads_rejected.fetch_add(1, Ordering::Relaxed);
                self.watch.rejected();
                return;
            }
        };
        let diff = Diff::between(&self.config, &new);
        if diff.is_empty() {
            if forced {
                crate::info!("reload: config unchanged");
            }
            return;
        }
        if let Err(e) = self.source.apply(
            poll.registry(),
            &new,
            &diff.ports_added,
            &diff.ports_removed,
        ) {
            crate::error!("reload rejected: cannot listen on {e}; keeping the running config");
            self.shared.reloads_rejected.fetch_add(1, Ordering::Relaxed);
            self.watch.rejected();
            return;
        }
        self.routes = Arc::new(Routes::new(&new, Some(&self.routes)));
        self.checker.set(self.routes.backends());
        *self.shared.routes.lock().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&self.routes);
        self.shared.reloads_ok.fetch_add(1, Ordering::Relaxed);
        self.shared
            .last_reload_ok_ms
            .store(unix_ms(), Ordering::Relaxed);
        self.config = new;
        if !diff.ports_removed.is_empty() {
            let removed: HashSet<u16> = diff.ports_removed.iter().copied().collect();
            let at = Instant::now() + self.settings.drain_timeout;
            let n = self.shared.conns.drain(Ports::Some(removed), at);
            // Set even when none is open now: one accepted just before may register late.
            self.next_drain = Some(self.next_drain.map_or(at, |d| d.min(at)));
            if n > 0 {
                crate::info!(
                    "reload: {n} connections on removed ports draining for up to {:?}",
                    self.settings.drain_timeout
                );
            }
        }
        crate::info!(
            "reload ok: {diff} took={:.3}ms",
            began.elapsed().as_secs_f64() * 1000.0
        );
    }

    /// SIGUSR2: start the binary anew with our listeners; see `upgrade`.
    fn start_upgrade(&mut self, poll: &Poll) {
        if self.stop_deadline.is_some() {
            crate::warn!("SIGUSR2 ignored: already stopping");
            return;
        }
        if self.upgrade.is_some() {
            crate::warn!("SIGUSR2 ignored: an upgrade is already in progress");
            return;
        }
        let Some(exec) = &self.exec else {
            crate::error!(
                "upgrade refused: the path of this binary could not be determined at start"
            );
            return;
        };
        let listeners = self.source.handover();
        match upgrade::spawn(exec, &listeners, self.metrics_socket) {
            Ok(mut up) => {
                crate::info!(
                    "upgrade: started {} as pid {} with {} listeners; waiting for it to serve",
                    exec.exe.display(),
                    up.child.id(),
                    listeners.len()
                );
                if let Err(e) =
                    poll.registry()
                        .register(&mut up.ready, UPGRADE_READY, Interest::READABLE)
                {
                    crate::error!("upgrade: cannot watch the new process: {e}");
                }
                self.upgrade = Some(InProgress {
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
    fn upgrade_progress(&mut self, poll: &Poll) {
        let Some(progress) = self.upgrade.as_mut() else {
            return;
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
            None => {}
            Some(false) => self.abandon_upgrade(poll, "exited before it was serving", false),
            Some(true) => {
                let Some(mut done) = self.upgrade.take() else {
                    return;
                };
                let _ = poll.registry().deregister(&mut done.up.ready);
                let pid = done.up.child.id();
                crate::info!(
                    "upgrade: pid {pid} is serving; this process stops accepting and drains"
                );
                // Tell systemd the service now lives on in the new process. Only the main pid
                // may say so (NotifyAccess=main), so it has to come from us.
                let _ = crate::ops::systemd::notify(&format!("MAINPID={pid}\nREADY=1"));
                self.handed_over = true;
                // The new process serves /metrics on the same socket from now on.
                self.shared.handed_over.store(true, Ordering::Release);
                self.begin_stop(poll);
            }
        }
    }

    /// Give up on an upgrade: the old process (this one) carries on as before. `kill` ends
    /// the new process at once; otherwise it is exiting already and gets a moment to finish
    /// writing its own error.
    fn abandon_upgrade(&mut self, poll: &Poll, why: &str, kill: bool) {
        let Some(mut failed) = self.upgrade.take() else {
            return;
        };
        let _ = poll.registry().deregister(&mut failed.up.ready);
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

    fn remove_pid_file(&self) {
        let Some(path) = &self.settings.pid_file else {
            return;
        };
        if self.handed_over {
            return;
        }
        // Only our own: after an upgrade the file names the new process.
        crate::ops::pidfile::remove_if_ours(path, std::process::id());
    }

    fn begin_stop(&mut self, poll: &Poll) {
        self.shared.stopping.store(true, Ordering::Release);
        self.source.stop(poll.registry());
        self.ready.clear();
        let at = Instant::now() + self.settings.drain_timeout;
        self.stop_deadline = Some(at);
        let n = self.shared.conns.drain(Ports::All, at);
        self.next_drain = Some(self.next_drain.map_or(at, |d| d.min(at)));
        crate::info!(
            "stopping: listeners closed, {n} connections draining for up to {:?}",
            self.settings.drain_timeout
        );
    }
}

/// Notices that the config file changed: by its metadata each tick, and by its contents after
/// a rejected version (so a file fixed within the same mtime tick is still picked up).
struct Watch {
    sig: Option<FileSig>,
    /// The contents last read (applied or not).
    last: Vec<u8>,
    /// The last contents read were refused.
    rejected: bool,
    /// The last error reading the file, while it stays unreadable.
    unreadable: Option<String>,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct FileSig {
    mtime: Option<SystemTime>,
    len: u64,
    ino: u64,
}

/// A file modified this recently may have changed again within the same timestamp tick
/// (coarse on some kernels and filesystems) without its size changing: compare contents.
const RECENT: Duration = Duration::from_secs(2);

impl Watch {
    fn new() -> Watch {
        Watch {
            sig: None,
            last: Vec::new(),
            rejected: false,
            unreadable: None,
        }
    }

    fn stat(path: &Path) -> Option<FileSig> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileSig {
            mtime: m.modified().ok(),
            len: m.len(),
            ino: m.ino(),
        })
    }

    /// Remember the file as it was read (at a load or a reload attempt).
    fn seen(&mut self, sig: Option<FileSig>, bytes: Vec<u8>) {
        self.sig = sig;
        self.last = bytes;
        self.rejected = false;
        self.unreadable = None;
    }

    /// The file could not be read; true if this error is new (to be logged). The contents
    /// last read stay, so a file put back as it was is no change.
    fn unreadable(&mut self, sig: Option<FileSig>, error: &str) -> bool {
        self.sig = sig;
        let new = self.unreadable.as_deref() != Some(error);
        self.unreadable = Some(error.to_owned());
        new
    }

    fn rejected(&mut self) {
        self.rejected = true;
    }

    fn changed(&self, path: &Path) -> bool {
        let Some(sig) = Watch::stat(path) else {
            // Missing for a moment (being replaced) or gone: keep serving what we have.
            return false;
        };
        if Some(sig) != self.sig {
            return true;
        }
        // Same metadata. Compare contents after a refused version (fixed within the same
        // tick) and while the file is fresh (rewritten within the same tick, same size).
        let recent = sig
            .mtime
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_none_or(|age| age < RECENT);
        (self.rejected || recent)
            && crate::config::read_file(path).is_ok_and(|now| now != self.last)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A self-pipe for `signals`: the handler writes a byte, the loop sees the read end readable.
fn signal_pipe(poll: &Poll, token: Token, signals: &[i32]) -> Result<UnixStream, StartError> {
    let err = |e| StartError::Os("cannot set up signal handling", e);
    let (read, write) = StdUnixStream::pair().map_err(err)?;
    read.set_nonblocking(true).map_err(err)?;
    write.set_nonblocking(true).map_err(err)?;
    for &sig in signals {
        let w = write.try_clone().map_err(err)?;
        signal_hook::low_level::pipe::register(sig, w).map_err(err)?;
    }
    let mut read = UnixStream::from_std(read);
    poll.registry()
        .register(&mut read, token, Interest::READABLE)
        .map_err(err)?;
    Ok(read)
}

/// Drain a signal pipe without waiting; true if a signal had arrived.
fn stop_requested(pipe: &mut UnixStream) -> bool {
    let mut buf = [0u8; 64];
    let mut got = false;
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return got,
            Ok(_) => got = true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return got,
        }
    }
}

/// A stop signal arrived before we served: what was set up is dropped on return (listeners
/// closed, the bpf program detached), nothing was announced, and the exit is clean.
fn stopped_starting() -> Result<(), StartError> {
    crate::info!("stop signal during start-up: exiting before serving");
    Ok(())
}

/// The config's targets that are this proxy's own frontends, as a config error.
fn check_loops(path: &Path, config: &Config) -> Result<(), ConfigError> {
    let problems = crate::backends::loops::problems(config);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError {
            path: path.to_owned(),
            problems,
        })
    }
}

fn drain_pipe(pipe: &mut UnixStream) {
    let mut buf = [0u8; 64];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// Set up, keep only the capabilities still needed, before any relay thread exists (they
/// inherit the main thread's): bpf mode keeps CAP_BPF (map writes on reload need it where
/// kernel.unprivileged_bpf_disabled is set) and CAP_NET_ADMIN (an upgrade's new process loads
/// and attaches its own program); simple mode keeps CAP_NET_BIND_SERVICE (a reload may add a
/// port below 1024). A process without capabilities (not root) is left as it is.
fn drop_capabilities(
    mode_name: &str,
    settings: &Settings,
) -> Result<Vec<crate::ops::caps::Cap>, StartError> {
    use crate::ops::caps::Cap;
    let mut keep = if mode_name == "bpf" {
        vec![Cap::Bpf, Cap::NetAdmin]
    } else {
        vec![Cap::NetBindService]
    };
    // An upgrade binds nothing new for --metrics (the socket is handed over), but a fresh
    // bind of a low metrics port in the new process would need it if the hand-over failed.
    if settings.metrics.is_some_and(|a| a.port() < 1024) && !keep.contains(&Cap::NetBindService) {
        keep.push(Cap::NetBindService);
    }
    crate::ops::caps::keep_only(&keep)
        .map_err(|e| StartError::Mode(format!("cannot drop capabilities: {e}")))?;
    if let Ok(c) = crate::ops::caps::current() {
        crate::debug!("capabilities kept: {c}");
    }
    Ok(keep)
}

/// Raise the open-file soft limit to the hard limit, and lower the connection bound if two
/// descriptors per connection (client and backend) would not fit, saying so with the numbers.
fn fit_fd_limit(max_connections: usize, listeners: u64) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return max_connections;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let available = lim.rlim_cur.saturating_sub(FD_RESERVE + listeners);
    let fits = (available / 2) as usize;
    // Whatever the connections leave over is what the relay may spend on kernel pipes; past
    // that it copies through a buffer instead of failing a socket with EMFILE.
    let bound = max_connections.min(fits).max(1);
    crate::relay::transfer::set_pipe_budget(available.saturating_sub(bound as u64 * 2) / 2);
    if max_connections > fits {
        crate::warn!(
            "--max-connections {max_connections} needs {} file descriptors but the open-file limit is {} ({} listeners, {FD_RESERVE} reserved): lowering the bound to {fits}",
            max_connections as u64 * 2 + FD_RESERVE + listeners,
            lim.rlim_cur,
            listeners
        );
        fits.max(1)
    } else {
        max_connections
    }
}
