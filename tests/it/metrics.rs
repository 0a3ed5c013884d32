//! The metrics endpoint (`[metrics] listen`): scrapes during load and
//! during a freeze, checked against exactly what the test did; the
//! exposition checked by `promtool` (Prometheus's own parser and linter);
//! `/healthz`, `/readyz`; the contrib alert rules and dashboard name only
//! metrics that exist.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Stdio;

use crate::support::freeze::*;
use crate::support::*;
use abproxy::config::Config;
use abproxy_proto::AllowBackupRequest;
use testkit::{user_dn, SlapdOptions, ADMIN_DN, ADMIN_PW, OTHER_ADMIN_DN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROMTOOL: &str = "/usr/bin/promtool";

fn metrics_on(c: &mut Config) {
    c.metrics.listen = Some("127.0.0.1:0".into());
}

fn operators(c: &mut Config) {
    c.freeze.allowed = vec![ADMIN_DN.into(), OTHER_ADMIN_DN.into()];
    c.freeze.root_dns = c.freeze.allowed.clone();
}

async fn metrics_lab(tweak: impl FnOnce(&mut Config)) -> Lab {
    Lab::with(
        SlapdOptions {
            nosync: true,
            ..Default::default()
        },
        |c| {
            metrics_on(c);
            operators(c);
            tweak(c);
        },
    )
    .await
}

/// An HTTP response: status, content type, body.
struct Http {
    status: u16,
    content_type: String,
    body: String,
}

/// One HTTP/1.1 request (`Connection: close`), the response read to the end.
async fn http(addr: SocketAddr, method: &str, path: &str, accept: Option<&str>) -> Http {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: abproxy\r\n{accept}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("response within 10 s")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Http {
        status,
        content_type,
        body: body.to_string(),
    }
}

async fn scrape(lab: &Lab) -> Scrape {
    let r = http(lab.proxy.metrics_addr().unwrap(), "GET", "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        r.content_type
    );
    Scrape::parse(&r.body)
}

/// Label names and values, sorted.
type Labels = Vec<(String, String)>;

/// Samples of an exposition: name, labels, value.
struct Scrape {
    text: String,
    samples: Vec<(String, Labels, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("name and value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), Vec::new()),
                Some((n, rest)) => {
                    let rest = rest.strip_suffix('}').expect("labels end");
                    let mut labels: Labels = rest
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").expect("label=\"value\"");
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    labels.sort();
                    (n.to_string(), labels)
                }
            };
            samples.push((name, labels, value));
        }
        Scrape {
            text: text.to_string(),
            samples,
        }
    }

    /// The value of the sample `name` with exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut want: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        want.sort();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|s| s.2)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{}", self.text))
    }

    fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.0.clone()).collect()
    }
}

