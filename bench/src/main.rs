//! `cargo run --release -p offload-bench`: measures Offload on this machine
//! against a real PostgreSQL and prints one `name value unit` line per
//! figure (the median of `--repeat` runs, after a warm-up), and all of them
//! as JSON to `--out`. It makes and drops its own databases.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use clap::Parser;
use offload::clock::Clock;
use offload::config::WorkerConfig;
use offload::db;
use offload::enqueue::{create_jobs, send_jobs};
use offload::event_source::EventSource;
use offload::handlers::{JobContext, JobError, JobHandler, Outcome, Registry};
use offload::ids::WorkspaceId;
use offload::job::{Job, QueueName};
use offload::queue::{PgQueue, Queue};
use offload::store::{NewJob, Store};
use offload::worker::Worker;
use offload::workspace::{self, Tier};
use offload_bench::{drop_database, fresh_database, percentile, with_db};
use serde_json::json;

mod coldstart;
mod crm;
mod email;
mod enrich;
mod realtime;
mod sustained;
mod workflows;

#[derive(Parser, Clone)]
#[command(about = "Offload's benchmark")]
struct Args {
    /// No-op jobs per drain run.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Runs per figure; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Messages per worker invocation on the Postgres queue.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Concurrent event-source loops during the drain.
    #[arg(long, default_value_t = 4)]
    loops: usize,
    /// Jobs created one at a time for the latency figure.
    #[arg(long, default_value_t = 500)]
    latency_jobs: usize,
    /// Creation rate for the latency figure, per second.
    #[arg(long, default_value_t = 50)]
    latency_rate: u64,
    /// Where the JSON goes.
    #[arg(long, default_value = "target/bench-results.json")]
    out: String,
    /// Figures to measure (comma-separated): tiers, drain, latency, cost, api, enqueue, sqs,
    /// import, neighbour, backlog, sustained (the last three are long: not in the default set),
    /// coldstart (after `cargo build --release --bins`), stats (1 000 000 retained jobs),
    /// workflows (fan-out overhead and wait-token latency), realtime (WebSocket push
    /// against long-polls).
    #[arg(
        long,
        default_value = "tiers,drain,latency,cost,api,enqueue,sqs,import,enrich,email,crm",
        value_delimiter = ','
    )]
    only: Vec<String>,
    /// Tiers for the tiers figure (comma-separated).
    #[arg(
        long,
        default_value = "enterprise,standard,free,unlimited",
        value_delimiter = ','
    )]
    tiers: Vec<Tier>,
    /// WebSocket viewers of one job in the realtime figure (comma-separated).
    #[arg(long, default_value = "1000,10000", value_delimiter = ',')]
    realtime_viewers: Vec<usize>,
    /// (Internal) run as the realtime figure's helper: viewers of this URL.
    #[arg(long, hide = true)]
    realtime_client: Option<String>,
    #[arg(long, hide = true, default_value_t = 0)]
    realtime_client_count: usize,
    #[arg(long, hide = true, default_value = "")]
    realtime_subscribe: String,
    /// Progress writes the followed job makes in the realtime figure.
    #[arg(long, default_value_t = 100)]
    realtime_writes: u64,
    /// Milliseconds between them.
    #[arg(long, default_value_t = 100)]
    realtime_interval_ms: u64,
    /// Seconds nothing changes while the statements of idle viewers are counted.
    #[arg(long, default_value_t = 60)]
    realtime_idle_secs: u64,
    /// Long-polling viewers for the comparison.
    #[arg(long, default_value_t = 100)]
    realtime_pollers: usize,
    /// Changes of the followed job per hour in the AWS cost (a job reporting
    /// progress once a second for the whole hour).
    #[arg(long, default_value_t = 3600.0)]
    realtime_changes_per_hour: f64,
    /// Children of the parent in the workflows figure.
    #[arg(long, default_value_t = 10_000)]
    fan_out_children: usize,
    /// Tiers for the fan-out figure (comma-separated).
    #[arg(long, default_value = "unlimited,enterprise", value_delimiter = ',')]
    fan_out_tiers: Vec<Tier>,
    /// Wait tokens completed one after another for the token figure.
    #[arg(long, default_value_t = 200)]
    token_waits: usize,
    /// Concurrent readers of one job's stream.
    #[arg(long, default_value_t = 1000)]
    stream_readers: usize,
    /// Chunks the streamed job appends (10 ms apart).
    #[arg(long, default_value_t = 200)]
    stream_chunks: usize,
    /// Retained jobs of the one workspace in the stats figure.
    #[arg(long, default_value_t = 1_000_000)]
    stats_jobs: i64,
    /// Queued jobs of the busy workspace in the neighbour figure.
    #[arg(long, default_value_t = 100_000)]
    neighbour_backlog: usize,
    /// Seconds the 50 quiet workspaces create jobs in the neighbour figure.
    #[arg(long, default_value_t = 20)]
    neighbour_secs: u64,
    /// Records on each side for the CRM sync figures.
    #[arg(long, default_value_t = 10_000)]
    crm_records: usize,
    /// Contacts of the enrichment figure's job.
    #[arg(long, default_value_t = 1000)]
    enrich_contacts: usize,
    /// Rows for the contact import and export figures.
    #[arg(long, default_value_t = 100_000)]
    import_rows: usize,
    /// Requests per second for the API latency figure.
    #[arg(long, default_value_t = 200)]
    api_rate: u64,
    /// Seconds of steady API load per run.
    #[arg(long, default_value_t = 5)]
    api_secs: u64,
    /// Concurrent clients for the single-create enqueue figure.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Batch creates of 1000 per run for the enqueue figure.
    #[arg(long, default_value_t = 20)]
    batches: usize,
    /// No-op jobs for the SQS drain figure (through the SQS API server;
    /// moto's receive slows as its queue grows, so this stays small).
    #[arg(long, default_value_t = 300)]
    sqs_jobs: usize,
    /// Jobs queued before the deep-backlog figure drains them.
    #[arg(long, default_value_t = 1_000_000)]
    backlog_jobs: usize,
    /// Tiers for the deep-backlog figure (comma-separated).
    #[arg(long, default_value = "enterprise,unlimited", value_delimiter = ',')]
    backlog_tiers: Vec<Tier>,
    /// Jobs created per second in the sustained-load figure.
    #[arg(long, default_value_t = 2_000)]
    sustained_rate: u64,
    /// Seconds the sustained load lasts.
    #[arg(long, default_value_t = 600)]
    sustained_secs: u64,
    /// Workspaces the sustained load is spread over.
    #[arg(long, default_value_t = 10)]
    sustained_workspaces: usize,
    /// Their tier.
    #[arg(long, default_value = "enterprise")]
    sustained_tier: Tier,
    /// Retention of finished jobs during the sustained load, s.
    #[arg(long, default_value_t = 60)]
    sustained_retention_secs: u64,
    /// How often the scheduler runs during the sustained load, s (EventBridge: 60).
    #[arg(long, default_value_t = 60)]
    sustained_scheduler_secs: u64,
    /// How often the sustained load is sampled, s.
    #[arg(long, default_value_t = 10)]
    sustained_sample_secs: u64,
    /// An SQS API server (moto). Without one the SQS figure is skipped.
    #[arg(long, env = "OFFLOAD_TEST_SQS_ENDPOINT")]
    sqs_endpoint: Option<String>,
}

