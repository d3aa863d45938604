//! What each command does: parsed from its words, run against what the proxy shares, answered
//! as text. A change (a target's state or weight, an app disabled) is logged and saved
//! (`state`); a command that names an app, target or connection the proxy lacks is an error
//! naming it.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use super::reload::{ReloadOutcome, Reloader};
use super::show;
use super::state::{find_app, find_target, RuntimeState};
use crate::backends::backend::{Backend, TargetState, MAX_WEIGHT};
use crate::backends::routing::{AppRoute, Routes};
use crate::metrics::Published;
use crate::relay::conns::{Conns, Cut};

pub(super) const HELP: &str = "\
help                                 this list
show apps                            apps: ports, enabled or disabled, open, queued, total
show targets [APP]                   targets: state, health (since, why), weight, backup,
                                     open, total, failures, average connect time
show conns [APP [TARGET]]            open connections: id, app, client, target, phase, age,
                                     idle time, bytes each way
show config                          the config file in force: path, sha256, loaded at, counts
show state                           the runtime state (what was set here) as JSON
set target APP TARGET state ready|drain|maint
                                     drain: no new connections, open ones finish;
                                     maint: drain and no health checks; ready: back in the pool
set target APP TARGET weight N       weight 0-256 (0: no new connections)
disable app APP                      refuse the app's new connections (open ones go on)
enable app APP                       take them again
kill conn ID                         close one connection now, both sides
kill conns APP [TARGET]              close the app's (or one target's) connections now
reload                               reload the config now: ok sha256=... or every problem
";

/// What the commands read and act on.
pub struct Shared {
    pub published: Arc<Published>,
    pub conns: Arc<Conns>,
    /// The config file, for `show config`.
    pub config_path: PathBuf,
    pub reloader: Reloader,
    pub runtime: Arc<RuntimeState>,
}

/// A command's answer.
pub(super) enum Answer {
    /// Done: its text (lines, each ending in a newline; may be empty).
    Done(String),
    /// Refused: one line saying why.
    Error(String),
    /// A reload was asked for: its outcome will come.
    Reload(Receiver<ReloadOutcome>),
}

/// Run one command line.
pub(super) fn run(line: &str, shared: &Shared) -> Answer {
    let words: Vec<&str> = line.split_whitespace().collect();
    match run_words(&words, shared) {
        Ok(answer) => answer,
        Err(why) => Answer::Error(why),
    }
}

fn run_words(words: &[&str], shared: &Shared) -> Result<Answer, String> {
    let routes = shared.published.routes();
    let done = |s: String| Ok(Answer::Done(s));
    match words {
        [] => done(String::new()),
        ["help"] => done(HELP.to_owned()),
        ["show", "apps"] => done(show::apps(&routes)),
        ["show", "targets"] => done(show::targets(&routes, None)),
        ["show", "targets", app] => {
            app_named(&routes, app)?;
            done(show::targets(&routes, Some(app)))
        }
        ["show", "conns", rest @ ..] if rest.len() <= 2 => {
            let (app, target) = (rest.first().copied(), rest.get(1).copied());
            let picked = show::select(&shared.conns, app, target);
            if picked.is_empty() {
                known(&routes, app, target)?;
            }
            done(show::conns(&picked))
        }
        ["show", "config"] => done(show::config(&shared.published, &shared.config_path)),
        ["show", "state"] => done(shared.runtime.to_json(&routes) + "\n"),
        ["set", "target", app, target, "state", state] => {
            let backends = target_named(&routes, app, target)?;
            let state = TargetState::parse(state)
                .ok_or_else(|| format!("state {state:?}: must be ready, drain or maint"))?;
            for b in &backends {
                b.set_state(state);
            }
            // `set_state` logs the change.
            shared.runtime.target_set(app, target, true);
            done(saved(shared, &routes))
        }
        ["set", "target", app, target, "weight", n] => {
            let backends = target_named(&routes, app, target)?;
            let weight = n
                .parse::<u32>()
                .ok()
                .filter(|w| *w <= MAX_WEIGHT)
                .ok_or_else(|| {
                    format!("weight {n:?}: must be a whole number from 0 to {MAX_WEIGHT}")
                })?;
            for b in &backends {
                b.set_weight(weight);
            }
            shared.runtime.target_set(app, target, false);
            crate::info!("admin: target {target} of app {app} set to weight {weight}");
            done(saved(shared, &routes))
        }
        [verb @ ("disable" | "enable"), "app", app] => {
            let route = app_named(&routes, app)?;
            let disable = *verb == "disable";
            let was = route.stats.disabled.swap(disable, Ordering::Relaxed);
            if was != disable {
                crate::info!("admin: app {app} {verb}d");
            }
            done(saved(shared, &routes))
        }
        ["kill", "conn", id] => {
            let id: u64 = id
                .parse()
                .map_err(|_| format!("connection id {id:?}: not a number (see show conns)"))?;
            let conn = shared
                .conns
                .get(id)
                .ok_or_else(|| format!("no open connection with id {id} (see show conns)"))?;
            conn.cut(Cut::Killed);
            crate::info!("admin: connection {id} killed");
            done("ok: killed 1 connection\n".to_owned())
        }
        ["kill", "conns", app, rest @ ..] if rest.len() <= 1 => {
            let target = rest.first().copied();
            let picked = show::select(&shared.conns, Some(app), target);
            if picked.is_empty() {
                known(&routes, Some(app), target)?;
            }
            for c in &picked {
                c.cut(Cut::Killed);
            }
            let n = picked.len();
            crate::info!("admin: {n} connections of app {app} killed");
            let noun = if n == 1 { "connection" } else { "connections" };
            done(format!("ok: killed {n} {noun}\n"))
        }
        ["reload"] => shared.reloader.request().map(Answer::Reload),
        _ => Err(unknown(words)),
    }
}

