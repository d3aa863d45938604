//! The upgrade hand-over variables' parser.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: flyproxy_fuzz::handover::EnvInput| {
    flyproxy_fuzz::handover::check(&input);
});
