//! Routing: which app a frontend port belongs to, and which backends that app has.
//!
//! A `Routes` is built whole from a validated `Config` and replaced whole on reload; it is owned
//! by the listener loop, which looks the port up at accept and hands the app (an `Arc`) to the
//! relay thread. A connection keeps the app it was accepted with, so a reload never changes the
//! target of a connection already open; the next connection sees the new targets.

use std::collections::HashMap;
use std::sync::Arc;

use crate::backend::Backend;
use crate::config::{Config, Target};

#[derive(Debug)]
pub struct AppRoute {
    pub name: String,
    pub backends: Vec<Arc<Backend>>,
}

#[derive(Debug)]
pub struct Routes {
    by_port: HashMap<u16, Arc<AppRoute>>,
    /// One backend per distinct target, reused by the next `Routes` so that per-target state
    /// (active connections, later health) survives a reload.
    backends: HashMap<Target, Arc<Backend>>,
}

impl Routes {
    /// Build the table for `config`, keeping the backends of `previous` whose targets remain.
    pub fn new(config: &Config, previous: Option<&Routes>) -> Routes {
        let mut backends: HashMap<Target, Arc<Backend>> = HashMap::new();
        let mut by_port = HashMap::with_capacity(config.ports().count());
        for app in &config.apps {
            let app_backends = app
                .targets
                .iter()
                .map(|t| {
                    Arc::clone(backends.entry(t.clone()).or_insert_with(|| {
                        previous
                            .and_then(|p| p.backends.get(t).cloned())
                            .unwrap_or_else(|| Arc::new(Backend::new(t.clone())))
                    }))
                })
                .collect();
            let route = Arc::new(AppRoute {
                name: app.name.clone(),
                backends: app_backends,
            });
            for &port in &app.ports {
                by_port.insert(port, Arc::clone(&route));
            }
        }
        Routes { by_port, backends }
    }

    pub fn app_for(&self, port: u16) -> Option<&Arc<AppRoute>> {
        self.by_port.get(&port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn backends_survive_a_reload() {
        let c1 = Config::parse(
            Path::new("x"),
            br#"{"Apps":[{"Name":"a","Ports":[1,2],"Targets":["h:1","h:2"]}]}"#,
        )
        .unwrap();
        let c2 = Config::parse(
            Path::new("x"),
            br#"{"Apps":[{"Name":"b","Ports":[2],"Targets":["h:2","h:3"]}]}"#,
        )
        .unwrap();
        let r1 = Routes::new(&c1, None);
        let r2 = Routes::new(&c2, Some(&r1));
        let kept = &r1.app_for(1).unwrap().backends[1];
        assert!(Arc::ptr_eq(kept, &r2.app_for(2).unwrap().backends[0]));
        assert!(r2.app_for(1).is_none());
        assert_eq!(r2.app_for(2).unwrap().name, "b");
    }
}
