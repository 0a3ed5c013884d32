//! Appending to the journal, and making what was appended durable.
//!
//! Every append is one `write(2)` to the active segment under a mutex,
//! done by the session that has the record: once it returns, the record
//! is in the kernel and survives the proxy being killed. A sync thread
//! makes appended records durable (`fdatasync`), as many as were appended
//! since its last sync at once (group commit across sessions), and
//! publishes the highest durable sequence number; in `ack` mode a session
//! waits for it before the client sees a write's success.
//!
//! Segments are preallocated with zeros ahead of the records
//! ([`PREALLOC_BYTES`] at a time): a record then overwrites blocks the
//! file already has, and `fdatasync` writes the record's page without a
//! file system journal commit for a new size (on ext4 here: 102-121 us
//! per append and sync instead of 257-302 us). The reader takes zeros
//! after the last record for unused space; a closed segment is cut to
//! its records.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use super::reader::{self, segment_name};
use super::record::{now_us, Body, Header, Record, HEADER_LEN};
use crate::counters::{self, Histogram, HistogramSnapshot};

/// Zeros written ahead of the records at a time (at most up to the
/// segment's size).
pub const PREALLOC_BYTES: u64 = 1 << 20;

/// When an appended record counts as kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The write's outcome on disk (synced) before the client sees it.
    Ack,
    /// The write's request on disk before the client sees its result (its
    /// sync starts as the request goes upstream, alongside the server's
    /// own work); its outcome is synced with the next sync, at most this
    /// long after.
    Request(Duration),
    /// Synced every so often: a power loss may lose what came since.
    Interval(Duration),
}

/// How the journal is kept (`[journal]`, built).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSettings {
    pub dir: PathBuf,
    pub durability: Durability,
    /// A segment is closed and a new one started beyond this size.
    pub segment_bytes: u64,
    /// Closed segments whose every record is older than this are removed
    /// (at start-up and at each new segment). `None`: kept until pruned.
    pub retention: Option<Duration>,
}

/// Why the journal could not record something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// Writing failed (the disk is full, an I/O error): nothing of the
    /// record was kept, and the journal goes on with the next one.
    #[error("the journal could not write to {path}: {why}")]
    Write { path: PathBuf, why: String },
    /// A sync failed: what was written may be lost, so the journal
    /// records nothing more until the proxy is restarted.
    #[error("the journal failed to sync {path} ({why}) and records nothing more until abproxy is restarted")]
    Failed { path: PathBuf, why: String },
    /// The journal was closed (the proxy is stopping).
    #[error("the journal is closed")]
    Closed,
    /// Opening the journal directory failed.
    #[error("cannot open the journal in {path}: {why}")]
    Open { path: PathBuf, why: String },
}

/// What the sync thread publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Synced {
    /// Every record up to this sequence number is durable.
    seq: u64,
    /// The sync failed (sticky).
    failed: Option<JournalError>,
}

struct Active {
    file: Arc<File>,
    path: PathBuf,
    /// Bytes of the segment that hold whole records.
    len: u64,
    /// Bytes of the segment written (records, then preallocated zeros).
    written: u64,
    /// Preallocating failed in this segment (a full disk): records are
    /// appended without it until the next segment.
    no_prealloc: bool,
    next_seq: u64,
    /// The last sequence number appended.
    appended: u64,
    failed: Option<JournalError>,
    closing: bool,
    buf: Vec<u8>,
    /// The highest sequence number a session waits to see synced: in
    /// `ack` mode the sync thread syncs only for these (an intent, which
    /// no one waits for, is synced with the next outcome).
    wanted: u64,
}

/// The journal a proxy appends to.
pub struct Journal {
    dir: PathBuf,
    durability: Durability,
    segment_bytes: u64,
    retention: Option<Duration>,
    active: Mutex<Active>,
    wake: Condvar,
    synced: watch::Sender<Synced>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    stats: Stats,
}

