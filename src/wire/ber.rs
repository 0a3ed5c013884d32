//! A small, strict BER TLV reader: just enough to cut LDAP messages out of a
//! byte stream and to peek at their envelope.
//!
//! Why hand-written instead of `ldap3_proto` or `rasn`: measured on the target
//! machine, `ldap3_proto`'s codec decodes and re-encodes whole messages (not
//! byte-identical: paged-results criticality lost, TRUE rewritten, long-form
//! lengths shortened), caps PDUs at 32 KiB by default and errors on unknown
//! operations and non-UTF-8 DNs; `rasn-ldap` rejects valid traffic (result
//! codes 118 and 4096, scope 3, modify-increment). Both are 40-100x slower than
//! a direct TLV walk (about 40 ns vs 2 us per search request). The proxy
//! forwards the client's own bytes and only needs a handful of fields, so it
//! walks the TLVs itself. Everything it parses is bounded by the slice it is
//! given, and the reader is fuzzed (`fuzz/`).
//!
//! Rules (RFC 4511 section 5.1 restricts LDAP to these BER forms):
//! - definite lengths only (indefinite `0x80` is an error),
//! - at most 4 length octets (lengths up to 2^32-1; anything longer is an error),
//! - tag numbers above 30 (high-tag-number form) are accepted for skipping but
//!   never match an LDAP tag.

use thiserror::Error;

/// Why a TLV could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum BerError {
    /// Indefinite length (`0x80`), which LDAP forbids.
    #[error("indefinite BER length is not allowed in LDAP")]
    IndefiniteLength,
    /// More than 4 length octets (or the reserved `0xFF`).
    #[error("BER length uses {0} length octets (at most 4 allowed)")]
    LengthTooLong(u8),
    /// The value runs past the end of its enclosing element.
    #[error("BER element is truncated")]
    Truncated,
    /// A tag other than the one the grammar requires.
    #[error("unexpected BER tag 0x{found:02x} (expected {expected})")]
    UnexpectedTag {
        /// First identifier octet seen.
        found: u8,
        /// What was expected, for the message.
        expected: &'static str,
    },
    /// An INTEGER or ENUMERATED that is empty, too long or out of range.
    #[error("bad BER integer")]
    BadInteger,
    /// A high-tag-number identifier that never ends within 4 octets.
    #[error("BER tag too long")]
    TagTooLong,
}

/// The header of one TLV: identifier octet, header length and value length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The first identifier octet (class, constructed bit, tag number or 0x1F).
    pub tag: u8,
    /// Octets taken by identifier + length.
    pub header_len: usize,
    /// Octets of the value.
    pub len: usize,
}

impl Header {
    /// Header plus value.
    #[inline]
    pub fn total_len(&self) -> usize {
        self.header_len + self.len
    }
}

/// Reads a TLV header from the start of `buf`.
///
/// Returns `Ok(None)` when `buf` is too short to hold the whole header (more
/// bytes may arrive), an error when the header can never be valid.
#[inline]
pub fn read_header(buf: &[u8]) -> Result<Option<Header>, BerError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    let mut pos = 1;
    if tag & 0x1f == 0x1f {
        // High-tag-number form: base-128 octets, last one has bit 8 clear.
        loop {
            let Some(&b) = buf.get(pos) else {
                return Ok(None);
            };
            pos += 1;
            if b & 0x80 == 0 {
                break;
            }
            if pos > 4 {
                return Err(BerError::TagTooLong);
            }
        }
    }
    let Some(&first) = buf.get(pos) else {
        return Ok(None);
    };
    pos += 1;
    let len = if first < 0x80 {
        first as usize
    } else if first == 0x80 {
        return Err(BerError::IndefiniteLength);
    } else {
        let n = first & 0x7f;
        if n > 4 {
            return Err(BerError::LengthTooLong(n));
        }
        let n = n as usize;
        let Some(octets) = buf.get(pos..pos + n) else {
            return Ok(None);
        };
        pos += n;
        octets
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize)
    };
    Ok(Some(Header {
        tag,
        header_len: pos,
        len,
    }))
}

/// A cursor over the contents of one constructed element. All positions are
/// offsets into the original slice so callers can keep ranges, not copies.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

/// One complete TLV inside a [`Reader`]: its tag and the range of its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv {
    /// First identifier octet.
    pub tag: u8,
    /// Start of the value (offset in the reader's buffer).
    pub start: usize,
    /// End of the value (exclusive).
    pub end: usize,
}

impl Tlv {
    /// The value octets.
    #[inline]
    pub fn value<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start..self.end]
    }
}

