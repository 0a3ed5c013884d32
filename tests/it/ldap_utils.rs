//! Differential tests with OpenLDAP's own command-line tools: the same
//! command against slapd and through the proxy prints the same output and
//! exits with the same status.

use crate::support::*;
use testkit::{user_dn, ADMIN_DN, ADMIN_PW};

/// Runs `args` (with `URL` as the placeholder) both ways and asserts the same
/// exit status and output; returns the direct output for content checks.
async fn same(lab: &Lab, tool: &str, args: &[&str], stdin: Option<&str>) -> ToolOutput {
    let (d, p) = both(lab, tool, args, stdin).await;
    assert_eq!(d.code, p.code, "{tool} {args:?}: exit status\n{d:?}\n{p:?}");
    assert_eq!(d.stdout, p.stdout, "{tool} {args:?}: output");
    // stderr may name the URL; compare it with the URL removed.
    assert_eq!(
        d.stderr.replace(&lab.direct(), "URL"),
        p.stderr.replace(&lab.proxied(), "URL"),
        "{tool} {args:?}: stderr"
    );
    d
}

fn dns(out: &str) -> usize {
    out.lines().filter(|l| l.starts_with("dn:")).count()
}

#[tokio::test]
async fn searches_in_every_scope_with_filters_and_attributes() {
    let lab = Lab::start().await;
    let base = ["-x", "-LLL", "-H", "URL"];
    for (extra, want_dns) in [
        (
            vec!["-b", "dc=example,dc=org", "-s", "base", "(objectClass=*)"],
            1,
        ),
        (
            vec![
                "-b",
                "dc=example,dc=org",
                "-s",
                "one",
                "(objectClass=*)",
                "ou",
            ],
            3,
        ),
        (
            vec![
                "-b",
                "ou=people,dc=example,dc=org",
                "-s",
                "sub",
                "(uid=user1*)",
                "cn",
                "mail",
            ],
            12,
        ),
        (
            vec![
                "-b",
                "dc=example,dc=org",
                "(&(objectClass=person)(|(uid=user2)(cn=User 3)))",
                "1.1",
            ],
            2,
        ),
        (
            vec!["-b", "dc=example,dc=org", "(cn=*ser 4*)", "*", "+"],
            11,
        ),
        (vec!["-b", "dc=other,dc=org", "(!(uid=*))", "dn"], 3 + 1 + 1),
    ] {
        let mut args = base.to_vec();
        args.extend(extra.iter());
        let out = same(&lab, "ldapsearch", &args, None).await;
        assert_eq!(out.code, Some(0), "{args:?}: {}", out.stderr);
        assert_eq!(dns(&out.stdout), want_dns, "{args:?}\n{}", out.stdout);
    }
    // The root DSE: the same, plus the proxy's two extended operations.
    let (d, p) = both(
        &lab,
        "ldapsearch",
        &["-x", "-LLL", "-H", "URL", "-b", "", "-s", "base", "+"],
        None,
    )
    .await;
    assert_eq!((d.code, p.code), (Some(0), Some(0)));
    let mut extra: Vec<&str> = p.stdout.lines().collect();
    for line in d.stdout.lines() {
        let i = extra
            .iter()
            .position(|l| *l == line)
            .expect("every direct line is kept");
        extra.remove(i);
    }
    assert_eq!(
        extra,
        [
            format!("supportedExtension: {}", abproxy_proto::ALLOW_BACKUP_OID),
            format!(
                "supportedExtension: {}",
                abproxy_proto::ALLOW_BACKUP_STATUS_OID
            )
        ]
    );
    // Errors: no such base (32), size limit (4) for anonymous users.
    let out = same(
        &lab,
        "ldapsearch",
        &["-x", "-H", "URL", "-b", "ou=nowhere,dc=example,dc=org"],
        None,
    )
    .await;
    assert_eq!(out.code, Some(32));
    let out = same(
        &lab,
        "ldapsearch",
        &[
            "-x",
            "-LLL",
            "-H",
            "URL",
            "-z",
            "5",
            "-b",
            "ou=people,dc=example,dc=org",
            "uid",
        ],
        None,
    )
    .await;
    assert_eq!(out.code, Some(4));
    assert_eq!(dns(&out.stdout), 5);
}

