//! The one way the tests start a proxy: [`Launch`], in either [`Mode`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::{config, free_ports, Proxy, TempDir, BIN, WAIT};

/// The two ways ports reach the proxy: `flyproxy simple` (a listener per port) and `flyproxy
/// bpf` (one listener, an sk_lookup program steering the ports to it; root, and a network
/// namespace of the test's own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Simple,
    Bpf,
}

impl Mode {
    /// The subcommand, as `started mode=` logs it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Simple => "simple",
            Mode::Bpf => "bpf",
        }
    }
}

/// The port of bpf mode's own listener (`-p`). Any port works: a bpf-mode proxy runs in a
/// network namespace of the test's own.
pub const BPF_LISTENER_PORT: u16 = 8000;

/// Builds a config file from the ports it is to serve.
type MakeConfig<'a> = Box<dyn Fn(&[u16]) -> String + 'a>;

/// Changes a command before it runs.
type Adjust<'a> = Box<dyn Fn(&mut Command) + 'a>;

/// How a config reaches [`Launch`]: as written, or built from fresh ports.
enum Source<'a> {
    Json(String),
    Ports(usize, MakeConfig<'a>),
}

/// The one way the tests start a proxy: `Proxy::simple()` or `Proxy::bpf()` (or `env.proxy()`
/// in a two-mode test), then the config and arguments, then [`Launch::start`] (wait for the
/// `started` line) or [`Launch::spawn`] (do not wait: for a start that must fail).
///
/// The command line is `flyproxy simple -c CONFIG ARGS...` or `flyproxy bpf -p 8000 -c CONFIG
/// --reload-interval 100ms ARGS...` (bpf mode's tests reload often; they need it fast).
#[must_use]
pub struct Launch<'a> {
    mode: Mode,
    bin: PathBuf,
    source: Source<'a>,
    ports: Vec<u16>,
    args: Vec<OsString>,
    /// `FLAG DIR/NAME` arguments, DIR being the proxy's own directory.
    files: Vec<(String, String)>,
    adjust: Vec<Adjust<'a>>,
    /// How long to wait for the `started` line.
    start_wait: Duration,
}

impl Proxy {
    /// `Proxy::simple().ports(nports, make_config).args(args).start()`, kept for
    /// tests/packaging.rs (which another change owns); new tests use the builder.
    pub fn start(nports: usize, args: &[&str], make_config: impl Fn(&[u16]) -> String) -> Proxy {
        Proxy::simple()
            .ports(nports, make_config)
            .args(args)
            .start()
    }

    /// A `flyproxy simple` to start.
    pub fn simple<'a>() -> Launch<'a> {
        Launch::new(Mode::Simple)
    }

    /// A `flyproxy bpf` to start (in the calling thread's network namespace).
    pub fn bpf<'a>() -> Launch<'a> {
        Launch::new(Mode::Bpf)
    }
}

