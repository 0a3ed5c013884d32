//! The Allow-Backup extended operation: OIDs, and the rasn types and codecs
//! of the ASN.1 module `allow-backup.asn1` (at the root of this crate, the
//! reference for everything below). No tokio, no I/O.
//!
//! Allow-Backup is an LDAP extended operation (RFC 4511, section 4.12) that
//! asks the directory (in practice the abproxy proxy in front of it) to let
//! the operations in progress finish and then hold new ones, so that the
//! backends' files can be copied while they are consistent; a second request
//! resumes. Two operations live under the project's arc [`ARC`]:
//!
//! | OID | operation | requestValue | responseValue |
//! |-----|-----------|--------------|---------------|
//! | [`ALLOW_BACKUP_OID`] (`…364.1.1`) | freeze / resume | [`AllowBackupRequest`] | — |
//! | [`ALLOW_BACKUP_STATUS_OID`] (`…364.1.2`) | status query (read-only) | absent | [`AllowBackupStatus`] |
//!
//! Values are encoded as in LDAP: [`encode_request`] and [`encode_status`]
//! produce DER (so a `holdUntilUnbind` of FALSE, the DEFAULT, is omitted and
//! a SET OF is sorted); [`decode_request`] and [`decode_status`] accept BER
//! (for instance a TRUE whose content octet is not `0xFF`, as some LDAP
//! clients send) but reject a value followed by any other octet.
//!
//! ```
//! use abproxy_proto::{decode_request, encode_request, AllowBackupRequest};
//!
//! let on = AllowBackupRequest::on().with_time_limit(30);
//! let bytes = encode_request(&on);
//! assert_eq!(decode_request(&bytes).unwrap(), on);
//! assert_eq!(encode_request(&AllowBackupRequest::off()), [0x30, 0x03, 0x01, 0x01, 0x00]);
//! // OFF of freeze 7 only.
//! assert_eq!(
//!     encode_request(&AllowBackupRequest::off().with_freeze_id(7)),
//!     [0x30, 0x06, 0x01, 0x01, 0x00, 0x83, 0x01, 0x07]
//! );
//! ```

use std::fmt;

use rasn::prelude::*;

/// The project's OID arc (an X.667 UUID arc, no registration needed).
pub const ARC: &str = "2.25.97575522358532197458470206361283478364";
/// Allow-Backup extended request (freeze / resume).
pub const ALLOW_BACKUP_OID: &str = "2.25.97575522358532197458470206361283478364.1.1";
/// Allow-Backup status extended request (read-only query).
pub const ALLOW_BACKUP_STATUS_OID: &str = "2.25.97575522358532197458470206361283478364.1.2";

/// `LDAPDN ::= OCTET STRING`: a DN in its RFC 4514 string form, UTF-8.
pub type LdapDn = OctetString;

/// `maxInt INTEGER ::= 2147483647`, the upper bound of `timeLimit`.
pub const MAX_INT: u32 = 2_147_483_647;

/// `AllowBackupRequest`, the requestValue of [`ALLOW_BACKUP_OID`].
///
/// ```asn1
/// AllowBackupRequest ::= SEQUENCE {
///     mode            BOOLEAN,
///     timeLimit       [0] INTEGER (0..maxInt) OPTIONAL,
///     dnSet           [1] SET OF LDAPDN OPTIONAL,
///     holdUntilUnbind [2] BOOLEAN DEFAULT FALSE,
///     ...,
///     freezeId        [3] Count OPTIONAL }
/// ```
// No `Hash`: rasn's `SetOf` compares regardless of order but hashes in order.
#[derive(AsnType, Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub struct AllowBackupRequest {
    /// TRUE: allow a backup (freeze); FALSE: the backup is done (resume).
    pub mode: bool,
    /// Seconds allowed to the operations in progress to finish; `None`: the
    /// server's default. At most [`MAX_INT`]: never decoded above it, and
    /// [`encode_request`] lowers a larger value to it.
    #[rasn(tag(context, 0), value("0..=2147483647"), identifier = "timeLimit")]
    pub time_limit: Option<u32>,
    /// Suffixes of the backends to freeze or resume; `None`: all of them.
    #[rasn(tag(context, 1), identifier = "dnSet")]
    pub dn_set: Option<SetOf<LdapDn>>,
    /// Release the freeze when the requesting connection ends.
    /// DEFAULT FALSE: not encoded when false.
    #[rasn(tag(context, 2), default, identifier = "holdUntilUnbind")]
    pub hold_until_unbind: bool,
    /// With `mode` FALSE: the freeze this OFF ends (the id its ON
    /// reported); the server releases only that freeze and refuses
    /// otherwise. `None`: whatever freeze is current. An extension addition
    /// (after `...` in the module): servers that predate it ignore it.
    #[rasn(tag(context, 3), identifier = "freezeId")]
    pub freeze_id: Option<u64>,
}

