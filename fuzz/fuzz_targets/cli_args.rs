//! The command-line parser and `parse_duration`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: flyproxy_fuzz::cli::CliInput| {
    flyproxy_fuzz::cli::check(&input);
});
