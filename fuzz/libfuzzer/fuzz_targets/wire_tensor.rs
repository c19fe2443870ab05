//! libFuzzer's inputs to [`shardserve_fuzz::wire_tensor`].
#![no_main]

libfuzzer_sys::fuzz_target!(|d: &[u8]| shardserve_fuzz::wire_tensor(d));
