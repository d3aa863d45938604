//! The config file as written: serde types that mirror the JSON exactly, so that the original
//! challenge file loads byte for byte and every problem, unknown keys included, can be reported
//! by the validator rather than by serde.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// The file as written. Unknown keys are captured rather than refused by serde, so that the
/// validator can report all of them, with the app they are in, instead of stopping at the first.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct RawConfig {
    pub(super) apps: Option<Vec<RawApp>>,
    #[serde(flatten)]
    pub(super) unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct RawApp {
    pub(super) name: Option<String>,
    /// Numbers and `"A-B"` ranges; kept as JSON values so that 0, 70000 and "x" all get our
    /// message, not serde's.
    pub(super) ports: Option<Vec<Value>>,
    pub(super) addresses: Option<Vec<String>>,
    pub(super) hostnames: Option<Vec<String>>,
    pub(super) targets: Option<Vec<String>>,
    pub(super) health_check: Option<RawHealthCheck>,
    pub(super) balance: Option<String>,
    pub(super) connect_attempts: Option<i64>,
    pub(super) max_connections: Option<i64>,
    pub(super) max_connections_per_client: Option<i64>,
    pub(super) proxy_protocol: Option<String>,
    #[serde(flatten)]
    pub(super) unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct RawHealthCheck {
    pub(super) interval_ms: Option<i64>,
    pub(super) timeout_ms: Option<i64>,
    pub(super) fall: Option<i64>,
    pub(super) rise: Option<i64>,
    #[serde(flatten)]
    pub(super) unknown: BTreeMap<String, Value>,
}
