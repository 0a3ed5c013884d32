//! Allow-Backup value invariants: see `abproxy::fuzzing::check_allow_backup`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| abproxy::fuzzing::check_allow_backup(data));
