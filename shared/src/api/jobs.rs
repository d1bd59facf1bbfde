//! The job routes: create, list, get (with long-poll and ETag), cancel,
//! retry, delete, logs, files.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Problem};
use super::extract::{from_text, Bounded, Ids, JsonBody, Member, Params, Rfc3339, Viewer, WsPath};
use super::AppState;
use crate::enqueue;
use crate::ids::{JobId, WorkspaceId};
use crate::job::{Job, JobStatus, QueueName};
use crate::store::{ListFilter, NewJob};

/// How far ahead `run_at` may be.
const MAX_RUN_AT_AHEAD: chrono::Duration = chrono::Duration::days(365);
/// How far in the past a `run_at` may be and still count as "now" (clock skew).
const RUN_AT_SKEW: chrono::Duration = chrono::Duration::seconds(30);
const MAX_TAGS: usize = 20;
const MAX_TAG_LEN: usize = 100;
const MAX_KEY_LEN: usize = 255;
/// Longest `?wait=` for a long-poll.
const MAX_WAIT_SECS: u64 = 25;
/// When a long-poll reads its job once more after registering its watch.
const WATCH_RECHECK: Duration = Duration::from_secs(1);

/// The body of `POST /api/workspaces/{ws}/jobs`.
#[derive(Debug, Deserialize, Serialize, Clone, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    #[serde(rename = "type")]
    pub job_type: String,
    /// Validated against the type's schema.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub payload: Value,
    /// `high`, `default` (default) or `low`.
    pub queue: Option<String>,
    pub priority: Option<i64>,
    pub run_at: Option<DateTime<Utc>>,
    pub max_attempts: Option<i64>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Names this job so a repeated request returns it instead of making
    /// another: in a batch, each job's own key (a retried batch creates
    /// only what is missing); on a single create, the same as the
    /// `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
}

fn empty_object() -> Value {
    json!({})
}

/// The fields a job and a schedule's job template share, checked.
pub(super) struct JobTemplate {
    pub queue: QueueName,
    pub priority: i16,
    pub max_attempts: i32,
}

/// What a job and a schedule's job template say about the job, unchecked.
pub(super) struct TemplateInput<'a> {
    pub job_type: &'a str,
    pub payload: &'a Value,
    pub queue: Option<&'a str>,
    pub priority: Option<i64>,
    pub max_attempts: Option<i64>,
    pub tags: &'a [String],
}

/// Checks the type, payload, queue, priority, attempts and tags of a job
/// (or of a schedule's job template), naming the field at fault.
pub(super) fn check_template(
    state: &AppState,
    workspace: WorkspaceId,
    t: TemplateInput<'_>,
) -> Result<JobTemplate, ApiError> {
    let TemplateInput {
        job_type,
        payload,
        queue,
        priority,
        max_attempts,
        tags,
    } = t;
    state
        .registry
        .validate(job_type, payload, workspace)
        .map_err(|e| {
            let field = match e.field.as_deref() {
                Some("type") => "type".to_string(),
                Some(f) => format!("payload.{f}"),
                None => "payload".to_string(),
            };
            ApiError::invalid(&field, e.message)
        })?;
    let queue = match queue {
        None => QueueName::Default,
        Some(q) => q
            .parse()
            .map_err(|e: String| ApiError::invalid("queue", e))?,
    };
    let priority = priority.unwrap_or(0);
    if !(0..=10).contains(&priority) {
        return Err(ApiError::invalid(
            "priority",
            format!("priority must be from 0 to 10, got {priority}"),
        ));
    }
    let max_attempts = max_attempts.unwrap_or(5);
    if !(1..=100).contains(&max_attempts) {
        return Err(ApiError::invalid(
            "max_attempts",
            format!("max_attempts must be from 1 to 100, got {max_attempts}"),
        ));
    }
    if tags.len() > MAX_TAGS {
        return Err(ApiError::invalid(
            "tags",
            format!("at most {MAX_TAGS} tags, got {}", tags.len()),
        ));
    }
    for (i, t) in tags.iter().enumerate() {
        if t.is_empty() || t.chars().count() > MAX_TAG_LEN || t.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                &format!("tags[{i}]"),
                format!("a tag is 1 to {MAX_TAG_LEN} printable characters"),
            ));
        }
    }
    Ok(JobTemplate {
        queue,
        priority: priority as i16,
        max_attempts: max_attempts as i32,
    })
}

