//! A session's two byte streams as LDAPMessages: [`FrameReader`] reads a
//! socket into a buffer and shows each whole message in place, and
//! [`FrameWriter`] collects messages and writes them out.
//!
//! The proxy's hot path forwards a message by copying its bytes from one
//! side's read buffer to the other side's write buffer, which it must do
//! anyway; the message itself becomes an owned `Bytes` only when it has to
//! outlive that (a request kept in the in-flight table, a queued request, a
//! held response). `tokio_util`'s `FramedRead`/`FramedWrite` with
//! [`FrameCodec`](super::FrameCodec) do the same job for the proxy's other
//! connections (root DSE discovery, the CLI); on the hot path their `Stream`
//! and `Sink` layers and an owned frame per message were about a tenth of
//! the proxy's instructions per operation (callgrind, `benches/callgrind`).
//! Both buffers start again at their beginning once empty, so a session
//! that exchanges small messages keeps reusing the same few cache lines.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use super::codec::{frame_len, FrameCodec, FrameError};

/// Initial read buffer size; it grows only as a larger message arrives.
const READ_CAPACITY: usize = 8 * 1024;
/// Below this much free space, the read buffer grows before reading.
const MIN_READ: usize = 1024;
/// An emptied write buffer that grew past this (a large message went
/// through) is given back and replaced by a new one of the initial size (the
/// read buffer: past its initial size), so an idle session holds little
/// memory whatever it carried before.
const SHRINK_ABOVE: usize = 64 * 1024;

/// Whole LDAPMessages read from a stream (the framing rules of
/// [`frame_len`]: definite lengths, the codec's maximum size).
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    codec: FrameCodec,
    eof: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of `io` with the size limit of `codec`.
    pub fn new(io: R, codec: FrameCodec) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(READ_CAPACITY),
            codec,
            eof: false,
        }
    }

    /// The length of the whole message at the start of the buffer, if one
    /// is there (no read).
    #[inline]
    pub fn buffered(&self) -> Result<Option<usize>, FrameError> {
        frame_len(&self.buf, self.codec.max_pdu())
    }

    /// Reads until a whole message is buffered and returns its length (see
    /// [`FrameReader::message`]); `None` when the stream ended cleanly
    /// between messages, [`FrameError::TruncatedAtEof`] inside one.
    pub fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<usize>, FrameError>> {
        loop {
            if let Some(n) = self.buffered()? {
                return Poll::Ready(Ok(Some(n)));
            }
            if self.eof {
                return Poll::Ready(match self.buf.len() {
                    0 => Ok(None),
                    n => Err(FrameError::TruncatedAtEof(n)),
                });
            }
            // (Not at every empty buffer: while a taken message is alive
            // the attempt fails, and each costs a call.)
            if self.buf.is_empty()
                && (self.buf.capacity() < READ_CAPACITY / 2 || self.buf.capacity() > READ_CAPACITY)
            {
                if self.buf.capacity() > READ_CAPACITY {
                    // It grew for a large message: give it back.
                    self.buf = BytesMut::with_capacity(READ_CAPACITY);
                } else {
                    // Back to the start of the allocation when no message
                    // taken from it is alive any more (no copy: it is
                    // empty).
                    let _ = self.buf.try_reclaim(READ_CAPACITY);
                }
            }
            if self.buf.capacity() - self.buf.len() < MIN_READ {
                self.buf.reserve(READ_CAPACITY);
            }
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut self.buf
            ))?;
            if n == 0 {
                self.eof = true;
            }
        }
    }

    /// Waits for the next whole message (see [`FrameReader::poll_message`]).
    pub async fn next_message(&mut self) -> Result<Option<usize>, FrameError> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    /// The first `len` buffered bytes: the message [`poll_message`]
    /// (`FrameReader::poll_message`) measured.
    #[inline]
    pub fn message(&self, len: usize) -> &[u8] {
        &self.buf[..len]
    }

    /// Removes the first `len` bytes and returns them as an owned message
    /// (a view of the buffer, no copy).
    #[inline]
    pub fn take(&mut self, len: usize) -> Bytes {
        self.buf.split_to(len).freeze()
    }

    /// Removes the first `len` bytes (a message already copied elsewhere).
    #[inline]
    pub fn skip(&mut self, len: usize) {
        self.buf.advance(len);
    }

    /// Bytes read but not yet taken.
    pub fn read_buffer(&self) -> &[u8] {
        &self.buf
    }
}

