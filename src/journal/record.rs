//! The journal's on-disk format: segment headers and records.
//!
//! Hand-written rather than derived with serde: this is a file format that
//! must stay readable by later versions of abproxy, so every byte is
//! spelled out here, not implied by a struct's field order; and a record is
//! mostly the client's own request bytes, which are stored as they came.
//!
//! ```text
//! segment  = header record*
//! header   = "ABPXJRNL" version:u32 0:u32 first_seq:u64 created_us:i64   (32 bytes)
//! record   = len:u32 crc:u32 body                 crc = CRC-32 (IEEE) of body
//! body     = kind:u8 seq:u64 time_us:i64 conn:u64 fields
//! Start    (0) = version:str pid:u32
//! Intent   (1) = identity:str request:bytes
//! Outcome  (2) = intent:u64 result:i32 response:bytes   (result -1: none read)
//! Lost     (3) = intent:u64 why:str
//! Cut      (4) = freeze_id:u64 count:u32 suffix:str*
//! str, bytes   = len:u32 octets
//! ```
//! All integers little-endian; times are microseconds since the Unix epoch.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The first bytes of every segment.
pub const MAGIC: &[u8; 8] = b"ABPXJRNL";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Length of a segment header.
pub const HEADER_LEN: usize = 32;
/// Length of a record's frame (length and checksum) before its body.
pub const FRAME_LEN: usize = 8;
/// The largest body a reader accepts: above it, the length is damage.
/// (A request is at most `max_pdu_bytes`, itself at most 64 MiB.)
pub const MAX_BODY: usize = 160 * 1024 * 1024;

/// A segment's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The sequence number of the segment's first record.
    pub first_seq: u64,
    /// When the segment was created (µs since the epoch).
    pub created_us: i64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&self.first_seq.to_le_bytes());
        h[24..32].copy_from_slice(&self.created_us.to_le_bytes());
        h
    }

    pub fn decode(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_LEN {
            return Err(format!("{} bytes, too short for a header", b.len()));
        }
        if &b[..8] != MAGIC {
            return Err("not an abproxy journal segment (bad magic)".into());
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(format!(
                "journal format version {version}; this abproxy reads {VERSION}"
            ));
        }
        Ok(Header {
            first_seq: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            created_us: i64::from_le_bytes(b[24..32].try_into().expect("8 bytes")),
        })
    }
}

/// One journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its sequence number: one more than the record before it.
    pub seq: u64,
    /// When it was written (µs since the epoch).
    pub time_us: i64,
    /// The client connection (0 for records of the proxy itself).
    pub conn: u64,
    pub body: Body,
}

/// What a record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// The proxy started writing to the journal: writes of an earlier run
    /// still without an outcome can no longer get one.
    Start { version: String, pid: u32 },
    /// A write request went upstream: the client's own bytes, and the
    /// session's identity when it was sent ("" anonymous).
    Intent { identity: String, request: Vec<u8> },
    /// The server's final response to the write of record `intent`.
    Outcome {
        intent: u64,
        /// Its resultCode; -1 when it had none the proxy could read.
        result: i32,
        response: Vec<u8>,
    },
    /// The write of record `intent` will get no response through this
    /// proxy (the connection was lost): the server may have run it or not.
    Lost { intent: u64, why: String },
    /// A freeze's backends were frozen and drained: every write whose
    /// intent is before this record is in a backup taken during the
    /// freeze, none after it.
    Cut {
        freeze_id: u64,
        suffixes: Vec<String>,
    },
}

impl Body {
    fn kind(&self) -> u8 {
        match self {
            Body::Start { .. } => 0,
            Body::Intent { .. } => 1,
            Body::Outcome { .. } => 2,
            Body::Lost { .. } => 3,
            Body::Cut { .. } => 4,
        }
    }

    /// The record kind's name, as `journal show` prints it.
    pub fn name(&self) -> &'static str {
        match self {
            Body::Start { .. } => "start",
            Body::Intent { .. } => "intent",
            Body::Outcome { .. } => "outcome",
            Body::Lost { .. } => "lost",
            Body::Cut { .. } => "cut",
        }
    }
}

/// Microseconds since the epoch, now.
pub fn now_us() -> i64 {
    to_us(SystemTime::now())
}

