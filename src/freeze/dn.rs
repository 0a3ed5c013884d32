//! DN normalisation for backend matching: just enough of RFC 4514 (and of
//! the LDAPv2 forms slapd and 389 DS still accept, RFC 1779: `;` between
//! RDNs, spaces around separators, quoted values) to decide whether a DN lies
//! under a suffix.
//!
//! Attribute types are compared case-insensitively (and the usual OIDs and
//! long names map to their short names), values case-insensitively with
//! escapes, quotes and `#` BER values decoded and insignificant spaces
//! removed; RDNs are compared from the right. Values of the naming attributes
//! used in suffixes (dc, o, ou, c, l, st, cn) match case-insensitively on the
//! server too.
//!
//! Where this normalisation could differ from the server's (a value with
//! non-ASCII characters, whose case folding and Unicode normalisation the
//! server does its own way; a `#` value that is not a plain string; an
//! attribute type given by an OID this table does not know), the RDN is
//! marked *uncertain*: a comparison of it with a suffix's RDN that does not
//! come out equal answers [`Within::Maybe`], and the freeze treats the DN as
//! touching every backend. The proxy errs on the side of holding.

/// A DN as a list of normalised RDNs, leftmost first. Each RDN is its
/// normalised AVAs sorted, joined by `+`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct NormDn {
    /// The RDNs one after the other, a `,` between two (what `Display`
    /// shows): one allocation for the whole DN, not one per RDN. A `,` in
    /// it is not always a separator (a value may hold one): `rdns` says
    /// where each RDN ends.
    text: String,
    /// Per RDN: where it ends in `text`, and whether it is normalised
    /// exactly as the server would (see the module).
    rdns: Vec<(usize, bool)>,
}

/// Whether a DN lies under a suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Within {
    /// It does.
    Yes,
    /// It does not.
    No,
    /// The normalisation cannot tell (an uncertain RDN differs).
    Maybe,
}

/// Well-known attribute type OIDs and long names, and their short names.
const TYPE_NAMES: &[(&str, &str)] = &[
    ("0.9.2342.19200300.100.1.25", "dc"),
    ("domaincomponent", "dc"),
    ("0.9.2342.19200300.100.1.1", "uid"),
    ("userid", "uid"),
    ("2.5.4.3", "cn"),
    ("commonname", "cn"),
    ("2.5.4.10", "o"),
    ("organizationname", "o"),
    ("2.5.4.11", "ou"),
    ("organizationalunitname", "ou"),
    ("2.5.4.6", "c"),
    ("countryname", "c"),
    ("2.5.4.7", "l"),
    ("localityname", "l"),
    ("2.5.4.8", "st"),
    ("stateorprovincename", "st"),
    ("2.5.4.9", "street"),
    ("streetaddress", "street"),
    ("2.5.4.4", "sn"),
    ("surname", "sn"),
    ("0.9.2342.19200300.100.1.3", "mail"),
    ("rfc822mailbox", "mail"),
];

/// Appends an attribute type's normalised name to `out`: well-known OIDs
/// and long names as their short names, other names in lower case (an
/// `oid.` prefix dropped). False for a numeric OID not listed (its name is
/// unknown here; it is appended as given, in lower case).
fn push_type(t: &str, out: &mut String) -> bool {
    let t = t.trim();
    let b = t.as_bytes();
    // `b[..4]` is ASCII when it matches, so 4 is a character boundary.
    let name = match b.get(..4) {
        Some(p) if p.eq_ignore_ascii_case(b"oid.") => &t[4..],
        _ => t,
    };
    // Every listed name has 6 characters or more: the short names most
    // DNs use (dc, ou, cn, uid) skip the table.
    if name.len() >= 6 {
        if let Some((_, short)) = TYPE_NAMES
            .iter()
            .find(|(n, _)| name.eq_ignore_ascii_case(n))
        {
            out.push_str(short);
            return true;
        }
    }
    let known = !name.starts_with(|c: char| c.is_ascii_digit());
    push_lower(if known { name } else { t }, out);
    known
}

/// Appends `s` with ASCII letters in lower case.
fn push_lower(s: &str, out: &mut String) {
    out.extend(s.chars().map(|c| c.to_ascii_lowercase()));
}

