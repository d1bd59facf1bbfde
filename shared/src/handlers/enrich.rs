//! `enrich_contact` and `enrich_account`: fill contacts' and accounts' fields
//! from a data provider the workspace configured (`enrichment_providers`:
//! base URL, API key, where the provider's answer holds each field, calls per
//! hour). Records go one at a time, each in one transaction with the new
//! values, a snapshot of what changed (`enrichment_history`) and the
//! checkpoint, so a crash or hand-off resumes at the next record and never
//! writes one twice. The calls per hour are a token bucket per workspace and
//! provider: an empty one snoozes the job until it refills, spending no
//! attempt; so does the provider's own 429 (after its `Retry-After`). 5xx,
//! 408 and timeouts are tried again a few times, then the job retries with
//! backoff from its checkpoint; a refused API key is permanent; another 4xx
//! about one record is counted as that record's failure and the job goes on.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::webhook::{http_url, pinned_client};
use super::{JobContext, JobError, JobHandler, Outcome, PayloadError};
use crate::db::DbError;
use crate::job::Progress;

/// Most contacts one `enrich_contact` job enriches.
pub const MAX_CONTACTS: usize = 1000;
/// How long a provider has to answer one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Pauses before calling again after a 5xx, 408 or timeout; then the job
/// retries with backoff.
pub(super) const UNAVAILABLE_PAUSES: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_millis(800),
    Duration::from_millis(3200),
];
/// The snooze after a 429 without a usable `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Most of a provider's answer read.
const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// What a field holds, for checking a provider's value before it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Text up to 1 000 characters.
    Text,
    /// A whole number from 0.
    Count,
    /// An amount of money.
    Money,
    /// A list of short texts.
    Tags,
    /// Names to http(s) links.
    Links,
}

/// The records a provider enriches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entity {
    Contact,
    Account,
}

impl Entity {
    fn name(self) -> &'static str {
        match self {
            Entity::Contact => "contact",
            Entity::Account => "account",
        }
    }

    /// The fields a provider may fill.
    fn fields(self) -> &'static [(&'static str, Kind)] {
        match self {
            Entity::Contact => &[
                ("first_name", Kind::Text),
                ("last_name", Kind::Text),
                ("phone", Kind::Text),
                ("company", Kind::Text),
                ("title", Kind::Text),
                ("linkedin_url", Kind::Text),
            ],
            Entity::Account => &[
                ("name", Kind::Text),
                ("industry", Kind::Text),
                ("employee_count", Kind::Count),
                ("revenue", Kind::Money),
                ("technologies", Kind::Tags),
                ("social_links", Kind::Links),
            ],
        }
    }

    /// Whether a provider may fill `field` of this entity.
    pub fn has(self, field: &str) -> bool {
        self.fields().iter().any(|(f, _)| *f == field)
    }

    /// Every field enrichment fills, contacts' then accounts'.
    pub fn known() -> Vec<&'static str> {
        [Entity::Contact, Entity::Account]
            .iter()
            .flat_map(|e| e.fields().iter().map(|(f, _)| *f))
            .collect()
    }

    /// The column a provider finds the record by, and the path of the call.
    fn key(self) -> (&'static str, &'static str) {
        match self {
            Entity::Contact => ("email", "people/enrich"),
            Entity::Account => ("domain", "companies/enrich"),
        }
    }

    /// The record's key column (see [`Entity::key`]), if it is in the
    /// workspace.
    fn select_key(self) -> &'static str {
        match self {
            Entity::Contact => "SELECT email FROM contacts WHERE id = $1 AND workspace_id = $2",
            Entity::Account => "SELECT domain FROM accounts WHERE id = $1 AND workspace_id = $2",
        }
    }

    /// The record's fields as JSON, locked for the caller's transaction.
    fn select(self) -> &'static str {
        match self {
            Entity::Contact => {
                "SELECT to_jsonb(t) FROM contacts t WHERE id = $1 AND workspace_id = $2 FOR UPDATE"
            }
            Entity::Account => {
                "SELECT to_jsonb(t) FROM accounts t WHERE id = $1 AND workspace_id = $2 FOR UPDATE"
            }
        }
    }

    /// Writes the fields present in `$3` (checked values), and the time.
    fn update(self) -> &'static str {
        match self {
            Entity::Contact => {
                "UPDATE contacts SET \
                   first_name = CASE WHEN $3::jsonb ? 'first_name' THEN $3->>'first_name' ELSE first_name END, \
                   last_name = CASE WHEN $3 ? 'last_name' THEN $3->>'last_name' ELSE last_name END, \
                   phone = CASE WHEN $3 ? 'phone' THEN $3->>'phone' ELSE phone END, \
                   company = CASE WHEN $3 ? 'company' THEN $3->>'company' ELSE company END, \
                   title = CASE WHEN $3 ? 'title' THEN $3->>'title' ELSE title END, \
                   linkedin_url = CASE WHEN $3 ? 'linkedin_url' THEN $3->>'linkedin_url' ELSE linkedin_url END, \
                   enriched_at = $4, updated_at = $4 \
                 WHERE id = $1 AND workspace_id = $2"
            }
            Entity::Account => {
                "UPDATE accounts SET \
                   name = CASE WHEN $3::jsonb ? 'name' THEN $3->>'name' ELSE name END, \
                   industry = CASE WHEN $3 ? 'industry' THEN $3->>'industry' ELSE industry END, \
                   employee_count = CASE WHEN $3 ? 'employee_count' \
                     THEN ($3->>'employee_count')::int4 ELSE employee_count END, \
                   revenue = CASE WHEN $3 ? 'revenue' THEN ($3->>'revenue')::numeric ELSE revenue END, \
                   technologies = CASE WHEN $3 ? 'technologies' \
                     THEN ARRAY(SELECT jsonb_array_elements_text($3->'technologies')) ELSE technologies END, \
                   social_links = CASE WHEN $3 ? 'social_links' THEN $3->'social_links' ELSE social_links END, \
                   enriched_at = $4, updated_at = $4 \
                 WHERE id = $1 AND workspace_id = $2"
            }
        }
    }
}

