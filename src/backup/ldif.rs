//! LDIF content records (RFC 2849): a reader and a writer.
//!
//! Hand-written on purpose: the backup's digest reads what `slapcat`,
//! `ldapsearch` and 389's exports print, and needs exact bytes, line numbers
//! in its errors and a bound on what one record may take. No Rust LDIF crate
//! we could find is kept up and does this (the crates for LDAP parse the
//! protocol's BER, not LDIF; `ldap3` has no LDIF reader), and the part of
//! RFC 2849 needed here is small: content records, folding, comments, the
//! version line, base64 values.
//!
//! Read: `dn:` / `dn::` (base64), attribute lines `name: value`,
//! `name:: base64` and `name:< url` (refused: a backup does not fetch
//! URLs), folded lines (a line starting with one space continues the one
//! before), `#` comments (folded too), an optional `version: 1` first,
//! records separated by blank lines, attribute options (`;binary`,
//! `;lang-de`) kept in the name. Change records (`changetype:`) are refused.
//! Every error names its line.
//!
//! Written: a value is base64 when RFC 2849 requires it (it begins with a
//! space, `:` or `<`, ends with a space, or has a NUL, CR, LF or a byte
//! beyond ASCII), and lines fold at 76 columns.

use std::io::{BufRead, Read, Write};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// One entry: its DN as written and its attributes in the order first seen,
/// each with its values (lines of the same name, ASCII case aside, are one
/// attribute).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    pub dn: String,
    pub attrs: Vec<(String, Vec<Vec<u8>>)>,
}

impl Entry {
    /// An entry with no attributes.
    pub fn new(dn: impl Into<String>) -> Entry {
        Entry {
            dn: dn.into(),
            attrs: Vec::new(),
        }
    }

    /// Adds a value to `attr` (to the attribute of that name, ASCII case
    /// aside, when there is one).
    pub fn push(&mut self, attr: &str, value: impl Into<Vec<u8>>) {
        let value = value.into();
        match self
            .attrs
            .iter_mut()
            .find(|(name, _)| name.eq_ignore_ascii_case(attr))
        {
            Some((_, values)) => values.push(value),
            None => self.attrs.push((attr.to_string(), vec![value])),
        }
    }

    /// Builder form of [`Entry::push`].
    pub fn with(mut self, attr: &str, value: impl Into<Vec<u8>>) -> Entry {
        self.push(attr, value);
        self
    }
}

/// Largest record the reader takes by default (its LDIF text, folded lines
/// and comments included): 64 MiB.
pub const DEFAULT_MAX_RECORD: usize = 64 << 20;

/// Why the LDIF could not be read, and where (1-based line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct Error {
    pub line: usize,
    pub what: ErrorKind,
}

/// What is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    #[error("reading the input: {0}")]
    Io(String),
    #[error("a continuation line (starting with a space) with no line before it to continue")]
    ContinuationFirst,
    #[error("the record does not start with `dn:` (found `{0}`)")]
    NoDn(String),
    #[error("a second `dn:` in one record (records are separated by a blank line)")]
    SecondDn,
    #[error("no `:` after the attribute name")]
    NoColon,
    #[error("invalid attribute description `{0}`")]
    BadName(String),
    #[error("invalid base64 value: {0}")]
    Base64(String),
    #[error("the DN is not UTF-8")]
    DnNotUtf8,
    #[error("`{0}:<` names a URL; values from URLs are not read")]
    Url(String),
    #[error("unsupported LDIF version `{0}` (only 1)")]
    Version(String),
    #[error("a change record (`{0}:`); only content records are read")]
    ChangeRecord(String),
    #[error("the record starting here is larger than {0} bytes")]
    TooLarge(usize),
}

/// A line's number (its first physical line's) and its bytes.
type Line = (usize, Vec<u8>);

