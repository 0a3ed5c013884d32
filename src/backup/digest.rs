//! The content digest of a backend: a SHA-256 over its entries in a
//! canonical form, so that any later copy of the same data gives the same
//! digest, whether it was dumped from the database (`slapcat`) or read over
//! LDAP (a subtree search for `*` and `+`).
//!
//! The canonical form of an entry:
//!
//! * its DN normalised ([`NormDn`]: attribute types by their short names,
//!   values case-folded, escapes and spaces undone), kept as its list of
//!   RDNs, each the sorted list of its AVAs (`type=value`);
//! * its attributes without the ones the server computes on read
//!   ([`COMPUTED`]), names in ASCII lower case (options kept: `cn;lang-de`
//!   is not `cn`), lines of the same name merged, sorted by name;
//! * each attribute's values sorted bytewise, duplicates kept as given.
//!
//! Entries are ordered by canonical DN (ties, which a server never
//! produces, by their own hash), so the order of a dump does not count.
//!
//! Encoding: every string is its length (u64, big-endian) then its bytes,
//! every list its count (u64) then its items; nothing is ambiguous.
//! `entry = sha256(list(rdn) || list(attr))`, `rdn = list(str(ava))`,
//! `attr = str(name) || list(str(value))`; the digest is `sha256("abproxy entry digest v1" ||
//! u64(count) || entry hashes in order)`. Only the DNs and one hash per
//! entry are kept in memory.

use std::fmt;

use sha2::{Digest as _, Sha256};

use super::ldif::Entry;
use crate::freeze::dn::NormDn;

/// Attributes a server computes when an entry is read rather than stores
/// with it; they are left out of the digest. A search for `+` returns them,
/// `slapcat` does not (it prints the stored entry), so keeping them would
/// make an LDAP export and a database dump of the same data differ.
///
/// Seen on the test slapd (2.5, back-mdb, syncprov, and ppolicy with a
/// default policy): a rootdn search for `*` `+` returns, besides what
/// `slapcat` prints, `entryDN`, `subschemaSubentry` and `hasSubordinates`
/// on every entry, and `contextCSN` on the suffix entry, where `slapcat`
/// prints none right after start and an older value later: syncprov keeps
/// the current one in memory and writes it at checkpoints and shutdown. It
/// is replication state (the latest `entryCSN`), not content.
/// `tests/it/backup_digest.rs` fails if one of these is counted.
/// `numSubordinates` is of the first kind (derived from the tree; slapd's
/// back-monitor and 389 DS return it), not seen on this slapd. 389 DS also
/// returns `entryid` and `parentid`: its database's own entry numbers,
/// which its export (`dsconf backend export`) leaves out and an import
/// numbers afresh. `tests/it/ds389_backup.rs` checks 389's side.
///
/// The stored operational attributes count, as `slapcat` and the search
/// both print them: `entryUUID`, `entryCSN`, `createTimestamp`,
/// `modifyTimestamp`, `creatorsName`, `modifiersName`,
/// `structuralObjectClass`, ppolicy's `pwd*` state. `pwdPolicySubentry`
/// counts too: this slapd does not return it for entries under the default
/// policy, only where an entry names its policy itself (stored).
pub const COMPUTED: &[&str] = &[
    "entrydn",
    "subschemasubentry",
    "hassubordinates",
    "numsubordinates",
    "contextcsn",
    "entryid",
    "parentid",
];

/// Whether `attr` (any case, options ignored) is in [`COMPUTED`].
pub fn is_computed(attr: &str) -> bool {
    let base = attr.split(';').next().unwrap_or(attr);
    COMPUTED.iter().any(|c| c.eq_ignore_ascii_case(base))
}

/// Why entries could not be digested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("not a valid DN: `{0}`")]
    Dn(String),
}

/// A SHA-256 content digest; displays as 64 lower-case hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of a set of entries (in any order).
    pub fn of_entries(entries: impl IntoIterator<Item = Entry>) -> Result<Digest, DigestError> {
        let mut d = Digester::default();
        for e in entries {
            d.add(&e)?;
        }
        Ok(d.finish())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Builds a [`Digest`] one entry at a time.
#[derive(Debug, Default)]
pub struct Digester {
    /// Per entry: its canonical DN encoding and its hash.
    entries: Vec<(Vec<u8>, [u8; 32])>,
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u64).to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_len(out, s.len());
    out.extend_from_slice(s);
}

/// `s` cut at each byte of `seps` that is outside quotes and not escaped.
fn split_unescaped<'a>(s: &'a str, seps: &[u8]) -> Vec<&'a str> {
    let b = s.as_bytes();
    let mut parts = Vec::new();
    let (mut start, mut i, mut quoted) = (0, 0, false);
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'"' => quoted = !quoted,
            c if !quoted && seps.contains(&c) => {
                // An ASCII byte: `start..i` and `i + 1` are on characters.
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&s[start.min(s.len())..]);
    parts
}