/// Folds a decoded value in place as caseIgnoreMatch does for ASCII
/// (surrounding spaces dropped, inner runs collapsed, case folded); the
/// result is UTF-8. False when the value has characters beyond ASCII.
fn fold(raw: &mut Vec<u8>) -> bool {
    if !raw.is_ascii() {
        let s = String::from_utf8_lossy(raw);
        let words: Vec<&str> = s.split(' ').filter(|p| !p.is_empty()).collect();
        *raw = words.join(" ").to_lowercase().into_bytes();
        return false;
    }
    raw.make_ascii_lowercase();
    if raw.contains(&b' ') {
        // The write index never passes the read index (a space is written
        // only after at least one was skipped).
        let (mut w, mut space) = (0, false);
        for r in 0..raw.len() {
            let b = raw[r];
            if b == b' ' {
                space = w > 0;
                continue;
            }
            if space {
                raw[w] = b' ';
                w += 1;
                space = false;
            }
            raw[w] = b;
            w += 1;
        }
        raw.truncate(w);
    }
    true
}

/// A `#` value: the hex of a BER element; a string type (OCTET, UTF8,
/// Printable, IA5, T61/Teletex, Visible) gives its content.
fn ber_string(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.trim_end_matches(' ');
    if hex.is_empty() || hex.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let (&tag, rest) = bytes.split_first()?;
    if !matches!(tag, 0x04 | 0x0c | 0x13 | 0x14 | 0x16 | 0x1a) {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    let (len, rest) = if len < 0x80 {
        (len as usize, rest)
    } else {
        let n = (len & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let l = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (l, &rest[n..])
    };
    (rest.len() == len).then(|| rest.to_vec())
}

/// A DN string being read.
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.i += 1;
        }
    }

    /// An escape after a backslash: `\HH` or `\c`.
    fn escape(&mut self, out: &mut Vec<u8>) -> Option<()> {
        let next = *self.b.get(self.i)?;
        if next.is_ascii_hexdigit() {
            let hex = std::str::from_utf8(self.b.get(self.i..self.i + 2)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            self.i += 2;
        } else {
            out.push(next);
            self.i += 1;
        }
        Some(())
    }

    /// One attribute value, up to the next separator, folded into `raw`
    /// (UTF-8); true when normalised with certainty.
    fn value(&mut self, raw: &mut Vec<u8>) -> Option<bool> {
        raw.clear();
        self.skip_spaces();
        match self.peek() {
            Some(b'"') => {
                // LDAPv2 (RFC 1779): separators are literal inside quotes.
                self.i += 1;
                loop {
                    match *self.b.get(self.i)? {
                        b'"' => {
                            self.i += 1;
                            break;
                        }
                        b'\\' => {
                            self.i += 1;
                            self.escape(raw)?;
                        }
                        c => {
                            raw.push(c);
                            self.i += 1;
                        }
                    }
                }
                self.skip_spaces();
                if !matches!(self.peek(), None | Some(b',' | b';' | b'+')) {
                    return None;
                }
                Some(fold(raw))
            }
            Some(b'#') => {
                let start = self.i + 1;
                while !matches!(self.peek(), None | Some(b',' | b';' | b'+')) {
                    self.i += 1;
                }
                let hex = std::str::from_utf8(&self.b[start..self.i]).ok()?;
                match ber_string(hex) {
                    Some(decoded) => {
                        *raw = decoded;
                        Some(fold(raw))
                    }
                    // Not a plain string: keep the text, but it cannot be
                    // compared with certainty.
                    None => {
                        raw.push(b'#');
                        raw.extend(hex.trim().bytes().map(|b| b.to_ascii_lowercase()));
                        Some(false)
                    }
                }
            }
            _ => {
                loop {
                    match self.peek() {
                        None | Some(b',' | b';' | b'+') => break,
                        Some(b'\\') => {
                            self.i += 1;
                            self.escape(raw)?;
                        }
                        Some(c) => {
                            raw.push(c);
                            self.i += 1;
                        }
                    }
                }
                Some(fold(raw))
            }
        }
    }
}

impl NormDn {
    /// Parses and normalises a DN; `None` if it is not a valid DN. The empty
    /// DN (the root DSE) is valid and has no RDNs.
    #[inline]
    pub fn parse(dn: &[u8]) -> Option<NormDn> {
        NormDn::parse_plain(dn).or_else(|| NormDn::parse_any(dn))
    }

