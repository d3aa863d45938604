//! Start-up: from the command line's settings to a serving listener loop. Everything that can
//! refuse to start happens here, before the first connection is accepted, and is reported as a
//! `StartError`; what fails later, while serving, is a `RunError::EventLoop`.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use mio::net::TcpListener;
use mio::{Poll, Waker};

use crate::backends::health::Checker;
use crate::backends::resolver::Resolver;
use crate::backends::routing::Routes;
use crate::cli::{Mode, Settings};
use crate::config::{Config, ConfigError};
use crate::frontend::bpf::{SetupError, Steered};
use crate::frontend::control;
use crate::frontend::event_loop::{Loop, Relay};
use crate::frontend::lifecycle::Lifecycle;
use crate::frontend::plane;
use crate::frontend::ports::{PortError, PortSource};
use crate::frontend::reserved::{self, MetricsClash};
use crate::frontend::signals::{self, SignalPipes};
use crate::frontend::simple::PerPort;
use crate::frontend::tokens::{PLANE, WAKE};
use crate::metrics::{self, Endpoint, Published, Sources};
use crate::relay::doors::Doors;
use crate::relay::park::Lot;
use crate::relay::slots::Slots;
use crate::sys::caps::{Cap, CapsError};
use crate::sys::pidfile::{self, PidFileError};
use crate::sys::upgrade::{Exec, ReadyPipe};
use crate::sys::user::{self, UserError};

/// Descriptors kept aside for what is not counted elsewhere: the standard streams, the config
/// file, the poll and its waker, the signal and log pipes, bpf maps, an upgrade's pipe, a
/// resolver's socket. (Listeners, health checks and the metrics endpoint are counted apart.)
const FD_RESERVE: u64 = 32;

/// Why the proxy could not start. `main` prints it and exits 1.
#[derive(Debug)]
pub enum StartError {
    Config(ConfigError),
    Port(PortError),
    /// Setting up the poll, signals or another OS resource failed.
    Os(&'static str, io::Error),
    /// bpf mode's listeners or program could not be set up.
    Bpf(SetupError),
    /// The capabilities no longer needed could not be dropped.
    Caps(CapsError),
    /// The --metrics address could not be bound.
    Metrics(SocketAddr, io::Error),
    /// The --metrics address is also an app's (this app, on this port): one of the two would
    /// take the other's connections.
    MetricsClash {
        addr: SocketAddr,
        app: String,
    },
    /// The --pid-file cannot be written safely.
    PidFile(PidFileError),
    /// Switching to --user/--group failed.
    User(UserError),
    /// The --admin-socket could not be created.
    Admin(crate::admin::SocketError),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "{e}"),
            StartError::Port(e) => write!(f, "{e}"),
            StartError::Os(what, e) => write!(f, "{what}: {e}"),
            StartError::Bpf(e) => write!(f, "{e}"),
            StartError::Caps(e) => write!(f, "cannot drop capabilities: {e}"),
            StartError::Metrics(a, e) => write!(f, "--metrics {a}: cannot listen: {e}"),
            StartError::MetricsClash { addr, app } => MetricsClash {
                addr: *addr,
                app: app.clone(),
            }
            .fmt(f),
            StartError::PidFile(e) => write!(f, "--pid-file: {e}"),
            StartError::User(e) => write!(f, "--user: {e}"),
            StartError::Admin(e) => write!(f, "--admin-socket {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Why `run` ended in failure: the proxy did not start, or its loop failed while serving.
#[derive(Debug)]
pub enum RunError {
    Start(StartError),
    /// Waiting for events failed: the loop cannot go on.
    EventLoop(io::Error),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Start(e) => write!(f, "{e}"),
            RunError::EventLoop(e) => write!(f, "event loop failed: {e}"),
        }
    }
}

impl std::error::Error for RunError {}

impl From<StartError> for RunError {
    fn from(e: StartError) -> RunError {
        RunError::Start(e)
    }
}

/// What `run` gets from `main` about upgrades.
pub struct Handed {
    /// How to start our successor; None if it could not be determined (upgrades refused).
    pub exec: Option<Exec>,
    /// Set if a previous process started us: tell it when we serve.
    pub ready: Option<ReadyPipe>,
    /// Listeners taken over from it, by the address they are bound to.
    pub listeners: HashMap<SocketAddr, TcpListener>,
    /// Its --metrics listening socket, if it had one.
    pub metrics: Option<std::net::TcpListener>,
}

