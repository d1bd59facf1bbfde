//! Long-polls and stream feeds that wait on a notification, not on a loop
//! of reads. A waiter registers its job in `job_watches` (V10); a statement
//! that changes a watched job (or appends to its stream) sends its id on
//! `offload_jobs`; one LISTEN connection per API process (opened at the
//! first registration) passes each id to the waiters of that job. While
//! nothing changes, a waiter costs the database nothing.
//!
//! Each workspace has at most `max_waiting_per_workspace` long-polls
//! waiting and `max_streams_per_workspace` stream connections open in a
//! process, counted apart: a thousand browsers following streams leave the
//! workspace's long-polls their places. A job's stream is read by one feed
//! per process, whatever its number of readers, and the feed's watch takes
//! neither kind of place.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;
use uuid::Uuid;

use crate::db::{self, DbError};
use crate::ids::{JobId, WorkspaceId};
use crate::job::JobStatus;
use crate::store::Store;

/// When the LISTEN connection is down, waiters read the job this often
/// instead (one read per long-poll, or per feed: never per stream reader).
const FALLBACK_POLL: Duration = Duration::from_secs(1);

/// How long a feed waits on one registration before it reads anyway and
/// extends its watch row (which expires `WATCH_SLACK` after the round, so a
/// crashed process's rows go by themselves).
const FEED_ROUND: Duration = Duration::from_secs(55);
const WATCH_SLACK: Duration = Duration::from_secs(5);

/// A feed reads once more this long after its watch row is in place: an
/// append whose statement looked for watchers just before the row was
/// committed, and committed just after the feed's first read, sent no
/// notification (as the long-poll's `WATCH_RECHECK`).
const FEED_RECHECK: Duration = Duration::from_secs(1);

/// Chunks per read of a feed (and per broadcast page).
const FEED_PAGE: i64 = 1000;

/// The long-polls and stream feeds of one API process.
pub struct Watch {
    database_url: Option<String>,
    changed: broadcast::Sender<JobId>,
    /// Whether the listener is connected and listening now.
    listening: Arc<AtomicBool>,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Long-polls waiting, per workspace.
    waiting: Places,
    /// Stream connections open, per workspace.
    streaming: Places,
    /// The running feed of each job being read. An entry is removed by its
    /// feed's task when it stops, under this lock, so a reader never joins
    /// a feed that will send nothing more.
    feeds: Mutex<HashMap<JobId, FeedEntry>>,
    /// Tells one feed of a job from the one started after it.
    next_feed: AtomicU64,
}

struct FeedEntry {
    id: u64,
    feed: Weak<Feed>,
}

/// At most `max` places per workspace.
struct Places {
    max: usize,
    taken: Mutex<HashMap<WorkspaceId, usize>>,
}

impl Places {
    fn new(max: usize) -> Places {
        Places {
            max,
            taken: Mutex::default(),
        }
    }

    /// Takes a place of `workspace`; `false` when all are taken.
    fn take(&self, workspace: WorkspaceId) -> bool {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let n = taken.entry(workspace).or_default();
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    fn give_back(&self, workspace: WorkspaceId) {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = taken.get_mut(&workspace) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                taken.remove(&workspace);
            }
        }
    }
}

/// What a job's feed passes to the stream readers of this process.
#[derive(Clone, Debug)]
pub enum FeedItem {
    /// Every chunk appended after cursor `after` up to the last of
    /// `chunks`, in order. A reader whose own cursor is behind `after`
    /// reads what lies between from the database first (it joined the
    /// feed after that part was passed on, or lagged behind it).
    Chunks {
        after: i64,
        chunks: Arc<Vec<(i64, serde_json::Value)>>,
    },
    /// The job finished: every chunk was passed on before this.
    Ended(JobStatus),
    /// The feed stopped (a read failed, or the job is gone): readers end
    /// their responses, and clients resume from their last id on a new one.
    Stopped,
}

/// One job's stream, read from the database once per change for every
/// reader of it in this process (1 000 browsers following one job cost the
/// database what one does). Ends with its last reader.
pub struct Feed {
    tx: broadcast::Sender<FeedItem>,
    task: tokio::task::JoinHandle<()>,
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

/// Too many requests of the workspace are waiting (or streaming) already.
pub struct Full;

/// A row in `job_watches`: while it exists, statements that change the job
/// notify this process. Deleted when dropped.
struct Registration {
    watch: Arc<Watch>,
    store: Store,
    job: JobId,
    watcher: Uuid,
    changes: broadcast::Receiver<JobId>,
}

/// One waiting long-poll: its place in the workspace's count and its watch
/// row, both given back when it is dropped.
pub struct Waiter {
    registration: Registration,
    workspace: WorkspaceId,
}

/// One open stream connection's place in its workspace's count, given back
/// when it is dropped.
pub struct StreamPlace {
    watch: Arc<Watch>,
    workspace: WorkspaceId,
}

impl Watch {
    /// Without a database URL (a state built by hand), waits poll.
    pub fn new(
        database_url: Option<String>,
        max_waiting_per_workspace: usize,
        max_streams_per_workspace: usize,
    ) -> Arc<Watch> {
        Arc::new(Watch {
            database_url,
            changed: broadcast::channel(4096).0,
            listening: Arc::default(),
            listener: Mutex::new(None),
            waiting: Places::new(max_waiting_per_workspace),
            streaming: Places::new(max_streams_per_workspace),
            feeds: Mutex::default(),
            next_feed: AtomicU64::new(0),
        })
    }