/// What the journal counts for monitoring (`crate::metrics` reads it at
/// scrape time): appends and syncs as they happen, no work of its own.
#[derive(Debug)]
struct Stats {
    appends: AtomicU64,
    append_bytes: AtomicU64,
    append_failures: AtomicU64,
    append_latency: Histogram,
    syncs: AtomicU64,
    sync_failures: AtomicU64,
    sync_latency: Histogram,
}

/// The journal's counters, read at one moment.
#[derive(Debug, Clone)]
pub struct JournalStats {
    /// Records appended, and their bytes.
    pub appends: u64,
    pub append_bytes: u64,
    /// Appends that failed (a write error, a failed journal, closed).
    pub append_failures: u64,
    /// Time each append took (the `write(2)`, a segment rotation).
    pub append_latency: HistogramSnapshot,
    /// `fdatasync`s of the sync thread (group commits) and rotations.
    pub syncs: u64,
    pub sync_failures: u64,
    pub sync_latency: HistogramSnapshot,
    /// The journal failed (a sync failed) and records nothing more.
    pub failed: bool,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).finish()
    }
}

fn open_err(path: &Path, e: impl std::fmt::Display) -> JournalError {
    JournalError::Open {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates segment `first_seq` in `dir` with its header, synced.
fn new_segment(dir: &Path, first_seq: u64) -> std::io::Result<(File, PathBuf)> {
    let path = dir.join(segment_name(first_seq));
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&path)?;
    let header = Header {
        first_seq,
        created_us: now_us(),
    };
    file.write_all_at(&header.encode(), 0)?;
    file.sync_data()?;
    sync_dir(dir)?;
    Ok((file, path))
}

/// Removes the closed segments of `dir` whose every record is older than
/// `cutoff_us` (the next segment was created before it); the last segment
/// always stays. The removed files.
pub fn expire(dir: &Path, cutoff_us: i64) -> std::io::Result<Vec<PathBuf>> {
    use std::io::Read;
    let segs = reader::segments(dir)?;
    let mut removed = Vec::new();
    for pair in segs.windows(2) {
        let mut header = [0u8; HEADER_LEN];
        let next = File::open(&pair[1].1).and_then(|mut f| f.read_exact(&mut header));
        let created = match next.ok().and_then(|()| Header::decode(&header).ok()) {
            Some(h) => h.created_us,
            None => break,
        };
        if created >= cutoff_us {
            break;
        }
        std::fs::remove_file(&pair[0].1)?;
        info!(segment = %pair[0].1.display(), "journal: segment removed (retention_days)");
        removed.push(pair[0].1.clone());
    }
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Cuts the segment at `path` to `len` bytes, synced.
fn cut(path: &Path, len: u64) -> Result<(), JournalError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| open_err(path, e))?;
    f.set_len(len).map_err(|e| open_err(path, e))?;
    f.sync_all().map_err(|e| open_err(path, e))
}

/// The last sequence number in `dir`'s journal (0: none), after cutting a
/// torn tail off the last segment.
fn recover(dir: &Path) -> Result<u64, JournalError> {
    let segments = reader::segments(dir).map_err(|e| open_err(dir, e))?;
    let Some((first, path)) = segments.last() else {
        return Ok(0);
    };
    let meta = std::fs::metadata(path).map_err(|e| open_err(path, e))?;
    if meta.len() < HEADER_LEN as u64 {
        // Created, never given its whole header: it holds no record.
        warn!(
            segment = %path.display(),
            bytes = meta.len(),
            "journal: removing a segment cut short inside its header (a crash as it was created)"
        );
        std::fs::remove_file(path).map_err(|e| open_err(path, e))?;
        sync_dir(dir).map_err(|e| open_err(dir, e))?;
        return Ok(first.saturating_sub(1));
    }
    let seg = reader::read_segment(path).map_err(|e| open_err(path, e))?;
    if let Some(damage) = &seg.damage {
        warn!(
            segment = %path.display(),
            offset = seg.good_len,
            bytes = seg.file_len - seg.good_len,
            "journal: cutting a torn tail ({damage}) after the last intact record"
        );
        cut(path, seg.good_len)?;
    } else if seg.unused > 0 {
        // Preallocated and never used: a segment left open by a crash.
        cut(path, seg.good_len)?;
    }
    Ok(match seg.records.last() {
        Some(r) => r.seq,
        None => seg.header.first_seq.saturating_sub(1),
    })
}

