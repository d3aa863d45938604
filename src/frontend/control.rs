//! Start-up's part for runtime control: the admin socket (`--admin-socket`) and the runtime
//! state (`--state-file`, and what the old process of an upgrade hands over).
//!
//! The socket is created before privileges drop, like the pid file. A process an upgrade
//! started first asks the old one for its runtime state (`show state`) on the socket, then
//! replaces the socket file (the old process goes on serving its own until it leaves; the path
//! is the new one's from then on). The state is applied to the routing table before the first
//! connection: the --state-file's first, then the old process's, which is newer.

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::{self, ReloadOutcome, Reloader, RuntimeState, Shared, SocketError, StateError};
use crate::backends::routing::Routes;
use crate::cli::Settings;
use crate::frontend::plane::{Outcome, Reloads};
use crate::metrics::Published;
use crate::relay::conns::Conns;
use crate::sys::user::Ids;

/// The admin socket created, and the state the old process handed over.
pub(super) struct Bound {
    listener: Option<UnixListener>,
    handed: Option<String>,
}

/// Create the --admin-socket (if set), owned by `run_as`; `upgraded`: started by an upgrade,
/// whose old process answers on the path now.
pub(super) fn bind(
    settings: &Settings,
    run_as: Option<&Ids>,
    upgraded: bool,
) -> Result<Bound, SocketError> {
    let Some(path) = &settings.admin_socket else {
        return Ok(Bound {
            listener: None,
            handed: None,
        });
    };
    let handed = if upgraded {
        // Bounded well within the upgrade's own 30 s: the old process answers at once, and
        // if it cannot, the new one starts as the config (and the state file) says.
        match admin::ask(path, "show state", Duration::from_secs(5)) {
            Ok(json) if !json.starts_with("error:") => Some(json),
            Ok(e) => {
                crate::warn!(
                    "upgrade: the old process gave no runtime state: {}",
                    e.trim()
                );
                None
            }
            Err(e) => {
                crate::warn!("upgrade: cannot read the old process's runtime state: {e}");
                None
            }
        }
    } else {
        None
    };
    let owner = run_as.map(|ids| (ids.uid, ids.gid));
    let listener = admin::bind(path, owner, upgraded)?;
    Ok(Bound {
        listener: Some(listener),
        handed,
    })
}

/// What the admin socket's thread reads, besides what start-up builds anyway.
pub(super) struct Parts<'a> {
    pub(super) published: &'a Arc<Published>,
    pub(super) conns: &'a Arc<Conns>,
    /// The config plane's reload entry, which the `reload` command uses as SIGHUP does.
    pub(super) reloads: Reloads,
}

/// Restore the runtime state into `routes`, then serve the socket if there is one. A state that cannot be read is a
/// warning: the proxy starts as the config says.
pub(super) fn start(
    bound: Bound,
    settings: &Settings,
    routes: &Routes,
    parts: Parts,
) -> std::io::Result<()> {
    let runtime = RuntimeState::new(settings.state_file.clone());
    if let Some(path) = &settings.state_file {
        match runtime.load_file(routes) {
            Ok(applied) => restored(&format!("--state-file {}", path.display()), &applied),
            Err(e @ StateError::Parse(_)) => crate::warn!(
                "--state-file {}: {e}; starting as the config says",
                path.display()
            ),
            Err(e) => crate::warn!("{e}; starting as the config says"),
        }
    }
    if let Some(json) = &bound.handed {
        match runtime.apply_json(json, routes) {
            Ok(applied) => restored("the old process", &applied),
            Err(e) => crate::warn!("upgrade: the old process's runtime state: {e}"),
        }
        // The new process's file says what it runs with from now on.
        if let Err(e) = runtime.save(routes) {
            crate::warn!("{e}");
        }
    }
    let Some(listener) = bound.listener else {
        return Ok(());
    };
    let reloads = parts.reloads;
    let reloader = Reloader::new(Arc::new(move || {
        reloads.reload().map(|outcome| match outcome {
            Outcome::Applied { sha256 } => ReloadOutcome::Applied { sha256 },
            Outcome::Unchanged { sha256 } => ReloadOutcome::Unchanged { sha256 },
            Outcome::Rejected { problems } => ReloadOutcome::Rejected { problems },
        })
    }));
    let shared = Shared {
        published: Arc::clone(parts.published),
        conns: Arc::clone(parts.conns),
        config_path: settings.config.clone(),
        reloader,
        runtime,
    };
    admin::start(listener, shared)?;
    if let Some(path) = &settings.admin_socket {
        crate::info!("admin socket: {}", path.display());
    }
    Ok(())
}

fn restored(from: &str, applied: &admin::Applied) {
    if applied.targets + applied.apps > 0 {
        crate::info!(
            "runtime state from {from}: {} targets, {} disabled apps",
            applied.targets,
            applied.apps
        );
    }
    for s in &applied.skipped {
        crate::info!("runtime state from {from}: dropped {s}");
    }
}
