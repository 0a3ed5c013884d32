//! What the freeze engine counts for monitoring: plain atomics updated
//! where each event happens (an ON's outcome, a drain's length, a driver
//! step), read by `crate::metrics` at scrape time through
//! [`Engine::snapshot`](super::Engine::snapshot). None of it is on the
//! request path: only ON, OFF, the lease and the per-connection queues
//! touch it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::counters::{self, Histogram};

/// How a freeze (or an ON that never became one) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Released by OFF, every driver's DONE step succeeded.
    Success,
    /// ON refused before anything was set up (not authorised, busy, no
    /// such backend, unimplemented, a partial freeze the driver refuses,
    /// a bad request).
    Refused,
    /// ON failed: in-flight writes outlasted the drain time limit (or reads
    /// could not be abandoned).
    DrainTimeout,
    /// ON failed at a driver's PREPARE step, or OFF's DONE step failed.
    DriverFailure,
    /// The lease ran out before OFF.
    Expired,
    /// The holder's connection ended (holdUntilUnbind).
    HolderGone,
    /// abproxy shut down while frozen.
    Shutdown,
    /// ON failed otherwise (the journal's cut, the freeze ended while ON
    /// ran).
    Failed,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 8] = [
        Outcome::Success,
        Outcome::Refused,
        Outcome::DrainTimeout,
        Outcome::DriverFailure,
        Outcome::Expired,
        Outcome::HolderGone,
        Outcome::Shutdown,
        Outcome::Failed,
    ];

    /// Its label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Refused => "refused",
            Outcome::DrainTimeout => "drain_timeout",
            Outcome::DriverFailure => "driver_failure",
            Outcome::Expired => "expired",
            Outcome::HolderGone => "holder_gone",
            Outcome::Shutdown => "shutdown",
            Outcome::Failed => "failed",
        }
    }
}

/// Driver steps, in label order.
pub const STEPS: [&str; 2] = ["prepare", "done"];

/// The engine's counters.
#[derive(Debug)]
pub struct FreezeStats {
    origin: Instant,
    outcomes: [AtomicU64; 8],
    pub(super) drain: Histogram,
    pub(super) frozen: Histogram,
    pub(super) steps: [Histogram; 2],
    pub(super) step_failures: [AtomicU64; 2],
    pub(super) lease_expiries: AtomicU64,
    held: AtomicU64,
    released: AtomicU64,
    /// When the queues last went from empty to holding something, in
    /// microseconds since `origin` plus one (0: empty).
    held_since: AtomicU64,
}

impl Default for FreezeStats {
    fn default() -> Self {
        FreezeStats {
            origin: Instant::now(),
            outcomes: Default::default(),
            drain: Histogram::phase(),
            frozen: Histogram::phase(),
            steps: [Histogram::phase(), Histogram::phase()],
            step_failures: Default::default(),
            lease_expiries: AtomicU64::new(0),
            held: AtomicU64::new(0),
            released: AtomicU64::new(0),
            held_since: AtomicU64::new(0),
        }
    }
}

impl FreezeStats {
    pub(super) fn outcome(&self, o: Outcome) {
        counters::inc(&self.outcomes[o as usize]);
    }

    /// A request joined a queue that held `before` requests.
    pub(super) fn held(&self, before: usize) {
        counters::inc(&self.held);
        if before == 0 {
            let now = self.origin.elapsed().as_micros() as u64 + 1;
            self.held_since.store(now, Ordering::Relaxed);
        }
    }

    /// Requests left the queues, which now hold `left`.
    pub(super) fn unheld(&self, left: usize) {
        if left == 0 {
            self.held_since.store(0, Ordering::Relaxed);
        }
    }

    /// Held requests sent upstream once released.
    pub(super) fn released(&self, n: usize) {
        counters::add(&self.released, n as u64);
    }

    /// How long the queues have held something without emptying: the
    /// oldest held request's age as long as none was released meanwhile
    /// (a freeze releases everything at once).
    fn oldest_held(&self) -> Duration {
        match self.held_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            t => self
                .origin
                .elapsed()
                .saturating_sub(Duration::from_micros(t - 1)),
        }
    }
}

/// Everything the engine counts, read at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// `thawed`, `draining`, `frozen` or `releasing`.
    pub state: &'static str,
    /// Time since the current freeze's ON (zero when thawed).
    pub age: Duration,
    /// Counts per [`Outcome::ALL`].
    pub outcomes: [u64; 8],
    pub drain: counters::HistogramSnapshot,
    pub frozen: counters::HistogramSnapshot,
    /// Per [`STEPS`].
    pub steps: [counters::HistogramSnapshot; 2],
    pub step_failures: [u64; 2],
    pub lease_expiries: u64,
    /// Requests and bytes in the per-connection queues now.
    pub held_requests: usize,
    pub held_bytes: usize,
    /// Requests that joined a queue, and those sent on once released.
    pub held_total: u64,
    pub released_total: u64,
    pub oldest_held: Duration,
    /// Requests in flight upstream over all sessions.
    pub in_flight: usize,
    /// Sessions waiting to be carried to a restarted server, carried, not
    /// carried ([`Engine::carry_counts`](super::Engine::carry_counts)).
    pub carry: (usize, usize, usize),
}

impl FreezeStats {
    pub(super) fn snapshot(
        &self,
        (state, age): (&'static str, Duration),
        queued: (usize, usize),
        in_flight: usize,
        carry: (usize, usize, usize),
    ) -> Snapshot {
        Snapshot {
            state,
            age,
            outcomes: std::array::from_fn(|i| counters::get(&self.outcomes[i])),
            drain: self.drain.snapshot(),
            frozen: self.frozen.snapshot(),
            steps: [self.steps[0].snapshot(), self.steps[1].snapshot()],
            step_failures: std::array::from_fn(|i| counters::get(&self.step_failures[i])),
            lease_expiries: counters::get(&self.lease_expiries),
            held_requests: queued.0,
            held_bytes: queued.1,
            held_total: counters::get(&self.held),
            released_total: counters::get(&self.released),
            oldest_held: self.oldest_held(),
            in_flight,
            carry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn oldest_held_age_runs_while_the_queues_hold_something() {
        let s = FreezeStats::default();
        assert_eq!(s.oldest_held(), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(5)).await;
        s.held(0);
        tokio::time::advance(Duration::from_secs(20)).await;
        s.held(1);
        assert_eq!(s.oldest_held(), Duration::from_secs(20));
        // Some released, some left: the age goes on.
        s.unheld(1);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(s.oldest_held(), Duration::from_secs(21));
        s.unheld(0);
        assert_eq!(s.oldest_held(), Duration::ZERO);
        assert_eq!(counters::get(&s.held), 2);
    }
}
