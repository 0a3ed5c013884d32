//! Backends (DN suffix -> freeze mode) and the classification of each
//! request: which backends it touches, and whether it reads or writes.

use serde::Deserialize;

use super::dn::{NormDn, Within};
use crate::wire::envelope::oid;
use crate::wire::{op, Envelope};

/// How a backend behaves while frozen (the proposal's BACKUP_STARTING answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Writes are held, reads go on (the default).
    #[default]
    Readonly,
    /// Every operation is held.
    Stop,
    /// Cannot be frozen: an Allow-Backup ON touching it is refused.
    Unimplemented,
}

/// A set of backends, by index in the [`BackendMap`] (at most 64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct BackendSet(pub u64);

impl BackendSet {
    /// No backend.
    pub const EMPTY: BackendSet = BackendSet(0);
    /// Every backend.
    pub const ALL: BackendSet = BackendSet(u64::MAX);

    /// Adds backend `i`.
    pub fn insert(&mut self, i: usize) {
        self.0 |= 1 << i;
    }

    /// True if backend `i` is in the set.
    pub fn contains(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }

    /// True if no backend is in the set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Intersection.
    pub fn and(self, other: BackendSet) -> BackendSet {
        BackendSet(self.0 & other.0)
    }

    /// Union.
    pub fn or(self, other: BackendSet) -> BackendSet {
        BackendSet(self.0 | other.0)
    }

    /// Indices in the set, below `n`.
    pub fn iter(self, n: usize) -> impl Iterator<Item = usize> {
        (0..n.min(64)).filter(move |&i| self.contains(i))
    }
}

/// One backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// The suffix as configured or read from the rootDSE.
    pub suffix: String,
    /// Its normalised form.
    pub norm: NormDn,
    /// Its freeze mode.
    pub mode: Mode,
}

#[cfg(test)]
impl Backend {
    /// A `readonly` backend with this (valid) suffix, for tests.
    pub(crate) fn readonly(suffix: &str) -> Backend {
        Backend {
            suffix: suffix.into(),
            norm: NormDn::parse(suffix.as_bytes()).expect("a valid suffix"),
            mode: Mode::Readonly,
        }
    }
}

/// The backends of the upstream, by suffix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendMap {
    backends: Vec<Backend>,
}

/// Maximum number of backends (a [`BackendSet`] is 64 bits).
pub const MAX_BACKENDS: usize = 64;

/// Why a list of suffixes is no [`BackendMap`] (a configuration error, or
/// a root DSE whose namingContexts cannot serve as backends).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendMapError {
    /// A suffix that does not parse as a DN, or the root DN.
    #[error("backend suffix {0:?} is not a valid DN")]
    InvalidSuffix(String),
    /// The same suffix (as DNs compare) twice.
    #[error("backend suffix {0:?} is listed twice")]
    Duplicate(String),
    /// More than [`MAX_BACKENDS`].
    #[error("at most {MAX_BACKENDS} backends are supported")]
    TooMany,
}

impl BackendMap {
    /// Builds the map; suffixes that do not parse or repeat are errors.
    pub fn new(
        list: impl IntoIterator<Item = (String, Mode)>,
    ) -> Result<BackendMap, BackendMapError> {
        let mut backends: Vec<Backend> = Vec::new();
        for (suffix, mode) in list {
            let Some(norm) = NormDn::parse(suffix.as_bytes()).filter(|n| !n.is_root()) else {
                return Err(BackendMapError::InvalidSuffix(suffix));
            };
            if backends.iter().any(|b| b.norm == norm) {
                return Err(BackendMapError::Duplicate(suffix));
            }
            backends.push(Backend { suffix, norm, mode });
        }
        if backends.len() > MAX_BACKENDS {
            return Err(BackendMapError::TooMany);
        }
        Ok(BackendMap { backends })
    }

    /// The backends, in order.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Number of backends.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// Every backend.
    pub fn all(&self) -> BackendSet {
        let mut s = BackendSet::EMPTY;
        for i in 0..self.backends.len() {
            s.insert(i);
        }
        s
    }

    /// The backend holding `dn`: the one with the longest suffix containing it.
    pub fn holding(&self, dn: &NormDn) -> Option<usize> {
        self.backends
            .iter()
            .enumerate()
            .filter(|(_, b)| dn.is_within(&b.norm))
            .max_by_key(|(_, b)| b.norm.depth())
            .map(|(i, _)| i)
    }

