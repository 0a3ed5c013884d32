//! The roll-forward journal in front of 389 Directory Server: the same
//! writes, replayed into a fresh instance with the same starting data,
//! give the same user data (the journal is the proxy's, whatever server is
//! behind it).

use abproxy::config::Config;
use abproxy::ProxyHandle;
use ldap3_proto::proto::*;
use testkit::ds389::{Ds389, DM_DN, DM_PW, SUFFIX};

use crate::journal::{modify_op, passwd_of, send_one};
use crate::support::ds389::{addr_of, dump, parse_ldif, raw_bound, skip, start_ds, Entries};
use crate::support::*;

/// User data under the suffix, `userPassword` left out (hashed with a
/// random salt).
async fn user_data(ds: &Ds389) -> Entries {
    let mut e = parse_ldif(&dump(ds, SUFFIX, &["*"]).await);
    for attrs in e.values_mut() {
        attrs.retain(|(a, _)| a != "userpassword");
    }
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_the_proxy_replay_into_a_fresh_389_instance() {
    if skip() {
        return;
    }
    let (ds, copy) = tokio::join!(start_ds(5), start_ds(5));
    assert_eq!(
        user_data(&ds).await,
        user_data(&copy).await,
        "the same start"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let mut config = Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: ds.url(),
        ..Config::default()
    };
    config.freeze.allowed = vec![DM_DN.into()];
    config.journal.dir = Some(dir.clone());
    let proxy = ProxyHandle::spawn(config).await.unwrap();

    let mut c = raw_bound(&addr_of(&proxy.url()), DM_DN, DM_PW).await;
    let user1 = testkit::user_dn(1);
    let user2 = testkit::user_dn(2);
    let entry = format!("cn=j1,{SUFFIX}");
    let msgs = vec![
        add(2, &entry, "j1"),
        add(3, &entry, "j1"), // 68, never replayed
        modify_op(
            4,
            &user1,
            vec![
                (LdapModifyType::Replace, "description", vec!["one", "two"]),
                (LdapModifyType::Add, "mail", vec!["u1@example.org"]),
                (LdapModifyType::Delete, "mail", vec![]),
                (LdapModifyType::Add, "mail", vec!["u1@example.net"]),
            ],
        ),
        LdapMsg::new(
            5,
            LdapOp::ModifyDNRequest(LdapModifyDNRequest {
                dn: entry.clone(),
                newrdn: "cn=j2".into(),
                deleteoldrdn: true,
                new_superior: None,
            }),
        ),
        LdapMsg::new(6, LdapOp::DelRequest(user2.clone())),
        // 389 wants TLS for a password modify: 13, a failed write.
        passwd_of(7, &testkit::user_dn(3), "n3w-secret"),
    ];
    let mut codes = Vec::new();
    for m in msgs {
        codes.push(send_one(&mut c, m).await.code);
    }
    assert_eq!(codes, [0, 68, 0, 0, 0, 13]);
    let want = user_data(&ds).await;
    assert_ne!(want, user_data(&copy).await);

    let dir = dir.to_str().unwrap();
    let out = crate::journal::replay_as(&copy.url(), (DM_DN, DM_PW), &["--dir", dir]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("replayed 4 write(s)"), "{out:?}");
    assert_eq!(user_data(&copy).await, want);
    // The refused password modify was not replayed: the old password works.
    let who = ldap_tool(
        "ldapwhoami",
        &[
            "-x",
            "-H",
            &copy.url(),
            "-D",
            &testkit::user_dn(3),
            "-w",
            &testkit::user_pw(3),
        ],
        None,
    )
    .await;
    assert_eq!(who.code, Some(0), "{}", who.stderr);
}
