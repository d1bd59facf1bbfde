//! `contact_import`: a CSV file (inline, or an object in storage) mapped to
//! contact fields. The file is streamed (a parser thread reads it through a
//! bounded channel, so memory stays flat however big it is); each row is
//! validated; valid rows are inserted or upserted in batches, bad rows are
//! skipped and reported. Each batch, its bad rows and the checkpoint commit
//! in one transaction, so a resumed import (hand-off or crash) neither
//! repeats nor loses a row. A file that is not CSV text fails at once,
//! permanently. The result counts imported, updated, skipped and invalid
//! rows, with a link to the error report (row, column, reason).

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{JobContext, JobError, JobHandler, Outcome, PayloadError};
use crate::db::DbError;
use crate::job::Progress;
use crate::storage::StorageError;

pub struct ContactImport;

/// Contact fields a column can map to.
const FIELDS: [&str; 7] = [
    "email",
    "first_name",
    "last_name",
    "phone",
    "company",
    "title",
    "stage",
];
const STAGES: [&str; 5] = ["lead", "mql", "sql", "opportunity", "customer"];
/// Inline CSV larger than this must go through storage.
pub const MAX_INLINE: usize = 1 << 20;
/// The error report's file name.
const REPORT: &str = "errors.csv";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Source {
    /// The CSV text itself (at most 1 MiB).
    Inline(String),
    /// A key in the deployment's object storage.
    Object(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportPayload {
    pub source: Source,
    /// Contact field → CSV column name; `email` is required.
    pub mapping: BTreeMap<String, String>,
    /// Update contacts whose e-mail already exists (else they are skipped).
    #[serde(default)]
    pub update_existing: bool,
    /// With `update_existing` off: count existing e-mails as skipped (true)
    /// or as invalid rows in the report (false).
    #[serde(default = "yes")]
    pub skip_duplicates: bool,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn yes() -> bool {
    true
}
fn default_batch() -> usize {
    1000
}

/// Where an import stands; committed with every batch.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Tally {
    rows: u64,
    imported: u64,
    updated: u64,
    skipped: u64,
    invalid: u64,
}

/// One valid row, ready to insert.
#[derive(Debug, Default, Clone)]
struct Contact {
    email: String,
    fields: [Option<String>; 6],
}

/// A data row's number and either its contact or (column, reason).
type RowResult = (u64, Result<Contact, (String, String)>);

enum Parsed {
    Batch(Vec<RowResult>),
    Fatal(String),
}

/// A simple, strict address check: one `@`, a local part, a dotted domain,
/// no spaces, at most 254 characters.
pub fn valid_email(e: &str) -> bool {
    let Some((local, domain)) = e.split_once('@') else {
        return false;
    };
    e.len() <= 254
        && !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !e.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[async_trait]
impl JobHandler for ContactImport {
    type Payload = ImportPayload;
    const TYPE: &'static str = "contact_import";

    fn validate(&self, p: &ImportPayload) -> Result<(), PayloadError> {
        if !p.mapping.contains_key("email") {
            return Err(PayloadError::field(
                "mapping.email",
                "map a column to email",
            ));
        }
        if let Some(k) = p.mapping.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(PayloadError::field(
                &format!("mapping.{k}"),
                format!("unknown contact field; known: {}", FIELDS.join(", ")),
            ));
        }
        if let Source::Inline(text) = &p.source {
            if text.len() > MAX_INLINE {
                return Err(PayloadError::field(
                    "source.inline",
                    "inline CSV is at most 1 MiB; upload larger files to storage",
                ));
            }
        }
        if !(1..=5000).contains(&p.batch_size) {
            return Err(PayloadError::field("batch_size", "must be from 1 to 5000"));
        }
        Ok(())
    }

    fn objects<'a>(&self, p: &'a ImportPayload) -> Vec<(&'static str, &'a str)> {
        match &p.source {
            Source::Object(key) => vec![("source.object", key.as_str())],
            Source::Inline(_) => Vec::new(),
        }
    }

    async fn run(&self, p: ImportPayload, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let mut tally: Tally = ctx.checkpoint().unwrap_or_default();
        let stream: BoxStream<'static, Result<Bytes, std::io::Error>> = match &p.source {
            Source::Inline(text) => futures::stream::iter([Ok(Bytes::from(text.clone()))]).boxed(),
            Source::Object(key) => ctx.storage().get_stream(key).await.map_err(|e| match e {
                crate::storage::StorageError::NotFound(_) => {
                    JobError::Permanent(format!("the file {key:?} does not exist in storage"))
                }
                other => JobError::Retryable(other.to_string()),
            })?,
        };
        let (tx, mut rx) = mpsc::channel::<Parsed>(2);
        let mapping = p.mapping.clone();
        let (skip, batch) = (tally.rows, p.batch_size);
        let parser = tokio::task::spawn_blocking(move || parse(stream, mapping, skip, batch, tx));

        let ws = ctx.workspace_id().0;
        let job = ctx.job_id().0;
        if tally.rows == 0 {
            ctx.log("info", "Import started", None).await?;
        }
        while let Some(msg) = rx.recv().await {
            let rows = match msg {
                Parsed::Fatal(reason) => {
                    ctx.log("error", format!("Import stopped: {reason}"), None)
                        .await?;
                    return Err(JobError::Permanent(reason));
                }
                Parsed::Batch(rows) => rows,
            };
            if ctx.cancelled().await? {
                return Ok(Outcome::Cancelled(Some(json!(tally))));
            }
            if ctx.should_hand_off() {
                // The batch in hand is not committed: the next run reads it again.
                drop(rx);
                let _ = parser.await;
                return Ok(ctx.hand_off(&tally));
            }
            self.write_batch(ctx, &p, ws, job, rows, &mut tally).await?;
            ctx.progress(Progress {
                processed: tally.imported + tally.updated + tally.skipped,
                failed: tally.invalid,
                stage: Some("importing".into()),
                message: Some(format!("{} rows read", tally.rows)),
                ..Progress::default()
            })
            .await?;
        }
        let _ = parser.await;
        let report = self.write_report(ctx, job, tally.invalid).await?;
        ctx.log(
            "info",
            format!(
                "Import finished: {} imported, {} updated, {} skipped, {} invalid rows",
                tally.imported, tally.updated, tally.skipped, tally.invalid
            ),
            None,
        )
        .await?;
        Ok(Outcome::Completed(Some(json!({
            "rows": tally.rows,
            "imported": tally.imported,
            "updated": tally.updated,
            "skipped": tally.skipped,
            "invalid": tally.invalid,
            "files": report.iter().collect::<Vec<_>>(),
            "error_report_url": report.map(|name| ctx.file_path(name)),
        }))))
    }
}

