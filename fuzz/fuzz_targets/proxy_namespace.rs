#![no_main]
//! Fuzz target: see `kvpool_fuzz::proxy_namespace`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvpool_fuzz::proxy_namespace(data));
