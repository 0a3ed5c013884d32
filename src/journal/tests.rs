//! The journal's files: appends, sequence, segments, a torn tail.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::reader::{read_segment, segments};
use super::writer::PREALLOC_BYTES;
use super::*;

fn settings(dir: &Path, segment_bytes: u64) -> JournalSettings {
    JournalSettings {
        dir: dir.to_path_buf(),
        durability: Durability::Ack,
        segment_bytes,
        retention: None,
    }
}

fn intent(n: u32) -> Body {
    Body::Intent {
        identity: format!("cn=w{n},dc=example,dc=org"),
        request: n.to_le_bytes().repeat(5),
    }
}

/// Every record of the journal in `dir`, in file order.
fn all(dir: &Path) -> Vec<Record> {
    segments(dir)
        .unwrap()
        .iter()
        .flat_map(|(_, p)| {
            let s = read_segment(p).unwrap();
            assert!(s.damage.is_none(), "{:?}", s.damage);
            s.records
        })
        .collect()
}

#[tokio::test]
async fn appends_are_numbered_kept_and_continue_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let j = Journal::open(&settings(&dir, 1 << 20)).unwrap();
    let a = j.append(7, intent(1)).unwrap();
    let b = j
        .append(
            7,
            Body::Outcome {
                intent: a,
                result: 0,
                response: vec![9; 3],
            },
        )
        .unwrap();
    assert_eq!((a, b), (2, 3), "1 is the start record");
    j.synced(b).await.unwrap();
    assert!(j.durable_seq() >= b);
    j.close();
    assert!(matches!(j.append(1, intent(2)), Err(JournalError::Closed)));

    let j = Journal::open(&settings(&dir, 1 << 20)).unwrap();
    let c = j.append(8, intent(3)).unwrap();
    j.close();
    let recs = all(&dir);
    let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert_eq!(c, 5);
    assert!(
        matches!(recs[3].body, Body::Start { .. }),
        "a new run starts"
    );
    assert_eq!(recs[1].body, intent(1));
    assert_eq!(recs[1].conn, 7);
    assert_eq!(recs[4].body, intent(3));
    // Two runs, two segments.
    assert_eq!(segments(&dir).unwrap().len(), 2);
    // What clients wrote is readable by the proxy's user only.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for (_, p) in segments(&dir).unwrap() {
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
}

#[tokio::test]
async fn a_torn_tail_is_cut_at_start_up_and_numbering_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let j = Journal::open(&settings(&dir, 1 << 20)).unwrap();
    for n in 0..3 {
        j.append(1, intent(n)).unwrap();
    }
    j.close();
    let (_, last) = segments(&dir).unwrap().pop().unwrap();
    let good = std::fs::metadata(&last).unwrap().len();
    // A crash in the middle of a record: part of one written.
    let mut torn = Record {
        seq: 5,
        time_us: 0,
        conn: 1,
        body: intent(9),
    }
    .encode();
    torn.truncate(torn.len() - 3);
    let mut bytes = std::fs::read(&last).unwrap();
    bytes.extend_from_slice(&torn);
    std::fs::write(&last, &bytes).unwrap();
    assert!(read_segment(&last).unwrap().damage.is_some());

    let j = Journal::open(&settings(&dir, 1 << 20)).unwrap();
    assert_eq!(std::fs::metadata(&last).unwrap().len(), good, "tail cut");
    let next = j.append(1, intent(10)).unwrap();
    j.close();
    assert_eq!(next, 6, "4 was the last intact record, 5 the new start");
    let seqs: Vec<u64> = all(&dir).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_segment_cut_inside_its_header_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let j = Journal::open(&settings(&dir, 1 << 20)).unwrap();
    j.append(1, intent(1)).unwrap();
    j.close();
    // A crash as the next run created its segment.
    let half = dir.join(reader::segment_name(3));
    std::fs::write(&half, &b"ABPXJRNL"[..5]).unwrap();
    let j = Journal::open(&settings(&dir, 1 << 20)).unwrap();
    j.close();
    let seqs: Vec<u64> = all(&dir).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
}

