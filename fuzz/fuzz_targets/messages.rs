#![no_main]
//! Fuzz target: see `kvpool_fuzz::messages`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvpool_fuzz::messages(data));
