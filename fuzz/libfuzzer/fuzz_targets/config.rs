//! libFuzzer's inputs to [`shardserve_fuzz::config`].
#![no_main]

libfuzzer_sys::fuzz_target!(|d: &[u8]| shardserve_fuzz::config(d));
