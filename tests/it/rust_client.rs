// Differential tests with the Rust LDAP client `ldap3` (async API): every
// scenario runs once directly against slapd and once through the proxy, and
// the two runs must produce the same [`Summary`] (result code, matched DN,
// diagnostic text, referrals, entries, response controls, extended-response
// name/value). Each test also asserts on the expected content, so that two
// equally wrong runs (or two empty ones) cannot pass.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::support::{Lab, ADMIN_DN, ADMIN_PW};
use ldap3::adapters::{Adapter, EntriesOnly, PagedResults as PagedAdapter};
use ldap3::controls::{
    parse_syncinfo, Control, ControlParser, ControlType, PagedResults, RawControl, SyncInfo,
    SyncState,
};
use ldap3::exop::{Exop, PasswordModify, PasswordModifyResp, WhoAmI};
use ldap3::result::ExopResult;
use ldap3::{
    Ldap, LdapConnAsync, LdapResult, Mod, ResultEntry, Scope, SearchEntry, SearchOptions,
    SearchResult, SearchStream,
};
use testkit::{other_user_dn, user_dn, user_pw, SlapdOptions, OTHER_SUFFIX, SUFFIX};
use tokio::task::JoinHandle;

/// Upper bound for one side's whole scenario (a hang is a failure, not a stall).
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a persistent search may take to report a change.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

const PEOPLE: &str = "ou=people,dc=example,dc=org";
const GROUPS: &str = "ou=groups,dc=example,dc=org";
const SORT_REQUEST_OID: &str = "1.2.840.113556.1.4.473";
const SORT_RESPONSE_OID: &str = "1.2.840.113556.1.4.474";
const PAGED_OID: &str = "1.2.840.113556.1.4.319";
const SYNC_REQUEST_OID: &str = "1.3.6.1.4.1.4203.1.9.1.1";
const SYNC_STATE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.2";

// ---------------------------------------------------------------------------
// Comparable summaries
// ---------------------------------------------------------------------------

/// An attribute value; printed as text when it is short UTF-8, otherwise as
/// its length and a hash (so a 1 MiB value does not flood a failure message).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Val(Vec<u8>);

impl fmt::Debug for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) if s.len() <= 200 => write!(f, "{s:?}"),
            Ok(_) => write!(
                f,
                "<{} bytes text, fnv {:016x}>",
                self.0.len(),
                fnv(&self.0)
            ),
            Err(_) => write!(
                f,
                "<{} bytes binary, fnv {:016x}>",
                self.0.len(),
                fnv(&self.0)
            ),
        }
    }
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
    })
}

/// An attribute: name and sorted values.
type Attr = (String, Vec<Val>);
/// An entry: DN and attributes sorted by name.
type Entry = (String, Vec<Attr>);
/// A response control: OID, criticality, value.
type Ctrl = (String, bool, Option<Val>);

/// Everything a client can see of one operation's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Summary {
    rc: u32,
    matched: String,
    text: String,
    refs: Vec<String>,
    /// Search entries, sorted (order-sensitive tests record order separately).
    entries: Vec<Entry>,
    controls: Vec<Ctrl>,
    /// Extended response name and value (extended operations only).
    exop: Option<(Option<String>, Option<Val>)>,
}

impl Summary {
    fn entry(&self, dn: &str) -> Option<&[Attr]> {
        self.entries
            .iter()
            .find(|(d, _)| d.eq_ignore_ascii_case(dn))
            .map(|(_, a)| a.as_slice())
    }