/// 403 when the job type is for admins (destructive work) and the caller
/// is not one.
fn require_role(
    state: &AppState,
    member: &Member,
    job_type: &str,
    payload: &serde_json::Value,
) -> Result<(), ApiError> {
    if let Some(ty) = state.registry.admin_only(job_type, payload) {
        member.require_admin().map_err(|_| {
            ApiError::forbidden(format!("only a workspace admin may run {ty} jobs"))
        })?;
    }
    Ok(())
}

/// Checks a create request against every rule, naming the field at fault.
fn validate(
    state: &AppState,
    member: &Member,
    body: CreateJob,
    idempotency_key: Option<String>,
    now: DateTime<Utc>,
) -> Result<NewJob, ApiError> {
    require_role(state, member, &body.job_type, &body.payload)?;
    let tpl = check_template(
        state,
        member.workspace,
        TemplateInput {
            job_type: &body.job_type,
            payload: &body.payload,
            queue: body.queue.as_deref(),
            priority: body.priority,
            max_attempts: body.max_attempts,
            tags: &body.tags,
        },
    )?;
    let run_at = match body.run_at {
        None => now,
        Some(t) if t < now - RUN_AT_SKEW => {
            return Err(ApiError::invalid(
                "run_at",
                format!("run_at {t} is in the past"),
            ))
        }
        Some(t) if t > now + MAX_RUN_AT_AHEAD => {
            return Err(ApiError::invalid(
                "run_at",
                "run_at may be at most one year ahead",
            ))
        }
        Some(t) => t.max(now),
    };
    Ok(NewJob {
        id: JobId::new(),
        workspace_id: member.workspace,
        created_by: Some(member.user),
        job_type: body.job_type,
        queue: tpl.queue,
        priority: tpl.priority,
        payload: body.payload,
        max_attempts: tpl.max_attempts,
        run_at,
        idempotency_key,
        tags: body.tags,
        parent: None,
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = valid_key(v.to_str().unwrap_or("\u{0}")).map_err(|why| {
        ApiError::bad_request(format!("Idempotency-Key {why}")).with_field("Idempotency-Key")
    })?;
    Ok(Some(key))
}

/// An idempotency key as stored: 1 to [`MAX_KEY_LEN`] visible ASCII
/// characters, trimmed, not starting with the prefix of the keys children
/// carry (a member who took one could make a parent take their job as its
/// child); otherwise what is wrong with it.
fn valid_key(raw: &str) -> Result<String, String> {
    let k = raw.trim();
    if k.is_empty()
        || k.len() > MAX_KEY_LEN
        || !k.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(format!(
            "must be 1 to {MAX_KEY_LEN} visible ASCII characters"
        ));
    }
    if k.starts_with(crate::store::RESERVED_KEY_PREFIX) {
        return Err(format!(
            "must not start with {:?}: those keys belong to the children jobs create",
            crate::store::RESERVED_KEY_PREFIX
        ));
    }
    Ok(k.to_string())
}

/// The key a create uses: the header's or the body's (`idempotency_key`),
/// which must agree when both are given.
fn request_key(header: Option<String>, body: Option<&str>) -> Result<Option<String>, ApiError> {
    let body = match body {
        None => None,
        Some(raw) => Some(valid_key(raw).map_err(|why| {
            ApiError::invalid("idempotency_key", format!("idempotency_key {why}"))
        })?),
    };
    match (header, body) {
        (Some(h), Some(b)) if h != b => Err(ApiError::invalid(
            "idempotency_key",
            "idempotency_key and the Idempotency-Key header name different keys",
        )),
        (h, b) => Ok(h.or(b)),
    }
}

/// `POST /api/workspaces/{ws}/jobs`: 202 with the new job; the same
/// `Idempotency-Key` again answers 200 with the job it created.
#[utoipa::path(post, path = "/api/workspaces/{ws}/jobs", operation_id = "create_job", tag = "jobs",
    params(WsPath,
           ("Idempotency-Key" = Option<String>, Header, description = "Same key, same body: the same job (200)")),
    request_body = CreateJob,
    responses(
        (status = 202, description = "Created; `status` is `queued`, or `pending` if the queue was unreachable", body = Job),
        (status = 200, description = "This Idempotency-Key was used before: the job it created", body = Job),
        (status = 400, description = "Malformed JSON or header", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such workspace or job for this user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Idempotency-Key reused for a different job", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid field; `field` names it", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over a creation limit; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    member: Member,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CreateJob>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let key = request_key(idempotency_key(&headers)?, body.idempotency_key.as_deref())?;
    let new = validate(&state, &member, body, key, now)?;
    let db = state.db().await?;
    // A repeat of an earlier request is answered without counting against
    // the creation limits; keys older than the TTL are forgotten first.
    if let Some(key) = &new.idempotency_key {
        let expired_before = now - state.settings.idempotency_ttl;
        state
            .store
            .expire_idempotency_key(&db, member.workspace, key, expired_before)
            .await?;
        if let Some(existing) = state
            .store
            .by_idempotency_key(&db, member.workspace, key)
            .await?
        {
            return same_request(existing, &new);
        }
    }
    let made = state.registry.jobs_made(&new.job_type, &new.payload);
    super::limits::admit(&db, &member, made).await?;
    let (mut created, sent) = enqueue::create_jobs(
        &state.store,
        &*state.queue,
        &db,
        std::slice::from_ref(&new),
        now,
        state.settings.send_budget(),
    )
    .await?;
    drop(db);
    let (job, is_new) = created.pop().expect("one row per job");
    if !is_new {
        // A concurrent request with the same key won the insert.
        return same_request(job, &new);
    }
    if let Some(e) = sent.error {
        // The row is committed and stays `pending`: the scheduler's outbox
        // sends it, and the client still gets its 202.
        tracing::warn!(job_id = %job.id, workspace_id = %job.workspace_id, error = %e,
            "queue refused the new job's message; the scheduler will send it");
    }
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

/// The answer to a repeated `Idempotency-Key`: the original job if the
/// request is the same, 409 if the key was used for a different job.
fn same_request(existing: Job, new: &NewJob) -> Result<Response, ApiError> {
    if !same_job(&existing, new) {
        return Err(ApiError::conflict(
            "this Idempotency-Key was already used for a different job",
        )
        .with_field("Idempotency-Key"));
    }
    Ok((StatusCode::OK, Json(existing)).into_response())
}

/// Whether a job made earlier is the one `new` asks for.
fn same_job(existing: &Job, new: &NewJob) -> bool {
    existing.job_type == new.job_type
        && existing.payload == new.payload
        && existing.queue == new.queue
        && existing.priority == new.priority
        && existing.max_attempts == new.max_attempts
        && existing.tags == new.tags
}

/// A page of jobs.
#[derive(Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
    pub next_cursor: Option<String>,
}

fn cursor_of(job: &Job) -> String {
    format!(
        "{}.{}",
        job.created_at.timestamp_micros(),
        job.id.0.simple()
    )
}

/// The `cursor` of `GET …/jobs`: the `next_cursor` of the page before.
#[derive(Clone, Copy, Debug)]
pub struct JobCursor(DateTime<Utc>, JobId);

impl JobCursor {
    fn parse(c: &str) -> Option<JobCursor> {
        let (micros, id) = c.split_once('.')?;
        let t = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
        Some(JobCursor(t, id.parse().ok()?))
    }
}

impl<'de> Deserialize<'de> for JobCursor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d, JobCursor::parse, |_| {
            "is not a cursor this API returned".into()
        })
    }
}