/// A workspace's data provider, as configured.
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    pub name: String,
    pub base_url: String,
    pub api_key: String,
    /// Our field → the dotted path of the provider's answer that holds it
    /// (a field not listed is looked for under its own name).
    pub field_map: BTreeMap<String, String>,
    pub calls_per_hour: i32,
}

impl ProviderConfig {
    /// The provider `name` of `workspace`, if configured.
    pub async fn load(
        db: &impl deadpool_postgres::GenericClient,
        workspace: Uuid,
        name: &str,
    ) -> Result<Option<ProviderConfig>, DbError> {
        let stmt = db
            .prepare_cached(
                "SELECT base_url, api_key, field_map, calls_per_hour FROM enrichment_providers \
                 WHERE workspace_id = $1 AND name = $2",
            )
            .await?;
        Ok(db.query_opt(&stmt, &[&workspace, &name]).await?.map(|r| {
            let map: Value = r.get(2);
            ProviderConfig {
                name: name.to_string(),
                base_url: r.get(0),
                api_key: r.get(1),
                field_map: serde_json::from_value(map).unwrap_or_default(),
                calls_per_hour: r.get(3),
            }
        }))
    }

    /// Where the answer holds `field`.
    fn path<'a>(&'a self, field: &'a str) -> &'a str {
        self.field_map
            .get(field)
            .map(String::as_str)
            .unwrap_or(field)
    }
}

/// How a provider call failed.
#[derive(Debug)]
pub enum ProviderError {
    /// 429: call again after this long.
    RateLimited(Duration),
    /// 5xx, 408, a timeout or a lost connection: worth calling again.
    Unavailable(String),
    /// 401 or 403: the API key is wrong for every record.
    Refused(String),
    /// Another 4xx: this record cannot be enriched.
    Rejected(String),
}

/// A data provider: the answer for one record, found by its key (a
/// contact's e-mail, an account's domain); `None` when it knows nothing.
#[async_trait]
pub trait Provider: Send + Sync {
    async fn lookup(&self, entity: Entity, key: &str) -> Result<Option<Value>, ProviderError>;
}

/// A provider over HTTP: `POST {base_url}/people/enrich` with `{"email"}`,
/// `POST {base_url}/companies/enrich` with `{"domain"}`, `Authorization:
/// Bearer {api_key}`; 200 with a JSON object, or 404 for an unknown record.
pub struct HttpProvider {
    client: reqwest::Client,
    base: reqwest::Url,
    api_key: String,
}

