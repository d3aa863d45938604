//! The `reload` command's way to whoever reloads the config, and its outcome. The command
//! needs one function, "reload now and tell me how it went" (`ReloadNow`), run on a short-lived
//! thread of its own so that the admin thread never waits (one at most per admin client: 16).
//! A client that leaves before its outcome does not end its thread, so the threads are counted
//! and a reload asked for while `MAX_WAITING` already wait is refused.
//! Start-up gives that function (`frontend::control`): the config plane's own reload entry,
//! the one SIGHUP and the reload tick use, so the command's answer is that reload's outcome.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;

/// Reloads asked for through the socket and not done yet, at most.
const MAX_WAITING: usize = 4;

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
    /// Reload threads not done yet.
    waiting: Arc<AtomicUsize>,
}

/// Counts a reload thread while it runs.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Reloader {
    pub fn new(now: ReloadNow) -> Reloader {
        Reloader {
            now,
            waiting: Arc::default(),
        }
    }

    /// Reload on a thread of its own; the outcome arrives on the returned channel (closed
    /// without one if there is none, or no thread could be started). Err: too many wait.
    pub fn request(&self) -> Result<Receiver<ReloadOutcome>, String> {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(format!(
                "busy: {MAX_WAITING} reloads asked for are not done yet; see the log for them"
            ));
        }
        let counted = Waiting(Arc::clone(&self.waiting));
        let (tx, rx) = mpsc::sync_channel(1);
        let now = Arc::clone(&self.now);
        let spawned = std::thread::Builder::new()
            .name("flyproxy-reload".into())
            .spawn(move || {
                let _counted = counted;
                if let Some(outcome) = now() {
                    let _ = tx.send(outcome);
                }
            });
        if let Err(e) = spawned {
            crate::warn!("admin: cannot start a thread for the reload: {e}");
        }
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    /// Reloads whose clients left do not pile up threads: past `MAX_WAITING` a reload is
    /// refused, and taken again once one is done.
    #[test]
    fn reloads_waiting_are_bounded() {
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let now: ReloadNow = Arc::new(move || {
            let _ = gate.lock().unwrap().recv();
            Some(ReloadOutcome::Unchanged { sha256: "x".into() })
        });
        let r = Reloader::new(now);
        let _waiting: Vec<_> = (0..MAX_WAITING).map(|_| r.request().unwrap()).collect();
        assert!(r.request().unwrap_err().starts_with("busy"));
        release.send(()).unwrap();
        // The released thread ends on its own time: poll, up to a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let again = loop {
            if let Ok(rx) = r.request() {
                break Some(rx);
            }
            if std::time::Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(again.is_some(), "a reload is taken again once one is done");
        for _ in 0..MAX_WAITING {
            let _ = release.send(());
        }
    }
}