/// Run the proxy in `mode` until it is told to stop. The mode's ports are set up only once the
/// config is known to be valid, so nothing is set up for a config that will be refused.
/// `handed` is what a previous process handed over if this one was started by an upgrade.
pub fn run(settings: Settings, mode: Mode, handed: Handed) -> Result<(), RunError> {
    // Signals first, before anything that can take time (reading and validating a large
    // config, loading the bpf program, binding thousands of ports): a SIGHUP now is a reload
    // once serving, a SIGTERM now a clean exit at the next step, and neither kills us.
    let (mut poll, waker, mut signals) = event_loop_parts()?;
    let lot = Lot::new().map_err(|e| StartError::Os("cannot start the parking lot", e))?;
    let doors = Doors::new(lot.listeners());
    let run_as = match &settings.user {
        Some(u) => Some(user::lookup(u, settings.group.as_deref()).map_err(StartError::User)?),
        None => None,
    };
    let Some(loaded) = load_unless_stopped(&settings.config, &mut signals.stop) else {
        return stopped_starting();
    };
    let plane::Loaded {
        config,
        source: config_source,
        sha256: config_sha256,
        rejected: rejected_files,
    } = loaded.map_err(StartError::Config)?;
    if let Some(MetricsClash { addr, app }) =
        reserved::clash(config.apps.iter().map(|a| &**a), settings.metrics)
    {
        return Err(StartError::MetricsClash { addr, app }.into());
    }
    if let Some(path) = &settings.pid_file {
        pidfile::check_dir(path).map_err(StartError::PidFile)?;
    }
    if signals::arrived(&mut signals.stop) {
        return stopped_starting();
    }
    let adopted = handed.listeners.len();
    let mut source = port_source(&mode, handed.listeners, doors.clone())?;
    if signals::arrived(&mut signals.stop) {
        return stopped_starting();
    }
    let routes = Arc::new(Routes::new(&config, None));
    source.serve_all(&routes).map_err(StartError::Port)?;
    if signals::arrived(&mut signals.stop) {
        return stopped_starting();
    }
    // Before privileges drop: a --pid-file in a directory only root may write (/run) works
    // with --user. The file is then the user's, for an upgrade's process to rewrite. A process
    // an upgrade started writes it only once it is ready to serve (below, before it tells the
    // old one): until then the pid file must go on naming the old process, which serves on if
    // the new one fails.
    let upgraded = handed.ready.is_some();
    let mut unannounced = PidFileUntilServing(None);
    if !upgraded {
        unannounced.0 = write_pid_file(&settings, run_as.as_ref());
    }
    let admin = control::bind(&settings, run_as.as_ref(), upgraded).map_err(StartError::Admin)?;
    drop_privileges(&mode, &settings, run_as.as_ref())?;
    let (max_connections, fds) = fit_fd_limit(
        settings.max_connections,
        source.listeners() as u64,
        (settings.metrics.is_some(), settings.admin_socket.is_some()),
    );
    if let Some(limit) = fds.limit {
        // What the limit leaves beside the connections and everything reserved but the
        // listeners themselves.
        let others = fds.reserved - source.listeners() as u64;
        source.set_listener_room(limit.saturating_sub(others + 2 * max_connections as u64));
    }

    let slots = Arc::new(Slots::new(max_connections, waker));
    let published = Arc::new(Published::new(Arc::clone(&routes), config_sha256.clone()));
    if let plane::Source::Dir(_) = config_source {
        published.directory.store(true, Ordering::Relaxed);
        published.files_rejected(rejected_files.len(), rejected_files);
    }
    let resolver = Resolver::new(settings.dns_ttl);
    let sources = || Sources {
        published: Arc::clone(&published),
        slots: Arc::clone(&slots),
        lookups: source.lookup_stats(),
        resolver: resolver.clone(),
        target_series: metrics::SeriesCap::new(settings.metrics_target_series),
        app_series: metrics::SeriesCap::new(settings.metrics_app_series),
    };
    let metrics_endpoint = start_metrics(&settings, handed.metrics, sources)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = max_threads(&settings, slots.max()).min(cores);
    let (pool, relay) = Relay::build(
        &settings,
        threads,
        fds.pipes,
        lot,
        doors,
        Arc::clone(&routes),
        &published,
        &resolver,
        slots,
    );
    let checker = Checker::start(resolver)
        .map_err(|e| StartError::Os("cannot start the health checker", e))?;
    checker.set(routes.backends());
    announce(
        &mode,
        &settings,
        &config,
        &config_sha256,
        max_connections,
        &fds,
    );
    if upgraded {
        write_pid_file(&settings, run_as.as_ref());
    }
    unannounced.0 = None;
    if let Some(ready) = handed.ready {
        crate::info!(
            "upgrade: serving with {adopted} listeners taken over from the previous process"
        );
        ready.signal();
    }

    let lifecycle = Lifecycle::new(handed.exec, metrics_endpoint, settings.drain_timeout);
    let pid_file = settings.pid_file.clone();
    let steers = source.steers();
    let mut plane_end = plane::start(plane::InForce {
        path: settings.config.clone(),
        source: config_source,
        config,
        routes: Arc::clone(&routes),
        checker,
        published: Arc::clone(&published),
        steers,
        metrics: settings.metrics,
    })
    .map_err(|e| StartError::Os("cannot start the config plane", e))?;
    poll.registry()
        .register(&mut plane_end.pipe, PLANE, mio::Interest::READABLE)
        .map_err(|e| StartError::Os("cannot set up the config plane's wake-ups", e))?;
    let parts = control::Parts {
        published: &published,
        conns: &relay.conns,
        reloads: plane_end.reloads.clone(),
    };
    control::start(admin, &settings, &routes, parts)
        .map_err(|e| StartError::Os("cannot start the admin socket's thread", e))?;
    // The relay threads accept from the doors from now on.
    pool.start()
        .map_err(|e| StartError::Os("cannot start the relay threads", e))?;
    // The first table is the plane's, the loop's and the relay threads' from now on: this
    // handle would keep it (every app's routes and maps) alive beside every newer one for as
    // long as the process runs (a rewrite of every app left both, +40% resident).
    drop(routes);
    let mut lp = Loop::new(settings, source, plane_end, relay, lifecycle, signals);
    lp.reload_if_hup_arrived();
    let result = lp.run(&mut poll);
    if !lp.handed_over() {
        remove_pid_file(pid_file.as_deref());
    }
    result.map_err(RunError::EventLoop)
}

