//! The `reload` command's way to the listener loop, which owns the reload: a request on a
//! channel and a wake-up of its poll; the loop answers with the outcome on the request's own
//! channel. This is the one place that knows how a reload is asked for (the loop's side is
//! its `WAKE` event), so that it can be pointed at another entry without touching the
//! commands.

use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;

/// What became of a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The file hashing to `sha256` is in force now.
    Applied { sha256: String },
    /// The file says what is already in force.
    Unchanged { sha256: String },
    /// The running config stays: every problem found.
    Rejected { problems: Vec<String> },
}

/// One request to reload, with where its outcome goes.
pub struct ReloadRequest {
    reply: SyncSender<ReloadOutcome>,
}

impl ReloadRequest {
    /// Give the outcome to whoever asked (gone already: nothing to do).
    pub fn answer(self, outcome: ReloadOutcome) {
        let _ = self.reply.try_send(outcome);
    }
}

/// Asks the listener loop to reload: a channel it drains when woken, and its waker.
#[derive(Clone)]
pub struct Reloader {
    requests: Sender<ReloadRequest>,
    wake: Arc<dyn Fn() + Send + Sync>,
}

impl Reloader {
    /// A reloader waking the loop with `wake`, and the requests' end the loop keeps.
    pub fn new(wake: Arc<dyn Fn() + Send + Sync>) -> (Reloader, Receiver<ReloadRequest>) {
        let (requests, rx) = mpsc::channel();
        (Reloader { requests, wake }, rx)
    }

    /// Ask for a reload; the outcome arrives on the returned channel (closed without one if
    /// the loop is gone).
    pub fn request(&self) -> Receiver<ReloadOutcome> {
        let (reply, outcome) = mpsc::sync_channel(1);
        if self.requests.send(ReloadRequest { reply }).is_ok() {
            (self.wake)();
        }
        outcome
    }
}