#[tokio::test]
async fn binds_and_whoami() {
    let lab = Lab::start().await;
    let u1 = user_dn(1);
    let out = same(
        &lab,
        "ldapwhoami",
        &["-x", "-H", "URL", "-D", &u1, "-w", "pass1"],
        None,
    )
    .await;
    assert_eq!(out.stdout.trim(), format!("dn:{u1}"));
    let out = same(&lab, "ldapwhoami", &["-x", "-H", "URL"], None).await;
    assert_eq!(out.stdout.trim(), "anonymous");
    let out = same(
        &lab,
        "ldapwhoami",
        &["-x", "-H", "URL", "-D", &u1, "-w", "nope"],
        None,
    )
    .await;
    assert_eq!(out.code, Some(49));
    assert!(out.stderr.contains("Invalid credentials"));
    let out = same(
        &lab,
        "ldapexop",
        &["-x", "-H", "URL", "-D", ADMIN_DN, "-w", ADMIN_PW, "whoami"],
        None,
    )
    .await;
    assert_eq!(out.stdout.trim(), format!("dn:{ADMIN_DN}"));
    // An extended operation slapd does not know: the same error.
    let out = same(&lab, "ldapexop", &["-x", "-H", "URL", "1.2.3.4.5.6"], None).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("Protocol error (2)"), "{out:?}");
}

#[tokio::test]
async fn paged_and_sorted_searches() {
    let lab = Lab::start().await;
    let out = same(
        &lab,
        "ldapsearch",
        &[
            "-x",
            "-LLL",
            "-H",
            "URL",
            "-D",
            ADMIN_DN,
            "-w",
            ADMIN_PW,
            "-E",
            "pr=7/noprompt",
            "-b",
            "ou=people,dc=example,dc=org",
            "(uid=*)",
            "uid",
        ],
        None,
    )
    .await;
    assert_eq!(dns(&out.stdout), 100);
    let out = same(
        &lab,
        "ldapsearch",
        &[
            "-x",
            "-LLL",
            "-H",
            "URL",
            "-D",
            ADMIN_DN,
            "-w",
            ADMIN_PW,
            "-E",
            "!sss=-uidNumber",
            "-b",
            "ou=people,dc=example,dc=org",
            "(uid=user9*)",
            "uidNumber",
        ],
        None,
    )
    .await;
    let numbers: Vec<u32> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("uidNumber: "))
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(numbers.len(), 11, "{out:?}");
    let mut sorted = numbers.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(numbers, sorted, "descending by uidNumber");
}

