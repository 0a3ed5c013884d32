//! The freeze engine's place in the data flow.
//!
//! Every request a client sends passes [`Gate::admit`] between "envelope
//! read" and "sent upstream". Until the Allow-Backup engine lands the gate
//! passes everything; it is the single point where requests will be held.

use crate::wire::Envelope;

/// What the gate decides for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it upstream now.
    Forward,
}

/// The gate between clients and the upstream.
#[derive(Debug, Default)]
pub struct Gate {}

impl Gate {
    /// Decides what to do with a request whose envelope is `env`.
    #[inline]
    pub fn admit(&self, _env: &Envelope, _frame: &[u8]) -> Verdict {
        Verdict::Forward
    }
}
