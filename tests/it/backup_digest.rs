//! The content digest (`abproxy::backup`) against a real slapd: the digest
//! of a database dump (`slapcat`) equals the digest of an LDAP export of the
//! same data (a rootdn subtree search for `*` and `+`), through the proxy
//! and direct, before and after a change, and the change changes it.

use std::collections::BTreeMap;

use abproxy::backup::digest::{is_computed, COMPUTED};
use abproxy::backup::{ldif, Digest, Entry};
use tokio::task::block_in_place;

use crate::support::{ldap_tool, Lab, ADMIN_DN, ADMIN_PW};

const SUFFIX: &str = "dc=example,dc=org";

/// `slapcat -b SUFFIX` (off the runtime: it blocks).
fn dump(lab: &Lab) -> String {
    block_in_place(|| lab.slapd.slapcat(SUFFIX)).expect("slapcat")
}

/// A rootdn subtree search of SUFFIX for `*` and `+` as LDIF.
async fn export(url: &str, extra: &[&str]) -> String {
    let mut args = vec!["-LLL", "-x", "-H", url, "-D", ADMIN_DN, "-w", ADMIN_PW];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-b", SUFFIX, "-s", "sub", "(objectClass=*)", "*", "+"]);
    let out = ldap_tool("ldapsearch", &args, None).await;
    assert_eq!(out.code, Some(0), "ldapsearch {url}: {}", out.stderr);
    out.stdout
}

fn entries(what: &str, text: &str) -> Vec<Entry> {
    ldif::read(text).unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn digest(what: &str, text: &str) -> Digest {
    Digest::of_entries(entries(what, text)).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Per DN (as printed), the attribute names (lower case) of each entry.
fn names(text: &str) -> BTreeMap<String, Vec<String>> {
    entries("names", text)
        .into_iter()
        .map(|e| {
            let mut n: Vec<String> = e.attrs.iter().map(|(a, _)| a.to_lowercase()).collect();
            n.sort();
            (e.dn.to_lowercase(), n)
        })
        .collect()
}

/// Where two LDIF texts differ, entry by entry and attribute by attribute,
/// computed attributes aside (for a failing assertion's message).
fn differences(a: &str, b: &str) -> String {
    let index = |text: &str| -> BTreeMap<String, BTreeMap<String, Vec<Vec<u8>>>> {
        entries("diff", text)
            .into_iter()
            .map(|e| {
                let attrs = e
                    .attrs
                    .into_iter()
                    .filter(|(n, _)| !is_computed(n))
                    .map(|(n, mut v)| {
                        v.sort();
                        (n.to_lowercase(), v)
                    })
                    .collect();
                (e.dn.to_lowercase(), attrs)
            })
            .collect()
    };
    let (a, b) = (index(a), index(b));
    let mut out = String::new();
    for dn in a
        .keys()
        .chain(b.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        match (a.get(dn), b.get(dn)) {
            (Some(x), Some(y)) => {
                for n in x
                    .keys()
                    .chain(y.keys())
                    .collect::<std::collections::BTreeSet<_>>()
                {
                    if x.get(n) != y.get(n) {
                        out += &format!("{dn}: {n} differs\n");
                    }
                }
            }
            (x, _) => {
                out += &format!(
                    "{dn}: only in {}\n",
                    if x.is_some() { "first" } else { "second" }
                )
            }
        }
    }
    out
}

/// The three views of the data and their digests, checked equal.
async fn same_digest(lab: &Lab, when: &str) -> (Digest, String, String) {
    let cat = dump(lab);
    // Folded at ldapsearch's default width through the proxy, unfolded
    // direct: the reader takes both.
    let proxied = export(&lab.proxied(), &[]).await;
    let direct = export(&lab.direct(), &["-o", "ldif-wrap=no"]).await;
    let d = digest("slapcat", &cat);
    assert_eq!(
        digest("proxied", &proxied),
        d,
        "{when}: slapcat vs export through the proxy:\n{}",
        differences(&cat, &proxied)
    );
    assert_eq!(
        digest("direct", &direct),
        d,
        "{when}: slapcat vs direct export:\n{}",
        differences(&cat, &direct)
    );
    (d, cat, proxied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slapcat_and_ldap_export_give_one_digest() {
    let lab = Lab::start().await;
    let (before, cat, proxied) = same_digest(&lab, "at start").await;

    // What makes the two differ is what the digest leaves out: the export
    // has the attributes slapd computes on read, the dump has none of
    // them, and both have the stored operational ones.
    let (cat_names, export_names) = (names(&cat), names(&proxied));
    assert_eq!(cat_names.len(), export_names.len());
    assert!(cat_names.len() > 100, "{} entries", cat_names.len());
    let mut computed_seen = std::collections::BTreeSet::new();
    for (dn, stored) in &cat_names {
        let read = export_names
            .get(dn)
            .unwrap_or_else(|| panic!("{dn} not exported"));
        for n in stored {
            assert!(!is_computed(n), "slapcat printed {n} for {dn}");
            assert!(read.contains(n), "{dn}: {n} stored but not read");
        }
        for n in read {
            if !stored.contains(n) {
                assert!(is_computed(n), "{dn}: {n} read but not stored");
                computed_seen.insert(n.clone());
            }
        }
        for n in ["entryuuid", "entrycsn", "createtimestamp", "creatorsname"] {
            assert!(stored.iter().any(|s| s == n), "{dn}: no {n}");
        }
    }
    for n in [
        "entrydn",
        "subschemasubentry",
        "hassubordinates",
        "contextcsn",
    ] {
        assert!(
            computed_seen.contains(n),
            "{n} never read ({computed_seen:?})"
        );
        assert!(COMPUTED.contains(&n));
    }

    // One modify through the proxy: a long value (folded by ldapsearch)
    // with a character beyond ASCII (base64).
    let long = format!("caf\u{e9} {}", "x".repeat(200));
    let change = format!(
        "dn: {}\nchangetype: modify\nreplace: description\ndescription: {long}\n",
        testkit::user_dn(1)
    );
    let out = ldap_tool(
        "ldapmodify",
        &["-x", "-H", &lab.proxied(), "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some(&change),
    )
    .await;
    assert_eq!(out.code, Some(0), "ldapmodify: {}", out.stderr);

    let (after, cat, proxied) = same_digest(&lab, "after the modify").await;
    assert_ne!(after, before, "the modify did not change the digest");
    assert!(proxied.contains("\n "), "the export was not folded");
    let user = entries("slapcat", &cat)
        .into_iter()
        .find(|e| e.dn == testkit::user_dn(1))
        .expect("user 1 dumped");
    let description = user.attrs.iter().find(|(n, _)| n == "description");
    assert_eq!(
        description.map(|d| d.1.clone()),
        Some(vec![long.into_bytes()])
    );
}
