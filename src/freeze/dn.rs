//! DN normalisation for backend matching: just enough of RFC 4514 to decide
//! whether a DN lies under a suffix.
//!
//! Attribute types are compared case-insensitively (and the usual OIDs map to
//! their names), values case-insensitively with escapes decoded and
//! surrounding spaces removed; RDNs are compared from the right. Values of
//! the naming attributes used in suffixes (dc, o, ou, c, l, st, cn) match
//! case-insensitively on the server too, so this errs on no side that
//! matters: a DN under a suffix is always found under it.

/// A DN as a list of normalised RDNs, leftmost first. Each RDN is its
/// normalised AVAs sorted, joined by `+`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct NormDn {
    rdns: Vec<String>,
}

/// Well-known attribute type OIDs mapped to their short names.
fn type_name(t: &str) -> String {
    let t = t.trim();
    let lower = t.to_ascii_lowercase();
    let lower = lower.strip_prefix("oid.").unwrap_or(&lower);
    match lower {
        "0.9.2342.19200300.100.1.25" => "dc".into(),
        "0.9.2342.19200300.100.1.1" => "uid".into(),
        "2.5.4.3" => "cn".into(),
        "2.5.4.10" => "o".into(),
        "2.5.4.11" => "ou".into(),
        "2.5.4.6" => "c".into(),
        "2.5.4.7" => "l".into(),
        "2.5.4.8" => "st".into(),
        "domaincomponent" => "dc".into(),
        "userid" => "uid".into(),
        "commonname" => "cn".into(),
        "organizationname" => "o".into(),
        "organizationalunitname" => "ou".into(),
        other => other.to_string(),
    }
}

/// Decodes RFC 4514 escapes (`\,` and `\2C`) and folds case; `None` for a
/// malformed escape.
fn norm_value(v: &str) -> Option<String> {
    let b = v.trim_matches(' ').as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            let next = *b.get(i + 1)?;
            if next.is_ascii_hexdigit() {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(next);
                i += 2;
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let s = String::from_utf8_lossy(&out);
    // Insignificant inner space runs collapse, as caseIgnoreMatch does.
    let collapsed = s
        .split(' ')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    Some(collapsed.to_lowercase())
}

/// Splits on an unescaped separator.
fn split_unescaped(s: &str, seps: &[u8]) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            cur.push(c);
            escaped = true;
        } else if c.is_ascii() && seps.contains(&(c as u8)) {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

impl NormDn {
    /// Parses and normalises a DN; `None` if it is not a valid DN. The empty
    /// DN (the root DSE) is valid and has no RDNs.
    pub fn parse(dn: &[u8]) -> Option<NormDn> {
        let dn = std::str::from_utf8(dn).ok()?;
        if dn.trim().is_empty() {
            return Some(NormDn::default());
        }
        let mut rdns = Vec::new();
        for rdn in split_unescaped(dn, b",;") {
            let mut avas = Vec::new();
            for ava in split_unescaped(&rdn, b"+") {
                let (t, v) = ava.split_once('=')?;
                let t = type_name(t);
                if t.is_empty() {
                    return None;
                }
                avas.push(format!("{t}={}", norm_value(v)?));
            }
            avas.sort();
            rdns.push(avas.join("+"));
        }
        Some(NormDn { rdns })
    }

    /// True for the root DSE's empty DN.
    pub fn is_root(&self) -> bool {
        self.rdns.is_empty()
    }

    /// Number of RDNs.
    pub fn depth(&self) -> usize {
        self.rdns.len()
    }

    /// True when `self` is `suffix` or lies below it.
    pub fn is_within(&self, suffix: &NormDn) -> bool {
        self.rdns.len() >= suffix.rdns.len()
            && self.rdns[self.rdns.len() - suffix.rdns.len()..] == suffix.rdns[..]
    }
}

impl std::fmt::Display for NormDn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.rdns.join(","))
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

    #[test]
    fn invalid() {
        for s in ["nodn", "cn=a,,dc=x", "=x", "cn=\\4", "cn=x\\"] {
            assert!(NormDn::parse(s.as_bytes()).is_none(), "{s}");
        }
        assert!(NormDn::parse(&[0xff, b'=', b'x']).is_none());
    }
}