impl HttpProvider {
    /// Resolves the provider's host once and pins the client to the checked
    /// addresses (no DNS rebinding); internal addresses are refused unless
    /// `allow_private`.
    pub async fn connect(config: &ProviderConfig, allow_private: bool) -> Result<Self, JobError> {
        let (client, base) = base_client(
            &format!("provider {}", config.name),
            &config.base_url,
            allow_private,
            CALL_TIMEOUT,
            "Offload-Enrich/1",
            "enrichment providers",
        )
        .await?;
        Ok(HttpProvider {
            client,
            base,
            api_key: config.api_key.clone(),
        })
    }
}

/// A client pinned to the checked addresses of `base_url`'s host (see
/// [`pinned_client`]), and the URL as a base paths join onto (ending in
/// `/`); a URL that is not http(s) is a permanent error naming `what`.
pub(crate) async fn base_client(
    what: &str,
    base_url: &str,
    allow_private: bool,
    timeout: Duration,
    user_agent: &str,
    who: &str,
) -> Result<(reqwest::Client, reqwest::Url), JobError> {
    let mut base = http_url(base_url).map_err(|e| {
        JobError::Permanent(format!(
            "{what}: base_url {:?}: {e}",
            crate::redact::url(base_url)
        ))
    })?;
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    let client = pinned_client(&base, allow_private, timeout, user_agent, who).await?;
    Ok((client, base))
}

#[async_trait]
impl Provider for HttpProvider {
    async fn lookup(&self, entity: Entity, key: &str) -> Result<Option<Value>, ProviderError> {
        let (field, path) = entity.key();
        let url = self
            .base
            .join(path)
            .map_err(|e| ProviderError::Refused(format!("bad provider URL: {e}")))?;
        let req = self
            .client
            .post(url)
            .bearer_auth(&self.api_key)
            .json(&json!({ field: key }));
        match call(req, CALL_TIMEOUT).await? {
            Some(v @ Value::Object(_)) => Ok(Some(v)),
            Some(_) => Err(ProviderError::Rejected(
                "the provider answered without a JSON object".into(),
            )),
            None => Ok(None),
        }
    }
}

/// Sends a provider's request and reads its JSON answer: `None` for a 404;
/// 429 is [`ProviderError::RateLimited`] (for its `Retry-After`), 401 and
/// 403 [`ProviderError::Refused`], 408, 5xx, timeouts and lost connections
/// [`ProviderError::Unavailable`], another 4xx or an answer that is not
/// JSON [`ProviderError::Rejected`], each saying what the provider said.
pub(crate) async fn call(
    req: reqwest::RequestBuilder,
    timeout: Duration,
) -> Result<Option<Value>, ProviderError> {
    let (client, req) = req.build_split();
    let req = req.map_err(|e| {
        ProviderError::Rejected(format!("bad request: {}", super::webhook::error_text(e)))
    })?;
    let host = req.url().host_str().unwrap_or_default().to_string();
    let resp = client.execute(req).await.map_err(|e| {
        ProviderError::Unavailable(if e.is_timeout() {
            format!("{host} did not answer within {} s", timeout.as_secs())
        } else {
            format!("cannot reach {host}: {}", super::webhook::error_text(e))
        })
    })?;
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.clamp(1, 900)));
    let mut body = Vec::new();
    let mut resp = resp;
    while let Some(chunk) = resp.chunk().await.map_err(|e| {
        ProviderError::Unavailable(format!(
            "{host}: answer cut short: {}",
            super::webhook::error_text(e)
        ))
    })? {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(ProviderError::Rejected(format!(
                "{host} answered more than {} KiB",
                MAX_ANSWER / 1024
            )));
        }
        body.extend_from_slice(&chunk);
    }
    let said = || {
        let text = String::from_utf8_lossy(&body);
        format!(
            "{host} answered {status}: {}",
            text.chars().take(300).collect::<String>()
        )
    };
    match status.as_u16() {
        200..=299 => serde_json::from_slice::<Value>(&body)
            .map(Some)
            .map_err(|_| ProviderError::Rejected(format!("{host} answered {status} without JSON"))),
        404 => Ok(None),
        429 => Err(ProviderError::RateLimited(
            retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
        )),
        401 | 403 => Err(ProviderError::Refused(said())),
        408 | 500..=599 => Err(ProviderError::Unavailable(said())),
        _ => Err(ProviderError::Rejected(said())),
    }
}