impl AllowBackupRequest {
    /// A plain "allow backup" (freeze) request: `mode` TRUE, nothing else.
    #[must_use]
    pub fn on() -> Self {
        Self {
            mode: true,
            time_limit: None,
            dn_set: None,
            hold_until_unbind: false,
            freeze_id: None,
        }
    }

    /// A plain "resume" request: `mode` FALSE, nothing else.
    #[must_use]
    pub fn off() -> Self {
        Self {
            mode: false,
            ..Self::on()
        }
    }

    /// Sets `timeLimit` (seconds). Values above [`MAX_INT`] are lowered to it
    /// (68 years, no limit in practice), the most the ASN.1 type allows.
    #[must_use]
    pub fn with_time_limit(mut self, seconds: u32) -> Self {
        self.time_limit = Some(seconds.min(MAX_INT));
        self
    }

    /// Sets `dnSet` to these DNs (string form, RFC 4514).
    #[must_use]
    pub fn with_dn_set<I, S>(mut self, dns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let dns: Vec<LdapDn> = dns
            .into_iter()
            .map(|dn| LdapDn::from_slice(dn.as_ref().as_bytes()))
            .collect();
        self.dn_set = Some(SetOf::from_vec(dns));
        self
    }

    /// Sets `holdUntilUnbind`.
    #[must_use]
    pub fn with_hold_until_unbind(mut self, hold: bool) -> Self {
        self.hold_until_unbind = hold;
        self
    }

    /// Sets `freezeId`: the freeze an OFF ends.
    #[must_use]
    pub fn with_freeze_id(mut self, id: u64) -> Self {
        self.freeze_id = Some(id);
        self
    }

    /// The DNs of `dnSet` as given (octets; normally UTF-8), `None` when the
    /// request is for all backends.
    #[must_use]
    pub fn dns(&self) -> Option<Vec<&[u8]>> {
        self.dn_set
            .as_ref()
            .map(|set| set.iter().map(AsRef::as_ref).collect())
    }
}

/// `AllowBackupStatus`, the responseValue of [`ALLOW_BACKUP_STATUS_OID`].
///
/// Times (`since`, `leaseExpires`) are `EpochSeconds`: whole seconds since
/// 1970-01-01T00:00:00Z (UTC, leap seconds not counted), chosen over
/// GeneralizedTime for one simple form with nothing to parse.
///
/// ```asn1
/// AllowBackupStatus ::= SEQUENCE {
///     state           FreezeState,
///     backends        SEQUENCE OF BackendStatus,
///     holder          [0] LDAPDN OPTIONAL,
///     since           [1] EpochSeconds OPTIONAL,
///     queuedRequests  [2] Count,
///     queuedBytes     [3] Count,
///     inFlight        [4] Count,
///     leaseExpires    [5] EpochSeconds OPTIONAL,
///     freezeId        [6] Count OPTIONAL,
///     ...,
///     releasing       [7] BOOLEAN DEFAULT FALSE,
///     sessionsWaiting [8] Count DEFAULT 0,
///     sessionsCarried [9] Count DEFAULT 0,
///     sessionsNotCarried [10] Count DEFAULT 0 }
/// Count        ::= INTEGER (0..maxUInt64)
/// EpochSeconds ::= INTEGER (0..maxUInt64)
/// ```
#[derive(AsnType, Encode, Decode, Debug, Clone, PartialEq, Eq, Hash)]
pub struct AllowBackupStatus {
    /// Where the freeze stands overall.
    pub state: FreezeState,
    /// One element per backend the server knows of.
    pub backends: Vec<BackendStatus>,
    /// DN of the client holding the freeze (absent when thawed or anonymous).
    #[rasn(tag(context, 0))]
    pub holder: Option<LdapDn>,
    /// When the current freeze was requested, in seconds since the epoch
    /// (absent when thawed).
    #[rasn(tag(context, 1))]
    pub since: Option<u64>,
    /// Requests held because of the freeze.
    #[rasn(tag(context, 2), identifier = "queuedRequests")]
    pub queued_requests: u64,
    /// Total size in octets of the held requests.
    #[rasn(tag(context, 3), identifier = "queuedBytes")]
    pub queued_bytes: u64,
    /// Operations forwarded and not yet completed.
    #[rasn(tag(context, 4), identifier = "inFlight")]
    pub in_flight: u64,
    /// When the freeze will be released unless renewed, in seconds since the
    /// epoch (absent: no such limit).
    #[rasn(tag(context, 5), identifier = "leaseExpires")]
    pub lease_expires: Option<u64>,
    /// Identifies the current freeze (absent when thawed).
    #[rasn(tag(context, 6), identifier = "freezeId")]
    pub freeze_id: Option<u64>,
    /// With `state` frozen: the freeze is being released (its done steps
    /// are running; requests are still held). An extension addition (after
    /// `...` in the module) instead of a new `FreezeState` value, which
    /// decoders of the first version would reject: they see `frozen` and
    /// ignore it. DEFAULT FALSE: not encoded when false.
    #[rasn(tag(context, 7), default)]
    pub releasing: bool,
    /// Client sessions whose connection the server closed (it was stopped
    /// or restarted), waiting to be carried to a new one. An extension
    /// addition; DEFAULT 0.
    #[rasn(tag(context, 8), default, identifier = "sessionsWaiting")]
    pub sessions_waiting: u64,
    /// Sessions carried to a new connection since the server started.
    #[rasn(tag(context, 9), default, identifier = "sessionsCarried")]
    pub sessions_carried: u64,
    /// Sessions that could not be carried since the server started.
    #[rasn(tag(context, 10), default, identifier = "sessionsNotCarried")]
    pub sessions_not_carried: u64,
}

