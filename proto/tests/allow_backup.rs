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
    b'd', b'c', b'=', b'e', b'x', b'a', b'm', b'p', b'l', b'e', b',', b'd', b'c', b'=', b'o',
    b'r', b'g',
];

/// The status of a thawed server with one read-only backend, by hand.
const THAWED_EXAMPLE: [u8; 43] = [
    0x30, 0x29, // SEQUENCE, 41 octets
    0x0A, 0x01, 0x00, // state ENUMERATED thawed
    0x30, 0x1B, // backends SEQUENCE OF, 27 octets
    0x30, 0x19, // BackendStatus SEQUENCE, 25 octets
    0x04, 0x11, // suffix "dc=example,dc=org"
    b'd', b'c', b'=', b'e', b'x', b'a', b'm', b'p', b'l', b'e', b',', b'd', b'c', b'=', b'o',
    b'r', b'g', //
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
}

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
        message.starts_with(
            "Allow-Backup status response value is not a valid AllowBackupStatus: "
        ),
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
    assert_eq!(decoded.dn_set.as_ref().map(|set| set.len()), Some(3));
    for time_limit in [0, 1, 127, 128, 255, 256, 65_535, 65_536, MAX_INT] {
        let request = AllowBackupRequest::off().with_time_limit(time_limit);
        assert_eq!(decode_request(&encode_request(&request)).unwrap(), request);
    }
}

#[test]
fn time_limit_above_max_int_is_lowered() {
    assert_eq!(
        AllowBackupRequest::on().with_time_limit(u32::MAX).time_limit,
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
        &[0xFF][..],                        // -1
        &[0x80, 0x00, 0x00, 0x00],          // -2^31
        &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF],    // -1, padded
        &[0x00, 0x80, 0x00, 0x00, 0x00],    // maxInt + 1
        &[0x01, 0x00, 0x00, 0x00, 0x00],    // 2^32
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
    for input in [
        &[0x30, 0x00][..],                                       // mode missing
        &[0x30, 0x03, 0x04, 0x01, 0xFF],                         // mode not a BOOLEAN
        &[0x30, 0x04, 0x01, 0x02, 0x00, 0xFF],                   // BOOLEAN of 2 octets
        &[0x30, 0x06, 0x01, 0x01, 0xFF, 0x82, 0x01, 0x00][..5],  // length beyond the end
        &[0x30, 0x06, 0x01, 0x01, 0xFF, 0x80, 0x00, 0x00],       // trailing octets inside
        &[0x30, 0x09, 0x01, 0x01, 0xFF, 0x82, 0x01, 0xFF, 0x80, 0x01, 0x1E], // out of order
        &[0x30, 0x07, 0x01, 0x01, 0xFF, 0xA1, 0x02, 0x02, 0x00], // dnSet of an INTEGER
    ] {
        request_error(input);
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
        0x30, 0x2E, // SEQUENCE, 46 octets
        0x0A, 0x01, 0x02, // state frozen
        0x30, 0x00, // backends: none
        0x80, 0x04, b'c', b'n', b'=', b'b', // holder [0]
        0x81, 0x02, 0x01, 0x02, // since [1] 258
        0x82, 0x01, 0x01, // queuedRequests [2] 1
        0x83, 0x05, 0x01, 0x00, 0x00, 0x00, 0x00, // queuedBytes [3] 2^32
        0x84, 0x01, 0x7F, // inFlight [4] 127
        0x85, 0x02, 0x00, 0x80, // leaseExpires [5] 128
        0x86, 0x09, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, // freezeId [6] 2^64-1
    ];
    assert_eq!(encode_status(&status), bytes);
    assert_eq!(decode_status(&bytes).unwrap(), status);
}

#[test]
fn status_round_trips_with_every_field() {
    let status = full_status();
    assert_eq!(decode_status(&encode_status(&status)).unwrap(), status);
    for state in [FreezeState::Thawed, FreezeState::Draining, FreezeState::Frozen] {
        let status = AllowBackupStatus {
            state,
            ..full_status()
        };
        assert_eq!(decode_status(&encode_status(&status)).unwrap(), status);
    }
    let minimal = AllowBackupStatus::thawed(vec![]);
    assert_eq!(decode_status(&encode_status(&minimal)).unwrap(), minimal);
}

