//! The signals the process acts on, each through a self-pipe into the loop's poll: the handler
//! (signal-hook's) writes a byte, the loop sees the read end readable and drains it before
//! acting. They are set up first at start-up, so a signal that arrives while starting is
//! neither lost nor fatal.

use std::io::{self, Read};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use mio::net::UnixStream;
use mio::{Interest, Poll, Token};

use crate::frontend::tokens::{REOPEN_PIPE, SIGHUP_PIPE, STOP_PIPE, UPGRADE_PIPE};

/// The read ends of the signal self-pipes.
pub(super) struct SignalPipes {
    /// SIGHUP: reload.
    pub(super) hup: UnixStream,
    /// SIGTERM, SIGINT, SIGQUIT: stop.
    pub(super) stop: UnixStream,
    /// SIGUSR2: upgrade.
    pub(super) upgrade: UnixStream,
    /// SIGUSR1: reopen the log files.
    pub(super) reopen: UnixStream,
}

impl SignalPipes {
    /// Register the handlers and the pipes' read ends with `poll`, under their tokens.
    pub(super) fn new(poll: &Poll) -> io::Result<SignalPipes> {
        use signal_hook::consts::{SIGALRM, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
        // A handler that only sets a flag nobody reads: the signal is caught, so its default
        // action (terminate) never runs. Not SIG_IGN, which a child (an upgrade's new process,
        // before it sets its own handlers up) would inherit across exec.
        signal_hook::flag::register(SIGALRM, Arc::new(AtomicBool::new(false)))?;
        Ok(SignalPipes {
            hup: signal_pipe(poll, SIGHUP_PIPE, &[SIGHUP])?,
            stop: signal_pipe(poll, STOP_PIPE, &[SIGTERM, SIGINT, SIGQUIT])?,
            upgrade: signal_pipe(poll, UPGRADE_PIPE, &[SIGUSR2])?,
            reopen: signal_pipe(poll, REOPEN_PIPE, &[SIGUSR1])?,
        })
    }
}

/// Drain a signal pipe without waiting; true if a signal had arrived since the last drain.
pub(super) fn arrived(pipe: &mut UnixStream) -> bool {
    let mut buf = [0u8; 64];
    let mut got = false;
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return got,
            Ok(_) => got = true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // WouldBlock: drained. Any other error leaves nothing more to read either.
            Err(_) => return got,
        }
    }
}

/// A self-pipe for `signals`.
fn signal_pipe(poll: &Poll, token: Token, signals: &[i32]) -> io::Result<UnixStream> {
    let (read, write) = StdUnixStream::pair()?;
    read.set_nonblocking(true)?;
    write.set_nonblocking(true)?;
    for &sig in signals {
        signal_hook::low_level::pipe::register(sig, write.try_clone()?)?;
    }
    let mut read = UnixStream::from_std(read);
    poll.registry()
        .register(&mut read, token, Interest::READABLE)?;
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn arrived_drains_every_byte_and_says_whether_there_were_any() {
        let (read, mut write) = StdUnixStream::pair().unwrap();
        read.set_nonblocking(true).unwrap();
        let mut read = UnixStream::from_std(read);
        assert!(!arrived(&mut read));
        write.write_all(&[1; 200]).unwrap();
        assert!(arrived(&mut read));
        assert!(!arrived(&mut read), "a drained pipe has nothing left");
    }
}