impl ContactImport {
    /// Inserts one batch, records its bad rows and saves the checkpoint, in
    /// one transaction.
    async fn write_batch(
        &self,
        ctx: &mut JobContext,
        p: &ImportPayload,
        ws: Uuid,
        job: Uuid,
        rows: Vec<RowResult>,
        tally: &mut Tally,
    ) -> Result<(), JobError> {
        let mut seen = HashSet::new();
        let mut good: Vec<(u64, Contact)> = Vec::new();
        let mut bad: Vec<(u64, String, String)> = Vec::new();
        let mut skipped_in_file = 0u64;
        let last_row = rows.last().map(|r| r.0).unwrap_or(tally.rows);
        for (row, r) in rows {
            match r {
                Ok(c) if seen.insert(c.email.to_lowercase()) => good.push((row, c)),
                // The same address twice in one batch: the first one wins.
                Ok(_) => skipped_in_file += 1,
                Err((col, reason)) => bad.push((row, col, reason)),
            }
        }
        let pool = ctx.db().clone();
        let mut db = pool.get().await.map_err(DbError::from)?;
        let txn = db.transaction().await.map_err(DbError::from)?;
        let ids: Vec<Uuid> = good.iter().map(|_| Uuid::now_v7()).collect();
        let emails: Vec<&str> = good.iter().map(|(_, c)| c.email.as_str()).collect();
        let col = |i: usize| -> Vec<Option<&str>> {
            good.iter().map(|(_, c)| c.fields[i].as_deref()).collect()
        };
        let (first, last, phone, company, title, stage) =
            (col(0), col(1), col(2), col(3), col(4), col(5));
        let conflict = if p.update_existing {
            "DO UPDATE SET first_name = coalesce(EXCLUDED.first_name, contacts.first_name), \
               last_name = coalesce(EXCLUDED.last_name, contacts.last_name), \
               phone = coalesce(EXCLUDED.phone, contacts.phone), \
               company = coalesce(EXCLUDED.company, contacts.company), \
               title = coalesce(EXCLUDED.title, contacts.title), \
               stage = EXCLUDED.stage, updated_at = now()"
        } else {
            "DO NOTHING"
        };
        let sql = format!(
            "INSERT INTO contacts (id, workspace_id, email, first_name, last_name, phone, company, title, stage) \
             SELECT u.id, $2, u.email, u.f, u.l, u.p, u.c, u.t, coalesce(u.s, 'lead') \
             FROM unnest($1::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[]) \
               AS u(id, email, f, l, p, c, t, s) \
             ON CONFLICT (workspace_id, lower(email)) WHERE email IS NOT NULL {conflict} \
             RETURNING email, (xmax = 0) AS inserted"
        );
        let stmt = txn.prepare_cached(&sql).await.map_err(DbError::from)?;
        let written = txn
            .query(
                &stmt,
                &[
                    &ids, &ws, &emails, &first, &last, &phone, &company, &title, &stage,
                ],
            )
            .await
            .map_err(DbError::from)?;
        let inserted = written.iter().filter(|r| r.get::<_, bool>(1)).count() as u64;
        let updated = written.len() as u64 - inserted;
        let untouched = good.len() as u64 - written.len() as u64;
        if untouched > 0 && !p.update_existing && !p.skip_duplicates {
            let done: HashSet<String> = written
                .iter()
                .map(|r| r.get::<_, String>(0).to_lowercase())
                .collect();
            for (row, c) in &good {
                if !done.contains(&c.email.to_lowercase()) {
                    bad.push((
                        *row,
                        "email".into(),
                        "a contact with this e-mail already exists".into(),
                    ));
                }
            }
        } else {
            tally.skipped += untouched;
        }
        if !bad.is_empty() {
            let rows: Vec<i64> = bad.iter().map(|b| b.0 as i64).collect();
            let cols: Vec<&str> = bad.iter().map(|b| b.1.as_str()).collect();
            let reasons: Vec<&str> = bad.iter().map(|b| b.2.as_str()).collect();
            let stmt = txn
                .prepare_cached(
                    "INSERT INTO import_errors (job_id, row_num, col, reason) \
                     SELECT $1, * FROM unnest($2::int8[], $3::text[], $4::text[]) ON CONFLICT DO NOTHING",
                )
                .await
                .map_err(DbError::from)?;
            txn.execute(&stmt, &[&job, &rows, &cols, &reasons])
                .await
                .map_err(DbError::from)?;
        }
        tally.imported += inserted;
        tally.updated += updated;
        tally.skipped += skipped_in_file;
        tally.invalid += bad.len() as u64;
        tally.rows = last_row;
        ctx.save_checkpoint_in(&txn, &*tally).await?;
        txn.commit().await.map_err(DbError::from)?;
        Ok(())
    }