    /// The DN most requests carry (`uid=jo,ou=People,dc=example,dc=org`),
    /// read in one pass: `None` unless every RDN is one `type=value`, the
    /// type a short name (a letter, then letters, digits or `-`: fewer than
    /// six characters, so no long name or OID of [`TYPE_NAMES`]), the value
    /// letters, digits and `-._@`, nothing else (no space, escape, quote,
    /// `#`, `+` or `;`). Such a DN's normal form is the DN in lower case,
    /// every RDN certain: what [`NormDn::parse_any`] makes of it (a test
    /// compares the two on generated DNs). Anything else goes to
    /// `parse_any`.
    #[inline]
    fn parse_plain(dn: &[u8]) -> Option<NormDn> {
        let mut rdns = Vec::with_capacity(4);
        // Where the current RDN starts, and its `=` once seen.
        let mut start = 0;
        let mut eq: Option<usize> = None;
        for (i, &b) in dn.iter().enumerate() {
            match b {
                b'=' => {
                    if eq.is_some() || i == start || i - start > 5 {
                        return None;
                    }
                    if !dn[start].is_ascii_alphabetic() {
                        return None;
                    }
                    eq = Some(i);
                }
                b',' => {
                    let e = eq.take()?;
                    if i == e + 1 {
                        return None;
                    }
                    rdns.push((i, true));
                    start = i + 1;
                }
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' => {}
                b'.' | b'_' | b'@' if eq.is_some() => {}
                _ => return None,
            }
        }
        let e = eq?;
        if dn.len() == e + 1 {
            return None;
        }
        rdns.push((dn.len(), true));
        let mut text = dn.to_vec();
        text.make_ascii_lowercase();
        Some(NormDn {
            text: String::from_utf8(text).ok()?,
            rdns,
        })
    }

    /// [`NormDn::parse`] for any DN: RFC 4514 and the LDAPv2 forms.
    fn parse_any(dn: &[u8]) -> Option<NormDn> {
        let text = std::str::from_utf8(dn).ok()?;
        let mut c = Cursor { b: dn, i: 0 };
        c.skip_spaces();
        if c.peek().is_none() {
            return Some(NormDn::default());
        }
        // Normalised, a DN is seldom longer than as given.
        let mut out = NormDn {
            text: String::with_capacity(dn.len()),
            rdns: Vec::with_capacity(4),
        };
        // Where the current RDN starts in `out.text`, and where its AVAs
        // before the last end (a multi-valued RDN; most have one AVA).
        let mut rdn_start = 0;
        let mut ava_ends: Vec<usize> = Vec::new();
        // Each value, decoded and folded: one buffer for all.
        let mut raw = Vec::with_capacity(dn.len());
        let mut sure = true;
        loop {
            let eq = c.b[c.i..].iter().position(|&b| b == b'=')?;
            // Both ends follow or are ASCII bytes: character boundaries.
            let t = text.get(c.i..c.i + eq)?;
            if t.trim().is_empty()
                || t.bytes()
                    .any(|b| matches!(b, b',' | b';' | b'+' | b'"' | b'\\'))
            {
                return None;
            }
            c.i += eq + 1;
            let certain = c.value(&mut raw)?;
            sure &= certain;
            sure &= push_type(t, &mut out.text);
            out.text.push('=');
            if certain {
                // A value normalised with certainty is ASCII.
                out.text.extend(raw.iter().map(|&b| char::from(b)));
            } else {
                out.text
                    .push_str(std::str::from_utf8(&raw).unwrap_or_default());
            }
            match c.peek() {
                Some(b'+') => {
                    ava_ends.push(out.text.len());
                    c.i += 1;
                    continue;
                }
                sep => {
                    if !ava_ends.is_empty() {
                        sort_avas(&mut out.text, rdn_start, &ava_ends);
                        ava_ends.clear();
                    }
                    out.rdns.push((out.text.len(), sure));
                    sure = true;
                    if sep.is_none() {
                        return Some(out);
                    }
                    out.text.push(',');
                    rdn_start = out.text.len();
                    c.i += 1;
                }
            }
        }
    }

    /// RDN `i` and whether it is normalised with certainty.
    fn rdn(&self, i: usize) -> (&str, bool) {
        let start = match i {
            0 => 0,
            _ => self.rdns[i - 1].0 + 1,
        };
        let (end, sure) = self.rdns[i];
        (&self.text[start..end], sure)
    }

    /// True for the root DSE's empty DN.
    pub fn is_root(&self) -> bool {
        self.rdns.is_empty()
    }

    /// Number of RDNs.
    pub fn depth(&self) -> usize {
        self.rdns.len()
    }