    /// Backends whose suffix lies (or may lie) strictly below `dn`.
    fn below(&self, dn: &NormDn) -> BackendSet {
        let mut s = BackendSet::EMPTY;
        for (i, b) in self.backends.iter().enumerate() {
            if b.norm.within(dn) != Within::No && b.norm != *dn {
                s.insert(i);
            }
        }
        s
    }

    /// The backend holding `dn` (the longest suffix containing it), as a
    /// set: empty under no backend, every backend when the normalisation
    /// cannot tell.
    fn holding_set(&self, dn: &NormDn) -> BackendSet {
        let mut best: Option<usize> = None;
        for (i, b) in self.backends.iter().enumerate() {
            match dn.within(&b.norm) {
                Within::No => {}
                Within::Maybe => return self.all(),
                Within::Yes => {
                    if best.is_none_or(|j| self.backends[j].norm.depth() < b.norm.depth()) {
                        best = Some(i);
                    }
                }
            }
        }
        best.map_or(BackendSet::EMPTY, |i| BackendSet(1 << i))
    }

    /// Backends a DN-targeted operation touches. A DN that does not parse,
    /// or that the proxy cannot place with certainty, touches every backend
    /// (holding is harmless; the server may read it as a DN under a frozen
    /// suffix). A write under no backend (cn=config, cn=schema, a DN the
    /// proxy does not know) touches every backend too: the server may
    /// rewrite frozen databases for it (a new index, a schema change).
    fn for_dn(&self, dn: Option<&[u8]>, write: bool) -> BackendSet {
        let Some(dn) = dn else {
            return self.all();
        };
        match NormDn::parse(dn) {
            Some(n) => match self.holding_set(&n) {
                BackendSet::EMPTY if write => self.all(),
                s => s,
            },
            None => self.all(),
        }
    }

    /// Backends a search touches: the one holding its base, plus, for
    /// one-level, subtree and children scopes, every backend below the base
    /// (a search above several suffixes belongs to all of them). A base
    /// search of the root DSE or of cn=Subschema touches none.
    fn for_search(&self, base: Option<&[u8]>, scope: Option<u32>) -> BackendSet {
        let Some(norm) = base.and_then(NormDn::parse) else {
            return self.all();
        };
        let mut s = self.holding_set(&norm);
        if scope != Some(0) {
            s = s.or(self.below(&norm));
        }
        s
    }
}

/// What a request is, for the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Never held: unbind, abandon, whoami, StartTLS, cancel, Allow-Backup.
    Never,
    /// Held only by `stop` backends.
    Read,
    /// Held by `readonly` and `stop` backends.
    Write,
}

/// The gate's view of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    /// Read, write or never held.
    pub kind: Kind,
    /// Backends it touches.
    pub backends: BackendSet,
}

impl Class {
    /// A request that is never held.
    pub const NEVER: Class = Class {
        kind: Kind::Never,
        backends: BackendSet::EMPTY,
    };
}

/// Classification settings (from the `[freeze]` config).
#[derive(Debug, Default)]
pub struct ClassifyOptions {
    /// Treat binds as writes (servers that write on bind, e.g. ppolicy's
    /// pwdFailureTime or lastbind): `bind_is_write`, or what `auto` found
    /// (changed only while nothing is frozen).
    pub bind_is_write: std::sync::atomic::AtomicBool,
    /// DNs whose binds write nothing whatever `bind_is_write` says
    /// (`root_dns`: the server's rootdns).
    pub root_dns: Vec<NormDn>,
    /// Extended operations known to be read-only (held only in stop mode).
    pub read_only_extended: Vec<String>,
}

