//! Session invariants (a client byte stream, a scripted upstream and freezes
//! through the real session and gate): see `abproxy::fuzzing::check_session`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| abproxy::fuzzing::check_session(data));