/// The DN's normalised RDNs, each its normalised AVAs sorted, encoded.
/// [`NormDn`] shows them joined by `,` and `+`, which is ambiguous when a
/// value holds an escaped `,` or `+`; so the DN is cut into RDNs (at `,` or
/// `;`) and AVAs (at `+`) here, outside quotes and escapes, each AVA
/// normalised on its own, and the result must agree with the whole DN's
/// normalisation.
fn canonical_dn(dn: &str) -> Result<Vec<u8>, DigestError> {
    let bad = || DigestError::Dn(dn.to_string());
    let whole = NormDn::parse(dn.as_bytes()).ok_or_else(bad)?;
    let mut rdns: Vec<Vec<String>> = Vec::new();
    if !whole.is_root() {
        for rdn in split_unescaped(dn, b",;") {
            let mut avas = Vec::new();
            for ava in split_unescaped(rdn, b"+") {
                let n = NormDn::parse(ava.as_bytes()).ok_or_else(bad)?;
                if n.depth() != 1 {
                    return Err(bad());
                }
                avas.push(n.to_string());
            }
            avas.sort();
            rdns.push(avas);
        }
    }
    let joined: Vec<String> = rdns.iter().map(|avas| avas.join("+")).collect();
    if rdns.len() != whole.depth() || joined.join(",") != whole.to_string() {
        return Err(bad());
    }
    let mut out = Vec::new();
    put_len(&mut out, rdns.len());
    for avas in &rdns {
        put_len(&mut out, avas.len());
        for ava in avas {
            put_str(&mut out, ava.as_bytes());
        }
    }
    Ok(out)
}

impl Digester {
    /// Adds one entry.
    pub fn add(&mut self, entry: &Entry) -> Result<(), DigestError> {
        let dn = canonical_dn(&entry.dn)?;
        let mut attrs: Vec<(String, Vec<&[u8]>)> = Vec::new();
        for (name, values) in &entry.attrs {
            if is_computed(name) {
                continue;
            }
            let name = name.to_ascii_lowercase();
            match attrs.iter_mut().find(|(n, _)| *n == name) {
                Some((_, vs)) => vs.extend(values.iter().map(Vec::as_slice)),
                None => attrs.push((name, values.iter().map(Vec::as_slice).collect())),
            }
        }
        attrs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut h = Sha256::new();
        h.update(&dn);
        h.update((attrs.len() as u64).to_be_bytes());
        let mut buf = Vec::new();
        for (name, mut values) in attrs {
            values.sort_unstable();
            buf.clear();
            put_str(&mut buf, name.as_bytes());
            put_len(&mut buf, values.len());
            for v in values {
                put_str(&mut buf, v);
            }
            h.update(&buf);
        }
        self.entries.push((dn, h.finalize().into()));
        Ok(())
    }