impl ClassifyOptions {
    /// Whether the journal records this request: the writes a freeze
    /// holds (unknown operations and extended operations not known to be
    /// read-only too, kept as opaque), binds excepted (what a bind writes,
    /// a failure counter or a last-bind time, is the server's doing).
    pub fn journals(&self, env: &Envelope, frame: &[u8]) -> bool {
        match env.op {
            op::ADD_REQUEST | op::DEL_REQUEST | op::MODIFY_REQUEST | op::MODDN_REQUEST => true,
            op::EXTENDED_REQUEST => {
                let name = env.oid_bytes(frame).unwrap_or_default();
                !NEVER_HELD_EXTENDED.contains(&name)
                    && !self.read_only_extended.iter().any(|o| o.as_bytes() == name)
            }
            op::BIND_REQUEST
            | op::SEARCH_REQUEST
            | op::COMPARE_REQUEST
            | op::UNBIND_REQUEST
            | op::ABANDON_REQUEST => false,
            _ => true,
        }
    }
}

/// Extended operations that are never held.
const NEVER_HELD_EXTENDED: &[&[u8]] = &[
    oid::WHOAMI,
    oid::START_TLS,
    oid::CANCEL,
    abproxy_proto::ALLOW_BACKUP_OID.as_bytes(),
    abproxy_proto::ALLOW_BACKUP_STATUS_OID.as_bytes(),
];

/// Reads the userIdentity of a password modify request value (RFC 3062):
/// `SEQUENCE { userIdentity [0] OCTET STRING OPTIONAL, ... }`.
fn passwd_user(value: Option<&[u8]>) -> Option<&[u8]> {
    use crate::wire::ber::Reader;
    let v = value?;
    let mut r = Reader::new(v, 0, v.len());
    let seq = r.expect(0x30, "PasswdModifyRequestValue").ok()?;
    let mut inner = Reader::inside(v, seq);
    inner.optional(0x80).ok()?.map(|t| t.value(v))
}

