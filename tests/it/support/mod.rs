//! Test support: a real slapd (from `testkit`) with the proxy under test
//! in front of it, ldap-utils runners and a raw LDAP connection for
//! byte-level checks. Nothing here depends on `../shared`.

use std::process::Stdio;
use std::time::Duration;

use abproxy::config::Config;
use abproxy::wire::envelope::oid;
use abproxy::wire::{op, Envelope, FrameCodec};
use abproxy::ProxyHandle;
use bytes::{Bytes, BytesMut};
use ldap3_proto::proto::{LdapMsg, LdapOp};
use testkit::{Slapd, SlapdOptions, OTHER_ADMIN_DN, SUFFIX};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;

pub use testkit::{ADMIN_DN, ADMIN_PW};

pub mod backup;
pub mod freeze;
pub mod pki;
pub mod process;
pub mod record;
pub mod shim;

/// A slapd and a proxy in front of it.
pub struct Lab {
    pub slapd: Slapd,
    pub proxy: ProxyHandle,
    /// With `ABPROXY_RECORD_DIR` set: records client traffic in front of
    /// the proxy (fuzz seeds), and [`Lab::proxied`] is its address.
    pub recorder: Option<record::Recorder>,
}

impl Lab {
    /// slapd with 100 users, proxy with the default configuration.
    pub async fn start() -> Lab {
        Self::with(SlapdOptions::default(), |_| {}).await
    }

    /// slapd built from `opts`, proxy config adjusted by `tweak`.
    pub async fn with(opts: SlapdOptions, tweak: impl FnOnce(&mut Config)) -> Lab {
        let slapd = start_slapd(opts).await;
        let mut config = Config {
            listen: vec!["ldap://127.0.0.1:0".into()],
            upstream: slapd.url(),
            ..Config::default()
        };
        // What is true of the lab's slapd: binds to its databases' rootdns
        // write nothing (its ppolicy skips them).
        config.freeze.root_dns = vec![ADMIN_DN.into(), OTHER_ADMIN_DN.into()];
        // The first session open on each thread runs as tasks of its own,
        // the others meanwhile in a session pool (the default keeps 2 as
        // tasks): the tests' sessions run both ways.
        config.session_tasks_per_thread = 1;
        tweak(&mut config);
        let proxy = ProxyHandle::spawn(config).await.expect("start proxy");
        let recorder = match proxy.url().strip_prefix("ldap://") {
            Some(addr) => record::Recorder::from_env(addr).await,
            None => None,
        };
        Lab {
            slapd,
            proxy,
            recorder,
        }
    }

    /// The server itself.
    pub fn direct(&self) -> String {
        self.slapd.url()
    }

    /// The proxy's first listener (or the recorder in front of it).
    pub fn proxied(&self) -> String {
        match &self.recorder {
            Some(r) => format!("ldap://{}", r.addr),
            None => self.proxy.url(),
        }
    }

    /// host:port of the proxy's first TCP listener.
    pub fn proxy_addr(&self) -> String {
        self.proxied().trim_start_matches("ldap://").to_string()
    }

    /// host:port of slapd.
    pub fn direct_addr(&self) -> String {
        self.direct().trim_start_matches("ldap://").to_string()
    }
}

/// A throwaway slapd built from `opts`, started off the async runtime (its
/// start-up blocks).
pub async fn start_slapd(opts: SlapdOptions) -> Slapd {
    tokio::task::spawn_blocking(move || Slapd::start(opts))
        .await
        .unwrap()
        .expect("start slapd")
}

