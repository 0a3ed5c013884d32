//! Framing invariants: see `abproxy::fuzzing::check_frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| abproxy::fuzzing::check_frame(data));