impl<'a> Launch<'a> {
    pub fn new(mode: Mode) -> Launch<'a> {
        Launch {
            mode,
            bin: PathBuf::from(BIN),
            source: Source::Json(config(&[])),
            ports: Vec::new(),
            args: Vec::new(),
            files: Vec::new(),
            adjust: Vec::new(),
            start_wait: WAIT,
        }
    }

    /// The config file's contents.
    pub fn config(mut self, json: &str) -> Launch<'a> {
        self.source = Source::Json(json.to_owned());
        self
    }

    /// The config file's contents, which serve `ports` (what [`Proxy::v4`] and
    /// [`Proxy::v6`] address).
    pub fn config_on(mut self, ports: &[u16], json: &str) -> Launch<'a> {
        self.ports = ports.to_vec();
        self.config(json)
    }

    /// A config `make_config` builds from `n` fresh ports. If a port turns out to be taken in
    /// the moment between picking and binding it, [`Launch::start`] starts again on others.
    pub fn ports(mut self, n: usize, make_config: impl Fn(&[u16]) -> String + 'a) -> Launch<'a> {
        self.source = Source::Ports(n, Box::new(make_config));
        self
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Launch<'a> {
        self.args.push(arg.into());
        self
    }

    pub fn args<A: Into<OsString> + Clone>(mut self, args: &[A]) -> Launch<'a> {
        self.args.extend(args.iter().cloned().map(Into::into));
        self
    }

    /// A config of tens of thousands of apps: wait longer for the start. The debug build took
    /// about 15 s to start on 20,000 apps with the load average at 17 on 2 cores (the suite at
    /// 4 test threads beside builds); `WAIT` is for configs of a few apps.
    pub fn big(mut self) -> Launch<'a> {
        self.start_wait = WAIT * 4;
        self
    }

    /// Reread the config every 100 ms, for a test that reloads (bpf mode always does).
    pub fn fast_reload(self) -> Launch<'a> {
        match self.mode {
            Mode::Simple => self.args(&["--reload-interval", "100ms"]),
            Mode::Bpf => self,
        }
    }

    /// `flag PATH`, PATH being `name` in the proxy's own directory (`proxy.dir`): a pid file,
    /// say, that goes when the proxy does.
    pub fn file_arg(mut self, flag: &str, name: &str) -> Launch<'a> {
        self.files.push((flag.to_owned(), name.to_owned()));
        self
    }

    /// Another build of the binary (a copy elsewhere, say).
    pub fn bin(mut self, bin: impl Into<PathBuf>) -> Launch<'a> {
        self.bin = bin.into();
        self
    }

    /// Change the command before it runs (an fd limit, the environment, ...).
    pub fn command(mut self, adjust: impl Fn(&mut Command) + 'a) -> Launch<'a> {
        self.adjust.push(Box::new(adjust));
        self
    }

    /// Spawn the proxy without waiting for it.
    pub fn spawn(self) -> Proxy {
        self.spawn_once()
    }

    fn spawn_once(&self) -> Proxy {
        let (json, ports) = match &self.source {
            Source::Json(json) => (json.clone(), self.ports.clone()),
            Source::Ports(n, make) => {
                let ports = free_ports(*n);
                (make(&ports), ports)
            }
        };
        let dir = TempDir::new(self.mode.name());
        let config = dir.write("config.json", &json);
        let mut cmd = Command::new(&self.bin);
        cmd.arg(self.mode.name());
        if self.mode == Mode::Bpf {
            cmd.arg("-p").arg(BPF_LISTENER_PORT.to_string());
        }
        cmd.arg("-c").arg(&config);
        if self.mode == Mode::Bpf {
            cmd.args(["--reload-interval", "100ms"]);
        }
        cmd.args(&self.args);
        for (flag, name) in &self.files {
            cmd.arg(flag).arg(dir.path.join(name));
        }
        for adjust in &self.adjust {
            adjust(&mut cmd);
        }
        let mut p = Proxy::spawn_cmd(cmd, dir, config);
        p.mode = self.mode;
        p.ports = ports;
        p
    }

    /// Spawn the proxy and wait for its `started` line; on exit before it, `Err` with the log.
    pub fn try_start(self) -> Result<Proxy, String> {
        for attempt in 0.. {
            let mut p = self.spawn_once();
            match p.wait_started_within(self.start_wait) {
                Ok(()) => return Ok(p),
                // Fresh ports: one was taken between picking and binding it; pick others.
                Err(log)
                    if matches!(self.source, Source::Ports(..))
                        && attempt < 2
                        && log.contains("cannot listen on port") =>
                {
                    continue
                }
                Err(log) => return Err(log),
            }
        }
        unreachable!("the loop returns")
    }

    /// Spawn the proxy and wait for its `started` line (panicking with the log if it exits).
    pub fn start(self) -> Proxy {
        let mode = self.mode;
        self.try_start()
            .unwrap_or_else(|log| panic!("flyproxy {} did not start:\n{log}", mode.name()))
    }
}