    /// Writes the job's file `errors.csv` (row, column, reason) and returns
    /// its name, when there were bad rows. The rows are read a page
    /// at a time and streamed to storage: a file with a million bad rows
    /// costs one page of memory, not the whole report.
    async fn write_report(
        &self,
        ctx: &JobContext,
        job: Uuid,
        invalid: u64,
    ) -> Result<Option<&'static str>, JobError> {
        if invalid == 0 {
            return Ok(None);
        }
        let pool = ctx.db().clone();
        let header = csv_line(["row", "column", "reason"])?;
        let pages = futures::stream::try_unfold(Some((0i64, String::new())), move |after| {
            let pool = pool.clone();
            async move {
                let Some((row, col)) = after else {
                    return Ok(None);
                };
                let db = pool
                    .get()
                    .await
                    .map_err(|e| StorageError::Failed(e.to_string()))?;
                let rows = db
                    .query(
                        "SELECT row_num, col, reason FROM import_errors \
                         WHERE job_id = $1 AND (row_num, col) > ($2, $3) \
                         ORDER BY row_num, col LIMIT $4",
                        &[&job, &row, &col, &REPORT_PAGE],
                    )
                    .await
                    .map_err(|e| StorageError::Failed(e.to_string()))?;
                if rows.is_empty() {
                    return Ok(None);
                }
                let mut out = Vec::new();
                for r in &rows {
                    let line = csv_line([r.get::<_, i64>(0).to_string(), r.get(1), r.get(2)])
                        .map_err(|e| StorageError::Failed(e.to_string()))?;
                    out.extend_from_slice(&line);
                }
                let last = rows.last().expect("a page has rows");
                let next = (rows.len() as i64 == REPORT_PAGE)
                    .then(|| (last.get::<_, i64>(0), last.get::<_, String>(1)));
                Ok(Some((Bytes::from(out), next)))
            }
        });
        let chunks = futures::stream::once(async move { Ok(Bytes::from(header)) }).chain(pages);
        ctx.storage()
            .put_stream::<StorageError>(&ctx.file_key(REPORT), chunks.boxed())
            .await?;
        Ok(Some(REPORT))
    }
}

