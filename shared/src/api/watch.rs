//! Long-polls that wait on a notification, not on a loop of reads. A
//! waiting request registers its job in `job_watches` (V10); a statement
//! that changes a watched job sends its id on `offload_jobs`; one LISTEN
//! connection per API process (opened at the first wait) passes each id to
//! the requests waiting for it. While nothing changes, a waiting request
//! costs the database nothing. Each workspace has at most
//! `max_per_workspace` requests waiting in a process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;
use uuid::Uuid;

use crate::db::{self, DbError};
use crate::ids::{JobId, WorkspaceId};
use crate::store::Store;

/// When the LISTEN connection is down, waiting requests read the job this
/// often instead.
const FALLBACK_POLL: Duration = Duration::from_secs(1);

/// The long-polls of one API process.
pub struct Watch {
    database_url: Option<String>,
    max_per_workspace: usize,
    changed: broadcast::Sender<JobId>,
    /// Whether the listener is connected and listening now.
    listening: Arc<std::sync::atomic::AtomicBool>,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
    waiting: Mutex<HashMap<WorkspaceId, usize>>,
    feeds: Mutex<HashMap<JobId, std::sync::Weak<Feed>>>,
}

/// What a job's feed passes to the stream readers of this process.
#[derive(Clone, Debug)]
pub enum FeedItem {
    /// Chunks appended since the feed's last read, in order.
    Chunks(Arc<Vec<(i64, serde_json::Value)>>),
    /// The job finished (its stream is complete).
    Ended(crate::job::JobStatus),
}

/// One job's stream, read from the database once per change for every
/// reader of it in this process (1 000 browsers following one job cost the
/// database what one does). Ends with its last reader.
pub struct Feed {
    tx: broadcast::Sender<FeedItem>,
    task: tokio::task::JoinHandle<()>,
}

impl Feed {
    pub fn subscribe(&self) -> broadcast::Receiver<FeedItem> {
        self.tx.subscribe()
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(l) = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            l.abort();
        }
    }
}

/// Too many requests of the workspace are waiting already.
pub struct Full;

/// One waiting request: its place in the workspace's count and its watch
/// row, both given back when it is dropped.
pub struct Waiter {
    watch: Arc<Watch>,
    store: Store,
    workspace: WorkspaceId,
    job: JobId,
    watcher: Uuid,
    changes: broadcast::Receiver<JobId>,
}

impl Watch {
    /// Without a database URL (a state built by hand), waits poll.
    pub fn new(database_url: Option<String>, max_per_workspace: usize) -> Arc<Watch> {
        Arc::new(Watch {
            database_url,
            max_per_workspace,
            changed: broadcast::channel(4096).0,
            listening: Arc::default(),
            listener: Mutex::new(None),
            waiting: Mutex::default(),
            feeds: Mutex::default(),
        })
    }

    /// The feed of `job`'s stream in this process, started by its first
    /// reader, with a receiver subscribed before anything is sent.
    pub fn feed(
        self: &Arc<Self>,
        store: &Store,
        workspace: WorkspaceId,
        job: JobId,
    ) -> (Arc<Feed>, broadcast::Receiver<FeedItem>) {
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        feeds.retain(|_, f| f.strong_count() > 0);
        if let Some(f) = feeds.get(&job).and_then(std::sync::Weak::upgrade) {
            let rx = f.subscribe();
            return (f, rx);
        }
        let (tx, rx) = broadcast::channel(1024);
        let task = tokio::spawn(run_feed(
            self.clone(),
            store.clone(),
            workspace,
            job,
            tx.clone(),
        ));
        let feed = Arc::new(Feed { tx, task });
        feeds.insert(job, Arc::downgrade(&feed));
        (feed, rx)
    }

    /// Registers a request waiting up to `until` for `job` to change.
    pub async fn wait_for(
        self: &Arc<Self>,
        store: &Store,
        workspace: WorkspaceId,
        job: JobId,
        until: Duration,
    ) -> Result<Result<Waiter, Full>, DbError> {
        {
            let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let n = w.entry(workspace).or_default();
            if *n >= self.max_per_workspace {
                return Ok(Err(Full));
            }
            *n += 1;
        }
        self.start_listener();
        let waiter = Waiter {
            watch: self.clone(),
            store: store.clone(),
            workspace,
            job,
            watcher: Uuid::new_v4(),
            changes: self.changed.subscribe(),
        };
        let db = db::Conn::get(store.pool()).await?;
        db.execute(
            "INSERT INTO job_watches (job_id, watcher, until) \
             VALUES ($1, $2, now() + make_interval(secs => $3))",
            &[&job.0, &waiter.watcher, &(until.as_secs_f64() + 5.0)],
        )
        .await?;
        // Changes made before the row was in place sent nothing: the caller
        // reads the job again after this.
        Ok(Ok(waiter))
    }