    /// Every job id notified from now on (the listener started if it was
    /// not): the realtime channel's feed of changes.
    pub fn changes(&self) -> broadcast::Receiver<JobId> {
        let rx = self.changed.subscribe();
        self.start_listener();
        rx
    }

    /// Whether notifications arrive now (the listener is connected).
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// A place for one stream connection of `workspace`, or `Full`.
    pub fn stream_place(self: &Arc<Self>, workspace: WorkspaceId) -> Result<StreamPlace, Full> {
        if !self.streaming.take(workspace) {
            return Err(Full);
        }
        Ok(StreamPlace {
            watch: self.clone(),
            workspace,
        })
    }

    /// The feed of `job`'s stream in this process, started by its first
    /// reader, with a receiver subscribed before anything is sent.
    pub fn feed(
        self: &Arc<Self>,
        store: &Store,
        job: JobId,
    ) -> (Arc<Feed>, broadcast::Receiver<FeedItem>) {
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        feeds.retain(|_, f| f.feed.strong_count() > 0);
        if let Some(f) = feeds.get(&job).and_then(|e| e.feed.upgrade()) {
            let rx = f.tx.subscribe();
            return (f, rx);
        }
        let (tx, rx) = broadcast::channel(1024);
        let id = self.next_feed.fetch_add(1, Ordering::Relaxed);
        let running = Running {
            watch: self.clone(),
            job,
            id,
            tx: tx.clone(),
            last: FeedItem::Stopped,
        };
        let task = tokio::spawn(run_feed(store.clone(), running));
        let feed = Arc::new(Feed { tx, task });
        feeds.insert(
            job,
            FeedEntry {
                id,
                feed: Arc::downgrade(&feed),
            },
        );
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
        if !self.waiting.take(workspace) {
            return Ok(Err(Full));
        }
        // The place is given back with the waiter, whether the row is
        // written or not.
        let waiter = Waiter {
            registration: self.registration(store, job),
            workspace,
        };
        waiter.registration.insert(until + WATCH_SLACK).await?;
        // Changes made before the row was in place sent nothing: the caller
        // reads the job again after this.
        Ok(Ok(waiter))
    }

    /// A registration of `job`, listening for changes from now on; its row
    /// is written by [`Registration::insert`].
    fn registration(self: &Arc<Self>, store: &Store, job: JobId) -> Registration {
        self.start_listener();
        Registration {
            watch: self.clone(),
            store: store.clone(),
            job,
            watcher: Uuid::new_v4(),
            changes: self.changed.subscribe(),
        }
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
                listening.store(false, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }
}

/// A feed's task's hold on its entry in [`Watch::feeds`]: however the task
/// ends (its job's end, a failed read, its last reader gone, even a panic),
/// dropping this removes the entry and passes `last` to the readers, in
/// that order and under the map's lock, so a reader either joins before
/// and is told, or after and starts a new feed.
struct Running {
    watch: Arc<Watch>,
    job: JobId,
    id: u64,
    tx: broadcast::Sender<FeedItem>,
    last: FeedItem,
}

impl Running {
    /// `true`, and the entry removed, when no reader is left: checked under
    /// the lock readers subscribe under, so none joins a feed that stops.
    fn unread(&self) -> bool {
        let mut feeds = self.watch.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if self.tx.receiver_count() > 0 {
            return false;
        }
        self.leave(&mut feeds);
        true
    }

