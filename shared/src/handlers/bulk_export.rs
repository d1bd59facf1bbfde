//! `bulk_export`: the workspace's contacts that match filters, chosen
//! fields, as CSV or JSON lines, into storage; the result holds a download
//! link that expires (presigned on S3). Rows are read in keyset pages and
//! written as one chunk object per page, with the checkpoint after each, so
//! a hand-off or crash resumes at the next page; at the end the chunks are
//! streamed into the final file.

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
    /// `csv` (default) or `jsonl`.
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
        if !matches!(p.format.as_str(), "csv" | "jsonl") {
            return Err(PayloadError::field("format", "csv or jsonl"));
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
        let ext = if p.format == "csv" { "csv" } else { "jsonl" };
        let name = format!("contacts.{ext}");
        let key = ctx.file_key(&name);
        if cur.chunks == 0 && p.format == "csv" {
            // No rows: still a valid CSV with its header.
            let header = format!("{}\n", fields.join(","));
            ctx.storage().put(&key, Bytes::from(header)).await?;
        } else {
            let sources: Vec<String> = (0..cur.chunks).map(chunk_key).collect();
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
