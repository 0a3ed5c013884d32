//! The client side of every measurement: a raw LDAP connection that sends
//! pre-encoded requests and reads response frames (abproxy's own frame
//! codec), and the time limits of requests and set-up.

use std::net::SocketAddr;
use std::time::Duration;

use abproxy::wire::{op, Envelope, FrameCodec};
use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;

use crate::workload::frame_into;

/// Longest wait for one response before the client gives up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest time to open (and bind) the connections of one point.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A raw LDAP connection: pre-encoded requests out, frames in.
pub struct Conn {
    pub stream: TcpStream,
    pub buf: BytesMut,
    pub codec: FrameCodec,
    pub out: Vec<u8>,
    pub next_id: i32,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            codec: FrameCodec::default(),
            out: Vec::with_capacity(512),
            next_id: 1,
        })
    }

    /// Connects and, with `bind`, sends that set-up bind (which must
    /// succeed), all within [`SETUP_TIMEOUT`].
    pub async fn connect_bound(addr: SocketAddr, bind: Option<&[u8]>) -> Result<Conn> {
        let setup = async {
            let mut c = Conn::connect(addr).await?;
            if let Some(b) = bind {
                c.call(b).await.context("set-up bind")?;
            }
            Ok(c)
        };
        tokio::time::timeout(SETUP_TIMEOUT, setup)
            .await
            .map_err(|_| anyhow!("connection set-up timed out"))?
    }

    /// Sends one request and reads up to its final response, which must be
    /// a success.
    pub async fn call(&mut self, op_tlv: &[u8]) -> Result<()> {
        let (env, _) = self.call_final(op_tlv).await?;
        match env.result_code {
            Some(0) => Ok(()),
            code => Err(anyhow!("{} result code {code:?}", op::name(env.op))),
        }
    }

    /// Sends one request and returns its final response, whatever its
    /// result code.
    pub async fn call_final(&mut self, op_tlv: &[u8]) -> Result<(Envelope, Bytes)> {
        let id = self.next_id;
        self.next_id = if id == i32::MAX { 1 } else { id + 1 };
        frame_into(&mut self.out, id, op_tlv);
        self.stream.write_all(&self.out).await?;
        loop {
            let (env, frame) = self.recv().await?;
            if env.msgid != id {
                bail!(
                    "response {} for message {} while waiting for {id}",
                    op::name(env.op),
                    env.msgid
                );
            }
            if op::is_final_response(env.op) {
                return Ok((env, frame));
            }
        }
    }

    /// Reads the next response frame.
    pub async fn recv(&mut self) -> Result<(Envelope, Bytes)> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                return Ok((Envelope::response(&frame)?, frame));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed by the server");
            }
        }
    }

    /// Appends a request with the next message ID to `batch` (to be sent
    /// with others in one write); returns its ID.
    pub fn push_request(&mut self, batch: &mut Vec<u8>, op_tlv: &[u8]) -> i32 {
        let id = self.next_id;
        self.next_id = if id == i32::MAX { 1 } else { id + 1 };
        frame_into(&mut self.out, id, op_tlv);
        batch.extend_from_slice(&self.out);
        id
    }

    pub async fn unbind(mut self) {
        frame_into(&mut self.out, self.next_id, &[op::UNBIND_REQUEST, 0x00]);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.stream.write_all(&self.out).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}
