//! `journal replay --resolve URL`: whether a write whose answer never came
//! (indeterminate) was run by the server, read from that server's entries.
//!
//! Sound only for entries no later journaled write touched (else the
//! entry shows the later write): such writes stay unknown. Writes that
//! bypassed the proxy are not in the journal; the admin who resolves
//! knows whether there were any.

use std::collections::HashMap;

use ldap3_proto::proto::{LdapModifyType, LdapOp};

use crate::backup::ldif::Entry;
use crate::freeze::dn::NormDn;

/// What reading the server says about an indeterminate write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The server ran it: replay it.
    Applied,
    /// It did not: skip it.
    NotApplied,
    /// Cannot tell (why): replay stops there.
    Unknown(String),
}

/// The write a journaled request is, decoded.
fn decode(request: &[u8]) -> Option<LdapOp> {
    crate::wire::pdu::decode(request).map(|m| m.op)
}

/// The DNs of the entries a write touches (old and new name of a rename).
pub fn touched(request: &[u8]) -> Vec<String> {
    // Extended operations: none known (they stay unknown anyway).
    if crate::wire::Envelope::op_of(request) == Some(crate::wire::op::EXTENDED_REQUEST) {
        return Vec::new();
    }
    match decode(request) {
        Some(LdapOp::AddRequest(a)) => vec![a.dn],
        Some(LdapOp::DelRequest(dn)) => vec![dn],
        Some(LdapOp::ModifyRequest(m)) => vec![m.dn],
        Some(LdapOp::ModifyDNRequest(m)) => vec![
            m.dn.clone(),
            new_dn(&m.dn, &m.newrdn, m.new_superior.as_deref()),
        ],
        _ => Vec::new(),
    }
}

/// The DN a rename gives.
fn new_dn(dn: &str, newrdn: &str, new_superior: Option<&str>) -> String {
    let parent = match new_superior {
        Some(s) => s.to_string(),
        None => parent_of(dn),
    };
    if parent.is_empty() {
        newrdn.to_string()
    } else {
        format!("{newrdn},{parent}")
    }
}

/// `dn` without its first RDN (escaped commas kept).
fn parent_of(dn: &str) -> String {
    let b = dn.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b',' => return dn[i + 1..].trim_start().to_string(),
            _ => i += 1,
        }
    }
    String::new()
}

/// Two DNs are the same entry's (case, spaces and escapes aside).
pub fn same_dn(a: &str, b: &str) -> bool {
    match (NormDn::parse(a.as_bytes()), NormDn::parse(b.as_bytes())) {
        (Some(x), Some(y)) => x == y,
        _ => a.eq_ignore_ascii_case(b),
    }
}