    /// Values of `attr` in the only entry, as strings.
    fn values(&self, attr: &str) -> Vec<String> {
        assert_eq!(
            self.entries.len(),
            1,
            "expected exactly one entry: {self:?}"
        );
        self.entries[0]
            .1
            .iter()
            .find(|(a, _)| a.eq_ignore_ascii_case(attr))
            .map(|(_, vs)| {
                vs.iter()
                    .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn control(&self, oid: &str) -> Option<&Ctrl> {
        self.controls.iter().find(|c| c.0 == oid)
    }

    /// The extended response value as text ("" when absent).
    fn exop_text(&self) -> String {
        match &self.exop {
            Some((_, Some(v))) => String::from_utf8_lossy(&v.0).into_owned(),
            _ => String::new(),
        }
    }

    /// Replaces every occurrence of each `from` by its `to`, in every string
    /// and value (for runs whose names differ between direct and proxied).
    fn normalized(&self, pairs: &[(String, String)]) -> Summary {
        let s = |x: &str| {
            pairs
                .iter()
                .fold(x.to_string(), |acc, (from, to)| acc.replace(from, to))
        };
        let b = |v: &Val| {
            Val(pairs
                .iter()
                .fold(v.0.clone(), |acc, (from, to)| replace_bytes(&acc, from, to)))
        };
        let mut entries: Vec<Entry> = self
            .entries
            .iter()
            .map(|(dn, attrs)| {
                let attrs = attrs
                    .iter()
                    .map(|(a, vs)| {
                        let mut vs: Vec<Val> = vs.iter().map(b).collect();
                        vs.sort();
                        (a.clone(), vs)
                    })
                    .collect();
                (s(dn), attrs)
            })
            .collect();
        entries.sort();
        Summary {
            rc: self.rc,
            matched: s(&self.matched),
            text: s(&self.text),
            refs: self.refs.iter().map(|r| s(r)).collect(),
            entries,
            controls: self
                .controls
                .iter()
                .map(|(o, c, v)| (o.clone(), *c, v.as_ref().map(b)))
                .collect(),
            exop: self
                .exop
                .as_ref()
                .map(|(n, v)| (n.clone(), v.as_ref().map(b))),
        }
    }
}

fn replace_bytes(hay: &[u8], from: &str, to: &str) -> Vec<u8> {
    let from = from.as_bytes();
    if from.is_empty() {
        return hay.to_vec();
    }
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to.as_bytes());
            i += from.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn controls_of(ctrls: &[Control]) -> Vec<Ctrl> {
    ctrls
        .iter()
        .map(|Control(_, raw)| (raw.ctype.clone(), raw.crit, raw.val.clone().map(Val)))
        .collect()
}

fn entry_of(re: ResultEntry) -> Entry {
    assert!(
        !re.is_ref() && !re.is_intermediate(),
        "not a search entry: {re:?}"
    );
    let se = SearchEntry::construct(re);
    let mut attrs: Vec<Attr> = se
        .attrs
        .into_iter()
        .map(|(a, vs)| (a, vs.into_iter().map(|v| Val(v.into_bytes())).collect()))
        .chain(
            se.bin_attrs
                .into_iter()
                .map(|(a, vs)| (a, vs.into_iter().map(Val).collect())),
        )
        .collect();
    for (_, vs) in &mut attrs {
        vs.sort();
    }
    attrs.sort();
    (se.dn, attrs)
}

fn summary(res: LdapResult) -> Summary {
    Summary {
        rc: res.rc,
        matched: res.matched,
        text: res.text,
        refs: res.refs,
        entries: Vec::new(),
        controls: controls_of(&res.ctrls),
        exop: None,
    }
}

fn search_summary(sr: SearchResult) -> Summary {
    let SearchResult(entries, res) = sr;
    let mut s = summary(res);
    s.entries = entries.into_iter().map(entry_of).collect();
    s.entries.sort();
    s
}

fn exop_summary(er: ExopResult) -> Summary {
    let ExopResult(exop, res) = er;
    let mut s = summary(res);
    s.exop = Some((exop.name, exop.val.map(Val)));
    s
}

// ---------------------------------------------------------------------------
// Running scenarios
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Direct,
    Proxied,
}

impl Side {
    /// A short marker for names that must differ between the two runs.
    fn tag(self) -> &'static str {
        match self {
            Side::Direct => "d",
            Side::Proxied => "p",
        }
    }

    fn url(self, lab: &Lab) -> String {
        match self {
            Side::Direct => lab.direct(),
            Side::Proxied => lab.proxied(),
        }
    }
}

type Driver = JoinHandle<ldap3::result::Result<()>>;

/// Opens an ldap3 connection and spawns its driver.
async fn connect(url: &str) -> (Ldap, Driver) {
    let (conn, ldap) = tokio::time::timeout(Duration::from_secs(10), LdapConnAsync::new(url))
        .await
        .unwrap_or_else(|_| panic!("{url}: connect timed out"))
        .unwrap_or_else(|e| panic!("{url}: connect: {e}"));
    (ldap, tokio::spawn(conn.drive()))
}

/// Runs `f` on a fresh connection to `url` and returns what it returns.
/// Fails if it takes longer than [`SCENARIO_TIMEOUT`] or if the connection
/// driver ends first (connection closed, undecodable PDU, driver panic).
async fn run_on<T, F, Fut>(url: &str, f: F) -> T
where
    F: FnOnce(Ldap) -> Fut,
    Fut: Future<Output = T>,
{
    let (ldap, mut driver) = connect(url).await;
    let work = f(ldap);
    let out = tokio::time::timeout(SCENARIO_TIMEOUT, async {
        tokio::pin!(work);
        tokio::select! {
            biased;
            out = &mut work => out,
            r = &mut driver => panic!("{url}: the connection ended before the scenario did: {r:?}"),
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{url}: scenario did not finish within {SCENARIO_TIMEOUT:?}"));
    driver.abort();
    out
}

/// Runs the same scenario directly against slapd, then through the proxy.
async fn differential<T, F, Fut>(lab: &Lab, f: F) -> (T, T)
where
    F: Fn(Ldap, Side) -> Fut,
    Fut: Future<Output = T>,
{
    let d = run_on(&Side::Direct.url(lab), |l| f(l, Side::Direct)).await;
    let p = run_on(&Side::Proxied.url(lab), |l| f(l, Side::Proxied)).await;
    (d, p)
}

async fn bind(ldap: &mut Ldap, dn: &str, pw: &str) -> Summary {
    summary(ldap.simple_bind(dn, pw).await.expect("bind transport"))
}

async fn whoami(ldap: &mut Ldap) -> Summary {
    exop_summary(ldap.extended(WhoAmI).await.expect("whoami transport"))
}

async fn search(
    ldap: &mut Ldap,
    base: &str,
    scope: Scope,
    filter: &str,
    attrs: &[&str],
) -> Summary {
    search_summary(
        ldap.search(base, scope, filter, attrs.to_vec())
            .await
            .expect("search transport"),
    )
}

async fn read(ldap: &mut Ldap, dn: &str, attrs: &[&str]) -> Summary {
    search(ldap, dn, Scope::Base, "(objectClass=*)", attrs).await
}

fn set(vals: &[&str]) -> HashSet<String> {
    vals.iter().map(|v| v.to_string()).collect()
}

// ---------------------------------------------------------------------------
// BER for hand-built controls
// ---------------------------------------------------------------------------

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = n.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// Server-side sort request (RFC 2891): SEQUENCE OF SEQUENCE { attributeType
/// OCTET STRING, orderingRule [0] OPTIONAL, reverseOrder [1] BOOLEAN DEFAULT FALSE }.
fn sort_control(keys: &[(&str, Option<&str>, bool)], critical: bool) -> RawControl {
    let mut list = Vec::new();
    for (attr, rule, reverse) in keys {
        let mut key = tlv(0x04, attr.as_bytes());
        if let Some(rule) = rule {
            key.extend(tlv(0x80, rule.as_bytes()));
        }
        if *reverse {
            key.extend(tlv(0x81, &[0xff]));
        }
        list.extend(tlv(0x30, &key));
    }
    RawControl {
        ctype: SORT_REQUEST_OID.into(),
        crit: critical,
        val: Some(tlv(0x30, &list)),
    }
}

/// Sync request control (RFC 4533), refreshAndPersist, no cookie.
fn sync_request_persist() -> RawControl {
    RawControl {
        ctype: SYNC_REQUEST_OID.into(),
        crit: true,
        val: Some(tlv(0x30, &tlv(0x0a, &[3]))),
    }
}

// ---------------------------------------------------------------------------
// 1. Binds
// ---------------------------------------------------------------------------

#[tokio::test]
async fn binds_match() {
    let lab = Lab::start().await;
    let (d, p) = differential(&lab, |mut ldap, _| async move {
        let cases: Vec<(&str, String, String)> = vec![
            ("anonymous", String::new(), String::new()),
            ("user1", user_dn(1), user_pw(1)),
            ("admin", ADMIN_DN.into(), ADMIN_PW.into()),
            ("user1 wrong password", user_dn(1), "wrong".into()),
            ("admin wrong password", ADMIN_DN.into(), "wrong".into()),
            (
                "nonexistent user",
                format!("uid=nobody,{PEOPLE}"),
                "x".into(),
            ),
            (
                "DN outside every suffix",
                "cn=nobody,dc=nowhere".into(),
                "x".into(),
            ),
            (
                "unauthenticated (empty password)",
                user_dn(2),
                String::new(),
            ),
            ("user in dc=other", other_user_dn(3), user_pw(3)),
            ("user2 after failures", user_dn(2), user_pw(2)),
        ];
        let mut out = Vec::new();
        for (label, dn, pw) in cases {
            let b = bind(&mut ldap, &dn, &pw).await;
            let w = whoami(&mut ldap).await;
            out.push((label, b, w));
        }
        out
    })
    .await;
    assert_eq!(d, p, "binds: direct vs proxied");

    let expected: [(u32, String); 10] = [
        (0, String::new()),
        (0, format!("dn:{}", user_dn(1))),
        (0, format!("dn:{ADMIN_DN}")),
        (49, String::new()),
        (49, String::new()),
        (49, String::new()),
        (49, String::new()),
        (53, String::new()),
        (0, format!("dn:{}", other_user_dn(3))),
        (0, format!("dn:{}", user_dn(2))),
    ];
    for ((label, b, w), (rc, authz)) in p.iter().zip(expected.iter()) {
        assert_eq!(b.rc, *rc, "{label}: bind result {b:?}");
        assert_eq!(w.rc, 0, "{label}: whoami {w:?}");
        assert_eq!(&w.exop_text(), authz, "{label}: identity after the bind");
    }
    assert!(
        p[7].1.text.contains("unauthenticated"),
        "slapd explains the refused unauthenticated bind: {:?}",
        p[7].1
    );
}

// ---------------------------------------------------------------------------
// 2. Searches
// ---------------------------------------------------------------------------

/// Extended operations the proxy implements itself (announced in the root DSE).
const PROXY_EXTENSIONS: [&str; 2] = [
    abproxy_proto::ALLOW_BACKUP_OID,
    abproxy_proto::ALLOW_BACKUP_STATUS_OID,
];

/// Removes the proxy's own OIDs from the root DSE's supportedExtension in a
/// search summary; returns the values removed.
fn strip_proxy_extensions(s: &mut Summary) -> Vec<String> {
    let mut removed = Vec::new();
    for (dn, attrs) in &mut s.entries {
        if !dn.is_empty() {
            continue;
        }
        for (name, vals) in attrs.iter_mut() {
            if name.eq_ignore_ascii_case("supportedExtension") {
                vals.retain(|v| {
                    let own = PROXY_EXTENSIONS
                        .iter()
                        .any(|o| o.as_bytes() == v.0.as_slice());
                    if own {
                        removed.push(String::from_utf8_lossy(&v.0).into_owned());
                    }
                    !own
                });
            }
        }
    }
    removed
}

struct SearchCase {
    base: String,
    scope: Scope,
    filter: &'static str,
    attrs: &'static [&'static str],
    sizelimit: i32,
    rc: u32,
    count: usize,
    matched: &'static str,
}

fn case(
    base: &str,
    scope: Scope,
    filter: &'static str,
    attrs: &'static [&'static str],
    rc: u32,
    count: usize,
) -> SearchCase {
    SearchCase {
        base: base.into(),
        scope,
        filter,
        attrs,
        sizelimit: 0,
        rc,
        count,
        matched: "",
    }
}

#[tokio::test]
async fn searches_match() {
    let lab = Lab::start().await;
    let cases = vec![
        case(SUFFIX, Scope::Subtree, "(uid=user1)", &["uid", "cn"], 0, 1),
        case(
            PEOPLE,
            Scope::OneLevel,
            "(&(objectClass=person)(uid=user1*))",
            &["uid", "cn", "mail"],
            0,
            12, // user1, user10..19, user100
        ),
        case(SUFFIX, Scope::Subtree, "(cn=User 4*)", &["cn"], 0, 11),
        case(SUFFIX, Scope::Subtree, "(sn=*ser*0)", &["sn"], 0, 10),
        // base, 3 OUs, cn=default, cn=group1, cn=admins
        case(SUFFIX, Scope::Subtree, "(!(uid=*))", &["1.1"], 0, 7),
        case(&user_dn(1), Scope::Base, "(objectClass=*)", &["*"], 0, 1),
        case(&user_dn(2), Scope::Base, "(objectClass=*)", &["+"], 0, 1),
        case(PEOPLE, Scope::OneLevel, "(uid=user9*)", &["*", "+"], 0, 11),
        case(SUFFIX, Scope::OneLevel, "(objectClass=*)", &[], 0, 3),
        case(PEOPLE, Scope::Subtree, "(uid=*)", &["1.1"], 0, 100),
        case(
            OTHER_SUFFIX,
            Scope::Subtree,
            "(objectClass=inetOrgPerson)",
            &["uid"],
            0,
            10,
        ),
        case("", Scope::Base, "(objectClass=*)", &["+"], 0, 1),
        SearchCase {
            sizelimit: 5,
            ..case(PEOPLE, Scope::Subtree, "(uid=*)", &["uid"], 4, 5)
        },
        SearchCase {
            matched: SUFFIX,
            ..case(
                "ou=nowhere,dc=example,dc=org",
                Scope::Subtree,
                "(objectClass=*)",
                &[],
                32,
                0,
            )
        },
        SearchCase {
            matched: PEOPLE,
            ..case(
                "uid=ghost,ou=people,dc=example,dc=org",
                Scope::Base,
                "(objectClass=*)",
                &[],
                32,
                0,
            )
        },
        case("dc=nowhere", Scope::Subtree, "(objectClass=*)", &[], 32, 0),
    ];
    let cases = &cases;
    let (d, mut p) = differential(&lab, |mut ldap, _| async move {
        assert_eq!(bind(&mut ldap, ADMIN_DN, ADMIN_PW).await.rc, 0);
        let mut out = Vec::new();
        for c in cases {
            if c.sizelimit > 0 {
                ldap.with_search_options(SearchOptions::new().sizelimit(c.sizelimit));
            }
            out.push(search(&mut ldap, &c.base, c.scope, c.filter, c.attrs).await);
        }
        out
    })
    .await;

    // The one intended difference: the proxy announces its own extended
    // operations in the root DSE's supportedExtension.
    let added = strip_proxy_extensions(&mut p[11]);
    let mut want_added: Vec<String> = PROXY_EXTENSIONS.iter().map(|o| o.to_string()).collect();
    want_added.sort();
    let mut added_sorted = added.clone();
    added_sorted.sort();
    assert_eq!(
        added_sorted, want_added,
        "through the proxy, the root DSE announces exactly the proxy's own extended operations in addition"
    );
    assert!(
        strip_proxy_extensions(&mut d[11].clone()).is_empty(),
        "slapd itself does not announce them"
    );
    for (i, c) in cases.iter().enumerate() {
        let what = format!(
            "case {i}: base {:?} filter {} attrs {:?}",
            c.base, c.filter, c.attrs
        );
        assert_eq!(d[i], p[i], "{what}: direct vs proxied");
        assert_eq!(p[i].rc, c.rc, "{what}: {:?}", p[i]);
        assert_eq!(p[i].entries.len(), c.count, "{what}: entry count");
        assert_eq!(p[i].matched, c.matched, "{what}: matched DN");
    }
    // Attribute lists were honoured (and not vacuously empty).
    let only = |i: usize| -> BTreeSet<String> {
        p[i].entries
            .iter()
            .flat_map(|(_, a)| a.iter().map(|(n, _)| n.to_lowercase()))
            .collect()
    };
    assert_eq!(
        only(1),
        BTreeSet::from(["cn".into(), "mail".into(), "uid".into()])
    );
    assert!(only(4).is_empty(), "\"1.1\" returns no attributes");
    let user_attrs = only(5);
    assert!(user_attrs.contains("userpassword") && user_attrs.contains("mail"));
    assert!(
        !user_attrs.contains("entrycsn"),
        "\"*\" has no operational attributes"
    );
    let op_attrs = only(6);
    for a in ["entrycsn", "entryuuid", "modifytimestamp", "creatorsname"] {
        assert!(op_attrs.contains(a), "\"+\" returns {a}: {op_attrs:?}");
    }
    assert!(!op_attrs.contains("mail"), "\"+\" has no user attributes");
    let both = only(7);
    assert!(both.contains("mail") && both.contains("entrycsn"));
    assert_eq!(p[0].values("uid"), ["user1"]);
    assert_eq!(
        p[2].entry("uid=user40,ou=people,dc=example,dc=org")
            .map(|a| a.len()),
        Some(1)
    );
    let root = &p[11].entries[0].1;
    let contexts = root
        .iter()
        .find(|(a, _)| a == "namingContexts")
        .expect("root DSE namingContexts");
    assert_eq!(contexts.1.len(), 2, "{contexts:?}");
}

// ---------------------------------------------------------------------------
// 3. Paged results
// ---------------------------------------------------------------------------

#[tokio::test]
async fn paged_results_match() {
    let lab = Lab::start().await;
    let (d, p) = differential(&lab, |mut ldap, _| async move {
        assert_eq!(bind(&mut ldap, ADMIN_DN, ADMIN_PW).await.rc, 0);
        // By hand: one Search per page, the cookie carried over.
        let mut pages = Vec::new();
        let mut cookie = Vec::new();
        loop {
            assert!(pages.len() < 50, "paging does not end: {pages:?}");
            let control: RawControl = PagedResults {
                size: 7,
                cookie: cookie.clone(),
            }
            .into();
            let sr = ldap
                .with_controls(control)
                .search(
                    PEOPLE,
                    Scope::Subtree,
                    "(objectClass=inetOrgPerson)",
                    vec!["uid"],
                )
                .await
                .expect("paged search");
            let page = search_summary(sr);
            let ctrl = page
                .control(PAGED_OID)
                .unwrap_or_else(|| panic!("no paged results response control: {page:?}"));
            let resp = <PagedResults as ControlParser>::parse(
                &ctrl.2.as_ref().expect("paged control value").0,
            );
            cookie = resp.cookie;
            pages.push(page);
            if cookie.is_empty() {
                break;
            }
        }
        // With ldap3's adapter, which does the same internally.
        let adapters: Vec<Box<dyn Adapter<_, _>>> =
            vec![Box::new(EntriesOnly::new()), Box::new(PagedAdapter::new(7))];
        let mut stream = ldap
            .streaming_search_with(
                adapters,
                PEOPLE,
                Scope::Subtree,
                "(objectClass=inetOrgPerson)",
                vec!["uid"],
            )
            .await
            .expect("adapter search");
        let mut adapted = Vec::new();
        while let Some(e) = stream.next().await.expect("adapter entry") {
            adapted.push(entry_of(e).0);
        }
        let res = stream.finish().await;
        (pages, adapted, res.rc)
    })
    .await;
    assert_eq!(d, p, "paged results: direct vs proxied");

    let (pages, adapted, rc) = p;
    assert_eq!(pages.len(), 15, "100 entries in pages of 7");
    for (i, page) in pages.iter().enumerate() {
        assert_eq!(page.rc, 0, "page {i}: {page:?}");
        let want = if i < 14 { 7 } else { 2 };
        assert_eq!(page.entries.len(), want, "page {i} size");
    }
    let dns: Vec<String> = pages
        .iter()
        .flat_map(|pg| pg.entries.iter().map(|(dn, _)| dn.to_lowercase()))
        .collect();
    let unique: BTreeSet<String> = dns.iter().cloned().collect();
    assert_eq!(dns.len(), 100);
    assert_eq!(unique.len(), 100, "no entry on two pages");
    assert_eq!(rc, 0);
    let adapted: BTreeSet<String> = adapted.iter().map(|d| d.to_lowercase()).collect();
    assert_eq!(adapted, unique, "adapter sees the same entries");
}

// ---------------------------------------------------------------------------
// 4. Server-side sort
// ---------------------------------------------------------------------------

/// uid values in the order they were returned, and the summary.
async fn sorted_search(ldap: &mut Ldap, control: RawControl) -> (Vec<String>, Summary) {
    let SearchResult(entries, res) = ldap
        .with_controls(control)
        .search(
            PEOPLE,
            Scope::OneLevel,
            "(objectClass=inetOrgPerson)",
            vec!["uid", "uidNumber"],
        )
        .await
        .expect("sorted search");
    let entries: Vec<Entry> = entries.into_iter().map(entry_of).collect();
    let order = entries
        .iter()
        .map(|(_, attrs)| {
            let uid = attrs.iter().find(|(a, _)| a == "uid").expect("uid");
            String::from_utf8(uid.1[0].0.clone()).unwrap()
        })
        .collect();
    let mut s = summary(res);
    s.entries = entries;
    s.entries.sort();
    (order, s)
}

#[tokio::test]
async fn server_side_sort_matches() {
    let lab = Lab::start().await;
    let (d, p) = differential(&lab, |mut ldap, _| async move {
        assert_eq!(bind(&mut ldap, ADMIN_DN, ADMIN_PW).await.rc, 0);
        let by_uid_desc = sort_control(&[("uid", Some("caseIgnoreOrderingMatch"), true)], true);
        let by_number_desc = sort_control(&[("uidNumber", None, true)], true);
        // uid has no ORDERING rule of its own: a critical sort on it fails.
        let no_rule = sort_control(&[("uid", None, true)], true);
        vec![
            sorted_search(&mut ldap, by_uid_desc).await,
            sorted_search(&mut ldap, by_number_desc).await,
            sorted_search(&mut ldap, no_rule).await,
        ]
    })
    .await;
    assert_eq!(
        d, p,
        "sorted searches: direct vs proxied (including the order)"
    );

    let ok_response = Some(Val(vec![0x30, 0x03, 0x0a, 0x01, 0x00]));
    let (uid_order, s) = &p[0];
    assert_eq!(s.rc, 0, "{s:?}");
    assert_eq!(uid_order.len(), 100);
    let mut want = uid_order.clone();
    want.sort_by_key(|u| std::cmp::Reverse(u.to_lowercase()));
    assert_eq!(uid_order, &want, "uid descending");
    assert_eq!(&uid_order[..3], ["user99", "user98", "user97"]);
    assert_eq!(
        s.control(SORT_RESPONSE_OID).map(|c| c.2.clone()),
        Some(ok_response.clone()),
        "sort response control with sortResult success"
    );

    let (num_order, s) = &p[1];
    assert_eq!(s.rc, 0, "{s:?}");
    let want: Vec<String> = (1..=100).rev().map(|k| format!("user{k}")).collect();
    assert_eq!(num_order, &want, "uidNumber descending (numeric)");
    assert_eq!(
        s.control(SORT_RESPONSE_OID).map(|c| c.2.clone()),
        Some(ok_response)
    );

    let (order, s) = &p[2];
    assert_eq!(s.rc, 18, "inappropriateMatching: {s:?}");
    assert!(order.is_empty());
}

// ---------------------------------------------------------------------------
// 5. Add / modify / modDN / delete
// ---------------------------------------------------------------------------

const READ_ATTRS: &[&str] = &[
    "*",
    "creatorsName",
    "modifiersName",
    "structuralObjectClass",
    "entryDN",
    "hasSubordinates",
];

#[tokio::test]
async fn writes_match() {
    let lab = Lab::start().await;
    let (d, p) = differential(&lab, |mut ldap, side| async move {
        assert_eq!(bind(&mut ldap, ADMIN_DN, ADMIN_PW).await.rc, 0);
        let name = format!("writer-{}", side.tag());
        let dn = format!("uid={name},{PEOPLE}");
        let moved = format!("uid={name},{GROUPS}");
        let mail = format!("{name}@example.org");
        let mail2 = format!("{name}-2@example.org");
        let mut steps: Vec<(&str, Summary)> = Vec::new();

        let entry = vec![
            (
                "objectClass".to_string(),
                set(&["top", "person", "organizationalPerson", "inetOrgPerson"]),
            ),
            ("uid".into(), set(&[&name])),
            ("cn".into(), set(&[&format!("Writer {name}")])),
            ("sn".into(), set(&["Writer"])),
            ("description".into(), set(&["initial"])),
            ("mail".into(), set(&[&mail])),
            (
                "telephoneNumber".into(),
                set(&["+1 555 0100", "+1 555 0101"]),
            ),
        ];
        let r = ldap.add(&dn, entry.clone()).await.expect("add");
        steps.push(("add", summary(r)));
        steps.push(("read after add", read(&mut ldap, &dn, READ_ATTRS).await));

        let r = ldap
            .modify(
                &dn,
                vec![Mod::Replace("description".to_string(), set(&["replaced"]))],
            )
            .await
            .expect("modify");
        steps.push(("modify replace", summary(r)));
        let r = ldap
            .modify(&dn, vec![Mod::Add("mail".to_string(), set(&[&mail2]))])
            .await
            .expect("modify");
        steps.push(("modify add value", summary(r)));
        let r = ldap
            .modify(
                &dn,
                vec![Mod::Delete(
                    "telephoneNumber".to_string(),
                    set(&["+1 555 0100"]),
                )],
            )
            .await
            .expect("modify");
        steps.push(("modify delete value", summary(r)));
        steps.push(("read after modify", read(&mut ldap, &dn, READ_ATTRS).await));

        let r = ldap
            .modifydn(&dn, &format!("uid={name}"), true, Some(GROUPS))
            .await
            .expect("modrdn");
        steps.push(("move to ou=groups", summary(r)));
        steps.push(("read old name", read(&mut ldap, &dn, READ_ATTRS).await));
        steps.push(("read new name", read(&mut ldap, &moved, READ_ATTRS).await));
        let r = ldap
            .modifydn(&moved, &format!("uid={name}"), true, Some(PEOPLE))
            .await
            .expect("modrdn");
        steps.push(("move back", summary(r)));
        steps.push((
            "read after move back",
            read(&mut ldap, &dn, READ_ATTRS).await,
        ));

        let r = ldap.add(&dn, entry).await.expect("add");
        steps.push(("add existing", summary(r)));
        let r = ldap
            .delete(&format!("uid=ghost-{name},{PEOPLE}"))
            .await
            .expect("delete");
        steps.push(("delete nonexistent", summary(r)));
        let r = ldap
            .modify(
                &dn,
                vec![Mod::Replace("fooBarBaz".to_string(), set(&["x"]))],
            )
            .await
            .expect("modify");
        steps.push(("modify undefined type", summary(r)));
        let r = ldap
            .modify(&dn, vec![Mod::Add("mail".to_string(), set(&[&mail]))])
            .await
            .expect("modify");
        steps.push(("add existing value", summary(r)));

        let r = ldap.delete(&dn).await.expect("delete");
        steps.push(("delete", summary(r)));
        steps.push(("read after delete", read(&mut ldap, &dn, READ_ATTRS).await));

        let norm = pairs(&[(&name, "writer-X")]);
        steps
            .into_iter()
            .map(|(label, s)| (label, s.normalized(&norm)))
            .collect::<Vec<_>>()
    })
    .await;
    assert_eq!(d, p, "writes: direct vs proxied (names normalized)");

    let rcs: Vec<(&str, u32)> = p.iter().map(|(l, s)| (*l, s.rc)).collect();
    let want = [
        ("add", 0),
        ("read after add", 0),
        ("modify replace", 0),
        ("modify add value", 0),
        ("modify delete value", 0),
        ("read after modify", 0),
        ("move to ou=groups", 0),
        ("read old name", 32),
        ("read new name", 0),
        ("move back", 0),
        ("read after move back", 0),
        ("add existing", 68),
        ("delete nonexistent", 32),
        ("modify undefined type", 17),
        ("add existing value", 20),
        ("delete", 0),
        ("read after delete", 32),
    ];
    assert_eq!(rcs, want, "result codes: {p:#?}");

    let step = |label: &str| &p.iter().find(|(l, _)| *l == label).unwrap().1;
    let added = step("read after add");
    assert_eq!(added.values("description"), ["initial"]);
    assert_eq!(added.values("telephoneNumber").len(), 2);
    assert_eq!(added.values("creatorsName"), [ADMIN_DN]);
    let modified = step("read after modify");
    assert_eq!(modified.values("description"), ["replaced"]);
    assert_eq!(
        modified.values("mail"),
        ["writer-X-2@example.org", "writer-X@example.org"]
    );
    assert_eq!(modified.values("telephoneNumber"), ["+1 555 0101"]);
    let moved = step("read new name");
    assert_eq!(moved.entries[0].0, format!("uid=writer-X,{GROUPS}"));
    assert_eq!(moved.values("description"), ["replaced"]);
    assert_eq!(step("read old name").matched, PEOPLE);
    assert_eq!(
        step("read after move back").entries[0].0,
        format!("uid=writer-X,{PEOPLE}")
    );
    assert_eq!(step("delete nonexistent").matched, PEOPLE);
    assert_eq!(step("read after delete").entries.len(), 0);
}

// ---------------------------------------------------------------------------
// 6. Compare
// ---------------------------------------------------------------------------

#[tokio::test]
async fn compares_match() {
    let lab = Lab::start().await;
    let cases: Vec<(String, &str, &str, u32)> = vec![
        (user_dn(1), "uid", "user1", 6),
        (user_dn(1), "uid", "USER1", 6),
        (user_dn(1), "uid", "user2", 5),
        (user_dn(1), "uidNumber", "10001", 6),
        (user_dn(1), "telephoneNumber", "123", 16),
        (user_dn(1), "fooBarBaz", "x", 17),
        (format!("uid=ghost,{PEOPLE}"), "uid", "ghost", 32),
    ];
    let cases = &cases;
    let (d, p) = differential(&lab, |mut ldap, _| async move {
        let mut out = Vec::new();
        for (dn, attr, val) in cases.iter().map(|(d, a, v, _)| (d, a, v)) {
            let r = ldap.compare(dn, attr, *val).await.expect("compare");
            out.push(summary(r.0));
        }
        out
    })
    .await;
    assert_eq!(d, p, "compares: direct vs proxied");
    for ((dn, attr, val, rc), s) in cases.iter().zip(&p) {
        assert_eq!(s.rc, *rc, "compare {dn} {attr}={val}: {s:?}");
    }
    assert_eq!(p[6].matched, PEOPLE);
}

// ---------------------------------------------------------------------------
// 7. Extended operations
// ---------------------------------------------------------------------------

#[tokio::test]
async fn extended_operations_match() {
    let lab = Lab::start().await;
    let (d, p) = differential(&lab, |mut ldap, side| async move {
        // Different users per run: the password changes must not collide.
        let (k, g) = match side {
            Side::Direct => (3, 5),
            Side::Proxied => (4, 6),
        };
        let (dn, pw, new_pw) = (user_dn(k), user_pw(k), format!("fresh-{k}"));
        let mut steps: Vec<(&str, Summary)> = Vec::new();
        steps.push(("bind", bind(&mut ldap, &dn, &pw).await));
        steps.push(("whoami", whoami(&mut ldap).await));
        let r = ldap
            .extended(PasswordModify {
                user_id: None,
                old_pass: Some(&pw),
                new_pass: Some(&new_pw),
            })
            .await
            .expect("passmod");
        steps.push(("password modify (self)", exop_summary(r)));
        steps.push(("bind old password", bind(&mut ldap, &dn, &pw).await));
        steps.push(("bind new password", bind(&mut ldap, &dn, &new_pw).await));
        steps.push(("whoami after new password", whoami(&mut ldap).await));

        // The admin resets another user's password to a generated one.
        steps.push(("bind admin", bind(&mut ldap, ADMIN_DN, ADMIN_PW).await));
        let r = ldap
            .extended(PasswordModify {
                user_id: Some(&user_dn(g)),
                old_pass: None,
                new_pass: None,
            })
            .await
            .expect("passmod");
        let generated =
            r.0.val
                .as_ref()
                .map(|_| r.0.parse::<PasswordModifyResp>().gen_pass);
        let mut s = exop_summary(r);
        // The generated password differs between runs: keep only its presence.
        if let Some((_, v)) = &mut s.exop {
            *v = v.as_ref().map(|_| Val(b"<generated>".to_vec()));
        }
        steps.push(("password modify (generated)", s));
        let generated = generated.expect("slapd returns a generated password");
        assert!(!generated.is_empty());
        steps.push((
            "bind generated password",
            bind(&mut ldap, &user_dn(g), &generated).await,
        ));
        steps.push(("whoami after generated", whoami(&mut ldap).await));

        let r = ldap
            .extended(Exop {
                name: Some("1.2.3.4.5.6".into()),
                val: None,
            })
            .await
            .expect("unknown exop");
        steps.push(("unknown exop", exop_summary(r)));
        let r = ldap
            .extended(Exop {
                name: Some("1.2.3.4.5.6".into()),
                val: Some(b"payload".to_vec()),
            })
            .await
            .expect("unknown exop");
        steps.push(("unknown exop with value", exop_summary(r)));
        steps.push(("whoami after unknown exop", whoami(&mut ldap).await));

        let norm = pairs(&[
            (&format!("uid=user{k},"), "uid=userA,"),
            (&format!("uid=user{g},"), "uid=userB,"),
        ]);
        steps
            .into_iter()
            .map(|(l, s)| (l, s.normalized(&norm)))
            .collect::<Vec<_>>()
    })
    .await;
    assert_eq!(
        d, p,
        "extended operations: direct vs proxied (users normalized)"
    );

    let step = |label: &str| &p.iter().find(|(l, _)| *l == label).unwrap().1;
    let user_a = "dn:uid=userA,ou=people,dc=example,dc=org";
    let user_b = "dn:uid=userB,ou=people,dc=example,dc=org";
    assert_eq!(step("bind").rc, 0);
    assert_eq!(step("whoami").exop_text(), user_a);
    assert_eq!(step("password modify (self)").rc, 0, "{p:#?}");
    assert_eq!(step("bind old password").rc, 49);
    assert_eq!(step("bind new password").rc, 0);
    assert_eq!(step("whoami after new password").exop_text(), user_a);
    assert_eq!(step("password modify (generated)").rc, 0);
    assert_eq!(step("bind generated password").rc, 0);
    assert_eq!(step("whoami after generated").exop_text(), user_b);
    for label in ["unknown exop", "unknown exop with value"] {
        let s = step(label);
        assert_eq!(s.rc, 2, "{label}: protocolError expected: {s:?}");
        assert!(!s.text.is_empty(), "{label}: slapd says why: {s:?}");
    }
    assert_eq!(step("whoami after unknown exop").exop_text(), user_b);
    assert_eq!(
        step("whoami").exop.as_ref().and_then(|e| e.0.clone()),
        None::<String>,
        "slapd sends no responseName for whoami (and the proxy adds none)"
    );
}

// ---------------------------------------------------------------------------
// 8. Abandon a running search
// ---------------------------------------------------------------------------

/// After an abandon: consumes what the client had already received for the
/// search. Returns that count and whether the search had completed (its
/// SearchResultDone arrived before the abandon left); otherwise ldap3 ends the
/// stream with `EndOfStream`.
async fn drain_abandoned<'a>(
    stream: &mut SearchStream<'a, &'a str, Vec<&'a str>>,
) -> (usize, bool) {
    let mut buffered = 0usize;
    let completed = loop {
        match stream.next().await {
            Ok(Some(_)) => buffered += 1,
            Ok(None) => break true,
            Err(_) => break false,
        }
    };
    let _ = stream.finish().await;
    (buffered, completed)
}

/// Waits until slapd's log (the lab runs it with `-d stats`) contains
/// `needle` at least `count` times; fails after [`EVENT_TIMEOUT`]. slapd
/// writes the line when it executes the operation, so this observes what
/// actually reached the server.
async fn wait_for_log(lab: &Lab, needle: &str, count: usize) {
    let path = lab.slapd.log_path();
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let log = tokio::fs::read(&path).await.unwrap_or_default();
        let log = String::from_utf8_lossy(&log);
        let n = log.matches(needle).count();
        if n >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "slapd did not log {needle:?} {count} times within {EVENT_TIMEOUT:?} (saw {n})"
        );
        // Polling interval of the log file, not a guess at a duration.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Binds, streams a large subtree search, abandons it after a few entries,
/// then checks that the same connection still works.
async fn abandon_scenario(mut ldap: Ldap) -> (Vec<String>, Summary, Summary, bool) {
    assert_eq!(bind(&mut ldap, ADMIN_DN, ADMIN_PW).await.rc, 0);
    let mut stream = ldap
        .streaming_search(PEOPLE, Scope::Subtree, "(objectClass=*)", vec!["*"])
        .await
        .expect("start search");
    let mut first = Vec::new();
    while first.len() < 5 {
        let e = stream
            .next()
            .await
            .expect("entry")
            .expect("the search ended after fewer than 5 entries");
        first.push(entry_of(e).0);
    }
    let msgid = stream.ldap_handle().last_id();
    assert!(msgid > 0);
    ldap.abandon(msgid).await.expect("abandon");
    let (buffered, completed) = drain_abandoned(&mut stream).await;
    eprintln!(
        "abandon: {} entries read, {buffered} more already received, \
         search completed before the abandon: {completed}",
        first.len()
    );
    assert!(first.len() + buffered <= 3001);
    let who = whoami(&mut ldap).await;
    let after = search(
        &mut ldap,
        SUFFIX,
        Scope::Subtree,
        "(uid=user2999)",
        &["uid"],
    )
    .await;
    (first, who, after, completed)
}

const ABANDON_LOGGED: &str = " ABANDON msg=";

#[tokio::test]
async fn abandon_keeps_session() {
    let lab = Lab::with(
        SlapdOptions {
            users: 3000,
            stats_log: true,
            ..Default::default()
        },
        |c| c.shutdown_grace_secs = 30,
    )
    .await;
    // Direct first, then through the proxy; each abandon must reach slapd
    // (ldap3 silently drops late answers to an abandoned ID, so only the
    // server can tell whether the proxy forwarded the Abandon).
    let d = run_on(&lab.direct(), abandon_scenario).await;
    wait_for_log(&lab, ABANDON_LOGGED, 1).await;
    let p = run_on(&lab.proxied(), abandon_scenario).await;
    wait_for_log(&lab, ABANDON_LOGGED, 2).await;
    // Whether the search finished before the abandon arrived is a race.
    let strip =
        |(f, w, a, _): &(Vec<String>, Summary, Summary, bool)| (f.clone(), w.clone(), a.clone());
    assert_eq!(strip(&d), strip(&p), "abandon: direct vs proxied");
    let (first, who, after, _) = &p;
    assert_eq!(first.len(), 5);
    assert_eq!(who.rc, 0);
    assert_eq!(
        who.exop_text(),
        format!("dn:{ADMIN_DN}"),
        "the session survived"
    );
    assert_eq!(after.rc, 0);
    assert_eq!(after.values("uid"), ["user2999"]);

    // The abandoned search must not linger in the proxy's in-flight table:
    // with a client still connected, shutdown waits (up to the 30 s grace)
    // only for operations in flight. Only meaningful if the abandon caught
    // the search running, so retry until it does.
    let (mut ldap, driver) = connect(&lab.proxied()).await;
    assert_eq!(bind(&mut ldap, ADMIN_DN, ADMIN_PW).await.rc, 0);
    let mut interrupted = false;
    for _ in 0..5 {
        let mut stream = ldap
            .streaming_search(PEOPLE, Scope::Subtree, "(objectClass=*)", vec!["*"])
            .await
            .expect("start search");
        assert!(stream.next().await.expect("entry").is_some());
        let msgid = stream.ldap_handle().last_id();
        ldap.abandon(msgid).await.expect("abandon");
        let (_, completed) = drain_abandoned(&mut stream).await;
        if !completed {
            interrupted = true;
            break;
        }
    }
    assert!(
        interrupted,
        "5 searches of 3000 entries all completed before their abandon"
    );
    assert_eq!(whoami(&mut ldap).await.rc, 0);
    let Lab { slapd, proxy, .. } = lab;
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), proxy.shutdown())
        .await
        .expect("proxy shutdown hangs")
        .expect("proxy shutdown");
    eprintln!(
        "proxy shutdown after an abandoned search: {:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}: it waited for an abandoned search",
        t0.elapsed()
    );
    drop(ldap);
    driver.abort();
    drop(slapd);
}

