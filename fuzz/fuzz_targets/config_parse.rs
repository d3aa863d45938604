//! Any bytes as a config file: `Config::parse` against an independent validator.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flyproxy_fuzz::config::check_bytes(data);
});
