//! Envelope peek: never panics, and every range it reports lies inside the
//! frame (so later slicing cannot panic either).
#![no_main]

use abproxy::wire::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for env in [Envelope::request(data), Envelope::response(data)]
        .into_iter()
        .flatten()
    {
        assert!(env.msgid >= 0);
        let _ = env.dn_bytes(data);
        let _ = env.new_superior_bytes(data);
        let _ = env.oid_bytes(data);
        let _ = env.value_bytes(data);
        let _ = env.sasl_mechanism_bytes(data);
        for c in env.controls(data) {
            let _ = (c.oid, c.critical, c.value);
        }
    }
});
