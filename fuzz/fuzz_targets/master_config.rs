#![no_main]
//! Fuzz target: see `kvpool_fuzz::master_config`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvpool_fuzz::master_config(data));
