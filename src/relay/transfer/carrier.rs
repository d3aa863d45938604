//! What holds a direction's bytes in flight: a kernel pipe that bytes are spliced through, or a
//! user-space buffer, both pooled (`Carriers`) and held only while bytes are in flight, so an
//! idle connection holds neither.
//!
//! The pipes are bounded by a budget given when the relay is built (what the open-file limit
//! leaves beside the connections), so that pipes never take the descriptors the connection
//! bound counts on: past it, relaying copies through a buffer instead of failing a socket with
//! EMFILE.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes moved per splice (the pipe is sized to hold them).
pub(super) const PIPE_SIZE: usize = 1024 * 1024;
/// Spare pipes kept for reuse; beyond this, a freed pipe is closed.
const PIPE_POOL_MAX: usize = 64;
/// Buffer for copying through user space: small exchanges (requests, replies) are cheaper to
/// copy than to splice, and it is the fallback when no pipe can be had.
pub(super) const BUF_SIZE: usize = 16 * 1024;
/// Spare buffers kept for reuse.
const BUF_POOL_MAX: usize = 256;

/// The pools of pipes and buffers every relay of the process takes its carriers from.
pub struct Carriers {
    pipes: Mutex<Vec<KernelPipe>>,
    bufs: Mutex<Vec<Box<[u8]>>>,
    /// Pipes that may exist at once (pooled or in use).
    pipe_budget: usize,
    /// Pipes that exist now; each pipe holds it, to give its place back when it is closed.
    pipes_live: Arc<AtomicUsize>,
}

impl Carriers {
    /// Pools that allow at most `pipe_budget` kernel pipes at once; beyond, relaying falls back
    /// to a buffer.
    pub fn new(pipe_budget: usize) -> Carriers {
        Carriers {
            pipes: Mutex::new(Vec::new()),
            bufs: Mutex::new(Vec::new()),
            pipe_budget,
            pipes_live: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A buffer from the pool, or a new one.
    pub(super) fn take_buf(&self) -> Box<[u8]> {
        lock(&self.bufs)
            .pop()
            .unwrap_or_else(|| vec![0; BUF_SIZE].into_boxed_slice())
    }

    fn give_buf(&self, buf: Box<[u8]>) {
        let mut pool = lock(&self.bufs);
        if pool.len() < BUF_POOL_MAX {
            pool.push(buf);
        }
    }

    /// A pipe from the pool, or a new one within the budget.
    pub(super) fn take_pipe(&self) -> io::Result<KernelPipe> {
        if let Some(p) = lock(&self.pipes).pop() {
            return Ok(p);
        }
        // Reserve a place in the budget first, so concurrent takers cannot overshoot it.
        if self.pipes_live.fetch_add(1, Ordering::Relaxed) >= self.pipe_budget {
            self.pipes_live.fetch_sub(1, Ordering::Relaxed);
            return Err(io::Error::other("pipe budget spent"));
        }
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills `fds` with two new descriptors on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            self.pipes_live.fetch_sub(1, Ordering::Relaxed);
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and owned by nobody else.
        let p = unsafe {
            KernelPipe {
                r: OwnedFd::from_raw_fd(fds[0]),
                w: OwnedFd::from_raw_fd(fds[1]),
                live: Arc::clone(&self.pipes_live),
            }
        };
        // A larger pipe means fewer splices per megabyte. Failure (a lowered pipe-max-size)
        // only costs speed, so it is ignored.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            libc::fcntl(
                p.w.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        Ok(p)
    }

    /// Return an empty pipe to the pool.
    fn give_pipe(&self, pipe: KernelPipe) {
        let mut pool = lock(&self.pipes);
        if pool.len() < PIPE_POOL_MAX {
            pool.push(pipe);
        }
    }

    /// Give `carrier` back to its pool.
    pub(super) fn give(&self, carrier: Carrier) {
        match carrier {
            Carrier::Pipe(p) => self.give_pipe(p),
            Carrier::Buf { buf, .. } => self.give_buf(buf),
            Carrier::None => {}
        }
    }
}

fn lock<T>(pool: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is one push or pop: a poisoned pool is still whole.
    pool.lock().unwrap_or_else(|e| e.into_inner())
}

/// A kernel pipe that bytes are spliced through: socket to pipe to socket, without being
/// copied into user space (as HAProxy does). Pipes are shared by all connections through the
/// pool and held only while bytes are in flight, so an idle connection costs its two sockets
/// and nothing more, and the descriptor count stays near two per connection.
pub(super) struct KernelPipe {
    pub(super) r: OwnedFd,
    pub(super) w: OwnedFd,
    /// The pool's count of live pipes, which this one is in until it is closed.
    live: Arc<AtomicUsize>,
}

impl Drop for KernelPipe {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What holds a direction's bytes in flight.
pub(super) enum Carrier {
    None,
    /// For bulk: zero-copy.
    Pipe(KernelPipe),
    /// For small exchanges, and when no pipe can be had or splice is refused.
    Buf {
        buf: Box<[u8]>,
        lo: usize,
    },
}

pub(super) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain splice(2) between descriptors that stay open for the call.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_stay_within_the_budget_and_return_their_place() {
        let carriers = Carriers::new(2);
        let a = carriers.take_pipe().expect("first pipe");
        let b = carriers.take_pipe().expect("second pipe");
        assert!(
            carriers.take_pipe().is_err(),
            "a third pipe past a budget of 2"
        );
        // Closed (not pooled): its place in the budget is free again.
        drop(a);
        let c = carriers.take_pipe().expect("a pipe once one was closed");
        // Pooled: taken again without a new one.
        carriers.give_pipe(b);
        let d = carriers.take_pipe().expect("the pooled pipe");
        assert_eq!(carriers.pipes_live.load(Ordering::Relaxed), 2);
        drop((c, d));
        assert_eq!(carriers.pipes_live.load(Ordering::Relaxed), 0);
    }
}
