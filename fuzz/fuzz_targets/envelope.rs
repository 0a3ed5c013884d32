//! Envelope peek invariants: see `abproxy::fuzzing::check_envelope`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| abproxy::fuzzing::check_envelope(data));
