//! `flyproxy-etcd-sync`: keep flyproxy's config equal to what etcd holds (see
//! `flyproxy::fleet`). Exit status: 2 bad arguments, 1 etcdctl cannot be run; it
//! otherwise runs until stopped.

use std::process::ExitCode;

use flyproxy::fleet::{self, Invocation};
use flyproxy::sys::log;

fn main() -> ExitCode {
    let invocation = fleet::parse_args(std::env::args().skip(1), |k| {
        std::env::var(k).ok().filter(|v| !v.is_empty())
    });
    match invocation {
        Err(e) => {
            eprintln!("flyproxy-etcd-sync: {e}");
            ExitCode::from(2)
        }
        Ok(Invocation::Help) => {
            print!("{}", fleet::HELP);
            ExitCode::SUCCESS
        }
        Ok(Invocation::Version) => {
            println!("flyproxy-etcd-sync {}", flyproxy::VERSION);
            ExitCode::SUCCESS
        }
        Ok(Invocation::Run(settings)) => {
            let e = fleet::run(settings);
            flyproxy::error!("{e}; is etcd-client installed (or --etcdctl set)?");
            log::flush();
            ExitCode::FAILURE
        }
    }
}
