//! Framing: a `tokio-util` codec that cuts a byte stream into whole
//! LDAPMessages by their outer BER length and yields each as `Bytes` without
//! copying (a `split_to` + `freeze` of the read buffer).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio_util::codec::{Decoder, Encoder};

use super::ber::{self, BerError};

/// Default maximum size of one LDAPMessage (header included): 16 MiB.
pub const DEFAULT_MAX_PDU: usize = 16 * 1024 * 1024;

/// Why the stream could not be framed. Every variant except `Io` means the
/// peer does not speak (plain) LDAP any more: the session must end.
#[derive(Debug, Error)]
pub enum FrameError {
    /// An LDAPMessage must be a universal SEQUENCE (0x30).
    #[error("not an LDAPMessage: first octet 0x{0:02x}, expected SEQUENCE 0x30")]
    NotASequence(u8),
    /// The outer length could not be read.
    #[error("bad LDAPMessage length: {0}")]
    Ber(#[from] BerError),
    /// The declared length is over the configured maximum.
    #[error("LDAPMessage of {len} bytes is over the maximum PDU size of {max} bytes")]
    TooLarge {
        /// Declared total size (header + value).
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The peer closed the stream in the middle of a message.
    #[error("connection closed inside an LDAPMessage ({0} bytes of it received)")]
    TruncatedAtEof(usize),
    /// Reading the socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Cuts LDAPMessages out of a byte stream; encodes already-framed `Bytes` as is.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_pdu: usize,
    /// A maximum another task may change at any time (a session's limit
    /// rises when its bind succeeds, which the responses loop sees); read
    /// at each message header, so the first request after the bind response
    /// already gets the new limit.
    shared_max: Option<Arc<AtomicUsize>>,
}

impl FrameCodec {
    /// A codec refusing messages larger than `max_pdu` bytes.
    pub fn new(max_pdu: usize) -> Self {
        FrameCodec {
            max_pdu,
            shared_max: None,
        }
    }

    /// A codec whose maximum is whatever `max` holds when a header is read.
    pub fn with_shared_max(max: Arc<AtomicUsize>) -> Self {
        FrameCodec {
            max_pdu: 0,
            shared_max: Some(max),
        }
    }

    /// The maximum PDU size in force now.
    #[inline]
    pub fn max_pdu(&self) -> usize {
        match &self.shared_max {
            Some(m) => m.load(Ordering::Relaxed),
            None => self.max_pdu,
        }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_PDU)
    }
}

/// The length of the first complete message at the start of `buf`:
/// `Ok(Some(n))` when `buf[..n]` is one whole message, `Ok(None)` when more
/// bytes are needed. Shared by the codec, the fuzz targets and benchmarks.
#[inline]
pub fn frame_len(buf: &[u8], max_pdu: usize) -> Result<Option<usize>, FrameError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != 0x30 {
        return Err(FrameError::NotASequence(first));
    }
    let Some(h) = ber::read_header(buf)? else {
        return Ok(None);
    };
    let total = h.total_len();
    if total > max_pdu {
        return Err(FrameError::TooLarge {
            len: total,
            max: max_pdu,
        });
    }
    Ok((buf.len() >= total).then_some(total))
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = FrameError;

    #[inline]
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        // No reservation for the declared length: the buffer grows as bytes
        // really arrive, so a peer announcing 16 MiB and sending nothing
        // costs nothing.
        Ok(frame_len(src, self.max_pdu())?.map(|n| src.split_to(n).freeze()))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(FrameError::TruncatedAtEof(buf.len())),
        }
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = std::io::Error;

    #[inline]
    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(codec: &mut FrameCodec, buf: &mut BytesMut) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(f) = codec.decode(buf).unwrap() {
            out.push(f);
        }
        out
    }

    // Anonymous simple bind, message 1.
    const BIND: &[u8] = &[
        0x30, 0x0c, 0x02, 0x01, 0x01, 0x60, 0x07, 0x02, 0x01, 0x03, 0x04, 0x00, 0x80, 0x00,
    ];

    #[test]
    fn frames_pipelined_messages_byte_by_byte() {
        let mut codec = FrameCodec::default();
        let mut stream = BIND.to_vec();
        stream.extend_from_slice(BIND);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for &b in &stream {
            buf.extend_from_slice(&[b]);
            frames.extend(decode_all(&mut codec, &mut buf));
        }
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| f.as_ref() == BIND));
        assert!(buf.is_empty());
    }

    #[test]
    fn frames_are_views_of_the_read_buffer() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(BIND);
        let ptr = buf.as_ptr();
        let frame = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame.as_ptr(), ptr, "frame must not be a copy");
    }

    #[test]
    fn rejects_non_sequence_and_bad_lengths() {
        let mut codec = FrameCodec::new(100);
        for (bytes, want) in [
            (&b"GET / HTTP/1.1\r\n"[..], "NotASequence"),
            (&[0x30, 0x80, 0x00][..], "IndefiniteLength"),
            (&[0x30, 0x85, 1, 0, 0, 0, 0][..], "LengthTooLong"),
            (&[0x30, 0x64][..], "TooLarge"),
        ] {
            let err = codec.decode(&mut BytesMut::from(bytes)).unwrap_err();
            assert!(format!("{err:?}").contains(want), "{err:?} vs {want}");
        }
        // Exactly at the maximum is fine: 2 header octets + 98 value octets.
        let mut ok = vec![0x30, 0x62];
        ok.resize(100, 0);
        assert!(codec
            .decode(&mut BytesMut::from(&ok[..]))
            .unwrap()
            .is_some());
    }

    #[test]
    fn truncated_message_at_eof_is_an_error() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&BIND[..5]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(FrameError::TruncatedAtEof(5))
        ));
        assert!(codec.decode_eof(&mut BytesMut::new()).unwrap().is_none());
    }
}
