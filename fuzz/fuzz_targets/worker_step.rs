#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| yoco_fuzz::worker_step::run(data));