/// The value at a dotted path of an answer.
fn at<'a>(answer: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(answer, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

/// A provider's value for a field of `kind`, as it is written; `Err` says
/// why it is not (it is then left out, and the record's log line says so).
fn checked(kind: Kind, v: &Value) -> Result<Value, String> {
    let number = |v: &Value| match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match kind {
        Kind::Text => match v {
            Value::String(s) if !s.trim().is_empty() && s.chars().count() <= 1000 => {
                Ok(json!(s.trim()))
            }
            _ => Err("not a text of 1 to 1 000 characters".into()),
        },
        Kind::Count => match number(v) {
            Some(x) if x.fract() == 0.0 && (0.0..=i32::MAX as f64).contains(&x) => {
                Ok(json!(x as i64))
            }
            _ => Err("not a whole number from 0".into()),
        },
        Kind::Money => match number(v) {
            Some(x) if x.is_finite() && x.abs() < 1e16 => Ok(json!((x * 100.0).round() / 100.0)),
            _ => Err("not an amount".into()),
        },
        Kind::Tags => match v.as_array() {
            Some(items)
                if items.len() <= 200
                    && items
                        .iter()
                        .all(|i| i.as_str().is_some_and(|s| !s.is_empty() && s.len() <= 200)) =>
            {
                Ok(v.clone())
            }
            _ => Err("not a list of at most 200 short texts".into()),
        },
        Kind::Links => match v.as_object() {
            Some(m)
                if m.len() <= 20
                    && m.values().all(|u| {
                        u.as_str().is_some_and(|s| {
                            s.len() <= 2048
                                && reqwest::Url::parse(s)
                                    .is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
                        })
                    }) =>
            {
                Ok(v.clone())
            }
            _ => Err("not an object of at most 20 http(s) links".into()),
        },
    }
}

