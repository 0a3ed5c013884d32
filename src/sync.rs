//! Locking a mutex whose holder may have panicked.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, also when a thread panicked while holding it: every mutex
/// of the crate guards data left consistent between statements (a counter,
/// a list, a buffer), so a panic elsewhere does not make it unusable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
