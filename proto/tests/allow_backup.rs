//! Encoding and decoding of the Allow-Backup values (`allow-backup.asn1`).

use abproxy_proto::{
    decode_request, decode_status, encode_request, encode_status, AllowBackupRequest,
    AllowBackupStatus, BackendMode, BackendStatus, FreezeState, LdapDn, MAX_INT,
};

/// Standard base64 with padding, for comparing with the documented strings.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

const ON: [u8; 5] = [0x30, 0x03, 0x01, 0x01, 0xFF];
const OFF: [u8; 5] = [0x30, 0x03, 0x01, 0x01, 0x00];

/// ON, timeLimit 30, dnSet { "dc=example,dc=org" }, written out by hand.
const ON_30_EXAMPLE: [u8; 29] = [
    0x30, 0x1B, // SEQUENCE, 27 octets
    0x01, 0x01, 0xFF, // mode BOOLEAN TRUE
    0x80, 0x01, 0x1E, // timeLimit [0] IMPLICIT INTEGER 30
    0xA1, 0x13, // dnSet [1] IMPLICIT SET OF (constructed), 19 octets
    0x04, 0x11, // LDAPDN OCTET STRING, 17 octets: "dc=example,dc=org"
    b'd', b'c', b'=', b'e', b'x', b'a', b'm', b'p', b'l', b'e', b',', b'd', b'c', b'=', b'o', b'r',
    b'g',
];

/// The status of a thawed server with one read-only backend, by hand.
const THAWED_EXAMPLE: [u8; 43] = [
    0x30, 0x29, // SEQUENCE, 41 octets
    0x0A, 0x01, 0x00, // state ENUMERATED thawed
    0x30, 0x1B, // backends SEQUENCE OF, 27 octets
    0x30, 0x19, // BackendStatus SEQUENCE, 25 octets
    0x04, 0x11, // suffix "dc=example,dc=org"
    b'd', b'c', b'=', b'e', b'x', b'a', b'm', b'p', b'l', b'e', b',', b'd', b'c', b'=', b'o', b'r',
    b'g', //
    0x0A, 0x01, 0x00, // mode ENUMERATED readonly
    0x01, 0x01, 0x00, // frozen BOOLEAN FALSE
    0x82, 0x01, 0x00, // queuedRequests [2] 0
    0x83, 0x01, 0x00, // queuedBytes [3] 0
    0x84, 0x01, 0x00, // inFlight [4] 0
];

fn full_request() -> AllowBackupRequest {
    AllowBackupRequest::on()
        .with_time_limit(MAX_INT)
        .with_dn_set(["dc=example,dc=org", "o=other", ""])
        .with_hold_until_unbind(true)
        .with_freeze_id(u64::MAX)
}

/// OFF of freeze 300 only, written out by hand.
const OFF_300: [u8; 9] = [
    0x30, 0x07, // SEQUENCE, 7 octets
    0x01, 0x01, 0x00, // mode BOOLEAN FALSE
    0x83, 0x02, 0x01, 0x2C, // freezeId [3] IMPLICIT INTEGER 300
];

fn full_status() -> AllowBackupStatus {
    AllowBackupStatus {
        state: FreezeState::Draining,
        backends: vec![
            BackendStatus::new("dc=example,dc=org", BackendMode::Readonly, true),
            BackendStatus::new("o=other", BackendMode::Stop, false),
            BackendStatus::new("cn=config", BackendMode::Unimplemented, false),
        ],
        holder: Some(LdapDn::from_slice(b"cn=backup,dc=example,dc=org")),
        since: Some(1_700_000_000),
        queued_requests: 12,
        queued_bytes: u64::MAX,
        in_flight: 3,
        lease_expires: Some(1_700_000_600),
        freeze_id: Some(1 << 40),
        releasing: false,
        sessions_waiting: 2,
        sessions_carried: 1 << 33,
        sessions_not_carried: 1,
    }
}