// ---------------------------------------------------------------------------
// 9. syncrepl refreshAndPersist
// ---------------------------------------------------------------------------

/// What a refreshAndPersist client saw: refresh entries (DN, attrs, sync
/// state), the syncInfo that ended the refresh, the entry pushed after a
/// change, and whoami after the abandon.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SyncRun {
    refresh: Vec<(Entry, String)>,
    refresh_end: String,
    pushed: (Entry, String),
    whoami_after: Summary,
}

fn sync_state(ctrls: &[Control]) -> String {
    let c = ctrls
        .iter()
        .find(|Control(_, raw)| raw.ctype == SYNC_STATE_OID)
        .unwrap_or_else(|| panic!("entry without a sync state control: {ctrls:?}"));
    assert!(matches!(c.0, Some(ControlType::SyncState)));
    format!("{:?}", c.1.parse::<SyncState>().state)
}

async fn persist_scenario(url: String, direct: String, k: usize) -> SyncRun {
    let (mut ldap, mut driver) = connect(&url).await;
    let run = async {
        assert_eq!(bind(&mut ldap, ADMIN_DN, ADMIN_PW).await.rc, 0);
        let filter = format!("(uid=user{k})");
        let mut stream = ldap
            .with_controls(sync_request_persist())
            .streaming_search(SUFFIX, Scope::Subtree, &filter, vec!["uid", "description"])
            .await
            .expect("start sync search");
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        let mut refresh = Vec::new();
        let refresh_end = loop {
            let item = tokio::time::timeout_at(deadline, stream.next())
                .await
                .expect("refresh phase did not end within 10 s")
                .expect("sync search item")
                .expect("the persistent search ended");
            if item.is_intermediate() {
                match parse_syncinfo(item) {
                    SyncInfo::RefreshDelete {
                        refresh_done: true, ..
                    } => break "refreshDelete(done)".to_string(),
                    SyncInfo::RefreshPresent {
                        refresh_done: true, ..
                    } => break "refreshPresent(done)".to_string(),
                    other => panic!("unexpected syncInfo in refresh: {other:?}"),
                }
            }
            let state = sync_state(&item.1);
            refresh.push((entry_of(item), state));
        };

        // Change the entry behind the persistent search's back.
        let dn = user_dn(k);
        run_on(&direct, |mut other| async move {
            assert_eq!(bind(&mut other, ADMIN_DN, ADMIN_PW).await.rc, 0);
            let r = other
                .modify(
                    &dn,
                    vec![Mod::Replace(
                        "description",
                        HashSet::from(["changed while persisting"]),
                    )],
                )
                .await
                .expect("modify");
            assert_eq!(r.rc, 0, "{r:?}");
        })
        .await;

        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        let pushed = loop {
            let item = tokio::time::timeout_at(deadline, stream.next())
                .await
                .expect("the change was not pushed within 10 s")
                .expect("sync search item")
                .expect("the persistent search ended");
            if item.is_intermediate() {
                // e.g. a syncInfo newCookie: not the change itself.
                continue;
            }
            let state = sync_state(&item.1);
            break (entry_of(item), state);
        };

        let msgid = stream.ldap_handle().last_id();
        ldap.abandon(msgid).await.expect("abandon");
        let _ = stream.finish().await;
        let whoami_after = whoami(&mut ldap).await;
        SyncRun {
            refresh,
            refresh_end,
            pushed,
            whoami_after,
        }
    };
    tokio::pin!(run);
    let out = tokio::time::timeout(SCENARIO_TIMEOUT, async {
        tokio::select! {
            biased;
            out = &mut run => out,
            r = &mut driver => panic!("{url}: the connection ended: {r:?}"),
        }
    })
    .await
    .expect("sync scenario timed out");
    driver.abort();
    out
}

