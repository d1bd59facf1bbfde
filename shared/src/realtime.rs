//! Live job changes in AWS, over the stack's API Gateway WebSocket API
//! (the same messages as `offload dev`'s `/api/realtime`, DESIGN.md "The
//! API").
//!
//! API Gateway holds the browsers' connections, so no function runs while a
//! viewer waits. The realtime function records each connection and what it
//! follows in Postgres (V17); a statement that changes a followed job queues
//! the job's id in `realtime_outbox` (a trigger; a chunk of a job followed
//! with `stream` queues itself). The function that made the change (the
//! worker after a progress write and after its batch, the api after a
//! cancel or retry, the scheduler after its duties) then sends the queued
//! jobs' states to their subscribers through API Gateway's management API
//! (`POST @connections/{id}`, SigV4-signed). A function asks whether any
//! connection exists at most every few seconds; with none, it never looks
//! at the outbox. A subscriber whose membership or API key is gone, or
//! whose browser token expired, gets nothing more.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::browser_token::Grant;
use crate::db::DbError;
use crate::ids::{JobId, WorkspaceId};
use crate::job::Job;
use crate::store::Store;

/// How long a function trusts its last look at whether anyone is connected.
const GATE_TTL: Duration = Duration::from_secs(5);
/// Outbox rows taken per round of a drain.
const DRAIN_BATCH: i64 = 500;
/// Posts in flight at once.
const POSTS_AT_ONCE: usize = 32;

/// Jobs one subscribe may name, and one connection follow in all.
pub const MAX_JOBS_PER_MESSAGE: usize = 100;
pub const MAX_JOBS_PER_CONNECTION: usize = 1000;
pub const MAX_TAGS_PER_CONNECTION: usize = 20;

/// A client's message, read and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub subscribe: bool,
    pub workspace: WorkspaceId,
    pub jobs: Vec<JobId>,
    pub tags: Vec<String>,
    pub stream: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientMessage {
    action: Action,
    workspace: String,
    #[serde(default)]
    jobs: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    stream: bool,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Action {
    Subscribe,
    Unsubscribe,
}

/// Reads a client's message; the error is the `detail` to send back.
pub fn parse(text: &str) -> Result<Request, String> {
    let msg: ClientMessage = serde_json::from_str(text).map_err(|e| {
        format!(
            "not a message this channel takes ({e}); send {{\"action\": \"subscribe\", \
             \"workspace\": ws, \"jobs\": [ids]}} or with \"tags\""
        )
    })?;
    let workspace: WorkspaceId = msg
        .workspace
        .parse()
        .map_err(|_| format!("workspace {:?} is not a UUID", msg.workspace))?;
    let mut jobs = Vec::new();
    for j in &msg.jobs {
        jobs.push(
            j.parse::<JobId>()
                .map_err(|_| format!("job id {j:?} is not a UUID"))?,
        );
    }
    if jobs.len() > MAX_JOBS_PER_MESSAGE {
        return Err(format!("at most {MAX_JOBS_PER_MESSAGE} jobs per message"));
    }
    if let Some(t) = msg.tags.iter().find(|t| t.is_empty() || t.len() > 200) {
        return Err(format!("tag {t:?} is not 1 to 200 bytes"));
    }
    let subscribe = msg.action == Action::Subscribe;
    if subscribe && jobs.is_empty() && msg.tags.is_empty() {
        return Err("name the jobs (or tags) to follow".into());
    }
    Ok(Request {
        subscribe,
        workspace,
        jobs,
        tags: msg.tags,
        stream: msg.stream,
    })
}

/// What a client is told of a database failure: not the server's address
/// or its message, which go to the log.
pub fn db_detail(e: &DbError) -> String {
    tracing::warn!(error = %e, "realtime: database error");
    "the service is unavailable for a moment; try again".into()
}

/// What a subscribe may follow: the jobs the viewer sees (the others named
/// in `refusal`). A tag a browser token does not open refuses it whole.
pub struct Admitted {
    pub jobs: Vec<JobId>,
    pub refusal: Option<String>,
}

/// Checks a subscribe against its viewer, reading the jobs it names once.
pub async fn admit(
    store: &Store,
    viewer: &crate::api::Viewer,
    req: &Request,
) -> Result<Admitted, String> {
    if let crate::api::Viewer::Browser(g) = viewer {
        if let Some(t) = req.tags.iter().find(|t| !g.tags.contains(t)) {
            return Err(format!("this browser token does not open the tag {t:?}"));
        }
    }
    let found = store.get_many(&req.jobs).await.map_err(|e| db_detail(&e))?;
    let seen: HashSet<JobId> = found
        .iter()
        .filter(|j| viewer.sees(j))
        .map(|j| j.id)
        .collect();
    let (jobs, refused): (Vec<JobId>, Vec<JobId>) = req.jobs.iter().partition(|j| seen.contains(j));
    let refusal = (!refused.is_empty()).then(|| {
        let names: Vec<String> = refused.iter().map(|j| j.to_string()).collect();
        format!(
            "no job {} in workspace {} for this token (the others are followed)",
            names.join(", "),
            req.workspace
        )
    });
    Ok(Admitted { jobs, refusal })
}

/// The current states of what a subscription follows, each job once: its
/// jobs, and the newest 100 of each of its tags the viewer sees. Read after
/// the subscription is in place: a change after it is sent as a change,
/// one before it is in this read.
pub async fn current(
    store: &Store,
    viewer: &crate::api::Viewer,
    workspace: WorkspaceId,
    jobs: &[JobId],
    tags: &[String],
) -> Result<Vec<Job>, String> {
    let mut now = store.get_many(jobs).await.map_err(|e| db_detail(&e))?;
    for tag in tags {
        let filter = crate::store::ListFilter {
            tag: Some(tag.clone()),
            limit: 100,
            ..Default::default()
        };
        let list = store
            .list(workspace, &filter)
            .await
            .map_err(|e| db_detail(&e))?;
        now.extend(list.into_iter().filter(|j| viewer.sees(j)));
    }
    let mut once = HashSet::new();
    now.retain(|j| once.insert(j.id));
    Ok(now)
}

/// The text of an error message to a client.
pub fn error_text(detail: &str) -> String {
    json!({"type": "error", "detail": detail}).to_string()
}

/// Who a connection is, as verified at `$connect`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Bearer {
    /// A user's token: a member of the workspaces they subscribe in.
    User {
        issuer: Option<String>,
        subject: String,
    },
    /// A workspace's API key.
    ApiKey { id: Uuid, workspace: WorkspaceId },
    /// A browser token: its grant, checked again (with its expiry) at
    /// every send.
    Browser(Grant),
}

