//! `abproxy journal show` and `abproxy journal check`: the roll-forward
//! journal read back, offline (the files only; the proxy may be running).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::journal::reader::{read_segment, segment_name, segments};
use crate::journal::record::{Body, Record};
use crate::wire::{op, Envelope};

use super::exit;

pub mod resolve;

pub use crate::journal::replay::Bound;

/// A sequence number, or a UTC time (`2026-12-04T03:30:00Z`, fractions of
/// a second allowed).
impl std::str::FromStr for Bound {
    type Err = String;
    fn from_str(s: &str) -> Result<Bound, String> {
        if let Ok(n) = s.parse::<u64>() {
            return Ok(Bound::Seq(n));
        }
        parse_utc_us(s).map(Bound::Time).ok_or_else(|| {
            format!("{s:?} is neither a sequence number nor a UTC time like 2026-12-04T03:30:00Z")
        })
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` as microseconds since the epoch.
fn parse_utc_us(s: &str) -> Option<i64> {
    let body = s.strip_suffix('Z')?;
    let (whole, frac) = match body.split_once('.') {
        Some((w, f)) => (w, f),
        None => (body, ""),
    };
    if whole.len() != 19 || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs = super::backup::parse_utc_secs(&format!("{whole}Z"))? as i64;
    let us: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    Some(secs * 1_000_000 + us)
}

/// A record's time, `2026-12-04T03:30:00.123456Z`.
pub fn utc_us(us: i64) -> String {
    let secs = us.div_euclid(1_000_000) as u64;
    let s = super::format_utc(secs);
    format!(
        "{}.{:06}Z",
        s.trim_end_matches('Z'),
        us.rem_euclid(1_000_000)
    )
}

fn at_or_after(r: &Record, b: Bound) -> bool {
    match b {
        Bound::Seq(n) => r.seq >= n,
        Bound::Time(t) => r.time_us >= t,
    }
}

fn at_or_before(r: &Record, b: Bound) -> bool {
    match b {
        Bound::Seq(n) => r.seq <= n,
        Bound::Time(t) => r.time_us <= t,
    }
}

/// What `journal show` prints.
#[derive(Debug, Clone, Default)]
pub struct ShowOptions {
    pub from: Option<Bound>,
    pub until: Option<Bound>,
    /// LDIF change records of the successful writes, in the order the
    /// server answered them, instead of every record as text.
    pub ldif: bool,
}

/// The journal read whole: every intact record, and what is wrong with it.
pub struct Loaded {
    pub records: Vec<Record>,
    pub segments: usize,
    /// Damage: gaps, damaged records before the end, unreadable segments.
    pub problems: Vec<String>,
    /// A torn tail at the end of the last segment (the proxy cuts it at
    /// its next start): where.
    pub torn_tail: Option<String>,
}

/// Reads every segment of the journal in `dir`.
pub fn load(dir: &Path) -> Result<Loaded, String> {
    let segs =
        segments(dir).map_err(|e| format!("cannot read the journal in {}: {e}", dir.display()))?;
    if segs.is_empty() {
        return Err(format!("no journal segments in {}", dir.display()));
    }
    let mut out = Loaded {
        records: Vec::new(),
        segments: segs.len(),
        problems: Vec::new(),
        torn_tail: None,
    };
    let last = segs.len() - 1;
    for (i, (first, path)) in segs.iter().enumerate() {
        let seg = match read_segment(path) {
            Ok(s) => s,
            Err(e) => {
                out.problems.push(e.to_string());
                continue;
            }
        };
        if seg.header.first_seq != *first {
            out.problems.push(format!(
                "{}: its header says it starts at {} (renamed? expected {})",
                path.display(),
                seg.header.first_seq,
                segment_name(seg.header.first_seq)
            ));
        }
        if let Some(d) = &seg.damage {
            let at = format!(
                "{} at byte {} of {} ({d})",
                path.display(),
                seg.good_len,
                seg.file_len
            );
            if i == last {
                out.torn_tail = Some(at);
            } else {
                out.problems.push(format!(
                    "damaged record in {at}: the records after it in that segment are lost"
                ));
            }
        }
        out.records.extend(seg.records);
    }
    // From the first record there is (segments before it may be pruned).
    let mut expect = out.records.first().map_or(1, |r| r.seq);
    for r in &out.records {
        if r.seq != expect {
            out.problems.push(format!(
                "gap: record {} follows {} (records {}..{} are missing)",
                r.seq,
                expect - 1,
                expect,
                r.seq.saturating_sub(1)
            ));
        }
        expect = r.seq + 1;
    }
    Ok(out)
}

/// The operation of a request, by name (`add`, `modify`, ...).
fn op_name(request: &[u8]) -> &'static str {
    Envelope::op_of(request).map_or("?", op::name)
}

fn describe_request(request: &[u8]) -> String {
    match Envelope::request(request) {
        Ok(env) => {
            let dn = env
                .dn_bytes(request)
                .map(|d| String::from_utf8_lossy(d).into_owned());
            let oid = env
                .oid_bytes(request)
                .map(|o| String::from_utf8_lossy(o).into_owned());
            let target = dn.or(oid).unwrap_or_default();
            format!(
                "{} {target} (message {}, {} bytes)",
                op::name(env.op),
                env.msgid,
                request.len()
            )
        }
        Err(_) => format!("{} ({} bytes, unreadable)", op_name(request), request.len()),
    }
}

/// One record as a line of text.
pub fn line(r: &Record) -> String {
    let head = format!("{:>8} {} conn {:<5}", r.seq, utc_us(r.time_us), r.conn);
    let what = match &r.body {
        Body::Start { version, pid } => format!("start     abproxy {version}, pid {pid}"),
        Body::Intent { identity, request } => {
            let who = if identity.is_empty() {
                "anonymous"
            } else {
                identity
            };
            format!("intent    {} as {who}", describe_request(request))
        }
        Body::Outcome { intent, result, .. } => {
            format!("outcome   of {intent}: {}", result_name(*result))
        }
        Body::Lost { intent, why } => format!("lost      {intent}: {why}"),
        Body::Cut {
            freeze_id,
            suffixes,
        } => format!("cut       freeze {freeze_id}: {}", suffixes.join("; ")),
    };
    format!("{head} {what}")
}

fn result_name(code: i32) -> String {
    match (code, super::code_name(code as u32)) {
        (-1, _) => "no result code".into(),
        (_, "error") => code.to_string(),
        (_, name) => format!("{code} {name}"),
    }
}

/// `journal show`: the records in the range as text, or the successful
/// writes as LDIF. The exit status.
pub fn show(dir: &Path, opts: &ShowOptions, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let loaded = match load(dir) {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(err, "abproxy journal show: {e}");
            return exit::JOURNAL_DAMAGED;
        }
    };
    for p in &loaded.problems {
        let _ = writeln!(err, "abproxy journal show: {p}");
    }
    let in_range = |r: &Record| {
        opts.from.is_none_or(|b| at_or_after(r, b)) && opts.until.is_none_or(|b| at_or_before(r, b))
    };
    let written = if opts.ldif {
        show_ldif(&loaded.records, &in_range, out, err)
    } else {
        let mut ok = true;
        for r in loaded.records.iter().filter(|r| in_range(r)) {
            ok &= writeln!(out, "{}", line(r)).is_ok();
        }
        ok.then_some(exit::OK)
    };
    match written {
        None => {
            let _ = writeln!(err, "abproxy journal show: cannot write the output");
            exit::FAILED
        }
        Some(code) if loaded.problems.is_empty() => code,
        Some(_) => exit::JOURNAL_DAMAGED,
    }
}

/// The successful writes answered in the range, as LDIF change records in
/// the order the server answered them. `None`: the output failed.
fn show_ldif(
    records: &[Record],
    in_range: &dyn Fn(&Record) -> bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Option<u8> {
    let intents: HashMap<u64, &Record> = records
        .iter()
        .filter(|r| matches!(r.body, Body::Intent { .. }))
        .map(|r| (r.seq, r))
        .collect();
    let mut code = exit::OK;
    writeln!(out, "version: 1\n").ok()?;
    for r in records.iter().filter(|r| in_range(r)) {
        let (intent_seq, response) = match &r.body {
            Body::Outcome {
                intent,
                result: 0,
                response,
            } => (*intent, response),
            Body::Lost { intent, why } => {
                let _ = writeln!(
                    err,
                    "abproxy journal show: write {intent} is indeterminate (its answer never came: {why}); not in the LDIF"
                );
                writeln!(out, "# {intent}: indeterminate ({why}): not included\n").ok()?;
                code = exit::JOURNAL_INCOMPLETE;
                continue;
            }
            _ => continue,
        };
        let Some(intent) = intents.get(&intent_seq) else {
            let _ = writeln!(
                err,
                "abproxy journal show: the outcome {} names intent {intent_seq}, which is not in the journal (pruned?)",
                r.seq
            );
            code = exit::JOURNAL_INCOMPLETE;
            continue;
        };
        let Body::Intent { identity, request } = &intent.body else {
            unreachable!("only intents are in the map")
        };
        writeln!(
            out,
            "# {} (answered {}) {} conn {} as {}",
            intent.seq,
            r.seq,
            utc_us(r.time_us),
            intent.conn,
            if identity.is_empty() {
                "anonymous"
            } else {
                identity
            }
        )
        .ok()?;
        match crate::journal::ldif::change_record(request, Some(response), identity) {
            Ok(text) => out.write_all(text.as_bytes()).ok()?,
            Err(e) => {
                let _ = writeln!(err, "abproxy journal show: write {}: {e}", intent.seq);
                writeln!(out, "# {}: {e}: not included\n", intent.seq).ok()?;
                code = exit::JOURNAL_INCOMPLETE;
            }
        }
    }
    Some(code)
}

/// `journal check`: continuity, damage, cuts and indeterminate writes.
/// The exit status.
pub fn check(dir: &Path, out: &mut dyn Write) -> u8 {
    let loaded = match load(dir) {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(out, "abproxy journal check: {e}");
            return exit::JOURNAL_DAMAGED;
        }
    };
    let recs = &loaded.records;
    let answered: HashMap<u64, i32> = recs
        .iter()
        .filter_map(|r| match &r.body {
            Body::Outcome { intent, result, .. } => Some((*intent, *result)),
            _ => None,
        })
        .collect();
    // What replay would meet as indeterminate (lost, or left unanswered
    // by a run of the proxy that ended), in intent order.
    let mut indeterminate: Vec<(&Record, String)> =
        crate::journal::replay::plan(recs, &Default::default())
            .into_iter()
            .filter_map(|item| match item {
                crate::journal::replay::Item::Indeterminate { intent, why, .. } => {
                    Some((intent, why.to_string()))
                }
                crate::journal::replay::Item::Write { .. } => None,
            })
            .collect();
    indeterminate.sort_by_key(|(r, _)| r.seq);
    let unknown: std::collections::HashSet<u64> =
        indeterminate.iter().map(|(r, _)| r.seq).collect();
    let (mut ok, mut failed) = (0usize, 0usize);
    let mut running = Vec::new();
    for r in recs {
        if let Body::Intent { .. } = &r.body {
            match answered.get(&r.seq) {
                Some(0) => ok += 1,
                Some(_) => failed += 1,
                None if unknown.contains(&r.seq) => {}
                None => running.push(r),
            }
        }
    }
    let first = recs.first();
    let last = recs.last();
    let _ = writeln!(out, "journal {}", dir.display());
    let _ = writeln!(out, "  segments: {}", loaded.segments);
    if let (Some(f), Some(l)) = (first, last) {
        let _ = writeln!(
            out,
            "  records: {} .. {} ({} .. {})",
            f.seq,
            l.seq,
            utc_us(f.time_us),
            utc_us(l.time_us)
        );
    }
    let _ = writeln!(
        out,
        "  writes: {ok} succeeded, {failed} failed (never replayed), {} indeterminate, {} in flight",
        indeterminate.len(),
        running.len()
    );
    for r in recs {
        if let Body::Cut {
            freeze_id,
            suffixes,
        } = &r.body
        {
            let _ = writeln!(
                out,
                "  cut {}: freeze {freeze_id} at {}: {}",
                r.seq,
                utc_us(r.time_us),
                suffixes.join("; ")
            );
        }
    }
    for (r, why) in &indeterminate {
        let _ = writeln!(out, "  indeterminate: {} ({why})", line(r).trim_start());
    }
    for r in &running {
        let _ = writeln!(out, "  in flight (no answer yet): {}", line(r).trim_start());
    }
    if let Some(t) = &loaded.torn_tail {
        let _ = writeln!(
            out,
            "  torn tail: {t} (a crash in the middle of a write; cut at the proxy's next start)"
        );
    }
    for p in &loaded.problems {
        let _ = writeln!(out, "  DAMAGED: {p}");
    }
    if !loaded.problems.is_empty() {
        return exit::JOURNAL_DAMAGED;
    }
    if !indeterminate.is_empty() {
        return exit::JOURNAL_INCOMPLETE;
    }
    let _ = writeln!(out, "  ok");
    exit::OK
}

/// The journal directory of a configuration file (`[journal] dir`).
pub fn dir_of_config(path: &Path) -> Result<PathBuf, String> {
    let c = crate::config::Config::from_file(path).map_err(|e| e.to_string())?;
    c.journal
        .dir
        .ok_or_else(|| format!("{} has no [journal] dir", path.display()))
}

/// Where `journal replay` sends the writes, and as whom.
pub struct ReplayTarget {
    /// `ldap://`, `ldaps://` or `ldapi://`.
    pub url: String,
    /// A simple bind (none: anonymous, or what `ldapi://` gives the process).
    pub bind_dn: Option<String>,
    pub password: Option<crate::secret::Password>,
    /// StartTLS on an `ldap://` URL.
    pub starttls: bool,
    /// CA certificates for the server's TLS certificate (else the system's).
    pub ca_file: Option<PathBuf>,
    /// The longest wait for the server: connecting, and each answer.
    pub timeout: std::time::Duration,
}

/// What `journal replay` replays.
pub struct ReplayOptions {
    /// A backup directory: replay the writes after its journal cut.
    pub after: Option<PathBuf>,
    /// Or this cut (an incremental backup's base cut).
    pub after_cut: Option<u64>,
    pub from: Option<u64>,
    pub until: Option<Bound>,
    /// Go on after a mismatch or an indeterminate write (each reported).
    pub keep_going: bool,
    /// The server the indeterminate writes were sent to (still running,
    /// bound as the target's identity): each one is read back there and
    /// replayed if it ran, skipped if it did not ([`resolve`]).
    pub resolve: Option<String>,
}

/// A connection to the server replay writes to.
struct Conn {
    r: crate::wire::FrameReader<crate::endpoint::BoxRead>,
    w: crate::endpoint::BoxWrite,
    timeout: std::time::Duration,
    next_id: i32,
}

/// A final response: its result code and diagnostic message.
struct Answer {
    code: i64,
    message: String,
}

impl Conn {
    async fn open(t: &ReplayTarget) -> Result<Conn, String> {
        let ep = crate::endpoint::Endpoint::parse(&t.url).map_err(|e| format!("--to: {e}"))?;
        let tls_needed = matches!(ep, crate::endpoint::Endpoint::Tls(_)) || t.starttls;
        let tls = if tls_needed {
            let cfg = crate::tls::TlsConfig {
                upstream_starttls: t.starttls,
                upstream_ca_file: t.ca_file.clone(),
                ..Default::default()
            };
            crate::tls::UpstreamTls::load(&cfg, &ep)?
        } else {
            None
        };
        let connect = crate::tls::connect_upstream(&ep, tls.as_ref());
        let (r, w) = tokio::time::timeout(t.timeout, connect)
            .await
            .map_err(|_| format!("{}: no connection within {} s", t.url, t.timeout.as_secs()))?
            .map_err(|e| format!("{}: {e}", t.url))?;
        let mut c = Conn {
            r: crate::wire::FrameReader::new(r, crate::wire::FrameCodec::new(64 << 20)),
            w,
            timeout: t.timeout,
            next_id: 1,
        };
        if let Some(dn) = &t.bind_dn {
            let pw = t.password.as_ref().map_or("", |p| p.expose());
            let id = c.id();
            let bind = crate::wire::pdu::encode(ldap3_proto::proto::LdapMsg::new(
                id,
                ldap3_proto::proto::LdapOp::BindRequest(ldap3_proto::proto::LdapBindRequest {
                    version: 3,
                    dn: dn.clone(),
                    cred: ldap3_proto::proto::LdapBindCred::Simple(pw.to_string()),
                }),
            ));
            let a = c.call(id, &bind).await?;
            if a.code != 0 {
                return Err(format!("bind as {dn} refused: {}", describe(&a)));
            }
        }
        Ok(c)
    }