impl<'a> Reader<'a> {
    /// A reader over `buf[start..end]` (offsets stay relative to `buf`).
    #[inline]
    pub fn new(buf: &'a [u8], start: usize, end: usize) -> Self {
        debug_assert!(start <= end && end <= buf.len());
        Reader {
            buf,
            pos: start,
            end,
        }
    }

    /// A reader over the value of `tlv`.
    #[inline]
    pub fn inside(buf: &'a [u8], tlv: Tlv) -> Self {
        Self::new(buf, tlv.start, tlv.end)
    }

    /// True when every element has been read.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    /// Identifier octet of the next element, if any.
    #[inline]
    pub fn peek_tag(&self) -> Option<u8> {
        if self.pos < self.end {
            Some(self.buf[self.pos])
        } else {
            None
        }
    }

    /// Reads the next complete element, which must end within this reader.
    #[inline]
    pub fn next_tlv(&mut self) -> Result<Tlv, BerError> {
        let h = read_header(&self.buf[self.pos..self.end])?.ok_or(BerError::Truncated)?;
        let start = self.pos + h.header_len;
        let end = start.checked_add(h.len).ok_or(BerError::Truncated)?;
        if end > self.end {
            return Err(BerError::Truncated);
        }
        self.pos = end;
        Ok(Tlv {
            tag: h.tag,
            start,
            end,
        })
    }

    /// Reads the next element and checks its identifier octet.
    #[inline]
    pub fn expect(&mut self, tag: u8, what: &'static str) -> Result<Tlv, BerError> {
        match self.peek_tag() {
            Some(t) if t == tag => self.next_tlv(),
            Some(found) => Err(BerError::UnexpectedTag {
                found,
                expected: what,
            }),
            None => Err(BerError::Truncated),
        }
    }

    /// Reads an element if its identifier octet is `tag`.
    #[inline]
    pub fn optional(&mut self, tag: u8) -> Result<Option<Tlv>, BerError> {
        if self.peek_tag() == Some(tag) {
            self.next_tlv().map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Decodes a non-negative BER INTEGER/ENUMERATED value of at most 4 value
/// octets plus a leading zero (range 0..=2^32-1 before any caller limit).
#[inline]
pub fn decode_unsigned(v: &[u8]) -> Result<u32, BerError> {
    match v {
        [] => Err(BerError::BadInteger),
        [first, ..] if first & 0x80 != 0 => Err(BerError::BadInteger),
        _ => {
            let v = if v.len() == 5 && v[0] == 0 {
                &v[1..]
            } else {
                v
            };
            if v.len() > 4 {
                return Err(BerError::BadInteger);
            }
            Ok(v.iter().fold(0u32, |acc, &b| (acc << 8) | b as u32))
        }
    }
}

/// Decodes a BER INTEGER of at most 8 octets as i64 (for result codes, which
/// the proxy only reports).
#[inline]
pub fn decode_signed(v: &[u8]) -> Result<i64, BerError> {
    if v.is_empty() || v.len() > 8 {
        return Err(BerError::BadInteger);
    }
    let init: i64 = if v[0] & 0x80 != 0 { -1 } else { 0 };
    Ok(v.iter().fold(init, |acc, &b| (acc << 8) | b as i64))
}

/// The octets after the first of a long-form length (`len` >= 0x80): the
/// value's big-endian bytes without leading zeros.
#[inline]
fn long_len_octets(len: usize) -> usize {
    (usize::BITS - len.leading_zeros()).div_ceil(8) as usize
}

/// Appends a definite BER length in the shortest form.
#[inline]
pub fn write_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let n = long_len_octets(len);
        out.push(0x80 | n as u8);
        out.extend_from_slice(&len.to_be_bytes()[std::mem::size_of::<usize>() - n..]);
    }
}

/// Appends one whole element: tag, length (shortest form) and value.
/// `#[inline]` (and `write_len`'s) also compiles it into a caller outside
/// this crate (the fuzz harness) rather than calling this crate's copy.
#[inline]
pub(crate) fn put_tlv(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    write_len(out, value.len());
    out.extend_from_slice(value);
}

/// The length of an element with a one-byte tag whose contents are `len`
/// bytes long: the tag, the length (shortest form, as [`write_len`]
/// writes it) and the contents.
#[inline]
pub(crate) fn tlv_len(len: usize) -> usize {
    let len_of_len = match len {
        0..0x80 => 1,
        _ => 1 + long_len_octets(len),
    };
    1 + len_of_len + len
}

/// One whole element, tag, length and value (tests build PDUs with it).
#[cfg(test)]
pub(crate) fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    put_tlv(&mut v, tag, value);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlv_len_is_what_put_tlv_writes() {
        for len in [0, 1, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x10000, 0x123456] {
            let mut v = Vec::new();
            put_tlv(&mut v, 0x04, &vec![0; len]);
            assert_eq!(tlv_len(len), v.len(), "{len}");
        }
    }