impl BackendMap {
    /// Classifies a request. `bound_dn` is the session's identity (for a
    /// password modify of one's own password).
    pub fn classify(
        &self,
        env: &Envelope,
        frame: &[u8],
        opts: &ClassifyOptions,
        bound_dn: Option<&[u8]>,
    ) -> Class {
        let dn = env.dn_bytes(frame);
        let (kind, backends) = match env.op {
            op::UNBIND_REQUEST | op::ABANDON_REQUEST => return Class::NEVER,
            op::SEARCH_REQUEST => (Kind::Read, self.for_search(dn, env.scope)),
            op::COMPARE_REQUEST => (Kind::Read, self.for_dn(dn, false)),
            op::BIND_REQUEST => {
                let kind = if opts
                    .bind_is_write
                    .load(std::sync::atomic::Ordering::Relaxed)
                    && !dn
                        .and_then(NormDn::parse)
                        .is_some_and(|n| opts.root_dns.contains(&n))
                {
                    Kind::Write
                } else {
                    Kind::Read
                };
                // An anonymous or SASL bind names no entry of a backend.
                let backends = match dn {
                    // What a bind may write (a failure counter, a
                    // last-bind time) is in the entry it names.
                    Some(d) if !d.is_empty() => self.for_dn(Some(d), false),
                    _ => BackendSet::EMPTY,
                };
                (kind, backends)
            }
            op::ADD_REQUEST | op::DEL_REQUEST | op::MODIFY_REQUEST => {
                (Kind::Write, self.for_dn(dn, true))
            }
            op::MODDN_REQUEST => {
                let mut s = self.for_dn(dn, true);
                if let Some(sup) = env.new_superior_bytes(frame) {
                    s = s.or(self.for_dn(Some(sup), true));
                }
                (Kind::Write, s)
            }
            op::EXTENDED_REQUEST => {
                let name = env.oid_bytes(frame).unwrap_or_default();
                if NEVER_HELD_EXTENDED.contains(&name) {
                    return Class::NEVER;
                }
                if name == oid::PASSWORD_MODIFY {
                    let user = passwd_user(env.value_bytes(frame)).or(bound_dn);
                    (
                        Kind::Write,
                        self.for_dn(user.filter(|u| !u.is_empty()), true),
                    )
                } else if opts.read_only_extended.iter().any(|o| o.as_bytes() == name) {
                    (Kind::Read, self.all())
                } else {
                    (Kind::Write, self.all())
                }
            }
            // Unknown operations: the server decides what they do, so they
            // are held like writes to everything.
            _ => (Kind::Write, self.all()),
        };
        Class { kind, backends }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::pdu::encode;
    use ldap3_proto::proto::*;

    fn map() -> BackendMap {
        BackendMap::new([
            ("dc=example,dc=org".to_string(), Mode::Readonly),
            ("dc=other,dc=org".to_string(), Mode::Stop),
            ("ou=sub,dc=example,dc=org".to_string(), Mode::Readonly),
        ])
        .unwrap()
    }

    fn class(msg: LdapOp) -> Class {
        let b = encode(LdapMsg::new(1, msg));
        let env = Envelope::request(&b).unwrap();
        map().classify(
            &env,
            &b,
            &ClassifyOptions::default(),
            Some(b"cn=x,dc=other,dc=org"),
        )
    }

    fn search(base: &str, scope: LdapSearchScope) -> LdapOp {
        LdapOp::SearchRequest(LdapSearchRequest {
            base: base.into(),
            scope,
            aliases: LdapDerefAliases::Never,
            sizelimit: 0,
            timelimit: 0,
            typesonly: false,
            filter: LdapFilter::Present("objectClass".into()),
            attrs: vec![],
        })
    }

    #[test]
    fn searches() {
        let c = class(search(
            "uid=a,ou=People,DC=Example,dc=org",
            LdapSearchScope::Base,
        ));
        assert_eq!(
            c,
            Class {
                kind: Kind::Read,
                backends: BackendSet(0b001)
            }
        );
        // The longest suffix wins.
        let c = class(search(
            "cn=x,ou=sub,dc=example,dc=org",
            LdapSearchScope::Subtree,
        ));
        assert_eq!(c.backends, BackendSet(0b100));
        // A subtree search of dc=example,dc=org includes the sub-suffix.
        let c = class(search("dc=example,dc=org", LdapSearchScope::Subtree));
        assert_eq!(c.backends, BackendSet(0b101));
        // Above every suffix: all of them; the rootDSE itself: none.
        assert_eq!(
            class(search("dc=org", LdapSearchScope::Subtree)).backends,
            BackendSet(0b111)
        );
        assert_eq!(
            class(search("", LdapSearchScope::Base)).backends,
            BackendSet::EMPTY
        );
        assert_eq!(
            class(search("cn=Subschema", LdapSearchScope::Base)).backends,
            BackendSet::EMPTY
        );
        assert_eq!(
            class(search("dc=org", LdapSearchScope::Base)).backends,
            BackendSet::EMPTY
        );
    }

    #[test]
    fn writes() {
        let c = class(LdapOp::DelRequest("uid=a,dc=other,dc=org".into()));
        assert_eq!(
            c,
            Class {
                kind: Kind::Write,
                backends: BackendSet(0b010)
            }
        );
        let c = class(LdapOp::ModifyDNRequest(LdapModifyDNRequest {
            dn: "uid=a,dc=example,dc=org".into(),
            newrdn: "uid=b".into(),
            deleteoldrdn: true,
            new_superior: Some("ou=x,dc=other,dc=org".into()),
        }));
        assert_eq!(c.backends, BackendSet(0b011));
        let c = class(LdapOp::ExtendedRequest(LdapExtendedRequest {
            name: "1.3.6.1.4.1.4203.1.11.1".into(),
            value: None,
        }));
        assert_eq!(
            c,
            Class {
                kind: Kind::Write,
                backends: BackendSet(0b010)
            },
            "own password"
        );
        let c = class(LdapOp::ExtendedRequest(LdapExtendedRequest {
            name: "1.3.6.1.4.1.4203.1.11.1".into(),
            value: Some(vec![0x30, 0x05, 0x80, 0x03, b'o', b'=', b'x']),
        }));
        assert_eq!(
            c.backends,
            BackendSet(0b111),
            "a user under no backend: held like a write to every backend"
        );
        let c = class(LdapOp::ExtendedRequest(LdapExtendedRequest {
            name: "1.2.3.4".into(),
            value: None,
        }));
        assert_eq!(
            c,
            Class {
                kind: Kind::Write,
                backends: BackendSet(0b111)
            }
        );
    }

    #[test]
    fn never_held() {
        for name in [
            "1.3.6.1.4.1.4203.1.11.3",
            "1.3.6.1.4.1.1466.20037",
            "1.3.6.1.1.8",
            abproxy_proto::ALLOW_BACKUP_OID,
            abproxy_proto::ALLOW_BACKUP_STATUS_OID,
        ] {
            let c = class(LdapOp::ExtendedRequest(LdapExtendedRequest {
                name: name.into(),
                value: None,
            }));
            assert_eq!(c, Class::NEVER, "{name}");
        }
        assert_eq!(class(LdapOp::AbandonRequest(3)), Class::NEVER);
        assert_eq!(class(LdapOp::UnbindRequest), Class::NEVER);
    }

    #[test]
    fn binds() {
        let bind = |dn: &str| {
            LdapOp::BindRequest(LdapBindRequest {
                version: 3,
                dn: dn.into(),
                cred: LdapBindCred::Simple("x".into()),
            })
        };
        assert_eq!(
            class(bind("uid=a,dc=example,dc=org")),
            Class {
                kind: Kind::Read,
                backends: BackendSet(1)
            }
        );
        assert_eq!(class(bind("")).backends, BackendSet::EMPTY);
        let b = encode(LdapMsg::new(1, bind("uid=a,dc=example,dc=org")));
        let env = Envelope::request(&b).unwrap();
        let opts = ClassifyOptions {
            bind_is_write: true.into(),
            ..Default::default()
        };
        assert_eq!(map().classify(&env, &b, &opts, None).kind, Kind::Write);
    }

    #[test]
    fn bad_maps() {
        let e = BackendMap::new([("x".to_string(), Mode::Stop)]).unwrap_err();
        assert_eq!(e, BackendMapError::InvalidSuffix("x".into()));
        assert_eq!(e.to_string(), "backend suffix \"x\" is not a valid DN");
        assert_eq!(
            BackendMap::new([("".to_string(), Mode::Stop)]),
            Err(BackendMapError::InvalidSuffix(String::new()))
        );
        let e = BackendMap::new([
            ("dc=a".to_string(), Mode::Stop),
            ("DC=A".to_string(), Mode::Readonly),
        ])
        .unwrap_err();
        assert_eq!(e, BackendMapError::Duplicate("DC=A".into()));
        assert_eq!(e.to_string(), "backend suffix \"DC=A\" is listed twice");
        let many = (0..=MAX_BACKENDS).map(|i| (format!("dc=b{i}"), Mode::Readonly));
        let e = BackendMap::new(many).unwrap_err();
        assert_eq!(e.to_string(), "at most 64 backends are supported");
    }

    fn write_to(dn: &str) -> Class {
        class(LdapOp::DelRequest(dn.into()))
    }

    #[test]
    fn odd_spellings_of_a_frozen_dn_are_found() {
        for dn in [
            "uid=a,dc=\"example\",dc=org",
            "uid=a , dc=example ; dc=org",
            "uid=a,dc=#04076578616d706c65,dc=org",
            "uid=a,0.9.2342.19200300.100.1.25=EXAMPLE,dc=org",
            // Plain but in capitals (NormDn's one-pass reading).
            "UID=A,DC=Example,DC=ORG",
        ] {
            assert_eq!(write_to(dn).backends, BackendSet(0b001), "{dn}");
        }
        // Cannot be placed with certainty: every backend.
        for dn in [
            "uid=a,dc=exampl\u{e9},dc=org",
            "uid=a,1.2.3.4=example,dc=org",
            "uid=a,dc=#3000,dc=org",
        ] {
            assert_eq!(write_to(dn).backends, BackendSet(0b111), "{dn}");
            assert_eq!(
                class(search(dn, LdapSearchScope::Base)).backends,
                BackendSet(0b111),
                "{dn}"
            );
        }
    }

    #[test]
    fn writes_under_no_backend_touch_every_backend_reads_none() {
        for dn in [
            "olcDatabase={1}mdb,cn=config",
            "cn=schema,cn=config",
            "dc=org",
            "",
        ] {
            assert_eq!(write_to(dn).backends, BackendSet(0b111), "{dn}");
            assert_eq!(
                class(search(dn, LdapSearchScope::Base)).backends,
                BackendSet::EMPTY,
                "{dn}"
            );
        }
        let c = class(LdapOp::ModifyDNRequest(LdapModifyDNRequest {
            dn: "cn=x,cn=config".into(),
            newrdn: "cn=y".into(),
            deleteoldrdn: true,
            new_superior: None,
        }));
        assert_eq!(c.backends, BackendSet(0b111));
    }
}