#[tokio::test]
async fn segments_rotate_by_size_with_no_gap() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let j = Journal::open(&settings(&dir, 300)).unwrap();
    for n in 0..40 {
        j.append(1, intent(n)).unwrap();
    }
    let last = j.append(1, intent(99)).unwrap();
    j.synced(last).await.unwrap();
    j.close();
    let segs = segments(&dir).unwrap();
    assert!(segs.len() > 5, "{} segments", segs.len());
    let mut expect = 1;
    for (first, p) in &segs {
        let s = read_segment(p).unwrap();
        assert_eq!(*first, s.header.first_seq);
        assert_eq!(s.records[0].seq, *first);
        assert!(s.file_len <= 300 || s.records.len() == 1, "{}", s.file_len);
        for r in s.records {
            assert_eq!(r.seq, expect);
            expect += 1;
        }
    }
    assert_eq!(expect, last + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_are_all_kept_in_sequence_order() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let j = Journal::open(&settings(&dir, 4096)).unwrap();
    let tasks: Vec<_> = (0..8u32)
        .map(|w| {
            let j = Arc::clone(&j);
            tokio::spawn(async move {
                let mut mine = Vec::new();
                for n in 0..50 {
                    let seq = j.append(w as u64, intent(w * 1000 + n)).unwrap();
                    // ack: each waits for its own record to be synced.
                    j.durable(seq, seq).await.unwrap();
                    mine.push(seq);
                }
                mine
            })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        assert!(mine.windows(2).all(|p| p[0] < p[1]), "a writer's own order");
        seen.extend(mine);
    }
    j.close();
    seen.sort();
    assert_eq!(seen, (2..=401).collect::<Vec<_>>());
    let recs = all(&dir);
    assert_eq!(recs.len(), 401);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
        if let Body::Intent { identity, .. } = &r.body {
            // conn w wrote cn=w(w*1000+n).
            let n: u64 = identity[4..identity.find(',').unwrap()].parse().unwrap();
            assert_eq!(n / 1000, r.conn);
        }
    }
}

#[tokio::test]
async fn interval_durability_does_not_wait_and_syncs_in_the_background() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let j = Journal::open(&JournalSettings {
        durability: Durability::Interval(Duration::from_millis(5)),
        ..settings(&dir, 1 << 20)
    })
    .unwrap();
    let seq = j.append(1, intent(1)).unwrap();
    j.durable(seq, seq).await.unwrap();
    // Synced on demand (a cut) without waiting for the interval.
    j.synced(seq).await.unwrap();
    assert!(j.durable_seq() >= seq);
    j.close();
}

#[test]
fn config_turns_into_settings() {
    let c: JournalConfig = toml::from_str("dir = \"/var/lib/abproxy/journal\"").unwrap();
    let s = c.settings().unwrap().unwrap();
    assert_eq!(s.durability, Durability::Ack);
    assert_eq!(s.segment_bytes, 64 << 20);
    let c: JournalConfig =
        toml::from_str("dir = \"/j\"\ndurability = \"interval\"\nsync_interval_ms = 20").unwrap();
    assert_eq!(
        c.settings().unwrap().unwrap().durability,
        Durability::Interval(Duration::from_millis(20))
    );
    let c: JournalConfig = toml::from_str("dir = \"/j\"\ndurability = \"request\"").unwrap();
    assert_eq!(
        c.settings().unwrap().unwrap().durability,
        Durability::Request(Duration::from_millis(100))
    );
    assert_eq!(JournalConfig::default().settings().unwrap(), None);
    let rel: JournalConfig = toml::from_str("dir = \"j\"").unwrap();
    assert!(rel.settings().unwrap_err().contains("absolute"));
    assert!(toml::from_str::<JournalConfig>("durability = \"never\"").is_err());
    let zero: JournalConfig = toml::from_str("dir = \"/j\"\nsegment_mb = 0").unwrap();
    assert!(zero.settings().is_err());
}

#[tokio::test]
async fn retention_removes_closed_segments_older_than_it_never_the_last() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    // Three runs: three segments.
    for n in 0..3 {
        let j = Journal::open(&settings(&dir, 1 << 20)).unwrap();
        j.append(1, intent(n)).unwrap();
        j.close();
    }
    let segs = segments(&dir).unwrap();
    assert_eq!(segs.len(), 3);
    // Segment 2 created a day ago: segment 1 (all before it) expires.
    let mut bytes = std::fs::read(&segs[1].1).unwrap();
    let day_ago = record::now_us() - 86_400_000_000;
    bytes[24..32].copy_from_slice(&day_ago.to_le_bytes());
    std::fs::write(&segs[1].1, bytes).unwrap();
    let removed = writer::expire(&dir, record::now_us() - 3_600_000_000).unwrap();
    assert_eq!(removed, vec![segs[0].1.clone()]);
    // Nothing is older than an hour any more; the last never goes.
    assert!(writer::expire(&dir, record::now_us() + 1).unwrap().len() == 1);
    assert_eq!(segments(&dir).unwrap().len(), 1);
    // A journal opened with a retention keeps what is recent.
    let j = Journal::open(&JournalSettings {
        retention: Some(Duration::from_secs(86_400)),
        ..settings(&dir, 1 << 20)
    })
    .unwrap();
    j.close();
    assert_eq!(segments(&dir).unwrap().len(), 2);
}