/// The path of one job.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct JobPath {
    /// Workspace id
    #[param(value_type = uuid::Uuid)]
    pub ws: WorkspaceId,
    /// Job id
    #[param(value_type = uuid::Uuid)]
    pub id: JobId,
}

/// The query of `GET …/jobs`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only jobs in this status
    status: Option<JobStatus>,
    /// Only jobs of this type
    #[serde(rename = "type")]
    job_type: Option<String>,
    /// Only jobs with this tag
    tag: Option<String>,
    /// RFC 3339, inclusive
    #[param(value_type = Option<String>, format = DateTime)]
    created_after: Option<Rfc3339>,
    /// RFC 3339, exclusive
    #[param(value_type = Option<String>, format = DateTime)]
    created_before: Option<Rfc3339>,
    /// `next_cursor` of the previous page
    #[param(value_type = Option<String>)]
    cursor: Option<JobCursor>,
    /// Jobs per page, default 50
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200)]
    limit: Option<Bounded<1, 200>>,
}

/// `GET /api/workspaces/{ws}/jobs?status=&type=&tag=&created_after=&created_before=&cursor=&limit=`
#[utoipa::path(get, path = "/api/workspaces/{ws}/jobs", operation_id = "list_jobs", tag = "jobs",
    params(WsPath, ListParams),
    responses(
        (status = 200, description = "Newest first", body = JobList),
        (status = 400, description = "Bad filter or cursor", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such workspace or job for this user", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    member: Member,
    Params(q): Params<ListParams>,
) -> Result<Json<JobList>, ApiError> {
    let limit = q.limit.map_or(50, |l| l.0);
    let filter = ListFilter {
        status: q.status,
        job_type: q.job_type,
        tag: q.tag,
        created_after: q.created_after.map(|t| t.0),
        created_before: q.created_before.map(|t| t.0),
        before: q.cursor.map(|c| (c.0, c.1)),
        limit: limit + 1,
    };
    let mut jobs = state.store.list(member.workspace, &filter).await?;
    let next_cursor = if jobs.len() as i64 > limit {
        jobs.truncate(limit as usize);
        jobs.last().map(cursor_of)
    } else {
        None
    };
    Ok(Json(JobList { jobs, next_cursor }))
}

/// One line of a job's log.
#[derive(Serialize, ToSchema)]
pub struct LogEntry {
    pub attempt: i32,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    pub message: String,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    pub created_at: DateTime<Utc>,
}

/// A page of log lines.
#[derive(Serialize, ToSchema)]
pub struct LogPage {
    pub logs: Vec<LogEntry>,
    pub next_cursor: Option<String>,
}

/// The query of `GET …/jobs/{id}`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitParams {
    /// Long-poll up to this many seconds for a change
    #[param(value_type = Option<u32>, minimum = 0, maximum = 25)]
    wait: Option<Bounded<0, { MAX_WAIT_SECS as i64 }>>,
}