    fn start_listener(&self) {
        let Some(url) = self.database_url.clone() else {
            return;
        };
        let mut l = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        if l.is_some() {
            return;
        }
        let (changed, listening) = (self.changed.clone(), self.listening.clone());
        *l = Some(tokio::spawn(async move {
            loop {
                if let Err(e) = listen_once(&url, &changed, &listening).await {
                    tracing::warn!(error = %e, "job watch listener lost its connection; reconnecting");
                }
                listening.store(false, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }
}

/// Reads what `job` appends while anyone reads it: after each change it is
/// told of (its own watch registration, one per feed), or every second
/// when the workspace's watches are all taken or the listener is down.
async fn run_feed(
    watch: Arc<Watch>,
    store: Store,
    workspace: WorkspaceId,
    job: JobId,
    tx: broadcast::Sender<FeedItem>,
) {
    let mut cursor = match last_chunk(&store, job).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, job_id = %job, "stream feed cannot start");
            return;
        }
    };
    loop {
        let round = tokio::time::Instant::now() + Duration::from_secs(55);
        let mut waiter = match watch
            .wait_for(&store, workspace, job, Duration::from_secs(60))
            .await
        {
            Ok(Ok(w)) => Some(w),
            Ok(Err(Full)) | Err(_) => None,
        };
        loop {
            match feed_once(&store, job, &mut cursor, &tx).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, job_id = %job, "stream feed read failed"),
            }
            if tx.receiver_count() == 0 {
                return;
            }
            let now = tokio::time::Instant::now();
            if now >= round {
                break;
            }
            match waiter.as_mut() {
                Some(w) => {
                    w.changed(round).await;
                }
                None => tokio::time::sleep(FALLBACK_POLL).await,
            }
        }
    }
}

/// Sends what was appended after `cursor`, and the end when the job is
/// finished; `true` once it has ended.
async fn feed_once(
    store: &Store,
    job: JobId,
    cursor: &mut i64,
    tx: &broadcast::Sender<FeedItem>,
) -> Result<bool, DbError> {
    let status = store.get_any(job).await?.map(|j| j.status);
    loop {
        let page = store.stream_after(job, *cursor, 1000).await?;
        let Some(last) = page.last().map(|c| c.0) else {
            break;
        };
        *cursor = last;
        let _ = tx.send(FeedItem::Chunks(Arc::new(page)));
    }
    match status {
        Some(s) if s.is_terminal() => {
            let _ = tx.send(FeedItem::Ended(s));
            Ok(true)
        }
        None => Ok(true),
        Some(_) => Ok(false),
    }
}

async fn last_chunk(store: &Store, job: JobId) -> Result<i64, DbError> {
    let db = db::Conn::get(store.pool()).await?;
    let row = db
        .query_one(
            "SELECT coalesce(max(id), 0) FROM job_stream WHERE job_id = $1",
            &[&job.0],
        )
        .await?;
    Ok(row.get(0))
}

async fn listen_once(
    url: &str,
    changed: &broadcast::Sender<JobId>,
    listening: &std::sync::atomic::AtomicBool,
) -> Result<(), DbError> {
    db::listen(
        url,
        "offload_jobs",
        || listening.store(true, std::sync::atomic::Ordering::SeqCst),
        |ids| {
            for id in ids.split(',') {
                if let Ok(id) = id.parse::<Uuid>() {
                    let _ = changed.send(JobId(id));
                }
            }
        },
    )
    .await
}

impl Waiter {
    /// Waits until the job may have changed (a notification for it), or
    /// `deadline`; `false` at the deadline. With the listener down, it
    /// returns every second so the caller reads the job itself.
    pub async fn changed(&mut self, deadline: tokio::time::Instant) -> bool {
        loop {
            let listening = self
                .watch
                .listening
                .load(std::sync::atomic::Ordering::SeqCst);
            let until = if listening {
                deadline
            } else {
                deadline.min(tokio::time::Instant::now() + FALLBACK_POLL)
            };
            match tokio::time::timeout_at(until, self.changes.recv()).await {
                Ok(Ok(id)) if id == self.job => return true,
                Ok(Ok(_)) => continue,
                // Missed some: it may have been ours.
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => return true,
                Ok(Err(broadcast::error::RecvError::Closed)) => return true,
                Err(_) => return tokio::time::Instant::now() < deadline,
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        {
            let mut w = self.watch.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = w.get_mut(&self.workspace) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    w.remove(&self.workspace);
                }
            }
        }
        let (store, job, watcher) = (self.store.clone(), self.job, self.watcher);
        tokio::spawn(async move {
            if let Ok(db) = db::Conn::get(store.pool()).await {
                let _ = db
                    .execute(
                        "DELETE FROM job_watches WHERE job_id = $1 AND watcher = $2",
                        &[&job.0, &watcher],
                    )
                    .await;
            }
        });
    }
}
