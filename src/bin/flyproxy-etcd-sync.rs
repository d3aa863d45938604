//! `flyproxy-etcd-sync`: keep a flyproxy config file equal to an etcd key (see
//! `flyproxy::ops::etcd_sync`). Exit status: 2 bad arguments, 1 etcdctl cannot be run; it
//! otherwise runs until stopped.

use std::process::ExitCode;

use flyproxy::ops::etcd_sync::{self, Follower, Invocation};
use flyproxy::ops::log;

fn main() -> ExitCode {
    let invocation = etcd_sync::parse_args(std::env::args().skip(1), |k| {
        std::env::var(k).ok().filter(|v| !v.is_empty())
    });
    match invocation {
        Err(e) => {
            eprintln!("flyproxy-etcd-sync: {e}");
            ExitCode::from(2)
        }
        Ok(Invocation::Help) => {
            print!("{}", etcd_sync::HELP);
            ExitCode::SUCCESS
        }
        Ok(Invocation::Version) => {
            println!("flyproxy-etcd-sync {}", flyproxy::cli::VERSION);
            ExitCode::SUCCESS
        }
        Ok(Invocation::Run(settings)) => {
            let e = Follower::new(settings).run();
            flyproxy::error!("{e}; is etcd-client installed (or --etcdctl set)?");
            log::flush();
            ExitCode::FAILURE
        }
    }
}