/// The same value as stored, for telling what changed (`numeric` comes back
/// from `to_jsonb` as a number; an amount is compared as one).
fn same(kind: Kind, before: &Value, after: &Value) -> bool {
    match kind {
        Kind::Money | Kind::Count => match (before.as_f64(), after.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => before == after,
        },
        _ => before == after,
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Cursor {
    /// The index of the next record.
    next: usize,
    enriched: u64,
    unchanged: u64,
    not_found: u64,
    missing: u64,
    failed: u64,
    calls: u64,
}

/// What one record came to.
enum Done {
    Enriched,
    Unchanged,
    NotFound,
    Missing,
    Failed,
}

/// Enriches `ids` of `entity` from `provider`, from the checkpoint on.
async fn enrich(
    ctx: &mut JobContext,
    entity: Entity,
    ids: &[Uuid],
    fields: &[String],
    provider: &str,
    allow_private: bool,
) -> Result<Outcome, JobError> {
    let ws = ctx.workspace_id().0;
    let config = {
        let db = ctx.db().get().await.map_err(DbError::from)?;
        ProviderConfig::load(&db, ws, provider).await?
    }
    .ok_or_else(|| {
        JobError::Permanent(format!(
            "no enrichment provider {provider:?} is configured for this workspace"
        ))
    })?;
    let client = HttpProvider::connect(&config, allow_private).await?;
    let kinds: Vec<(&str, Kind)> = entity
        .fields()
        .iter()
        .copied()
        .filter(|(f, _)| fields.is_empty() || fields.iter().any(|x| x == f))
        .collect();
    let bucket = format!("enrich:{ws}:{provider}");
    let per_hour = f64::from(config.calls_per_hour);
    let mut cur: Cursor = ctx.checkpoint().unwrap_or_default();
    while cur.next < ids.len() {
        if ctx.cancelled().await? {
            return Ok(Outcome::Cancelled(Some(result(&cur))));
        }
        if ctx.should_hand_off() {
            return Ok(ctx.hand_off(&cur));
        }
        let id = ids[cur.next];
        let key = {
            let db = ctx.db().get().await.map_err(DbError::from)?;
            let (col, _) = entity.key();
            let stmt = db
                .prepare_cached(entity.select_key())
                .await
                .map_err(DbError::from)?;
            db.query_opt(&stmt, &[&id, &ws])
                .await
                .map_err(DbError::from)?
                .map(|r| r.get::<_, Option<String>>(0).ok_or(col))
        };
        let done = match key {
            None => {
                ctx.log(
                    "warn",
                    format!("{} {id}: no such {0} in this workspace", entity.name()),
                    None,
                )
                .await?;
                Done::Missing
            }
            Some(Err(col)) => {
                ctx.log(
                    "warn",
                    format!("{} {id}: no {col} to look it up by", entity.name()),
                    None,
                )
                .await?;
                Done::Failed
            }
            Some(Ok(key)) => {
                if let Some(wait) = ctx
                    .take_token_or_wait(&bucket, per_hour, per_hour / 3600.0)
                    .await?
                {
                    ctx.save_checkpoint(&cur).await?;
                    ctx.log(
                        "info",
                        format!(
                            "{provider}: {} calls an hour used up; resuming in {} s",
                            config.calls_per_hour,
                            wait.as_secs().max(1)
                        ),
                        None,
                    )
                    .await?;
                    return Ok(Outcome::Snooze(wait.max(Duration::from_secs(1))));
                }
                cur.calls += 1;
                let mut pauses = UNAVAILABLE_PAUSES.iter();
                let answer = loop {
                    match client.lookup(entity, &key).await {
                        Err(ProviderError::Unavailable(why)) => match pauses.next() {
                            Some(p) => {
                                ctx.log("warn", format!("{why}; calling again"), None)
                                    .await?;
                                tokio::time::sleep(*p).await;
                                cur.calls += 1;
                            }
                            None => {
                                ctx.save_checkpoint(&cur).await?;
                                return Err(JobError::Retryable(why));
                            }
                        },
                        other => break other,
                    }
                };
                match answer {
                    Ok(Some(answer)) => {
                        write(ctx, entity, id, &config, &kinds, &answer, &mut cur).await?
                    }
                    Ok(None) => {
                        ctx.log(
                            "info",
                            format!("{} {id}: {provider} knows nothing of {key}", entity.name()),
                            None,
                        )
                        .await?;
                        Done::NotFound
                    }
                    Err(ProviderError::RateLimited(wait)) => {
                        ctx.save_checkpoint(&cur).await?;
                        ctx.log(
                            "info",
                            format!("{provider} answered 429; resuming in {} s", wait.as_secs()),
                            None,
                        )
                        .await?;
                        return Ok(Outcome::Snooze(wait));
                    }
                    Err(ProviderError::Refused(why)) => {
                        return Err(JobError::Permanent(format!(
                            "{provider} refused the API key: {why}"
                        )))
                    }
                    Err(ProviderError::Rejected(why)) => {
                        ctx.log("warn", format!("{} {id}: {why}", entity.name()), None)
                            .await?;
                        Done::Failed
                    }
                    Err(ProviderError::Unavailable(_)) => unreachable!("retried above"),
                }
            }
        };
        match done {
            Done::Enriched => {} // counted and checkpointed with the write
            Done::Unchanged => {}
            other => {
                match other {
                    Done::NotFound => cur.not_found += 1,
                    Done::Missing => cur.missing += 1,
                    _ => cur.failed += 1,
                }
                cur.next += 1;
                ctx.save_checkpoint(&cur).await?;
            }
        }
        let total = ids.len() as u64;
        ctx.progress(Progress {
            failed: cur.failed,
            stage: Some("enriching".into()),
            message: Some(format!(
                "{} of {total} {}s enriched",
                cur.enriched,
                entity.name()
            )),
            ..Progress::of(cur.next as u64, total)
        })
        .await?;
    }
    ctx.log(
        "info",
        format!(
            "{} enriched, {} unchanged, {} not found, {} failed, {} missing; {} calls",
            cur.enriched, cur.unchanged, cur.not_found, cur.failed, cur.missing, cur.calls
        ),
        None,
    )
    .await?;
    Ok(Outcome::Completed(Some(result(&cur))))
}

fn result(cur: &Cursor) -> Value {
    json!({
        "enriched": cur.enriched,
        "unchanged": cur.unchanged,
        "not_found": cur.not_found,
        "failed": cur.failed,
        "missing": cur.missing,
        "calls": cur.calls,
    })
}

/// Writes one record's new values, its snapshot, its log line and the
/// checkpoint past it in one transaction.
async fn write(
    ctx: &mut JobContext,
    entity: Entity,
    id: Uuid,
    config: &ProviderConfig,
    kinds: &[(&str, Kind)],
    answer: &Value,
    cur: &mut Cursor,
) -> Result<Done, JobError> {
    let ws = ctx.workspace_id().0;
    let job = ctx.job_id().0;
    let now = ctx.now();
    let mut db = ctx.db().get().await.map_err(DbError::from)?;
    let tx = db.transaction().await.map_err(DbError::from)?;
    let row = {
        let stmt = tx
            .prepare_cached(entity.select())
            .await
            .map_err(DbError::from)?;
        tx.query_opt(&stmt, &[&id, &ws])
            .await
            .map_err(DbError::from)?
    };
    let Some(row) = row else {
        drop(tx);
        ctx.log(
            "warn",
            format!("{} {id}: deleted while it was enriched", entity.name()),
            None,
        )
        .await?;
        return Ok(Done::Missing);
    };
    let current: Value = row.get(0);
    let (mut before, mut after, mut skipped) = (Map::new(), Map::new(), Vec::new());
    for (field, kind) in kinds {
        let Some(v) = at(answer, config.path(field)) else {
            continue;
        };
        match checked(*kind, v) {
            Ok(v) => {
                let was = current.get(*field).cloned().unwrap_or(Value::Null);
                if !same(*kind, &was, &v) {
                    before.insert(field.to_string(), was);
                    after.insert(field.to_string(), v);
                }
            }
            Err(why) => skipped.push(format!("{field}: {why}")),
        }
    }
    let after = Value::Object(after);
    let stmt = tx
        .prepare_cached(entity.update())
        .await
        .map_err(DbError::from)?;
    tx.execute(&stmt, &[&id, &ws, &after, &now])
        .await
        .map_err(DbError::from)?;
    let stmt = tx
        .prepare_cached(
            "INSERT INTO enrichment_history (workspace_id, entity, entity_id, job_id, provider, before, after, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (job_id, entity_id) DO NOTHING",
        )
        .await
        .map_err(DbError::from)?;
    let changed = after.as_object().map_or(0, Map::len);
    let fresh = tx
        .execute(
            &stmt,
            &[
                &ws,
                &entity.name(),
                &id,
                &job,
                &config.name,
                &Value::Object(before),
                &after,
                &now,
            ],
        )
        .await
        .map_err(DbError::from)?;
    let done = if changed > 0 {
        Done::Enriched
    } else {
        Done::Unchanged
    };
    match done {
        Done::Enriched => cur.enriched += 1,
        _ => cur.unchanged += 1,
    }
    cur.next += 1;
    if fresh > 0 {
        let mut line = if changed > 0 {
            let names: Vec<&str> = after
                .as_object()
                .map(|m| m.keys().map(String::as_str).collect())
                .unwrap_or_default();
            format!(
                "{} {id}: {} set {}",
                entity.name(),
                config.name,
                names.join(", ")
            )
        } else {
            format!("{} {id}: {} had nothing new", entity.name(), config.name)
        };
        if !skipped.is_empty() {
            line.push_str(&format!("; left out {}", skipped.join("; ")));
        }
        ctx.log_in(
            &tx,
            "info",
            line,
            Some(json!({ "entity_id": id, "changed": after })),
        )
        .await?;
        ctx.save_checkpoint_in(&tx, &*cur).await?;
        tx.commit().await.map_err(DbError::from)?;
    } else {
        // Written by an earlier run of this job that did not get to its
        // checkpoint: this run's write is rolled back, the record counted.
        tx.rollback().await.map_err(DbError::from)?;
        drop(db);
        ctx.save_checkpoint(&*cur).await?;
    }
    Ok(done)
}

/// Checks `enrich_fields` against what `entity` has.
fn check_fields(entity: Entity, fields: &[String]) -> Result<(), PayloadError> {
    for (i, f) in fields.iter().enumerate() {
        if !entity.fields().iter().any(|(x, _)| x == f) {
            let known: Vec<&str> = entity.fields().iter().map(|(x, _)| *x).collect();
            return Err(PayloadError::field(
                &format!("enrich_fields[{i}]"),
                format!("unknown field {f:?}; known: {}", known.join(", ")),
            ));
        }
    }
    Ok(())
}

/// A provider's name: 1 to 40 of a-z, 0-9, `_` and `-`.
pub(crate) fn valid_provider_name(name: &str) -> bool {
    (1..=40).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn check_provider(name: &str) -> Result<(), PayloadError> {
    if valid_provider_name(name) {
        Ok(())
    } else {
        Err(PayloadError::field(
            "provider",
            "the name of a configured provider: 1 to 40 of a-z, 0-9, _ and -",
        ))
    }
}

/// `enrich_contact`; `allow_private` lets it call providers on internal
/// addresses (as `OFFLOAD_WEBHOOK_ALLOW_PRIVATE` does for webhooks).
#[derive(Clone, Copy, Debug, Default)]
pub struct EnrichContact {
    pub allow_private: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichContactPayload {
    pub contact_ids: Vec<Uuid>,
    /// Default: every field the provider answers.
    #[serde(default)]
    pub enrich_fields: Vec<String>,
    pub provider: String,
}

#[async_trait]
impl JobHandler for EnrichContact {
    type Payload = EnrichContactPayload;
    const TYPE: &'static str = "enrich_contact";

    fn validate(&self, p: &EnrichContactPayload) -> Result<(), PayloadError> {
        super::check_contact_ids(&p.contact_ids, MAX_CONTACTS)?;
        check_fields(Entity::Contact, &p.enrich_fields)?;
        check_provider(&p.provider)
    }

    async fn run(
        &self,
        p: EnrichContactPayload,
        ctx: &mut JobContext,
    ) -> Result<Outcome, JobError> {
        enrich(
            ctx,
            Entity::Contact,
            &p.contact_ids,
            &p.enrich_fields,
            &p.provider,
            self.allow_private,
        )
        .await
    }
}

/// `enrich_account`; `allow_private` as for [`EnrichContact`].
#[derive(Clone, Copy, Debug, Default)]
pub struct EnrichAccount {
    pub allow_private: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichAccountPayload {
    pub account_id: Uuid,
    #[serde(default)]
    pub enrich_fields: Vec<String>,
    pub provider: String,
}

#[async_trait]
impl JobHandler for EnrichAccount {
    type Payload = EnrichAccountPayload;
    const TYPE: &'static str = "enrich_account";

    fn validate(&self, p: &EnrichAccountPayload) -> Result<(), PayloadError> {
        check_fields(Entity::Account, &p.enrich_fields)?;
        check_provider(&p.provider)
    }

    async fn run(
        &self,
        p: EnrichAccountPayload,
        ctx: &mut JobContext,
    ) -> Result<Outcome, JobError> {
        enrich(
            ctx,
            Entity::Account,
            &[p.account_id],
            &p.enrich_fields,
            &p.provider,
            self.allow_private,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_values_are_checked_before_they_are_written() {
        assert_eq!(checked(Kind::Text, &json!("  CTO ")), Ok(json!("CTO")));
        assert!(checked(Kind::Text, &json!("")).is_err());
        assert!(checked(Kind::Text, &json!(42)).is_err());
        assert_eq!(checked(Kind::Count, &json!("250")), Ok(json!(250)));
        assert!(checked(Kind::Count, &json!(-1)).is_err());
        assert!(checked(Kind::Count, &json!(2.5)).is_err());
        assert_eq!(checked(Kind::Money, &json!("1234.567")), Ok(json!(1234.57)));
        assert!(checked(Kind::Money, &json!("lots")).is_err());
        assert!(checked(Kind::Tags, &json!(["rust", "postgres"])).is_ok());
        assert!(checked(Kind::Tags, &json!(["rust", 1])).is_err());
        assert!(checked(Kind::Links, &json!({"linkedin": "https://x.test/a"})).is_ok());
        assert!(checked(Kind::Links, &json!({"x": "javascript:alert(1)"})).is_err());
        assert_eq!(
            at(&json!({"person": {"title": "CTO"}}), "person.title"),
            Some(&json!("CTO"))
        );
        assert_eq!(
            at(&json!({"person": {"title": null}}), "person.title"),
            None
        );
        assert!(same(Kind::Money, &json!(1000.0), &json!(1000)));
    }
}