    #[test]
    fn short_and_long_lengths() {
        assert_eq!(
            read_header(&[0x30, 0x05]).unwrap(),
            Some(Header {
                tag: 0x30,
                header_len: 2,
                len: 5
            })
        );
        assert_eq!(
            read_header(&[0x30, 0x82, 0x01, 0x00]).unwrap().unwrap().len,
            256
        );
        // Non-minimal long form is valid BER and kept as is.
        assert_eq!(read_header(&[0x30, 0x81, 0x05]).unwrap().unwrap().len, 5);
        assert_eq!(
            read_header(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff])
                .unwrap()
                .unwrap()
                .len,
            0xffff_ffff
        );
    }

    #[test]
    fn incomplete_headers_ask_for_more() {
        assert_eq!(read_header(&[]).unwrap(), None);
        assert_eq!(read_header(&[0x30]).unwrap(), None);
        assert_eq!(read_header(&[0x30, 0x82, 0x01]).unwrap(), None);
        assert_eq!(read_header(&[0x3f, 0x81]).unwrap(), None);
    }

    #[test]
    fn forbidden_lengths() {
        assert_eq!(read_header(&[0x30, 0x80]), Err(BerError::IndefiniteLength));
        assert_eq!(
            read_header(&[0x30, 0x85, 0, 0, 0, 0, 1]),
            Err(BerError::LengthTooLong(5))
        );
        assert_eq!(
            read_header(&[0x30, 0xff]),
            Err(BerError::LengthTooLong(0x7f))
        );
        assert_eq!(
            read_header(&[0x3f, 0x81, 0x81, 0x81, 0x81, 0x01]),
            Err(BerError::TagTooLong)
        );
    }

    #[test]
    fn reader_stays_inside_its_element() {
        // SEQUENCE { INTEGER 5, OCTET STRING "ab" } followed by junk outside.
        let buf = [0x30, 0x07, 0x02, 0x01, 0x05, 0x04, 0x02, b'a', b'b', 0xff];
        let mut outer = Reader::new(&buf, 0, 9);
        let seq = outer.expect(0x30, "SEQUENCE").unwrap();
        assert!(outer.is_empty());
        let mut r = Reader::inside(&buf, seq);
        let i = r.expect(0x02, "INTEGER").unwrap();
        assert_eq!(decode_unsigned(i.value(&buf)).unwrap(), 5);
        assert_eq!(r.expect(0x04, "OCTET STRING").unwrap().value(&buf), b"ab");
        assert!(r.is_empty());
        assert_eq!(r.next_tlv(), Err(BerError::Truncated));
        // An inner length that overruns its parent is truncated.
        let bad = [0x30, 0x03, 0x04, 0x05, b'a'];
        let mut r = Reader::new(&bad, 2, 5);
        assert_eq!(r.next_tlv(), Err(BerError::Truncated));
    }

    #[test]
    fn integers() {
        assert_eq!(decode_unsigned(&[0x00]).unwrap(), 0);
        assert_eq!(
            decode_unsigned(&[0x7f, 0xff, 0xff, 0xff]).unwrap(),
            i32::MAX as u32
        );
        assert_eq!(
            decode_unsigned(&[0x00, 0xff, 0xff, 0xff, 0xff]).unwrap(),
            u32::MAX
        );
        assert_eq!(decode_unsigned(&[]), Err(BerError::BadInteger));
        assert_eq!(decode_unsigned(&[0x80]), Err(BerError::BadInteger));
        assert_eq!(decode_unsigned(&[1, 0, 0, 0, 0]), Err(BerError::BadInteger));
        assert_eq!(decode_signed(&[0xff]).unwrap(), -1);
        assert_eq!(decode_signed(&[0x10, 0x00]).unwrap(), 4096);
    }

    #[test]
    fn write_len_is_minimal() {
        for (len, want) in [
            (0usize, vec![0x00]),
            (127, vec![0x7f]),
            (128, vec![0x81, 0x80]),
            (65536, vec![0x83, 0x01, 0x00, 0x00]),
        ] {
            let mut v = Vec::new();
            write_len(&mut v, len);
            assert_eq!(v, want);
            let mut framed = vec![0x04];
            framed.extend_from_slice(&v);
            assert_eq!(read_header(&framed).unwrap().unwrap().len, len);
        }
    }
}