/// Records a connection.
pub async fn connect(
    db: &impl GenericClient,
    connection: &str,
    bearer: &Bearer,
) -> Result<(), DbError> {
    db.execute(
        "INSERT INTO realtime_connections (connection_id, bearer) VALUES ($1, $2) \
         ON CONFLICT (connection_id) DO UPDATE SET bearer = EXCLUDED.bearer",
        &[
            &connection,
            &serde_json::to_value(bearer).unwrap_or_default(),
        ],
    )
    .await?;
    Ok(())
}

/// Forgets a connection and its subscriptions.
pub async fn disconnect(db: &impl GenericClient, connection: &str) -> Result<(), DbError> {
    db.execute(
        "DELETE FROM realtime_connections WHERE connection_id = $1",
        &[&connection],
    )
    .await?;
    Ok(())
}

/// The connection's bearer, when it is known.
pub async fn bearer(db: &impl GenericClient, connection: &str) -> Result<Option<Bearer>, DbError> {
    let row = db
        .query_opt(
            "SELECT bearer FROM realtime_connections WHERE connection_id = $1",
            &[&connection],
        )
        .await?;
    Ok(row.and_then(|r| serde_json::from_value(r.get(0)).ok()))
}

/// Adds subscriptions of a connection (known ones stay).
pub async fn subscribe(
    db: &impl GenericClient,
    connection: &str,
    workspace: WorkspaceId,
    jobs: &[JobId],
    tags: &[String],
    stream: bool,
) -> Result<(), DbError> {
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.0).collect();
    db.execute(
        "INSERT INTO realtime_subscriptions (connection_id, workspace_id, job_id, stream) \
         SELECT $1, $2, j, $4 FROM unnest($3::uuid[]) j \
         ON CONFLICT (job_id, connection_id) WHERE job_id IS NOT NULL \
         DO UPDATE SET stream = realtime_subscriptions.stream OR EXCLUDED.stream",
        &[&connection, &workspace.0, &ids, &stream],
    )
    .await?;
    db.execute(
        "INSERT INTO realtime_subscriptions (connection_id, workspace_id, tag) \
         SELECT $1, $2, t FROM unnest($3::text[]) t \
         ON CONFLICT (workspace_id, tag, connection_id) WHERE tag IS NOT NULL DO NOTHING",
        &[&connection, &workspace.0, &tags],
    )
    .await?;
    Ok(())
}