fn etag(job: &Job) -> String {
    format!("\"{}-{}\"", job.updated_at.timestamp_micros(), job.status)
}

/// `GET /api/workspaces/{ws}/jobs/{id}[?wait=N]`: with `wait`, answers as
/// soon as the job changes (or after N seconds, at most 25) relative to the
/// `If-None-Match` ETag (or to its state when the request arrived);
/// `If-None-Match` with the current ETag and no change is 304.
#[utoipa::path(get, path = "/api/workspaces/{ws}/jobs/{id}", operation_id = "get_job", tag = "jobs",
    params(JobPath, WaitParams,
           ("If-None-Match" = Option<String>, Header, description = "An ETag from an earlier answer")),
    responses(
        (status = 200, description = "The job, with an ETag", body = Job),
        (status = 304, description = "Unchanged since the given ETag"),
        (status = 400, description = "Bad id or wait", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such workspace or job for this user", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn get_one(
    State(state): State<AppState>,
    viewer: Viewer,
    Ids(JobPath { id, .. }): Ids<JobPath>,
    Params(q): Params<WaitParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let wait = q.wait.map_or(0, |w| w.0) as u64;
    let if_none_match = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut job = viewer.check(state.store.get_open(viewer.workspace(), id).await?)?;
    let baseline = if_none_match.clone().unwrap_or_else(|| etag(&job));
    if wait > 0 && etag(&job) == baseline {
        // Wait on a notification for this job (no reads while nothing
        // changes), reading it only when something did.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
        let mut waiter = match state
            .watch
            .wait_for(
                &state.store,
                viewer.workspace(),
                id,
                Duration::from_secs(wait),
            )
            .await?
        {
            Ok(w) => w,
            Err(super::watch::Full) => {
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too-many-waiting",
                    "Too many waiting requests",
                    "this workspace has too many requests waiting on jobs at once; retry, or \
                     watch fewer jobs at a time (list them instead)",
                );
                e.retry_after = Some(1);
                return Err(e);
            }
        };
        // What changed before the watch was in place.
        job = viewer.check(state.store.get_open(viewer.workspace(), id).await?)?;
        // Read again after each notification, once a moment after the watch
        // was in place, and once at the deadline. A writer whose statement
        // looked for watchers just before this one registered, and committed
        // just after the read above, sends no notification: the read a
        // moment later sees its change. A notification lost with a broken
        // listener connection (a Lambda thawed after a freeze) costs a late
        // answer, never a stale one.
        let mut recheck = Some(tokio::time::Instant::now() + WATCH_RECHECK);
        while etag(&job) == baseline {
            let until = recheck.take().map_or(deadline, |r| r.min(deadline));
            let woke = waiter.changed(until).await;
            job = viewer.check(state.store.get_open(viewer.workspace(), id).await?)?;
            if !woke && tokio::time::Instant::now() >= deadline {
                break;
            }
        }
    }
    let tag = etag(&job);
    if if_none_match.as_deref() == Some(tag.as_str()) {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        resp.headers_mut().insert(
            header::ETAG,
            HeaderValue::from_str(&tag).expect("etag is ASCII"),
        );
        return Ok(resp);
    }
    let mut resp = Json(job).into_response();
    resp.headers_mut().insert(
        header::ETAG,
        HeaderValue::from_str(&tag).expect("etag is ASCII"),
    );
    Ok(resp)
}

