#![no_main]
//! Fuzz target: see `kvpool_fuzz::frame_header`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvpool_fuzz::frame_header(data));
