//! What the proxy itself counts: connections per listener, refusals, TLS
//! handshakes, and per operation its requests, results, bytes and latency.
//!
//! Every value is a relaxed atomic at a fixed place, resolved when the
//! proxy starts (one slot per listener, per operation and result class):
//! a request costs a few relaxed increments and nothing else (no lock, no
//! allocation, no label formatting). The collector reads them at scrape
//! time. With metrics off, the sessions hold `None` and count nothing.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use crate::counters::{self, Histogram, HistogramSnapshot};
use crate::metrics::encode::{counter, counters, counters2, histograms};
use crate::wire::op;

/// Operations by label, in index order ([`op_index`]).
pub const OPS: [&str; 11] = [
    "bind", "unbind", "search", "modify", "add", "delete", "modrdn", "compare", "abandon",
    "extended", "other",
];

/// The index in [`OPS`] of a request's protocolOp tag.
#[inline]
pub fn op_index(tag: u8) -> usize {
    match tag {
        op::BIND_REQUEST => 0,
        op::UNBIND_REQUEST => 1,
        op::SEARCH_REQUEST => 2,
        op::MODIFY_REQUEST => 3,
        op::ADD_REQUEST => 4,
        op::DEL_REQUEST => 5,
        op::MODDN_REQUEST => 6,
        op::COMPARE_REQUEST => 7,
        op::ABANDON_REQUEST => 8,
        op::EXTENDED_REQUEST => 9,
        _ => 10,
    }
}

/// Result code classes by label, in index order ([`result_class`]).
pub const RESULTS: [&str; 9] = [
    "success",
    "referral",
    "attribute_error",
    "name_error",
    "security_error",
    "service_error",
    "update_error",
    "protocol_error",
    "other",
];

/// The class in [`RESULTS`] of an LDAP result code (RFC 4511 appendix
/// A): success with compareFalse, compareTrue and saslBindInProgress
/// (not failures); `None` (no result code read) is `other`.
#[inline]
pub fn result_class(code: Option<i64>) -> usize {
    match code {
        Some(0 | 5 | 6 | 14) => 0,
        Some(10) => 1,
        Some(16..=21) => 2,
        Some(32..=36) => 3,
        Some(7 | 8 | 13 | 48..=50) => 4,
        Some(3 | 4 | 11 | 51..=54) => 5,
        Some(64..=69 | 71) => 6,
        Some(1 | 2 | 12) => 7,
        _ => 8,
    }
}

/// Why a client connection was refused, in label order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections`.
    Limit,
    /// `max_connections_per_source`.
    Source,
    /// The TLS handshake of an `ldaps://` listener failed.
    Tls,
    /// The upstream could not be reached.
    Upstream,
}

const REFUSALS: [&str; 4] = ["limit", "source", "tls", "upstream"];

/// A TLS handshake's kind, in label order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    Ldaps,
    StartTls,
}

const HANDSHAKES: [&str; 2] = ["ldaps", "starttls"];

/// One listener's connections.
#[derive(Debug)]
struct Listener {
    name: String,
    accepted: AtomicU64,
    open: AtomicI64,
}

/// The proxy's counters (see the module's text).
#[derive(Debug)]
pub struct ProxyMetrics {
    listeners: Box<[Listener]>,
    refused: [AtomicU64; 4],
    upstream_connect_failures: AtomicU64,
    handshakes: [AtomicU64; 2],
    handshake_failures: [AtomicU64; 2],
    requests: [AtomicU64; 11],
    request_bytes: AtomicU64,
    response_bytes: AtomicU64,
    results: [[AtomicU64; 9]; 11],
    latency: [Histogram; 11],
}

impl ProxyMetrics {
    /// Counters for these listeners (by their URLs, in order).
    pub fn new(listeners: impl IntoIterator<Item = String>) -> ProxyMetrics {
        ProxyMetrics {
            listeners: listeners
                .into_iter()
                .map(|name| Listener {
                    name,
                    accepted: AtomicU64::new(0),
                    open: AtomicI64::new(0),
                })
                .collect(),
            refused: Default::default(),
            upstream_connect_failures: AtomicU64::new(0),
            handshakes: Default::default(),
            handshake_failures: Default::default(),
            requests: Default::default(),
            request_bytes: AtomicU64::new(0),
            response_bytes: AtomicU64::new(0),
            results: Default::default(),
            latency: std::array::from_fn(|_| Histogram::latency()),
        }
    }

    /// A connection was accepted on listener `i`.
    pub fn accepted(&self, i: usize) {
        counters::inc(&self.listeners[i].accepted);
    }

    /// A session opened (`true`) or ended on listener `i`.
    pub fn open(&self, i: usize, yes: bool) {
        let d = if yes { 1 } else { -1 };
        self.listeners[i].open.fetch_add(d, Ordering::Relaxed);
    }

    /// A connection was refused.
    pub fn refused(&self, why: Refusal) {
        counters::inc(&self.refused[why as usize]);
    }

    /// A connection to the upstream failed (or timed out).
    pub fn upstream_connect_failed(&self) {
        counters::inc(&self.upstream_connect_failures);
    }

    /// A TLS handshake with a client ended.
    pub fn handshake(&self, kind: Handshake, ok: bool) {
        counters::inc(&self.handshakes[kind as usize]);
        if !ok {
            counters::inc(&self.handshake_failures[kind as usize]);
        }
    }

    /// A request of `bytes` was read from a client: two relaxed increments.
    #[inline]
    pub fn request(&self, tag: u8, bytes: usize) {
        counters::inc(&self.requests[op_index(tag)]);
        counters::add(&self.request_bytes, bytes as u64);
    }

