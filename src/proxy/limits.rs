//! Connection limits: over all listeners and per source address.
//!
//! A connection over a limit is accepted only to be told why (a Notice of
//! Disconnection, `unavailable`) and closed: leaving it in the listen
//! backlog would make the client hang instead of fail.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts open client connections against `max_connections` and
/// `max_connections_per_source` (0: no limit).
#[derive(Debug)]
pub struct ConnLimits {
    max_total: usize,
    max_per_source: usize,
    open: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// `max_connections` reached.
    Total(usize),
    /// `max_connections_per_source` reached for this address.
    Source(IpAddr, usize),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Total(n) => write!(f, "too many connections ({n}, max_connections)"),
            Refused::Source(ip, n) => write!(
                f,
                "too many connections from {ip} ({n}, max_connections_per_source)"
            ),
        }
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Admitted {
    limits: Arc<ConnLimits>,
    source: Option<IpAddr>,
}

impl ConnLimits {
    /// Limits as configured (0: none).
    pub fn new(max_total: usize, max_per_source: usize) -> Self {
        ConnLimits {
            max_total,
            max_per_source,
            open: Mutex::new(Counts::default()),
        }
    }

    /// Admits a connection from `source` (None for unix sockets, which only
    /// the total limit applies to).
    pub fn admit(self: &Arc<Self>, source: Option<IpAddr>) -> Result<Admitted, Refused> {
        let mut c = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if self.max_total > 0 && c.total >= self.max_total {
            return Err(Refused::Total(self.max_total));
        }
        let source = source.filter(|_| self.max_per_source > 0);
        if let Some(ip) = source {
            let n = c.per_source.entry(ip).or_insert(0);
            if *n >= self.max_per_source {
                return Err(Refused::Source(ip, self.max_per_source));
            }
            *n += 1;
        }
        c.total += 1;
        Ok(Admitted {
            limits: self.clone(),
            source,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if let Some(ip) = self.source {
            if let Some(n) = c.per_source.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    c.per_source.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_and_per_source_limits_and_release_on_drop() {
        let l = Arc::new(ConnLimits::new(3, 2));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = l.admit(Some(a)).unwrap();
        let _a2 = l.admit(Some(a)).unwrap();
        assert_eq!(l.admit(Some(a)).unwrap_err(), Refused::Source(a, 2));
        let _b1 = l.admit(Some(b)).unwrap();
        assert_eq!(l.admit(Some(b)).unwrap_err(), Refused::Total(3));
        assert_eq!(l.admit(None).unwrap_err(), Refused::Total(3));
        drop(a1);
        assert_eq!(l.open(), 2);
        let _a3 = l.admit(Some(a)).unwrap();
        assert_eq!(l.open(), 3);
    }

    #[test]
    fn zero_means_no_limit() {
        let l = Arc::new(ConnLimits::new(0, 0));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let all: Vec<_> = (0..1000).map(|_| l.admit(Some(a)).unwrap()).collect();
        assert_eq!(l.open(), 1000);
        drop(all);
        assert_eq!(l.open(), 0);
        assert!(l.open.lock().unwrap().per_source.is_empty());
    }
}