#[test]
fn malformed_statuses_are_errors() {
    let mut unknown_state = THAWED_EXAMPLE;
    unknown_state[4] = 3;
    status_error(&unknown_state);
    let mut unknown_mode = THAWED_EXAMPLE;
    unknown_mode[30] = 3;
    status_error(&unknown_mode);
    let mut negative_count = THAWED_EXAMPLE;
    negative_count[42] = 0xFF;
    status_error(&negative_count);
    // queuedRequests missing
    let mut missing = THAWED_EXAMPLE.to_vec();
    missing.drain(35..38);
    missing[1] -= 3;
    status_error(&missing);
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
    // A [3] (and a [31], a high-tag-number tag) appended by a later version.
    let mut contents = ON_30_EXAMPLE[2..].to_vec();
    contents.extend(tlv(0x83, &[0x05]));
    contents.extend(tlv(0xBF, &[]).iter().take(1).chain(&[0x1F, 0x01, 0x00]));
    let request = AllowBackupRequest::on()
        .with_time_limit(30)
        .with_dn_set(["dc=example,dc=org"]);
    assert_eq!(decode_request(&tlv(0x30, &contents)).unwrap(), request);

    // Additions to AllowBackupStatus and to a BackendStatus, with long
    // lengths around them.
    let long = "ou=".to_owned() + &"x".repeat(300) + ",dc=example,dc=org";
    let mut status = full_status();
    status.backends[1] = BackendStatus::new(&long, BackendMode::Stop, true);
    status.holder = Some(LdapDn::from_slice(long.as_bytes()));
    let encoded = encode_status(&status);
    let mut backends = Vec::new();
    for backend in &status.backends {
        let mut backend_contents = tlv(0x04, &backend.suffix);
        backend_contents.extend(tlv(0x0A, &[backend.mode as u8]));
        backend_contents.extend(tlv(0x01, &[if backend.frozen { 0xFF } else { 0 }]));
        assert_eq!(tlv(0x30, &backend_contents), encode_backend(backend));
        backend_contents.extend(tlv(0x80, b"later"));
        backends.extend(tlv(0x30, &backend_contents));
    }
    let mut contents = tlv(0x0A, &[1]);
    contents.extend(tlv(0x30, &backends));
    let rest = encoded.len() - split_after_backends(&encoded, &status);
    contents.extend_from_slice(&encoded[encoded.len() - rest..]);
    contents.extend(tlv(0x87, &[0x01]));
    contents.extend(tlv(0xA8, &tlv(0x04, b"x")));
    assert_eq!(decode_status(&tlv(0x30, &contents)).unwrap(), status);
}

/// The DER of a BackendStatus alone, from the encoding of a status holding it.
fn encode_backend(backend: &BackendStatus) -> Vec<u8> {
    let encoded = encode_status(&AllowBackupStatus::thawed(vec![backend.clone()]));
    let start = 2 + if encoded[1] & 0x80 != 0 { (encoded[1] & 0x7F) as usize } else { 0 } + 3;
    let header = 2 + if encoded[start + 1] & 0x80 != 0 {
        (encoded[start + 1] & 0x7F) as usize
    } else {
        0
    };
    let length = encoded[start + header..]
        .iter()
        .take(0)
        .count();
    let _ = length;
    // Skip the SEQUENCE OF header to the BackendStatus.
    let inner = start + header;
    let inner_header = 2 + if encoded[inner + 1] & 0x80 != 0 {
        (encoded[inner + 1] & 0x7F) as usize
    } else {
        0
    };
    let inner_length = if encoded[inner + 1] & 0x80 != 0 {
        encoded[inner + 2..inner + inner_header]
            .iter()
            .fold(0, |n, &b| n << 8 | b as usize)
    } else {
        encoded[inner + 1] as usize
    };
    encoded[inner..inner + inner_header + inner_length].to_vec()
}

/// Offset in `encoded` (a whole status) just after its `backends`.
fn split_after_backends(encoded: &[u8], status: &AllowBackupStatus) -> usize {
    let without = encode_status(&AllowBackupStatus {
        backends: vec![],
        ..status.clone()
    });
    // Everything after `backends` is the same with or without them.
    let tail = without.len() - (2 + header_extra(&without) + 3 + 2);
    encoded.len() - tail
}

fn header_extra(encoded: &[u8]) -> usize {
    if encoded[1] & 0x80 != 0 {
        (encoded[1] & 0x7F) as usize
    } else {
        0
    }
}

#[test]
fn malformed_extensions_are_still_errors() {
    // A root component after an unknown one.
    let mut contents = vec![0x01, 0x01, 0xFF];
    contents.extend(tlv(0x83, &[0x05]));
    contents.extend(tlv(0x80, &[0x1E]));
    request_error(&tlv(0x30, &contents));
    // A truncated unknown component.
    let input = [0x30, 0x06, 0x01, 0x01, 0xFF, 0x83, 0x05, 0x00];
    request_error(&input);
    // An indefinite length is not LDAP.
    let input = [0x30, 0x80, 0x01, 0x01, 0xFF, 0x83, 0x01, 0x05, 0x00, 0x00];
    request_error(&input);
}