fn attr<'a>(e: &'a Entry, name: &str) -> Option<&'a Vec<Vec<u8>>> {
    e.attrs
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// Decides from the entries as the server holds them now (`read`: DN ->
/// the entry, `None` when there is none). `later`: a later journaled write
/// touched one of its entries.
pub fn verdict(request: &[u8], read: &HashMap<String, Option<Entry>>, later: bool) -> Verdict {
    if later {
        return Verdict::Unknown("a later write changed the same entry".into());
    }
    let get = |dn: &str| -> Option<&Entry> {
        read.iter()
            .find(|(k, _)| same_dn(k, dn))
            .and_then(|(_, e)| e.as_ref())
    };
    if crate::wire::Envelope::op_of(request) == Some(crate::wire::op::EXTENDED_REQUEST) {
        return Verdict::Unknown("an extended operation: what it did cannot be read back".into());
    }
    match decode(request) {
        Some(LdapOp::AddRequest(a)) => match get(&a.dn) {
            None => Verdict::NotApplied,
            Some(e) => {
                let all = a.attributes.iter().all(|at| {
                    at.vals
                        .iter()
                        .all(|v| attr(e, &at.atype).is_some_and(|have| have.contains(v)))
                });
                if all {
                    Verdict::Applied
                } else {
                    Verdict::Unknown("the entry exists with other values".into())
                }
            }
        },
        Some(LdapOp::DelRequest(dn)) => match get(&dn) {
            None => Verdict::Applied,
            Some(_) => Verdict::NotApplied,
        },
        Some(LdapOp::ModifyDNRequest(m)) => {
            let to = new_dn(&m.dn, &m.newrdn, m.new_superior.as_deref());
            match (get(&m.dn).is_some(), get(&to).is_some()) {
                (false, true) => Verdict::Applied,
                (true, false) => Verdict::NotApplied,
                _ => Verdict::Unknown("both names, or neither, exist".into()),
            }
        }
        Some(LdapOp::ModifyRequest(m)) => {
            let Some(e) = get(&m.dn) else {
                return Verdict::Unknown("the entry does not exist".into());
            };
            let mut seen = Vec::new();
            for c in &m.changes {
                let have = attr(e, &c.modification.atype);
                let vals = &c.modification.vals;
                let visible = match c.operation {
                    LdapModifyType::Add => vals.iter().all(|v| have.is_some_and(|h| h.contains(v))),
                    LdapModifyType::Delete if vals.is_empty() => have.is_none(),
                    LdapModifyType::Delete => {
                        vals.iter().all(|v| !have.is_some_and(|h| h.contains(v)))
                    }
                    LdapModifyType::Replace => match have {
                        None => vals.is_empty(),
                        Some(h) => h.len() == vals.len() && vals.iter().all(|v| h.contains(v)),
                    },
                    LdapModifyType::Increment => {
                        return Verdict::Unknown("an increment cannot be read back".into())
                    }
                };
                seen.push(visible);
            }
            if seen.iter().all(|v| *v) {
                Verdict::Applied
            } else if seen.iter().all(|v| !*v) {
                Verdict::NotApplied
            } else {
                Verdict::Unknown("some of its changes are there, some not".into())
            }
        }
        _ => Verdict::Unknown("not a write replay knows".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::pdu::encode;
    use ldap3_proto::proto::*;

    fn entry(dn: &str, attrs: &[(&str, &[&str])]) -> Option<Entry> {
        let mut e = Entry::new(dn);
        for (a, vs) in attrs {
            for v in *vs {
                e.push(a, v.as_bytes().to_vec());
            }
        }
        Some(e)
    }

    fn read(pairs: Vec<(&str, Option<Entry>)>) -> HashMap<String, Option<Entry>> {
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    fn modify(changes: Vec<(LdapModifyType, &str, &[&str])>) -> bytes::Bytes {
        encode(LdapMsg::new(
            2,
            LdapOp::ModifyRequest(LdapModifyRequest {
                dn: "cn=x,dc=org".into(),
                changes: changes
                    .into_iter()
                    .map(|(operation, a, vs)| LdapModify {
                        operation,
                        modification: LdapPartialAttribute {
                            atype: a.into(),
                            vals: vs.iter().map(|v| v.as_bytes().to_vec()).collect(),
                        },
                    })
                    .collect(),
            }),
        ))
    }

    #[test]
    fn adds_deletes_and_renames_are_read_back() {
        let add = encode(LdapMsg::new(
            2,
            LdapOp::AddRequest(LdapAddRequest {
                dn: "cn=x,dc=org".into(),
                attributes: vec![LdapAttribute {
                    atype: "cn".into(),
                    vals: vec![b"x".to_vec()],
                }],
            }),
        ));
        // Another spelling of the same DN.
        let there = read(vec![(
            "CN=X, DC=org",
            entry("cn=x,dc=org", &[("CN", &["x"])]),
        )]);
        assert_eq!(verdict(&add, &there, false), Verdict::Applied);
        assert_eq!(
            verdict(&add, &read(vec![("cn=x,dc=org", None)]), false),
            Verdict::NotApplied
        );
        assert!(matches!(verdict(&add, &there, true), Verdict::Unknown(_)));
        let del = encode(LdapMsg::new(2, LdapOp::DelRequest("cn=x,dc=org".into())));
        assert_eq!(verdict(&del, &there, false), Verdict::NotApplied);
        assert_eq!(
            verdict(&del, &read(vec![("cn=x,dc=org", None)]), false),
            Verdict::Applied
        );
        let ren = encode(LdapMsg::new(
            2,
            LdapOp::ModifyDNRequest(LdapModifyDNRequest {
                dn: "cn=x,dc=org".into(),
                newrdn: "cn=y".into(),
                deleteoldrdn: true,
                new_superior: Some("ou=p,dc=org".into()),
            }),
        ));
        assert_eq!(touched(&ren), vec!["cn=x,dc=org", "cn=y,ou=p,dc=org"]);
        let moved = read(vec![
            ("cn=x,dc=org", None),
            ("cn=y,ou=p,dc=org", entry("cn=y,ou=p,dc=org", &[])),
        ]);
        assert_eq!(verdict(&ren, &moved, false), Verdict::Applied);
        let stayed = read(vec![
            ("cn=x,dc=org", entry("cn=x,dc=org", &[])),
            ("cn=y,ou=p,dc=org", None),
        ]);
        assert_eq!(verdict(&ren, &stayed, false), Verdict::NotApplied);
        assert_eq!(parent_of("cn=a\\,b,dc=org"), "dc=org");
    }

    #[test]
    fn a_modify_is_applied_when_all_its_changes_show() {
        let m = modify(vec![
            (LdapModifyType::Replace, "description", &["new"]),
            (LdapModifyType::Add, "mail", &["a@x"]),
            (LdapModifyType::Delete, "title", &[]),
        ]);
        let after = read(vec![(
            "cn=x,dc=org",
            entry(
                "cn=x,dc=org",
                &[("description", &["new"]), ("mail", &["a@x", "b@x"])],
            ),
        )]);
        assert_eq!(verdict(&m, &after, false), Verdict::Applied);
        let before = read(vec![(
            "cn=x,dc=org",
            entry(
                "cn=x,dc=org",
                &[("description", &["old"]), ("title", &["t"])],
            ),
        )]);
        assert_eq!(verdict(&m, &before, false), Verdict::NotApplied);
        let half = read(vec![(
            "cn=x,dc=org",
            entry(
                "cn=x,dc=org",
                &[("description", &["new"]), ("title", &["t"])],
            ),
        )]);
        assert!(matches!(verdict(&m, &half, false), Verdict::Unknown(_)));
        let inc = modify(vec![(LdapModifyType::Increment, "uidNumber", &["1"])]);
        assert!(matches!(verdict(&inc, &after, false), Verdict::Unknown(_)));
    }
}