/// Removes subscriptions of a connection.
pub async fn unsubscribe(
    db: &impl GenericClient,
    connection: &str,
    workspace: WorkspaceId,
    jobs: &[JobId],
    tags: &[String],
) -> Result<(), DbError> {
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.0).collect();
    db.execute(
        "DELETE FROM realtime_subscriptions WHERE connection_id = $1 AND workspace_id = $2 \
         AND (job_id = ANY($3) OR tag = ANY($4))",
        &[&connection, &workspace.0, &ids, &tags],
    )
    .await?;
    Ok(())
}

/// What a post to a connection found.
#[derive(Debug, PartialEq)]
pub enum Posted {
    Sent,
    /// The connection is closed (410): forget it.
    Gone,
}

/// One subscription row, with its connection's bearer.
struct Sub {
    connection: String,
    bearer: Option<Bearer>,
    workspace: Uuid,
    job: Option<Uuid>,
    tag: Option<String>,
    stream: bool,
}

/// Sends to the connections of the stack's WebSocket API.
pub struct Pusher {
    /// `https://{api}.execute-api.{region}.amazonaws.com/{stage}`
    endpoint: String,
    region: String,
    http: reqwest::Client,
    /// When anyone was last seen connected, and whether.
    gate: Mutex<Option<(Instant, bool)>>,
}

impl std::fmt::Debug for Pusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pusher({})", self.endpoint)
    }
}

/// A job's state as a message to a client.
pub fn job_text(job: &Job) -> String {
    json!({"type": "job", "job": job}).to_string()
}

impl Pusher {
    pub fn new(endpoint: &str, region: &str) -> Pusher {
        Pusher {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            region: region.to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("an HTTP client"),
            gate: Mutex::new(None),
        }
    }