/// `POST …/jobs/{id}/cancel`: 200 with the cancelled job when it had not
/// started; 202 when it is running (it stops at its next step).
#[utoipa::path(post, path = "/api/workspaces/{ws}/jobs/{id}/cancel", operation_id = "cancel_job", tag = "jobs",
    params(JobPath),
    responses(
        (status = 200, description = "Cancelled at once (it had not started)", body = Job),
        (status = 202, description = "Running: cancel requested; it stops at its next step", body = Job),
        (status = 404, description = "No such workspace or job for this user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already finished", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    viewer: Viewer,
    Ids(JobPath { id, .. }): Ids<JobPath>,
) -> Result<Response, ApiError> {
    let ws = viewer.workspace();
    if let Viewer::Browser(_) = viewer {
        // A browser token cancels only the jobs it sees, and only with the
        // scope: checked on the job before anything changes.
        viewer.check(state.store.get_open(ws, id).await?)?;
        viewer.require_cancel()?;
    }
    let cancelled = state
        .store
        .request_cancel(ws, id, state.clock.now())
        .await?;
    // The change, to whoever follows the job over WebSockets (AWS).
    state.store.push_changes().await;
    match cancelled {
        Some(job) if job.status == JobStatus::Running => {
            Ok((StatusCode::ACCEPTED, Json(job)).into_response())
        }
        Some(job) => Ok((StatusCode::OK, Json(job)).into_response()),
        None => match state.store.get(ws, id).await? {
            Some(job) => Err(ApiError::conflict(format!(
                "the job is already {}; only pending, queued or running jobs can be cancelled",
                job.status
            ))),
            None => Err(ApiError::not_found("job")),
        },
    }
}

/// `POST …/jobs/{id}/retry`: re-runs a dead or cancelled job from scratch.
#[utoipa::path(post, path = "/api/workspaces/{ws}/jobs/{id}/retry", operation_id = "retry_job", tag = "jobs",
    params(JobPath),
    responses(
        (status = 202, description = "Re-run from scratch: attempts, errors, result and progress reset; its dead or cancelled children re-run with their ids, its completed ones keep their results; its wait tokens are replaced", body = Job),
        (status = 404, description = "No such workspace or job for this user", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not dead or cancelled, or a child of it still runs", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn retry(
    State(state): State<AppState>,
    member: Member,
    Ids(JobPath { id, .. }): Ids<JobPath>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    if let Some(job) = state.store.get(member.workspace, id).await? {
        require_role(&state, &member, &job.job_type, &job.payload)?;
    }
    let Some(mut job) = state.store.manual_retry(member.workspace, id, now).await? else {
        return match state.store.get(member.workspace, id).await? {
            Some(job) if matches!(job.status, JobStatus::Dead | JobStatus::Cancelled) => {
                let running = state.store.running_children(id).await?;
                Err(ApiError::conflict(format!(
                    "{running} of its children still run (asked to stop when it ended); \
                     retry once they have stopped"
                )))
            }
            Some(job) => Err(ApiError::conflict(format!(
                "the job is {}; only dead or cancelled jobs can be retried",
                job.status
            ))),
            None => Err(ApiError::not_found("job")),
        };
    };
    // Its dead or cancelled children run again with it, sent within the
    // request's budget (a read failure, or what the budget does not cover,
    // is left to the outbox).
    let children = state
        .store
        .unsent_children(job.id)
        .await
        .unwrap_or_default();
    let mut all: Vec<&Job> = vec![&job];
    all.extend(children.iter());
    let sent = enqueue::send_jobs_within(
        &state.store,
        &*state.queue,
        &all,
        now,
        state.settings.send_budget(),
    )
    .await;
    if sent.is_ok_and(|s| s.sent.contains(&job.id)) {
        job.status = JobStatus::Queued;
    }
    state.store.push_changes().await;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

/// `DELETE …/jobs/{id}`: removes a finished job and its logs (admins only).
#[utoipa::path(delete, path = "/api/workspaces/{ws}/jobs/{id}", operation_id = "delete_job", tag = "jobs",
    params(JobPath),
    responses(
        (status = 204, description = "Deleted with its logs"),
        (status = 404, description = "No such workspace or job for this user", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin of the workspace", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not finished, or a child whose parent still exists", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    member: Member,
    Ids(JobPath { id, .. }): Ids<JobPath>,
) -> Result<StatusCode, ApiError> {
    member.require_admin()?;
    if state.store.delete_finished(member.workspace, id).await? {
        return Ok(StatusCode::NO_CONTENT);
    }
    match state.store.get(member.workspace, id).await? {
        Some(job) if job.status.is_terminal() => Err(ApiError::conflict(format!(
            "the job is a child of job {}, which keeps its children while it exists; \
             delete the parent first",
            job.parent_id.map(|p| p.to_string()).unwrap_or_default()
        ))),
        Some(job) => Err(ApiError::conflict(format!(
            "the job is {}; only finished jobs can be deleted (cancel it first)",
            job.status
        ))),
        None => Err(ApiError::not_found("job")),
    }
}

/// The query of `GET …/jobs/{id}/logs`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogParams {
    /// `next_cursor` of the previous page
    #[param(value_type = Option<String>)]
    cursor: Option<LogCursor>,
    /// Lines per page, default 100
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    limit: Option<Bounded<1, 500>>,
}

/// The `cursor` of `GET …/logs`: the `next_cursor` of the page before.
#[derive(Clone, Copy, Debug)]
pub struct LogCursor(i64);

impl<'de> Deserialize<'de> for LogCursor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(
            d,
            |raw| raw.parse().ok().map(LogCursor),
            |_| "is not a cursor this API returned".into(),
        )
    }
}

/// `GET …/jobs/{id}/logs?cursor=&limit=`
#[utoipa::path(get, path = "/api/workspaces/{ws}/jobs/{id}/logs", operation_id = "job_logs", tag = "jobs",
    params(JobPath, LogParams),
    responses(
        (status = 200, description = "Log lines, oldest first", body = LogPage),
        (status = 404, description = "No such workspace or job for this user", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn logs(
    State(state): State<AppState>,
    viewer: Viewer,
    Ids(JobPath { id, .. }): Ids<JobPath>,
    Params(q): Params<LogParams>,
) -> Result<Json<LogPage>, ApiError> {
    viewer.check(state.store.get_open(viewer.workspace(), id).await?)?;
    let after = q.cursor.map_or(0, |c| c.0);
    let limit = q.limit.map_or(100, |l| l.0);
    let rows = state
        .store
        .logs(viewer.workspace(), id, after, limit + 1)
        .await?;
    let more = rows.len() as i64 > limit;
    let rows = &rows[..rows.len().min(limit as usize)];
    let next_cursor = more.then(|| rows.last().map(|r| r.0.to_string())).flatten();
    let logs = rows
        .iter()
        .map(|(_, attempt, level, message, metadata, at)| LogEntry {
            attempt: *attempt,
            level: level.clone(),
            message: message.clone(),
            metadata: metadata.clone(),
            created_at: *at,
        })
        .collect();
    Ok(Json(LogPage { logs, next_cursor }))
}

/// The query of `GET …/jobs/{id}/children`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ChildrenParams {
    /// `next_cursor` of the previous page
    #[param(value_type = Option<String>)]
    cursor: Option<ChildCursor>,
    /// Children per page, default 50
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200)]
    limit: Option<Bounded<1, 200>>,
}