/// One printed figure.
#[derive(serde::Serialize)]
struct Figure {
    name: String,
    value: f64,
    unit: String,
    runs: Vec<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A database of the benchmark's own, dropped at the end.
struct BenchDb {
    name: String,
    url: String,
    server: String,
    pool: deadpool_postgres::Pool,
    store: Store,
    ws: WorkspaceId,
    /// The workspace's concurrency limit, if its tier has one.
    limit: Option<i64>,
}

impl BenchDb {
    async fn new(server: &str, tag: &str) -> anyhow::Result<BenchDb> {
        Self::with_tier(server, tag, Tier::Unlimited).await
    }

    /// A database whose workspace is of `tier`: its concurrency limit kept,
    /// its creation limits lifted (the per-workspace overrides), so the
    /// benchmark can queue as many jobs as it likes.
    async fn with_tier(server: &str, tag: &str, tier: Tier) -> anyhow::Result<BenchDb> {
        let name = format!("offload_bench_{tag}_{}", std::process::id());
        let url = fresh_database(server, &name).await?;
        db::migrate(&url).await?;
        let pool = db::pool(&url, 16)?;
        let ws = WorkspaceId::new();
        workspace::ensure_workspace(&**pool.get().await?, ws, "bench", tier).await?;
        lift_creation_limits(&pool, ws).await?;
        Ok(BenchDb {
            store: Store::new(pool.clone()),
            name,
            url,
            server: server.to_string(),
            pool,
            ws,
            limit: tier.limits().max_running,
        })
    }

    async fn drop_db(self) -> anyhow::Result<()> {
        let BenchDb {
            name, server, pool, ..
        } = self;
        pool.close();
        drop_database(&server, &name).await
    }

    /// Inserts and enqueues `n` jobs of `job_type`, 1000 per statement, as
    /// the API's batch create does: a limited workspace's jobs go in parked,
    /// with a message per free slot.
    async fn seed(&self, q: &dyn Queue, n: usize, job_type: &str) -> anyhow::Result<()> {
        let mut left = n;
        while left > 0 {
            let k = left.min(1000);
            let now = chrono::Utc::now();
            let new: Vec<NewJob> = (0..k)
                .map(|_| NewJob {
                    run_at: now,
                    ..NewJob::new(self.ws, job_type, json!({}))
                })
                .collect();
            let mut conn = self.pool.get().await?;
            if let Some(limit) = self.limit {
                offload::enqueue::create_parked(
                    &self.store,
                    q,
                    &mut conn,
                    &new,
                    self.ws,
                    limit,
                    now,
                    Duration::from_secs(10),
                )
                .await?;
                left -= k;
                continue;
            }
            let jobs: Vec<Job> = self
                .store
                .insert(&conn, &new, now)
                .await?
                .into_iter()
                .map(|(j, _)| j)
                .collect();
            drop(conn);
            let refs: Vec<&Job> = jobs.iter().collect();
            let sent = send_jobs(&self.store, q, &refs, now).await?;
            if let Some(e) = sent.error {
                anyhow::bail!(
                    "seeding: the queue refused {} jobs: {e}",
                    sent.deferred.len()
                );
            }
            left -= k;
        }
        let conn = self.pool.get().await?;
        conn.batch_execute("VACUUM ANALYZE jobs").await?;
        conn.batch_execute("VACUUM ANALYZE queue_messages").await?;
        Ok(())
    }