/// `promtool check metrics` on an exposition (Prometheus's text parser and
/// its linter); skipped (visibly, a failure under CI) without promtool.
async fn promtool_check_metrics(text: &str) {
    if !std::path::Path::new(PROMTOOL).exists() {
        testkit::skip("promtool not installed (apt-get install prometheus)");
        return;
    }
    let mut child = tokio::process::Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends `msg`, returns its final result code and the request's size.
async fn op(c: &mut RawConn, msg: ldap3_proto::proto::LdapMsg) -> (i64, usize) {
    let id = msg.msgid;
    let bytes = encode(msg);
    c.send(&bytes).await;
    let frames = c.recv_until_final(id).await;
    (result_code(frames.last().unwrap()).unwrap(), bytes.len())
}

#[tokio::test]
async fn a_scrape_counts_exactly_what_clients_did() {
    let lab = metrics_lab(|_| {}).await;
    let listener = lab.proxy.url();
    let addr = lab.proxy.metrics_addr().unwrap();
    // Scrapes all along the load: each parses, and counters never go back.
    let stop = tokio_util::sync::CancellationToken::new();
    let scraper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut scrapes, mut last) = (0, 0.0);
            while !stop.is_cancelled() {
                let s = Scrape::parse(&http(addr, "GET", "/metrics", None).await.body);
                let n = s.get("abproxy_requests_total", &[("op", "search")]);
                assert!(n >= last, "search requests went from {last} to {n}");
                last = n;
                scrapes += 1;
            }
            scrapes
        })
    };
    let mut sent = 0;
    // Three binds that succeed, one with a wrong password.
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut c = RawConn::connect(&lab.proxy_addr()).await;
        let (code, n) = op(&mut c, bind(1, ADMIN_DN, ADMIN_PW)).await;
        assert_eq!(code, 0);
        sent += n;
        conns.push(c);
    }
    let mut bad = RawConn::connect(&lab.proxy_addr()).await;
    let (code, n) = op(&mut bad, bind(1, &user_dn(1), "wrong")).await;
    assert_eq!(code, 49);
    sent += n;
    // Five searches, then four modifies: two of users, two of entries that
    // do not exist (noSuchObject).
    let c = &mut conns[0];
    for id in 2..7 {
        let (code, n) = op(
            c,
            search(id, "dc=example,dc=org", 0, "(objectClass=*)", &["dc"]),
        )
        .await;
        assert_eq!(code, 0);
        sent += n;
    }
    for (id, dn) in [
        (7, user_dn(1)),
        (8, user_dn(2)),
        (9, "uid=nobody,ou=people,dc=example,dc=org".to_string()),
        (10, "uid=nobody2,ou=people,dc=example,dc=org".to_string()),
    ] {
        let (code, n) = op(c, modify(id, &dn, "description", "counted")).await;
        assert_eq!(code, if dn.contains("nobody") { 32 } else { 0 }, "{dn}");
        sent += n;
    }

    stop.cancel();
    let scrapes = join(scraper, "the scraper").await;
    assert!(scrapes > 0);
    let s = scrape(&lab).await;
    let ops = |op: &str, result: &str| {
        s.get(
            "abproxy_operations_total",
            &[("op", op), ("result", result)],
        )
    };
    assert_eq!(ops("bind", "success"), 3.0);
    assert_eq!(ops("bind", "security_error"), 1.0);
    assert_eq!(ops("search", "success"), 5.0);
    assert_eq!(ops("modify", "success"), 2.0);
    assert_eq!(ops("modify", "name_error"), 2.0);
    assert_eq!(ops("add", "success"), 0.0);
    let requests = |op: &str| s.get("abproxy_requests_total", &[("op", op)]);
    assert_eq!(requests("bind"), 4.0);
    assert_eq!(requests("search"), 5.0);
    assert_eq!(requests("modify"), 4.0);
    assert_eq!(s.get("abproxy_request_bytes_total", &[]), sent as f64);
    assert!(s.get("abproxy_response_bytes_total", &[]) > 0.0);
    let count = |op: &str| s.get("abproxy_operation_duration_seconds_count", &[("op", op)]);
    assert_eq!(count("search"), 5.0);
    assert_eq!(count("modify"), 4.0);
    assert_eq!(count("bind"), 4.0);
    assert_eq!(
        s.get(
            "abproxy_operation_duration_seconds_bucket",
            &[("op", "search"), ("le", "+Inf")]
        ),
        5.0
    );
    assert_eq!(s.get("abproxy_operations_in_flight", &[]), 0.0);
    assert_eq!(
        s.get(
            "abproxy_connections_accepted_total",
            &[("listener", &listener)]
        ),
        4.0
    );
    assert_eq!(
        s.get("abproxy_connections_open", &[("listener", &listener)]),
        4.0
    );
    assert_eq!(
        s.get("abproxy_connections_refused_total", &[("reason", "limit")]),
        0.0
    );
    assert_eq!(s.get("abproxy_freeze_state", &[("state", "thawed")]), 1.0);
    assert_eq!(
        s.get(
            "abproxy_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", abproxy::metrics::collect::COMMIT)
            ]
        ),
        1.0
    );
    assert!(s.get("abproxy_start_time_seconds", &[]) > 1.7e9);
    assert!(s.get("process_resident_memory_bytes", &[]) > 0.0);
    promtool_check_metrics(&s.text).await;

    // Closed sessions leave the gauge.
    drop(conns);
    drop(bad);
    let mut open = f64::NAN;
    for _ in 0..500 {
        let s = Scrape::parse(&http(addr, "GET", "/metrics", None).await.body);
        open = s.get("abproxy_connections_open", &[("listener", &listener)]);
        if open == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(open, 0.0);
}