/// The `cursor` of `GET …/children`: the `next_cursor` of the page before.
#[derive(Clone, Copy, Debug)]
pub struct ChildCursor(i32);

impl<'de> Deserialize<'de> for ChildCursor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(
            d,
            |raw| raw.parse().ok().filter(|i: &i32| *i >= 0).map(ChildCursor),
            |_| "is not a cursor this API returned".into(),
        )
    }
}

/// `GET …/jobs/{id}/children?cursor=&limit=`: the jobs this job created as
/// its children (a `fan_out`'s), in the order it created them.
#[utoipa::path(get, path = "/api/workspaces/{ws}/jobs/{id}/children", operation_id = "job_children", tag = "jobs",
    params(JobPath, ChildrenParams),
    responses(
        (status = 200, description = "Children in creation order", body = JobList),
        (status = 404, description = "No such workspace or job for this user", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn children(
    State(state): State<AppState>,
    viewer: Viewer,
    Ids(JobPath { id, .. }): Ids<JobPath>,
    Params(q): Params<ChildrenParams>,
) -> Result<Json<JobList>, ApiError> {
    viewer.check(state.store.get_open(viewer.workspace(), id).await?)?;
    let limit = q.limit.map_or(50, |l| l.0);
    let mut jobs = state
        .store
        .children(id, q.cursor.map(|c| c.0), limit + 1)
        .await?;
    let next_cursor = if jobs.len() as i64 > limit {
        jobs.truncate(limit as usize);
        jobs.last()
            .and_then(|j| j.child_index)
            .map(|i| i.to_string())
    } else {
        None
    };
    // A browser token sees the children it opens (named by their parent,
    // or by a tag), not a tagged parent's untagged children.
    jobs.retain(|j| viewer.sees(j));
    Ok(Json(JobList { jobs, next_cursor }))
}

/// The path of one file a job made.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct FilePath {
    /// Workspace id
    #[param(value_type = uuid::Uuid)]
    pub ws: WorkspaceId,
    /// Job id
    #[param(value_type = uuid::Uuid)]
    pub id: JobId,
    /// A name from the job result's `files`, e.g. `contacts.csv`
    pub name: String,
}

/// How long a download link made by [`file`] works: long enough to start
/// the download, short enough that a link copied out of a browser is
/// useless soon after.
pub const DOWNLOAD_LINK_TTL: Duration = Duration::from_secs(300);

/// `GET …/jobs/{id}/files/{name}`: one of the files a job made (its
/// result's `files`), after checking the workspace: a redirect to a link
/// made now and valid for five minutes (S3), or the bytes themselves
/// (local storage).
#[utoipa::path(get, path = "/api/workspaces/{ws}/jobs/{id}/files/{name}", operation_id = "job_file", tag = "jobs",
    params(FilePath),
    responses(
        (status = 302, description = "Redirect to a presigned download link valid for 5 minutes (S3 storage)",
            headers(("Location" = String, description = "The download link"))),
        (status = 200, description = "The file (local storage)", content_type = "application/octet-stream"),
        (status = 404, description = "No such workspace or job for this user, or the job has no such file", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The file is no longer kept", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Storage unreachable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn file(
    State(state): State<AppState>,
    member: Member,
    Ids(FilePath { id, name, .. }): Ids<FilePath>,
) -> Result<Response, ApiError> {
    use crate::storage::{job_file_key, valid_file_name, Download, StorageError};
    let job = state
        .store
        .get(member.workspace, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    let listed = job
        .result
        .as_ref()
        .and_then(|r| r.get("files"))
        .and_then(Value::as_array)
        .is_some_and(|files| files.iter().any(|f| f == name.as_str()));
    if !valid_file_name(&name) || !listed {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            format!("job {id} has no file {name:?}; its result's `files` names those it made"),
        ));
    }
    let key = job_file_key(member.workspace, id, &name);
    match state.storage.download(&key, DOWNLOAD_LINK_TTL).await {
        Ok(Download::Link(url)) => Ok((
            StatusCode::FOUND,
            [
                (header::LOCATION, url),
                (header::CACHE_CONTROL, "no-store".into()),
                (header::REFERRER_POLICY, "no-referrer".into()),
            ],
        )
            .into_response()),
        Ok(Download::Bytes(bytes)) => {
            let content_type = match name.rsplit_once('.').map(|(_, ext)| ext) {
                Some("csv") => "text/csv; charset=utf-8",
                Some("jsonl") => "application/x-ndjson",
                Some("xlsx") => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                Some("json") => "application/json",
                _ => "application/octet-stream",
            };
            Ok((
                [
                    (header::CONTENT_TYPE, content_type.to_string()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"{name}\""),
                    ),
                    (header::CACHE_CONTROL, "no-store".into()),
                ],
                axum::body::Body::from_stream(bytes),
            )
                .into_response())
        }
        Err(StorageError::NotFound(_)) => Err(ApiError::new(
            StatusCode::GONE,
            "file-expired",
            "Gone",
            format!(
                "job {id}'s file {name:?} is no longer kept (files are removed with their jobs \
                 after the retention period); run the job again to make it anew"
            ),
        )),
        Err(e) => {
            tracing::error!(key, "the file could not be read");
            Err(e.into())
        }
    }
}

