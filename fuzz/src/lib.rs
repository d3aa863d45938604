//! The checks behind flyproxy's fuzz targets, as plain functions so that `cargo test` in this
//! crate runs them on the seed corpora too (`tests/seeds.rs`), without libFuzzer.
//!
//! Each check panics on a property violation; libFuzzer turns that into a crash artifact.
//!
//! - [`config::check_bytes`]: any bytes through `Config::parse`, checked against an independent
//!   validator written from the README (a differential oracle) and the `Config` invariants.
//! - [`config::check_structured`]: a config built from structured choices (valid and invalid
//!   values, wrong types, unknown keys, nulls, shuffled keys), serialized to JSON and parsed;
//!   the result must be exactly what the choices imply.
//! - [`header::check`]: the PROXY protocol writer, with its output parsed back by a small
//!   parser written from HAProxy's spec.
//! - [`cli::check`]: the command-line parser and `parse_duration`.
//! - [`client_hello::check_bytes`], [`client_hello::check_structured`]: the ClientHello parser
//!   against an independent one, on any bytes and on hellos built from structured choices.
//! - [`handover::check`]: the upgrade hand-over variables' parser, against an oracle.
//! - [`names::check`]: app name validation and the log's escaping.

pub mod cli;
pub mod client_hello;
pub mod config;
pub mod handover;
pub mod header;
pub mod names;
