//! The sustained-load figure: jobs created at a fixed rate for minutes, in
//! workspaces of a limited tier, drained by the worker loops, with the
//! scheduler's duties (prune among them, retention shortened) running on
//! their production schedule. What must stay flat: the jobs table's size
//! and dead tuples, the outbox's lag and the start latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use offload::clock::Clock;
use offload::enqueue::create_batch;
use offload::handlers::Registry;
use offload::ids::WorkspaceId;
use offload::queue::{PgQueue, Queue};
use offload::scheduler::{Scheduler, SchedulerConfig};
use offload::store::NewJob;
use offload::workspace::{self, Tier};
use serde_json::json;

use super::{lift_creation_limits, worker, Args, BenchDb, Loops};

/// One sample of the database while the load runs.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Seconds since the load started.
    pub at: f64,
    /// Rows in `jobs`.
    pub rows: i64,
    /// `jobs` with its indexes and TOAST, MiB.
    pub size_mib: f64,
    /// Dead tuples in `jobs` (as the statistics last saw them).
    pub dead: i64,
    /// Unfinished jobs (pending, queued, running).
    pub unfinished: i64,
    /// Age of the oldest job still `pending` (not yet sent), s.
    pub outbox_lag: f64,
}

/// What a sustained run measured.
pub struct Sustained {
    pub samples: Vec<Sample>,
    /// Jobs created per second over the run.
    pub created_rate: f64,
    /// Jobs completed per second over the run.
    pub completed_rate: f64,
    /// Rows the scheduler pruned per second over the run.
    pub pruned_rate: f64,
    /// Longest scheduler run, s.
    pub slowest_scheduler_run: f64,
    /// Creation-to-start latencies over the run, ms, sorted.
    pub start_ms: Vec<f64>,
}

/// Creates `n` jobs in `ws` as the API's batch create does: more due jobs
/// than the workspace may run at once go in parked.
async fn create(
    pool: &deadpool_postgres::Pool,
    store: &offload::store::Store,
    q: &dyn Queue,
    ws: WorkspaceId,
    limit: Option<i64>,
    n: usize,
) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    let new: Vec<NewJob> = (0..n)
        .map(|_| NewJob {
            run_at: now,
            ..NewJob::new(ws, "noop", json!({}))
        })
        .collect();
    let mut conn = pool.get().await?;
    create_batch(
        store,
        q,
        &mut conn,
        &new,
        ws,
        limit,
        now,
        Duration::from_secs(10),
    )
    .await?;
    Ok(())
}

async fn sample(db: &BenchDb, at: f64) -> anyhow::Result<Sample> {
    let conn = db.pool.get().await?;
    let r = conn
        .query_one(
            "SELECT (SELECT count(*) FROM jobs), \
               pg_total_relation_size('jobs')::float8 / 1048576, \
               (SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relname = 'jobs'), \
               (SELECT coalesce(sum(unfinished), 0)::int8 FROM workspaces), \
               (SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 \
                FROM jobs WHERE status = 'pending')",
            &[],
        )
        .await?;
    Ok(Sample {
        at,
        rows: r.get(0),
        size_mib: r.get(1),
        dead: r.get(2),
        unfinished: r.get(3),
        outbox_lag: r.get(4),
    })
}

