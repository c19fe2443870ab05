//! libFuzzer's inputs to [`shardserve_fuzz::chat`].
#![no_main]

libfuzzer_sys::fuzz_target!(|d: &[u8]| shardserve_fuzz::chat(d));
