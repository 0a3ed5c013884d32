//! The TLS section of the load benchmark (`--workloads tls`): slapd's own
//! TLS (its `ldaps://` listener) against abproxy terminating TLS on its
//! `ldaps://` listener (clear to slapd, as when both run on one host), and
//! against abproxy in the mirror mode (`tls.upstream_mirror`: TLS to
//! slapd's `ldaps://` too, two TLS hops), in the same run, interleaved like
//! the other points.
//!
//! * `connect`: closed-loop clients each open a TCP connection, run a full
//!   TLS handshake (no session resumption: the client's cache is off), send
//!   an anonymous bind, read its answer, unbind and close: new TLS
//!   connections per second, what a client pool without keep-alive costs.
//! * `search`: one TLS connection per client, the `search` workload over it.
//!
//! The certificates come from a throwaway CA (`testkit::ca`, EC P-256);
//! TLS 1.3 on both (rustls client; slapd uses GnuTLS).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abproxy::wire::{Envelope, FrameCodec};
use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use testkit::ca::TestCa;
use testkit::SlapdTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Decoder;

use crate::stats::{fmt_opt, median, pct_us};
use crate::workload::{frame_into, simple_bind, Kind, Workload};

/// The CA and certificates, in a temporary directory kept for the run.
pub struct Pki {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub slapd: SlapdTls,
    pub proxy: (PathBuf, PathBuf),
}

pub fn pki() -> Result<Pki> {
    let dir = tempfile::Builder::new()
        .prefix("abp-bench-pki-")
        .tempdir_in("/tmp")?;
    let ca = TestCa::new(dir.path(), "ca")?;
    let (cert, key) = ca.server("slapd")?;
    let proxy = ca.server("proxy")?;
    Ok(Pki {
        ca: ca.ca_file(),
        slapd: SlapdTls {
            cert_file: cert,
            key_file: key,
            ca_file: ca.ca_file(),
        },
        proxy,
        _dir: dir,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Test {
    Connect,
    Search,
}

impl Test {
    fn name(self) -> &'static str {
        match self {
            Test::Connect => "connect",
            Test::Search => "search",
        }
    }
}

/// Direct (slapd's TLS), through abproxy (clear to slapd), through abproxy
/// in the mirror mode (TLS to slapd).
const TARGETS: [&str; 3] = ["direct", "abproxy", "mirror"];

#[derive(Default)]
struct Agg {
    ops: Vec<f64>,
    lat: Vec<u64>,
    errors: Vec<String>,
}

/// Everything measured, over rounds.
#[derive(Default)]
pub struct TlsResults {
    /// (test, conns, target index) -> aggregate.
    cells: BTreeMap<(Test, usize, usize), Agg>,
    /// (test, conns, target index) -> per-round target/direct ratio.
    ratios: BTreeMap<(Test, usize, usize), Vec<f64>>,
}

fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every handshake a full one, on both targets.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// A TLS LDAP connection: pre-encoded requests out, frames in.
struct TlsConn {
    s: TlsStream<TcpStream>,
    buf: BytesMut,
    codec: FrameCodec,
    out: Vec<u8>,
    next_id: i32,
}

impl TlsConn {
    async fn connect(addr: SocketAddr, tls: &TlsConnector) -> Result<TlsConn> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("127.0.0.1").expect("an IP address");
        let s = tls.connect(name, tcp).await.context("TLS handshake")?;
        Ok(TlsConn {
            s,
            buf: BytesMut::with_capacity(16 * 1024),
            codec: FrameCodec::default(),
            out: Vec::with_capacity(512),
            next_id: 1,
        })
    }

    /// One request, up to its final response, which must be a success.
    async fn call(&mut self, op_tlv: &[u8]) -> Result<()> {
        let id = self.next_id;
        self.next_id = if id == i32::MAX { 1 } else { id + 1 };
        frame_into(&mut self.out, id, op_tlv);
        self.s.write_all(&self.out).await?;
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                let env = Envelope::response(&frame)?;
                if env.msgid == id && abproxy::wire::op::is_final_response(env.op) {
                    return match env.result_code {
                        Some(0) => Ok(()),
                        c => bail!("result code {c:?}"),
                    };
                }
                continue;
            }
            if self.s.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed by the server");
            }
        }
    }

    async fn close(mut self) {
        frame_into(
            &mut self.out,
            self.next_id,
            &[abproxy::wire::op::UNBIND_REQUEST, 0x00],
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.s.write_all(&self.out).await;
            let _ = self.s.shutdown().await;
        })
        .await;
    }
}