/// Most jobs one batch request may create.
pub const MAX_BATCH: usize = 1000;

/// The body of `POST /api/workspaces/{ws}/jobs/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    /// 1 to 1000 jobs, each as for a single create.
    pub jobs: Vec<CreateJob>,
}

/// Jobs in the order they were given.
#[derive(Serialize, ToSchema)]
pub struct JobBatch {
    pub jobs: Vec<Job>,
}

#[utoipa::path(post, path = "/api/workspaces/{ws}/jobs/batch", operation_id = "create_jobs", tag = "jobs",
    params(WsPath),
    request_body = CreateBatch,
    responses(
        (status = 202, description = "Created, in the order given; nothing is created if any is invalid. A job whose idempotency_key was used before is the job it names", body = JobBatch),
        (status = 200, description = "Every job's idempotency_key was used before: the jobs they name", body = JobBatch),
        (status = 409, description = "An idempotency_key was used for a different job", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "An invalid item; `field` is like `jobs[3].payload.ms`", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Over a creation limit (each job counts); see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
/// `POST /api/workspaces/{ws}/jobs/batch`: all in one statement (so all or
/// none), then one `SendMessageBatch` per 10 on SQS. Jobs may carry their
/// own `idempotency_key`: a job whose key exists is answered with the job it
/// names (and not counted against the creation limits), so a client can
/// retry a whole batch and get exactly one job per key.
pub async fn create_batch(
    State(state): State<AppState>,
    member: Member,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CreateBatch>,
) -> Result<Response, ApiError> {
    if headers.contains_key("idempotency-key") {
        return Err(ApiError::bad_request(
            "Idempotency-Key is not supported on batch creates; give each job its own \
             idempotency_key instead",
        )
        .with_field("Idempotency-Key"));
    }
    let n = body.jobs.len();
    if n == 0 || n > MAX_BATCH {
        return Err(ApiError::invalid(
            "jobs",
            format!("a batch holds 1 to {MAX_BATCH} jobs, got {n}"),
        ));
    }
    let now = state.clock.now();
    let mut new = Vec::with_capacity(n);
    let mut keys: HashMap<String, usize> = HashMap::new();
    for (i, item) in body.jobs.into_iter().enumerate() {
        let in_item = |mut e: ApiError| {
            e.field = Some(match e.field.take() {
                Some(f) => format!("jobs[{i}].{f}"),
                None => format!("jobs[{i}]"),
            });
            e
        };
        let key = request_key(None, item.idempotency_key.as_deref()).map_err(in_item)?;
        if let Some(k) = &key {
            if let Some(first) = keys.insert(k.clone(), i) {
                return Err(in_item(ApiError::invalid(
                    "idempotency_key",
                    format!("jobs[{first}] has the same idempotency_key"),
                )));
            }
        }
        new.push(validate(&state, &member, item, key, now).map_err(in_item)?);
    }
    let mut db = state.db().await?;
    let key_refs: Vec<&str> = keys.keys().map(String::as_str).collect();
    let existing = state
        .store
        .by_idempotency_keys(
            &db,
            member.workspace,
            &key_refs,
            now - state.settings.idempotency_ttl,
        )
        .await?;
    let mut answer: Vec<Option<Job>> = vec![None; n];
    for job in existing {
        let i = keys[job.idempotency_key.as_deref().unwrap_or_default()];
        if !same_job(&job, &new[i]) {
            return Err(ApiError::conflict(format!(
                "jobs[{i}].idempotency_key was already used for a different job"
            ))
            .with_field(format!("jobs[{i}].idempotency_key")));
        }
        answer[i] = Some(job);
    }
    // Only what is missing is inserted (and counted against the limits).
    let missing: Vec<NewJob> = new
        .into_iter()
        .zip(&answer)
        .filter(|(_, a)| a.is_none())
        .map(|(j, _)| j)
        .collect();
    let mut any_new = false;
    if !missing.is_empty() {
        let made = missing
            .iter()
            .map(|j| state.registry.jobs_made(&j.job_type, &j.payload))
            .sum();
        super::limits::admit(&db, &member, made).await?;
        // More due jobs than the workspace may run at once go in parked.
        let limit = crate::workspace::limits(&**db, member.workspace)
            .await?
            .max_running;
        let (created, sent) = enqueue::create_batch(
            &state.store,
            &*state.queue,
            &mut db,
            &missing,
            member.workspace,
            limit,
            now,
            state.settings.send_budget(),
        )
        .await?;
        if let Some(e) = &sent.error {
            tracing::warn!(workspace_id = %member.workspace, error = %e, unsent = sent.deferred.len(),
                "queue refused some of a batch; the scheduler will send them");
        }
        let mut created = created.into_iter();
        for slot in answer.iter_mut().filter(|a| a.is_none()) {
            let (job, is_new) = created.next().expect("one row per job");
            any_new |= is_new;
            *slot = Some(job);
        }
    }
    drop(db);
    let jobs: Vec<Job> = answer.into_iter().flatten().collect();
    let status = if any_new {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(JobBatch { jobs })).into_response())
}
