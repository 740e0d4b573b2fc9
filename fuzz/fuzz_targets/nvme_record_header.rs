#![no_main]
//! Fuzz target: see `kvpool_fuzz::nvme_record_header`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvpool_fuzz::nvme_record_header(data));