impl AllowBackupStatus {
    /// The status of a server with these backends and no freeze: state
    /// thawed, counters zero, optional fields absent.
    #[must_use]
    pub fn thawed(backends: Vec<BackendStatus>) -> Self {
        Self {
            state: FreezeState::Thawed,
            backends,
            holder: None,
            since: None,
            queued_requests: 0,
            queued_bytes: 0,
            in_flight: 0,
            lease_expires: None,
            freeze_id: None,
            releasing: false,
            sessions_waiting: 0,
            sessions_carried: 0,
            sessions_not_carried: 0,
        }
    }
}

/// `FreezeState ::= ENUMERATED { thawed(0), draining(1), frozen(2) }`
#[derive(AsnType, Encode, Decode, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rasn(enumerated)]
pub enum FreezeState {
    /// No freeze: operations are forwarded as usual.
    #[rasn(identifier = "thawed")]
    Thawed = 0,
    /// Freeze requested: new operations are held, those in progress are
    /// being waited for (up to `timeLimit`).
    #[rasn(identifier = "draining")]
    Draining = 1,
    /// Freeze in effect: the backup may be taken.
    #[rasn(identifier = "frozen")]
    Frozen = 2,
}

/// `BackendStatus ::= SEQUENCE { suffix LDAPDN, mode BackendMode, frozen BOOLEAN, ... }`
#[derive(AsnType, Encode, Decode, Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendStatus {
    /// The suffix (naming context) of the backend.
    pub suffix: LdapDn,
    /// How this backend is frozen.
    pub mode: BackendMode,
    /// Whether the freeze is in effect on this backend now.
    pub frozen: bool,
}

impl BackendStatus {
    /// A backend status from its suffix in string form.
    #[must_use]
    pub fn new(suffix: &str, mode: BackendMode, frozen: bool) -> Self {
        Self {
            suffix: LdapDn::from_slice(suffix.as_bytes()),
            mode,
            frozen,
        }
    }
}

/// `BackendMode ::= ENUMERATED { readonly(0), stop(1), unimplemented(2) }`
#[derive(AsnType, Encode, Decode, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rasn(enumerated)]
pub enum BackendMode {
    /// Updates are held; searches and compares go on.
    #[rasn(identifier = "readonly")]
    Readonly = 0,
    /// Every operation is held.
    #[rasn(identifier = "stop")]
    Stop = 1,
    /// This backend cannot be frozen.
    #[rasn(identifier = "unimplemented")]
    Unimplemented = 2,
}

/// A value that is not a valid BER encoding of the expected type, or is
/// followed by other octets. Its `Display` says which value and why, e.g.
/// "Allow-Backup request value is not a valid AllowBackupRequest: the value
/// is empty".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    what: &'static str,
    reason: String,
}

