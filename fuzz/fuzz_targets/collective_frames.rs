#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| yoco_fuzz::collective_frames::run(data));
