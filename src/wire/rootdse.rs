//! The one response the proxy rewrites: the root DSE entry, to announce the
//! extended operations it implements in `supportedExtension`. Only that
//! attribute's value set and the lengths enclosing it change; every other
//! byte of the entry is the server's.

use bytes::Bytes;

use super::ber::{write_len, BerError, Reader, Tlv};

/// An element with the offset of its header.
#[derive(Clone, Copy)]
struct Elem {
    head: usize,
    tlv: Tlv,
}

fn next(r: &mut Reader<'_>, pos: usize) -> Result<Elem, BerError> {
    let tlv = r.next_tlv()?;
    Ok(Elem { head: pos, tlv })
}

/// Rebuilds `frame` with `extra` appended to the value of the innermost
/// element of `chain` (outermost first), fixing every enclosing length.
fn append_inside(frame: &[u8], chain: &[Elem], extra: &[u8]) -> Vec<u8> {
    let inner = chain[chain.len() - 1];
    let mut content: Vec<u8> = frame[inner.tlv.start..inner.tlv.end].to_vec();
    content.extend_from_slice(extra);
    let mut built = wrap(inner.tlv.tag, &content);
    for pair in chain.windows(2).rev() {
        let (outer, child) = (pair[0], pair[1]);
        let mut c = frame[outer.tlv.start..child.head].to_vec();
        c.extend_from_slice(&built);
        c.extend_from_slice(&frame[child.tlv.end..outer.tlv.end]);
        built = wrap(outer.tlv.tag, &c);
    }
    built
}

fn wrap(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(content.len() + 6);
    v.push(tag);
    write_len(&mut v, content.len());
    v.extend_from_slice(content);
    v
}

/// Adds the `oids` missing from the `supportedExtension` attribute of a
/// SearchResultEntry. `None` when the entry has no such attribute (it was
/// not requested) or already lists them all, or is not well-formed.
pub fn add_supported_extensions(frame: &[u8], oids: &[&str]) -> Option<Bytes> {
    let mut top = Reader::new(frame, 0, frame.len());
    let msg = next(&mut top, 0).ok()?;
    let mut pos = Reader::inside(frame, msg.tlv)
        .expect(0x02, "messageID")
        .ok()?
        .end;
    let mut r = Reader::new(frame, pos, msg.tlv.end);
    let entry = next(&mut r, pos).ok()?;
    if entry.tlv.tag != 0x64 {
        return None;
    }
    let mut er = Reader::inside(frame, entry.tlv);
    let name = er.expect(0x04, "objectName").ok()?;
    pos = name.end;
    let attrs = next(&mut er, pos).ok()?;
    if attrs.tlv.tag != 0x30 {
        return None;
    }
    let mut ar = Reader::inside(frame, attrs.tlv);
    pos = attrs.tlv.start;
    while !ar.is_empty() {
        let attr = next(&mut ar, pos).ok()?;
        pos = attr.tlv.end;
        let mut pr = Reader::inside(frame, attr.tlv);
        let ty = pr.expect(0x04, "type").ok()?;
        if !ty.value(frame).eq_ignore_ascii_case(b"supportedExtension") {
            continue;
        }
        let vals = next(&mut pr, ty.end).ok()?;
        if vals.tlv.tag != 0x31 {
            return None;
        }
        let mut vr = Reader::inside(frame, vals.tlv);
        let mut present = Vec::new();
        while !vr.is_empty() {
            present.push(vr.expect(0x04, "value").ok()?.value(frame));
        }
        let mut extra = Vec::new();
        for oid in oids {
            if !present.contains(&oid.as_bytes()) {
                extra.extend_from_slice(&wrap(0x04, oid.as_bytes()));
            }
        }
        if extra.is_empty() {
            return None;
        }
        let chain = [msg, entry, attrs, attr, vals];
        return Some(Bytes::from(append_inside(frame, &chain, &extra)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::pdu::encode;
    use crate::wire::Envelope;
    use ldap3_proto::proto::*;

    fn entry(attrs: Vec<(&str, Vec<&str>)>) -> Bytes {
        encode(LdapMsg::new(
            7,
            LdapOp::SearchResultEntry(LdapSearchResultEntry {
                dn: "".into(),
                attributes: attrs
                    .into_iter()
                    .map(|(t, vs)| LdapPartialAttribute {
                        atype: t.into(),
                        vals: vs.into_iter().map(|v| v.as_bytes().to_vec()).collect(),
                    })
                    .collect(),
            }),
        ))
    }

    #[test]
    fn appends_missing_oids_only() {
        let before = entry(vec![
            ("namingContexts", vec!["dc=example,dc=org"]),
            ("supportedExtension", vec!["1.3.6.1.4.1.4203.1.11.3"]),
            ("supportedControl", vec!["1.2.3"]),
        ]);
        let after =
            add_supported_extensions(&before, &["1.2.9", "1.3.6.1.4.1.4203.1.11.3"]).unwrap();
        let want = entry(vec![
            ("namingContexts", vec!["dc=example,dc=org"]),
            (
                "supportedExtension",
                vec!["1.3.6.1.4.1.4203.1.11.3", "1.2.9"],
            ),
            ("supportedControl", vec!["1.2.3"]),
        ]);
        assert_eq!(after, want);
        assert_eq!(Envelope::response(&after).unwrap().msgid, 7);
        assert!(add_supported_extensions(&after, &["1.2.9"]).is_none());
    }

    #[test]
    fn long_lengths_are_rebuilt() {
        let many: Vec<String> = (0..40).map(|i| format!("1.3.6.1.4.1.99999.{i}")).collect();
        let before = entry(vec![(
            "supportedExtension",
            many.iter().map(String::as_str).collect(),
        )]);
        let after = add_supported_extensions(&before, &["2.25.1"]).unwrap();
        let mut all = many.clone();
        all.push("2.25.1".into());
        assert_eq!(
            after,
            entry(vec![(
                "supportedExtension",
                all.iter().map(String::as_str).collect()
            )])
        );
    }

    #[test]
    fn untouched_without_the_attribute() {
        let e = entry(vec![("namingContexts", vec!["dc=x"])]);
        assert!(add_supported_extensions(&e, &["1.2"]).is_none());
        assert!(add_supported_extensions(&[0x30, 0x00], &["1.2"]).is_none());
    }
}
