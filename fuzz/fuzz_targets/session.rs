//! Session invariants (a client byte stream, a scripted upstream and freezes
//! through the real session and gate): see `abproxy::fuzzing::check_session`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| abproxy::fuzzing::check_session(data));

/// The check allocates per message, per task and per freeze: glibc's malloc
/// and free were a quarter of an execution's time (docs/fuzzing.md). This
/// target has no sanitizer, so no sanitizer's allocator is bypassed.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