/// The poll, the waker relay threads wake it with, and the signals' self-pipes.
fn event_loop_parts() -> Result<(Poll, Waker, SignalPipes), StartError> {
    let poll = Poll::new().map_err(|e| StartError::Os("cannot create the event loop", e))?;
    let waker = Waker::new(poll.registry(), WAKE)
        .map_err(|e| StartError::Os("cannot create the event loop waker", e))?;
    let signals =
        SignalPipes::new(&poll).map_err(|e| StartError::Os("cannot set up signal handling", e))?;
    Ok((poll, waker, signals))
}

/// Once the ports are set up, give up what the running proxy does not need: switch user first
/// (it needs CAP_SETUID and CAP_SETGID), then keep only the capabilities the mode needs, then
/// pass those on to an upgrade's exec as the new user (the ambient set).
fn drop_privileges(
    mode: &Mode,
    settings: &Settings,
    run_as: Option<&user::Ids>,
) -> Result<(), StartError> {
    let switched = match run_as {
        Some(ids) => user::switch(ids).map_err(StartError::User)?,
        None => false,
    };
    let keep = capabilities_kept(mode, settings);
    crate::sys::caps::keep_only(&keep).map_err(StartError::Caps)?;
    if switched {
        crate::sys::caps::regain(&keep).map_err(|e| StartError::User(UserError::Caps(e)))?;
    }
    if let Some(ids) = run_as {
        crate::info!("running as {ids}");
    }
    if let Ok(c) = crate::sys::caps::current() {
        crate::debug!("capabilities kept: {c}");
    }
    Ok(())
}

/// Serve --metrics, on the socket a previous process handed over if it is the same address.
/// `sources` is asked for only then (reading bpf's counters may fail, and says so).
fn start_metrics(
    settings: &Settings,
    handed: Option<std::net::TcpListener>,
    sources: impl FnOnce() -> Sources,
) -> Result<Option<Endpoint>, StartError> {
    let Some(addr) = settings.metrics else {
        return Ok(None);
    };
    let inherited = handed.filter(|l| l.local_addr().is_ok_and(|a| a == addr));
    metrics::start(addr, inherited, sources())
        .map(Some)
        .map_err(|e| StartError::Metrics(addr, e))
}