    /// Posts `text` to a connection, signed with the function's credentials
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`).
    pub async fn post(&self, connection: &str, text: &str) -> Result<Posted, String> {
        let url = format!(
            "{}/@connections/{}",
            self.endpoint,
            url::form_urlencoded::byte_serialize(connection.as_bytes()).collect::<String>()
        );
        let headers = sign(&url, text.as_bytes(), &self.region)?;
        let mut req = self.http.post(&url).body(text.to_string());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("posting to a connection: {}", e.without_url()))?;
        match resp.status().as_u16() {
            200..=299 => Ok(Posted::Sent),
            410 => Ok(Posted::Gone),
            s => Err(format!("posting to a connection: HTTP {s}")),
        }
    }

    /// Whether any connection exists, from a look at most `GATE_TTL` old.
    async fn anyone(&self, store: &Store) -> Result<bool, DbError> {
        if let Some((at, any)) = *self.gate.lock().unwrap_or_else(|e| e.into_inner()) {
            if at.elapsed() < GATE_TTL {
                return Ok(any);
            }
        }
        let db = crate::db::Conn::get(store.pool()).await?;
        let any: bool = db
            .query_one("SELECT EXISTS (SELECT 1 FROM realtime_connections)", &[])
            .await?
            .get(0);
        *self.gate.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), any));
        Ok(any)
    }

    /// Counts the connection just made, so this function's next drain does
    /// not wait out its last look.
    pub fn someone_connected(&self) {
        *self.gate.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), true));
    }

    /// Sends what the outbox holds to its subscribers, for at most `budget`
    /// (the rest is left for the next drain); the number of posts. Nothing
    /// is read while nobody is connected.
    pub async fn drain(&self, store: &Store, budget: Duration) -> Result<usize, DbError> {
        if !self.anyone(store).await? {
            return Ok(0);
        }
        let until = Instant::now() + budget;
        let mut posts = 0;
        loop {
            if Instant::now() >= until {
                return Ok(posts);
            }
            let taken = {
                let db = crate::db::Conn::get(store.pool()).await?;
                db.query(
                    "DELETE FROM realtime_outbox WHERE id IN (SELECT id FROM realtime_outbox \
                     ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING job_id, chunk_id",
                    &[&DRAIN_BATCH],
                )
                .await?
            };
            if taken.is_empty() {
                return Ok(posts);
            }
            let more = taken.len() as i64 == DRAIN_BATCH;
            let mut jobs: Vec<JobId> = Vec::new();
            let mut chunks: Vec<i64> = Vec::new();
            for r in &taken {
                match r.get::<_, Option<i64>>(1) {
                    Some(c) => chunks.push(c),
                    None => jobs.push(JobId(r.get(0))),
                }
            }
            jobs.sort();
            jobs.dedup();
            match self.send(store, &jobs, &chunks).await {
                Ok(n) => posts += n,
                Err(e) => {
                    // Taken but not sent: back in the outbox for the next drain.
                    let ids: Vec<Uuid> = taken.iter().map(|r| r.get(0)).collect();
                    let chunk_ids: Vec<Option<i64>> = taken.iter().map(|r| r.get(1)).collect();
                    if let Ok(db) = crate::db::Conn::get(store.pool()).await {
                        let _ = db
                            .execute(
                                "INSERT INTO realtime_outbox (job_id, chunk_id) \
                                 SELECT * FROM unnest($1::uuid[], $2::int8[])",
                                &[&ids, &chunk_ids],
                            )
                            .await;
                    }
                    return Err(e);
                }
            }
            if !more {
                return Ok(posts);
            }
        }
    }

    /// Sends the current state of `jobs` and the chunks `chunks` to the
    /// connections following them.
    async fn send(&self, store: &Store, jobs: &[JobId], chunks: &[i64]) -> Result<usize, DbError> {
        let states = store.get_many(jobs).await?;
        let db = crate::db::Conn::get(store.pool()).await?;
        let chunk_rows = if chunks.is_empty() {
            Vec::new()
        } else {
            db.query(
                "SELECT id, job_id, data FROM job_stream WHERE id = ANY($1) ORDER BY id",
                &[&chunks],
            )
            .await?
        };
        let mut ids: Vec<Uuid> = states.iter().map(|j| j.id.0).collect();
        ids.extend(chunk_rows.iter().map(|r| r.get::<_, Uuid>(1)));
        let tags: Vec<String> = states.iter().flat_map(|j| j.tags.clone()).collect();
        let wss: Vec<Uuid> = states.iter().map(|j| j.workspace_id.0).collect();
        // Subscribers that may still see the job: a member still a member of
        // a workspace not being deleted, a key not revoked.
        let subs = db
            .query(
                "SELECT s.connection_id, c.bearer, s.workspace_id, s.job_id, s.tag, s.stream \
                 FROM realtime_subscriptions s JOIN realtime_connections c USING (connection_id) \
                 WHERE (s.job_id = ANY($1) OR (s.tag = ANY($2) AND s.workspace_id = ANY($3))) \
                 AND CASE c.bearer->>'kind' \
                   WHEN 'user' THEN EXISTS (SELECT 1 FROM workspace_members m \
                     JOIN workspaces w ON w.id = m.workspace_id AND w.deleting_at IS NULL \
                     WHERE m.workspace_id = s.workspace_id AND m.subject = c.bearer->>'subject' \
                     AND m.issuer IN (coalesce(c.bearer->>'issuer', ''), '')) \
                   WHEN 'api_key' THEN EXISTS (SELECT 1 FROM api_keys k \
                     JOIN workspaces w ON w.id = k.workspace_id AND w.deleting_at IS NULL \
                     WHERE k.id = (c.bearer->>'id')::uuid AND k.workspace_id = s.workspace_id) \
                   ELSE EXISTS (SELECT 1 FROM workspaces w \
                     WHERE w.id = s.workspace_id AND w.deleting_at IS NULL) END",
                &[&ids, &tags, &wss],
            )
            .await?;
        drop(db);
        let now = chrono::Utc::now().timestamp();
        // (connection, text) pairs, each connection once per job state.
        let mut out: Vec<(String, String)> = Vec::new();
        let mut given: HashSet<(String, JobId)> = HashSet::new();
        let by_id: HashMap<JobId, &Job> = states.iter().map(|j| (j.id, j)).collect();
        let sees = |bearer: &Bearer, job: &Job| match bearer {
            Bearer::Browser(g) => g.exp > now && g.sees(job),
            _ => true,
        };
        let parsed: Vec<Sub> = subs
            .iter()
            .map(|r| Sub {
                connection: r.get(0),
                bearer: serde_json::from_value(r.get(1)).ok(),
                workspace: r.get(2),
                job: r.get(3),
                tag: r.get(4),
                stream: r.get(5),
            })
            .collect();
        for job in &states {
            let text = job_text(job);
            for sub in &parsed {
                let Some(bearer) = &sub.bearer else { continue };
                let follows = sub.workspace == job.workspace_id.0
                    && (sub.job == Some(job.id.0)
                        || sub.tag.as_ref().is_some_and(|t| job.tags.contains(t)));
                if follows && sees(bearer, job) && given.insert((sub.connection.clone(), job.id)) {
                    out.push((sub.connection.clone(), text.clone()));
                }
            }
        }
        for r in &chunk_rows {
            let (cursor, job_id, data): (i64, Uuid, serde_json::Value) =
                (r.get(0), r.get(1), r.get(2));
            let text = json!({"type": "chunk", "job_id": job_id, "cursor": cursor.to_string(), "data": data})
                .to_string();
            for sub in &parsed {
                let Some(bearer) = &sub.bearer else { continue };
                if sub.stream && sub.job == Some(job_id) {
                    let visible = match by_id.get(&JobId(job_id)) {
                        Some(job) => sees(bearer, job),
                        None => !matches!(bearer, Bearer::Browser(g) if g.exp <= now),
                    };
                    if visible {
                        out.push((sub.connection.clone(), text.clone()));
                    }
                }
            }
        }
        let n = out.len();
        let gone = self.post_all(out).await;
        if !gone.is_empty() {
            let db = crate::db::Conn::get(store.pool()).await?;
            db.execute(
                "DELETE FROM realtime_connections WHERE connection_id = ANY($1)",
                &[&gone],
            )
            .await?;
        }
        Ok(n)
    }

    /// Posts every message, some at once; the connections found gone.
    pub async fn post_all(&self, out: Vec<(String, String)>) -> Vec<String> {
        use futures::StreamExt;
        let results: Vec<(String, Result<Posted, String>)> = futures::stream::iter(out)
            .map(|(conn, text)| async move {
                let r = self.post(&conn, &text).await;
                (conn, r)
            })
            .buffer_unordered(POSTS_AT_ONCE)
            .collect()
            .await;
        let mut gone = Vec::new();
        for (conn, r) in results {
            match r {
                Ok(Posted::Sent) => {}
                Ok(Posted::Gone) => gone.push(conn),
                Err(e) => tracing::warn!(error = %e, "a realtime message was not delivered"),
            }
        }
        gone.sort();
        gone.dedup();
        gone
    }

    /// Sends one job's current state to one connection (at subscribe).
    pub async fn send_job(&self, connection: &str, job: &Job) -> Result<Posted, String> {
        self.post(connection, &job_text(job)).await
    }
}

/// SigV4 headers for a `POST` of `body` to `url` (service `execute-api`),
/// with the credentials Lambda puts in the environment.
fn sign(url: &str, body: &[u8], region: &str) -> Result<Vec<(String, String)>, String> {
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (key, secret) = match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        (Some(k), Some(s)) => (k, s),
        _ => {
            return Err(
                "no AWS credentials in the environment to sign a realtime message with".into(),
            )
        }
    };
    let identity =
        aws_credential_types::Credentials::new(key, secret, var("AWS_SESSION_TOKEN"), None, "env")
            .into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("execute-api")
        .time(std::time::SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("cannot sign a realtime message: {e}"))?
        .into();
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    let host = parsed[url::Position::BeforeHost..url::Position::AfterPort].to_string();
    let request = SignableRequest::new(
        "POST",
        url,
        [("host", host.as_str())].into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| format!("cannot sign a realtime message: {e}"))?;
    let (instructions, _) = sign(request, &params)
        .map_err(|e| format!("cannot sign a realtime message: {e}"))?
        .into_parts();
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}