/// What the clients of one point share.
#[derive(Clone)]
struct Spec {
    test: Test,
    addr: SocketAddr,
    tls: TlsConnector,
    search: Arc<Workload>,
    conns: usize,
    start: Instant,
    warm_end: Instant,
    end: Instant,
}

/// One closed-loop client of a point: latencies (ns) after the warm-up.
async fn client(spec: Spec, idx: usize) -> (Vec<u64>, Option<String>) {
    let Spec {
        test,
        addr,
        tls,
        search,
        conns,
        start,
        warm_end,
        end,
    } = spec;
    let mut lat = Vec::with_capacity(16_384);
    tokio::time::sleep_until(start.into()).await;
    let anonymous = simple_bind("", "");
    let limit = Duration::from_secs(5);
    let mut conn = None;
    let n = search.ops.len();
    let mut i = 0usize;
    loop {
        let t = Instant::now();
        if t >= end {
            break;
        }
        let step = async {
            match test {
                Test::Connect => {
                    let mut c = TlsConn::connect(addr, &tls).await?;
                    c.call(&anonymous).await?;
                    c.close().await;
                }
                Test::Search => {
                    if conn.is_none() {
                        conn = Some(TlsConn::connect(addr, &tls).await?);
                    }
                    let k = (idx + i * conns) % n;
                    conn.as_mut()
                        .expect("just set")
                        .call(&search.ops[k])
                        .await?;
                }
            }
            anyhow::Ok(())
        };
        match tokio::time::timeout(limit, step).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return (lat, Some(format!("{}: {e:#}", test.name()))),
            Err(_) => {
                return (
                    lat,
                    Some(format!("{}: no answer within {limit:?}", test.name())),
                )
            }
        }
        i += 1;
        // The first search of a connection includes its handshake: only
        // measured after the warm-up anyway.
        if t >= warm_end {
            lat.push(t.elapsed().as_nanos() as u64);
        }
    }
    if let Some(c) = conn {
        c.close().await;
    }
    (lat, None)
}

async fn point(
    test: Test,
    addr: SocketAddr,
    tls: &TlsConnector,
    search: &Arc<Workload>,
    conns: usize,
    warmup: Duration,
    secs: Duration,
) -> (f64, Vec<u64>, Vec<String>) {
    let start = Instant::now() + Duration::from_millis(50);
    let warm_end = start + warmup;
    let end = warm_end + secs;
    let spec = Spec {
        test,
        addr,
        tls: tls.clone(),
        search: search.clone(),
        conns,
        start,
        warm_end,
        end,
    };
    let tasks: Vec<_> = (0..conns)
        .map(|idx| tokio::spawn(client(spec.clone(), idx)))
        .collect();
    let mut lat = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok((l, e)) => {
                lat.extend(l);
                errors.extend(e);
            }
            Err(e) => errors.push(format!("client task: {e}")),
        }
    }
    let ops = lat.len() as f64 / secs.as_secs_f64();
    (ops, lat, errors)
}

/// One round of the section: each test and connection count, both targets
/// back to back (order rotating with the round).
#[allow(clippy::too_many_arguments)]
pub async fn run_round(
    round: usize,
    conns_list: &[usize],
    users: usize,
    warmup: Duration,
    secs: Duration,
    ca: &Path,
    addrs: [SocketAddr; 3],
    results: &mut TlsResults,
) -> Result<()> {
    let tls = TlsConnector::from(client_config(ca)?);
    let search = Arc::new(Workload::new(Kind::Search, users));
    for test in [Test::Connect, Test::Search] {
        for &conns in conns_list {
            let mut order = [0usize, 1, 2];
            order.rotate_left(round % 3);
            let mut ops = [0.0f64; 3];
            for t in order {
                let (o, lat, errors) =
                    point(test, addrs[t], &tls, &search, conns, warmup, secs).await;
                let mut sorted = lat.clone();
                sorted.sort_unstable();
                eprintln!(
                    "load: round {} tls {:>7} conns={:<3} {:>8}: {:>9.0} ops/s  p50 {:>6} µs  p99 {:>6} µs{}",
                    round + 1,
                    test.name(),
                    conns,
                    TARGETS[t],
                    o,
                    fmt_opt(pct_us(&sorted, 50.0), 0),
                    fmt_opt(pct_us(&sorted, 99.0), 0),
                    errors
                        .first()
                        .map(|e| format!("  ({} errors: {e})", errors.len()))
                        .unwrap_or_default()
                );
                let agg = results.cells.entry((test, conns, t)).or_default();
                if o > 0.0 {
                    agg.ops.push(o);
                }
                agg.lat.extend(lat);
                agg.errors.extend(errors);
                ops[t] = o;
            }
            if ops[0] > 0.0 {
                for t in 1..TARGETS.len() {
                    results
                        .ratios
                        .entry((test, conns, t))
                        .or_default()
                        .push(ops[t] / ops[0]);
                }
            }
        }
    }
    Ok(())
}

