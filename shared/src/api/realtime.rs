//! `GET /api/realtime?token=…`: live job changes pushed over a WebSocket
//! (DESIGN.md "The API"). A client subscribes to jobs by id or by tag:
//!
//! - client `{"action": "subscribe", "workspace": ws, "jobs": [ids]}` (or
//!   `"tags": [tags]`; `"stream": true` adds the jobs' new stream chunks),
//!   `{"action": "unsubscribe", …}` the same way;
//! - server `{"type": "job", "job": <the job JSON>}` once at subscribe (so a
//!   reconnect never misses a final state) and on every change it reads,
//!   `{"type": "chunk", "job_id", "cursor", "data"}`, and
//!   `{"type": "error", "detail"}`.
//!
//! One hub per process holds every connection's subscriptions. A watched
//! job has one row in `job_watches` (a tag, one in `job_tag_watches`) for
//! the whole process, however many connections follow it; the statement
//! that changes it notifies (V10, V17), the hub reads the job once and
//! sends the same text to every subscriber. While nothing changes, no
//! viewer costs a statement: the only one is the process's extension of
//! its rows, once a minute. States are sent in order; a state replaced
//! before the hub read it is passed over for the newer one (a progress bar
//! wants the latest; stream chunks, which must all arrive, go through the
//! job's feed and its cursor).
//!
//! The token is a browser token (its jobs and tags only), a user's token or
//! an API key (the workspaces it is a member of, checked at each subscribe).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use super::error::ApiError;
use super::extract::{browser_grant, viewer, Viewer};
use super::watch::{FeedItem, Watch};
use super::AppState;
use crate::db::{self, DbError};
use crate::ids::{JobId, WorkspaceId};
use crate::job::Job;
use crate::realtime::{db_detail, MAX_JOBS_PER_CONNECTION, MAX_TAGS_PER_CONNECTION};
use crate::store::Store;

/// How long the process's watch rows live past a round; extended each round.
const ROUND: Duration = Duration::from_secs(55);
const SLACK: Duration = Duration::from_secs(5);
/// A subscription reads its jobs once more this long after its rows are in
/// place: a change whose statement looked for watchers just before the row
/// was committed sent no notification.
const RECHECK: Duration = Duration::from_secs(1);
/// Messages waiting for one connection; a connection this far behind is
/// closed (the client reconnects and gets the current state first).
const OUTBOX: usize = 1024;
/// The largest message a client may send.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// How long a connection's socket may take to accept one message.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// What the hub sends one connection.
#[derive(Clone, Debug)]
enum Out {
    /// A job's state, as text, with the time it was written (a state older
    /// than one already sent is not sent, unless it is a final one).
    Job {
        id: JobId,
        updated_at: DateTime<Utc>,
        terminal: bool,
        text: Utf8Bytes,
    },
    Text(Utf8Bytes),
}

/// A connection's queue, and the switch that closes it: thrown when the
/// queue is full (a client that stopped reading), when the token no longer
/// opens what it follows, or when the socket is gone.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<Out>,
    kill: tokio_util::sync::CancellationToken,
    reason: Arc<Mutex<&'static str>>,
}

impl Outbox {
    fn close(&self, reason: &'static str) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        self.kill.cancel();
    }
}

struct Conn {
    tx: Outbox,
    /// The token it opened with (checked again each round).
    bearer: Bearer,
    viewers: HashMap<WorkspaceId, Viewer>,
    jobs: HashSet<JobId>,
    tags: HashSet<(WorkspaceId, String)>,
}

#[derive(Default)]
struct Subs {
    conns: HashMap<u64, Conn>,
    by_job: HashMap<JobId, HashSet<u64>>,
    by_tag: HashMap<(WorkspaceId, String), HashSet<u64>>,
    /// Connections that asked for a job's chunks, and the task passing the
    /// job's feed on to them.
    streams: HashMap<JobId, (HashSet<u64>, tokio::task::JoinHandle<()>)>,
}

