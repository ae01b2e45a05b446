#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| yoco_fuzz::snapshot_file::run(data));