    /// True when `self` is `suffix` or lies below it, as far as the
    /// normalisation can tell (see [`NormDn::within`]).
    pub fn is_within(&self, suffix: &NormDn) -> bool {
        self.within(suffix) == Within::Yes
    }

    /// Whether `self` is `suffix` or lies below it.
    pub fn within(&self, suffix: &NormDn) -> Within {
        if self.rdns.len() < suffix.rdns.len() {
            return Within::No;
        }
        let skip = self.rdns.len() - suffix.rdns.len();
        let mut answer = Within::Yes;
        for k in 0..suffix.rdns.len() {
            let (mine, mine_sure) = self.rdn(skip + k);
            let (theirs, theirs_sure) = suffix.rdn(k);
            if mine == theirs {
                continue;
            }
            if mine_sure && theirs_sure {
                return Within::No;
            }
            answer = Within::Maybe;
        }
        answer
    }

    /// True when every RDN was normalised with certainty.
    pub fn is_sure(&self) -> bool {
        self.rdns.iter().all(|&(_, sure)| sure)
    }
}

/// Sorts the AVAs of the RDN that starts at `start` in `text` (and runs to
/// its end), joined by `+`: `ends` are where each but the last ends.
fn sort_avas(text: &mut String, start: usize, ends: &[usize]) {
    let mut from = start;
    let mut avas: Vec<String> = Vec::with_capacity(ends.len() + 1);
    for &end in ends {
        avas.push(text[from..end].to_string());
        from = end;
    }
    avas.push(text[from..].to_string());
    avas.sort();
    text.truncate(start);
    text.push_str(&avas.join("+"));
}

impl std::fmt::Display for NormDn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NormDn {
        NormDn::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn case_spaces_types_and_escapes() {
        let want = n("dc=example,dc=org");
        for s in [
            "DC=Example,DC=ORG",
            "dc=example, dc=org",
            " dc = example ; dc=org ",
            "0.9.2342.19200300.100.1.25=example,domainComponent=org",
            "dc=ex\\61mple,dc=org",
        ] {
            assert_eq!(n(s), want, "{s}");
        }
        assert_eq!(n("cn=a\\,b,dc=x").depth(), 2);
        assert_eq!(n("cn=a+uid=b,dc=x"), n("UID=B+CN=A,dc=x"));
        assert!(n("").is_root());
    }

    #[test]
    fn listed_type_names_are_long_enough_for_the_short_name_fast_path() {
        // push_type looks names shorter than 6 characters up nowhere.
        for (name, short) in TYPE_NAMES {
            assert!(name.len() >= 6, "{name}");
            assert_eq!(n(&format!("{name}=x")), n(&format!("{short}=x")));
        }
        assert_eq!(n("OID.2.5.4.3=x"), n("cn=x"));
        assert_eq!(n("UID=x"), n("userid=x"));
    }

    #[test]
    fn containment() {
        let suffix = n("dc=example,dc=org");
        assert!(n("uid=u1,ou=People,DC=example,dc=org").is_within(&suffix));
        assert!(n("dc=example,dc=org").is_within(&suffix));
        assert!(!n("dc=org").is_within(&suffix));
        assert!(!n("dc=other,dc=org").is_within(&suffix));
        assert!(!n("dc=xexample,dc=org").is_within(&suffix));
        assert!(suffix.is_within(&n("dc=org")));
        assert!(suffix.is_within(&n("")));
    }