pub fn to_us(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

pub fn from_us(us: i64) -> SystemTime {
    if us >= 0 {
        UNIX_EPOCH + Duration::from_micros(us as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

impl Record {
    /// Appends the record (frame and body) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; FRAME_LEN]);
        out.push(self.body.kind());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.time_us.to_le_bytes());
        out.extend_from_slice(&self.conn.to_le_bytes());
        match &self.body {
            Body::Start { version, pid } => {
                put_bytes(out, version.as_bytes());
                out.extend_from_slice(&pid.to_le_bytes());
            }
            Body::Intent { identity, request } => {
                put_bytes(out, identity.as_bytes());
                put_bytes(out, request);
            }
            Body::Outcome {
                intent,
                result,
                response,
            } => {
                out.extend_from_slice(&intent.to_le_bytes());
                out.extend_from_slice(&result.to_le_bytes());
                put_bytes(out, response);
            }
            Body::Lost { intent, why } => {
                out.extend_from_slice(&intent.to_le_bytes());
                put_bytes(out, why.as_bytes());
            }
            Body::Cut {
                freeze_id,
                suffixes,
            } => {
                out.extend_from_slice(&freeze_id.to_le_bytes());
                out.extend_from_slice(&(suffixes.len() as u32).to_le_bytes());
                for s in suffixes {
                    put_bytes(out, s.as_bytes());
                }
            }
        }
        let body = &out[start + FRAME_LEN..];
        let len = (body.len() as u32).to_le_bytes();
        let crc = crc32fast::hash(body).to_le_bytes();
        out[start..start + 4].copy_from_slice(&len);
        out[start + 4..start + 8].copy_from_slice(&crc);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

/// Why the bytes at an offset are not a whole, intact record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// Fewer bytes than the frame says (a write cut short).
    Short { have: usize, need: usize },
    /// The length is beyond any record.
    Length(usize),
    /// The checksum does not match the body.
    Checksum,
    /// Checksum right, content not a record of this format.
    Body(String),
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Short { have, need } => write!(f, "{have} of {need} bytes (cut short)"),
            Damage::Length(n) => write!(f, "impossible record length {n}"),
            Damage::Checksum => write!(f, "checksum mismatch"),
            Damage::Body(m) => write!(f, "malformed record: {m}"),
        }
    }
}

/// Reads the record at the start of `b`: the record and its length.
pub fn decode(b: &[u8]) -> Result<(Record, usize), Damage> {
    if b.len() < FRAME_LEN {
        return Err(Damage::Short {
            have: b.len(),
            need: FRAME_LEN,
        });
    }
    let len = u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as usize;
    // 25: a body's fixed fields (kind, seq, time, conn).
    if !(25..=MAX_BODY).contains(&len) {
        return Err(Damage::Length(len));
    }
    let need = FRAME_LEN + len;
    if b.len() < need {
        return Err(Damage::Short {
            have: b.len(),
            need,
        });
    }
    let crc = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
    let body = &b[FRAME_LEN..need];
    if crc32fast::hash(body) != crc {
        return Err(Damage::Checksum);
    }
    let record = parse_body(body).map_err(Damage::Body)?;
    Ok((record, need))
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| format!("field of {n} bytes past the end"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?).map_err(|_| "a text field is not UTF-8".to_string())
    }
}

fn parse_body(b: &[u8]) -> Result<Record, String> {
    let mut c = Cursor { b, at: 0 };
    let kind = c.take(1)?[0];
    let seq = c.u64()?;
    let time_us = c.i64()?;
    let conn = c.u64()?;
    let body = match kind {
        0 => Body::Start {
            version: c.string()?,
            pid: c.u32()?,
        },
        1 => Body::Intent {
            identity: c.string()?,
            request: c.bytes()?,
        },
        2 => Body::Outcome {
            intent: c.u64()?,
            result: c.u32()? as i32,
            response: c.bytes()?,
        },
        3 => Body::Lost {
            intent: c.u64()?,
            why: c.string()?,
        },
        4 => {
            let freeze_id = c.u64()?;
            let n = c.u32()? as usize;
            let mut suffixes = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                suffixes.push(c.string()?);
            }
            Body::Cut {
                freeze_id,
                suffixes,
            }
        }
        k => return Err(format!("unknown record kind {k}")),
    };
    if c.at != b.len() {
        return Err(format!("{} bytes after the record", b.len() - c.at));
    }
    Ok(Record {
        seq,
        time_us,
        conn,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds() -> Vec<Record> {
        let r = |seq, body| Record {
            seq,
            time_us: 1_700_000_000_000_000 + seq as i64,
            conn: seq * 3,
            body,
        };
        vec![
            r(
                1,
                Body::Start {
                    version: "0.1.0".into(),
                    pid: 42,
                },
            ),
            r(
                2,
                Body::Intent {
                    identity: "cn=admin,dc=example,dc=org".into(),
                    request: vec![0x30, 0x05, 0x02, 0x01, 0x01, 0x4a, 0x00],
                },
            ),
            r(
                3,
                Body::Outcome {
                    intent: 2,
                    result: -1,
                    response: vec![1, 2, 3],
                },
            ),
            r(
                4,
                Body::Lost {
                    intent: 2,
                    why: "connection lost".into(),
                },
            ),
            r(
                5,
                Body::Cut {
                    freeze_id: 7,
                    suffixes: vec!["dc=example,dc=org".into(), "dc=é".into()],
                },
            ),
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        let mut buf = Vec::new();
        for r in all_kinds() {
            r.encode_into(&mut buf);
        }
        let mut at = 0;
        let mut back = Vec::new();
        while at < buf.len() {
            let (r, n) = decode(&buf[at..]).unwrap();
            back.push(r);
            at += n;
        }
        assert_eq!(back, all_kinds());
    }

    #[test]
    fn damage_is_found_not_misread() {
        let one = all_kinds()[1].encode();
        for cut in 0..one.len() {
            assert!(
                matches!(decode(&one[..cut]), Err(Damage::Short { .. })),
                "cut at {cut}"
            );
        }
        // Any flipped bit of the body fails the checksum.
        for i in FRAME_LEN..one.len() {
            let mut bad = one.clone();
            bad[i] ^= 0x10;
            assert_eq!(decode(&bad).unwrap_err(), Damage::Checksum, "byte {i}");
        }
        let mut huge = one.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), Err(Damage::Length(_))));
        // Zeroes (a preallocated or zero-filled tail) are not a record.
        assert!(matches!(decode(&[0u8; 64]), Err(Damage::Length(0))));
    }

    #[test]
    fn header_round_trips_and_rejects_others() {
        let h = Header {
            first_seq: 1234,
            created_us: -5,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut other = h.encode();
        other[0] = b'X';
        assert!(Header::decode(&other).unwrap_err().contains("magic"));
        let mut newer = h.encode();
        newer[8] = 2;
        assert!(Header::decode(&newer).unwrap_err().contains("version 2"));
        assert!(Header::decode(&h.encode()[..31]).is_err());
    }

    #[test]
    fn times_convert_both_ways() {
        for us in [0, 1, -1, 1_700_000_000_123_456] {
            assert_eq!(to_us(from_us(us)), us);
        }
    }
}