/// Reads LDIF content records one at a time from a [`BufRead`].
pub struct Reader<R> {
    input: R,
    max_record: usize,
    /// Number of the last line read.
    line: usize,
    /// Whether the first non-comment line was looked at (for `version:`).
    started: bool,
    done: bool,
}

/// Reads every entry of an LDIF text.
pub fn read(text: &str) -> Result<Vec<Entry>, Error> {
    Reader::new(text.as_bytes()).collect()
}

impl<R: BufRead> Reader<R> {
    /// A reader with the default record bound ([`DEFAULT_MAX_RECORD`]).
    pub fn new(input: R) -> Reader<R> {
        Reader::with_limit(input, DEFAULT_MAX_RECORD)
    }

    /// A reader that refuses a record larger than `max_record` bytes.
    pub fn with_limit(input: R, max_record: usize) -> Reader<R> {
        Reader {
            input,
            max_record,
            line: 0,
            started: false,
            done: false,
        }
    }

    /// The next physical line, without its line end; a line longer than
    /// `limit` bytes is cut just past that (for the caller to refuse), so
    /// nothing unbounded is read. `None` at the end.
    fn physical(&mut self, limit: usize) -> Result<Option<Line>, Error> {
        let mut buf = Vec::new();
        let bound = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(2);
        let n = (&mut self.input)
            .take(bound)
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error {
                line: self.line + 1,
                what: ErrorKind::Io(e.to_string()),
            })?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        Ok(Some((self.line, buf)))
    }

    /// The next record's logical lines (folding undone, comments dropped),
    /// each with the number of its first physical line; `None` at the end.
    fn record(&mut self) -> Result<Option<Vec<Line>>, Error> {
        let mut lines: Vec<Line> = Vec::new();
        let mut size = 0usize;
        let mut start = 0usize;
        let mut in_comment = false;
        while let Some((n, line)) = self.physical(self.max_record.saturating_sub(size))? {
            if line.is_empty() {
                if lines.is_empty() {
                    // Blank lines before a record (or a comment alone).
                    in_comment = false;
                    size = 0;
                    continue;
                }
                break;
            }
            if size == 0 {
                start = n;
            }
            size = size.saturating_add(line.len() + 1);
            if size > self.max_record {
                return Err(Error {
                    line: start,
                    what: ErrorKind::TooLarge(self.max_record),
                });
            }
            if let Some(rest) = line.strip_prefix(b" ") {
                if in_comment {
                    continue;
                }
                match lines.last_mut() {
                    Some((_, last)) => last.extend_from_slice(rest),
                    None => {
                        return Err(Error {
                            line: n,
                            what: ErrorKind::ContinuationFirst,
                        })
                    }
                }
                continue;
            }
            if line.first() == Some(&b'#') {
                in_comment = true;
                continue;
            }
            in_comment = false;
            lines.push((n, line));
        }
        Ok((!lines.is_empty()).then_some(lines))
    }

    fn next_entry(&mut self) -> Result<Option<Entry>, Error> {
        let Some(mut lines) = self.record()? else {
            return Ok(None);
        };
        if !self.started {
            self.started = true;
            let (n, first) = &lines[0];
            let (name, _) = split_name(first);
            if name.eq_ignore_ascii_case(b"version") {
                let (_, value) = attr_value(*n, first)?;
                if value != b"1" {
                    return Err(Error {
                        line: *n,
                        what: ErrorKind::Version(String::from_utf8_lossy(&value).into_owned()),
                    });
                }
                lines.remove(0);
                if lines.is_empty() {
                    return self.next_entry();
                }
            }
        }
        let mut lines = lines.into_iter();
        let Some((n, first)) = lines.next() else {
            return Ok(None);
        };
        let (name, _) = split_name(&first);
        if !name.eq_ignore_ascii_case(b"dn") {
            return Err(Error {
                line: n,
                what: ErrorKind::NoDn(shorten(&first)),
            });
        }
        let (_, dn) = attr_value(n, &first)?;
        let dn = String::from_utf8(dn).map_err(|_| Error {
            line: n,
            what: ErrorKind::DnNotUtf8,
        })?;
        let mut entry = Entry::new(dn);
        for (k, (n, line)) in lines.enumerate() {
            let (name, value) = attr_value(n, &line)?;
            if name.eq_ignore_ascii_case("dn") {
                return Err(Error {
                    line: n,
                    what: ErrorKind::SecondDn,
                });
            }
            if k == 0
                && (name.eq_ignore_ascii_case("changetype") || name.eq_ignore_ascii_case("control"))
            {
                return Err(Error {
                    line: n,
                    what: ErrorKind::ChangeRecord(name),
                });
            }
            entry.push(&name, value);
        }
        Ok(Some(entry))
    }
}