/// What an ldap-utils command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for ToolOutput {
    fn from(out: std::process::Output) -> Self {
        ToolOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs an ldap-utils tool (`ldapsearch`, `ldapmodify`, ...) with `args`,
/// feeding `stdin`; bounded to 60 s.
pub async fn ldap_tool(tool: &str, args: &[&str], stdin: Option<&str>) -> ToolOutput {
    let mut cmd = tokio::process::Command::new(tool);
    cmd.args(args)
        .env("LDAPCONF", "/dev/null")
        .env("LDAPRC", "/dev/null")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{tool}: {e} (apt-get install -y ldap-utils)"));
    if let Some(input) = stdin {
        let mut w = child.stdin.take().unwrap();
        w.write_all(input.as_bytes()).await.unwrap();
        drop(w);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{tool} {args:?} did not finish in 60 s"))
        .unwrap();
    ToolOutput::from(out)
}

/// Runs the same tool invocation against `direct` and `proxied`: every
/// occurrence of the placeholder `URL` in `args` is replaced by the URL.
pub async fn both(
    lab: &Lab,
    tool: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> (ToolOutput, ToolOutput) {
    let run = |url: String| {
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                if *a == "URL" {
                    url.clone()
                } else {
                    a.to_string()
                }
            })
            .collect();
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            ldap_tool(tool, &refs, stdin).await
        }
    };
    let d = run(lab.direct()).await;
    let p = run(lab.proxied()).await;
    (d, p)
}

/// A raw LDAP connection: send bytes, read whole frames.
pub struct RawConn {
    pub stream: TcpStream,
    buf: BytesMut,
    codec: FrameCodec,
}

