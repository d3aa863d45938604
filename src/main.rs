//! flyproxy: a layer-4 TCP proxy and load balancer.
//!
//! `main` only parses the command line, runs the chosen command, and turns an error into a
//! message and an exit code: 0 done, 1 could not run (bad config, port in use, missing
//! privileges), 2 bad command line.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use flyproxy::cli::{self, Command, Mode, Settings};
use flyproxy::frontend::{self, candidate};
use flyproxy::sys::{alloc, log, pidfile, upgrade};
use flyproxy::{admin, error, metrics};

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flyproxy: {e}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("flyproxy {}", flyproxy::VERSION);
            ExitCode::SUCCESS
        }
        Command::Upgrade { pid_file } => request_upgrade(&pid_file),
        Command::Status { metrics, app } => status(metrics, app.as_deref()),
        Command::Check { config, given } => check(&config, given),
        Command::Ctl { socket, command } => ctl(&socket, &command),
        Command::Run(mode, settings) => run(mode, settings),
    }
}

/// `flyproxy simple` and `flyproxy bpf`: serve until stopped.
fn run(mode: Mode, settings: Settings) -> ExitCode {
    // First of all: an arena made before it would stay.
    alloc::limit_arenas();
    log::set_level(settings.log_level);
    log::set_format(settings.log_format);
    // Before any thread starts: this reads and clears the environment.
    let inherited = match upgrade::Inherited::from_env() {
        Ok(i) => i,
        Err(e) => {
            error!("{e}");
            error!("exiting with status 1");
            log::flush();
            return ExitCode::FAILURE;
        }
    };
    // After the environment is read, before privileges are dropped (the files may be in a
    // directory only root can write to).
    if let Err(e) = log::init(settings.log_file.as_deref(), &settings.access_log) {
        error!("{e}");
        error!("exiting with status 1");
        log::flush();
        return ExitCode::FAILURE;
    }
    let handed = frontend::Handed {
        exec: upgrade::Exec::current().ok(),
        ready: inherited.ready,
        listeners: inherited.listeners,
        metrics: inherited.metrics,
    };
    let code = match frontend::run(settings, mode, handed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            for line in e.to_string().lines() {
                error!("{line}");
            }
            error!("exiting with status 1");
            ExitCode::FAILURE
        }
    };
    // Lines are written by a background thread: let it finish before the process ends.
    log::flush();
    code
}

/// `flyproxy check`: validate a config file. The verdict "ok" is the command's output
/// (stdout); problems are diagnostics (stderr), as compilers and linters print them, so a
/// script that keeps stdout still shows the operator what is wrong.
fn check(config: &Path, given: bool) -> ExitCode {
    if !given {
        // The default path is relative: say where it was looked for, so that a check run from
        // the wrong directory does not pass or fail on a file the operator did not mean.
        let dir = std::env::current_dir()
            .map_or_else(|e| format!("? ({e})"), |d| d.display().to_string());
        eprintln!(
            "flyproxy: checking {} in {dir} (the default; -c PATH checks another file)",
            config.display()
        );
    }
    if config.is_dir() {
        return check_dir(config);
    }
    let checked = candidate::load(config).map_err(|e| e.into_config_error());
    match checked {
        Ok(c) => {
            println!("{}: ok: {}", config.display(), c.config.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", e.first(flyproxy::config::PRINTED_MAX));
            let n = e.count();
            let noun = if n == 1 { "problem" } else { "problems" };
            eprintln!("{}: {n} {noun} found", config.display());
            ExitCode::FAILURE
        }
    }
}

/// `flyproxy check DIR`: every problem of every file of a config directory, each line
/// naming its file, as the proxy would refuse them at start (and serve the rest).
fn check_dir(dir: &Path) -> ExitCode {
    let (config, rejected) = flyproxy::frontend::directory::check(dir);
    if rejected.is_empty() {
        println!("{}: ok: {}", dir.display(), config.summary());
        return ExitCode::SUCCESS;
    }
    let mut n = 0;
    for r in &rejected {
        for p in &r.problems {
            eprintln!("{}: {p}", r.file);
            n += 1;
        }
    }
    let noun = if n == 1 { "problem" } else { "problems" };
    let files = if rejected.len() == 1 { "file" } else { "files" };
    eprintln!(
        "{}: {n} {noun} found in {} {files} (the others would serve: {})",
        dir.display(),
        rejected.len(),
        config.summary()
    );
    ExitCode::FAILURE
}

/// `flyproxy status`: print a running proxy's status page.
fn status(metrics: SocketAddr, app: Option<&str>) -> ExitCode {
    match metrics::fetch_status(metrics, app) {
        Ok(page) => {
            print!("{page}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let hint = match e {
                metrics::FetchError::NotOurs(..) => {
                    "something other than flyproxy answers there: is flyproxy's --metrics another address?"
                        .to_owned()
                }
                metrics::FetchError::NoApp(..) => {
                    "'flyproxy status' without --app lists the apps and how many there are".to_owned()
                }
                _ => format!("is flyproxy running with --metrics {metrics}?"),
            };
            eprintln!("flyproxy: cannot read the status from {metrics}: {e}\n({hint})");
            ExitCode::FAILURE
        }
    }
}

/// `flyproxy ctl`: one command to the admin socket; its answer on stdout, or on stderr with
/// exit 1 if it is an error.
fn ctl(socket: &Path, command: &str) -> ExitCode {
    match admin::ask(socket, command, admin::CTL_DEADLINE) {
        Ok(answer) if answer.starts_with("error:") => {
            eprint!("{answer}");
            ExitCode::FAILURE
        }
        Ok(answer) => {
            print!("{answer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flyproxy: ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `flyproxy upgrade`: tell the running proxy to upgrade.
fn request_upgrade(pid_file: &Path) -> ExitCode {
    match send_upgrade(pid_file) {
        Ok(pid) => {
            println!(
                "sent SIGUSR2 to flyproxy pid {pid}: it upgrades to the binary now at its path"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flyproxy: upgrade: {}: {e}", pid_file.display());
            ExitCode::FAILURE
        }
    }
}

/// `flyproxy upgrade`: signal the proxy named by its pid file, once it is known to be a
/// flyproxy of the caller's.
fn send_upgrade(pid_file: &Path) -> Result<i32, String> {
    let pid = pidfile::read_checked(pid_file)?;
    // SAFETY: kill(2) with a positive pid and a valid signal number.
    if unsafe { libc::kill(pid, libc::SIGUSR2) } != 0 {
        return Err(format!(
            "cannot signal pid {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(pid)
}
