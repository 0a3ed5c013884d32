//! The invariants the fuzz targets check, as plain functions, so that
//! `cargo test` replays the committed seed corpus (`fuzz/seeds/`) on stable
//! and the fuzzers (`fuzz/`, nightly) run exactly the same checks. Each
//! function panics when an invariant breaks.

mod script;
mod session;

pub use script::generated_inputs;
pub use session::{check_session, describe_session_input, session_runtimes_built, session_seed};

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::wire::{Envelope, FrameCodec};

/// Frame size limit used by the framing check.
const MAX: usize = 64 * 1024;

fn frames(chunks: &[&[u8]]) -> (Vec<bytes::Bytes>, bool) {
    let mut codec = FrameCodec::new(MAX);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => out.push(f),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

/// Framing: a stream cut anywhere gives the same frames as when it arrives
/// at once; every frame is a whole message within the limit, in order.
pub fn check_frame(data: &[u8]) {
    let (whole, whole_err) = frames(&[data]);
    let split_at = data.first().copied().unwrap_or(0) as usize % (data.len() + 1);
    let (a, b) = data.split_at(split_at);
    let (split, split_err) = frames(&[a, b]);
    assert_eq!(whole, split);
    assert_eq!(whole_err, split_err);
    let mut consumed = 0;
    for f in &whole {
        assert!(f.len() <= MAX);
        assert_eq!(f[0], 0x30);
        assert_eq!(&data[consumed..consumed + f.len()], &f[..]);
        consumed += f.len();
    }
}

/// Envelope peek: never panics, every range it reports lies inside the
/// frame (so later slicing cannot panic either), and the tag-only peek
/// (`Envelope::op_of`) agrees with the full read.
pub fn check_envelope(data: &[u8]) {
    let tag = Envelope::op_of(data);
    for env in [Envelope::request(data), Envelope::response(data)]
        .into_iter()
        .flatten()
    {
        assert_eq!(tag, Some(env.op), "op_of disagrees with the envelope");
    }
    for env in [Envelope::request(data), Envelope::response(data)]
        .into_iter()
        .flatten()
    {
        assert!(env.msgid >= 0);
        let _ = env.dn_bytes(data);
        let _ = env.new_superior_bytes(data);
        let _ = env.oid_bytes(data);
        let _ = env.value_bytes(data);
        let _ = env.sasl_mechanism_bytes(data);
        for c in env.controls(data) {
            let _ = (c.oid, c.critical, c.value);
        }
    }
}

/// Allow-Backup values: whatever decodes re-encodes to a value that decodes
/// to the same thing.
pub fn check_allow_backup(data: &[u8]) {
    use abproxy_proto::{decode_request, decode_status, encode_request, encode_status};
    if let Ok(req) = decode_request(data) {
        let again = decode_request(&encode_request(&req)).expect("re-encoded request decodes");
        assert_eq!(req, again);
    }
    if let Ok(st) = decode_status(data) {
        let again = decode_status(&encode_status(&st)).expect("re-encoded status decodes");
        assert_eq!(st, again);
    }
}
