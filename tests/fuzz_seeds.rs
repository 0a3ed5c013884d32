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
