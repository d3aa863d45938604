//! The --metrics address, which no file's app may answer on once the proxy serves (see
//! `frontend::reserved`): a reload refuses such a file alone, with start-up's words.

use std::net::SocketAddr;
use std::sync::Arc;

use super::Directory;
use crate::config::App;
use crate::frontend::reserved;

impl Directory {
    /// Refuse, from now on, a file with an app on `metrics` (set once start-up has checked
    /// the first load, which refuses to start on such an app instead).
    pub fn reserve(&mut self, metrics: Option<SocketAddr>) {
        self.reserved = metrics;
    }

    /// The problem of `apps` answering on the --metrics address, if one does.
    pub(super) fn on_reserved(&self, apps: &[Arc<App>]) -> Option<String> {
        reserved::clash(apps.iter().map(|a| &**a), self.reserved).map(|c| c.to_string())
    }
}
