//! PROXY protocol v1/v2 headers for arbitrary addresses, parsed back by an independent parser.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: flyproxy_fuzz::header::HeaderInput| {
    flyproxy_fuzz::header::check(&input);
});
