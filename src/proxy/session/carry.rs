//! Carrying a session across a restart of the server (a cold backup, a
//! restore or an upgrade during a `stop`-mode freeze): what the session's
//! upstream connection holds, and how a new connection is given the same.
//!
//! A connection holds an identity: none (anonymous) or the one a simple
//! bind gave. Both can be given to a new connection: the proxy keeps the
//! bind request of the last successful simple bind (in memory only, wiped
//! when replaced or dropped), replays it on the new connection, then asks
//! the server who the connection is (Who am I?, RFC 4532) and goes on only
//! when the answer is the identity the client had. Anything else a
//! connection may hold (a SASL bind and its security layer, requests in
//! flight, persistent searches, paged-results cookies and VLV contexts the
//! client has not handed back) cannot be carried: such a session ends
//! with a Notice of Disconnection, as without the proxy.

use ldap3_proto::proto::{LdapExtendedRequest, LdapMsg, LdapOp};

use super::{UpIn, UpOut};
use crate::freeze::dn::NormDn;
use crate::wire::{op, pdu, Envelope};

/// Who am I? (RFC 4532).
const WHOAMI_OID: &str = "1.3.6.1.4.1.4203.1.11.3";
/// Message ID of the proxy's Who am I? on a new connection (nothing of the
/// client's is outstanding there yet).
const WHOAMI_ID: i32 = i32::MAX - 1;

/// What a session's upstream connection holds, kept by the responses loop
/// as binds are answered: one buffer for the session's life (no allocation
/// per bind), wiped whenever it changes and when the session ends.
pub(super) struct Carry {
    kind: Kind,
    /// The bind request of `Kind::Simple`.
    request: Vec<u8>,
    /// Paged-results cookies and virtual list view contexts the server
    /// handed out and the client has not handed back yet (`wire::paging`):
    /// a new connection would not know them.
    search_state: Vec<Vec<u8>>,
    /// More than `MAX_SEARCH_STATE` at once: which were handed back can no
    /// longer be told, so the session stays uncarriable.
    search_state_lost: bool,
}

/// Cookies and contexts tracked per session; beyond, the session is not
/// carried (bounded memory whatever the client does).
const MAX_SEARCH_STATE: usize = 16;

/// Why a session holding search state is not carried.
const SEARCH_STATE: &str = "the server holds a paged-results cookie or a virtual list view \
     context for it, which a new connection would not know";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Anonymous,
    Simple,
    No(&'static str),
}

impl std::fmt::Debug for Carry {
    // Never the request: it holds the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Carry({:?})", self.kind)
    }
}

impl Default for Carry {
    fn default() -> Self {
        Carry {
            kind: Kind::Anonymous,
            request: Vec::new(),
            search_state: Vec::new(),
            search_state_lost: false,
        }
    }
}

impl Carry {
    /// The connection has no identity (an anonymous or a failed bind).
    pub(super) fn anonymous(&mut self) {
        self.wipe();
        self.kind = Kind::Anonymous;
    }

    /// A simple bind succeeded with this request. The new bytes overwrite
    /// the old ones in place (and what is left of a longer one is zeroed):
    /// once per bind, so no separate wipe of the whole buffer.
    pub(super) fn simple(&mut self, request: &[u8]) {
        if let Some(tail) = self.request.get_mut(request.len()..) {
            zero(tail);
        }
        self.request.clear();
        self.request.extend_from_slice(request);
        self.kind = Kind::Simple;
    }

    /// The connection holds what cannot be carried.
    pub(super) fn cannot(&mut self, why: &'static str) {
        self.wipe();
        self.kind = Kind::No(why);
    }

    /// Why this connection cannot be carried, if it cannot.
    pub(super) fn refusal(&self) -> Option<&'static str> {
        match self.kind {
            Kind::No(why) => Some(why),
            _ if self.holds_search_state() => Some(SEARCH_STATE),
            _ => None,
        }
    }

    /// The server handed out a paged-results cookie or a VLV context.
    /// True while the session holds some.
    pub(super) fn handed_out(&mut self, state: &[u8]) -> bool {
        if self.search_state.len() >= MAX_SEARCH_STATE {
            self.search_state_lost = true;
        } else if !self.search_state.iter().any(|s| s == state) {
            self.search_state.push(state.to_vec());
        }
        true
    }

    /// The client handed a cookie or context back in a request (the
    /// server's answer hands out the next one, if any). True while the
    /// session still holds some.
    pub(super) fn handed_back(&mut self, state: &[u8]) -> bool {
        self.search_state.retain(|s| s != state);
        self.holds_search_state()
    }

    fn holds_search_state(&self) -> bool {
        self.search_state_lost || !self.search_state.is_empty()
    }

    /// The bind request a new connection would be given, if any.
    pub(super) fn bind_request(&self) -> Option<&[u8]> {
        (self.kind == Kind::Simple).then_some(&self.request[..])
    }

    /// What a new connection must be given (a copy: the replay awaits).
    pub(super) fn replay(&self) -> Replay {
        match self.kind {
            Kind::Anonymous => Replay::Anonymous,
            Kind::No(why) => Replay::No(why),
            Kind::Simple => match Envelope::request(&self.request) {
                Ok(env) => Replay::Simple {
                    dn: env.dn_bytes(&self.request).unwrap_or_default().to_vec(),
                    request: Secret::new(&self.request),
                },
                Err(_) => Replay::No("the kept bind request is unreadable"),
            },
        }
    }

    fn wipe(&mut self) {
        zero(&mut self.request);
        self.request.clear();
    }
}

