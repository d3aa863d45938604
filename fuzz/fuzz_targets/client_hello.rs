//! Any bytes as the start of a connection: flyproxy's ClientHello parser against an
//! independent one, plus the consistency of its "incomplete" answers.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    flyproxy_fuzz::client_hello::check_bytes(data);
});