#[tokio::test]
async fn openmetrics_health_readiness_and_other_paths() {
    let lab = metrics_lab(|_| {}).await;
    let addr = lab.proxy.metrics_addr().unwrap();
    let om = http(
        addr,
        "GET",
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    )
    .await;
    assert_eq!(om.status, 200);
    assert!(
        om.content_type.starts_with("application/openmetrics-text"),
        "{}",
        om.content_type
    );
    assert!(om.body.ends_with("# EOF\n"));
    assert!(
        om.body.contains("# TYPE abproxy_operations counter\n"),
        "{}",
        om.body
    );
    // The same samples as the text format.
    let om_names = Scrape::parse(&om.body).names();
    let text_names = scrape(&lab).await.names();
    assert_eq!(om_names, text_names);

    let h = http(addr, "GET", "/healthz", None).await;
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    let r = http(addr, "GET", "/readyz", None).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    assert_eq!(http(addr, "GET", "/", None).await.status, 404);
    assert_eq!(http(addr, "POST", "/metrics", None).await.status, 405);

    // The server stops: healthz says so (in one line), readyz does not
    // change (the proxy still accepts clients).
    let slapd_url = lab.direct();
    drop(lab.slapd);
    let h = http(addr, "GET", "/healthz", None).await;
    assert_eq!(h.status, 503, "{}", h.body);
    assert!(
        h.body.contains(&slapd_url) && h.body.lines().count() == 1,
        "{}",
        h.body
    );
    assert_eq!(http(addr, "GET", "/readyz", None).await.status, 200);
    lab.proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_freeze_shows_its_state_held_requests_and_outcome() {
    let lab = metrics_lab(|_| {}).await;
    let addr = lab.proxy.metrics_addr().unwrap();
    let mut admin = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    // A user may not freeze: refused.
    let mut user = bound(&lab, &user_dn(1), "pass1").await;
    assert_eq!(
        call(&mut user, ab(2, &AllowBackupRequest::on())).await.0,
        50
    );
    let (code, msg) = call(&mut admin, ab(2, &AllowBackupRequest::on())).await;
    assert_eq!(code, 0, "{msg}");

    // Three writes, held.
    let mut w = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    let mut held_bytes = 0;
    for (id, k) in [(2, 4), (3, 5), (4, 6)] {
        let m = encode(modify(id, &user_dn(k), "description", "held"));
        held_bytes += m.len();
        w.send(&m).await;
    }
    let mut s = scrape(&lab).await;
    for _ in 0..2000 {
        if s.get("abproxy_freeze_held_requests", &[]) == 3.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        s = Scrape::parse(&http(addr, "GET", "/metrics", None).await.body);
    }
    assert_eq!(s.get("abproxy_freeze_held_requests", &[]), 3.0);
    assert_eq!(s.get("abproxy_freeze_held_bytes", &[]), held_bytes as f64);
    assert_eq!(s.get("abproxy_freeze_holds_total", &[]), 3.0);
    assert_eq!(s.get("abproxy_freeze_state", &[("state", "frozen")]), 1.0);
    assert_eq!(s.get("abproxy_freeze_state", &[("state", "thawed")]), 0.0);
    assert_eq!(
        s.get("abproxy_freezes_total", &[("outcome", "refused")]),
        1.0
    );
    assert_eq!(
        s.get("abproxy_freezes_total", &[("outcome", "success")]),
        0.0
    );
    assert_eq!(
        s.get("abproxy_freeze_drain_duration_seconds_count", &[]),
        1.0
    );
    assert_eq!(s.get("abproxy_freeze_released_requests_total", &[]), 0.0);
    assert!(s.get("abproxy_freeze_oldest_held_seconds", &[]) >= 0.0);
    // Nothing of the writes counted yet: they were not answered.
    assert_eq!(
        s.get(
            "abproxy_operations_total",
            &[("op", "modify"), ("result", "success")]
        ),
        0.0
    );
    assert_eq!(s.get("abproxy_requests_total", &[("op", "modify")]), 3.0);
    promtool_check_metrics(&s.text).await;

    let (code, msg) = call(&mut admin, ab(3, &AllowBackupRequest::off())).await;
    assert_eq!(code, 0, "{msg}");
    let (_, codes) = recv_finals(&mut w, &[2, 3, 4]).await;
    assert_eq!(codes, [0, 0, 0]);
    let s = scrape(&lab).await;
    assert_eq!(s.get("abproxy_freeze_released_requests_total", &[]), 3.0);
    assert_eq!(s.get("abproxy_freeze_held_requests", &[]), 0.0);
    assert_eq!(s.get("abproxy_freeze_held_bytes", &[]), 0.0);
    assert_eq!(s.get("abproxy_freeze_oldest_held_seconds", &[]), 0.0);
    assert_eq!(
        s.get("abproxy_freezes_total", &[("outcome", "success")]),
        1.0
    );
    assert_eq!(
        s.get("abproxy_freezes_total", &[("outcome", "refused")]),
        1.0
    );
    assert_eq!(
        s.get("abproxy_freezes_total", &[("outcome", "expired")]),
        0.0
    );
    assert_eq!(
        s.get("abproxy_freeze_frozen_duration_seconds_count", &[]),
        1.0
    );
    assert_eq!(s.get("abproxy_freeze_state", &[("state", "thawed")]), 1.0);
    assert_eq!(
        s.get(
            "abproxy_operations_total",
            &[("op", "modify"), ("result", "success")]
        ),
        3.0
    );
}

#[tokio::test]
async fn connections_over_the_limit_are_counted_by_reason() {
    let lab = metrics_lab(|c| {
        c.max_connections = 3;
        c.max_connections_per_source = 2;
    })
    .await;
    let listener = lab.proxy.url();
    let a = RawConn::connect(&lab.proxy_addr()).await;
    let b = RawConn::connect(&lab.proxy_addr()).await;
    wait_until("two sessions", 10, || lab.proxy.open_connections() == 2).await;
    // A third from the same address: over max_connections_per_source.
    let mut c = RawConn::connect(&lab.proxy_addr()).await;
    assert_notice(&c.recv().await.expect("a notice"), 52);
    let s = scrape(&lab).await;
    assert_eq!(
        s.get("abproxy_connections_refused_total", &[("reason", "source")]),
        1.0
    );
    assert_eq!(
        s.get("abproxy_connections_refused_total", &[("reason", "limit")]),
        0.0
    );
    assert_eq!(
        s.get(
            "abproxy_connections_accepted_total",
            &[("listener", &listener)]
        ),
        3.0
    );
    assert_eq!(
        s.get("abproxy_connections_open", &[("listener", &listener)]),
        2.0
    );
    drop((a, b));
}

/// The example alert rules parse, and they and the dashboard name only
/// metrics a real scrape has (with the journal on, so that its metrics
/// are there too).
#[tokio::test]
async fn contrib_rules_and_dashboard_name_existing_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let lab = metrics_lab(|c| c.journal.dir = Some(journal)).await;
    // The journal's start record, then a write's intent and outcome.
    let mut c = bound(&lab, ADMIN_DN, ADMIN_PW).await;
    assert_eq!(
        op(&mut c, modify(2, &user_dn(7), "description", "journaled"))
            .await
            .0,
        0
    );
    let s = scrape(&lab).await;
    assert_eq!(s.get("abproxy_journal_appends_total", &[]), 3.0);
    assert_eq!(
        s.get("abproxy_journal_append_duration_seconds_count", &[]),
        3.0
    );
    assert_eq!(s.get("abproxy_journal_append_failures_total", &[]), 0.0);
    assert!(s.get("abproxy_journal_syncs_total", &[]) >= 1.0);
    assert_eq!(s.get("abproxy_journal_failed", &[]), 0.0);
    let names = s.names();
    let root = env!("CARGO_MANIFEST_DIR");
    let rules = format!("{root}/contrib/prometheus/abproxy.rules.yml");
    let dashboard = format!("{root}/contrib/grafana/abproxy.json");
    let mut used = BTreeSet::new();
    for file in [&rules, &dashboard] {
        let text = std::fs::read_to_string(file).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("abproxy_") {
            let tail = &rest[i..];
            let end = tail
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .unwrap_or(tail.len());
            used.insert((file.clone(), tail[..end].to_string()));
            rest = &tail[end..];
        }
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard).unwrap())
            .expect("dashboard JSON");
    assert!(json["panels"].as_array().is_some_and(|p| !p.is_empty()));
    assert!(used.len() > 10, "{used:?}");
    let missing: Vec<_> = used.iter().filter(|(_, n)| !names.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "not in a scrape: {missing:?}\nscrape has {names:?}"
    );

    if !std::path::Path::new(PROMTOOL).exists() {
        testkit::skip("promtool not installed (apt-get install prometheus)");
        return;
    }
    let out = tokio::process::Command::new(PROMTOOL)
        .args(["check", "rules", &rules])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
