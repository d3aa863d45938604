//! ClientHellos built from structured choices (extensions, server names, record sizes), maybe
//! mutated and cut, through the same differential check.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: flyproxy_fuzz::client_hello::HelloInput| {
    flyproxy_fuzz::client_hello::check_structured(&input);
});