#[tokio::test]
async fn writes_and_compare() {
    let lab = Lab::start().await;
    // The same change script, on different entries for each side.
    let script = |tag: &str| {
        format!(
            "dn: uid=w{tag},ou=people,dc=example,dc=org\nchangetype: add\nobjectClass: inetOrgPerson\n\
             uid: w{tag}\ncn: W {tag}\nsn: W\ndescription: one\n\n\
             dn: uid=w{tag},ou=people,dc=example,dc=org\nchangetype: modify\nreplace: description\n\
             description: two\n-\nadd: mail\nmail: w{tag}@example.org\n\n\
             dn: uid=w{tag},ou=people,dc=example,dc=org\nchangetype: modrdn\nnewrdn: uid=w{tag}\n\
             deleteoldrdn: 1\nnewsuperior: ou=groups,dc=example,dc=org\n\n"
        )
    };
    let auth = ["-x", "-H", "URL", "-D", ADMIN_DN, "-w", ADMIN_PW];
    let d = ldap_tool(
        "ldapmodify",
        &["-x", "-H", &lab.direct(), "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some(&script("d")),
    )
    .await;
    let p = ldap_tool(
        "ldapmodify",
        &["-x", "-H", &lab.proxied(), "-D", ADMIN_DN, "-w", ADMIN_PW],
        Some(&script("p")),
    )
    .await;
    assert_eq!(d.code, Some(0), "{d:?}");
    assert_eq!(p.code, d.code);
    assert_eq!(p.stdout.replace("wp", "wd"), d.stdout);
    // Both moved entries read the same, modulo their names.
    let read = |url: String, tag: &'static str| async move {
        ldap_tool(
            "ldapsearch",
            &[
                "-x",
                "-LLL",
                "-H",
                &url,
                "-b",
                "ou=groups,dc=example,dc=org",
                &format!("(uid=w{tag})"),
                "uid",
                "cn",
                "description",
                "mail",
            ],
            None,
        )
        .await
    };
    let rd = read(lab.direct(), "d").await;
    let rp = read(lab.direct(), "p").await;
    assert!(rd.stdout.contains("description: two"), "{rd:?}");
    assert_eq!(
        rp.stdout.replace("wp", "wd").replace("W p", "W d"),
        rd.stdout
    );

    // Errors: an existing entry (68), an undefined attribute (17), a missing entry (32).
    for (ldif, code) in [
        (
            format!(
                "dn: {}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: user1\ncn: x\nsn: x\n\n",
                user_dn(1)
            ),
            68,
        ),
        (
            format!(
                "dn: {}\nchangetype: modify\nreplace: noSuchAttr\nnoSuchAttr: x\n\n",
                user_dn(1)
            ),
            17,
        ),
        (
            "dn: uid=ghost,dc=example,dc=org\nchangetype: delete\n\n".to_string(),
            32,
        ),
    ] {
        let out = same(&lab, "ldapmodify", &auth, Some(&ldif)).await;
        assert_eq!(out.code, Some(code), "{ldif}: {out:?}");
    }

    // Compare: TRUE (6), FALSE (5), no such attribute (16).
    let u2 = user_dn(2);
    for (ava, code) in [("uid:user2", 6), ("uid:user3", 5), ("carLicense:x", 16)] {
        let out = same(&lab, "ldapcompare", &["-x", "-H", "URL", &u2, ava], None).await;
        assert_eq!(out.code, Some(code), "{ava}: {out:?}");
    }

    // Deletes, both sides.
    for (url, tag) in [(lab.direct(), "d"), (lab.proxied(), "p")] {
        let out = ldap_tool(
            "ldapdelete",
            &[
                "-x",
                "-H",
                &url,
                "-D",
                ADMIN_DN,
                "-w",
                ADMIN_PW,
                &format!("uid=w{tag},ou=groups,dc=example,dc=org"),
            ],
            None,
        )
        .await;
        assert_eq!(out.code, Some(0), "{out:?}");
    }
    let gone = ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-LLL",
            "-H",
            &lab.direct(),
            "-b",
            "dc=example,dc=org",
            "(|(uid=wd)(uid=wp))",
            "1.1",
        ],
        None,
    )
    .await;
    assert_eq!(dns(&gone.stdout), 0);
}

#[tokio::test]
async fn password_modify_through_the_proxy() {
    let lab = Lab::start().await;
    // Each user changes their own password, one direct, one proxied.
    for (url, k) in [(lab.direct(), 5), (lab.proxied(), 6)] {
        let dn = user_dn(k);
        let old = testkit::user_pw(k);
        let out = ldap_tool(
            "ldappasswd",
            &[
                "-x",
                "-H",
                &url,
                "-D",
                &dn,
                "-w",
                &old,
                "-a",
                &old,
                "-s",
                "new-secret",
            ],
            None,
        )
        .await;
        assert_eq!(out.code, Some(0), "{out:?}");
        let out = ldap_tool(
            "ldapwhoami",
            &["-x", "-H", &url, "-D", &dn, "-w", "new-secret"],
            None,
        )
        .await;
        assert_eq!(out.stdout.trim(), format!("dn:{dn}"));
    }
    // A wrong old password: the same refusal both ways.
    let u7 = user_dn(7);
    let out = same(
        &lab,
        "ldappasswd",
        &[
            "-x", "-H", "URL", "-D", &u7, "-w", "pass7", "-a", "bad", "-s", "x",
        ],
        None,
    )
    .await;
    assert_ne!(out.code, Some(0));
}

#[tokio::test]
async fn start_tls_is_refused_clearly() {
    let lab = Lab::start().await;
    // -Z: a warning, then the search goes on in clear.
    let out = ldap_tool(
        "ldapsearch",
        &[
            "-x",
            "-Z",
            "-LLL",
            "-H",
            &lab.proxied(),
            "-b",
            "dc=example,dc=org",
            "-s",
            "base",
            "dc",
        ],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("dc: example"));
    assert!(
        out.stderr.contains("TLS is not configured on the proxy"),
        "{}",
        out.stderr
    );
    // -ZZ: fails with the proxy's message.
    let out = ldap_tool(
        "ldapsearch",
        &["-x", "-ZZ", "-H", &lab.proxied(), "-b", "", "-s", "base"],
        None,
    )
    .await;
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("TLS is not configured on the proxy"),
        "{}",
        out.stderr
    );
}