impl Drop for Carry {
    fn drop(&mut self) {
        zero(&mut self.request);
    }
}

/// Overwrites bytes that held a password.
fn zero(bytes: &mut [u8]) {
    for b in bytes.iter_mut() {
        // Volatile: a plain store to memory about to be freed or reused may
        // be optimised away.
        // SAFETY: `b` is a valid, aligned, exclusive reference.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// What a new upstream connection must be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Replay {
    /// No identity: never bound, an anonymous bind, or a failed bind (the
    /// server leaves the connection anonymous).
    Anonymous,
    /// A successful simple bind as `dn`; `request` is that bind request as
    /// the client sent it.
    Simple {
        /// The bind's name.
        dn: Vec<u8>,
        /// The bind request (with the password).
        request: Secret,
    },
    /// Nothing a new connection can be given; why.
    No(&'static str),
}

/// Bytes holding a password: never printed, zeroed when dropped.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Secret(Vec<u8>);

impl Secret {
    pub(super) fn new(bytes: &[u8]) -> Secret {
        Secret(bytes.to_vec())
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        zero(&mut self.0);
    }
}

/// Why a new connection could not be given the session's identity.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// The connection failed (closed, I/O error): the server may still be
    /// starting; worth another try.
    Lost(String),
    /// The server answered, not as before: never retried.
    Differs(String),
}

/// Gives a new upstream connection the identity in `replay`: replays the
/// bind, then checks with Who am I? that the server sees the same identity.
/// Nothing else is sent on the connection before this returns `Ok`. The
/// caller bounds it with a deadline.
pub(super) async fn reestablish(
    up_in: &mut UpIn,
    up_out: &mut UpOut,
    replay: &Replay,
) -> Result<(), Refused> {
    let want: Option<&[u8]> = match replay {
        Replay::No(why) => return Err(Refused::Differs((*why).into())),
        Replay::Anonymous => None,
        Replay::Simple { dn, request } => {
            let bind_id = Envelope::request(&request.0)
                .map_err(|e| Refused::Differs(format!("the kept bind request: {e}")))?
                .msgid;
            let answer = exchange(up_in, up_out, &request.0, bind_id).await?;
            let env = Envelope::response(&answer).map_err(|e| Refused::Lost(e.to_string()))?;
            if env.op != op::BIND_RESPONSE || env.result_code != Some(0) {
                return Err(Refused::Differs(format!(
                    "the server refused the replayed bind as {} (result {})",
                    String::from_utf8_lossy(dn),
                    env.result_code.unwrap_or(-1)
                )));
            }
            Some(dn)
        }
    };
    let whoami = pdu::encode(LdapMsg::new(
        WHOAMI_ID,
        LdapOp::ExtendedRequest(LdapExtendedRequest {
            name: WHOAMI_OID.into(),
            value: None,
        }),
    ));
    let answer = exchange(up_in, up_out, &whoami, WHOAMI_ID).await?;
    let env = Envelope::response(&answer).map_err(|e| Refused::Lost(e.to_string()))?;
    if env.result_code != Some(0) {
        return Err(Refused::Differs(format!(
            "the server did not answer Who am I? (result {}): the identity cannot be checked",
            env.result_code.unwrap_or(-1)
        )));
    }
    let authz = env.value_bytes(&answer).unwrap_or_default();
    if same_identity(authz, want) {
        Ok(())
    } else {
        Err(Refused::Differs(format!(
            "the server sees this connection as \"{}\", not as before",
            String::from_utf8_lossy(authz)
        )))
    }
}

/// Whether a Who am I? authzId (`dn:...`, empty for anonymous) names `dn`
/// (`None`: anonymous). DNs are compared normalised (case, spaces).
fn same_identity(authz: &[u8], dn: Option<&[u8]>) -> bool {
    match dn {
        None => authz.is_empty(),
        Some(dn) => {
            let Some(got) = authz.strip_prefix(b"dn:") else {
                return false;
            };
            match (NormDn::parse(got), NormDn::parse(dn)) {
                (Some(a), Some(b)) => a == b,
                _ => got == dn,
            }
        }
    }
}

/// Sends `request` and reads the response with message ID `id` (the first
/// message on the new connection must be it; a notice or anything else is
/// a lost connection).
async fn exchange(
    up_in: &mut UpIn,
    up_out: &mut UpOut,
    request: &[u8],
    id: i32,
) -> Result<bytes::Bytes, Refused> {
    up_out.append_always(request);
    up_out
        .flush()
        .await
        .map_err(|e| Refused::Lost(e.to_string()))?;
    let n = match up_in.next_message().await {
        Ok(Some(n)) => n,
        Ok(None) => return Err(Refused::Lost("the server closed the connection".into())),
        Err(e) => return Err(Refused::Lost(e.to_string())),
    };
    let frame = up_in.take(n);
    match Envelope::response(&frame) {
        Ok(env) if env.msgid == id => Ok(frame),
        Ok(env) => Err(Refused::Lost(format!(
            "unexpected message (ID {}, {}) on the new connection",
            env.msgid,
            op::name(env.op)
        ))),
        Err(e) => Err(Refused::Lost(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    //! The replay against a scripted server on in-memory pipes.
    use ldap3_proto::proto::*;
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::endpoint::{BoxRead, BoxWrite};
    use crate::wire::{FrameCodec, FrameReader, FrameWriter};

    fn bind(dn: &str) -> bytes::Bytes {
        pdu::encode(LdapMsg::new(
            7,
            LdapOp::BindRequest(LdapBindRequest {
                version: 3,
                dn: dn.into(),
                cred: LdapBindCred::Simple("secret".into()),
            }),
        ))
    }

    fn bind_response(code: LdapResultCode) -> bytes::Bytes {
        pdu::encode(LdapMsg::new(
            7,
            LdapOp::BindResponse(LdapBindResponse {
                res: LdapResult {
                    code,
                    matcheddn: String::new(),
                    message: String::new(),
                    referral: vec![],
                },
                saslcreds: None,
            }),
        ))
    }

    fn whoami_response(authz: &str) -> bytes::Bytes {
        pdu::extended_response(
            WHOAMI_ID,
            LdapResultCode::Success,
            "",
            None,
            Some(authz.as_bytes().to_vec()),
        )
    }

    #[test]
    fn search_state_handed_out_keeps_a_session_from_being_carried_until_handed_back() {
        let mut c = Carry::default();
        c.simple(&bind("cn=a"));
        assert!(c.handed_out(b"cookie-1"));
        assert!(c.handed_out(b"ctx"));
        assert!(c
            .refusal()
            .is_some_and(|w| w.contains("paged-results cookie")));
        // A bind does not end the server's paging state.
        c.anonymous();
        assert!(c.refusal().is_some());
        assert!(c.handed_back(b"cookie-1"));
        assert!(!c.handed_back(b"ctx"));
        assert_eq!(c.refusal(), None);
        assert_eq!(c.replay(), Replay::Anonymous);
        // Bounded: past the limit which were handed back cannot be told.
        for i in 0..=MAX_SEARCH_STATE {
            c.handed_out(format!("cookie-{i}").as_bytes());
        }
        assert_eq!(c.search_state.len(), MAX_SEARCH_STATE);
        for i in 0..=MAX_SEARCH_STATE {
            c.handed_back(format!("cookie-{i}").as_bytes());
        }
        assert!(c.refusal().is_some(), "uncarriable for good");
    }

    /// Runs `reestablish` against a server that answers `answers` in
    /// order; returns its outcome and what the server received.
    async fn against(carry: Replay, answers: Vec<bytes::Bytes>) -> (Result<(), Refused>, Vec<u8>) {
        let (proxy_side, mut server_side) = tokio::io::duplex(64 * 1024);
        let (r, w) = tokio::io::split(proxy_side);
        let r: BoxRead = Box::new(r);
        let w: BoxWrite = Box::new(w);
        let mut up_in = FrameReader::new(r, FrameCodec::default());
        let mut up_out = FrameWriter::new(w, 8192);
        let server = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut got = Vec::new();
            for a in answers {
                // One request in, one answer out.
                let mut codec = FrameReader::new(&mut server_side, FrameCodec::default());
                let Ok(Some(n)) = codec.next_message().await else {
                    break;
                };
                got.extend_from_slice(codec.message(n));
                drop(codec);
                server_side.write_all(&a).await.unwrap();
            }
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(
                std::time::Duration::from_millis(50),
                server_side.read_to_end(&mut rest),
            )
            .await;
            got.extend_from_slice(&rest);
            got
        });
        let r = reestablish(&mut up_in, &mut up_out, &carry).await;
        drop((up_in, up_out));
        (r, server.await.unwrap())
    }

    fn simple(dn: &str) -> Replay {
        let mut c = Carry::default();
        c.simple(&bind(dn));
        let r = c.replay();
        assert_eq!(
            r,
            Replay::Simple {
                dn: dn.as_bytes().to_vec(),
                request: Secret::new(&bind(dn)),
            }
        );
        r
    }

    #[tokio::test]
    async fn a_simple_bind_is_replayed_then_checked() {
        let dn = "uid=u1,ou=people,dc=example,dc=org";
        let (r, got) = against(
            simple(dn),
            vec![
                bind_response(LdapResultCode::Success),
                // Another spelling of the same DN.
                whoami_response("dn:UID=u1, ou=People,dc=example,dc=org"),
            ],
        )
        .await;
        assert_eq!(r, Ok(()));
        // The client's own bind bytes, then the Who am I?, nothing else.
        assert!(got.starts_with(&bind(dn)));
        let rest = &got[bind(dn).len()..];
        let env = Envelope::request(rest).unwrap();
        assert_eq!(env.msgid, WHOAMI_ID);
        assert_eq!(env.oid_bytes(rest), Some(WHOAMI_OID.as_bytes()));
        let whoami = pdu::encode(LdapMsg::new(
            WHOAMI_ID,
            LdapOp::ExtendedRequest(LdapExtendedRequest {
                name: WHOAMI_OID.into(),
                value: None,
            }),
        ));
        assert_eq!(rest, &whoami[..], "nothing after the Who am I?");
    }

    #[tokio::test]
    async fn a_refused_bind_or_another_identity_is_never_carried() {
        let dn = "uid=u1,ou=people,dc=example,dc=org";
        let (r, got) = against(
            simple(dn),
            vec![bind_response(LdapResultCode::InvalidCredentials)],
        )
        .await;
        assert!(matches!(r, Err(Refused::Differs(m)) if m.contains("refused the replayed bind")));
        assert_eq!(got, bind(dn).to_vec(), "no Who am I? after a refusal");
        let (r, _) = against(
            simple(dn),
            vec![
                bind_response(LdapResultCode::Success),
                whoami_response("dn:uid=u2,ou=people,dc=example,dc=org"),
            ],
        )
        .await;
        assert!(matches!(r, Err(Refused::Differs(m)) if m.contains("uid=u2")));
        // Anonymous must come back anonymous.
        let (r, _) = against(Replay::Anonymous, vec![whoami_response("")]).await;
        assert_eq!(r, Ok(()));
        let (r, _) = against(Replay::Anonymous, vec![whoami_response("dn:cn=x")]).await;
        assert!(matches!(r, Err(Refused::Differs(_))));
        let (r, got) = against(Replay::No("a SASL bind"), vec![]).await;
        assert_eq!(r, Err(Refused::Differs("a SASL bind".into())));
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn a_server_that_closes_is_lost_not_different() {
        let (r, _) = against(simple("cn=a"), vec![]).await;
        assert!(matches!(r, Err(Refused::Lost(_))), "{r:?}");
    }

    #[test]
    fn what_is_kept_follows_the_binds() {
        let mut c = Carry::default();
        c.simple(&bind("cn=a much longer name,dc=example,dc=org"));
        c.simple(&bind("cn=a"));
        let len = c.request.len();
        // The longer request's tail, past the new one, is zeroed.
        // SAFETY: within the allocation (capacity), initialised by the
        // first request.
        let tail = unsafe { std::slice::from_raw_parts(c.request.as_ptr().add(len), 10) };
        assert!(tail.iter().all(|&b| b == 0), "{tail:?}");
        c.anonymous();
        assert_eq!(c.replay(), Replay::Anonymous);
        c.simple(&bind("cn=a"));
        assert!(matches!(c.replay(), Replay::Simple { dn, .. } if dn == b"cn=a"));
        c.cannot("a SASL bind");
        assert_eq!(c.refusal(), Some("a SASL bind"));
        assert!(c.request.is_empty(), "the password is gone");
        c.anonymous();
        assert_eq!(c.refusal(), None);
        assert_eq!(c.replay(), Replay::Anonymous);
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = Secret::new(b"password");
        assert_eq!(format!("{s:?}"), "Secret(8 bytes)");
    }
}
