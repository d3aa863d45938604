//! The runtime state's families (issue 22): what an operator set through the admin socket, as
//! gauges an alert can watch (a target left in drain, an app left disabled).
//! `flyproxy_target_state{app,target,state}` is 1 for the state a target is in and 0 for the
//! others; `flyproxy_app_enabled{app}` 1 or 0; `flyproxy_app_refused_disabled_total{app}` the
//! connections refused while the app was disabled. The per-target family is apart from the
//! per-app ones, to be left out with the other per-target series where those are; the per-app
//! ones are summed with the other per-app series where those are.

use std::sync::atomic::Ordering;

use super::apps::Scope;
use super::{unique_backends, Apps, Family};
use crate::backends::backend::TargetState;

/// `flyproxy_target_state`: three series a target.
pub(super) fn target_families(out: &mut String, apps: &Apps) {
    let name = "flyproxy_target_state";
    let mut f = Family::head(
        out,
        name,
        "gauge",
        "1 for the state a target is in (ready, drain or maint; set by the config's Drain or the admin socket), 0 for the others.",
    );
    for (app, _) in apps {
        for b in unique_backends(app) {
            let target = b.target.to_string();
            let now = b.state();
            for state in TargetState::ALL {
                let labels = [
                    ("app", app.name()),
                    ("target", target.as_str()),
                    ("state", state.as_str()),
                ];
                f.sample(name, &labels, u8::from(state == now));
            }
        }
    }
}

/// `flyproxy_app_enabled` and `flyproxy_app_refused_disabled_total`: one series an app each,
/// or (summed) the number of apps enabled and every app's refusals.
pub(super) fn app_families(out: &mut String, scope: &Scope<'_>) {
    let name = "flyproxy_app_enabled";
    let help = "1 if the app takes new connections, 0 if the admin socket disabled it.";
    let mut f = Family::head(out, name, "gauge", &scope.help(help));
    match scope {
        Scope::Each(apps) => {
            for (app, _) in *apps {
                let enabled = !app.stats.disabled.load(Ordering::Relaxed);
                f.sample(name, &[("app", app.name())], u8::from(enabled));
            }
        }
        Scope::Summed(t) => f.sample(name, &[], t.enabled),
    }
    let name = "flyproxy_app_refused_disabled_total";
    let help = "Connections refused (reset) because the app was disabled, by app.";
    let mut f = Family::head(out, name, "counter", &scope.help(help));
    scope.each(|app, s, _| {
        let n = s.refused_disabled.load(Ordering::Relaxed);
        f.app_sample(name, app, &[], n);
    });
}