impl<R: BufRead> Iterator for Reader<R> {
    type Item = Result<Entry, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_entry() {
            Ok(Some(e)) => Some(Ok(e)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                // After an error the position in the input is not a
                // record's start: stop.
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// The line's text up to its first `:` (all of it when there is none), and
/// the rest after that `:`.
fn split_name(line: &[u8]) -> (&[u8], Option<&[u8]>) {
    match line.iter().position(|&b| b == b':') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    }
}

/// A line's first 40 bytes, for an error message.
fn shorten(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(&line[..line.len().min(40)]).into_owned();
    if line.len() > 40 {
        format!("{s}...")
    } else {
        s
    }
}

/// An attribute description (RFC 4512): a name (letter, then letters,
/// digits, `-`) or a numeric OID, then `;option`s of letters, digits, `-`.
fn valid_name(name: &[u8]) -> bool {
    let mut parts = name.split(|&b| b == b';');
    let Some(base) = parts.next() else {
        return false;
    };
    let keychar = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-';
    let descr = base.first().is_some_and(u8::is_ascii_alphabetic) && base.iter().all(keychar);
    let oid = !base.is_empty()
        && base
            .split(|&b| b == b'.')
            .all(|d| !d.is_empty() && d.iter().all(u8::is_ascii_digit));
    (descr || oid) && parts.all(|o| !o.is_empty() && o.iter().all(keychar))
}

/// Splits an attribute line into its name and decoded value.
fn attr_value(n: usize, line: &[u8]) -> Result<(String, Vec<u8>), Error> {
    let err = |what| Error { line: n, what };
    let (name, rest) = split_name(line);
    let Some(rest) = rest else {
        return Err(err(ErrorKind::NoColon));
    };
    if !valid_name(name) {
        return Err(err(ErrorKind::BadName(shorten(name))));
    }
    // Checked ASCII just above.
    let name = String::from_utf8_lossy(name).into_owned();
    let fill = |s: &[u8]| {
        let skip = s.iter().take_while(|&&b| b == b' ').count();
        s[skip..].to_vec()
    };
    match rest.first() {
        Some(b':') => {
            let text = fill(&rest[1..]);
            let text: Vec<u8> = text.into_iter().filter(|b| *b != b' ').collect();
            let value = STANDARD
                .decode(&text)
                .map_err(|e| err(ErrorKind::Base64(e.to_string())))?;
            Ok((name, value))
        }
        Some(b'<') => Err(err(ErrorKind::Url(name))),
        _ => Ok((name, fill(rest))),
    }
}

/// Whether RFC 2849 requires a value (or DN) to be written in base64.
pub(crate) fn needs_base64(v: &[u8]) -> bool {
    matches!(v.first(), Some(b' ' | b':' | b'<'))
        || v.last() == Some(&b' ')
        || v.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n') || b > 127)
}

/// Writes `name: value` (or `name:: base64`), folded at 76 columns.
pub(crate) fn write_line(out: &mut impl Write, name: &str, value: &[u8]) -> std::io::Result<()> {
    let mut line = Vec::with_capacity(name.len() + value.len() + 3);
    line.extend_from_slice(name.as_bytes());
    if value.is_empty() {
        line.push(b':');
    } else if needs_base64(value) {
        line.extend_from_slice(b":: ");
        line.extend_from_slice(STANDARD.encode(value).as_bytes());
    } else {
        line.extend_from_slice(b": ");
        line.extend_from_slice(value);
    }
    const WIDTH: usize = 76;
    let (first, mut rest) = line.split_at(line.len().min(WIDTH));
    out.write_all(first)?;
    out.write_all(b"\n")?;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(WIDTH - 1));
        out.write_all(b" ")?;
        out.write_all(chunk)?;
        out.write_all(b"\n")?;
        rest = tail;
    }
    Ok(())
}

