//! How the binding of one (prefix, port) is made from the apps there: shared by building a
//! table whole (`build.rs`) and by an update (`update.rs`).

use std::collections::HashSet;
use std::sync::Arc;

use super::{AppRoute, Binding};
use crate::backends::clients::ClientCounts;
use crate::config::hostname::Pattern;

/// Whether `routes` (the apps on one (prefix, port)) are one app without Hostnames: their
/// binding is then the same on each of the app's ports and prefixes, and one is shared by all
/// of them (an edge's app with an address of each family on three ports had six, 64 bytes
/// each).
pub(super) fn is_sole(routes: &[&Arc<AppRoute>]) -> bool {
    matches!(routes, [route] if route.hostnames().is_empty())
}

/// The binding of `routes` (the apps on one (prefix, port)), keeping the counts taken at
/// accept of `kept` (the binding there before) if it was of the same apps.
pub(super) fn binding(routes: &[&Arc<AppRoute>], kept: Option<&Binding>) -> Binding {
    let mut b = Binding::default();
    // Most of an edge's bindings: one app on an address of its own.
    if let ([route], true) = (routes, is_sole(routes)) {
        b.default = Some(Arc::clone(route));
        return b;
    }
    let mut names: Vec<&str> = Vec::with_capacity(routes.len());
    for route in routes {
        names.push(route.name());
        if route.hostnames().is_empty() {
            b.default = Some(Arc::clone(route));
        }
        for h in route.hostnames() {
            let names = b.names.get_or_insert_with(Box::default);
            let map = match h {
                Pattern::Exact(_) => &mut names.exact,
                Pattern::Wildcard(_) => &mut names.wildcard,
            };
            let (Pattern::Exact(key) | Pattern::Wildcard(key)) = h;
            map.insert(key.clone(), Arc::clone(route));
        }
    }
    names.sort_unstable();
    if names.len() > 1 {
        b.shared_group = Some(names.join("+").into());
    }
    let kept = kept.filter(|k| k.group() == b.group());
    b.per_client = counted_at_accept(&b, kept.and_then(|k| k.per_client.as_ref()));
    b
}

impl Binding {
    /// Every app here, each once.
    pub(super) fn routes(&self) -> Vec<&Arc<AppRoute>> {
        // A set of the routes seen, not a scan of `out`: a binding may hold thousands of
        // apps told apart by Hostnames.
        let mut seen: HashSet<*const AppRoute> = HashSet::new();
        self.default
            .iter()
            .chain(self.named())
            .filter(|r| seen.insert(Arc::as_ptr(r)))
            .collect()
    }
}

/// The counts a binding takes at accept (see `Binding::per_client`), kept from the binding
/// there before (`kept`, of the same apps) if it had them; None where the server name does
/// not pick the app or an app here has no `MaxConnectionsPerClient`.
fn counted_at_accept(b: &Binding, kept: Option<&Arc<ClientCounts>>) -> Option<Arc<ClientCounts>> {
    if !b.needs_server_name() {
        return None;
    }
    let apps = b.named().chain(&b.default);
    let mut largest = 0;
    for app in apps {
        largest = largest.max(app.per_client.as_ref()?.limit());
    }
    match kept {
        Some(c) => {
            c.set_limit(largest);
            Some(Arc::clone(c))
        }
        None => Some(ClientCounts::new(largest)),
    }
}