/// Messages collected in a buffer and written to a stream. The buffer has a
/// backpressure boundary: [`FrameWriter::append`] refuses a message while
/// the buffer holds that much, and the caller flushes first.
#[derive(Debug)]
pub struct FrameWriter<W> {
    io: W,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    written: usize,
    boundary: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer to `io` with a backpressure boundary of `boundary` bytes.
    pub fn new(io: W, boundary: usize) -> Self {
        FrameWriter {
            io,
            buf: Vec::with_capacity(READ_CAPACITY),
            written: 0,
            boundary,
        }
    }

    /// Appends a message unless the buffer is at its boundary (then
    /// `false`: flush, then append).
    #[inline]
    pub fn append(&mut self, msg: &[u8]) -> bool {
        if self.buf.len() - self.written < self.boundary {
            self.buf.extend_from_slice(msg);
            true
        } else {
            false
        }
    }

    /// Appends a message whatever the buffer holds (a few PDUs the proxy
    /// writes as a session ends).
    pub fn append_always(&mut self, msg: &[u8]) {
        self.buf.extend_from_slice(msg);
    }

    /// Nothing waits to be written.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.buf.len() == self.written
    }

    /// Writes the whole buffer (then flushes the stream, which a TLS stream
    /// needs); the buffer starts again at its beginning.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        if self.buf.capacity() > SHRINK_ABOVE {
            self.buf = Vec::with_capacity(READ_CAPACITY);
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Writes the whole buffer (see [`FrameWriter::poll_flush`]).
    pub async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Appends a message, writing the buffer out first if it is at its
    /// boundary.
    pub async fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        if !self.append(msg) {
            self.flush().await?;
            self.append_always(msg);
        }
        Ok(())
    }

    /// The stream (to shut it down).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.io
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    // Anonymous simple bind, message 1.
    const BIND: &[u8] = &[
        0x30, 0x0c, 0x02, 0x01, 0x01, 0x60, 0x07, 0x02, 0x01, 0x03, 0x04, 0x00, 0x80, 0x00,
    ];

    #[tokio::test]
    async fn reads_messages_split_anywhere_then_eof() {
        let (mut tx, rx) = tokio::io::duplex(4);
        let writer = tokio::spawn(async move {
            for b in BIND.iter().chain(BIND) {
                tx.write_all(&[*b]).await.unwrap();
            }
        });
        let mut r = FrameReader::new(rx, FrameCodec::default());
        let n = r.next_message().await.unwrap().unwrap();
        assert_eq!(r.message(n), BIND);
        let first = r.take(n);
        let n = r.next_message().await.unwrap().unwrap();
        assert_eq!(r.message(n), BIND);
        r.skip(n);
        writer.await.unwrap();
        assert!(r.next_message().await.unwrap().is_none());
        assert_eq!(
            &first[..],
            BIND,
            "a taken message outlives the buffer's reuse"
        );
    }

    #[tokio::test]
    async fn eof_inside_a_message_is_an_error() {
        let (mut tx, rx) = tokio::io::duplex(64);
        tx.write_all(&BIND[..5]).await.unwrap();
        drop(tx);
        let mut r = FrameReader::new(rx, FrameCodec::default());
        assert!(matches!(
            r.next_message().await,
            Err(FrameError::TruncatedAtEof(5))
        ));
    }

    #[tokio::test]
    async fn framing_errors_and_the_size_limit() {
        let (mut tx, rx) = tokio::io::duplex(64);
        tx.write_all(&[0x30, 0x64]).await.unwrap();
        let mut r = FrameReader::new(rx, FrameCodec::new(100));
        assert!(matches!(
            r.next_message().await,
            Err(FrameError::TooLarge { len: 102, max: 100 })
        ));
        let (mut tx, rx) = tokio::io::duplex(64);
        tx.write_all(b"GET /").await.unwrap();
        let mut r = FrameReader::new(rx, FrameCodec::default());
        assert!(matches!(
            r.next_message().await,
            Err(FrameError::NotASequence(b'G'))
        ));
    }

    /// A message of `n` bytes in all (a SEQUENCE of filler octets).
    fn filler(n: usize) -> Vec<u8> {
        let mut v = vec![0x30, 0x82, ((n - 4) >> 8) as u8, (n - 4) as u8];
        v.resize(n, 0x04);
        v
    }

    #[tokio::test]
    async fn reuses_the_start_of_an_emptied_buffer() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut r = FrameReader::new(rx, FrameCodec::default());
        // Past half of the buffer, the next read starts again at its
        // beginning.
        tx.write_all(&filler(READ_CAPACITY / 2 + 100))
            .await
            .unwrap();
        let n = r.next_message().await.unwrap().unwrap();
        let start = r.message(n).as_ptr();
        r.skip(n);
        tx.write_all(BIND).await.unwrap();
        let n = r.next_message().await.unwrap().unwrap();
        assert_eq!(r.message(n).as_ptr(), start);
        // A taken message still alive: the buffer moves on, the message
        // stays intact.
        let kept = r.take(n);
        tx.write_all(&filler(READ_CAPACITY / 2 + 100))
            .await
            .unwrap();
        let n = r.next_message().await.unwrap().unwrap();
        r.skip(n);
        tx.write_all(BIND).await.unwrap();
        let n = r.next_message().await.unwrap().unwrap();
        assert_ne!(r.message(n).as_ptr(), start);
        assert_eq!(&kept[..], BIND);
    }

    #[tokio::test]
    async fn buffers_shrink_after_a_large_message() {
        let big = {
            let mut v = vec![0x30, 0x83, 0x01, 0x00, 0x00];
            v.resize(5 + 0x10000, 0x04);
            v
        };
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut r = FrameReader::new(rx, FrameCodec::default());
        tx.write_all(&big).await.unwrap();
        let n = r.next_message().await.unwrap().unwrap();
        assert_eq!(n, big.len());
        assert!(r.buf.capacity() >= big.len());
        let (out, _keep) = tokio::io::duplex(1 << 20);
        let mut w = FrameWriter::new(out, 1 << 20);
        w.send(r.message(n)).await.unwrap();
        r.skip(n);
        w.flush().await.unwrap();
        assert_eq!(w.buf.capacity(), READ_CAPACITY);
        tx.write_all(BIND).await.unwrap();
        let n = r.next_message().await.unwrap().unwrap();
        assert_eq!(r.message(n), BIND);
        assert!(r.buf.capacity() <= READ_CAPACITY, "{}", r.buf.capacity());
    }

    #[tokio::test]
    async fn writer_boundary_and_flush() {
        let (tx, mut rx) = tokio::io::duplex(1024);
        let mut w = FrameWriter::new(tx, BIND.len() * 2);
        assert!(w.append(BIND));
        assert!(w.append(BIND));
        assert!(!w.append(BIND), "at the boundary");
        w.send(BIND).await.unwrap();
        assert!(!w.is_empty());
        w.flush().await.unwrap();
        assert!(w.is_empty());
        let mut got = vec![0u8; BIND.len() * 3];
        tokio::io::AsyncReadExt::read_exact(&mut rx, &mut got)
            .await
            .unwrap();
        assert_eq!(got, [BIND, BIND, BIND].concat());
    }
}