fn normalize_sync(run: &SyncRun, k: usize) -> SyncRun {
    let norm = pairs(&[
        (&format!("uid=user{k},"), "uid=userK,"),
        (&format!("user{k}"), "userK"),
    ]);
    let entry = |e: &Entry| {
        Summary {
            entries: vec![e.clone()],
            ..Default::default()
        }
        .normalized(&norm)
        .entries
        .remove(0)
    };
    SyncRun {
        refresh: run
            .refresh
            .iter()
            .map(|(e, s)| (entry(e), s.clone()))
            .collect(),
        refresh_end: run.refresh_end.clone(),
        pushed: (entry(&run.pushed.0), run.pushed.1.clone()),
        whoami_after: run.whoami_after.clone(),
    }
}

#[tokio::test]
async fn syncrepl_refresh_and_persist() {
    let lab = Lab::with(
        SlapdOptions {
            stats_log: true,
            ..Default::default()
        },
        |c| c.shutdown_grace_secs = 30,
    )
    .await;
    // Through the proxy on user5 (as specified), directly on user6. Each
    // abandon must reach slapd.
    let p = persist_scenario(lab.proxied(), lab.direct(), 5).await;
    wait_for_log(&lab, ABANDON_LOGGED, 1).await;
    let d = persist_scenario(lab.direct(), lab.direct(), 6).await;
    wait_for_log(&lab, ABANDON_LOGGED, 2).await;
    assert_eq!(
        normalize_sync(&d, 6),
        normalize_sync(&p, 5),
        "sync: direct vs proxied"
    );

    eprintln!("sync run through the proxy: {p:?}");
    assert_eq!(p.refresh.len(), 1, "refresh returns user5: {p:?}");
    let ((dn, attrs), state) = &p.refresh[0];
    assert_eq!(dn, &user_dn(5));
    assert_eq!(state, "Add");
    assert!(attrs.contains(&("description".into(), vec![Val(b"initial".to_vec())])));
    let ((dn, attrs), state) = &p.pushed;
    assert_eq!(dn, &user_dn(5));
    assert_eq!(state, "Modify");
    assert!(
        attrs.contains(&(
            "description".into(),
            vec![Val(b"changed while persisting".to_vec())]
        )),
        "the pushed entry carries the new value: {attrs:?}"
    );
    assert_eq!(p.whoami_after.exop_text(), format!("dn:{ADMIN_DN}"));

    // The abandoned persistent search must not be left in flight in the proxy.
    let (mut ldap, driver) = connect(&lab.proxied()).await;
    assert_eq!(bind(&mut ldap, ADMIN_DN, ADMIN_PW).await.rc, 0);
    let mut stream = ldap
        .with_controls(sync_request_persist())
        .streaming_search(SUFFIX, Scope::Subtree, "(uid=user7)", vec!["uid"])
        .await
        .expect("start sync search");
    loop {
        let item = tokio::time::timeout(EVENT_TIMEOUT, stream.next())
            .await
            .expect("refresh")
            .expect("item")
            .expect("search ended");
        if item.is_intermediate() {
            break;
        }
    }
    let msgid = stream.ldap_handle().last_id();
    ldap.abandon(msgid).await.expect("abandon");
    assert_eq!(whoami(&mut ldap).await.rc, 0);
    let Lab { slapd, proxy, .. } = lab;
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), proxy.shutdown())
        .await
        .expect("proxy shutdown hangs")
        .expect("proxy shutdown");
    eprintln!(
        "proxy shutdown after an abandoned persistent search: {:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}: it waited for the abandoned persistent search",
        t0.elapsed()
    );
    drop(stream);
    drop(ldap);
    driver.abort();
    drop(slapd);
}