/// The realtime hub of one API process.
pub struct Realtime {
    watch: Arc<Watch>,
    store: Store,
    /// The `watcher` of this process's rows.
    watcher: Uuid,
    subs: Mutex<Subs>,
    /// How tokens are verified (the API's), for the checks each round.
    auth: std::sync::OnceLock<crate::auth::Verifier>,
    next_conn: AtomicU64,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Realtime {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }
}

#[derive(Deserialize)]
pub struct RealtimeQuery {
    token: Option<String>,
}

/// Who the connection's token names, checked before the upgrade.
#[derive(Clone)]
enum Bearer {
    Browser(Arc<crate::browser_token::Grant>),
    /// A user's token or an API key: membership is checked per workspace.
    Token(String),
}

fn error_text(detail: &str) -> Utf8Bytes {
    json!({"type": "error", "detail": detail})
        .to_string()
        .into()
}

/// `GET /api/realtime?token=…` (WebSocket)
pub async fn connect(
    State(state): State<AppState>,
    Query(q): Query<RealtimeQuery>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let token = q
        .token
        .or_else(|| {
            headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.strip_prefix("Bearer "))
                .map(str::to_string)
        })
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized(
                "no token: connect to /api/realtime?token=<a browser token, user token or API key>",
            )
        })?;
    let bearer = match verify(&state, &token).await? {
        crate::realtime::Bearer::Browser(g) => Bearer::Browser(Arc::new(g)),
        _ => Bearer::Token(token),
    };
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::UPGRADE_REQUIRED,
            "upgrade-required",
            "WebSocket required",
            format!("connect with a WebSocket client: {e}"),
        )
    })?;
    let hub = state.realtime.clone();
    Ok(upgrade
        .max_message_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| async move { hub.serve(state, bearer, socket).await })
        .into_response())
}

/// Who a token for the realtime channel names, verified as the API
/// verifies it: a browser token's grant, an API key, or a user; a platform
/// key opens nothing here. The local channel and the AWS function both ask.
pub async fn verify(state: &AppState, token: &str) -> Result<crate::realtime::Bearer, ApiError> {
    use crate::realtime::Bearer as Verified;
    if crate::browser_token::is_browser_token(token) {
        return Ok(Verified::Browser(browser_grant(state, token)?));
    }
    if crate::platform::is_platform_key(token) {
        return Err(ApiError::forbidden(
            "a platform key opens no workspace's jobs",
        ));
    }
    if crate::api_keys::is_api_key(token) {
        let conn = state.db().await?;
        let key = crate::api_keys::authenticate(&conn, token)
            .await?
            .ok_or_else(|| ApiError::unauthorized("the API key is not valid"))?;
        return Ok(Verified::ApiKey {
            id: key.id,
            workspace: key.workspace_id,
        });
    }
    let who = state
        .auth
        .verify(token)
        .await
        .map_err(|e| ApiError::unauthorized(e.to_string()))?;
    Ok(Verified::User {
        issuer: who.issuer,
        subject: who.subject,
    })
}

impl Realtime {
    pub fn new(watch: Arc<Watch>, store: Store) -> Arc<Realtime> {
        Arc::new(Realtime {
            watch,
            store,
            watcher: Uuid::new_v4(),
            subs: Mutex::default(),
            auth: std::sync::OnceLock::new(),
            next_conn: AtomicU64::new(0),
            task: Mutex::new(None),
        })
    }