    /// A response of `bytes` came from the server: one relaxed increment.
    #[inline]
    pub fn response(&self, bytes: usize) {
        counters::add(&self.response_bytes, bytes as u64);
    }

    /// A request's final response came after `latency`: three relaxed
    /// increments.
    #[inline]
    pub fn completed(&self, tag: u8, code: Option<i64>, latency: Duration) {
        let o = op_index(tag);
        counters::inc(&self.results[o][result_class(code)]);
        self.latency[o].observe(latency);
    }
}

type R = Result<(), std::fmt::Error>;

impl Collector for ProxyMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> R {
        counters(
            &mut e,
            "abproxy_connections_accepted",
            "Client connections accepted, per listener (refused ones included).",
            "listener",
            self.listeners
                .iter()
                .map(|l| (l.name.as_str(), counters::get(&l.accepted))),
        )?;
        let mut m = e.encode_descriptor(
            "abproxy_connections_open",
            "Client sessions open now, per listener.",
            None,
            MetricType::Gauge,
        )?;
        for l in self.listeners.iter() {
            m.encode_family(&[("listener", l.name.as_str())])?
                .encode_gauge(&l.open.load(Ordering::Relaxed))?;
        }
        counters(
            &mut e,
            "abproxy_connections_refused",
            "Client connections refused, by reason: limit (max_connections), source \
             (max_connections_per_source), tls (ldaps handshake failed), upstream (the \
             server could not be reached).",
            "reason",
            REFUSALS
                .iter()
                .copied()
                .zip(self.refused.iter().map(counters::get)),
        )?;
        counter(
            &mut e,
            "abproxy_upstream_connect_failures",
            "Connections to the LDAP server that failed or timed out (for new clients).",
            counters::get(&self.upstream_connect_failures),
        )?;
        counters(
            &mut e,
            "abproxy_tls_handshakes",
            "TLS handshakes with clients, by kind (ldaps, starttls).",
            "kind",
            HANDSHAKES
                .iter()
                .copied()
                .zip(self.handshakes.iter().map(counters::get)),
        )?;
        counters(
            &mut e,
            "abproxy_tls_handshake_failures",
            "TLS handshakes with clients that failed, by kind.",
            "kind",
            HANDSHAKES
                .iter()
                .copied()
                .zip(self.handshake_failures.iter().map(counters::get)),
        )?;
        counters(
            &mut e,
            "abproxy_requests",
            "Requests read from clients, by operation.",
            "op",
            OPS.iter()
                .copied()
                .zip(self.requests.iter().map(counters::get)),
        )?;
        counter(
            &mut e,
            "abproxy_request_bytes",
            "Bytes of the requests read from clients.",
            counters::get(&self.request_bytes),
        )?;
        counter(
            &mut e,
            "abproxy_response_bytes",
            "Bytes of the responses read from the server.",
            counters::get(&self.response_bytes),
        )?;
        counters2(
            &mut e,
            "abproxy_operations",
            "Operations the server answered, by operation and result code class.",
            ["op", "result"],
            OPS.iter().enumerate().flat_map(|(o, op)| {
                RESULTS
                    .iter()
                    .enumerate()
                    .map(move |(r, res)| ([*op, *res], counters::get(&self.results[o][r])))
            }),
        )?;
        let snaps: Vec<HistogramSnapshot> = self.latency.iter().map(Histogram::snapshot).collect();
        histograms(
            &mut e,
            "abproxy_operation_duration_seconds",
            "Time from a request being sent to the server to its final response, by \
             operation (held requests from their release).",
            "op",
            OPS.iter().copied().zip(snaps.iter()),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_ops() {
        assert_eq!(RESULTS[result_class(Some(0))], "success");
        assert_eq!(RESULTS[result_class(Some(6))], "success");
        assert_eq!(RESULTS[result_class(Some(32))], "name_error");
        assert_eq!(RESULTS[result_class(Some(49))], "security_error");
        assert_eq!(RESULTS[result_class(Some(53))], "service_error");
        assert_eq!(RESULTS[result_class(Some(68))], "update_error");
        assert_eq!(RESULTS[result_class(None)], "other");
        assert_eq!(OPS[op_index(op::SEARCH_REQUEST)], "search");
        assert_eq!(OPS[op_index(op::MODDN_REQUEST)], "modrdn");
        assert_eq!(OPS[op_index(0x01)], "other");
    }

    #[test]
    fn scrape_shows_what_was_counted() {
        let m = std::sync::Arc::new(ProxyMetrics::new(["ldap://127.0.0.1:1".to_string()]));
        m.accepted(0);
        m.open(0, true);
        m.request(op::SEARCH_REQUEST, 40);
        m.response(100);
        m.completed(op::SEARCH_REQUEST, Some(0), Duration::from_millis(2));
        m.completed(op::MODIFY_REQUEST, Some(32), Duration::from_millis(1));
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(m.clone()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for line in [
            "abproxy_connections_accepted_total{listener=\"ldap://127.0.0.1:1\"} 1",
            "abproxy_connections_open{listener=\"ldap://127.0.0.1:1\"} 1",
            "abproxy_requests_total{op=\"search\"} 1",
            "abproxy_request_bytes_total 40",
            "abproxy_response_bytes_total 100",
            "abproxy_operations_total{op=\"search\",result=\"success\"} 1",
            "abproxy_operations_total{op=\"modify\",result=\"name_error\"} 1",
            "abproxy_operation_duration_seconds_bucket{le=\"0.0025\",op=\"search\"} 1",
            "abproxy_operation_duration_seconds_count{op=\"search\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