impl DecodeError {
    /// Why the value was rejected (without the leading "… is not a valid …").
    #[must_use]
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.reason)
    }
}

impl std::error::Error for DecodeError {}

/// Encodes a request value (DER: `holdUntilUnbind` FALSE is omitted, `dnSet`
/// is sorted). A `time_limit` above [`MAX_INT`], which the ASN.1 type cannot
/// carry, is encoded as [`MAX_INT`].
#[must_use]
pub fn encode_request(request: &AllowBackupRequest) -> Vec<u8> {
    let clamped;
    let request = match request.time_limit {
        Some(seconds) if seconds > MAX_INT => {
            clamped = request.clone().with_time_limit(seconds);
            &clamped
        }
        _ => request,
    };
    der_encode(request)
}

/// Decodes a request value (BER; trailing octets are an error).
///
/// # Errors
///
/// If `input` is not exactly one BER-encoded `AllowBackupRequest`.
pub fn decode_request(input: &[u8]) -> Result<AllowBackupRequest, DecodeError> {
    decode_exact(
        input,
        "Allow-Backup request value is not a valid AllowBackupRequest",
        &REQUEST_SHAPE,
    )
}

/// Encodes a status response value (DER).
#[must_use]
pub fn encode_status(status: &AllowBackupStatus) -> Vec<u8> {
    der_encode(status)
}

/// Decodes a status response value (BER; trailing octets are an error).
///
/// # Errors
///
/// If `input` is not exactly one BER-encoded `AllowBackupStatus`.
pub fn decode_status(input: &[u8]) -> Result<AllowBackupStatus, DecodeError> {
    decode_exact(
        input,
        "Allow-Backup status response value is not a valid AllowBackupStatus",
        &STATUS_SHAPE,
    )
}

fn der_encode<T: Encode + fmt::Debug>(value: &T) -> Vec<u8> {
    match rasn::der::encode(value) {
        Ok(bytes) => bytes,
        // The only constraint of these types that their Rust types do not
        // enforce (timeLimit <= maxInt) is enforced by `encode_request`.
        Err(e) => unreachable!("cannot encode {value:?}: {e}"),
    }
}

/// Decodes exactly one BER value of type `T` filling all of `input`.
fn decode_exact<T: Decode>(
    input: &[u8],
    what: &'static str,
    shape: &Shape,
) -> Result<T, DecodeError> {
    let fail = |reason: String| DecodeError { what, reason };
    if input.is_empty() {
        return Err(fail("the value is empty".to_owned()));
    }
    let (value, trailing) = match rasn::ber::decode_with_remainder::<T>(input) {
        Ok((value, rest)) => (value, rest.len()),
        // rasn 0.30's BER decoder rejects the components that a later
        // version of the module may append after `...`, which a decoder must
        // ignore: retry without them (they never touch the octets after the
        // value). The error reported is the one about the value as received.
        Err(error) => without_extensions(input, shape)
            .and_then(|root| {
                let (value, rest) = rasn::ber::decode_with_remainder::<T>(&root).ok()?;
                Some((value, rest.len()))
            })
            .ok_or_else(|| fail(error.kind.to_string()))?,
    };
    if trailing != 0 {
        return Err(fail(format!(
            "{trailing} octet(s) follow the end of the value"
        )));
    }
    Ok(value)
}

// Extension additions.
//
// Every SEQUENCE of the module ends with `...`; a later version may append
// components there, and the module reserves for them the context-specific
// tags above the defined ones ([4] up in AllowBackupRequest, [8] up in
// AllowBackupStatus, [0] up in BackendStatus). To ignore them, the value is
// re-encoded without them: in each SEQUENCE, the root components are kept
// and the components with such a tag after them dropped. Anything else (an
// unknown universal tag, say, or a root component after an addition) is left
// for rasn to reject, as is an addition inside an indefinite length (which
// LDAP does not allow, though rasn accepts it otherwise).

/// The components of an extensible SEQUENCE: the identifier octet of each
/// root component (constructed bit cleared) with, for a SEQUENCE OF an
/// extensible SEQUENCE, the shape of its elements; then the first context
/// tag number reserved for extension additions.
struct Shape(&'static [(u8, Option<&'static Shape>)], u8);

const REQUEST_SHAPE: Shape = Shape(
    &[
        (0x01, None), // mode BOOLEAN
        (0x80, None), // timeLimit [0]
        (0x81, None), // dnSet [1]
        (0x82, None), // holdUntilUnbind [2]
        (0x83, None), // freezeId [3] (the first addition)
    ],
    4,
);