// ---------------------------------------------------------------------------
// 10. A 1 MiB value
// ---------------------------------------------------------------------------

fn big_binary(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    // Certainly not UTF-8.
    v[0] = 0xff;
    v[len / 2] = 0xfe;
    v
}

fn big_text(len: usize) -> Vec<u8> {
    let words = b"the quick brown fox jumps over the lazy dog ";
    (0..len).map(|i| words[i % words.len()]).collect()
}

#[tokio::test]
async fn one_mebibyte_values() {
    const MIB: usize = 1024 * 1024;
    let lab = Lab::start().await;
    let photo = big_binary(MIB, 0x5eed);
    let text = big_text(MIB);
    let add = |url: String, name: &'static str| {
        let (photo, text) = (photo.clone(), text.clone());
        async move {
            run_on(&url, |mut ldap| async move {
                assert_eq!(bind(&mut ldap, ADMIN_DN, ADMIN_PW).await.rc, 0);
                let b = |s: &str| s.as_bytes().to_vec();
                let attrs: Vec<(Vec<u8>, HashSet<Vec<u8>>)> = vec![
                    (
                        b("objectClass"),
                        HashSet::from([b("top"), b("person"), b("inetOrgPerson")]),
                    ),
                    (b("uid"), HashSet::from([b(name)])),
                    (b("cn"), HashSet::from([b(name)])),
                    (b("sn"), HashSet::from([b("Big")])),
                    (b("jpegPhoto"), HashSet::from([photo])),
                    (b("description"), HashSet::from([text])),
                ];
                let r = ldap
                    .add(&format!("uid={name},{PEOPLE}"), attrs)
                    .await
                    .expect("add");
                summary(r)
            })
            .await
        }
    };
    let via_proxy = add(lab.proxied(), "big-p").await;
    let direct = add(lab.direct(), "big-d").await;
    assert_eq!(via_proxy.rc, 0, "add through the proxy: {via_proxy:?}");
    assert_eq!(direct, via_proxy, "add: direct vs proxied");

    for name in ["big-p", "big-d"] {
        let dn = format!("uid={name},{PEOPLE}");
        let dn = &dn;
        let (d, p) = differential(&lab, |mut ldap, _| async move {
            assert_eq!(bind(&mut ldap, ADMIN_DN, ADMIN_PW).await.rc, 0);
            read(&mut ldap, dn, &["jpegPhoto", "description", "uid"]).await
        })
        .await;
        // Summaries print large values as length + hash, so this is cheap.
        assert_eq!(d, p, "{name}: read direct vs proxied");
        assert_eq!(p.rc, 0);
        let attrs = p
            .entry(dn)
            .unwrap_or_else(|| panic!("{name} not found: {p:?}"));
        let get = |a: &str| {
            &attrs
                .iter()
                .find(|(n, _)| n == a)
                .unwrap_or_else(|| panic!("{name}: no {a}"))
                .1
        };
        assert!(
            get("jpegPhoto") == &vec![Val(photo.clone())],
            "{name}: jpegPhoto is not byte-identical: {:?}",
            get("jpegPhoto")
        );
        assert!(
            get("description") == &vec![Val(text.clone())],
            "{name}: description is not byte-identical: {:?}",
            get("description")
        );
    }
}

