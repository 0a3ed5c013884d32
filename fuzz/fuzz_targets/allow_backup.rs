//! Allow-Backup values: decoding never panics, and whatever decodes
//! re-encodes to a value that decodes to the same thing.
#![no_main]

use abproxy_proto::{decode_request, decode_status, encode_request, encode_status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = decode_request(data) {
        let again = decode_request(&encode_request(&req)).expect("re-encoded request decodes");
        assert_eq!(req, again);
    }
    if let Ok(st) = decode_status(data) {
        let again = decode_status(&encode_status(&st)).expect("re-encoded status decodes");
        assert_eq!(st, again);
    }
});