/// The relay thread bound: `--max-threads`, or the connection bound, the most connections that
/// could ever be busy at once (so nothing changes for whoever sets neither); never above it.
fn max_threads(settings: &Settings, max_connections: usize) -> usize {
    settings
        .max_threads
        .unwrap_or(max_connections)
        .min(max_connections)
}

/// Write the --pid-file, given to `run_as` if the proxy is about to switch to it. A failure is
/// logged and the proxy goes on (as it always did): the pid file serves `flyproxy upgrade` and
/// systemd's PIDFile=, not the proxying.
/// Its path if it was written.
fn write_pid_file(settings: &Settings, run_as: Option<&user::Ids>) -> Option<PathBuf> {
    let path = settings.pid_file.as_ref()?;
    let written = pidfile::write(path, std::process::id())
        .and_then(|()| run_as.map_or(Ok(()), |ids| pidfile::chown(path, ids.uid, ids.gid)));
    match written {
        Ok(()) => Some(path.clone()),
        Err(e) => {
            crate::error!("--pid-file {}: {e}", path.display());
            None
        }
    }
}

/// A pid file written before serving, removed again if start-up fails before it serves (so
/// that it does not name a process that never served). Cleared once serving.
struct PidFileUntilServing(Option<PathBuf>);

impl Drop for PidFileUntilServing {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            pidfile::remove_if_ours(&path, std::process::id());
        }
    }
}

/// Say that the proxy serves: in the log and to systemd.
fn announce(
    mode: &Mode,
    settings: &Settings,
    config: &Config,
    sha256: &str,
    max_connections: usize,
    fds: &FdBudget,
) {
    crate::info!(
        "started mode={} config={} {} max_connections={max_connections}{} max_threads={} {fds} health_checks_in_flight={} pid={} sha256={sha256}",
        mode.name(),
        settings.config.display(),
        config.summary(),
        match settings.max_connections_per_client {
            0 => String::new(),
            n => format!(" max_connections_per_client={n}"),
        },
        max_threads(settings, max_connections),
        crate::backends::health::MAX_IN_FLIGHT,
        std::process::id()
    );
    // Type=notify: the service is up once the listeners are. After an upgrade systemd takes
    // this from the old process instead (see lifecycle's upgrade_progress).
    if let Err(e) =
        crate::sys::systemd::notify(&format!("READY=1\nSTATUS=serving {}", config.summary()))
    {
        crate::warn!("cannot notify systemd of readiness: {e}");
    }
}

/// On the way out, remove the pid file if it still names this process (after a hand-over it
/// names the new one, which is not touched).
fn remove_pid_file(pid_file: Option<&Path>) {
    let Some(path) = pid_file else {
        return;
    };
    pidfile::remove_if_ours(path, std::process::id());
}

/// The config read, parsed and checked on a thread of its own, while this one watches for a
/// stop signal: None if one came first. A large config takes seconds to load (700,000 targets:
/// 2.6 CPU-s in a debug build, over 15 s on a loaded machine), and a SIGTERM meanwhile should
/// end the process then, not after the load. The loading thread only reads files, so leaving
/// it behind is safe: the process exits with it.
fn load_unless_stopped(
    path: &Path,
    stop: &mut mio::net::UnixStream,
) -> Option<Result<plane::Loaded, ConfigError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let owned = path.to_owned();
    let spawned = std::thread::Builder::new()
        .name("config-load".into())
        .spawn(move || {
            // The receiver is gone only once a stop signal ended the wait: nothing to tell.
            let _ = tx.send(plane::load(&owned));
        });
    if spawned.is_err() {
        // No thread to spare: load here, the stop checked after.
        let loaded = plane::load(path);
        return (!signals::arrived(stop)).then_some(loaded);
    }
    loop {
        match rx.recv_timeout(std::time::Duration::from_millis(20)) {
            Ok(loaded) => return Some(loaded),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if signals::arrived(stop) => {
                return None
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // The loading thread panicked (a bug): load here, where the same panic, if it
            // comes again, ends start-up as it always did, rather than wait forever.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Some(plane::load(path)),
        }
    }
}

/// A stop signal arrived before we served: what was set up is dropped on return (listeners
/// closed, the bpf program detached), nothing was announced, and the exit is clean.
fn stopped_starting() -> Result<(), RunError> {
    crate::info!("stop signal during start-up: exiting before serving");
    Ok(())
}