/// Writes entries as LDIF content records (no version line), each followed
/// by a blank line.
pub fn write<'a>(
    out: &mut impl Write,
    entries: impl IntoIterator<Item = &'a Entry>,
) -> std::io::Result<()> {
    for entry in entries {
        write_line(out, "dn", entry.dn.as_bytes())?;
        for (name, values) in &entry.attrs {
            for v in values {
                write_line(out, name, v)?;
            }
        }
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// The entries as an LDIF text ([`write`]).
pub fn to_string<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> String {
    let mut out = Vec::new();
    // Writing to a Vec does not fail, and what is written is ASCII.
    let _ = write(&mut out, entries);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Entry {
        let mut all = read(text).unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        all.remove(0)
    }

    fn err(text: &str) -> Error {
        read(text).unwrap_err()
    }

    #[test]
    fn plain_records_comments_version_and_options() {
        let text = "# a dump\nversion: 1\n\n# the suffix\ndn: dc=example,dc=org\nobjectClass: top\nobjectClass: dcObject\n# inside\n#  folded comment\n dc: not an attribute\ndc: example\n\n\n\ndn: cn=x,dc=example,dc=org\nuserCertificate;binary:: AAE=\nCN: x\ncn;lang-de: y\ncn: z\n";
        let all = read(text).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            all[0],
            Entry::new("dc=example,dc=org")
                .with("objectClass", "top")
                .with("objectClass", "dcObject")
                .with("dc", "example")
        );
        assert_eq!(
            all[1],
            Entry::new("cn=x,dc=example,dc=org")
                .with("userCertificate;binary", vec![0u8, 1])
                .with("CN", "x")
                .with("cn;lang-de", "y")
                .with("CN", "z")
        );
        // Version line directly followed by a record; CRLF line ends.
        let e = one("version: 1\r\ndn: o=a\r\no: a\r\n");
        assert_eq!(e, Entry::new("o=a").with("o", "a"));
        // No trailing newline; empty value; spaces after the colon.
        assert_eq!(
            one("dn:o=a\no:    a b \ndescription:"),
            Entry::new("o=a").with("o", "a b ").with("description", "")
        );
    }

    #[test]
    fn folding_and_base64() {
        let e = one("dn: uid=us\n er1,dc=ex\n ample,dc=org\ndescription:: w6l0w6kg\n  YXZlYyB1biBlc3BhY2U=\ncn: a\n  b\n");
        assert_eq!(e.dn, "uid=user1,dc=example,dc=org");
        assert_eq!(e.attrs[0].1[0], "été avec un espace".as_bytes());
        assert_eq!(e.attrs[1].1[0], b"a b");
        // dn:: base64.
        let e = one("dn:: Y249w6ksZGM9b3Jn\ncn:: w6k=\n");
        assert_eq!(e.dn, "cn=é,dc=org");
    }

    #[test]
    fn round_trips() {
        let long = "x".repeat(300);
        let entries = vec![
            Entry::new("dc=example,dc=org")
                .with("objectClass", "top")
                .with("dc", "example"),
            Entry::new("cn=J\u{f6}rg,dc=example,dc=org")
                .with("cn", "J\u{f6}rg")
                .with("description", " leading space")
                .with("description", "trailing space ")
                .with("description", ":colon")
                .with("description", "<less")
                .with("description", "a\nb\rc\0d")
                .with("description", "")
                .with("description", "inner: colon < fine")
                .with("description", long.as_str())
                .with("jpegPhoto", (0..=255u8).collect::<Vec<u8>>())
                .with("userCertificate;binary", vec![0x30, 0x03, 0x02, 0x01, 0x00]),
        ];
        let text = to_string(&entries);
        for line in text.lines() {
            assert!(line.len() <= 76, "{line}");
            assert!(line.is_ascii());
        }
        assert!(text.contains("description:: IGxlYWRpbmcgc3BhY2U=\n"));
        assert!(text.contains("description: inner: colon < fine\n"));
        assert!(text.contains("dn:: "));
        assert_eq!(read(&text).unwrap(), entries);
    }

    #[test]
    fn each_error_names_its_line() {
        let cases: &[(&str, usize, &str)] = &[
            (" continued\ndn: o=a\n", 1, "continuation"),
            ("dn: o=a\no: a\n\ncn: x\n", 4, "does not start with `dn:`"),
            ("dn: o=a\no a\n", 2, "no `:`"),
            ("dn: o=a\n1x: a\n", 2, "invalid attribute description"),
            ("dn: o=a\ncn;: a\n", 2, "invalid attribute description"),
            ("dn: o=a\ncn:: !!!\n", 2, "invalid base64"),
            ("dn: o=a\njpegPhoto:< file:///etc/passwd\n", 2, "URL"),
            ("version: 2\ndn: o=a\n", 1, "version"),
            ("dn: o=a\nchangetype: add\no: a\n", 2, "change record"),
            ("dn: o=a\no: a\ndn: o=b\n", 3, "second `dn:`"),
            ("dn:: /w==\n", 1, "not UTF-8"),
            ("# c\n\ndn: o=a\n\n\n#x\n\n\n\nfoo\n", 10, "does not start"),
        ];
        for (text, line, what) in cases {
            let e = err(text);
            assert_eq!(e.line, *line, "{text:?}: {e}");
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("line {line}: ")), "{msg}");
            assert!(msg.contains(what), "{text:?}: {msg}");
        }
    }

    #[test]
    fn a_record_over_the_bound_is_refused_not_grown() {
        let text = format!("dn: o=a\no: a\n\ndn: o=b\nd: {}\n", "y".repeat(10_000));
        let all: Vec<_> = Reader::with_limit(text.as_bytes(), 1000).collect();
        assert_eq!(all.len(), 2);
        assert!(all[0].is_ok());
        let e = all[1].clone().unwrap_err();
        assert_eq!(e.line, 4);
        assert_eq!(e.what, ErrorKind::TooLarge(1000));
        // Many short lines count too.
        let text = format!("dn: o=b\n{}", "d: y\n".repeat(1000));
        let e = Reader::with_limit(text.as_bytes(), 1000)
            .next()
            .unwrap()
            .unwrap_err();
        assert_eq!((e.line, e.what), (1, ErrorKind::TooLarge(1000)));
        // Exactly at the bound is fine.
        let text = "dn: o=a\no: a\n";
        assert_eq!(Reader::with_limit(text.as_bytes(), 13).count(), 1);
        assert!(Reader::with_limit(text.as_bytes(), 12)
            .next()
            .unwrap()
            .is_err());
    }

    #[test]
    fn no_panic_on_odd_input() {
        for text in [
            "",
            "\n\n",
            "#",
            "# x\n ",
            "dn:",
            "dn::",
            "dn: \n :",
            ":",
            "::",
            "\u{0}",
            "dn: a\n:",
            "version:",
            "version: 1",
            "version: 1\n\n",
        ] {
            let _ = read(text);
        }
        assert_eq!(read("").unwrap(), vec![]);
        assert_eq!(read("version: 1\n\n").unwrap(), vec![]);
    }
}