/// Creation-to-start latencies (ms) of the jobs that started in `[from, to)`.
async fn started_between(
    db: &BenchDb,
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Vec<f64>> {
    let rows = db
        .pool
        .get()
        .await?
        .query(
            "SELECT (extract(epoch FROM started_at - greatest(created_at, run_at)) * 1000)::float8 \
             FROM jobs WHERE started_at >= $1 AND started_at < $2",
            &[&from, &to],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Runs the load for `args.sustained_secs` and samples every
/// `args.sustained_sample_secs`.
pub async fn run(args: &Args, server: &str) -> anyhow::Result<Sustained> {
    let tier: Tier = args.sustained_tier;
    let db = BenchDb::with_tier(server, "sustained", tier).await?;
    let mut spaces = vec![db.ws];
    for _ in 1..args.sustained_workspaces {
        let ws = WorkspaceId::new();
        workspace::ensure_workspace(&**db.pool.get().await?, ws, "sustained", tier).await?;
        lift_creation_limits(&db.pool, ws).await?;
        spaces.push(ws);
    }
    let limit = tier.limits().max_running;
    let pg = PgQueue::new(db.pool.clone(), 5);
    let q: Arc<dyn Queue> = Arc::new(pg.clone());
    let w = Arc::new(worker(&db, q.clone(), Registry::builtin()));
    w.warm_limits(&spaces).await?;
    let loops = Loops::start(&db, &pg, w, args.batch, args.loops);

    let scheduler = Scheduler {
        store: db.store.clone(),
        queue: q.clone(),
        clock: Clock::System,
        config: SchedulerConfig {
            retention: Duration::from_secs(args.sustained_retention_secs),
            ..SchedulerConfig::default()
        },
    };
    let pruned = Arc::new(AtomicU64::new(0));
    let slowest_us = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sched = {
        let (pruned, slowest_us, mut stopped) =
            (pruned.clone(), slowest_us.clone(), stopped.clone());
        let every = Duration::from_secs(args.sustained_scheduler_secs);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return,
                }
                let t = Instant::now();
                let report = scheduler.run_once().await;
                slowest_us.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                pruned.fetch_add(report.pruned, Ordering::Relaxed);
                if !report.errors.is_empty() {
                    eprintln!("  scheduler errors: {:?}", report.errors);
                }
            }
        })
    };

    // The producer: every 10 ms the jobs due by then, one batch per
    // workspace in turn, so the rate holds even when a create is slow.
    let created = Arc::new(AtomicU64::new(0));
    let producer = {
        let (created, mut stopped) = (created.clone(), stopped.clone());
        let rate = args.sustained_rate as f64;
        let (pool, store) = (db.pool.clone(), db.store.clone());
        let spaces = spaces.clone();
        let q = q.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut next = 0usize;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return Ok::<(), anyhow::Error>(()),
                }
                let due = (start.elapsed().as_secs_f64() * rate) as u64;
                let n = due.saturating_sub(created.load(Ordering::Relaxed)) as usize;
                if n == 0 {
                    continue;
                }
                create(&pool, &store, &*q, spaces[next % spaces.len()], limit, n).await?;
                next += 1;
                created.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };

    let start = Instant::now();
    let started_at = chrono::Utc::now();
    let mut samples = vec![sample(&db, 0.0).await?];
    let mut start_ms = Vec::new();
    let mut window = started_at;
    let every = Duration::from_secs(args.sustained_sample_secs);
    let end = start + Duration::from_secs(args.sustained_secs);
    while Instant::now() < end {
        tokio::time::sleep(every.min(end - Instant::now())).await;
        let now = chrono::Utc::now();
        // Jobs of the window that just closed (retention keeps them long
        // enough: the window is shorter than it).
        start_ms.extend(started_between(&db, window, now).await?);
        window = now;
        let s = sample(&db, start.elapsed().as_secs_f64()).await?;
        eprintln!(
            "  {:>5.0} s: {:>7} rows, {:>6.1} MiB, {:>6} dead, {:>6} unfinished, outbox lag {:.1} s",
            s.at, s.rows, s.size_mib, s.dead, s.unfinished, s.outbox_lag
        );
        samples.push(s);
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = stop.send(true);
    producer.await??;
    let _ = sched.await;
    loops.stop().await;
    let completed: i64 = db
        .pool
        .get()
        .await?
        .query_one(
            "SELECT count(*) FROM jobs WHERE status = 'completed' AND finished_at >= $1",
            &[&started_at],
        )
        .await?
        .get(0);
    let made = created.load(Ordering::Relaxed) as f64;
    let total_pruned = pruned.load(Ordering::Relaxed) as f64;
    // Completed jobs pruned during the run count as completed too.
    let completed_rate = (completed as f64 + total_pruned) / secs;
    start_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    db.drop_db().await?;
    Ok(Sustained {
        samples,
        created_rate: made / secs,
        completed_rate,
        pruned_rate: total_pruned / secs,
        slowest_scheduler_run: slowest_us.load(Ordering::Relaxed) as f64 / 1e6,
        start_ms,
    })
}