/// The mode's port source, using the listeners a previous process handed over where they fit.
fn port_source(
    mode: &Mode,
    inherited: HashMap<SocketAddr, TcpListener>,
    doors: Arc<Doors>,
) -> Result<Box<dyn PortSource>, StartError> {
    Ok(match *mode {
        Mode::Simple => Box::new(PerPort::new(doors, inherited)),
        Mode::Bpf { port, bind } => {
            Box::new(Steered::start(port, bind, inherited, doors).map_err(StartError::Bpf)?)
        }
    })
}

/// The capabilities kept once set up, before any relay thread exists (they inherit the main
/// thread's): bpf mode keeps CAP_BPF (map writes on reload need it where
/// kernel.unprivileged_bpf_disabled is set) and CAP_NET_ADMIN (an upgrade's new process loads
/// and attaches its own program); simple mode keeps CAP_NET_BIND_SERVICE (a reload may add a
/// port below 1024). A process without capabilities (not root) is left as it is.
fn capabilities_kept(mode: &Mode, settings: &Settings) -> Vec<Cap> {
    let mut keep = match mode {
        Mode::Bpf { .. } => vec![Cap::Bpf, Cap::NetAdmin],
        Mode::Simple => vec![Cap::NetBindService],
    };
    // An upgrade binds nothing new for --metrics (the socket is handed over), but a fresh
    // bind of a low metrics port in the new process would need it if the hand-over failed.
    if settings.metrics.is_some_and(|a| a.port() < 1024) && !keep.contains(&Cap::NetBindService) {
        keep.push(Cap::NetBindService);
    }
    keep
}

/// The open-file limit and what is set aside from it before connections get their two
/// descriptors each; the start-up line shows it.
struct FdBudget {
    /// The soft limit in force (after raising it), None if it could not be read.
    limit: Option<u64>,
    /// Listeners, health checks, the metrics endpoint and `FD_RESERVE`.
    reserved: u64,
    /// Kernel pipes the relay may hold at once: what the limit leaves beside the connections.
    pipes: usize,
}

impl fmt::Display for FdBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.limit {
            Some(l) => write!(f, "fd_limit={l} fd_reserved={}", self.reserved),
            None => write!(f, "fd_limit=unknown fd_reserved={}", self.reserved),
        }
    }
}

/// Raise the open-file soft limit to the hard limit, and lower the connection bound if two
/// descriptors per connection (client and backend) would not fit beside what is reserved:
/// the listeners, the health checker's connects (`health::FDS`), the metrics endpoint's
/// connections (`metrics::FDS`, with `--metrics`), the admin socket's (`admin::FDS`, with
/// `--admin-socket`; counted with the other) and `FD_RESERVE`. Says so with the numbers.
fn fit_fd_limit(
    max_connections: usize,
    listeners: u64,
    (metrics, admin): (bool, bool),
) -> (usize, FdBudget) {
    let health_fds = crate::backends::health::FDS;
    let metrics_fds = if metrics { metrics::FDS } else { 0 };
    let other = FD_RESERVE + if admin { crate::admin::FDS } else { 0 };
    let reserved = other + listeners + health_fds + metrics_fds;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        let budget = FdBudget {
            limit: None,
            reserved,
            pipes: usize::MAX,
        };
        return (max_connections, budget);
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
    let available = lim.rlim_cur.saturating_sub(reserved);
    let fits = (available / 2) as usize;
    // Whatever the connections leave over is what the relay may spend on kernel pipes; past
    // that it copies through a buffer instead of failing a socket with EMFILE.
    let bound = max_connections.min(fits).max(1);
    let pipes = available.saturating_sub(bound as u64 * 2) / 2;
    let budget = FdBudget {
        limit: Some(lim.rlim_cur),
        reserved,
        pipes: usize::try_from(pipes).unwrap_or(usize::MAX),
    };
    if max_connections > fits {
        crate::warn!(
            "--max-connections {max_connections} needs {} file descriptors but the open-file limit is {} ({reserved} reserved: {listeners} listeners, {health_fds} health checks, {metrics_fds} metrics, {other} other): lowering the bound to {}",
            max_connections as u64 * 2 + reserved,
            lim.rlim_cur,
            fits.max(1)
        );
        (fits.max(1), budget)
    } else {
        (max_connections, budget)
    }
}