impl RawConn {
    pub async fn connect(addr: &str) -> RawConn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> RawConn {
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            buf: BytesMut::new(),
            codec: FrameCodec::new(256 * 1024 * 1024),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    pub async fn send_msg(&mut self, msg: LdapMsg) {
        let b = encode(msg);
        self.send(&b).await;
    }

    /// The next frame, or None on EOF (or connection reset); panics after 30 s.
    pub async fn recv(&mut self) -> Option<Bytes> {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Some(f) = self.codec.decode(&mut self.buf).expect("frame") {
                    return Some(f);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("no frame within 30 s")
    }

    /// Frames until (and including) the final response to `msgid`.
    pub async fn recv_until_final(&mut self, msgid: i32) -> Vec<Bytes> {
        let mut out = Vec::new();
        loop {
            let f = self.recv().await.expect("connection closed early");
            let env = Envelope::response(&f).unwrap();
            out.push(f);
            if env.msgid == msgid && abproxy::wire::op::is_final_response(env.op) {
                return out;
            }
        }
    }

    /// Reads until EOF; returns the frames seen.
    pub async fn recv_all(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(f) = self.recv().await {
            out.push(f);
        }
        out
    }
}

/// A connection to `addr` (host:port) after a successful simple bind
/// (message ID 1).
pub async fn bound_at(addr: &str, dn: &str, pw: &str) -> RawConn {
    let mut c = RawConn::connect(addr).await;
    c.send_msg(bind(1, dn, pw)).await;
    assert_eq!(result_code(&c.recv().await.unwrap()), Some(0));
    c
}

/// A round trip on `c` (a base search of the suffix), proving the proxy
/// admitted the connection and has an upstream for it.
pub async fn round_trip(c: &mut RawConn, msgid: i32) {
    c.send_msg(search(
        msgid,
        "dc=example,dc=org",
        0,
        "(objectClass=*)",
        &["dc"],
    ))
    .await;
    let r = c.recv_until_final(msgid).await;
    assert_eq!(result_code(r.last().unwrap()), Some(0));
}

/// A repository file, read at compile time: (path, text).
macro_rules! page {
    ($path:literal) => {
        (
            $path,
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/", $path)),
        )
    };
}

/// The pages that hold recipes, read at compile time.
const DOCS: &[(&str, &str)] = &[
    page!("docs/recipes.md"),
    page!("docs/operations.md"),
    page!("docs/tls.md"),
    page!("docs/allow-backup.md"),
    page!("docs/ds389.md"),
    page!("README.md"),
];

/// The body of the code block marked `<!-- recipe: NAME -->` in the docs.
pub fn recipe(name: &str) -> &'static str {
    let marker = format!("<!-- recipe: {name} -->");
    let found: Vec<(&str, usize)> = DOCS
        .iter()
        .map(|(page, text)| (*page, text.matches(&marker).count()))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(
        found.iter().map(|(_, n)| n).sum::<usize>(),
        1,
        "one {marker} in the docs (found: {found:?})"
    );
    let page = DOCS.iter().find(|(p, _)| *p == found[0].0).unwrap().1;
    let rest = &page[page.find(&marker).unwrap() + marker.len()..];
    let fence = rest.find("```").expect("a code block after the marker");
    assert!(
        rest[..fence].trim().is_empty(),
        "{marker} is right before its code block"
    );
    let body = &rest[fence..];
    let body = &body[body.find('\n').unwrap() + 1..];
    &body[..body.find("\n```").expect("the block ends") + 1]
}

/// Encodes a message with ldap3_proto (test-side client PDUs).
pub fn encode(msg: LdapMsg) -> Bytes {
    abproxy::wire::pdu::encode(msg)
}

/// A simple bind request.
pub fn bind(msgid: i32, dn: &str, pw: &str) -> LdapMsg {
    LdapMsg::new(
        msgid,
        LdapOp::BindRequest(ldap3_proto::proto::LdapBindRequest {
            version: 3,
            dn: dn.into(),
            cred: ldap3_proto::proto::LdapBindCred::Simple(pw.into()),
        }),
    )
}

/// An add request for a `device` entry named `cn`.
pub fn add(msgid: i32, dn: &str, cn: &str) -> LdapMsg {
    let attr = |t: &str, v: &str| ldap3_proto::proto::LdapAttribute {
        atype: t.into(),
        vals: vec![v.as_bytes().to_vec()],
    };
    LdapMsg::new(
        msgid,
        LdapOp::AddRequest(ldap3_proto::proto::LdapAddRequest {
            dn: dn.into(),
            attributes: vec![attr("objectClass", "device"), attr("cn", cn)],
        }),
    )
}

/// A search request (filter in RFC 4515 string form).
pub fn search(msgid: i32, base: &str, scope: u8, filter: &str, attrs: &[&str]) -> LdapMsg {
    use ldap3_proto::proto::{LdapDerefAliases, LdapSearchRequest, LdapSearchScope};
    LdapMsg::new(
        msgid,
        LdapOp::SearchRequest(LdapSearchRequest {
            base: base.into(),
            scope: match scope {
                0 => LdapSearchScope::Base,
                1 => LdapSearchScope::OneLevel,
                2 => LdapSearchScope::Subtree,
                _ => LdapSearchScope::Children,
            },
            aliases: LdapDerefAliases::Never,
            sizelimit: 0,
            timelimit: 0,
            typesonly: false,
            filter: ldap3_proto::parse_ldap_filter_str(filter).expect("filter"),
            attrs: attrs.iter().map(|a| a.to_string()).collect(),
        }),
    )
}

/// `msg`, a search, as a syncrepl refreshAndPersist search (RFC 4533): after
/// its refresh phase it stays in flight, sending changes as they happen.
pub fn refresh_and_persist(mut msg: LdapMsg) -> LdapMsg {
    msg.ctrl
        .push(ldap3_proto::control::LdapControl::SyncRequest {
            criticality: true,
            mode: ldap3_proto::proto::SyncRequestMode::RefreshAndPersist,
            cookie: None,
            reload_hint: false,
        });
    msg
}

/// The session ended with a Notice of Disconnection (unavailable, 52)
/// whose reason names each of `why`, then the connection closed.
pub async fn assert_ended_with(c: &mut RawConn, why: &[&str]) {
    let notice = c.recv().await.expect("a notice");
    let reason = assert_notice(&notice, 52);
    for w in why {
        assert!(reason.contains(w), "{reason}");
    }
    assert!(c.recv().await.is_none(), "closed after the notice");
}

/// Result code of a final response frame.
pub fn result_code(frame: &[u8]) -> Option<i64> {
    Envelope::response(frame).unwrap().result_code
}

/// Asserts `frame` is a Notice of Disconnection with `code`.
pub fn assert_notice(frame: &[u8], code: i64) -> String {
    let env = Envelope::response(frame).unwrap();
    assert_eq!(env.msgid, 0, "notice has messageID 0");
    assert_eq!(env.op, op::EXTENDED_RESPONSE);
    assert_eq!(env.oid_bytes(frame), Some(oid::NOTICE_OF_DISCONNECTION));
    assert_eq!(env.result_code, Some(code));
    diagnostic(frame)
}

/// The diagnosticMessage of a result, decoded with ldap3_proto.
pub fn diagnostic(frame: &[u8]) -> String {
    let mut buf = BytesMut::from(frame);
    let msg = ldap3_proto::LdapCodec::new(Some(1 << 24), None)
        .decode(&mut buf)
        .unwrap()
        .unwrap();
    match msg.op {
        LdapOp::ExtendedResponse(r) => r.res.message,
        LdapOp::SearchResultDone(r) | LdapOp::ModifyResponse(r) => r.message,
        LdapOp::BindResponse(r) => r.res.message,
        other => panic!("unexpected {other:?}"),
    }
}

/// `ldapsearch -LLL` over a server's ldapi socket with SASL EXTERNAL (as
/// root: slapd's cn=config manager, 389's Directory Manager), bypassing the
/// proxy; `args` are the base, scope, filter and attributes. Its output.
pub async fn ldapi_search(ldapi_url: &str, args: &[&str]) -> String {
    let mut all = vec!["-Q", "-LLL", "-Y", "EXTERNAL", "-H", ldapi_url];
    all.extend_from_slice(args);
    let out = ldap_tool("ldapsearch", &all, None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    out.stdout
}

/// `ldapsearch -LLL` (unwrapped) of dc=example,dc=org at `url` as the
/// lab's admin, `args` the filter and attributes. Its output.
pub async fn admin_search(url: &str, args: &[&str]) -> String {
    let mut all = vec![
        "-x",
        "-H",
        url,
        "-D",
        ADMIN_DN,
        "-w",
        ADMIN_PW,
        "-b",
        SUFFIX,
        "-LLL",
        "-o",
        "ldif-wrap=no",
    ];
    all.extend_from_slice(args);
    let out = ldap_tool("ldapsearch", &all, None).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    out.stdout
}

/// The olcReadOnly line(s) of the dc=example,dc=org database in slapd's
/// cn=config (empty: absent), read over its ldapi socket as root.
pub async fn olc_read_only(ldapi_url: &str) -> String {
    ldapi_search(
        ldapi_url,
        &[
            "-b",
            "cn=config",
            "(olcSuffix=dc=example,dc=org)",
            "olcReadOnly",
        ],
    )
    .await
    .lines()
    .filter(|l| l.starts_with("olcReadOnly"))
    .collect::<Vec<_>>()
    .join(",")
}

/// One IPv4 TCP socket as the kernel lists it in /proc/net/tcp.
#[derive(Debug, Clone, Copy)]
pub struct KernelSocket {
    pub local_port: u16,
    pub remote_port: u16,
    pub established: bool,
    /// Bytes queued for sending (not yet acknowledged by the peer).
    pub tx_queue: usize,
    /// Bytes received and not yet read by the application.
    pub rx_queue: usize,
}

/// The machine's IPv4 TCP sockets (what `ss` shows), for tests that wait on
/// kernel-visible events: connections opened/closed, a peer that stopped
/// reading.
pub fn kernel_sockets() -> Vec<KernelSocket> {
    let port = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
            .unwrap_or(0)
    };
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 4).then(|| KernelSocket {
                local_port: port(f[1]),
                remote_port: port(f[2]),
                established: f[3] == "01",
                tx_queue: f[4]
                    .split(':')
                    .next()
                    .and_then(|q| usize::from_str_radix(q, 16).ok())
                    .unwrap_or(0),
                rx_queue: f[4]
                    .split(':')
                    .nth(1)
                    .and_then(|q| usize::from_str_radix(q, 16).ok())
                    .unwrap_or(0),
            })
        })
        .collect()
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `secs`.
pub async fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub mod ds389;