impl TlsResults {
    /// The markdown table and any errors.
    pub fn table(&mut self, conns_list: &[usize]) -> String {
        for a in self.cells.values_mut() {
            a.lat.sort_unstable();
        }
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| TLS workload | conns | slapd TLS ops/s | abproxy TLS ops/s | mirror TLS ops/s | abproxy/slapd | mirror/slapd | slapd p50/p99 µs | abproxy p50/p99 µs | mirror p50/p99 µs |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for test in [Test::Connect, Test::Search] {
            for &c in conns_list {
                let cell = |t: usize| self.cells.get(&(test, c, t));
                let ops = |t: usize| cell(t).and_then(|a| median(&mut a.ops.clone()));
                let p = |t: usize, q: f64| cell(t).and_then(|a| pct_us(&a.lat, q));
                let ratio = |t: usize| {
                    self.ratios
                        .get(&(test, c, t))
                        .and_then(|v| median(&mut v.clone()))
                };
                let _ = writeln!(
                    s,
                    "| {} | {c} | {} | {} | {} | {} | {} | {} / {} | {} / {} | {} / {} |",
                    test.name(),
                    fmt_opt(ops(0), 0),
                    fmt_opt(ops(1), 0),
                    fmt_opt(ops(2), 0),
                    fmt_opt(ratio(1), 3),
                    fmt_opt(ratio(2), 3),
                    fmt_opt(p(0, 50.0), 0),
                    fmt_opt(p(0, 99.0), 0),
                    fmt_opt(p(1, 50.0), 0),
                    fmt_opt(p(1, 99.0), 0),
                    fmt_opt(p(2, 50.0), 0),
                    fmt_opt(p(2, 99.0), 0),
                );
            }
        }
        let errors: Vec<String> = self
            .cells
            .iter()
            .filter(|(_, a)| !a.errors.is_empty())
            .map(|((test, c, t), a)| {
                format!(
                    "- tls {} conns={c} {}: {} error(s), first: {}",
                    test.name(),
                    TARGETS[*t],
                    a.errors.len(),
                    a.errors[0]
                )
            })
            .collect();
        if !errors.is_empty() {
            let _ = writeln!(s, "\nTLS errors:\n{}", errors.join("\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let mut r = TlsResults::default();
        let agg = |ops: &[f64], lat_us: &[u64], errors: &[&str]| Agg {
            ops: ops.to_vec(),
            lat: lat_us.iter().map(|us| us * 1000).collect(),
            errors: errors.iter().map(|e| e.to_string()).collect(),
        };
        r.cells.insert(
            (Test::Connect, 1, 0),
            agg(&[100.0, 300.0], &[900, 800], &[]),
        );
        r.cells.insert(
            (Test::Connect, 1, 1),
            agg(&[150.0], &[700], &["connect: TLS handshake"]),
        );
        r.cells
            .insert((Test::Connect, 1, 2), agg(&[120.0], &[1000], &[]));
        r.ratios.insert((Test::Connect, 1, 1), vec![1.5, 0.5, 2.0]);
        r.ratios.insert((Test::Connect, 1, 2), vec![0.6]);
        let t = r.table(&[1]);
        let rows: Vec<&str> = t.lines().collect();
        assert_eq!(
            rows[0],
            "| TLS workload | conns | slapd TLS ops/s | abproxy TLS ops/s | mirror TLS ops/s | abproxy/slapd | mirror/slapd | slapd p50/p99 µs | abproxy p50/p99 µs | mirror p50/p99 µs |"
        );
        // Latencies are sorted by the table itself.
        assert_eq!(
            rows[2],
            "| connect | 1 | 200 | 150 | 120 | 1.500 | 0.600 | 800 / 900 | 700 / 700 | 1000 / 1000 |"
        );
        assert_eq!(
            rows[3],
            "| search | 1 | - | - | - | - | - | - / - | - / - | - / - |"
        );
        assert_eq!(
            &rows[4..],
            [
                "",
                "TLS errors:",
                "- tls connect conns=1 abproxy: 1 error(s), first: connect: TLS handshake"
            ]
        );
    }
}