    /// Connections open in this process.
    pub fn connections(&self) -> usize {
        self.lock().conns.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Subs> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the task passing changes on, at the first connection.
    fn start(self: &Arc<Self>) {
        let mut task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if task.is_none() {
            let changes = self.watch.changes();
            *task = Some(tokio::spawn(run_hub(Arc::downgrade(self), changes)));
        }
    }

    async fn serve(self: Arc<Self>, state: AppState, bearer: Bearer, socket: WebSocket) {
        let _ = self.auth.set(state.auth.clone());
        self.start();
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (sender, mut rx) = mpsc::channel::<Out>(OUTBOX);
        let tx = Outbox {
            tx: sender,
            kill: tokio_util::sync::CancellationToken::new(),
            reason: Arc::new(Mutex::new("the connection is closing")),
        };
        self.lock().conns.insert(
            id,
            Conn {
                tx: tx.clone(),
                bearer: bearer.clone(),
                viewers: HashMap::new(),
                jobs: HashSet::new(),
                tags: HashSet::new(),
            },
        );
        let (mut sink, mut stream) = futures::StreamExt::split(socket);
        let out = tx.clone();
        let writer = tokio::spawn(async move {
            use futures::SinkExt;
            // The newest state sent of each job: an older one read later
            // (a subscribe's first read racing a change, a change written
            // by a process whose clock is behind), or the same one read
            // twice, is not sent; a final state always is.
            let mut sent: HashMap<JobId, DateTime<Utc>> = HashMap::new();
            loop {
                let next = tokio::select! {
                    _ = out.kill.cancelled() => None,
                    next = rx.recv() => next,
                };
                let Some(next) = next else {
                    let reason = *out.reason.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        let _ = sink.send(Message::Text(error_text(reason))).await;
                        let _ = sink.close().await;
                    })
                    .await;
                    return;
                };
                let text = match next {
                    Out::Job {
                        id,
                        updated_at,
                        terminal,
                        text,
                    } => {
                        if !terminal && sent.get(&id).is_some_and(|t| *t >= updated_at) {
                            continue;
                        }
                        if terminal {
                            sent.remove(&id);
                        } else {
                            sent.insert(id, updated_at);
                        }
                        text
                    }
                    Out::Text(t) => t,
                };
                match tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Text(text))).await {
                    Ok(Ok(())) => {}
                    _ => {
                        out.close("the connection stopped taking messages");
                        return;
                    }
                }
            }
        });
        loop {
            let msg = tokio::select! {
                _ = tx.kill.cancelled() => break,
                msg = futures::StreamExt::next(&mut stream) => msg,
            };
            let Some(Ok(msg)) = msg else { break };
            let text = match msg {
                Message::Text(t) => t.to_string(),
                Message::Close(_) => break,
                Message::Binary(_) => {
                    offer(&tx, Out::Text(error_text("send messages as JSON text")));
                    continue;
                }
                _ => continue,
            };
            if let Err(detail) = self.handle(&state, &bearer, id, &tx, &text).await {
                offer(&tx, Out::Text(error_text(&detail)));
            }
        }
        self.leave(id).await;
        tx.kill.cancel();
        let _ = writer.await;
    }

    /// One client message; an error is the `detail` sent back.
    async fn handle(
        self: &Arc<Self>,
        state: &AppState,
        bearer: &Bearer,
        conn: u64,
        tx: &Outbox,
        text: &str,
    ) -> Result<(), String> {
        let msg = crate::realtime::parse(text)?;
        let (ws, jobs) = (msg.workspace, msg.jobs.clone());
        if !msg.subscribe {
            self.unsubscribe(conn, ws, &jobs, &msg.tags).await;
            return Ok(());
        }
        let viewer = self.viewer(state, bearer, conn, ws).await?;
        {
            let subs = self.lock();
            let c = subs.conns.get(&conn).ok_or("the connection is closing")?;
            let new_jobs = jobs.iter().filter(|j| !c.jobs.contains(j)).count();
            if c.jobs.len() + new_jobs > MAX_JOBS_PER_CONNECTION {
                return Err(format!(
                    "a connection follows at most {MAX_JOBS_PER_CONNECTION} jobs"
                ));
            }
            let new_tags = msg
                .tags
                .iter()
                .filter(|t| !c.tags.contains(&(ws, (*t).clone())))
                .count();
            if c.tags.len() + new_tags > MAX_TAGS_PER_CONNECTION {
                return Err(format!(
                    "a connection follows at most {MAX_TAGS_PER_CONNECTION} tags"
                ));
            }
        }
        let crate::realtime::Admitted { jobs, refusal } =
            crate::realtime::admit(&self.store, &viewer, &msg).await?;
        // Registered first, then the rows, then the read: a change after
        // the row notifies, one before it is in the read.
        let (new_jobs, new_tags) = self.register(conn, ws, &jobs, &msg.tags, msg.stream);
        self.insert_rows(ws, &new_jobs, &new_tags)
            .await
            .map_err(|e| db_detail(&e))?;
        for job in crate::realtime::current(&self.store, &viewer, ws, &jobs, &msg.tags).await? {
            send_job(tx, &job);
        }
        if !jobs.is_empty() {
            let (hub, jobs, tx) = (self.clone(), jobs.clone(), tx.clone());
            tokio::spawn(async move {
                tokio::time::sleep(RECHECK).await;
                if let Ok(list) = hub.store.get_many(&jobs).await {
                    for job in &list {
                        send_job(&tx, job);
                    }
                }
            });
        }
        refusal.map_or(Ok(()), Err)
    }

    /// The connection's viewer of `ws`, checked at each subscribe (a user's
    /// membership, an API key's workspace), and again each round by
    /// [`Realtime::revalidate`].
    async fn viewer(
        &self,
        state: &AppState,
        bearer: &Bearer,
        conn: u64,
        ws: WorkspaceId,
    ) -> Result<Viewer, String> {
        let v = match bearer {
            Bearer::Browser(g) if g.workspace == ws => Viewer::Browser(g.clone()),
            Bearer::Browser(_) => {
                return Err(format!("this token opens nothing in workspace {ws}"))
            }
            Bearer::Token(token) => viewer(state, token, ws).await.map_err(|e| {
                if e.status == axum::http::StatusCode::NOT_FOUND {
                    format!("this token opens nothing in workspace {ws}")
                } else {
                    e.detail
                }
            })?,
        };
        if let Some(c) = self.lock().conns.get_mut(&conn) {
            c.viewers.insert(ws, v.clone());
        }
        Ok(v)
    }

    /// Adds the subscriptions; returns the jobs and tags this process did
    /// not watch before.
    fn register(
        self: &Arc<Self>,
        conn: u64,
        ws: WorkspaceId,
        jobs: &[JobId],
        tags: &[String],
        stream: bool,
    ) -> (Vec<JobId>, Vec<String>) {
        let mut subs = self.lock();
        let Subs {
            conns,
            by_job,
            by_tag,
            streams,
        } = &mut *subs;
        let Some(c) = conns.get_mut(&conn) else {
            return (Vec::new(), Vec::new());
        };
        let mut new_jobs = Vec::new();
        for j in jobs {
            c.jobs.insert(*j);
            let set = by_job.entry(*j).or_default();
            if set.is_empty() {
                new_jobs.push(*j);
            }
            set.insert(conn);
            if stream {
                let entry = streams
                    .entry(*j)
                    .or_insert_with(|| (HashSet::new(), self.forward_stream(*j)));
                // A feed ends with its job's run (or a failed read); a job
                // retried since, followed again, gets a new one.
                if entry.1.is_finished() {
                    entry.1 = self.forward_stream(*j);
                }
                entry.0.insert(conn);
            }
        }
        let mut new_tags = Vec::new();
        for t in tags {
            let key = (ws, t.clone());
            c.tags.insert(key.clone());
            let set = by_tag.entry(key).or_default();
            if set.is_empty() {
                new_tags.push(t.clone());
            }
            set.insert(conn);
        }
        (new_jobs, new_tags)
    }

    /// Passes the job's new stream chunks to the connections that asked.
    fn forward_stream(self: &Arc<Self>, job: JobId) -> tokio::task::JoinHandle<()> {
        let (feed, mut rx) = self.watch.feed(&self.store, job);
        let hub = Arc::downgrade(self);
        let store = self.store.clone();
        tokio::spawn(async move {
            let _feed = feed;
            // The last chunk passed on: a page that starts after it (this
            // task lagged behind the feed) has its gap read from the database.
            let mut last: Option<i64> = None;
            loop {
                let item = match rx.recv().await {
                    Ok(i) => i,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let FeedItem::Chunks { after, chunks } = item else {
                    return;
                };
                let mut pages = Vec::new();
                if let Some(from) = last.filter(|l| *l < after) {
                    let mut cursor = from;
                    while cursor < after {
                        let Ok(gap) = store.stream_after(job, cursor, 1000).await else {
                            return;
                        };
                        let gap: Vec<_> = gap.into_iter().filter(|c| c.0 <= after).collect();
                        let Some(end) = gap.last().map(|c| c.0) else {
                            break;
                        };
                        cursor = end;
                        pages.push(gap);
                    }
                }
                let fresh: Vec<_> = chunks
                    .iter()
                    .filter(|c| last.is_none_or(|l| c.0 > l))
                    .cloned()
                    .collect();
                pages.push(fresh);
                let chunks: Vec<(i64, serde_json::Value)> = pages.into_iter().flatten().collect();
                if let Some(end) = chunks.last().map(|c| c.0) {
                    last = Some(end);
                }
                let Some(hub) = hub.upgrade() else { return };
                let targets: Vec<Outbox> = {
                    let subs = hub.lock();
                    subs.streams
                        .get(&job)
                        .map(|(conns, _)| {
                            conns
                                .iter()
                                .filter_map(|c| subs.conns.get(c).map(|c| c.tx.clone()))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                for (cursor, data) in chunks.iter() {
                    let text: Utf8Bytes = json!({"type": "chunk", "job_id": job, "cursor": cursor.to_string(), "data": data})
                        .to_string()
                        .into();
                    for tx in &targets {
                        offer(tx, Out::Text(text.clone()));
                    }
                }
            }
        })
    }

    async fn unsubscribe(&self, conn: u64, ws: WorkspaceId, jobs: &[JobId], tags: &[String]) {
        let (gone_jobs, gone_tags) = {
            let mut subs = self.lock();
            let mut gone_jobs = Vec::new();
            let mut gone_tags = Vec::new();
            for j in jobs {
                if let Some(c) = subs.conns.get_mut(&conn) {
                    c.jobs.remove(j);
                }
                if drop_from(&mut subs.by_job, j, conn) {
                    gone_jobs.push(*j);
                }
                drop_stream(&mut subs.streams, j, conn);
            }
            for t in tags {
                let key = (ws, t.clone());
                if let Some(c) = subs.conns.get_mut(&conn) {
                    c.tags.remove(&key);
                }
                if drop_from(&mut subs.by_tag, &key, conn) {
                    gone_tags.push(key);
                }
            }
            (gone_jobs, gone_tags)
        };
        self.delete_rows(&gone_jobs, &gone_tags).await;
    }

    /// The connection closed: its subscriptions go, and the rows no other
    /// connection needs.
    async fn leave(&self, conn: u64) {
        let Some(c) = self.lock().conns.remove(&conn) else {
            return;
        };
        let jobs: Vec<JobId> = c.jobs.into_iter().collect();
        let (gone_jobs, gone_tags) = {
            let mut subs = self.lock();
            let mut gone_jobs = Vec::new();
            for j in &jobs {
                if drop_from(&mut subs.by_job, j, conn) {
                    gone_jobs.push(*j);
                }
                drop_stream(&mut subs.streams, j, conn);
            }
            let mut gone_tags = Vec::new();
            for key in c.tags {
                if drop_from(&mut subs.by_tag, &key, conn) {
                    gone_tags.push(key);
                }
            }
            (gone_jobs, gone_tags)
        };
        self.delete_rows(&gone_jobs, &gone_tags).await;
    }

    async fn insert_rows(
        &self,
        ws: WorkspaceId,
        jobs: &[JobId],
        tags: &[String],
    ) -> Result<(), DbError> {
        if jobs.is_empty() && tags.is_empty() {
            return Ok(());
        }
        let db = db::Conn::get(self.store.pool()).await?;
        let until = (ROUND + SLACK).as_secs_f64();
        if !jobs.is_empty() {
            let ids: Vec<Uuid> = jobs.iter().map(|j| j.0).collect();
            db.execute(
                "INSERT INTO job_watches (job_id, watcher, until) \
                 SELECT j, $2, now() + make_interval(secs => $3) FROM unnest($1::uuid[]) j \
                 ON CONFLICT (job_id, watcher) DO UPDATE SET until = EXCLUDED.until",
                &[&ids, &self.watcher, &until],
            )
            .await?;
        }
        if !tags.is_empty() {
            db.execute(
                "INSERT INTO job_tag_watches (workspace_id, tag, watcher, until) \
                 SELECT $1, t, $3, now() + make_interval(secs => $4) FROM unnest($2::text[]) t \
                 ON CONFLICT (workspace_id, tag, watcher) DO UPDATE SET until = EXCLUDED.until",
                &[&ws.0, &tags, &self.watcher, &until],
            )
            .await?;
        }
        Ok(())
    }

    async fn delete_rows(&self, jobs: &[JobId], tags: &[(WorkspaceId, String)]) {
        if jobs.is_empty() && tags.is_empty() {
            return;
        }
        let Ok(db) = db::Conn::get(self.store.pool()).await else {
            // The rows expire by themselves within a round.
            return;
        };
        if !jobs.is_empty() {
            let ids: Vec<Uuid> = jobs.iter().map(|j| j.0).collect();
            let _ = db
                .execute(
                    "DELETE FROM job_watches WHERE watcher = $1 AND job_id = ANY($2)",
                    &[&self.watcher, &ids],
                )
                .await;
        }
        for (ws, tag) in tags {
            let _ = db
                .execute(
                    "DELETE FROM job_tag_watches WHERE watcher = $1 AND workspace_id = $2 AND tag = $3",
                    &[&self.watcher, &ws.0, tag],
                )
                .await;
        }
    }

    /// Writes every row this process needs a round further: one statement
    /// per table per round, however many viewers. An upsert of what the
    /// process follows, so a row lost meanwhile (swept after a late round,
    /// deleted by a leave racing a subscribe) is back within a round.
    async fn extend_rows(&self) -> Result<(), DbError> {
        let (jobs, tags): (Vec<Uuid>, Vec<(WorkspaceId, String)>) = {
            let subs = self.lock();
            (
                subs.by_job.keys().map(|j| j.0).collect(),
                subs.by_tag.keys().cloned().collect(),
            )
        };
        let db = db::Conn::get(self.store.pool()).await?;
        let until = (ROUND + SLACK).as_secs_f64();
        if !jobs.is_empty() {
            db.execute(
                "INSERT INTO job_watches (job_id, watcher, until) \
                 SELECT j, $2, now() + make_interval(secs => $3) FROM unnest($1::uuid[]) j \
                 ON CONFLICT (job_id, watcher) DO UPDATE SET until = EXCLUDED.until",
                &[&jobs, &self.watcher, &until],
            )
            .await?;
        }
        if !tags.is_empty() {
            let wss: Vec<Uuid> = tags.iter().map(|t| t.0 .0).collect();
            let names: Vec<&str> = tags.iter().map(|t| t.1.as_str()).collect();
            db.execute(
                "INSERT INTO job_tag_watches (workspace_id, tag, watcher, until) \
                 SELECT w, t, $3, now() + make_interval(secs => $4) \
                 FROM unnest($1::uuid[], $2::text[]) AS x(w, t) \
                 ON CONFLICT (workspace_id, tag, watcher) DO UPDATE SET until = EXCLUDED.until",
                &[&wss, &names, &self.watcher, &until],
            )
            .await?;
        }
        Ok(())
    }

    /// Closes the connections whose token no longer opens what they follow:
    /// an expired token, a member removed, an API key revoked, a workspace
    /// being deleted. Tokens are verified again in memory; the database is
    /// asked once per kind for all connections together.
    pub async fn revalidate(&self) -> Result<(), DbError> {
        let auth = self.auth.get().cloned();
        let conns: Vec<(Outbox, Bearer, Vec<WorkspaceId>)> = {
            let subs = self.lock();
            subs.conns
                .values()
                .map(|c| {
                    (
                        c.tx.clone(),
                        c.bearer.clone(),
                        c.viewers.keys().copied().collect(),
                    )
                })
                .collect()
        };
        let now = Utc::now().timestamp();
        let mut members: Vec<(usize, Uuid, String, String)> = Vec::new();
        let mut keys: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut open: Vec<(usize, Uuid)> = Vec::new();
        for (i, (tx, bearer, wss)) in conns.iter().enumerate() {
            match bearer {
                Bearer::Browser(g) => {
                    if g.exp + crate::auth::LEEWAY_SECS as i64 <= now {
                        tx.close("the browser token has expired: connect with a new one");
                        continue;
                    }
                    open.extend(wss.iter().map(|w| (i, w.0)));
                }
                Bearer::Token(t) if crate::api_keys::is_api_key(t) => {
                    keys.push((i, crate::api_keys::hash(t)));
                }
                Bearer::Token(t) => {
                    if let Some(auth) = &auth {
                        match auth.verify(t).await {
                            Ok(who) => members.extend(wss.iter().map(|w| {
                                (
                                    i,
                                    w.0,
                                    who.subject.clone(),
                                    who.issuer.clone().unwrap_or_default(),
                                )
                            })),
                            Err(_) => tx.close("the token has expired: connect with a new one"),
                        }
                    }
                }
            }
        }
        if members.is_empty() && keys.is_empty() && open.is_empty() {
            return Ok(());
        }
        let db = db::Conn::get(self.store.pool()).await?;
        let mut closed: HashSet<usize> = HashSet::new();
        if !members.is_empty() {
            let idx: Vec<i64> = members.iter().map(|m| m.0 as i64).collect();
            let wss: Vec<Uuid> = members.iter().map(|m| m.1).collect();
            let subs: Vec<&str> = members.iter().map(|m| m.2.as_str()).collect();
            let iss: Vec<&str> = members.iter().map(|m| m.3.as_str()).collect();
            for r in db
                .query(
                    "SELECT x.i FROM unnest($1::int8[], $2::uuid[], $3::text[], $4::text[]) \
                     AS x(i, w, s, iss) WHERE NOT EXISTS (SELECT 1 FROM workspace_members m \
                     JOIN workspaces ws ON ws.id = m.workspace_id AND ws.deleting_at IS NULL \
                     WHERE m.workspace_id = x.w AND m.subject = x.s AND m.issuer IN (x.iss, ''))",
                    &[&idx, &wss, &subs, &iss],
                )
                .await?
            {
                closed.insert(r.get::<_, i64>(0) as usize);
            }
        }
        if !keys.is_empty() {
            let idx: Vec<i64> = keys.iter().map(|k| k.0 as i64).collect();
            let hashes: Vec<&[u8]> = keys.iter().map(|k| k.1.as_slice()).collect();
            for r in db
                .query(
                    "SELECT x.i FROM unnest($1::int8[], $2::bytea[]) AS x(i, h) \
                     WHERE NOT EXISTS (SELECT 1 FROM api_keys k JOIN workspaces ws \
                     ON ws.id = k.workspace_id AND ws.deleting_at IS NULL WHERE k.secret_hash = x.h)",
                    &[&idx, &hashes],
                )
                .await?
            {
                closed.insert(r.get::<_, i64>(0) as usize);
            }
        }
        if !open.is_empty() {
            let idx: Vec<i64> = open.iter().map(|o| o.0 as i64).collect();
            let wss: Vec<Uuid> = open.iter().map(|o| o.1).collect();
            for r in db
                .query(
                    "SELECT x.i FROM unnest($1::int8[], $2::uuid[]) AS x(i, w) \
                     WHERE NOT EXISTS (SELECT 1 FROM workspaces ws \
                     WHERE ws.id = x.w AND ws.deleting_at IS NULL)",
                    &[&idx, &wss],
                )
                .await?
            {
                closed.insert(r.get::<_, i64>(0) as usize);
            }
        }
        for i in closed {
            conns[i]
                .0
                .close("this token no longer opens what this connection follows");
        }
        Ok(())
    }

    /// Reads the changed jobs that anyone here follows, once each, and
    /// sends each state to its subscribers.
    async fn publish(&self, ids: &[JobId]) {
        let wanted: Vec<JobId> = {
            let subs = self.lock();
            if subs.by_tag.is_empty() {
                ids.iter()
                    .filter(|j| subs.by_job.contains_key(j))
                    .copied()
                    .collect()
            } else {
                ids.to_vec()
            }
        };
        if wanted.is_empty() {
            return;
        }
        let jobs = match self.store.get_many(&wanted).await {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(error = %e, "realtime: changed jobs could not be read; their viewers get the next change");
                return;
            }
        };
        for job in jobs {
            let text: Utf8Bytes = crate::realtime::job_text(&job).into();
            let targets: Vec<Outbox> = {
                let subs = self.lock();
                let mut conns: HashSet<u64> = subs.by_job.get(&job.id).cloned().unwrap_or_default();
                for t in &job.tags {
                    if let Some(set) = subs.by_tag.get(&(job.workspace_id, t.clone())) {
                        conns.extend(set);
                    }
                }
                conns
                    .iter()
                    .filter_map(|c| subs.conns.get(c))
                    .filter(|c| {
                        c.viewers
                            .get(&job.workspace_id)
                            .is_some_and(|v| v.sees(&job))
                    })
                    .map(|c| c.tx.clone())
                    .collect()
            };
            for tx in &targets {
                offer(tx, job_out(&job, text.clone()));
            }
        }
    }

    /// Every followed job read again: after notifications were missed (a
    /// lost listener connection, a lagging receiver).
    async fn publish_all(&self) {
        let ids: Vec<JobId> = self.lock().by_job.keys().copied().collect();
        for chunk in ids.chunks(1000) {
            self.publish(chunk).await;
        }
    }
}

/// Queues a message for a connection without waiting; a connection whose
/// queue is full is told to go (it reconnects and starts from the current
/// state).
fn offer(tx: &Outbox, out: Out) {
    if let Err(mpsc::error::TrySendError::Full(_)) = tx.tx.try_send(out) {
        tx.close("this connection fell too far behind; reconnect and subscribe again");
    }
}

/// A job's state as the message to a connection.
fn job_out(job: &Job, text: Utf8Bytes) -> Out {
    Out::Job {
        id: job.id,
        updated_at: job.updated_at,
        terminal: job.status.is_terminal(),
        text,
    }
}

fn send_job(tx: &Outbox, job: &Job) {
    offer(tx, job_out(job, crate::realtime::job_text(job).into()));
}

/// Removes `conn` from `key`'s set; `true` when the set is now empty (and
/// removed).
fn drop_from<K: std::hash::Hash + Eq + Clone>(
    map: &mut HashMap<K, HashSet<u64>>,
    key: &K,
    conn: u64,
) -> bool {
    let Some(set) = map.get_mut(key) else {
        return false;
    };
    set.remove(&conn);
    if set.is_empty() {
        map.remove(key);
        return true;
    }
    false
}

fn drop_stream(
    streams: &mut HashMap<JobId, (HashSet<u64>, tokio::task::JoinHandle<()>)>,
    job: &JobId,
    conn: u64,
) {
    if let Some((conns, task)) = streams.get_mut(job) {
        conns.remove(&conn);
        if conns.is_empty() {
            task.abort();
            streams.remove(job);
        }
    }
}

/// Passes notified changes on; extends the rows each round; reads every
/// followed job again when notifications may have been missed.
async fn run_hub(hub: std::sync::Weak<Realtime>, mut changes: broadcast::Receiver<JobId>) {
    let mut round = tokio::time::interval(ROUND);
    round.tick().await;
    let mut was_listening = true;
    let mut fallback = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            got = changes.recv() => {
                let Some(h) = hub.upgrade() else { return };
                let mut ids = Vec::new();
                match got {
                    Ok(id) => ids.push(id),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        h.publish_all().await;
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                // Everything already notified goes in the same read.
                while ids.len() < 1000 {
                    match changes.try_recv() {
                        Ok(id) => ids.push(id),
                        Err(_) => break,
                    }
                }
                ids.sort();
                ids.dedup();
                h.publish(&ids).await;
            }
            _ = round.tick() => {
                let Some(h) = hub.upgrade() else { return };
                if let Err(e) = h.extend_rows().await {
                    tracing::warn!(error = %e, "realtime: watch rows not extended; retrying next round");
                }
                if let Err(e) = h.revalidate().await {
                    tracing::warn!(error = %e, "realtime: connections not checked again; retrying next round");
                }
            }
            _ = fallback.tick() => {
                let Some(h) = hub.upgrade() else { return };
                let listening = h.watch.is_listening();
                // Down: read every second; back up: once, for what was missed.
                if !listening || !was_listening {
                    h.publish_all().await;
                }
                was_listening = listening;
            }
        }
    }
}