    async fn count(&self, sql: &str) -> anyhow::Result<i64> {
        Ok(self.pool.get().await?.query_one(sql, &[]).await?.get(0))
    }
}

/// Lifts a workspace's creation limits (per user, per workspace, unfinished)
/// and keeps its tier's concurrency limit.
async fn lift_creation_limits(
    pool: &deadpool_postgres::Pool,
    ws: WorkspaceId,
) -> anyhow::Result<()> {
    pool.get()
        .await?
        .execute(
            "UPDATE workspaces SET max_created_per_user_hour = 2000000000, \
             max_created_per_hour = 2000000000, max_unfinished = 2000000000 WHERE id = $1",
            &[&ws.0],
        )
        .await?;
    Ok(())
}

/// The worker loops as `offload dev` runs them, on one database: event
/// sources on every work queue (`loops` each, sharing `concurrency`
/// invocations), woken by NOTIFY. Stopped by [`Loops::stop`].
struct Loops {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
    listener: tokio::task::JoinHandle<()>,
}

impl Loops {
    fn start(db: &BenchDb, q: &PgQueue, w: Arc<Worker>, batch: usize, loops: usize) -> Loops {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let listener = q.listen(&db.url);
        offload::event_source::spawn_all(
            &mut tasks,
            Arc::new(q.clone()),
            w,
            &offload::event_source::Polling {
                batch,
                loops_per_queue: loops,
                max_concurrency: loops.max(10),
                visibility: Duration::from_secs(60),
                wait: Duration::from_secs(1),
                invocation_timeout: Duration::from_secs(900),
            },
            &rx,
        );
        Loops {
            stop,
            tasks,
            listener,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        self.listener.abort();
    }
}

/// Waits until the workspace has no unfinished job (its trigger-kept
/// counter: no scan), polling every few milliseconds.
async fn until_drained(db: &BenchDb, limit: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + limit;
    loop {
        let left: i32 = db
            .pool
            .get()
            .await?
            .query_one(
                "SELECT unfinished FROM workspaces WHERE id = $1",
                &[&db.ws.0],
            )
            .await?
            .get(0);
        if left == 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < end, "{left} jobs still unfinished");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Drains `n` queued no-op jobs of one workspace of `tier` through the
/// worker loops; returns (jobs per second, most jobs seen running at once).
async fn tier_once(args: &Args, server: &str, tier: Tier, n: usize) -> anyhow::Result<(f64, i64)> {
    let db = BenchDb::with_tier(server, "tier", tier).await?;
    let pg = PgQueue::new(db.pool.clone(), 5);
    db.seed(&pg, n, "noop").await?;
    let w = Arc::new(worker(&db, Arc::new(pg.clone()), Registry::builtin()));
    w.warm_limits(&[db.ws]).await?;
    let watch_pool = db.pool.clone();
    let ws = db.ws;
    let (stop_watch, mut stopped) = tokio::sync::watch::channel(false);
    // The most running at once, sampled from the counter the claim trusts.
    let watcher = tokio::spawn(async move {
        let mut most = 0i64;
        let conn = watch_pool.get().await.expect("connection");
        while !*stopped.borrow() {
            let r: i32 = conn
                .query_one("SELECT running FROM workspaces WHERE id = $1", &[&ws.0])
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            most = most.max(r as i64);
            let _ = tokio::time::timeout(Duration::from_millis(2), stopped.changed()).await;
        }
        most
    });
    let start = Instant::now();
    let loops = Loops::start(&db, &pg, w, args.batch, args.loops);
    until_drained(&db, Duration::from_secs(600)).await?;
    let secs = start.elapsed().as_secs_f64();
    loops.stop().await;
    let _ = stop_watch.send(true);
    let most = watcher.await?;
    let done = db
        .count("SELECT count(*) FROM jobs WHERE status = 'completed' AND attempts = 1")
        .await?;
    anyhow::ensure!(
        done as usize == n,
        "only {done} of {n} jobs completed on their first attempt"
    );
    db.drop_db().await?;
    Ok((n as f64 / secs, most))
}

/// The noisy neighbour: one enterprise workspace with a deep backlog of
/// no-op jobs, and 50 standard workspaces each creating one job a second
/// through the API's create path, all through the worker loops as `offload
/// dev` runs them (batches of 100, 2 loops per queue). Returns the quiet
/// workspaces' creation-to-start latencies (ms) and the busy one's rate.
async fn neighbour_once(args: &Args, server: &str) -> anyhow::Result<(Vec<f64>, f64)> {
    let db = BenchDb::with_tier(server, "neighbour", Tier::Enterprise).await?;
    let pg = PgQueue::new(db.pool.clone(), 5);
    db.seed(&pg, args.neighbour_backlog, "noop").await?;
    let mut quiet = Vec::new();
    for _ in 0..50 {
        let ws = WorkspaceId::new();
        workspace::ensure_workspace(&**db.pool.get().await?, ws, "quiet", Tier::Standard).await?;
        quiet.push(ws);
    }
    let w = Arc::new(worker(&db, Arc::new(pg.clone()), Registry::builtin()));
    let start = Instant::now();
    let loops = Loops::start(&db, &pg, w, 100, 2);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let probes = args.neighbour_secs as usize * quiet.len();
    for i in 0..probes {
        tick.tick().await;
        let nj = NewJob::new(quiet[i % quiet.len()], "noop", json!({}));
        let conn = db.pool.get().await?;
        create_jobs(
            &db.store,
            &pg,
            &conn,
            &[nj],
            chrono::Utc::now(),
            Duration::from_secs(10),
        )
        .await?;
    }
    let quiet_ids: Vec<uuid::Uuid> = quiet.iter().map(|w| w.0).collect();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = db
            .pool
            .get()
            .await?
            .query_one(
                "SELECT count(*) FROM jobs WHERE workspace_id = ANY($1) AND started_at IS NULL",
                &[&quiet_ids],
            )
            .await?
            .get(0);
        if left == 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < end, "{left} quiet jobs never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let busy_done: i64 = db
        .pool
        .get()
        .await?
        .query_one(
            "SELECT count(*) FROM jobs WHERE workspace_id = $1 AND status = 'completed'",
            &[&db.ws.0],
        )
        .await?
        .get(0);
    let busy_rate = busy_done as f64 / start.elapsed().as_secs_f64();
    loops.stop().await;
    let rows = db
        .pool
        .get()
        .await?
        .query(
            "SELECT (extract(epoch FROM started_at - created_at) * 1000)::float8 \
             FROM jobs WHERE workspace_id = ANY($1)",
            &[&quiet_ids],
        )
        .await?;
    let mut ms: Vec<f64> = rows.iter().map(|r| r.get(0)).collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    db.drop_db().await?;
    Ok((ms, busy_rate))
}

fn worker(db: &BenchDb, q: Arc<dyn Queue>, registry: Registry) -> Worker {
    Worker::new(
        db.store.clone(),
        q,
        Arc::new(registry),
        WorkerConfig::default(),
        Clock::System,
        "bench",
        bench_storage(),
    )
}

fn bench_storage() -> offload::storage::Storage {
    offload::storage::Storage::local(std::env::temp_dir().join("offload-bench-storage"))
        .expect("bench storage")
}

fn source(q: Arc<dyn Queue>, w: Arc<Worker>, batch: usize, wait: Duration) -> EventSource {
    EventSource {
        queue: q,
        worker: w,
        name: QueueName::Default,
        batch,
        visibility: Duration::from_secs(60),
        wait,
        invocation_timeout: Duration::from_secs(900),
        concurrency: Arc::new(tokio::sync::Semaphore::new(1)),
    }
}

/// Peak resident memory of this process since the last reset, in MiB.
fn peak_rss_mib() -> f64 {
    proc_status_mib("VmHWM:")
}

/// The process's resident set now, in MiB.
fn rss_mib() -> f64 {
    proc_status_mib("VmRSS:")
}

fn proc_status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Resets the peak-RSS mark (Linux: "5" to clear_refs).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Drains `n` queued no-op jobs with `loops` event-source loops; returns
/// (jobs per second, peak RSS MiB during the drain).
async fn drain_once(args: &Args, server: &str, n: usize) -> anyhow::Result<(f64, f64)> {
    let db = BenchDb::new(server, "drain").await?;
    let q: Arc<dyn Queue> = Arc::new(PgQueue::new(db.pool.clone(), 5));
    db.seed(&*q, n, "noop").await?;
    let w = Arc::new(worker(&db, q.clone(), Registry::builtin()));
    reset_peak_rss();
    let start = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..args.loops {
        let s = source(q.clone(), w.clone(), args.batch, Duration::ZERO);
        loops.push(tokio::spawn(async move { s.drain().await }));
    }
    for l in loops {
        l.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let rss = peak_rss_mib();
    let done = db
        .count("SELECT count(*) FROM jobs WHERE status = 'completed'")
        .await?;
    anyhow::ensure!(done as usize == n, "only {done} of {n} jobs completed");
    db.drop_db().await?;
    Ok((n as f64 / secs, rss))
}

/// Records when each job's handler starts.
struct Stamp(Arc<Mutex<HashMap<u64, Instant>>>);

#[derive(serde::Deserialize)]
struct StampPayload {
    seq: u64,
}

#[async_trait]
impl JobHandler for Stamp {
    type Payload = StampPayload;
    const TYPE: &'static str = "stamp";
    async fn run(&self, p: StampPayload, _: &mut JobContext) -> Result<Outcome, JobError> {
        self.0.lock().unwrap().insert(p.seq, Instant::now());
        Ok(Outcome::Completed(None))
    }
}

/// Creates jobs one at a time at a steady rate while the worker idles;
/// returns enqueue-to-start latencies in ms, sorted.
async fn latency_once(args: &Args, server: &str) -> anyhow::Result<Vec<f64>> {
    let db = BenchDb::new(server, "latency").await?;
    // Start from a quiet server: the writes of the figures before (the
    // drain's 60 000 jobs) are flushed first, not during this one.
    // (CHECKPOINT needs a superuser; without one the run just goes on.)
    let _ = db.pool.get().await?.batch_execute("CHECKPOINT").await;
    let pg = PgQueue::new(db.pool.clone(), 5);
    let listener = pg.listen(&db.url);
    let q: Arc<dyn Queue> = Arc::new(pg);
    let started = Arc::new(Mutex::new(HashMap::new()));
    let w = Arc::new(worker(
        &db,
        q.clone(),
        Registry::builtin().with(Stamp(started.clone())),
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut loops = Vec::new();
    for _ in 0..2 {
        let s = Arc::new(source(
            q.clone(),
            w.clone(),
            args.batch,
            Duration::from_secs(1),
        ));
        let stop = stop_rx.clone();
        loops.push(tokio::spawn(async move { s.run(stop).await }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut created = HashMap::new();
    let every = Duration::from_micros(1_000_000 / args.latency_rate.max(1));
    let mut tick = tokio::time::interval(every);
    for seq in 0..args.latency_jobs as u64 {
        tick.tick().await;
        let t = Instant::now();
        let now = chrono::Utc::now();
        let nj = NewJob::new(db.ws, "stamp", json!({ "seq": seq }));
        // The API's create path: with the Postgres queue, the row and its
        // message in one statement.
        let conn = db.pool.get().await?;
        create_jobs(&db.store, &*q, &conn, &[nj], now, Duration::from_secs(10)).await?;
        drop(conn);
        created.insert(seq, t);
    }
    let end = Instant::now() + Duration::from_secs(10);
    while started.lock().unwrap().len() < args.latency_jobs && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    for l in loops {
        l.await?;
    }
    listener.abort();
    let started = started.lock().unwrap().clone();
    anyhow::ensure!(
        started.len() == args.latency_jobs,
        "only {} jobs started",
        started.len()
    );
    let mut ms: Vec<f64> = created
        .iter()
        .map(|(seq, t)| (started[seq] - *t).as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    db.drop_db().await?;
    Ok(ms)
}

/// SQL statements the worker path issues per batch of 10 no-op jobs,
/// counted by PostgreSQL (committed transactions of the benchmark's own
/// database; every worker statement runs in autocommit).
async fn cost_once(server: &str) -> anyhow::Result<f64> {
    let batches = 100;
    let db = BenchDb::new(server, "cost").await?;
    let admin = db::connect(&with_db(server, "postgres")).await?;
    {
        let seed_q = PgQueue::new(db.pool.clone(), 5);
        db.seed(&seed_q, batches * 10, "noop").await?;
    }
    db.pool.close();
    let read = |admin: tokio_postgres::Client, name: String| async move {
        // Stats reach the shared counters when a backend exits or idles;
        // wait until the number stops moving.
        let mut last = -1i64;
        loop {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let n: i64 = admin
                .query_one(
                    "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
                    &[&name],
                )
                .await
                .unwrap()
                .get(0);
            if n == last {
                return (admin, n);
            }
            last = n;
        }
    };
    let (admin, before) = read(admin, db.name.clone()).await;
    let pool = db::pool(&db.url, 4)?;
    let store = Store::new(pool.clone());
    let q: Arc<dyn Queue> = Arc::new(PgQueue::new(pool.clone(), 5));
    let w = Arc::new(Worker::new(
        store,
        q.clone(),
        Arc::new(Registry::builtin()),
        WorkerConfig::default(),
        Clock::System,
        "bench",
        bench_storage(),
    ));
    // Warm the limit cache as a long-lived worker would be.
    w.warm_limits(&[db.ws]).await?;
    let s = source(q.clone(), w, 10, Duration::ZERO);
    let invocations = s.drain().await;
    anyhow::ensure!(
        invocations == batches,
        "{invocations} invocations for {batches} batches"
    );
    pool.close();
    drop(s);
    let (_admin, after) = read(admin, db.name.clone()).await;
    let db_name = db.name.clone();
    let server = db.server.clone();
    drop(db);
    let admin = db::connect(&with_db(&server, "postgres")).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
        .await?;
    // The final empty receive that ends the drain is one more statement.
    Ok((after - before - 1) as f64 / batches as f64)
}

/// The API served on a loopback port for the HTTP figures, with a token
/// for the workspace's admin.
struct Served {
    base: String,
    token: String,
    client: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

/// The API's state over the benchmark's database, with tokens signed by `secret`.
fn app_state(db: &BenchDb, q: Arc<dyn Queue>, secret: &str) -> offload::api::AppState {
    let watch = offload::api::watch::Watch::new(Some(db.url.clone()), 1_000, 1_000);
    offload::api::AppState {
        realtime: offload::api::realtime::Realtime::new(watch.clone(), db.store.clone()),
        store: db.store.clone(),
        queue: q,
        registry: Arc::new(Registry::builtin()),
        auth: offload::auth::Verifier::secret(secret),
        clock: Clock::System,
        settings: Default::default(),
        storage: bench_storage(),
        watch,
        browser: Some(offload::browser_token::BrowserKeys::generated()),
    }
}

async fn serve(db: &BenchDb, q: Arc<dyn Queue>) -> anyhow::Result<Served> {
    let secret = "offload-bench-secret-offload-bench-secret";
    let user = offload::ids::UserId::new();
    workspace::add_member(&**db.pool.get().await?, db.ws, user, workspace::Role::Admin).await?;
    let app = offload::api::router(app_state(db, q, secret));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/api/workspaces/{}", listener.local_addr()?, db.ws);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let now = chrono::Utc::now();
    Ok(Served {
        base,
        token: offload::auth::Keys::new(secret).issue(user, now, now + chrono::Duration::hours(1)),
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()?,
        server,
    })
}

/// Create-job latency over loopback HTTP at a steady open-loop rate; ms, sorted.
async fn api_once(args: &Args, server: &str) -> anyhow::Result<Vec<f64>> {
    let db = BenchDb::new(server, "api").await?;
    let q: Arc<dyn Queue> = Arc::new(PgQueue::new(db.pool.clone(), 5));
    let s = Arc::new(serve(&db, q).await?);
    // Warm the connections and the prepared statements.
    for _ in 0..50 {
        s.client
            .post(format!("{}/jobs", s.base))
            .bearer_auth(&s.token)
            .json(&json!({"type": "noop"}))
            .send()
            .await?;
    }
    let total = (args.api_rate * args.api_secs) as usize;
    let every = Duration::from_micros(1_000_000 / args.api_rate.max(1));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + every * i as u32;
        tokio::time::sleep_until(due).await;
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let resp = s
                .client
                .post(format!("{}/jobs", s.base))
                .bearer_auth(&s.token)
                .json(&json!({"type": "noop"}))
                .send()
                .await;
            let ms = (tokio::time::Instant::now() - due).as_secs_f64() * 1000.0;
            match resp {
                Ok(r) if r.status() == 202 => Ok(ms),
                Ok(r) => Err(anyhow::anyhow!("create answered {}", r.status())),
                Err(e) => Err(e.into()),
            }
        }));
    }
    let mut ms = Vec::with_capacity(total);
    for t in tasks {
        ms.push(t.await??);
    }
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s.server.abort();
    db.drop_db().await?;
    Ok(ms)
}

/// Create-job latency through the router in-process (no sockets, no HTTP
/// client) at the same steady rate; ms, sorted. Separates the API's own cost
/// from the loopback HTTP stack's.
/// The stats route over a workspace whose retained history is
/// `stats_jobs` finished jobs spread evenly over the last 7 days (and a few
/// hundred waiting), called through the router; ms per call by window,
/// sorted.
async fn stats_once(args: &Args, server: &str) -> anyhow::Result<Vec<(i64, Vec<f64>)>> {
    use tower::ServiceExt;
    let db = BenchDb::new(server, "stats").await?;
    {
        let conn = db.pool.get().await?;
        conn.execute(
            "INSERT INTO jobs (id, workspace_id, job_type, queue, status, attempts, payload, \
                               created_at, started_at, finished_at, updated_at) \
             SELECT gen_random_uuid(), $1, 'noop', \
                    (ARRAY['high', 'default', 'low'])[1 + i % 3], \
                    CASE WHEN i % 50 = 0 THEN 'dead' ELSE 'completed' END, 1, '{}', \
                    t, t + interval '40 ms', t + interval '90 ms', t + interval '90 ms' \
             FROM (SELECT i, now() - (i * (interval '7 days' / $2::int)) AS t \
                   FROM generate_series(1, $2::int) AS i) s",
            &[&db.ws.0, &(args.stats_jobs as i32)],
        )
        .await?;
        conn.execute(
            "INSERT INTO jobs (id, workspace_id, job_type, status, payload) \
             SELECT gen_random_uuid(), $1, 'noop', 'queued', '{}' FROM generate_series(1, 500)",
            &[&db.ws.0],
        )
        .await?;
        // The history went into the per-minute rollups the route reads in
        // the insert's own statement (V18).
        conn.batch_execute("VACUUM ANALYZE jobs, job_stats_minutes, job_latency_minutes")
            .await?;
    }
    let (app, token) = admin_router(&db).await?;
    let mut out = Vec::new();
    for window in [3600_i64, 86_400] {
        let uri = format!("/api/workspaces/{}/stats?window={window}", db.ws);
        let mut ms = Vec::with_capacity(100);
        for i in 0..110 {
            let req = axum::http::Request::get(&uri)
                .header("authorization", format!("Bearer {token}"))
                .body(axum::body::Body::empty())?;
            let started = Instant::now();
            let resp = app.clone().oneshot(req).await?;
            let status = resp.status();
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .ok();
            anyhow::ensure!(status == 200, "stats answered {status}");
            // The first calls warm the caches; they are left out.
            if i >= 10 {
                ms.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        ms.sort_by(f64::total_cmp);
        out.push((window, ms));
    }
    db.drop_db().await?;
    Ok(out)
}

/// The API router over the benchmark's database (Postgres queue), and a
/// token of an admin of its workspace.
async fn admin_router(db: &BenchDb) -> anyhow::Result<(axum::Router, String)> {
    let q: Arc<dyn Queue> = Arc::new(PgQueue::new(db.pool.clone(), 5));
    let secret = "offload-bench-secret-offload-bench-secret";
    let user = offload::ids::UserId::new();
    workspace::add_member(&**db.pool.get().await?, db.ws, user, workspace::Role::Admin).await?;
    let app = offload::api::router(app_state(db, q, secret));
    let now = chrono::Utc::now();
    let token = offload::auth::Keys::new(secret).issue(user, now, now + chrono::Duration::hours(1));
    Ok((app, token))
}

async fn router_once(args: &Args, server: &str) -> anyhow::Result<Vec<f64>> {
    use tower::ServiceExt;
    let db = BenchDb::new(server, "router").await?;
    let (app, token) = admin_router(&db).await?;
    let uri = format!("/api/workspaces/{}/jobs", db.ws);
    let request = |uri: &str, token: &str| {
        axum::http::Request::post(uri)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(axum::body::Body::from(r#"{"type":"noop"}"#))
            .expect("request")
    };
    for _ in 0..50 {
        app.clone().oneshot(request(&uri, &token)).await?;
    }
    let total = (args.api_rate * args.api_secs) as usize;
    let every = Duration::from_micros(1_000_000 / args.api_rate.max(1));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + every * i as u32;
        tokio::time::sleep_until(due).await;
        let (app, req) = (app.clone(), request(&uri, &token));
        tasks.push(tokio::spawn(async move {
            let resp = app.oneshot(req).await.expect("infallible");
            let status = resp.status();
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .ok();
            anyhow::ensure!(status == 202, "create answered {status}");
            Ok::<f64, anyhow::Error>((tokio::time::Instant::now() - due).as_secs_f64() * 1000.0)
        }));
    }
    let mut ms = Vec::with_capacity(total);
    for t in tasks {
        ms.push(t.await??);
    }
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    db.drop_db().await?;
    Ok(ms)
}

/// Jobs/s created over HTTP by `concurrency` clients doing single creates
/// for a few seconds.
async fn enqueue_single_once(args: &Args, server: &str) -> anyhow::Result<f64> {
    let db = BenchDb::new(server, "enqueue").await?;
    let q: Arc<dyn Queue> = Arc::new(PgQueue::new(db.pool.clone(), 5));
    let s = Arc::new(serve(&db, q).await?);
    let until = Instant::now() + Duration::from_secs(args.api_secs);
    let mut clients = Vec::new();
    let start = Instant::now();
    for _ in 0..args.concurrency {
        let s = s.clone();
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                let r = s
                    .client
                    .post(format!("{}/jobs", s.base))
                    .bearer_auth(&s.token)
                    .json(&json!({"type": "noop"}))
                    .send()
                    .await?;
                anyhow::ensure!(r.status() == 202, "create answered {}", r.status());
                n += 1;
            }
            Ok::<u64, anyhow::Error>(n)
        }));
    }
    let mut singles = 0u64;
    for c in clients {
        singles += c.await??;
    }
    let rate = singles as f64 / start.elapsed().as_secs_f64();
    s.server.abort();
    db.drop_db().await?;
    Ok(rate)
}

/// Jobs/s of `batches` batch creates of 1000 no-op jobs over HTTP, one
/// after another, into a workspace of `tier` (a limited one parks what it
/// cannot start), each job with its own idempotency key when `keys`; and
/// the median batch, ms. Checks that every job was made, once.
async fn enqueue_batch_once(
    args: &Args,
    server: &str,
    tier: Tier,
    keys: bool,
) -> anyhow::Result<(f64, f64)> {
    let db = BenchDb::with_tier(server, "enqueue", tier).await?;
    let q: Arc<dyn Queue> = Arc::new(PgQueue::new(db.pool.clone(), 5));
    let s = Arc::new(serve(&db, q).await?);
    let body = |b: usize| {
        let jobs: Vec<serde_json::Value> = (0..1000)
            .map(|i| match keys {
                true => json!({"type": "noop", "idempotency_key": format!("bench-{b}-{i}")}),
                false => json!({"type": "noop"}),
            })
            .collect();
        json!({ "jobs": jobs })
    };
    let bodies: Vec<serde_json::Value> = (0..=args.batches).map(body).collect();
    let mut batch_ms = Vec::new();
    let mut start = Instant::now();
    for (b, body) in bodies.iter().enumerate() {
        // The first batch warms the connections and prepared statements.
        if b == 1 {
            start = Instant::now();
        }
        let t = Instant::now();
        let r = s
            .client
            .post(format!("{}/jobs/batch", s.base))
            .bearer_auth(&s.token)
            .json(body)
            .send()
            .await?;
        anyhow::ensure!(r.status() == 202, "batch create answered {}", r.status());
        r.bytes().await?;
        if b > 0 {
            batch_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let rate = (args.batches * 1000) as f64 / start.elapsed().as_secs_f64();
    let made = db.count("SELECT count(*) FROM jobs").await?;
    anyhow::ensure!(
        made as usize == (args.batches + 1) * 1000,
        "{made} jobs made, not {}",
        (args.batches + 1) * 1000
    );
    s.server.abort();
    db.drop_db().await?;
    Ok((rate, median(&mut batch_ms)))
}

/// Drains no-op jobs through an SQS API server (10 per receive, as SQS
/// allows). Bound by the emulator, not by Offload.
async fn sqs_once(args: &Args, server: &str, endpoint: &str) -> anyhow::Result<f64> {
    let db = BenchDb::new(server, "sqs").await?;
    let cfg = offload::config::SqsConfig {
        endpoint: Some(endpoint.to_string()),
        prefix: format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        urls: None,
        region: "us-east-1".into(),
    };
    let q: Arc<dyn Queue> = Arc::new(offload::queue::SqsQueue::connect(&cfg, 5).await?);
    db.seed(&*q, args.sqs_jobs, "noop").await?;
    let w = Arc::new(worker(&db, q.clone(), Registry::builtin()));
    let start = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..args.loops * 2 {
        let s = source(q.clone(), w.clone(), 10, Duration::ZERO);
        loops.push(tokio::spawn(async move { s.drain().await }));
    }
    for l in loops {
        l.await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let done = db
        .count("SELECT count(*) FROM jobs WHERE status = 'completed'")
        .await?;
    anyhow::ensure!(
        done as usize == args.sqs_jobs,
        "only {done} of {} jobs completed",
        args.sqs_jobs
    );
    db.drop_db().await?;
    Ok(args.sqs_jobs as f64 / secs)
}

/// Runs one job of `job_type` to its end through the worker path; returns
/// (seconds, the job).
async fn run_job(
    db: &BenchDb,
    q: Arc<dyn Queue>,
    w: Arc<Worker>,
    job_type: &str,
    payload: serde_json::Value,
) -> anyhow::Result<(f64, Job)> {
    let now = chrono::Utc::now();
    let nj = NewJob {
        run_at: now,
        ..NewJob::new(db.ws, job_type, payload)
    };
    let conn = db.pool.get().await?;
    let job = db.store.insert(&conn, &[nj], now).await?.remove(0).0;
    drop(conn);
    send_jobs(&db.store, &*q, &[&job], now).await?;
    let s = source(q, w, 10, Duration::ZERO);
    let start = Instant::now();
    s.drain().await;
    let secs = start.elapsed().as_secs_f64();
    let done = db.store.get_any(job.id).await?.expect("job");
    anyhow::ensure!(
        done.status == offload::job::JobStatus::Completed,
        "{job_type} ended {}: {:?}",
        done.status,
        done.error_message
    );
    Ok((secs, done))
}

/// What one import run measured.
struct ImportRun {
    import: f64,
    export: f64,
    rss: f64,
    xlsx: f64,
    xlsx_rss: f64,
}

/// A contact import of `rows` CSV rows from storage, then an export of the
/// same contacts as CSV, then as `.xlsx`: rows per second of each, the
/// peak RSS (MiB) of the first two, and how far the workbook export raised
/// the resident set above what the process held when it started.
async fn import_once(args: &Args, server: &str) -> anyhow::Result<ImportRun> {
    let db = BenchDb::new(server, "import").await?;
    let dir = std::env::temp_dir().join(format!("offload-bench-files-{}", std::process::id()));
    let storage = offload::storage::Storage::local(&dir)?;
    let mut csv = String::with_capacity(args.import_rows * 60);
    csv.push_str("Email,First name,Company,Stage\n");
    for i in 0..args.import_rows {
        csv.push_str(&format!(
            "person{i}@example{}.com,Person {i},Company {},lead\n",
            i % 97,
            i % 13
        ));
    }
    let key = offload::storage::upload_key(db.ws, uuid::Uuid::now_v7(), "bench.csv");
    storage.put(&key, bytes::Bytes::from(csv)).await?;
    let q: Arc<dyn Queue> = Arc::new(PgQueue::new(db.pool.clone(), 5));
    let w = Arc::new(Worker::new(
        db.store.clone(),
        q.clone(),
        Arc::new(Registry::builtin()),
        WorkerConfig::default(),
        Clock::System,
        "bench",
        storage,
    ));
    reset_peak_rss();
    let mapping = json!({"email": "Email", "first_name": "First name", "company": "Company", "stage": "Stage"});
    let (secs, job) = run_job(
        &db,
        q.clone(),
        w.clone(),
        "contact_import",
        json!({"source": {"object": key}, "mapping": mapping, "batch_size": 5000}),
    )
    .await?;
    let imported = job
        .result
        .as_ref()
        .and_then(|r| r["imported"].as_u64())
        .unwrap_or(0) as usize;
    anyhow::ensure!(
        imported == args.import_rows,
        "imported {imported} of {}",
        args.import_rows
    );
    let import_rate = args.import_rows as f64 / secs;
    let export = |format: &'static str| {
        let (q, w) = (q.clone(), w.clone());
        let db = &db;
        async move {
            let (secs, job) = run_job(db, q, w, "bulk_export", json!({ "format": format })).await?;
            let exported = job
                .result
                .as_ref()
                .and_then(|r| r["rows"].as_u64())
                .unwrap_or(0) as usize;
            anyhow::ensure!(
                exported == args.import_rows,
                "exported {exported} as {format}"
            );
            anyhow::Ok(args.import_rows as f64 / secs)
        }
    };
    let export_rate = export("csv").await?;
    let rss = peak_rss_mib();
    reset_peak_rss();
    let before = rss_mib();
    let xlsx = export("xlsx").await?;
    let xlsx_rss = peak_rss_mib() - before;
    let _ = std::fs::remove_dir_all(&dir);
    db.drop_db().await?;
    Ok(ImportRun {
        import: import_rate,
        export: export_rate,
        rss,
        xlsx,
        xlsx_rss,
    })
}

/// Runs a create-latency measurement `repeat` times; the p50s and p99s of
/// each run, in run order.
async fn p50_p99_runs<F, Fut>(repeat: usize, mut once: F) -> anyhow::Result<(Vec<f64>, Vec<f64>)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<f64>>>,
{
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for _ in 0..repeat {
        let ms = once().await?;
        eprintln!(
            "  p50 {:.2} ms, p99 {:.2} ms ({} requests)",
            percentile(&ms, 0.5),
            percentile(&ms, 0.99),
            ms.len()
        );
        p50.push(percentile(&ms, 0.50));
        p99.push(percentile(&ms, 0.99));
    }
    Ok((p50, p99))
}

/// Checks before the first figure what the wanted figures need, so a run
/// does not stop halfway: the database must answer (else the run stops
/// here); a figure whose tool is missing is dropped from `--only` with one
/// line saying how to get it.
async fn check_prerequisites(args: &mut Args, server: &str) -> anyhow::Result<()> {
    db::connect(&with_db(server, "postgres"))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach PostgreSQL at DATABASE_URL ({}): {e}; start it with \
             `source scripts/lib.sh && ensure_postgres`",
                offload::redact::text(server)
            )
        })?;
    let mut skip = Vec::new();
    for figure in &args.only {
        let missing = match figure.as_str() {
            "email" => offload::testing::SmtpSink::missing(),
            "coldstart" => ["api", "worker", "scheduler", "migrate"]
                .into_iter()
                .find_map(|b| coldstart::binary(b).err())
                .map(|e| e.to_string()),
            "sqs" if args.sqs_endpoint.is_none() => Some(
                "no SQS API server: pass --sqs-endpoint or set OFFLOAD_TEST_SQS_ENDPOINT \
                     (scripts/test.sh starts moto's)"
                    .into(),
            ),
            _ => None,
        };
        if let Some(why) = missing {
            eprintln!("{figure}: skipped ({why})");
            skip.push(figure.clone());
        }
    }
    args.only.retain(|f| !skip.contains(f));
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    offload::telemetry::init(false);
    let mut args = Args::parse();
    if let Some(url) = &args.realtime_client {
        return realtime::client_process(&args, url).await;
    }
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| offload::config::DEFAULT_DATABASE_URL.into());
    check_prerequisites(&mut args, &server).await?;
    let mut figures: Vec<Figure> = Vec::new();
    let mut report = |name: &str, mut runs: Vec<f64>, unit: &str| {
        let value = median(&mut runs.clone());
        runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("{name} {value:.2} {unit}");
        figures.push(Figure {
            name: name.into(),
            value,
            unit: unit.into(),
            runs,
        });
    };
    let want = |f: &str| args.only.iter().any(|o| o == f);

    if want("tiers") {
        eprintln!(
            "tiers: {} no-op jobs in one workspace per tier, drained through the worker loops \
             ({} per queue, batch {}), {} runs each",
            args.jobs, args.loops, args.batch, args.repeat
        );
        tier_once(&args, &server, Tier::Enterprise, args.jobs / 10).await?;
        for &tier in &args.tiers {
            let name = format!("drain_{tier}");
            let (mut rates, mut most) = (Vec::new(), Vec::new());
            for _ in 0..args.repeat {
                let (r, m) = tier_once(&args, &server, tier, args.jobs).await?;
                eprintln!("  {tier}: {r:.0} jobs/s, at most {m} running at once");
                rates.push(r);
                most.push(m as f64);
            }
            let limit = tier.limits().max_running;
            if let Some(l) = limit {
                let over = most.iter().filter(|m| **m > l as f64).count();
                anyhow::ensure!(over == 0, "{tier}: more than {l} running at once");
            }
            report(&name, rates, "jobs/s");
            report(&format!("{name}_most_running"), most, "jobs");
        }
    }

    if want("backlog") {
        eprintln!(
            "backlog: {} no-op jobs queued in one workspace per tier, then drained (1 run each)",
            args.backlog_jobs
        );
        for &tier in &args.backlog_tiers {
            let (r, m) = tier_once(&args, &server, tier, args.backlog_jobs).await?;
            eprintln!("  {tier}: {r:.0} jobs/s, at most {m} running at once");
            report(&format!("drain_backlog_{tier}"), vec![r], "jobs/s");
        }
    }
    if want("sustained") {
        eprintln!(
            "sustained: {} jobs/s for {} s over {} {} workspaces, retention {} s, \
             scheduler every {} s",
            args.sustained_rate,
            args.sustained_secs,
            args.sustained_workspaces,
            args.sustained_tier,
            args.sustained_retention_secs,
            args.sustained_scheduler_secs
        );
        let r = sustained::run(&args, &server).await?;
        // Steady state begins once two retention periods and a scheduler
        // run have passed (prune then deletes as fast as jobs finish); a
        // short run has none and uses its second half. Rows and dead tuples
        // rise and fall with each prune and vacuum, so flat means the same
        // peaks in the first and the second half of the steady state.
        let settle =
            2.0 * args.sustained_retention_secs as f64 + args.sustained_scheduler_secs as f64;
        let mut steady: Vec<&sustained::Sample> =
            r.samples.iter().filter(|s| s.at >= settle).collect();
        if steady.len() < 2 {
            steady = r.samples[r.samples.len() / 2..].iter().collect();
        }
        let (early, late) = steady.split_at(steady.len() / 2);
        let peak = |part: &[&sustained::Sample], f: fn(&sustained::Sample) -> f64| {
            part.iter().map(|s| f(s)).fold(0.0, f64::max)
        };
        let (first, last) = (steady[0], steady[steady.len() - 1]);
        report("sustained_created", vec![r.created_rate], "jobs/s");
        report("sustained_completed", vec![r.completed_rate], "jobs/s");
        report("sustained_pruned", vec![r.pruned_rate], "rows/s");
        report("sustained_jobs_mib_start", vec![first.size_mib], "MiB");
        report("sustained_jobs_mib_end", vec![last.size_mib], "MiB");
        report(
            "sustained_rows_peak_early",
            vec![peak(early, |s| s.rows as f64)],
            "rows",
        );
        report(
            "sustained_rows_peak_late",
            vec![peak(late, |s| s.rows as f64)],
            "rows",
        );
        report(
            "sustained_dead_peak_early",
            vec![peak(early, |s| s.dead as f64)],
            "tuples",
        );
        report(
            "sustained_dead_peak_late",
            vec![peak(late, |s| s.dead as f64)],
            "tuples",
        );
        report(
            "sustained_outbox_lag_max",
            vec![r.samples.iter().map(|s| s.outbox_lag).fold(0.0, f64::max)],
            "s",
        );
        report(
            "sustained_unfinished_max",
            vec![r
                .samples
                .iter()
                .map(|s| s.unfinished as f64)
                .fold(0.0, f64::max)],
            "jobs",
        );
        report(
            "sustained_slowest_scheduler_run",
            vec![r.slowest_scheduler_run],
            "s",
        );
        report(
            "sustained_start_p50",
            vec![percentile(&r.start_ms, 0.5)],
            "ms",
        );
        report(
            "sustained_start_p99",
            vec![percentile(&r.start_ms, 0.99)],
            "ms",
        );
    }
    if want("coldstart") {
        eprintln!(
            "coldstart: each function's release binary started as Lambda starts it, {} fresh \
             starts each (this machine, x86_64; Lambda runs arm64)",
            args.repeat.max(10)
        );
        let db = BenchDb::new(&server, "coldstart").await?;
        let create: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../events/api-create-job.json"
        ))?)?;
        {
            let conn = db.pool.get().await?;
            let ws: WorkspaceId = "0ff10ad0-0000-4000-8000-00000000d3e0".parse()?;
            workspace::ensure_workspace(&**conn, ws, "Sample", Tier::Standard).await?;
            workspace::add_member(
                &**conn,
                ws,
                "0ff10ad0-0000-4000-8000-0000000000a1".parse()?,
                workspace::Role::Member,
            )
            .await?;
        }
        for name in ["api", "worker", "scheduler", "migrate"] {
            let event = (name == "api").then_some(&create);
            let runs = args.repeat.max(10);
            let (init, first, size) = coldstart::measure(&db, name, runs, event).await?;
            report(
                &format!("{name}_binary_size"),
                vec![size as f64 / 1048576.0],
                "MiB",
            );
            report(&format!("{name}_init"), init, "ms");
            if !first.is_empty() {
                report(&format!("{name}_first_request"), first, "ms");
            }
        }
        let (warm, log_bytes) = coldstart::warm_worker(&db, 100).await?;
        let batch_ms = percentile(&warm, 0.5);
        report("worker_log_bytes_per_job", vec![log_bytes], "bytes");
        report("worker_warm_batch_of_10_p50", vec![batch_ms], "ms");
        report(
            "worker_warm_batch_of_10_p99",
            vec![percentile(&warm, 0.99)],
            "ms",
        );
        let user = "0ff10ad0-0000-4000-8000-0000000000a1".parse()?;
        let creates = coldstart::warm_api_batch(&db, &create, user, 50).await?;
        let create_ms = percentile(&creates, 0.5);
        report("api_warm_batch_create_of_1000_p50", vec![create_ms], "ms");
        report(
            "api_warm_batch_create_of_1000_p99",
            vec![percentile(&creates, 0.99)],
            "ms",
        );
        for (part, usd) in coldstart::cost_per_million(batch_ms, create_ms, log_bytes) {
            report(
                &format!("cost_per_million_noop_jobs_{part}"),
                vec![usd],
                "USD",
            );
        }
        db.drop_db().await?;
    }
    if want("stats") {
        eprintln!(
            "stats: GET /stats of one workspace holding {} jobs finished over the last 7 days \
             (retention), 100 calls each for window=3600 and window=86400",
            args.stats_jobs
        );
        for (window, ms) in stats_once(&args, &server).await? {
            report(
                &format!("stats_window_{window}_p50"),
                vec![percentile(&ms, 0.5)],
                "ms",
            );
            report(
                &format!("stats_window_{window}_p99"),
                vec![percentile(&ms, 0.99)],
                "ms",
            );
        }
    }
    if want("neighbour") {
        eprintln!(
            "neighbour: an enterprise workspace with {} queued jobs, 50 standard ones creating \
             a job a second each for {} s, {} runs",
            args.neighbour_backlog, args.neighbour_secs, args.repeat
        );
        let (mut p50, mut p99, mut busy) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.repeat {
            let (ms, rate) = neighbour_once(&args, &server).await?;
            eprintln!(
                "  quiet workspaces' start p50 {:.1} ms, p99 {:.1} ms; busy one {rate:.0} jobs/s",
                percentile(&ms, 0.5),
                percentile(&ms, 0.99)
            );
            p50.push(percentile(&ms, 0.5));
            p99.push(percentile(&ms, 0.99));
            busy.push(rate);
        }
        report("neighbour_start_p50", p50, "ms");
        report("neighbour_start_p99", p99, "ms");
        report("neighbour_busy_drain", busy, "jobs/s");
    }
    if want("realtime") {
        realtime::run(&args, &server, &mut report).await?;
    }
    if want("workflows") {
        eprintln!(
            "workflows: a parent with {} no-op children from its start to its completion, \
             against the same jobs alone ({} runs per tier); then {} wait tokens completed",
            args.fan_out_children, args.repeat, args.token_waits
        );
        workflows::run(&args, &server, &mut report).await?;
    }
    if want("drain") {
        eprintln!(
            "drain: warm-up, then {} runs of {} no-op jobs ({} loops, batch {})",
            args.repeat, args.jobs, args.loops, args.batch
        );
        drain_once(&args, &server, args.jobs / 10).await?;
        let mut rates = Vec::new();
        let mut rss = Vec::new();
        for _ in 0..args.repeat {
            let (r, m) = drain_once(&args, &server, args.jobs).await?;
            eprintln!("  {r:.0} jobs/s, peak RSS {m:.1} MiB");
            rates.push(r);
            rss.push(m);
        }
        report("drain_postgres", rates, "jobs/s");
        report("worker_peak_rss", rss, "MiB");
    }
    if want("latency") {
        eprintln!(
            "latency: {} jobs at {}/s, {} runs",
            args.latency_jobs, args.latency_rate, args.repeat
        );
        let (mut p50, mut p95, mut p99) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.repeat {
            let ms = latency_once(&args, &server).await?;
            eprintln!(
                "  p50 {:.2} ms, p99 {:.2} ms",
                percentile(&ms, 0.5),
                percentile(&ms, 0.99)
            );
            p50.push(percentile(&ms, 0.50));
            p95.push(percentile(&ms, 0.95));
            p99.push(percentile(&ms, 0.99));
        }
        report("latency_p50", p50, "ms");
        report("latency_p95", p95, "ms");
        report("latency_p99", p99, "ms");
    }
    if want("cost") {
        eprintln!("cost: statements per batch of 10, counted by PostgreSQL");
        let mut s = Vec::new();
        for _ in 0..args.repeat.min(2) {
            s.push(cost_once(&server).await?);
        }
        report("statements_per_batch_of_10", s.clone(), "statements");
        report(
            "statements_per_job",
            s.iter().map(|x| x / 10.0).collect(),
            "statements",
        );
    }
    if want("api") {
        eprintln!(
            "api: create-job latency over loopback HTTP at {}/s for {} s, {} runs",
            args.api_rate, args.api_secs, args.repeat
        );
        let (p50, p99) = p50_p99_runs(args.repeat, || api_once(&args, &server)).await?;
        report("api_create_p50", p50, "ms");
        report("api_create_p99", p99, "ms");
        eprintln!(
            "router: the same load through the router in-process, {} runs",
            args.repeat
        );
        let (p50, p99) = p50_p99_runs(args.repeat, || router_once(&args, &server)).await?;
        report("router_create_p50", p50, "ms");
        report("router_create_p99", p99, "ms");
    }
    if want("enqueue") {
        eprintln!(
            "enqueue: {} clients of single creates for {} s; then {} batch creates of 1000 \
             (unlimited; unlimited with an idempotency key per job; enterprise, which parks \
             what it cannot start), {} runs",
            args.concurrency, args.api_secs, args.batches, args.repeat
        );
        let mut single = Vec::new();
        for _ in 0..args.repeat {
            let a = enqueue_single_once(&args, &server).await?;
            eprintln!("  single {a:.0} jobs/s");
            single.push(a);
        }
        report("enqueue_single", single, "jobs/s");
        for (name, tier, keys) in [
            ("enqueue_batch", Tier::Unlimited, false),
            ("enqueue_batch_keys", Tier::Unlimited, true),
            ("enqueue_batch_enterprise", Tier::Enterprise, false),
        ] {
            let (mut rate, mut ms) = (Vec::new(), Vec::new());
            for _ in 0..args.repeat {
                let (r, m) = enqueue_batch_once(&args, &server, tier, keys).await?;
                eprintln!("  {name} {r:.0} jobs/s ({m:.1} ms per 1000)");
                rate.push(r);
                ms.push(m);
            }
            report(name, rate, "jobs/s");
            report(&format!("{name}_1000_p50"), ms, "ms");
        }
    }
    if want("enrich") {
        eprintln!(
            "enrich: one enrich_contact job of {} contacts against a provider on loopback, {} runs",
            args.enrich_contacts, args.repeat
        );
        enrich::run(&args, &server, &mut report).await?;
    }
    if want("crm") {
        eprintln!(
            "crm: sync_crm of {} + {} contacts with a HubSpot-shaped CRM on loopback, {} runs",
            args.crm_records, args.crm_records, args.repeat
        );
        crm::run(&args, &server, &mut report).await?;
    }
    if want("email") {
        eprintln!(
            "email: one send_email_batch job of 1000 contacts into an SMTP sink (aiosmtpd), {} runs",
            args.repeat
        );
        email::run(&args, &server, &mut report).await?;
    }
    if want("import") {
        eprintln!(
            "import: contact_import of {} CSV rows from storage, then bulk_export of them \
             as CSV and as .xlsx, {} runs",
            args.import_rows, args.repeat
        );
        let mut runs = Vec::new();
        for _ in 0..args.repeat {
            let r = import_once(&args, &server).await?;
            eprintln!(
                "  import {:.0} rows/s, export {:.0} rows/s, peak RSS {:.1} MiB; \
                 xlsx {:.0} rows/s, RSS rise {:.1} MiB",
                r.import, r.export, r.rss, r.xlsx, r.xlsx_rss
            );
            runs.push(r);
        }
        let of = |f: fn(&ImportRun) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
        report("contact_import", of(|r| r.import), "rows/s");
        report("bulk_export", of(|r| r.export), "rows/s");
        report("import_export_peak_rss", of(|r| r.rss), "MiB");
        report("bulk_export_xlsx", of(|r| r.xlsx), "rows/s");
        report("bulk_export_xlsx_rss_rise", of(|r| r.xlsx_rss), "MiB");
    }
    // Without an endpoint the prerequisites took the figure out.
    if let (true, Some(endpoint)) = (want("sqs"), &args.sqs_endpoint) {
        eprintln!(
            "sqs: {} jobs through the SQS API server at {endpoint} (bound by the emulator)",
            args.sqs_jobs
        );
        let mut r = Vec::new();
        for _ in 0..args.repeat {
            let x = sqs_once(&args, &server, endpoint).await?;
            eprintln!("  {x:.0} jobs/s");
            r.push(x);
        }
        report("drain_sqs_emulator_bound", r, "jobs/s");
    }
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &args.out,
        serde_json::to_string_pretty(&json!({
            "machine": format!("{} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)),
            "figures": figures,
        }))?,
    )?;
    eprintln!("wrote {}", args.out);
    Ok(())
}