    /// Removes this feed's entry (not a newer feed's of the same job).
    fn leave(&self, feeds: &mut HashMap<JobId, FeedEntry>) {
        if feeds.get(&self.job).is_some_and(|e| e.id == self.id) {
            feeds.remove(&self.job);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut feeds = self.watch.feeds.lock().unwrap_or_else(|e| e.into_inner());
        self.leave(&mut feeds);
        let _ = self.tx.send(self.last.clone());
    }
}

async fn run_feed(store: Store, mut running: Running) {
    let job = running.job;
    running.last = match feed(&store, &running).await {
        Ok(Some(status)) => FeedItem::Ended(status),
        Ok(None) => FeedItem::Stopped,
        Err(e) => {
            tracing::warn!(error = %e, job_id = %job, "stream feed read failed; its readers resume on a new one");
            FeedItem::Stopped
        }
    };
}

/// Passes on what `running`'s job appends while anyone reads it, reading
/// after each notification of a change (every second while the listener
/// is down), and once per round anyway. Returns the job's status when it
/// has finished, `None` when no reader is left or the job is gone.
async fn feed(store: &Store, running: &Running) -> Result<Option<JobStatus>, DbError> {
    let job = running.job;
    // The watch row first, then the first read: a change after the row is
    // in place notifies, one before it is in the read.
    let mut registration = running.watch.registration(store, job);
    registration.insert(FEED_ROUND + WATCH_SLACK).await?;
    // Readers subscribed before this read their backlog from the database
    // themselves; each page says where it starts, so one behind it reads
    // the gap before taking it.
    let mut cursor = last_chunk(store, job).await?;
    let mut recheck = Some(Instant::now() + FEED_RECHECK);
    loop {
        let round = Instant::now() + FEED_ROUND;
        loop {
            match feed_once(store, job, &mut cursor, &running.tx).await? {
                Some(status) if status.is_terminal() => return Ok(Some(status)),
                Some(_) => {}
                None => return Ok(None),
            }
            if running.unread() {
                return Ok(None);
            }
            if Instant::now() >= round {
                break;
            }
            let until = recheck.take().map_or(round, |r| r.min(round));
            registration.changed(until).await;
        }
        registration.extend(FEED_ROUND + WATCH_SLACK).await?;
    }
}

/// Passes on what was appended after `cursor`; returns the job's status as
/// read before those chunks (so every chunk of a finished job was read),
/// or `None` when the job is gone.
async fn feed_once(
    store: &Store,
    job: JobId,
    cursor: &mut i64,
    tx: &broadcast::Sender<FeedItem>,
) -> Result<Option<JobStatus>, DbError> {
    let status = store.get_any(job).await?.map(|j| j.status);
    loop {
        let page = store.stream_after(job, *cursor, FEED_PAGE).await?;
        let Some(last) = page.last().map(|c| c.0) else {
            break;
        };
        let after = std::mem::replace(cursor, last);
        let _ = tx.send(FeedItem::Chunks {
            after,
            chunks: Arc::new(page),
        });
    }
    Ok(status)
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
    listening: &AtomicBool,
) -> Result<(), DbError> {
    db::listen(
        url,
        "offload_jobs",
        || listening.store(true, Ordering::SeqCst),
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

impl Registration {
    /// Writes the row, expiring after `until` (a crashed process's rows
    /// then go by themselves).
    async fn insert(&self, until: Duration) -> Result<(), DbError> {
        let db = db::Conn::get(self.store.pool()).await?;
        db.execute(
            "INSERT INTO job_watches (job_id, watcher, until) \
             VALUES ($1, $2, now() + make_interval(secs => $3))",
            &[&self.job.0, &self.watcher, &until.as_secs_f64()],
        )
        .await?;
        Ok(())
    }

    /// Moves the row's expiry to `until` from now.
    async fn extend(&self, until: Duration) -> Result<(), DbError> {
        let db = db::Conn::get(self.store.pool()).await?;
        db.execute(
            "UPDATE job_watches SET until = now() + make_interval(secs => $3) \
             WHERE job_id = $1 AND watcher = $2",
            &[&self.job.0, &self.watcher, &until.as_secs_f64()],
        )
        .await?;
        Ok(())
    }

    /// Waits until the job may have changed (a notification for it), or
    /// `deadline`; `false` at the deadline. With the listener down, it
    /// returns every second so the caller reads the job itself.
    async fn changed(&mut self, deadline: Instant) -> bool {
        loop {
            let until = if self.watch.listening.load(Ordering::SeqCst) {
                deadline
            } else {
                deadline.min(Instant::now() + FALLBACK_POLL)
            };
            match tokio::time::timeout_at(until, self.changes.recv()).await {
                Ok(Ok(id)) if id == self.job => return true,
                Ok(Ok(_)) => continue,
                // Missed some: it may have been ours.
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => return true,
                Ok(Err(broadcast::error::RecvError::Closed)) => return true,
                Err(_) => return Instant::now() < deadline,
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
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

impl Waiter {
    /// Waits until the job may have changed (a notification for it), or
    /// `deadline`; `false` at the deadline. With the listener down, it
    /// returns every second so the caller reads the job itself.
    pub async fn changed(&mut self, deadline: Instant) -> bool {
        self.registration.changed(deadline).await
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.registration.watch.waiting.give_back(self.workspace);
    }
}

impl Drop for StreamPlace {
    fn drop(&mut self) {
        self.watch.streaming.give_back(self.workspace);
    }
}
