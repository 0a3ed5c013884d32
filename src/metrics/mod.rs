//! Monitoring: a Prometheus endpoint (`[metrics] listen`), served beside
//! the proxy on its runtime.
//!
//! - `GET /metrics`: the Prometheus text format (0.0.4), or OpenMetrics
//!   when the scraper's `Accept` asks for `application/openmetrics-text`;
//! - `GET /healthz`: 200 when the proxy accepts clients and the upstream
//!   accepts a connection within [`HEALTH_UPSTREAM_DEADLINE`], else 503
//!   with a one-line reason;
//! - `GET /readyz`: 200 while the proxy accepts clients (a freeze does not
//!   change it: held requests wait in the proxy's queues), 503 once it
//!   is shutting down.
//!
//! The values are counted where they happen, by whoever owns them (the
//! proxy's sessions in `proxy::metrics`, the freeze engine in
//! `freeze::stats`, the journal's writer) with relaxed atomics, and read
//! only here, at scrape time, by collectors ([`collect`]): nothing is
//! registered or formatted on the request path.

pub mod collect;
pub mod encode;
mod http;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use prometheus_client::collector::Collector;
use prometheus_client::registry::Registry;

pub use http::{bind, serve, Limits};

/// How long `/healthz` waits for the upstream to accept a connection.
pub const HEALTH_UPSTREAM_DEADLINE: Duration = Duration::from_secs(2);

/// Every metric of one proxy.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// The process's metrics (build, start time, CPU, memory, files); the
    /// proxy adds its own collectors.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(collect::Process::new()));
        Metrics { registry }
    }

    /// Adds a collector, read at every scrape.
    pub fn register(&mut self, c: impl Collector) {
        self.registry.register_collector(Box::new(c));
    }

    /// The exposition: OpenMetrics (`openmetrics`) or the Prometheus text
    /// format 0.0.4.
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let r = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        if let Err(e) = r {
            tracing::warn!("metrics: encoding failed: {e}");
        }
        out
    }
}

/// What `/healthz` and `/readyz` ask the proxy.
pub trait Health: Send + Sync + 'static {
    /// Whether the proxy accepts clients (why not).
    fn ready(&self) -> Result<(), String>;
    /// Whether it accepts clients and its upstream is reachable (why not).
    fn healthy(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// The content type of each format.
pub fn content_type(openmetrics: bool) -> &'static str {
    if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    }
}

/// Shared state of the endpoint.
pub(crate) struct Endpoint {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) health: Arc<dyn Health>,
}