#[tokio::test]
async fn request_durability_syncs_a_request_as_it_goes_and_its_outcome_later() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let j = Journal::open(&JournalSettings {
        durability: Durability::Request(Duration::from_millis(20)),
        ..settings(&dir, 1 << 20)
    })
    .unwrap();
    // Nobody waits: the intent is synced all the same (while the server
    // would run the write).
    let i = j.append(1, intent(1)).unwrap();
    tokio::time::timeout(Duration::from_secs(10), j.synced_by_itself(i))
        .await
        .expect("the intent synced without a waiter");
    // Its outcome: the client waits for the intent only.
    let o = j
        .append(
            1,
            Body::Outcome {
                intent: i,
                result: 0,
                response: vec![],
            },
        )
        .unwrap();
    j.durable(i, o).await.unwrap();
    // ... and the outcome follows within the interval, unasked.
    tokio::time::timeout(Duration::from_secs(10), j.synced_by_itself(o))
        .await
        .expect("the outcome synced within its interval");
    j.close();
}

/// The active segment as a crash would leave it: a copy of `dir` taken
/// while its journal is open.
fn crash_image(dir: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for (_, p) in segments(dir).unwrap() {
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[tokio::test]
async fn segments_are_preallocated_and_their_unused_zeros_are_no_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("j");
    let j = Journal::open(&settings(&dir, 4 << 20)).unwrap();
    for n in 0..3 {
        j.append(1, intent(n)).unwrap();
    }
    let (_, active) = segments(&dir).unwrap().pop().unwrap();
    let seg = read_segment(&active).unwrap();
    assert!(seg.damage.is_none(), "{:?}", seg.damage);
    assert_eq!(seg.records.len(), 4);
    assert_eq!(seg.file_len, PREALLOC_BYTES, "zeros ahead of the records");
    assert_eq!(seg.unused, seg.file_len - seg.good_len);

    // A crash: the next start cuts the unused zeros and goes on.
    let image = tmp.path().join("image");
    crash_image(&dir, &image);
    let j2 = Journal::open(&settings(&image, 4 << 20)).unwrap();
    j2.close();
    let first = &segments(&image).unwrap()[0].1;
    assert_eq!(std::fs::metadata(first).unwrap().len(), seg.good_len);
    assert_eq!(
        all(&image).iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=5).collect::<Vec<_>>()
    );

    // Half a record written into the zeros is a torn tail, cut.
    let torn_dir = tmp.path().join("torn");
    crash_image(&dir, &torn_dir);
    let torn_seg = torn_dir.join(active.file_name().unwrap());
    let torn = Record {
        seq: 5,
        time_us: 0,
        conn: 1,
        body: intent(9),
    }
    .encode();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&torn_seg)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &torn[..torn.len() / 2], seg.good_len).unwrap();
    let damaged = read_segment(&torn_seg).unwrap();
    assert!(damaged.damage.is_some());
    assert_eq!((damaged.good_len, damaged.unused), (seg.good_len, 0));
    Journal::open(&settings(&torn_dir, 4 << 20))
        .unwrap()
        .close();
    assert_eq!(std::fs::metadata(&torn_seg).unwrap().len(), seg.good_len);

    // Records past the first chunk: more zeros are written ahead.
    let big = Body::Intent {
        identity: String::new(),
        request: vec![7; PREALLOC_BYTES as usize],
    };
    j.append(1, big).unwrap();
    let s = read_segment(&active).unwrap();
    assert!(s.damage.is_none());
    assert_eq!(s.records.len(), 5);
    assert!(s.file_len > s.good_len, "{} {}", s.file_len, s.good_len);
    // A closed segment holds its records only.
    j.close();
    assert_eq!(
        std::fs::metadata(&active).unwrap().len(),
        read_segment(&active).unwrap().good_len
    );
}