    /// The digest of the entries added.
    pub fn finish(mut self) -> Digest {
        self.entries.sort_unstable();
        let mut h = Sha256::new();
        h.update(b"abproxy entry digest v1");
        h.update((self.entries.len() as u64).to_be_bytes());
        for (_, e) in &self.entries {
            h.update(e);
        }
        Digest(h.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(entries: &[Entry]) -> Digest {
        Digest::of_entries(entries.iter().cloned()).unwrap()
    }

    fn sample() -> Vec<Entry> {
        vec![
            Entry::new("dc=example,dc=org")
                .with("objectClass", "top")
                .with("objectClass", "dcObject")
                .with("dc", "example")
                .with("entryUUID", "1"),
            Entry::new("ou=people,dc=example,dc=org")
                .with("objectClass", "organizationalUnit")
                .with("ou", "people"),
            Entry::new("uid=u1,ou=people,dc=example,dc=org")
                .with("uid", "u1")
                .with("cn", "One")
                .with("cn", "Uno")
                .with("description", "same")
                .with("description", "same")
                .with("jpegPhoto", vec![0u8, 255, 1]),
        ]
    }

    #[test]
    fn order_and_spelling_do_not_count() {
        let base = d(&sample());
        assert_eq!(base.to_string().len(), 64);
        let mut reversed = sample();
        reversed.reverse();
        for e in &mut reversed {
            e.attrs.reverse();
            for (_, vs) in &mut e.attrs {
                vs.reverse();
            }
        }
        assert_eq!(d(&reversed), base);
        // DN spelling and attribute name case; a name split over two lines.
        let mut respelled = sample();
        respelled[2].dn = "UID=u1 , OU=People;DC=Example,domainComponent=org".into();
        respelled[2].attrs[1].0 = "CN".into();
        respelled[2]
            .attrs
            .push(("Cn".into(), vec![b"Uno".to_vec()]));
        respelled[2].attrs[1].1.pop();
        assert_eq!(d(&respelled), base);
        // Computed attributes, in any case, with options.
        let mut computed = sample();
        for e in &mut computed {
            e.push("hasSubordinates", "TRUE");
            e.push("entryDN", e.dn.clone());
            e.push("subschemaSubentry", "cn=Subschema");
            e.push("contextCSN", "20261203171143.752128Z#000000#000#000000");
            e.push("NUMSUBORDINATES;x-opt", "0");
        }
        assert_eq!(d(&computed), base);
        assert!(is_computed("EntryDN"));
        assert!(!is_computed("entryUUID"));
        assert!(!is_computed("entryCSN"));
        assert!(!is_computed("pwdPolicySubentry"));
    }

    #[test]
    fn every_change_counts() {
        let base = d(&sample());
        let mut seen = vec![base];
        let mut check = |entries: Vec<Entry>, what: &str| {
            let got = d(&entries);
            assert!(!seen.contains(&got), "{what}: digest did not change");
            seen.push(got);
        };
        let mut s = sample();
        s[2].attrs[1].1[0] = b"one".to_vec();
        check(s, "value case");
        let mut s = sample();
        s[2].push("cn", "Tres");
        check(s, "value added");
        let mut s = sample();
        s[2].attrs[1].1.pop();
        check(s, "value removed");
        let mut s = sample();
        s[2].attrs[2].1.pop();
        check(s, "duplicate removed");
        let mut s = sample();
        s[2].attrs[3].1[0].push(0);
        check(s, "binary value");
        let mut s = sample();
        s[2].push("mail", "u1@example.org");
        check(s, "attribute added");
        let mut s = sample();
        s[2].attrs.remove(2);
        check(s, "attribute removed");
        let mut s = sample();
        s[2].attrs[2].0 = "description;lang-de".into();
        check(s, "option added");
        let mut s = sample();
        s[0].attrs[2].0 = "entryCSN".into();
        check(s, "stored operational attribute renamed");
        let mut s = sample();
        s.push(Entry::new("uid=u2,ou=people,dc=example,dc=org").with("uid", "u2"));
        check(s, "entry added");
        let mut s = sample();
        s.remove(1);
        check(s, "entry removed");
        let mut s = sample();
        s[2].dn = "uid=u1,ou=staff,dc=example,dc=org".into();
        check(s, "entry moved");
        check(Vec::new(), "nothing");
        // Boundaries: values moved between attributes or entries.
        let a = Entry::new("o=a").with("x", "ab").with("y", "");
        let b = Entry::new("o=a").with("x", "a").with("y", "b");
        check(vec![a], "boundary a");
        check(vec![b], "boundary b");
        // An escaped comma is not an RDN separator.
        check(
            vec![Entry::new("cn=a\\,ou=b,dc=x").with("cn", "a,ou=b")],
            "escaped",
        );
        check(
            vec![Entry::new("cn=a,ou=b,dc=x").with("cn", "a,ou=b")],
            "unescaped",
        );
        // Nor is an escaped plus an AVA separator.
        check(
            vec![Entry::new("cn=a\\+uid=b,dc=x").with("cn", "a+uid=b")],
            "escaped plus",
        );
        check(
            vec![Entry::new("cn=a+uid=b,dc=x").with("cn", "a+uid=b")],
            "multi-valued RDN",
        );
    }

    #[test]
    fn invalid_dns_are_errors() {
        for dn in ["nodn", "cn=a,,dc=x", "cn=x\\"] {
            let err = Digest::of_entries([Entry::new(dn)]).unwrap_err();
            assert_eq!(err, DigestError::Dn(dn.into()));
        }
        // Quoted separators and escapes split where NormDn splits.
        assert_eq!(
            d(&[Entry::new("cn=\"a,b\",dc=x")]),
            d(&[Entry::new("cn=a\\,b,dc=x")])
        );
        assert_eq!(
            d(&[Entry::new("cn=a\\2Cb,dc=x")]),
            d(&[Entry::new("cn=a\\,b,dc=x")])
        );
        // A multi-valued RDN in any order and spelling.
        assert_eq!(
            d(&[Entry::new("cn=a+uid=b,dc=x")]),
            d(&[Entry::new("UID=b + CN=A,dc=x")])
        );
        // The root DSE's empty DN.
        assert!(Digest::of_entries([Entry::new("")]).is_ok());
    }
}
