//! flyproxy: a layer-4 TCP proxy and load balancer.
//!
//! `main` only parses the command line, runs the chosen command, and turns an error into a
//! message and an exit code: 0 done, 1 could not run (bad config, port in use, missing
//! privileges), 2 bad command line.

mod backend;
mod bpf;
mod cli;
mod config;
mod conns;
mod frontend;
mod health;
mod log;
mod metrics;
mod pool;
mod ports;
mod proxy_protocol;
mod relay;
mod routing;
mod session;

use std::process::ExitCode;

use cli::{Command, Mode};

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
            println!("flyproxy {}", cli::VERSION);
            ExitCode::SUCCESS
        }
        Command::Status { metrics } => match metrics::fetch_status(metrics) {
            Ok(page) => {
                print!("{page}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "flyproxy: cannot read the status from {metrics}: {e}\n(is flyproxy running with --metrics {metrics}?)"
                );
                ExitCode::FAILURE
            }
        },
        Command::Check { config } => match config::Config::load(&config) {
            Ok(c) => {
                println!("{}: ok: {}", config.display(), c.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{e}");
                println!("{}: {} problems found", config.display(), e.problems.len());
                ExitCode::FAILURE
            }
        },
        Command::Run(mode, settings) => {
            log::set_level(settings.log_level);
            log::set_format(settings.log_format);
            let result = match mode {
                Mode::Simple => frontend::run(settings, "simple", || {
                    Ok(Box::new(ports::PerPort::default()) as Box<dyn ports::PortSource>)
                }),
                Mode::Bpf { port, bind } => frontend::run(settings, "bpf", move || {
                    bpf::listener::Steered::start(port, bind)
                        .map(|s| Box::new(s) as Box<dyn ports::PortSource>)
                        .map_err(|e| frontend::StartError::Mode(e.to_string()))
                }),
            };
            let code = match result {
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
    }
}
