//! The `reload` command's way to whoever reloads the config, and its outcome. The command
//! needs one function, "reload now and tell me how it went" (`ReloadNow`), run on a short-lived
//! thread of its own so that the admin thread never waits (one at most per admin client: 16).
//! Start-up gives that function (`frontend::control`); while the listener loop reloads, it is
//! `through_loop`: a request on a channel and a wake-up of the loop's poll, answered by the
//! loop on the request's own channel. Pointing the command at another reload entry is a
//! change of that one function.

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

/// Reload now and say how it went; None if nothing can reload any more (the proxy is
/// exiting). May block.
pub type ReloadNow = Arc<dyn Fn() -> Option<ReloadOutcome> + Send + Sync>;

/// Asks for reloads for the `reload` command.
#[derive(Clone)]
pub struct Reloader {
    now: ReloadNow,
}

impl Reloader {
    pub fn new(now: ReloadNow) -> Reloader {
        Reloader { now }
    }

    /// Reload on a thread of its own; the outcome arrives on the returned channel (closed
    /// without one if there is none, or no thread could be started).
    pub fn request(&self) -> Receiver<ReloadOutcome> {
        let (tx, rx) = mpsc::sync_channel(1);
        let now = Arc::clone(&self.now);
        let spawned = std::thread::Builder::new()
            .name("flyproxy-reload".into())
            .spawn(move || {
                if let Some(outcome) = now() {
                    let _ = tx.send(outcome);
                }
            });
        if let Err(e) = spawned {
            crate::warn!("admin: cannot start a thread for the reload: {e}");
        }
        rx
    }
}

/// One request to reload, with where its outcome goes (the listener loop's side of
/// `through_loop`).
pub struct ReloadRequest {
    reply: SyncSender<ReloadOutcome>,
}

impl ReloadRequest {
    /// Give the outcome to whoever asked (gone already: nothing to do).
    pub fn answer(self, outcome: ReloadOutcome) {
        let _ = self.reply.try_send(outcome);
    }
}

/// A `ReloadNow` for a listener loop that reloads itself: it sends a request on a channel and
/// wakes the loop with `wake`; the loop keeps the returned end, reloads for each request when
/// woken and answers it.
pub fn through_loop(wake: Arc<dyn Fn() + Send + Sync>) -> (ReloadNow, Receiver<ReloadRequest>) {
    let (requests, rx): (Sender<ReloadRequest>, _) = mpsc::channel();
    let now: ReloadNow = Arc::new(move || {
        let (reply, outcome) = mpsc::sync_channel(1);
        if requests.send(ReloadRequest { reply }).is_err() {
            return None;
        }
        wake();
        outcome.recv().ok()
    });
    (now, rx)
}
