//! A thread's scheduling priority: background work (the config plane's reloads) runs at the
//! lowest, so that on a busy core a relay thread woken for a connection takes the CPU from it
//! at once instead of waiting for its time slice to end.

use std::io;

/// The nice value of background threads: the lowest priority there is.
pub const BACKGROUND_NICE: i32 = 19;

/// Run the calling thread, and the threads it starts from now on (Linux gives a new thread
/// its creator's nice value), at `BACKGROUND_NICE`. Lowering one's own priority needs no
/// privilege.
pub fn lower_this_thread() -> io::Result<()> {
    // SAFETY: gettid has no precondition and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority with PRIO_PROCESS and a thread id changes only that thread's nice
    // value; it reads and writes no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