const BACKEND_STATUS_SHAPE: Shape = Shape(
    &[
        (0x04, None), // suffix OCTET STRING
        (0x0a, None), // mode ENUMERATED
        (0x01, None), // frozen BOOLEAN
    ],
    0,
);

const STATUS_SHAPE: Shape = Shape(
    &[
        (0x0a, None),                        // state ENUMERATED
        (0x10, Some(&BACKEND_STATUS_SHAPE)), // backends SEQUENCE OF
        (0x80, None),                        // holder [0]
        (0x81, None),                        // since [1]
        (0x82, None),                        // queuedRequests [2]
        (0x83, None),                        // queuedBytes [3]
        (0x84, None),                        // inFlight [4]
        (0x85, None),                        // leaseExpires [5]
        (0x86, None),                        // freezeId [6]
        (0x87, None),                        // releasing [7] (the first addition)
    ],
    8,
);

impl Shape {
    /// Whether `identifier` is a context tag reserved for extension additions.
    fn is_extension(&self, identifier: &[u8]) -> bool {
        let number = identifier[0] & 0x1f;
        identifier[0] & 0xc0 == 0x80 && (number == 0x1f || number >= self.1)
    }
}

/// `input` with the extension additions of its first value removed, or
/// `None` when that changes nothing or cannot be done.
fn without_extensions(input: &[u8], shape: &Shape) -> Option<Vec<u8>> {
    let (identifier, contents, rest) = split_tlv(input)?;
    let mut out = Vec::with_capacity(input.len());
    push_tlv(&mut out, identifier, &root_contents(contents, shape)?);
    out.extend_from_slice(rest);
    (out != input).then_some(out)
}

/// The contents of a SEQUENCE of `shape` without extension additions.
fn root_contents(mut contents: &[u8], shape: &Shape) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(contents.len());
    let mut in_extensions = false;
    while !contents.is_empty() {
        let (identifier, inner, rest) = split_tlv(contents)?;
        let whole = &contents[..contents.len() - rest.len()];
        contents = rest;
        if shape.is_extension(identifier) {
            in_extensions = true;
            continue;
        }
        if in_extensions {
            return None;
        }
        let root = match identifier {
            [octet] => shape.0.iter().find(|(root, _)| *root == octet & !0x20),
            _ => None,
        };
        match root {
            None => return None,
            Some((_, None)) => out.extend_from_slice(whole),
            Some((_, Some(element))) => {
                let mut elements = Vec::with_capacity(inner.len());
                let mut inner = inner;
                while !inner.is_empty() {
                    let (element_identifier, element_contents, rest) = split_tlv(inner)?;
                    inner = rest;
                    let element_contents = root_contents(element_contents, element)?;
                    push_tlv(&mut elements, element_identifier, &element_contents);
                }
                push_tlv(&mut out, identifier, &elements);
            }
        }
    }
    Some(out)
}

/// Splits the first BER TLV off `input`: (identifier octets, contents, rest).
/// `None` if it is truncated or has an indefinite (or absurd) length.
fn split_tlv(input: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let mut at = 1;
    if input.first()? & 0x1f == 0x1f {
        // High tag number form: the number follows in base 128.
        while input.get(at)? & 0x80 != 0 {
            at += 1;
        }
        at += 1;
    }
    let identifier = &input[..at];
    let first = *input.get(at)?;
    at += 1;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let octets = usize::from(first & 0x7f);
        if octets == 0 || octets > std::mem::size_of::<usize>() {
            return None;
        }
        let length = input
            .get(at..at + octets)?
            .iter()
            .fold(0, |length, &octet| length << 8 | usize::from(octet));
        at += octets;
        length
    };
    let contents = input.get(at..at.checked_add(length)?)?;
    Some((identifier, contents, &input[at + length..]))
}

/// Appends a TLV with a definite, minimal length.
fn push_tlv(out: &mut Vec<u8>, identifier: &[u8], contents: &[u8]) {
    out.extend_from_slice(identifier);
    let length = contents.len().to_be_bytes();
    let skip = length.iter().take_while(|&&octet| octet == 0).count();
    match length[skip..] {
        [short] if short < 0x80 => out.push(short),
        [] => out.push(0),
        ref long => {
            // At most size_of::<usize>() octets: fits in the low 7 bits.
            out.push(0x80 | long.len() as u8);
            out.extend_from_slice(long);
        }
    }
    out.extend_from_slice(contents);
}
