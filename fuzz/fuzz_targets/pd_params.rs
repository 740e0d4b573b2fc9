#![no_main]
//! Fuzz target: see `kvpool_fuzz::pd_params`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvpool_fuzz::pd_params(data));
