//! `bulk_export`: the workspace's contacts that match filters, chosen
//! fields, as CSV, JSON lines or an Excel workbook (`.xlsx`), into storage;
//! the result holds a download link that expires (presigned on S3). Rows
//! are read in keyset pages and written as one chunk object per page, with
//! the checkpoint after each, so a hand-off or crash resumes at the next
//! page; at the end the chunks are streamed into the final file. A workbook
//! is a zip of XML parts that cannot be concatenated: its chunks are JSON
//! lines, turned into one sheet in constant-memory mode (each row goes to a
//! temporary file as it is written), and the finished file is uploaded in
//! parts.

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::{JobContext, JobError, JobHandler, Outcome, PayloadError};
use crate::db::DbError;
use crate::job::Progress;

pub struct BulkExport;

/// Fields an export may include, in their column order.
const FIELDS: [&str; 11] = [
    "id",
    "email",
    "first_name",
    "last_name",
    "phone",
    "company",
    "title",
    "stage",
    "score",
    "estimated_value",
    "created_at",
];
const PAGE: i64 = 10_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportFilters {
    pub tag: Option<String>,
    pub stage: Option<String>,
    pub created_after: Option<DateTime<Utc>>,
    pub min_score: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportPayload {
    #[serde(default)]
    pub filters: ExportFilters,
    /// Default: every field.
    #[serde(default)]
    pub fields: Vec<String>,
    /// `csv` (default), `jsonl` or `xlsx`.
    #[serde(default = "csv")]
    pub format: String,
}

fn csv() -> String {
    "csv".into()
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Cursor {
    after: Option<Uuid>,
    chunks: u32,
    rows: u64,
}

#[async_trait]
impl JobHandler for BulkExport {
    type Payload = ExportPayload;
    const TYPE: &'static str = "bulk_export";

    fn validate(&self, p: &ExportPayload) -> Result<(), PayloadError> {
        if let Some((i, f)) = p
            .fields
            .iter()
            .enumerate()
            .find(|(_, f)| !FIELDS.contains(&f.as_str()))
        {
            return Err(PayloadError::field(
                &format!("fields[{i}]"),
                format!("unknown field {f:?}; known: {}", FIELDS.join(", ")),
            ));
        }
        if !matches!(p.format.as_str(), "csv" | "jsonl" | "xlsx") {
            return Err(PayloadError::field("format", "csv, jsonl or xlsx"));
        }
        Ok(())
    }

    async fn run(&self, p: ExportPayload, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let fields: Vec<&str> = if p.fields.is_empty() {
            FIELDS.to_vec()
        } else {
            FIELDS
                .iter()
                .copied()
                .filter(|f| p.fields.iter().any(|x| x == f))
                .collect()
        };
        let ws = ctx.workspace_id().0;
        let mut cur: Cursor = ctx.checkpoint().unwrap_or_default();
        let chunks_at = ctx.file_key("chunks");
        let chunk_key = |n: u32| format!("{chunks_at}/{n:06}");
        loop {
            if ctx.cancelled().await? {
                return Ok(Outcome::Cancelled(Some(json!({ "rows": cur.rows }))));
            }
            if ctx.should_hand_off() {
                return Ok(ctx.hand_off(&cur));
            }
            let rows = {
                let db = ctx.db().get().await.map_err(DbError::from)?;
                let stmt = db
                    .prepare_cached(
                        "SELECT id, email, first_name, last_name, phone, company, title, stage, score, \
                           estimated_value::text, created_at \
                         FROM contacts c WHERE workspace_id = $1 AND ($2::uuid IS NULL OR id > $2) \
                           AND ($3::text IS NULL OR stage = $3) \
                           AND ($4::timestamptz IS NULL OR created_at >= $4) \
                           AND ($5::int4 IS NULL OR score >= $5) \
                           AND ($6::text IS NULL OR EXISTS (SELECT 1 FROM contact_tags t \
                                WHERE t.contact_id = c.id AND t.tag = $6)) \
                         ORDER BY id LIMIT $7",
                    )
                    .await
                    .map_err(DbError::from)?;
                db.query(
                    &stmt,
                    &[
                        &ws,
                        &cur.after,
                        &p.filters.stage,
                        &p.filters.created_after,
                        &p.filters.min_score,
                        &p.filters.tag,
                        &PAGE,
                    ],
                )
                .await
                .map_err(DbError::from)?
            };
            if rows.is_empty() {
                break;
            }
            let mut out = Vec::with_capacity(rows.len() * 80);
            if p.format == "csv" {
                let mut w = csv::WriterBuilder::new()
                    .has_headers(false)
                    .from_writer(&mut out);
                if cur.chunks == 0 {
                    w.write_record(&fields)
                        .map_err(|e| JobError::Retryable(e.to_string()))?;
                }
                for r in &rows {
                    let rec: Vec<String> = fields.iter().map(|f| text(r, f)).collect();
                    w.write_record(&rec)
                        .map_err(|e| JobError::Retryable(e.to_string()))?;
                }
                w.flush().map_err(|e| JobError::Retryable(e.to_string()))?;
            } else {
                for r in &rows {
                    let obj: Map<String, Value> = fields
                        .iter()
                        .map(|f| (f.to_string(), value(r, f)))
                        .collect();
                    serde_json::to_writer(&mut out, &obj)
                        .map_err(|e| JobError::Retryable(e.to_string()))?;
                    out.push(b'\n');
                }
            }
            ctx.storage()
                .put(&chunk_key(cur.chunks), Bytes::from(out))
                .await?;
            cur.chunks += 1;
            cur.rows += rows.len() as u64;
            cur.after = rows.last().map(|r| r.get(0));
            ctx.save_checkpoint(&cur).await?;
            ctx.progress(Progress {
                processed: cur.rows,
                stage: Some("exporting".into()),
                message: Some(format!("{} contacts written", cur.rows)),
                ..Progress::default()
            })
            .await?;
            if (rows.len() as i64) < PAGE {
                break;
            }
        }
        let name = format!("contacts.{}", p.format);
        let key = ctx.file_key(&name);
        let sources: Vec<String> = (0..cur.chunks).map(chunk_key).collect();
        if p.format == "xlsx" {
            ctx.progress(Progress {
                processed: cur.rows,
                stage: Some("writing workbook".into()),
                message: Some(format!("{} contacts read", cur.rows)),
                ..Progress::default()
            })
            .await?;
            xlsx::write(ctx.storage(), &sources, &key, &fields).await?;
        } else if cur.chunks == 0 && p.format == "csv" {
            // No rows: still a valid CSV with its header.
            let header = format!("{}\n", fields.join(","));
            ctx.storage().put(&key, Bytes::from(header)).await?;
        } else {
            ctx.storage().concat(&sources, &key).await?;
        }
        ctx.log("info", format!("Exported {} contacts", cur.rows), None)
            .await?;
        Ok(Outcome::Completed(Some(json!({
            "rows": cur.rows,
            "format": p.format,
            "key": key,
            "files": [name],
            "download_url": ctx.file_path(&name),
        }))))
    }
}

/// The `.xlsx` writer: JSON-lines chunks in, one workbook out.
mod xlsx {
    use bytes::Bytes;
    use chrono::{DateTime, Utc};
    use futures::{StreamExt, TryStreamExt};
    use rust_xlsxwriter::{Format, Workbook, Worksheet, XlsxError};
    use serde_json::{Map, Value};

    use crate::handlers::JobError;
    use crate::storage::{Storage, StorageError};

    /// Rows of a sheet, the header included (Excel's limit); an export with
    /// more goes on to a second sheet, and so on.
    const SHEET_ROWS: u32 = 1_048_576;
    /// Characters a cell holds at most (Excel's limit); longer text is cut.
    const CELL_CHARS: usize = 32_767;

    fn failed(e: XlsxError) -> JobError {
        JobError::Retryable(format!("writing the workbook: {e}"))
    }

    /// Writes `dest` from the JSON-lines chunks `sources` (in order) with
    /// `fields` as columns, then deletes the chunks. Chunks are read one at
    /// a time and handed to a blocking thread that writes the rows; the
    /// workbook is saved to a temporary file and uploaded from it.
    pub async fn write(
        storage: &Storage,
        sources: &[String],
        dest: &str,
        fields: &[&str],
    ) -> Result<(), JobError> {
        let file = tempfile::NamedTempFile::new()
            .map_err(|e| JobError::Retryable(format!("a temporary file for the workbook: {e}")))?;
        let path = file.path().to_path_buf();
        let columns: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
        // Two chunks in flight at most: one being written, one read ahead.
        // The send waits without blocking the runtime's thread.
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let writer = tokio::task::spawn_blocking(move || build(&columns, rx, &path));
        for key in sources {
            let chunk: Vec<Bytes> = storage
                .get_stream(key)
                .await?
                .try_collect()
                .await
                .map_err(|e| StorageError::Failed(e.to_string()))?;
            if tx.send(Bytes::from(chunk.concat())).await.is_err() {
                break; // the writer stopped; its error is below
            }
        }
        drop(tx);
        writer
            .await
            .map_err(|e| JobError::Retryable(format!("the workbook writer stopped: {e}")))??;
        let body = tokio::fs::File::open(file.path())
            .await
            .map_err(|e| JobError::Retryable(format!("reading the workbook back: {e}")))?;
        let parts = tokio_util::io::ReaderStream::with_capacity(body, 1 << 20)
            .map(|r| r.map_err(|e| JobError::Retryable(format!("reading the workbook back: {e}"))));
        storage.put_stream(dest, parts.boxed()).await?;
        for key in sources {
            storage.delete(key).await?;
        }
        Ok(())
    }

    /// The blocking part: rows from `chunks` into a constant-memory workbook
    /// saved at `path`.
    fn build(
        fields: &[String],
        mut chunks: tokio::sync::mpsc::Receiver<Bytes>,
        path: &std::path::Path,
    ) -> Result<(), JobError> {
        let mut book = Workbook::new();
        let bold = Format::new().set_bold();
        let when = Format::new().set_num_format("yyyy-mm-dd hh:mm:ss");
        let money = Format::new().set_num_format("#,##0.00");
        let mut sheets = 0usize;
        let mut row = SHEET_ROWS; // start a sheet at the first row
        let mut any = false;
        while let Some(chunk) = chunks.blocking_recv() {
            for line in chunk.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let obj: Map<String, Value> = serde_json::from_slice(line)
                    .map_err(|e| JobError::Retryable(format!("an export chunk is damaged: {e}")))?;
                if row == SHEET_ROWS {
                    sheets += 1;
                    new_sheet(&mut book, sheets, fields, &bold)?;
                    row = 1;
                }
                let sheet = book.worksheet_from_index(sheets - 1).map_err(failed)?;
                for (col, f) in fields.iter().enumerate() {
                    cell(sheet, row, col as u16, f, &obj[f.as_str()], &when, &money)
                        .map_err(failed)?;
                }
                row += 1;
                any = true;
            }
        }
        if !any {
            // No rows: still a workbook with its header.
            new_sheet(&mut book, 1, fields, &bold)?;
        }
        book.save(path).map_err(failed)
    }

    fn new_sheet(
        book: &mut Workbook,
        n: usize,
        fields: &[String],
        bold: &Format,
    ) -> Result<(), JobError> {
        let sheet = book.add_worksheet_with_constant_memory().map_err(failed)?;
        let name = if n == 1 {
            "Contacts".to_string()
        } else {
            format!("Contacts {n}")
        };
        sheet.set_name(name).map_err(failed)?;
        for (col, f) in fields.iter().enumerate() {
            let width = match f.as_str() {
                "id" => 38.0,
                "email" | "created_at" => 28.0,
                _ => 16.0,
            };
            sheet.set_column_width(col as u16, width).map_err(failed)?;
            sheet
                .write_string_with_format(0, col as u16, f, bold)
                .map_err(failed)?;
        }
        sheet.set_freeze_panes(1, 0).map_err(failed)?;
        Ok(())
    }

    /// One cell: numbers as numbers, `created_at` as a date and time (UTC),
    /// text as text (never a formula), nothing for null.
    fn cell(
        sheet: &mut Worksheet,
        row: u32,
        col: u16,
        field: &str,
        v: &Value,
        when: &Format,
        money: &Format,
    ) -> Result<(), XlsxError> {
        match (field, v) {
            (_, Value::Null) => {}
            ("created_at", Value::String(s)) => match s.parse::<DateTime<Utc>>() {
                Ok(t) => {
                    sheet.write_datetime_with_format(row, col, t.naive_utc(), when)?;
                }
                Err(_) => {
                    sheet.write_string(row, col, s.as_str())?;
                }
            },
            ("estimated_value", Value::String(s)) => match s.parse::<f64>() {
                Ok(x) => {
                    sheet.write_number_with_format(row, col, x, money)?;
                }
                Err(_) => {
                    sheet.write_string(row, col, s.as_str())?;
                }
            },
            (_, Value::Number(n)) => {
                sheet.write_number(row, col, n.as_f64().unwrap_or_default())?;
            }
            (_, Value::String(s)) => {
                let s = match s.char_indices().nth(CELL_CHARS) {
                    Some((at, _)) => &s[..at],
                    None => s.as_str(),
                };
                sheet.write_string(row, col, s)?;
            }
            (_, other) => {
                sheet.write_string(row, col, other.to_string())?;
            }
        }
        Ok(())
    }
}

fn text(r: &tokio_postgres::Row, field: &str) -> String {
    match value(r, field) {
        Value::Null => String::new(),
        Value::String(s) => s,
        other => other.to_string(),
    }
}

fn value(r: &tokio_postgres::Row, field: &str) -> Value {
    match field {
        "id" => json!(r.get::<_, Uuid>(0)),
        "score" => json!(r.get::<_, Option<i32>>(8)),
        "created_at" => json!(r.get::<_, DateTime<Utc>>(10)),
        other => {
            let i = FIELDS.iter().position(|f| *f == other).unwrap_or(1);
            json!(r.get::<_, Option<String>>(i))
        }
    }
}