fn request_error(input: &[u8]) -> String {
    let error = decode_request(input).expect_err("decoding should fail");
    let message = error.to_string();
    assert!(
        message.starts_with("Allow-Backup request value is not a valid AllowBackupRequest: "),
        "{message}"
    );
    assert!(message.ends_with(error.reason()), "{message}");
    message
}

fn status_error(input: &[u8]) -> String {
    let message = decode_status(input)
        .expect_err("decoding should fail")
        .to_string();
    assert!(
        message
            .starts_with("Allow-Backup status response value is not a valid AllowBackupStatus: "),
        "{message}"
    );
    message
}

#[test]
fn plain_on_has_known_bytes() {
    let bytes = encode_request(&AllowBackupRequest::on());
    assert_eq!(bytes, ON);
    assert_eq!(base64(&bytes), "MAMBAf8=");
    assert_eq!(decode_request(&ON).unwrap(), AllowBackupRequest::on());
}

#[test]
fn plain_off_has_known_bytes() {
    let bytes = encode_request(&AllowBackupRequest::off());
    assert_eq!(bytes, OFF);
    assert_eq!(base64(&bytes), "MAMBAQA=");
    assert_eq!(decode_request(&OFF).unwrap(), AllowBackupRequest::off());
}

#[test]
fn off_with_a_freeze_id_has_known_bytes() {
    let request = AllowBackupRequest::off().with_freeze_id(300);
    assert_eq!(encode_request(&request), OFF_300);
    assert_eq!(base64(&OFF_300), "MAcBAQCDAgEs");
    assert_eq!(decode_request(&OFF_300).unwrap(), request);
    assert_eq!(decode_request(&OFF_300).unwrap().freeze_id, Some(300));
    // Small and large ids: minimal two's complement, a leading 0x00 when
    // the high bit is set.
    for (id, content) in [
        (0, &[0x00][..]),
        (7, &[0x07]),
        (128, &[0x00, 0x80]),
        (
            u64::MAX,
            &[0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
        ),
    ] {
        let request = AllowBackupRequest::off().with_freeze_id(id);
        let mut contents = vec![0x01, 0x01, 0x00];
        contents.extend(tlv(0x83, content));
        assert_eq!(encode_request(&request), tlv(0x30, &contents));
        assert_eq!(decode_request(&tlv(0x30, &contents)).unwrap(), request);
    }
    // After every other component.
    let request = AllowBackupRequest::off()
        .with_time_limit(30)
        .with_dn_set(["dc=example,dc=org"])
        .with_hold_until_unbind(true)
        .with_freeze_id(2);
    let mut contents = ON_30_EXAMPLE[2..].to_vec();
    contents[2] = 0x00; // mode FALSE
    contents.extend([0x82, 0x01, 0xFF, 0x83, 0x01, 0x02]);
    assert_eq!(encode_request(&request), tlv(0x30, &contents));
    assert_eq!(decode_request(&tlv(0x30, &contents)).unwrap(), request);
}

#[test]
fn encodings_without_a_freeze_id_still_decode() {
    // What clients that predate freezeId send.
    for (bytes, expected) in [
        (&OFF[..], AllowBackupRequest::off()),
        (&ON[..], AllowBackupRequest::on()),
        (
            &ON_30_EXAMPLE[..],
            AllowBackupRequest::on()
                .with_time_limit(30)
                .with_dn_set(["dc=example,dc=org"]),
        ),
    ] {
        let decoded = decode_request(bytes).unwrap();
        assert_eq!(decoded, expected);
        assert_eq!(decoded.freeze_id, None);
        assert_eq!(encode_request(&decoded), bytes);
    }
}

#[test]
fn bad_freeze_ids_are_errors() {
    for (content, about) in [
        (&[0xFF][..], "freeze_id"), // -1
        (
            &[0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
            "freeze_id",
        ), // 2^64
        (&[][..], "freeze_id"),     // no octet
    ] {
        let mut contents = vec![0x01, 0x01, 0x00];
        contents.extend(tlv(0x83, content));
        let message = request_error(&tlv(0x30, &contents));
        assert!(message.contains(about), "{message}");
    }
    // freezeId before holdUntilUnbind: out of order.
    request_error(&[
        0x30, 0x09, 0x01, 0x01, 0x00, 0x83, 0x01, 0x02, 0x82, 0x01, 0xFF,
    ]);
}

#[test]
fn ber_true_other_than_ff_is_accepted() {
    for octet in [0x01, 0x7F, 0x80, 0xFE] {
        let input = [0x30, 0x03, 0x01, 0x01, octet];
        assert_eq!(decode_request(&input).unwrap(), AllowBackupRequest::on());
        let input = [0x30, 0x06, 0x01, 0x01, 0xFF, 0x82, 0x01, octet];
        assert!(decode_request(&input).unwrap().hold_until_unbind);
    }
}

#[test]
fn time_limit_and_dn_set_have_known_bytes() {
    let request = AllowBackupRequest::on()
        .with_time_limit(30)
        .with_dn_set(["dc=example,dc=org"]);
    assert_eq!(encode_request(&request), ON_30_EXAMPLE);
    assert_eq!(decode_request(&ON_30_EXAMPLE).unwrap(), request);
    assert_eq!(request.dns(), Some(vec![&b"dc=example,dc=org"[..]]));
}

#[test]
fn hold_until_unbind_is_encoded_only_when_true() {
    let held = AllowBackupRequest::on().with_hold_until_unbind(true);
    let bytes = [0x30, 0x06, 0x01, 0x01, 0xFF, 0x82, 0x01, 0xFF];
    assert_eq!(encode_request(&held), bytes);
    assert_eq!(decode_request(&bytes).unwrap(), held);
    let not_held = AllowBackupRequest::on().with_hold_until_unbind(false);
    assert_eq!(encode_request(&not_held), ON);
    // BER lets a sender spell the DEFAULT out.
    let explicit = [0x30, 0x06, 0x01, 0x01, 0xFF, 0x82, 0x01, 0x00];
    assert_eq!(decode_request(&explicit).unwrap(), not_held);
}

#[test]
fn dn_set_is_sorted_and_empty_set_kept() {
    let request = AllowBackupRequest::off().with_dn_set(["o=z", "o=a"]);
    let bytes = encode_request(&request);
    assert_eq!(
        bytes,
        [
            0x30, 0x0F, 0x01, 0x01, 0x00, 0xA1, 0x0A, 0x04, 0x03, b'o', b'=', b'a', 0x04, 0x03,
            b'o', b'=', b'z'
        ]
    );
    assert_eq!(decode_request(&bytes).unwrap(), request);
    // An empty dnSet is not an absent one.
    let empty = AllowBackupRequest::on().with_dn_set(Vec::<&str>::new());
    let bytes = encode_request(&empty);
    assert_eq!(bytes, [0x30, 0x05, 0x01, 0x01, 0xFF, 0xA1, 0x00]);
    assert_eq!(decode_request(&bytes).unwrap().dns(), Some(vec![]));
}

#[test]
fn request_round_trips_with_every_field() {
    let request = full_request();
    let decoded = decode_request(&encode_request(&request)).unwrap();
    assert_eq!(decoded, request);
    assert_eq!(decoded.time_limit, Some(2_147_483_647));
    assert!(decoded.hold_until_unbind);
    assert_eq!(decoded.freeze_id, Some(u64::MAX));
    assert_eq!(decoded.dn_set.as_ref().map(|set| set.len()), Some(3));
    for time_limit in [0, 1, 127, 128, 255, 256, 65_535, 65_536, MAX_INT] {
        let request = AllowBackupRequest::off().with_time_limit(time_limit);
        assert_eq!(decode_request(&encode_request(&request)).unwrap(), request);
    }
}

#[test]
fn time_limit_above_max_int_is_lowered() {
    assert_eq!(
        AllowBackupRequest::on()
            .with_time_limit(u32::MAX)
            .time_limit,
        Some(MAX_INT)
    );
    let mut request = AllowBackupRequest::on();
    request.time_limit = Some(MAX_INT + 1);
    let bytes = encode_request(&request);
    assert_eq!(
        bytes,
        [0x30, 0x09, 0x01, 0x01, 0xFF, 0x80, 0x04, 0x7F, 0xFF, 0xFF, 0xFF]
    );
    assert_eq!(decode_request(&bytes).unwrap().time_limit, Some(MAX_INT));
}

#[test]
fn empty_input_is_an_error() {
    assert_eq!(
        request_error(&[]),
        "Allow-Backup request value is not a valid AllowBackupRequest: the value is empty"
    );
    assert!(status_error(&[]).ends_with(": the value is empty"));
}

#[test]
fn truncated_input_is_an_error() {
    let full = encode_request(&full_request());
    for end in 1..full.len() {
        request_error(&full[..end]);
    }
    let full = encode_status(&full_status());
    for end in 1..full.len() {
        status_error(&full[..end]);
    }
}

#[test]
fn wrong_outer_tag_is_an_error() {
    for tag in [0x31, 0x04, 0x10, 0xA0, 0x60, 0x01] {
        let mut input = ON;
        input[0] = tag;
        request_error(&input);
        let mut input = THAWED_EXAMPLE;
        input[0] = tag;
        status_error(&input);
    }
}

#[test]
fn time_limit_out_of_range_is_an_error() {
    for time_limit in [
        &[0xFF][..],                     // -1
        &[0x80, 0x00, 0x00, 0x00],       // -2^31
        &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF], // -1, padded
        &[0x00, 0x80, 0x00, 0x00, 0x00], // maxInt + 1
        &[0x01, 0x00, 0x00, 0x00, 0x00], // 2^32
    ] {
        let mut input = vec![0x30, 5 + time_limit.len() as u8, 0x01, 0x01, 0xFF, 0x80];
        input.push(time_limit.len() as u8);
        input.extend_from_slice(time_limit);
        let message = request_error(&input);
        assert!(message.contains("time_limit"), "{message}");
    }
}

#[test]
fn trailing_octets_are_an_error() {
    for trailer in [&[0x00][..], &[0x00, 0x00], &ON, &[0xFF; 7]] {
        let mut input = ON_30_EXAMPLE.to_vec();
        input.extend_from_slice(trailer);
        let message = request_error(&input);
        assert!(
            message.ends_with(&format!(
                ": {} octet(s) follow the end of the value",
                trailer.len()
            )),
            "{message}"
        );
        let mut input = THAWED_EXAMPLE.to_vec();
        input.extend_from_slice(trailer);
        status_error(&input);
    }
}

#[test]
fn other_malformed_requests_are_errors() {
    let cases: [(&[u8], &str); 7] = [
        (&[0x30, 0x00], "mode"),
        (&[0x30, 0x03, 0x04, 0x01, 0xFF], "mode"), // not a BOOLEAN
        (&[0x30, 0x04, 0x01, 0x02, 0x00, 0xFF], "mode"), // 2 octets
        (&[0x30, 0x06, 0x01, 0x01, 0xFF], "more data"), // length beyond the end
        (&[0x30, 0x05, 0x01, 0x01, 0xFF, 0x80, 0x00], "time_limit"), // no octet
        (
            &[0x30, 0x07, 0x01, 0x01, 0xFF, 0xA1, 0x02, 0x02, 0x00],
            "dn_set",
        ), // of INTEGER
        // holdUntilUnbind before timeLimit
        (
            &[
                0x30, 0x09, 0x01, 0x01, 0xFF, 0x82, 0x01, 0xFF, 0x80, 0x01, 0x1E,
            ],
            "extra data",
        ),
    ];
    for (input, about) in cases {
        let message = request_error(input);
        assert!(message.contains(about), "{message}");
    }
}

#[test]
fn status_has_known_bytes() {
    let status = AllowBackupStatus::thawed(vec![BackendStatus::new(
        "dc=example,dc=org",
        BackendMode::Readonly,
        false,
    )]);
    assert_eq!(encode_status(&status), THAWED_EXAMPLE);
    assert_eq!(decode_status(&THAWED_EXAMPLE).unwrap(), status);
}

#[test]
fn status_optional_fields_have_known_bytes() {
    let mut status = AllowBackupStatus::thawed(vec![]);
    status.state = FreezeState::Frozen;
    status.holder = Some(LdapDn::from_slice(b"cn=b"));
    status.since = Some(0x0102);
    status.lease_expires = Some(0x80);
    status.freeze_id = Some(u64::MAX);
    status.queued_requests = 1;
    status.queued_bytes = 0x1_0000_0000;
    status.in_flight = 127;
    let bytes = [
        0x30, 0x2B, // SEQUENCE, 43 octets
        0x0A, 0x01, 0x02, // state frozen
        0x30, 0x00, // backends: none
        0x80, 0x04, b'c', b'n', b'=', b'b', // holder [0]
        0x81, 0x02, 0x01, 0x02, // since [1] 258
        0x82, 0x01, 0x01, // queuedRequests [2] 1
        0x83, 0x05, 0x01, 0x00, 0x00, 0x00, 0x00, // queuedBytes [3] 2^32
        0x84, 0x01, 0x7F, // inFlight [4] 127
        0x85, 0x02, 0x00, 0x80, // leaseExpires [5] 128
        0x86, 0x09, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
        0xFF, // freezeId [6] 2^64-1
    ];
    assert_eq!(encode_status(&status), bytes);
    assert_eq!(decode_status(&bytes).unwrap(), status);
}

/// `releasing` [7], the first addition to AllowBackupStatus: encoded after
/// freezeId only when TRUE, so that a status without it has the bytes it
/// had before, and a first-version decoder (which skips [7] and up as
/// additions) sees state frozen.
#[test]
fn releasing_has_known_bytes_and_is_omitted_when_false() {
    let mut status = AllowBackupStatus::thawed(vec![]);
    status.state = FreezeState::Frozen;
    status.freeze_id = Some(3);
    let frozen = [
        0x30, 0x11, // SEQUENCE, 17 octets
        0x0A, 0x01, 0x02, // state frozen
        0x30, 0x00, // backends: none
        0x82, 0x01, 0x00, // queuedRequests [2] 0
        0x83, 0x01, 0x00, // queuedBytes [3] 0
        0x84, 0x01, 0x00, // inFlight [4] 0
        0x86, 0x01, 0x03, // freezeId [6] 3
    ];
    assert_eq!(encode_status(&status), frozen);
    assert_eq!(decode_status(&frozen).unwrap(), status);
    status.releasing = true;
    let mut releasing = frozen.to_vec();
    releasing[1] += 3;
    releasing.extend([0x87, 0x01, 0xFF]); // releasing [7] TRUE
    assert_eq!(encode_status(&status), releasing);
    assert_eq!(decode_status(&releasing).unwrap(), status);
    // BER: any non-zero octet is TRUE; an explicit FALSE decodes too.
    let last = releasing.len() - 1;
    releasing[last] = 0x01;
    assert_eq!(decode_status(&releasing).unwrap(), status);
    releasing[last] = 0x00;
    status.releasing = false;
    assert_eq!(decode_status(&releasing).unwrap(), status);
}

/// Encodings from before `releasing` (the first version's) still decode,
/// as not releasing.
#[test]
fn statuses_without_releasing_still_decode() {
    let status = decode_status(&THAWED_EXAMPLE).unwrap();
    assert!(!status.releasing);
    let mut frozen = full_status();
    frozen.state = FreezeState::Frozen;
    let bytes = encode_status(&frozen);
    assert!(!bytes.windows(2).any(|w| w == [0x87, 0x01]), "{bytes:02X?}");
    assert_eq!(decode_status(&bytes).unwrap(), frozen);
}

/// `releasing` must be a BOOLEAN: a malformed one is an error, not an
/// ignored addition.
#[test]
fn malformed_releasing_is_an_error() {
    let mut contents = THAWED_EXAMPLE[2..].to_vec();
    contents.extend([0x87, 0x02, 0xFF, 0xFF]);
    status_error(&tlv(0x30, &contents));
    let mut contents = THAWED_EXAMPLE[2..].to_vec();
    contents.extend([0x87, 0x00]);
    status_error(&tlv(0x30, &contents));
}

#[test]
fn status_round_trips_with_every_field() {
    let status = full_status();
    assert_eq!(decode_status(&encode_status(&status)).unwrap(), status);
    for state in [
        FreezeState::Thawed,
        FreezeState::Draining,
        FreezeState::Frozen,
    ] {
        for releasing in [false, true] {
            let status = AllowBackupStatus {
                state,
                releasing,
                ..full_status()
            };
            assert_eq!(decode_status(&encode_status(&status)).unwrap(), status);
        }
    }
    let minimal = AllowBackupStatus::thawed(vec![]);
    assert_eq!(decode_status(&encode_status(&minimal)).unwrap(), minimal);
}

/// THAWED_EXAMPLE built from its parts, with some of them changed.
struct Thawed {
    state: u8,
    mode: u8,
    backend_extra: Vec<u8>,
    queued_requests: Option<u8>,
    in_flight: u8,
}

impl Thawed {
    const AS_IS: Thawed = Thawed {
        state: 0,
        mode: 0,
        backend_extra: Vec::new(),
        queued_requests: Some(0),
        in_flight: 0,
    };

    fn encode(&self) -> Vec<u8> {
        let mut backend = tlv(0x04, b"dc=example,dc=org");
        backend.extend(tlv(0x0A, &[self.mode]));
        backend.extend(tlv(0x01, &[0x00]));
        backend.extend_from_slice(&self.backend_extra);
        let mut contents = tlv(0x0A, &[self.state]);
        contents.extend(tlv(0x30, &tlv(0x30, &backend)));
        if let Some(queued_requests) = self.queued_requests {
            contents.extend(tlv(0x82, &[queued_requests]));
        }
        contents.extend(tlv(0x83, &[0x00]));
        contents.extend(tlv(0x84, &[self.in_flight]));
        tlv(0x30, &contents)
    }
}

#[test]
fn malformed_statuses_are_errors() {
    // The builder is right, and gives a valid value when nothing is changed.
    assert_eq!(Thawed::AS_IS.encode(), THAWED_EXAMPLE);
    decode_status(&Thawed::AS_IS.encode()).unwrap();
    for broken in [
        Thawed {
            state: 3,
            ..Thawed::AS_IS
        },
        Thawed {
            mode: 3,
            ..Thawed::AS_IS
        },
        Thawed {
            in_flight: 0xFF,
            ..Thawed::AS_IS
        }, // -1
        Thawed {
            queued_requests: None,
            ..Thawed::AS_IS
        },
        // An unknown universal component (not an addition) in a BackendStatus.
        Thawed {
            backend_extra: tlv(0x04, &[]),
            ..Thawed::AS_IS
        },
    ] {
        status_error(&broken.encode());
    }
    // Where an addition would be fine.
    let extended = Thawed {
        backend_extra: tlv(0x80, &[]),
        ..Thawed::AS_IS
    };
    decode_status(&extended.encode()).unwrap();
}

/// Wraps `contents` in a TLV with a minimal definite length (< 64 KiB).
fn tlv(identifier: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![identifier];
    match contents.len() {
        n @ 0..=0x7F => out.push(n as u8),
        n @ 0x80..=0xFF => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(contents);
    out
}

#[test]
fn unknown_extension_additions_are_ignored() {
    // A [4] and a [31] (high-tag-number form) appended by a later version.
    let mut contents = ON_30_EXAMPLE[2..].to_vec();
    contents.extend(tlv(0x84, &[0x05]));
    contents.extend([0xBF, 0x1F, 0x01, 0x00]);
    let request = AllowBackupRequest::on()
        .with_time_limit(30)
        .with_dn_set(["dc=example,dc=org"]);
    assert_eq!(decode_request(&tlv(0x30, &contents)).unwrap(), request);

    // Additions to AllowBackupStatus and to each BackendStatus, with long
    // (two-octet) lengths around them.
    let long = "ou=".to_owned() + &"x".repeat(300) + ",dc=example,dc=org";
    let status = AllowBackupStatus {
        state: FreezeState::Frozen,
        backends: vec![
            BackendStatus::new("o=a", BackendMode::Readonly, true),
            BackendStatus::new(&long, BackendMode::Stop, false),
        ],
        holder: Some(LdapDn::from_slice(long.as_bytes())),
        since: Some(1),
        queued_requests: 2,
        queued_bytes: 3,
        in_flight: 4,
        lease_expires: Some(5),
        freeze_id: Some(6),
        releasing: true,
        sessions_waiting: 0,
        sessions_carried: 0,
        sessions_not_carried: 0,
    };
    let encode = |extended: bool| {
        let mut backends = Vec::new();
        for (suffix, mode, frozen) in [(&b"o=a"[..], 0, 0xFF), (long.as_bytes(), 1, 0)] {
            let mut backend = tlv(0x04, suffix);
            backend.extend(tlv(0x0A, &[mode]));
            backend.extend(tlv(0x01, &[frozen]));
            if extended {
                backend.extend(tlv(0x80, b"later"));
            }
            backends.extend(tlv(0x30, &backend));
        }
        let mut contents = tlv(0x0A, &[2]);
        contents.extend(tlv(0x30, &backends));
        contents.extend(tlv(0x80, long.as_bytes()));
        for (tag, value) in [
            (0x81, 1),
            (0x82, 2),
            (0x83, 3),
            (0x84, 4),
            (0x85, 5),
            (0x86, 6),
        ] {
            contents.extend(tlv(tag, &[value]));
        }
        contents.extend(tlv(0x87, &[0xFF])); // releasing [7] TRUE
        if extended {
            contents.extend(tlv(0x88, &[0x01]));
            contents.extend(tlv(0xA9, &tlv(0x04, &[b'x'; 200])));
        }
        tlv(0x30, &contents)
    };
    assert_eq!(encode_status(&status), encode(false));
    assert_eq!(decode_status(&encode(true)).unwrap(), status);
}

#[test]
fn malformed_extensions_are_still_errors() {
    // A root component after an addition.
    let mut contents = vec![0x01, 0x01, 0xFF];
    contents.extend(tlv(0x84, &[0x05]));
    contents.extend(tlv(0x80, &[0x1E]));
    request_error(&tlv(0x30, &contents));
    // Unknown components that are not in the range reserved for additions:
    // a timeLimit with its universal tag, a dnSet as a plain SET, an
    // application tag, a BackendStatus component with a universal tag.
    for unknown in [
        tlv(0x02, &[0x1E]),
        tlv(0x31, &tlv(0x04, b"o=a")),
        tlv(0x43, &[0x00]),
        tlv(0x5F, &[]),
    ] {
        let mut contents = vec![0x01, 0x01, 0xFF];
        contents.extend(unknown);
        request_error(&tlv(0x30, &contents));
    }
    // A truncated addition.
    request_error(&[0x30, 0x06, 0x01, 0x01, 0xFF, 0x84, 0x05, 0x00]);
    // An indefinite length is not LDAP.
    request_error(&[0x30, 0x80, 0x01, 0x01, 0xFF, 0x84, 0x01, 0x05, 0x00, 0x00]);
    // An addition does not excuse trailing octets.
    let message = request_error(&[0x30, 0x06, 0x01, 0x01, 0xFF, 0x84, 0x01, 0x05, 0x00]);
    assert!(
        message.ends_with(": 1 octet(s) follow the end of the value"),
        "{message}"
    );
}
