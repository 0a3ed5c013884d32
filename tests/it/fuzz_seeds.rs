//! Replays the committed fuzz seed corpus (`fuzz/seeds/<target>/`) through
//! the same invariant checks the fuzz targets run, on stable, in every
//! `cargo test`. A crash input found by fuzzing is committed there too.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "{} breaks an invariant", path.display());
        n += 1;
    }
    assert!(n > 10, "{target}: only {n} seeds");
}

#[test]
fn frame_seeds() {
    replay("frame", abproxy::fuzzing::check_frame);
}

#[test]
fn envelope_seeds() {
    replay("envelope", abproxy::fuzzing::check_envelope);
}

#[test]
fn allow_backup_seeds() {
    replay("allow_backup", abproxy::fuzzing::check_allow_backup);
}

#[test]
fn session_seeds() {
    replay("session", abproxy::fuzzing::check_session);
}

/// Turns client streams recorded by `tests/it/support/record.rs` into seeds:
///
/// ```text
/// ABPROXY_RECORD_DIR=/tmp/rec cargo test --test it -- ldap_utils:: freeze:: ...
/// ABPROXY_RECORD_DIR=/tmp/rec cargo test --test it -- --ignored import_recorded_seeds
/// ```
///
/// `envelope` gets single messages, `frame` and `session` whole streams (the
/// first 4 KiB), each kept only if it brings a new shape (operations,
/// extended operation and control OIDs), at most `PER_TARGET` per target.
#[test]
#[ignore = "needs ABPROXY_RECORD_DIR with recorded traffic"]
fn import_recorded_seeds() {
    use abproxy::wire::{Envelope, FrameCodec};
    use bytes::BytesMut;
    use std::collections::HashSet;
    use tokio_util::codec::Decoder;

    const PER_TARGET: usize = 60;
    const MAX_STREAM: usize = 4096;

    let dir = std::env::var_os("ABPROXY_RECORD_DIR").expect("ABPROXY_RECORD_DIR");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    // One message's shape: operation, extended OID, control OIDs.
    let shape = |f: &[u8]| -> Vec<u8> {
        let mut s = Vec::new();
        if let Ok(env) = Envelope::request(f) {
            s.push(env.op);
            s.extend_from_slice(env.oid_bytes(f).unwrap_or_default());
            for c in env.controls(f) {
                s.push(b'|');
                s.extend_from_slice(c.oid);
            }
        } else {
            s.push(0);
        }
        s
    };
    let frames_of = |stream: &[u8]| {
        let mut codec = FrameCodec::new(1 << 20);
        let mut buf = BytesMut::from(stream);
        let mut out = Vec::new();
        while let Ok(Some(f)) = codec.decode(&mut buf) {
            out.push(f);
        }
        out
    };
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let write = |target: &str, data: &[u8]| {
        let mut h = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(data, &mut h);
        let name = format!("rec-{:016x}", std::hash::Hasher::finish(&h));
        std::fs::write(seeds.join(target).join(name), data).unwrap();
    };
    let (mut single, mut streams) = (HashSet::new(), HashSet::new());
    let (mut n_env, mut n_stream) = (0, 0);
    for path in paths {
        let data = std::fs::read(&path).unwrap();
        let stream = &data[..data.len().min(MAX_STREAM)];
        let frames = frames_of(stream);
        for f in &frames {
            if n_env < PER_TARGET && f.len() <= MAX_STREAM && single.insert(shape(f)) {
                write("envelope", f);
                n_env += 1;
            }
        }
        let whole: usize = frames.iter().map(|f| f.len()).sum();
        let sequence: Vec<Vec<u8>> = frames.iter().map(|f| shape(f)).collect();
        if n_stream < PER_TARGET && !frames.is_empty() && streams.insert(sequence) {
            write("frame", &stream[..whole]);
            // Alternate readonly and stop mode for dc=example,dc=org.
            let flags = (n_stream % 2) as u8;
            if let Some(seed) = abproxy::fuzzing::session_seed(&stream[..whole], flags) {
                write("session", &seed);
            }
            n_stream += 1;
        }
    }
    println!("{n_env} envelope seeds, {n_stream} frame and session seeds");
}
