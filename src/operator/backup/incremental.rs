//! `backup --incremental --base DIR`: the proxy's journal since the base
//! backup's cut, up to this backup's own cut, instead of the data. A
//! restore is the base restored, then `journal replay --dir THIS --after
//! BASE` (and so on along the chain).

use std::path::Path;

use super::{exit, Fail, Log};
use crate::backup::manifest::{Incremental, Manifest, MANIFEST};
use crate::journal::reader::{read_segment, segment_name, segments};
use crate::journal::record::Body;

/// The base backup of an incremental one.
#[derive(Debug, Clone)]
pub(super) struct Base {
    pub(super) backup_id: String,
    pub(super) manifest_sha256: String,
    pub(super) cut: u64,
}

/// Reads the base backup's manifest (before the freeze: a base that names
/// no journal cut is refused at once).
pub(super) fn read_base(dir: &Path) -> Result<Base, Fail> {
    let step = "read the base backup";
    let m = Manifest::read(dir).map_err(|e| Fail::usage(step, e))?;
    let cut = m.freeze.journal_cut.ok_or_else(|| {
        Fail::usage(
            step,
            format!(
                "{}: the backup names no journal cut (taken while the proxy kept no journal): \
                 an incremental backup needs one",
                dir.display()
            ),
        )
    })?;
    let path = dir.join(MANIFEST);
    let (_, sha) =
        crate::backup::manifest::file_sha256(&path).map_err(|e| Fail::io(step, &path, e))?;
    Ok(Base {
        backup_id: m.backup_id,
        manifest_sha256: sha,
        cut,
    })
}

/// Copies the journal segments holding records `base.cut` to `cut` into
/// `tmp`, the last one cut right after record `cut` (the running proxy
/// goes on writing there), and checks that what was copied is whole.
pub(super) fn copy_segments(
    journal: &Path,
    base: &Base,
    cut: u64,
    freeze_id: Option<u64>,
    tmp: &Path,
    log: &mut Log,
) -> Result<Incremental, Fail> {
    let t = log.begin();
    let step = "copy the journal";
    let fail = |m: String| Fail::new(step, m, exit::BACKUP_FAILED);
    let all = segments(journal).map_err(|e| fail(format!("{}: {e}", journal.display())))?;
    // Segment i holds records first_i .. first_{i+1} - 1.
    let mut wanted = Vec::new();
    for (i, (first, path)) in all.iter().enumerate() {
        let last = all.get(i + 1).map(|(next, _)| next - 1);
        if *first <= cut && last.is_none_or(|l| l >= base.cut) {
            wanted.push((*first, path.clone()));
        }
    }
    if wanted.first().is_none_or(|(first, _)| *first > base.cut) {
        return Err(fail(format!(
            "the journal in {} no longer holds record {} (the base's cut): pruned?",
            journal.display(),
            base.cut
        )));
    }
    let mut names = Vec::new();
    let mut writes = 0u64;
    let mut expect = wanted[0].0;
    let mut seen_base = false;
    let mut seen_cut = false;
    for (first, path) in &wanted {
        let seg = read_segment(path).map_err(|e| fail(e.to_string()))?;
        let mut end = seg.good_len;
        for (r, &record_end) in seg.records.iter().zip(&seg.ends) {
            if r.seq != expect {
                return Err(fail(format!(
                    "{}: record {} follows {} (a gap)",
                    path.display(),
                    r.seq,
                    expect - 1
                )));
            }
            expect += 1;
            match &r.body {
                Body::Cut { .. } if r.seq == base.cut => seen_base = true,
                Body::Cut { freeze_id: f, .. } if r.seq == cut => {
                    if freeze_id.is_some_and(|id| id != *f) {
                        return Err(fail(format!(
                            "record {cut} is the cut of freeze {f}, not of this backup's freeze"
                        )));
                    }
                    seen_cut = true;
                }
                Body::Outcome {
                    intent, result: 0, ..
                } if *intent > base.cut && r.seq > base.cut && r.seq <= cut => writes += 1,
                _ => {}
            }
            if r.seq == cut {
                end = record_end;
                break;
            }
        }
        let bytes = std::fs::read(path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
        let name = segment_name(*first);
        super::write_file(tmp, &name, &bytes[..end as usize])?;
        names.push(name);
        if seen_cut {
            break;
        }
    }
    if !seen_base || !seen_cut {
        return Err(fail(format!(
            "the journal in {} does not hold both cuts ({} and {cut}): is it the journal of this proxy?",
            journal.display(),
            base.cut
        )));
    }
    log.end(
        t,
        step,
        &format!(
            "{} segment(s), records {}..{cut}, {writes} write(s) since {}",
            names.len(),
            base.cut,
            base.backup_id
        ),
    );
    Ok(Incremental {
        base_backup_id: base.backup_id.clone(),
        base_manifest_sha256: base.manifest_sha256.clone(),
        base_cut: base.cut,
        segments: names,
        writes,
    })
}
