//! App names: validation and log escaping.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flyproxy_fuzz::names::check(&String::from_utf8_lossy(data));
});