    /// The one-pass reading of the usual DN gives what the full parser
    /// gives, on DNs generated from an alphabet that holds every byte
    /// either path treats apart (separators, escapes, quotes, `#`, `+`,
    /// spaces, digits, the characters values may have, a non-ASCII
    /// letter) and the types around the five-character limit; and the
    /// fast path takes most plain DNs.
    #[test]
    fn the_plain_dn_fast_path_agrees_with_the_full_parser() {
        const TYPES: &[&str] = &[
            "dc",
            "DC",
            "uid",
            "cn",
            "ou",
            "o",
            "c2",
            "a-b",
            "mail",
            "userid",
            "street",
            "sn",
            "2.5.4.3",
            "oid.2.5.4.3",
            "x",
            "abcde",
            "abcdef",
            "1a",
            "-a",
        ];
        const BYTES: &[u8] = b"aZ09-._@=,;+ \\\"#x";
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut fast, mut total) = (0, 0);
        for _ in 0..200_000 {
            let mut dn = Vec::new();
            for r in 0..1 + next() % 4 {
                if r > 0 {
                    dn.push(b',');
                }
                let r = next();
                dn.extend_from_slice(TYPES[(r % TYPES.len() as u64) as usize].as_bytes());
                dn.push(b'=');
                for k in 0..(r >> 8) % 6 {
                    let pick = next();
                    if pick % 4 == 0 {
                        // Any byte of the alphabet, now and then a UTF-8 é.
                        if pick % 64 == 4 {
                            dn.extend_from_slice("\u{e9}".as_bytes());
                        } else {
                            dn.push(BYTES[((pick >> 8) % BYTES.len() as u64) as usize]);
                        }
                    } else {
                        let c = b"examplORGx1"[((pick >> 8) % 11) as usize];
                        dn.push(if k % 2 == 0 {
                            c
                        } else {
                            c.to_ascii_uppercase()
                        });
                    }
                }
            }
            total += 1;
            if let Some(plain) = NormDn::parse_plain(&dn) {
                fast += 1;
                assert_eq!(
                    Some(&plain),
                    NormDn::parse_any(&dn).as_ref(),
                    "{}",
                    String::from_utf8_lossy(&dn)
                );
            }
        }
        // Most generated DNs are plain (the fast path is taken), many are
        // not (the comparison covers the fallback's cases too).
        assert!(
            fast > total / 10 && fast < total * 9 / 10,
            "{fast} of {total} plain"
        );
        for plain in ["uid=user20,ou=People,dc=Example,dc=org", "cn=a.b_c@d-e,o=x"] {
            assert_eq!(NormDn::parse_plain(plain.as_bytes()), Some(n(plain)));
        }
        for other in [
            "cn=a b,dc=x",
            "cn=a\\2c,dc=x",
            "cn=a+sn=b",
            "dc=x;dc=y",
            "cn=",
            "cn=x,",
        ] {
            assert_eq!(NormDn::parse_plain(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn invalid() {
        for s in ["nodn", "cn=a,,dc=x", "=x", "cn=\\4", "cn=x\\"] {
            assert!(NormDn::parse(s.as_bytes()).is_none(), "{s}");
        }
        assert!(NormDn::parse(&[0xff, b'=', b'x']).is_none());
    }

    #[test]
    fn ldapv2_quotes_and_ber_values_are_the_same_entry() {
        let want = n("uid=user20,ou=people,dc=example,dc=org");
        for s in [
            "uid=user20,ou=people,dc=\"example\",dc=org",
            "uid=\"user20\" , ou=People ; dc = \"Example\" ,dc=org",
            // #04076578616d706c65: an OCTET STRING "example".
            "uid=user20,ou=people,dc=#04076578616d706c65,dc=org",
            "uid=user20,ou=people,dc=#0C074578616D706C65,dc=org",
        ] {
            let got = n(s);
            assert_eq!(got, want, "{s}");
            assert_eq!(got.within(&n("dc=example,dc=org")), Within::Yes, "{s}");
        }
        // Separators are literal inside quotes.
        assert_eq!(n("cn=\"a,b+c\",dc=x"), n("cn=a\\,b\\+c,dc=x"));
        assert_eq!(n("cn=\"a,b\",dc=x").depth(), 2);
        assert!(NormDn::parse(b"cn=\"open,dc=x").is_none());
        assert!(NormDn::parse(b"cn=\"a\"b,dc=x").is_none());
    }

    #[test]
    fn what_cannot_be_normalised_with_certainty_may_be_anywhere() {
        let suffix = n("dc=example,dc=org");
        // Non-ASCII: the server folds case and normalises Unicode its way.
        let accented = n("uid=u,dc=exampl\u{e9},dc=org");
        assert!(!accented.is_sure());
        assert_eq!(accented.within(&suffix), Within::Maybe);
        // An OID this table does not know may name dc.
        let oid = n("uid=u,1.2.3.4=example,dc=org");
        assert_eq!(oid.within(&suffix), Within::Maybe);
        // A # value that is not a plain string.
        let ber = n("uid=u,dc=#300302010a,dc=org");
        assert_eq!(ber.within(&suffix), Within::Maybe);
        // Certain differences stay certain, whatever lies left of them.
        assert_eq!(
            n("cn=J\u{f6}rg,dc=other,dc=org").within(&suffix),
            Within::No
        );
        assert_eq!(
            n("cn=J\u{f6}rg,dc=example,dc=org").within(&suffix),
            Within::Yes
        );
        assert_eq!(n("dc=org").within(&suffix), Within::No);
    }
}