/// Bad rows read per page while the error report is written.
const REPORT_PAGE: i64 = 5_000;

/// One CSV record, with its line end.
fn csv_line<I, T>(fields: I) -> Result<Vec<u8>, JobError>
where
    I: IntoIterator<Item = T>,
    T: AsRef<[u8]>,
{
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(fields)
        .map_err(|e| JobError::Retryable(e.to_string()))?;
    w.into_inner()
        .map_err(|e| JobError::Retryable(e.to_string()))
}

/// Reads the CSV on a blocking thread and sends batches of parsed rows
/// (row numbers count data rows from 1). Rows up to `skip` were committed
/// by an earlier run and are only read past.
fn parse(
    stream: BoxStream<'static, Result<Bytes, std::io::Error>>,
    mapping: BTreeMap<String, String>,
    skip: u64,
    batch: usize,
    tx: mpsc::Sender<Parsed>,
) {
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let mut csv = csv::ReaderBuilder::new().flexible(true).from_reader(reader);
    let fatal = |tx: &mpsc::Sender<Parsed>, m: String| {
        let _ = tx.blocking_send(Parsed::Fatal(m));
    };
    let headers = match csv.headers() {
        Ok(h) if h.iter().any(|c| !c.trim().is_empty()) => h.clone(),
        Ok(_) => return fatal(&tx, "the file has no header row".into()),
        Err(e) => return fatal(&tx, format!("this is not a CSV text file: {e}")),
    };
    if headers.as_byte_record().as_slice().contains(&0) {
        return fatal(
            &tx,
            "this is not a CSV text file (it contains binary data)".into(),
        );
    }
    // Field position in `Contact::fields` (email apart) → column index.
    let mut positions: Vec<(usize, usize, &str)> = Vec::new();
    let mut email_at = 0;
    for (field, column) in &mapping {
        let Some(idx) = headers.iter().position(|h| h.trim() == column.trim()) else {
            return fatal(
                &tx,
                format!("the column {column:?} (mapped to {field}) is not in the header row"),
            );
        };
        match FIELDS.iter().position(|f| f == field) {
            Some(0) => email_at = idx,
            Some(i) => positions.push((i - 1, idx, FIELDS[i])),
            None => {}
        }
    }
    let mut out = Vec::with_capacity(batch);
    let mut record = csv::StringRecord::new();
    let mut row = 0u64;
    loop {
        match csv.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                return fatal(
                    &tx,
                    format!("row {}: this is not a CSV text file: {e}", row + 1),
                );
            }
        }
        row += 1;
        if row <= skip {
            continue;
        }
        if record.as_byte_record().as_slice().contains(&0) {
            return fatal(
                &tx,
                format!("row {row}: this is not a CSV text file (binary data)"),
            );
        }
        let email = record.get(email_at).unwrap_or("").trim().to_string();
        let parsed = if email.is_empty() {
            Err(("email".to_string(), "e-mail is required".to_string()))
        } else if !valid_email(&email) {
            Err((
                "email".to_string(),
                format!("{email:?} is not an e-mail address"),
            ))
        } else {
            let mut c = Contact {
                email,
                ..Contact::default()
            };
            let mut err = None;
            for (slot, idx, field) in &positions {
                let v = record.get(*idx).map(str::trim).filter(|v| !v.is_empty());
                if *field == "stage" {
                    if let Some(s) = v {
                        let s = s.to_lowercase();
                        if !STAGES.contains(&s.as_str()) {
                            err = Some((
                                field.to_string(),
                                format!("unknown stage {s:?}; use {}", STAGES.join(", ")),
                            ));
                        }
                        c.fields[*slot] = Some(s);
                        continue;
                    }
                }
                if v.is_some_and(|v| v.chars().count() > 500) {
                    err = Some((field.to_string(), "longer than 500 characters".into()));
                }
                c.fields[*slot] = v.map(str::to_string);
            }
            match err {
                Some(e) => Err(e),
                None => Ok(c),
            }
        };
        out.push((row, parsed));
        if out.len() == batch
            && tx
                .blocking_send(Parsed::Batch(std::mem::take(&mut out)))
                .is_err()
        {
            return; // the importer stopped (hand-off or cancel)
        }
    }
    // A header and nothing else is an empty import, not an error.
    if !out.is_empty() {
        let _ = tx.blocking_send(Parsed::Batch(out));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs the parser over `chunks` as a stream and collects what it sends.
    fn parse_chunks(chunks: Vec<Vec<u8>>, skip: u64, batch: usize) -> Vec<Parsed> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let stream: BoxStream<'static, Result<Bytes, std::io::Error>> = Box::pin(
                futures::stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from(c)))),
            );
            let mapping = BTreeMap::from([
                ("email".to_string(), "Email".to_string()),
                ("first_name".to_string(), "First".to_string()),
                ("stage".to_string(), "Stage".to_string()),
            ]);
            let (tx, mut rx) = mpsc::channel(2);
            let parser =
                tokio::task::spawn_blocking(move || parse(stream, mapping, skip, batch, tx));
            let mut out = Vec::new();
            while let Some(p) = rx.recv().await {
                out.push(p);
            }
            parser.await.expect("the parser does not panic");
            out
        })
    }

    fn cell() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z]{1,6}@[a-z]{1,6}\\.(com|io)",
            Just("lead".to_string()),
            Just("MQL".to_string()),
            "\\PC{0,12}",
            ".{0,3}[\",\"\r\n].{0,3}",
            "[a-z]{501}",
            Just(String::new()),
        ]
    }

    /// CSV text: sometimes the expected header, rows of generated cells with
    /// quoting done right or wrong, and the whole cut into random chunks.
    fn csv_input() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
        let header = prop_oneof![
            Just("Email,First,Stage".to_string()),
            Just("Stage,Email,First,Extra".to_string()),
            Just("Name,Phone".to_string()),
            Just(String::new()),
            "\\PC{0,20}",
        ];
        let row = prop::collection::vec((cell(), any::<bool>()), 0..5).prop_map(|cells| {
            cells
                .into_iter()
                .map(|(c, quote)| {
                    if quote {
                        format!("\"{}\"", c.replace('"', "\"\""))
                    } else {
                        c
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        });
        let text = (header, prop::collection::vec(row, 0..40))
            .prop_map(|(h, rows)| format!("{h}\n{}", rows.join("\n")).into_bytes());
        let bytes = prop_oneof![8 => text, 1 => any::<Vec<u8>>()];
        (bytes, prop::collection::vec(1usize..64, 0..8))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(600)
        ))]

        #[test]
        fn any_input_gives_numbered_rows_or_one_reason(
            (bytes, cuts) in csv_input(),
            skip in 0u64..3,
            batch in 1usize..7,
        ) {
            let mut chunks = Vec::new();
            let mut rest = bytes.as_slice();
            for c in cuts {
                let (a, b) = rest.split_at(c.min(rest.len()));
                chunks.push(a.to_vec());
                rest = b;
            }
            chunks.push(rest.to_vec());
            let out = parse_chunks(chunks, skip, batch);
            let mut expected_row = skip + 1;
            for (i, p) in out.iter().enumerate() {
                match p {
                    Parsed::Fatal(reason) => {
                        prop_assert!(!reason.is_empty());
                        prop_assert_eq!(i, out.len() - 1, "nothing follows a fatal error");
                    }
                    Parsed::Batch(rows) => {
                        prop_assert!(!rows.is_empty() && rows.len() <= batch);
                        for (n, r) in rows {
                            prop_assert_eq!(*n, expected_row, "rows are numbered without gaps");
                            expected_row += 1;
                            match r {
                                Ok(c) => {
                                    prop_assert!(valid_email(&c.email), "{:?}", c.email);
                                    for f in c.fields.iter().flatten() {
                                        prop_assert!(f.chars().count() <= 500);
                                        prop_assert!(!f.contains('\0'));
                                    }
                                }
                                Err((column, reason)) => {
                                    prop_assert!(!column.is_empty() && !reason.is_empty());
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn addresses_are_checked_strictly() {
        for ok in ["a@b.co", "first.last+tag@sub.example.org"] {
            assert!(valid_email(ok), "{ok}");
        }
        for bad in [
            "", "a", "a@b", "@b.co", "a@@b.co", "a b@c.de", "a@.co", "a@co.",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }
}