    fn id(&mut self) -> i32 {
        let id = self.next_id;
        self.next_id = if id == i32::MAX { 1 } else { id + 1 };
        id
    }

    async fn send(&mut self, request: &[u8]) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        self.w
            .write_all(request)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        self.w.flush().await.map_err(|e| format!("sending: {e}"))
    }

    /// The length of the next message read.
    async fn next(&mut self) -> Result<usize, String> {
        match self.r.next_message().await {
            Ok(Some(n)) => Ok(n),
            Ok(None) => Err("the server closed the connection".to_string()),
            Err(e) => Err(format!("reading the answer: {e}")),
        }
    }

    /// The entry `dn` with its user attributes, `None` when there is none.
    async fn read_entry(&mut self, dn: &str) -> Result<Option<crate::backup::ldif::Entry>, String> {
        use ldap3_proto::proto::LdapOp;
        let id = self.id();
        let search = crate::wire::pdu::base_search(id, dn, &["*"]);
        let timeout = self.timeout;
        let exchange = async {
            self.send(&search).await?;
            let mut found = None;
            loop {
                let n = self.next().await?;
                let msg = crate::wire::pdu::decode(self.r.message(n));
                self.r.skip(n);
                let msg = msg.ok_or("the answer does not decode")?;
                if msg.msgid != id {
                    continue;
                }
                match msg.op {
                    LdapOp::SearchResultEntry(e) => {
                        let mut entry = crate::backup::ldif::Entry::new(e.dn);
                        for a in e.attributes {
                            for v in a.vals {
                                entry.push(&a.atype, v);
                            }
                        }
                        found = Some(entry);
                    }
                    LdapOp::SearchResultDone(r) => {
                        return match r.code {
                            ldap3_proto::proto::LdapResultCode::Success => Ok(found),
                            ldap3_proto::proto::LdapResultCode::NoSuchObject => Ok(None),
                            c => Err(format!("reading {dn}: {c:?} {}", r.message)),
                        }
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
    }

    /// Sends `request` (message ID `id`) and waits for its final response.
    async fn call(&mut self, id: i32, request: &[u8]) -> Result<Answer, String> {
        let timeout = self.timeout;
        let exchange = async {
            self.send(request).await?;
            loop {
                let n = self.next().await?;
                let frame = self.r.message(n);
                let env = Envelope::response(frame).map_err(|e| format!("the answer: {e}"))?;
                let answer = (env.msgid == id && op::is_final_response(env.op)).then(|| Answer {
                    code: env.result_code.map_or(-1, i64::from),
                    message: diagnostic(frame),
                });
                let notice = env.msgid == 0;
                self.r.skip(n);
                if let Some(a) = answer {
                    return Ok(a);
                }
                if notice {
                    return Err("the server ended the connection (Notice of Disconnection)".into());
                }
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
    }
}

/// The diagnostic message of a response.
fn diagnostic(frame: &[u8]) -> String {
    use ldap3_proto::proto::LdapOp;
    let Some(msg) = crate::wire::pdu::decode(frame) else {
        return String::new();
    };
    match msg.op {
        LdapOp::ExtendedResponse(r) => r.res.message,
        LdapOp::BindResponse(r) => r.res.message,
        LdapOp::AddResponse(r)
        | LdapOp::DelResponse(r)
        | LdapOp::ModifyResponse(r)
        | LdapOp::ModifyDNResponse(r) => r.message,
        _ => String::new(),
    }
}

fn describe(a: &Answer) -> String {
    if a.message.is_empty() {
        result_name(a.code as i32)
    } else {
        format!("{} ({})", result_name(a.code as i32), a.message)
    }
}

/// `journal replay`: the successful writes of the range, in the order the
/// server answered them, sent again to `target`, each result compared with
/// the journal's. The exit status.
pub async fn replay(
    dir: &Path,
    target: &ReplayTarget,
    opts: &ReplayOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let me = "abproxy journal replay";
    let loaded = match load(dir) {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(err, "{me}: {e}");
            return exit::JOURNAL_DAMAGED;
        }
    };
    if !loaded.problems.is_empty() {
        for p in &loaded.problems {
            let _ = writeln!(err, "{me}: {p}");
        }
        let _ = writeln!(
            err,
            "{me}: the journal is damaged: nothing replayed (writes may be missing)"
        );
        return exit::JOURNAL_DAMAGED;
    }
    let after_cut = match &opts.after {
        None => opts.after_cut,
        Some(backup) => match backup_cut(backup, &loaded.records) {
            Ok(cut) => Some(cut),
            Err(e) => {
                let _ = writeln!(err, "{me}: {e}");
                return exit::USAGE;
            }
        },
    };
    let range = crate::journal::replay::Range {
        after_cut,
        from: opts.from,
        until: opts.until,
    };
    let items = crate::journal::replay::plan(&loaded.records, &range);
    let mut conn = match Conn::open(target).await {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(err, "{me}: {e}");
            return exit::UNREACHABLE;
        }
    };
    let mut live = match &opts.resolve {
        None => None,
        Some(url) => {
            let t = ReplayTarget {
                url: url.clone(),
                bind_dn: target.bind_dn.clone(),
                password: target.password.clone(),
                starttls: target.starttls,
                ca_file: target.ca_file.clone(),
                timeout: target.timeout,
            };
            match Conn::open(&t).await {
                Ok(c) => Some(c),
                Err(e) => {
                    let _ = writeln!(err, "{me}: --resolve: {e}");
                    return exit::UNREACHABLE;
                }
            }
        }
    };
    let (mut applied, mut mismatched, mut unknown, mut skipped) = (0usize, 0usize, 0usize, 0usize);
    let mut stopped: Option<(u64, u8)> = None;
    for item in &items {
        let at = item.at();
        // An indeterminate write resolved against the server that ran it:
        // replayed like any other if it ran, skipped if not.
        let mut item = *item;
        if let (crate::journal::replay::Item::Indeterminate { intent, .. }, Some(live)) =
            (item, live.as_mut())
        {
            match resolve_one(live, intent, &loaded.records).await {
                Ok(resolve::Verdict::Applied) => {
                    let _ = writeln!(
                        out,
                        "write {}: indeterminate, ran on {}: replayed",
                        intent.seq,
                        opts.resolve.as_deref().unwrap_or("")
                    );
                    item = crate::journal::replay::Item::Write {
                        intent,
                        outcome: intent,
                    };
                }
                Ok(resolve::Verdict::NotApplied) => {
                    skipped += 1;
                    let _ = writeln!(
                        out,
                        "write {}: indeterminate, did not run on {}: skipped",
                        intent.seq,
                        opts.resolve.as_deref().unwrap_or("")
                    );
                    continue;
                }
                Ok(resolve::Verdict::Unknown(why)) => {
                    let _ = writeln!(
                        err,
                        "{me}: write {}: cannot tell whether it ran: {why}",
                        intent.seq
                    );
                }
                Err(e) => {
                    let _ = writeln!(err, "{me}: --resolve: {e}");
                    stopped = Some((at, exit::UNREACHABLE));
                    break;
                }
            }
        }
        match item {
            crate::journal::replay::Item::Indeterminate { intent, why, .. } => {
                unknown += 1;
                let _ = writeln!(
                    err,
                    "{me}: write {} is indeterminate ({why}): the server it was sent to may \
                     have run it or not; check the entry on that server (journal show --from {} \
                     --until {}) and apply it by hand if it did",
                    intent.seq, intent.seq, intent.seq
                );
                if !opts.keep_going {
                    stopped = Some((at, exit::JOURNAL_INCOMPLETE));
                    break;
                }
            }
            crate::journal::replay::Item::Write { intent, outcome } => {
                let Body::Intent { identity, request } = &intent.body else {
                    unreachable!("a plan's writes are intents")
                };
                // A resolved write has no outcome (its intent stands in).
                let response: &[u8] = match &outcome.body {
                    Body::Outcome { response, .. } => response,
                    _ => &[],
                };
                let id = conn.id();
                let sent = crate::journal::replay::request_bytes(request, response, identity, id);
                let answer = match sent {
                    Ok(bytes) => conn.call(id, &bytes).await,
                    Err(e) => Err(format!("cannot be replayed: {e}")),
                };
                match answer {
                    Ok(a) if a.code == 0 => applied += 1,
                    Ok(a) => {
                        mismatched += 1;
                        let _ = writeln!(
                            err,
                            "{me}: write {} ({}), answered success at {}: the server now answers {}",
                            intent.seq,
                            describe_request(request),
                            utc_us(outcome.time_us),
                            describe(&a)
                        );
                        if !opts.keep_going {
                            stopped = Some((at, exit::REPLAY_MISMATCH));
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = writeln!(
                            err,
                            "{me}: write {} ({}): {e}",
                            intent.seq,
                            describe_request(request)
                        );
                        // Whether the server ran it is unknown: resume there.
                        stopped = Some((at, exit::UNREACHABLE));
                        break;
                    }
                }
            }
        }
    }
    let next = match stopped {
        Some((at, _)) => at,
        None => items.last().map_or(range.from.unwrap_or(1), |i| i.at() + 1),
    };
    let _ =
        writeln!(
        out,
        "replayed {applied} write(s) to {}; {mismatched} mismatch(es), {unknown} indeterminate{}",
        target.url,
        if live.is_some() { format!(", {skipped} resolved as not run") } else { String::new() }
    );
    match stopped {
        Some((at, code)) => {
            let _ = writeln!(
                out,
                "stopped at {at}: resume with --from {at} (to try it again) or --from {} (to skip it)",
                at + 1
            );
            code
        }
        None => {
            let _ = writeln!(out, "next: --from {next}");
            if mismatched > 0 {
                exit::REPLAY_MISMATCH
            } else if unknown > 0 {
                exit::JOURNAL_INCOMPLETE
            } else {
                exit::OK
            }
        }
    }
}

/// `journal replay --increments INC...`: each incremental backup replayed
/// after its base, in order, once the chain is checked (each one's base is
/// the one before it, by backup id and manifest SHA-256). The first one's
/// base is the backup restored. The exit status.
pub async fn replay_chain(
    increments: &[PathBuf],
    target: &ReplayTarget,
    opts: &ReplayOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let me = "abproxy journal replay";
    let mut chain = Vec::new();
    for (i, dir) in increments.iter().enumerate() {
        let m = match crate::backup::manifest::Manifest::read(dir) {
            Ok(m) => m,
            Err(e) => {
                let _ = writeln!(err, "{me}: {e}");
                return exit::USAGE;
            }
        };
        let Some(inc) = m.incremental.clone() else {
            let _ = writeln!(err, "{me}: {} is not an incremental backup", dir.display());
            return exit::USAGE;
        };
        if let Some((prev_dir, prev)) = chain.last() {
            let prev: &crate::backup::manifest::Manifest = prev;
            let prev_dir: &PathBuf = prev_dir;
            let sha = crate::backup::manifest::file_sha256(
                &prev_dir.join(crate::backup::manifest::MANIFEST),
            )
            .map(|(_, s)| s)
            .unwrap_or_default();
            if inc.base_backup_id != prev.backup_id
                || inc.base_manifest_sha256 != sha
                || Some(inc.base_cut) != prev.freeze.journal_cut
            {
                let _ = writeln!(
                    err,
                    "{me}: {} (number {}) is not based on {} (it follows {})",
                    dir.display(),
                    i + 1,
                    prev_dir.display(),
                    inc.base_backup_id
                );
                return exit::USAGE;
            }
        }
        chain.push((dir.clone(), m));
    }
    for (dir, m) in &chain {
        let inc = m.incremental.as_ref().expect("checked above");
        let _ = writeln!(
            out,
            "{}: the writes after {} (cut {}) to cut {}",
            dir.display(),
            inc.base_backup_id,
            inc.base_cut,
            m.freeze.journal_cut.unwrap_or(0)
        );
        let step = ReplayOptions {
            after: None,
            after_cut: Some(inc.base_cut),
            from: opts.from,
            until: opts.until,
            keep_going: opts.keep_going,
            resolve: opts.resolve.clone(),
        };
        let code = replay(dir, target, &step, out, err).await;
        if code != exit::OK {
            return code;
        }
    }
    exit::OK
}

/// Reads back the entries an indeterminate write touches on the server
/// that ran it.
async fn resolve_one(
    live: &mut Conn,
    intent: &Record,
    records: &[Record],
) -> Result<resolve::Verdict, String> {
    let Body::Intent { request, .. } = &intent.body else {
        return Ok(resolve::Verdict::Unknown("not a write".into()));
    };
    let dns = resolve::touched(request);
    let later = records.iter().any(|r| {
        r.seq > intent.seq
            && matches!(&r.body, Body::Intent { request: later, .. }
                if resolve::touched(later).iter().any(|l| dns.iter().any(|d| resolve::same_dn(d, l))))
    });
    let mut read = HashMap::new();
    if !later {
        for dn in &dns {
            read.insert(dn.clone(), live.read_entry(dn).await?);
        }
    }
    Ok(resolve::verdict(request, &read, later))
}

/// The journal cut a backup directory's manifest names, checked against
/// the journal.
fn backup_cut(backup: &Path, records: &[Record]) -> Result<u64, String> {
    let m = crate::backup::manifest::Manifest::read(backup)?;
    let cut = m.freeze.journal_cut.ok_or_else(|| {
        format!(
            "{}: the backup names no journal cut (the proxy kept no journal, or an older abproxy took it)",
            backup.display()
        )
    })?;
    let rec = records.iter().find(|r| r.seq == cut);
    match rec.map(|r| &r.body) {
        Some(Body::Cut { freeze_id, .. }) if Some(*freeze_id) == m.freeze.id => Ok(cut),
        Some(Body::Cut { freeze_id, .. }) => Err(format!(
            "record {cut} of this journal is the cut of freeze {freeze_id}, the backup's freeze is {}: \
             is this the journal of the proxy the backup froze?",
            m.freeze.id.map_or("unknown".into(), |i| i.to_string())
        )),
        Some(_) => Err(format!(
            "record {cut} of this journal is no cut: is this the journal of the proxy the backup froze?"
        )),
        None => Err(format!(
            "this journal has no record {cut} (the backup's cut): pruned, or another proxy's journal"
        )),
    }
}

/// `journal prune --before BACKUP`: removes the segments whose every
/// record comes before the backup's journal cut (the backup holds what
/// they recorded; a replay after it, or after any later backup, needs none
/// of them). The last segment, which a running proxy writes to, is never
/// removed. The exit status.
pub fn prune(dir: &Path, backup: &Path, dry_run: bool, out: &mut dyn Write) -> u8 {
    let me = "abproxy journal prune";
    let loaded = match load(dir) {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(out, "{me}: {e}");
            return exit::JOURNAL_DAMAGED;
        }
    };
    let cut = match backup_cut(backup, &loaded.records) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(out, "{me}: {e}");
            return exit::USAGE;
        }
    };
    let segs = match segments(dir) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(out, "{me}: {e}");
            return exit::JOURNAL_DAMAGED;
        }
    };
    // A segment ends where the next begins.
    let mut removed = 0;
    for pair in segs.windows(2) {
        let ((_, path), (next_first, _)) = (&pair[0], &pair[1]);
        if *next_first > cut {
            break;
        }
        let _ = writeln!(
            out,
            "{} {} (records before {next_first})",
            if dry_run { "would remove" } else { "removed" },
            path.display()
        );
        if !dry_run {
            if let Err(e) = std::fs::remove_file(path) {
                let _ = writeln!(out, "{me}: cannot remove {}: {e}", path.display());
                return exit::FAILED;
            }
        }
        removed += 1;
    }
    let _ = writeln!(
        out,
        "{removed} segment(s) {}before the cut {cut} of {}",
        if dry_run {
            "would be removed, "
        } else {
            "removed, "
        },
        backup.display()
    );
    exit::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_sequence_numbers_or_utc_times() {
        assert_eq!("42".parse::<Bound>().unwrap(), Bound::Seq(42));
        let t = "2026-12-04T03:30:00Z".parse::<Bound>().unwrap();
        let Bound::Time(us) = t else { panic!() };
        assert_eq!(utc_us(us), "2026-12-04T03:30:00.000000Z");
        let t = "2026-12-04T03:30:00.25Z".parse::<Bound>().unwrap();
        assert_eq!(t, Bound::Time(us + 250_000));
        assert!("yesterday".parse::<Bound>().is_err());
        assert!("2026-12-04 03:30:00".parse::<Bound>().is_err());
        assert!("2026-12-04T03:30:00.1234567Z".parse::<Bound>().is_err());
    }
}
