//! The throughput workloads (`search`, `bind`, `modify`): their requests,
//! pre-encoded once per user as protocolOp TLVs, and the framing that gives
//! each a fresh message ID when it is sent.

use abproxy::wire::ber::{read_header, write_len};
use abproxy::wire::pdu;
use ldap3_proto::proto::{
    LdapBindCred, LdapBindRequest, LdapDerefAliases, LdapFilter, LdapModify, LdapModifyRequest,
    LdapModifyType, LdapMsg, LdapOp, LdapPartialAttribute, LdapSearchRequest, LdapSearchScope,
};
use testkit::{user_dn, user_pw, ADMIN_DN, ADMIN_PW};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Search,
    Bind,
    Modify,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Search => "search",
            Kind::Bind => "bind",
            Kind::Modify => "modify",
        }
    }
}

/// The pre-encoded protocolOp TLVs of one workload, one per user, and the
/// connection set-up (a bind) if it needs one.
pub struct Workload {
    pub kind: Kind,
    pub ops: Vec<Vec<u8>>,
    pub setup: Option<Vec<u8>>,
}

/// The protocolOp TLV of an encoded message without controls.
pub fn op_tlv(op: LdapOp) -> Vec<u8> {
    let msg = pdu::encode(LdapMsg::new(1, op));
    let outer = read_header(&msg).unwrap().unwrap();
    let inner = &msg[outer.header_len..outer.total_len()];
    let id = read_header(inner).unwrap().unwrap();
    inner[id.total_len()..].to_vec()
}

pub fn simple_bind(dn: &str, pw: &str) -> Vec<u8> {
    op_tlv(LdapOp::BindRequest(LdapBindRequest {
        version: 3,
        dn: dn.to_string(),
        cred: LdapBindCred::Simple(pw.to_string()),
    }))
}

impl Workload {
    pub fn new(kind: Kind, users: usize) -> Workload {
        let op = |k: usize| match kind {
            Kind::Search => op_tlv(LdapOp::SearchRequest(LdapSearchRequest {
                base: user_dn(k),
                scope: LdapSearchScope::Base,
                aliases: LdapDerefAliases::Never,
                sizelimit: 0,
                timelimit: 0,
                typesonly: false,
                filter: LdapFilter::Present("objectClass".into()),
                attrs: Vec::new(),
            })),
            Kind::Bind => simple_bind(&user_dn(k), &user_pw(k)),
            Kind::Modify => op_tlv(LdapOp::ModifyRequest(LdapModifyRequest {
                dn: user_dn(k),
                changes: vec![LdapModify {
                    operation: LdapModifyType::Replace,
                    modification: LdapPartialAttribute {
                        atype: "description".into(),
                        vals: vec![format!("load test user{k}").into_bytes()],
                    },
                }],
            })),
        };
        Workload {
            kind,
            ops: (1..=users).map(op).collect(),
            setup: (kind == Kind::Modify).then(|| simple_bind(ADMIN_DN, ADMIN_PW)),
        }
    }
}

/// `SEQUENCE { messageID, protocolOp }` into `out`.
pub fn frame_into(out: &mut Vec<u8>, msgid: i32, op: &[u8]) {
    let be = msgid.to_be_bytes();
    // Shortest two's complement form of a non-negative INTEGER.
    let mut skip = 0;
    while skip < 3 && be[skip] == 0 && be[skip + 1] & 0x80 == 0 {
        skip += 1;
    }
    let id = &be[skip..];
    out.clear();
    out.push(0x30);
    write_len(out, 2 + id.len() + op.len());
    out.push(0x02);
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out.extend_from_slice(op);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;

    fn decode(frame: &[u8]) -> LdapMsg {
        let mut buf = BytesMut::from(frame);
        let msg = ldap3_proto::LdapCodec::new(None, None)
            .decode(&mut buf)
            .unwrap()
            .expect("one whole message");
        assert!(buf.is_empty());
        msg
    }

    /// The message ID in its shortest form, the op as encoded.
    #[test]
    fn framing() {
        let w = Workload::new(Kind::Search, 3);
        let mut out = Vec::new();
        for (id, enc) in [
            (1, &[0x01][..]),
            (127, &[0x7f]),
            (128, &[0x00, 0x80]),
            (256, &[0x01, 0x00]),
            (65_535, &[0x00, 0xff, 0xff]),
            (i32::MAX, &[0x7f, 0xff, 0xff, 0xff]),
        ] {
            frame_into(&mut out, id, &w.ops[0]);
            let at = out.iter().position(|&b| b == 0x02).unwrap();
            assert_eq!(out[at + 1] as usize, enc.len(), "id {id}");
            assert_eq!(&out[at + 2..at + 2 + enc.len()], enc, "id {id}");
            let m = decode(&out);
            assert_eq!(m.msgid, id);
            let LdapOp::SearchRequest(s) = m.op else {
                panic!("{:?}", m.op)
            };
            assert_eq!(s.base, user_dn(1));
        }
    }

    /// One request per user (user k+1 at index k); modify binds first.
    #[test]
    fn workloads() {
        let mut out = Vec::new();
        for kind in [Kind::Search, Kind::Bind, Kind::Modify] {
            let w = Workload::new(kind, 5);
            assert_eq!(w.ops.len(), 5);
            assert_eq!(w.setup.is_some(), kind == Kind::Modify);
            frame_into(&mut out, 9, &w.ops[4]);
            match (kind, decode(&out).op) {
                (Kind::Search, LdapOp::SearchRequest(s)) => {
                    assert_eq!(s.base, user_dn(5));
                    assert_eq!(s.scope, LdapSearchScope::Base);
                }
                (Kind::Bind, LdapOp::BindRequest(b)) => {
                    assert_eq!(b.dn, user_dn(5));
                    assert_eq!(b.cred, LdapBindCred::Simple(user_pw(5)));
                }
                (Kind::Modify, LdapOp::ModifyRequest(m)) => {
                    assert_eq!(m.dn, user_dn(5));
                    assert_eq!(m.changes[0].modification.atype, "description");
                }
                (k, op) => panic!("{k:?}: {op:?}"),
            }
        }
        frame_into(&mut out, 1, &Workload::new(Kind::Modify, 1).setup.unwrap());
        let LdapOp::BindRequest(b) = decode(&out).op else {
            panic!()
        };
        assert_eq!(b.dn, ADMIN_DN);
    }
}
