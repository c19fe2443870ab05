//! libFuzzer's inputs to [`shardserve_fuzz::request`].
#![no_main]

libfuzzer_sys::fuzz_target!(|d: &[u8]| shardserve_fuzz::request(d));
