#![no_main]
//! Fuzz target: see `kvpool_fuzz::store_config`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvpool_fuzz::store_config(data));