impl Journal {
    /// Opens (creating it if needed) the journal in `settings.dir`: cuts a
    /// torn tail left by a crash, starts a new segment and records a
    /// start record, and starts the sync thread.
    pub fn open(settings: &JournalSettings) -> Result<Arc<Journal>, JournalError> {
        let dir = &settings.dir;
        std::fs::create_dir_all(dir).map_err(|e| open_err(dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| open_err(dir, e))?;
        let last = recover(dir)?;
        let (file, path) = new_segment(dir, last + 1).map_err(|e| open_err(dir, e))?;
        if let Some(keep) = settings.retention {
            expire(dir, now_us() - keep.as_micros() as i64).map_err(|e| open_err(dir, e))?;
        }
        let journal = Arc::new(Journal {
            dir: dir.clone(),
            durability: settings.durability,
            segment_bytes: settings.segment_bytes.max(HEADER_LEN as u64 + 1),
            retention: settings.retention,
            active: Mutex::new(Active {
                file: Arc::new(file),
                path,
                len: HEADER_LEN as u64,
                written: HEADER_LEN as u64,
                no_prealloc: false,
                next_seq: last + 1,
                appended: last,
                failed: None,
                closing: false,
                buf: Vec::new(),
                wanted: last,
            }),
            wake: Condvar::new(),
            synced: watch::Sender::new(Synced {
                seq: last,
                failed: None,
            }),
            thread: Mutex::new(None),
            stats: Stats {
                appends: AtomicU64::new(0),
                append_bytes: AtomicU64::new(0),
                append_failures: AtomicU64::new(0),
                append_latency: Histogram::latency(),
                syncs: AtomicU64::new(0),
                sync_failures: AtomicU64::new(0),
                sync_latency: Histogram::latency(),
            },
        });
        let j = Arc::clone(&journal);
        let handle = std::thread::Builder::new()
            .name("abproxy-journal".into())
            .spawn(move || j.sync_loop())
            .map_err(|e| open_err(dir, e))?;
        *journal.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        let start = journal.append(
            0,
            Body::Start {
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
            },
        )?;
        info!(dir = %dir.display(), first = start, "journal open");
        Ok(journal)
    }

    /// The directory it writes to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    fn lock(&self) -> MutexGuard<'_, Active> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a record; its sequence number. Once this returns the record
    /// is in the kernel (it survives the proxy, not a power loss: see
    /// [`Journal::durable`]).
    pub fn append(&self, conn: u64, body: Body) -> Result<u64, JournalError> {
        let started = Instant::now();
        let r = self.append_record(conn, body);
        let s = &self.stats;
        match &r {
            Ok(_) => {
                counters::inc(&s.appends);
                s.append_latency.observe(started.elapsed());
            }
            Err(_) => counters::inc(&s.append_failures),
        }
        r
    }

    /// The counters, now.
    pub fn stats(&self) -> JournalStats {
        let s = &self.stats;
        JournalStats {
            appends: counters::get(&s.appends),
            append_bytes: counters::get(&s.append_bytes),
            append_failures: counters::get(&s.append_failures),
            append_latency: s.append_latency.snapshot(),
            syncs: counters::get(&s.syncs),
            sync_failures: counters::get(&s.sync_failures),
            sync_latency: s.sync_latency.snapshot(),
            failed: self.synced.borrow().failed.is_some(),
        }
    }

    fn append_record(&self, conn: u64, body: Body) -> Result<u64, JournalError> {
        let mut a = self.lock();
        if let Some(e) = &a.failed {
            return Err(e.clone());
        }
        if a.closing {
            return Err(JournalError::Closed);
        }
        let seq = a.next_seq;
        let intent = matches!(body, Body::Intent { .. });
        let record = Record {
            seq,
            time_us: now_us(),
            conn,
            body,
        };
        let mut buf = std::mem::take(&mut a.buf);
        buf.clear();
        record.encode_into(&mut buf);
        if a.len > HEADER_LEN as u64 && a.len + buf.len() as u64 > self.segment_bytes {
            if let Err(e) = self.rotate(&mut a, seq) {
                a.buf = buf;
                return Err(e);
            }
        }
        let n = buf.len() as u64;
        if a.len + n > a.written && !a.no_prealloc {
            self.preallocate(&mut a, n);
        }
        let written = a.file.write_all_at(&buf, a.len);
        a.buf = buf;
        if let Err(e) = written {
            // Nothing of a record that was not written whole may stay: the
            // next one starts where this one did.
            a.written = a.len;
            let (why, cut) = match a.file.set_len(a.len) {
                Ok(()) => (e.to_string(), true),
                Err(e2) => (
                    format!("{e}; and cutting what was written failed: {e2}"),
                    false,
                ),
            };
            let err = JournalError::Write {
                path: a.path.clone(),
                why,
            };
            if !cut {
                a.failed = Some(err.clone());
            }
            return Err(err);
        }
        a.len += n;
        a.written = a.written.max(a.len);
        counters::add(&self.stats.append_bytes, n);
        a.next_seq += 1;
        a.appended = seq;
        if intent && matches!(self.durability, Durability::Request(_)) {
            // Synced while the server runs the write.
            a.wanted = seq;
            drop(a);
            self.wake.notify_one();
        }
        Ok(seq)
    }

    /// Writes zeros after the records, for at least the next `n` bytes,
    /// up to the next multiple of [`PREALLOC_BYTES`] within the segment's
    /// size. On a
    /// failure (a full disk) what it wrote is cut off again and the
    /// segment goes on without.
    fn preallocate(&self, a: &mut Active, n: u64) {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let end = a.len + n;
        let want = end
            .next_multiple_of(PREALLOC_BYTES)
            .min(self.segment_bytes.max(end));
        let mut at = a.written;
        while at < want {
            let k = (want - at).min(ZEROS.len() as u64);
            if let Err(e) = a.file.write_all_at(&ZEROS[..k as usize], at) {
                warn!(
                    segment = %a.path.display(),
                    "journal: preallocating failed ({e}); appending without until the next segment"
                );
                a.no_prealloc = true;
                if a.file.set_len(a.len).is_ok() {
                    a.written = a.len;
                }
                return;
            }
            at += k;
        }
        a.written = want;
    }

    /// Closes the active segment (cut to its records, synced) and starts
    /// segment `first_seq`.
    fn rotate(&self, a: &mut Active, first_seq: u64) -> Result<(), JournalError> {
        let old = a.path.clone();
        let failed = |e: std::io::Error| JournalError::Write {
            path: old.clone(),
            why: format!("starting a new segment: {e}"),
        };
        Self::finish_segment(a).map_err(|e| JournalError::Failed {
            path: a.path.clone(),
            why: e.to_string(),
        })?;
        let (file, path) = new_segment(&self.dir, first_seq).map_err(failed)?;
        a.file = Arc::new(file);
        a.path = path;
        a.len = HEADER_LEN as u64;
        a.written = a.len;
        a.no_prealloc = false;
        if let Some(keep) = self.retention {
            if let Err(e) = expire(&self.dir, now_us() - keep.as_micros() as i64) {
                warn!("journal: removing expired segments failed: {e}");
            }
        }
        Ok(())
    }

    /// Cuts the active segment's unused preallocated space and syncs it.
    fn finish_segment(a: &mut Active) -> std::io::Result<()> {
        if a.written > a.len {
            a.file.set_len(a.len)?;
            a.written = a.len;
        }
        a.file.sync_data()
    }

    /// Waits until a write whose intent is record `intent` and outcome
    /// record `outcome` is as durable as its client may see its result:
    /// the outcome synced (`ack`), the intent synced (`request`), or at
    /// once (`interval`). An error: it may not be.
    pub async fn durable(&self, intent: u64, outcome: u64) -> Result<(), JournalError> {
        match self.durability {
            Durability::Ack => self.synced(outcome).await,
            Durability::Request(_) => self.synced(intent).await,
            Durability::Interval(_) => Ok(()),
        }
    }

    /// Waits until record `seq` is synced, whatever the durability (a cut:
    /// a backup relies on it). An error: it may not be.
    pub async fn synced(&self, seq: u64) -> Result<(), JournalError> {
        if self.durable_seq() < seq {
            // The sync thread syncs for the records waited for (`ack`),
            // or waits for its interval unless told.
            let mut a = self.lock();
            a.wanted = a.wanted.max(seq);
            drop(a);
            self.wake.notify_one();
        }
        let mut rx = self.synced.subscribe();
        let s = rx
            .wait_for(|s| s.seq >= seq || s.failed.is_some())
            .await
            .map_err(|_| JournalError::Closed)?;
        match (&s.failed, s.seq >= seq) {
            (_, true) => Ok(()),
            (Some(e), false) => Err(e.clone()),
            (None, false) => unreachable!("waited for one of the two"),
        }
    }

    /// Waits, without asking for a sync, until record `seq` is synced.
    #[cfg(test)]
    pub(crate) async fn synced_by_itself(&self, seq: u64) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| s.seq >= seq).await;
    }

    /// The highest sequence number known durable.
    pub fn durable_seq(&self) -> u64 {
        self.synced.borrow().seq
    }

    /// The last sequence number appended.
    pub fn last_seq(&self) -> u64 {
        self.lock().appended
    }

    fn sync_loop(&self) {
        let mut synced = self.synced.borrow().seq;
        loop {
            let (file, path, upto) = {
                let mut a = self.lock();
                let mut timed_out = false;
                loop {
                    // `ack`, `request`: when a session waits (group commit:
                    // the sync covers everything appended by then), and
                    // for `request` the rest once its interval passed;
                    // `interval`: whatever was appended.
                    let due = match self.durability {
                        Durability::Ack => a.wanted > synced,
                        Durability::Request(_) => {
                            a.wanted > synced || (timed_out && a.appended > synced)
                        }
                        Durability::Interval(_) => a.appended > synced,
                    };
                    if due {
                        break;
                    }
                    if a.closing {
                        return;
                    }
                    a = match self.durability {
                        Durability::Ack => self.wake.wait(a).unwrap_or_else(|e| e.into_inner()),
                        Durability::Request(d) | Durability::Interval(d) => {
                            let (a, t) = self
                                .wake
                                .wait_timeout(a, d)
                                .unwrap_or_else(|e| e.into_inner());
                            timed_out = t.timed_out();
                            a
                        }
                    };
                }
                (Arc::clone(&a.file), a.path.clone(), a.appended)
            };
            let started = Instant::now();
            let r = file.sync_data();
            self.stats.sync_latency.observe(started.elapsed());
            counters::inc(&self.stats.syncs);
            if let Err(e) = r {
                counters::inc(&self.stats.sync_failures);
                let err = JournalError::Failed {
                    path,
                    why: e.to_string(),
                };
                tracing::error!("{err}");
                self.lock().failed = Some(err.clone());
                self.synced.send_modify(|s| s.failed = Some(err));
                return;
            }
            synced = upto;
            self.synced.send_modify(|s| s.seq = upto);
            if let Durability::Interval(d) = self.durability {
                // At most one sync per interval; a close ends the wait.
                let a = self.lock();
                if !a.closing {
                    let _ = self.wake.wait_timeout(a, d);
                }
            }
        }
    }

    /// Syncs what was appended and stops the sync thread (which holds the
    /// journal until then); later appends fail with [`JournalError::Closed`].
    pub fn close(&self) {
        {
            let mut a = self.lock();
            a.closing = true;
        }
        self.wake.notify_all();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        let mut a = self.lock();
        if a.failed.is_none() {
            match Self::finish_segment(&mut a) {
                Ok(()) => self.synced.send_modify(|s| s.seq = a.appended),
                Err(e) => warn!("journal: the last sync of {} failed: {e}", a.path.display()),
            }
        }
    }
}
