//! The roll-forward journal: every write a client sent through the proxy,
//! with the server's answer, in the order the server answered, and a cut
//! at every freeze (see `docs/journal.md`).
//!
//! ```text
//! requests loop:  write admitted -> intent record (its seq kept in flight) -> upstream
//! responses loop: final response -> outcome record -> [ack: wait until synced] -> client
//! freeze engine:  drained and prepared -> cut record (synced) -> ON answered
//!                 (through `freeze::CutLog`, which `Journal` implements)
//! ```
//! `record` is the file format, `writer` appends and syncs, `reader` reads
//! segments back, `ldif` turns a write into an LDIF change record.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub mod ldif;
pub mod reader;
pub mod record;
pub mod replay;
pub mod writer;

pub use record::{Body, Record};
pub use writer::{Durability, Journal, JournalError, JournalSettings, JournalStats};

/// `[journal]` in the configuration file. The journal is on when `dir` is set.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct JournalConfig {
    /// Where the segments are written (created mode 0700; the files hold
    /// what clients wrote, passwords included, and are mode 0600).
    pub dir: Option<PathBuf>,
    /// `"ack"`: a write's outcome is synced to disk before the client sees
    /// its result. `"request"`: its request is (synced while the server
    /// runs it), its outcome within `sync_interval_ms`. `"interval"`:
    /// synced every `sync_interval_ms`.
    pub durability: DurabilityName,
    /// `interval` durability: how often the journal is synced.
    pub sync_interval_ms: u64,
    /// A new segment is started beyond this size, in MiB.
    pub segment_mb: u64,
    /// Closed segments whose every record is older than this many days
    /// are removed (0: kept until `abproxy journal prune`).
    pub retention_days: u64,
}

/// `durability` in `[journal]`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityName {
    #[default]
    Ack,
    Request,
    Interval,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            dir: None,
            durability: DurabilityName::Ack,
            sync_interval_ms: 100,
            segment_mb: 64,
            retention_days: 0,
        }
    }
}

impl JournalConfig {
    /// The settings, or `None` when the journal is off.
    pub fn settings(&self) -> Result<Option<JournalSettings>, String> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        if !dir.is_absolute() {
            return Err(format!(
                "journal.dir must be an absolute path: {}",
                dir.display()
            ));
        }
        if !(1..=65_536).contains(&self.segment_mb) {
            return Err("journal.segment_mb must be between 1 and 65536".into());
        }
        if !(1..=60_000).contains(&self.sync_interval_ms) {
            return Err("journal.sync_interval_ms must be between 1 and 60000".into());
        }
        let interval = Duration::from_millis(self.sync_interval_ms);
        let durability = match self.durability {
            DurabilityName::Ack => Durability::Ack,
            DurabilityName::Request => Durability::Request(interval),
            DurabilityName::Interval => Durability::Interval(interval),
        };
        Ok(Some(JournalSettings {
            dir: dir.clone(),
            durability,
            segment_bytes: self.segment_mb * 1024 * 1024,
            retention: (self.retention_days > 0)
                .then(|| Duration::from_secs(self.retention_days.min(100_000) * 86_400)),
        }))
    }
}

/// The journal records each freeze's cut for the freeze engine, synced
/// before ON answers.
impl crate::freeze::CutLog for Journal {
    fn cut<'a>(
        &'a self,
        freeze_id: u64,
        suffixes: &'a [String],
    ) -> futures::future::BoxFuture<'a, Result<u64, String>> {
        Box::pin(async move {
            let seq = self
                .append(
                    0,
                    Body::Cut {
                        freeze_id,
                        suffixes: suffixes.to_vec(),
                    },
                )
                .map_err(|e| e.to_string())?;
            self.synced(seq).await.map_err(|e| e.to_string())?;
            Ok(seq)
        })
    }
}

#[cfg(test)]
mod tests;
