//! Test support for a real 389 Directory Server (`testkit::ds389`): skip
//! when it cannot run here, start an instance, the proxy in front of it, and
//! helpers shared by `tests/it/ds389.rs` and `tests/it/ds389_backup.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use abproxy::config::{BackendConfig, Config};
use abproxy::freeze::drivers::DriverKind;
use abproxy::freeze::Mode;
use abproxy::operator::{Password, Session, Target};
use abproxy::ProxyHandle;
use testkit::ds389::{self, Ds389, Ds389Options, DM_DN, DM_PW};

use super::{ldap_tool, RawConn, ToolOutput};

pub const BIN: &str = env!("CARGO_BIN_EXE_abproxy");

/// True (after printing why) when 389-ds cannot run here; panics instead
/// when every test must run (`ABPROXY_REQUIRE_ALL=1` or `CI=true`: see
/// `testkit::skip`).
pub fn skip() -> bool {
    match ds389::available() {
        Ok(()) => false,
        Err(e) => {
            testkit::skip(e);
            true
        }
    }
}

pub async fn start_ds(users: usize) -> Ds389 {
    tokio::task::spawn_blocking(move || {
        Ds389::start(Ds389Options {
            users,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .expect("start 389-ds")
}

/// The proxy in front of `ds`, `cn=Directory Manager` allowed to freeze.
pub async fn proxy(ds: &Ds389, backends: Vec<BackendConfig>) -> ProxyHandle {
    let mut config = Config {
        listen: vec!["ldap://127.0.0.1:0".into()],
        upstream: ds.url(),
        backends,
        ..Config::default()
    };
    config.freeze.allowed = vec![DM_DN.into()];
    ProxyHandle::spawn(config).await.expect("start proxy")
}

/// dc=example,dc=org with the 389ds driver on the server's ldapi socket.
pub fn example_389ds(ds: &Ds389) -> BackendConfig {
    let mut b = BackendConfig::new("dc=example,dc=org", Mode::Readonly);
    b.driver = DriverKind::Ds389;
    b.config_url = Some(ds.ldapi_url());
    b
}

pub async fn dm_session(proxy: &ProxyHandle) -> Session {
    Session::connect(&Target {
        url: proxy.url(),
        bind_dn: Some(DM_DN.into()),
        password: Some(Password::new(DM_PW)),
    })
    .await
    .expect("bind to the proxy as Directory Manager")
}

/// A raw connection to `addr` (host:port) bound as `dn`.
pub async fn raw_bound(addr: &str, dn: &str, pw: &str) -> RawConn {
    let mut c = RawConn::connect(addr).await;
    c.send_msg(super::bind(1, dn, pw)).await;
    let f = c.recv().await.expect("bind answer");
    assert_eq!(super::result_code(&f), Some(0), "bind as {dn}");
    c
}

/// host:port of an `ldap://host:port` URL.
pub fn addr_of(url: &str) -> String {
    url.trim_start_matches("ldap://").to_string()
}

/// `abproxy ARGS --url PROXY --bind-dn DM --password-file F`, bounded to 90 s.
pub async fn cli(proxy: &ProxyHandle, args: &[&str]) -> ToolOutput {
    let pwfile = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pwfile.path(), format!("{DM_PW}\n")).unwrap();
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .args(["--url", &proxy.url(), "--bind-dn", DM_DN, "--password-file"])
        .arg(pwfile.path())
        .env_remove("ABPROXY_PASSWORD")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), out)
        .await
        .expect("abproxy did not finish in 90 s")
        .unwrap();
    ToolOutput::from(out)
}

/// Entries of an LDIF text (an export, or `ldapsearch -LLL` output): DN
/// (lower case) -> set of (attribute type in lower case, value), base64
/// values decoded, folded lines joined, comments and `version:` ignored.
pub type Entries = BTreeMap<String, BTreeSet<(String, Vec<u8>)>>;

pub fn parse_ldif(text: &str) -> Entries {
    use base64::Engine as _;
    let mut out = Entries::new();
    for block in text.split("\n\n") {
        let mut lines: Vec<String> = Vec::new();
        for l in block.lines() {
            if l.starts_with('#') {
                continue;
            }
            if let Some(cont) = l.strip_prefix(' ') {
                if let Some(last) = lines.last_mut() {
                    last.push_str(cont);
                    continue;
                }
            }
            lines.push(l.to_string());
        }
        let mut dn = None;
        let mut attrs = BTreeSet::new();
        for l in &lines {
            let Some((name, rest)) = l.split_once(':') else {
                panic!("not an LDIF line: {l:?}");
            };
            let value = if let Some(b64) = rest.strip_prefix(':') {
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .unwrap_or_else(|e| panic!("{l:?}: {e}"))
            } else {
                rest.strip_prefix(' ').unwrap_or(rest).as_bytes().to_vec()
            };
            let name = name.to_ascii_lowercase();
            match name.as_str() {
                "version" if dn.is_none() => {}
                "dn" => {
                    dn = Some(String::from_utf8(value).unwrap().to_ascii_lowercase());
                }
                _ => {
                    attrs.insert((name, value));
                }
            }
        }
        if let Some(dn) = dn {
            assert!(out.insert(dn.clone(), attrs).is_none(), "{dn} twice");
        }
    }
    out
}

/// Every entry under `base` as Directory Manager over 389's own ldapi
/// socket (root autobind), with `attrs`, as LDIF.
pub async fn dump(ds: &Ds389, base: &str, attrs: &[&str]) -> String {
    let url = ds.ldapi_url();
    let args = [
        &[
            "-Q",
            "-LLL",
            "-o",
            "ldif_wrap=no",
            "-Y",
            "EXTERNAL",
            "-H",
            &url,
            "-b",
            base,
            "(objectClass=*)",
        ][..],
        attrs,
    ]
    .concat();
    let out = ldap_tool("ldapsearch", &args, None).await;
    assert_eq!(out.code, Some(0), "dump of {base}: {out:?}");
    out.stdout
}

/// The attributes a 389 LDIF export holds besides the user attributes.
pub const EXPORTED_OPERATIONAL: &[&str] = &[
    "*",
    "nsUniqueId",
    "creatorsName",
    "modifiersName",
    "createTimestamp",
    "modifyTimestamp",
    "dsEntryDN",
    "entryUUID",
];

/// A whole LDAPMessage frame decoded with ldap3_proto.
pub fn decode(frame: &[u8]) -> ldap3_proto::proto::LdapMsg {
    use tokio_util::codec::Decoder;
    let mut buf = bytes::BytesMut::from(frame);
    ldap3_proto::LdapCodec::new(Some(1 << 26), None)
        .decode(&mut buf)
        .unwrap()
        .expect("a whole message")
}

/// The persistent search control (draft-ietf-ldapext-psearch-03,
/// 2.16.840.1.113730.3.4.3), critical: every change type (15),
/// changesOnly FALSE (the matching entries first), returnECs TRUE.
pub fn psearch_control() -> ldap3_proto::control::LdapControl {
    ldap3_proto::control::LdapControl::Unknown {
        oid: PSEARCH_OID.into(),
        criticality: true,
        value: Some(vec![
            0x30, 0x09, 0x02, 0x01, 0x0f, 0x01, 0x01, 0x00, 0x01, 0x01, 0xff,
        ]),
    }
}

pub const PSEARCH_OID: &str = "2.16.840.1.113730.3.4.3";
/// The Entry Change Notification control 389 attaches to psearch entries.
pub const ECN_OID: &str = "2.16.840.1.113730.3.4.7";

/// changeType of the Entry Change Notification control of a psearch entry
/// (1 add, 2 delete, 4 modify, 8 modDN), and its previousDN if any.
pub fn entry_change(msg: &ldap3_proto::proto::LdapMsg) -> (u8, Option<String>) {
    let value = msg
        .ctrl
        .iter()
        .find_map(|c| match c {
            ldap3_proto::control::LdapControl::Unknown { oid, value, .. } if oid == ECN_OID => {
                value.clone()
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no entry change notification in {msg:?}"));
    // SEQUENCE { changeType ENUMERATED, previousDN LDAPDN OPTIONAL, ... },
    // short lengths (small values).
    assert_eq!(&value[..1], &[0x30], "{value:?}");
    assert_eq!(&value[2..4], &[0x0a, 0x01], "{value:?}");
    let prev = (value.len() > 5 && value[5] == 0x04).then(|| {
        let len = value[6] as usize;
        String::from_utf8(value[7..7 + len].to_vec()).unwrap()
    });
    (value[4], prev)
}

/// DN of a search result entry.
pub fn entry_dn(msg: &ldap3_proto::proto::LdapMsg) -> String {
    match &msg.op {
        ldap3_proto::proto::LdapOp::SearchResultEntry(e) => e.dn.clone(),
        other => panic!("not an entry: {other:?}"),
    }
}

/// What differs between two parsed LDIF texts (for assertion messages):
/// DNs only in one, and for the first few common entries that differ, the
/// attribute values only in one.
pub fn diff_entries(a: &Entries, b: &Entries) -> String {
    let mut out = String::new();
    for dn in a.keys().filter(|k| !b.contains_key(*k)).take(5) {
        out.push_str(&format!("only in the first: {dn}\n"));
    }
    for dn in b.keys().filter(|k| !a.contains_key(*k)).take(5) {
        out.push_str(&format!("only in the second: {dn}\n"));
    }
    let show = |(t, v): &(String, Vec<u8>)| format!("{t}: {}", String::from_utf8_lossy(v));
    for (dn, x) in a
        .iter()
        .filter(|(k, v)| b.get(*k).is_some_and(|y| y != *v))
        .take(3)
    {
        let y = &b[dn];
        let only_x: Vec<String> = x.difference(y).map(show).collect();
        let only_y: Vec<String> = y.difference(x).map(show).collect();
        out.push_str(&format!(
            "{dn}: first only {only_x:?}, second only {only_y:?}\n"
        ));
    }
    out
}
