//! Configs built from structured choices (valid and invalid values, wrong types, unknown keys,
//! nulls), two at a time: each parsed and judged, and the diff between two valid ones checked.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: flyproxy_fuzz::config::Structured| {
    flyproxy_fuzz::config::check_structured(&input);
});
