//! Framing: any byte stream, cut at any points, yields the same frames as
//! when it arrives at once; every frame is a prefix-free whole message within
//! the size limit; nothing panics.
#![no_main]

use abproxy::wire::FrameCodec;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

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

fuzz_target!(|data: &[u8]| {
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
});