// ---------------------------------------------------------------------------
// 11. 100 concurrent clients, 20 pipelined searches each
// ---------------------------------------------------------------------------

/// Attribute asked for by pipelined search `j`, and its expected value for
/// user `k`: the searches on one connection have distinguishable answers.
fn probe(j: usize, k: usize) -> (&'static str, String) {
    match j % 10 {
        0 => ("uid", format!("user{k}")),
        1 => ("cn", format!("User {k}")),
        2 => ("sn", format!("User{k}")),
        3 => ("mail", format!("user{k}@example.org")),
        4 => ("uidNumber", format!("{}", 10000 + k)),
        5 => ("homeDirectory", format!("/home/user{k}")),
        6 => ("givenName", "Test".into()),
        7 => ("loginShell", "/bin/bash".into()),
        8 => ("description", "initial".into()),
        _ => ("gidNumber", "10000".into()),
    }
}

/// (clients that bound, searches, right answers, entries) over 100 clients.
async fn fan_out(url: String) -> (usize, usize, usize, usize) {
    let mut clients = Vec::new();
    for k in 1..=100usize {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            run_on(&url, |mut ldap| async move {
                let b = bind(&mut ldap, &user_dn(k), &user_pw(k)).await;
                assert_eq!(b.rc, 0, "bind user{k}: {b:?}");
                let searches: Vec<_> = (0..20)
                    .map(|j| {
                        let mut l = ldap.clone();
                        tokio::spawn(async move {
                            let (attr, _) = probe(j, k);
                            let s = search(
                                &mut l,
                                SUFFIX,
                                Scope::Subtree,
                                &format!("(uid=user{k})"),
                                &[attr],
                            )
                            .await;
                            (j, s)
                        })
                    })
                    .collect();
                let (mut n, mut right, mut entries) = (0, 0, 0);
                for h in searches {
                    let (j, s) = h.await.expect("search task");
                    n += 1;
                    entries += s.entries.len();
                    let (attr, want) = probe(j, k);
                    let ok = s.rc == 0
                        && s.entries.len() == 1
                        && s.entries[0].0 == user_dn(k)
                        && s.entries[0].1 == vec![(attr.to_string(), vec![Val(want.into_bytes())])];
                    assert!(ok, "user{k} search {j}: wrong answer {s:?}");
                    right += 1;
                }
                (1, n, right, entries)
            })
            .await
        }));
    }
    let mut total = (0, 0, 0, 0);
    for c in clients {
        let (a, b, c, d) = c.await.expect("client task");
        total = (total.0 + a, total.1 + b, total.2 + c, total.3 + d);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pipelined_clients() {
    let lab = Lab::start().await;
    let d = fan_out(lab.direct()).await;
    let p = fan_out(lab.proxied()).await;
    assert_eq!(d, p, "totals: direct vs proxied");
    assert_eq!(p, (100, 2000, 2000, 2000));
}