/// For the connection commands, which take an app or target a reload removed while its
/// connections are still open: with none open, an error if the config does not have it
/// either.
fn known(routes: &Routes, app: Option<&str>, target: Option<&str>) -> Result<(), String> {
    match (app, target) {
        (Some(app), Some(t)) => target_named(routes, app, t).map(drop),
        (Some(app), None) => app_named(routes, app).map(drop),
        _ => Ok(()),
    }
}

/// The app named `name`, or an error naming it.
fn app_named<'a>(routes: &'a Routes, name: &str) -> Result<&'a Arc<AppRoute>, String> {
    find_app(routes, name).ok_or_else(|| format!("no app named {name:?} (see show apps)"))
}

/// The backends of `target` in app `app`, or an error naming what is not there.
fn target_named(routes: &Routes, app: &str, target: &str) -> Result<Vec<Arc<Backend>>, String> {
    app_named(routes, app)?;
    let found = find_target(routes, app, target);
    if found.is_empty() {
        return Err(format!(
            "app {app:?} has no target {target:?} (see show targets {app})"
        ));
    }
    Ok(found)
}

/// Save the runtime state after a change: `ok`, with a warning if the file could not be
/// written (the change holds in the running proxy all the same).
fn saved(shared: &Shared, routes: &Routes) -> String {
    match shared.runtime.save(routes) {
        Ok(()) => "ok\n".to_owned(),
        Err(e) => {
            crate::warn!("admin: {e}");
            format!("ok\nwarning: the change holds, but {e}\n")
        }
    }
}

/// What is wrong with a line that is no command.
fn unknown(words: &[&str]) -> String {
    let known = ["help", "show", "set", "disable", "enable", "kill", "reload"];
    match words {
        [w, ..] if !known.contains(w) => format!("unknown command {w:?} (try help)"),
        ["show", what, ..] => {
            format!("show {what:?}: not apps, targets [APP], conns [APP [TARGET]], config or state")
        }
        _ => format!("cannot read {:?} (try help)", words.join(" ")),
    }
}

/// The text of a reload's outcome; false if it is an error.
pub(super) fn reload_answer(outcome: Option<ReloadOutcome>) -> Answer {
    match outcome {
        Some(ReloadOutcome::Applied { sha256 }) => Answer::Done(format!("ok sha256={sha256}\n")),
        Some(ReloadOutcome::Unchanged { sha256 }) => {
            Answer::Done(format!("ok sha256={sha256} (unchanged)\n"))
        }
        Some(ReloadOutcome::Rejected { problems }) => {
            let mut text = String::from("reload rejected, the running config stays:");
            for p in problems {
                text.push_str("\nerror: ");
                text.push_str(&p);
            }
            Answer::Error(text)
        }
        None => Answer::Error("the reload got no outcome: the proxy is stopping".into()),
    }
}
