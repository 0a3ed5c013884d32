//! Reading a journal directory: its segments in order, their records, and
//! where one is damaged.

use std::path::{Path, PathBuf};

use super::record::{self, Damage, Header, Record, HEADER_LEN};

/// The file name suffix of a segment.
pub const SEGMENT_EXT: &str = "journal";

/// A segment's file name: its first sequence number, zero-padded so names
/// sort in sequence order.
pub fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.{SEGMENT_EXT}")
}

/// The segments of a journal directory, by first sequence number.
pub fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(&format!(".{SEGMENT_EXT}")) else {
            continue;
        };
        if let Ok(first) = stem.parse::<u64>() {
            out.push((first, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// One segment, read whole.
#[derive(Debug)]
pub struct Segment {
    pub path: PathBuf,
    pub header: Header,
    pub records: Vec<Record>,
    /// Where each record ends (the byte after it), in record order.
    pub ends: Vec<u64>,
    /// Bytes of the segment that hold its header and intact records.
    pub good_len: u64,
    /// The file's length.
    pub file_len: u64,
    /// Where the intact records end, when the rest is not a record.
    pub damage: Option<Damage>,
    /// Zero bytes after the last record: space the writer preallocated
    /// and has not used yet (the active segment), not damage.
    pub unused: u64,
}

/// A segment that cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Header { path: PathBuf, why: String },
}

/// Reads a segment: its header, then records until the end or the first
/// bytes that are not an intact record. Zeros from there to the end are
/// the writer's preallocated space (no record starts with a zero length),
/// not damage.
pub fn read_segment(path: &Path) -> Result<Segment, SegmentError> {
    let bytes = std::fs::read(path).map_err(|source| SegmentError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let header = Header::decode(&bytes).map_err(|why| SegmentError::Header {
        path: path.to_path_buf(),
        why,
    })?;
    let mut at = HEADER_LEN;
    let mut records = Vec::new();
    let mut ends = Vec::new();
    let mut damage = None;
    while at < bytes.len() {
        match record::decode(&bytes[at..]) {
            Ok((r, n)) => {
                records.push(r);
                at += n;
                ends.push(at as u64);
            }
            Err(d) => {
                if !bytes[at..].iter().all(|&b| b == 0) {
                    damage = Some(d);
                }
                break;
            }
        }
    }
    Ok(Segment {
        path: path.to_path_buf(),
        header,
        records,
        ends,
        good_len: at as u64,
        file_len: bytes.len() as u64,
        unused: if damage.is_none() {
            (bytes.len() - at) as u64
        } else {
            0
        },
        damage,
    })
}
