//! apalis (1.0, apalis-postgres storage) beside Offload's benchmark: one round in
//! one empty database (made and dropped by scripts/bench-peers.sh). Prints
//! `name value unit` lines:
//!   apalis_push_bulk_batch           jobs/s  B `push_bulk` calls of 1000 no-op jobs each
//!                                            (one multi-row INSERT … UNNEST per call)
//!   apalis_push_bulk_batch_1000_p50  ms      the median time of one such call
//!   apalis_drain                     jobs/s  N queued no-op jobs drained by one worker
//!                                            fetching 500 jobs a query (`Config::batch_size`;
//!                                            apalis's default of 10 drains ~15x slower here)
//!                                            with at most 24 running (`.concurrency(24)`);
//!                                            task locking and result writes left on, as
//!                                            by default (both are batched by apalis)
//! A drain is timed from the worker's start until every job is `Done` in the
//! table: apalis writes completions in batches after the handler returns, so the
//! handler's own count is not enough.
//!
//! peer-apalis --url postgres://… [--jobs 20000] [--batches 20] [--concurrency 24]
//!             [--fetch 500]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_postgres::{Config, PgPool, PostgresStorage};

/// Jobs the handler has run in the current drain.
static RAN: AtomicUsize = AtomicUsize::new(0);

async fn noop(_: u32) -> Result<(), BoxDynError> {
    RAN.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

struct Args {
    url: String,
    jobs: usize,
    batches: usize,
    concurrency: usize,
    fetch: usize,
}

fn args() -> Args {
    let mut a = Args { url: String::new(), jobs: 20_000, batches: 20, concurrency: 24, fetch: 500 };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        let n = || v.parse::<usize>().unwrap_or_else(|_| panic!("{k}: not a number: {v}"));
        match k.as_str() {
            "--url" => a.url = v.clone(),
            "--jobs" => a.jobs = n(),
            "--batches" => a.batches = n(),
            "--concurrency" => a.concurrency = n(),
            "--fetch" => a.fetch = n(),
            _ => panic!("unknown option {k}"),
        }
    }
    assert!(!a.url.is_empty(), "--url is needed");
    a
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

async fn count(pool: &PgPool, sql: &'static str) -> Result<i64, BoxDynError> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

/// Queues `n` jobs (untimed) and drains them with one worker; returns jobs/s.
async fn drain(pool: &PgPool, config: &Config, a: &Args, n: usize) -> Result<f64, BoxDynError> {
    let mut storage = PostgresStorage::<u32>::new(pool).with_config(config.clone());
    for left in (0..n).step_by(1000) {
        storage.push_bulk(vec![0; (n - left).min(1000)]).await?;
    }
    RAN.store(0, Ordering::SeqCst);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let start = Instant::now();
    let worker = WorkerBuilder::new(format!("peer-{n}"))
        .backend(storage)
        .concurrency(a.concurrency)
        .build(noop);
    let running = tokio::spawn(worker.run_until(async move {
        let _ = stopped.await;
        Ok::<(), WorkerError>(())
    }));
    let done_sql = "SELECT count(*) FROM apalis.jobs WHERE status = 'Done'";
    while RAN.load(Ordering::SeqCst) < n || count(pool, done_sql).await? < n as i64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = stop.send(());
    running.await??;
    let ran = RAN.load(Ordering::SeqCst);
    if ran != n {
        return Err(format!("{ran} runs for {n} jobs").into());
    }
    sqlx::query("TRUNCATE apalis.jobs").execute(pool).await?;
    Ok(rate)
}

#[tokio::main]
async fn main() -> Result<(), BoxDynError> {
    let a = args();
    let pool = PgPool::connect(&a.url).await?;
    PostgresStorage::setup(&pool).await?;
    let config = Config::default().queue("noop").batch_size(a.fetch);

    // Enqueue: one untimed call first (warm pool), then B timed calls.
    let mut storage = PostgresStorage::<u32>::new(&pool).with_config(config.clone());
    storage.push_bulk(vec![0; 1000]).await?;
    let mut ms = Vec::new();
    let t0 = Instant::now();
    for _ in 0..a.batches {
        let t = Instant::now();
        storage.push_bulk(vec![0; 1000]).await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let rate = (a.batches * 1000) as f64 / t0.elapsed().as_secs_f64();
    println!("apalis_push_bulk_batch {rate:.2} jobs/s");
    println!("apalis_push_bulk_batch_1000_p50 {:.2} ms", median(ms));
    sqlx::query("TRUNCATE apalis.jobs").execute(&pool).await?;

    drain(&pool, &config, &a, (a.jobs / 10).max(1)).await?; // warm-up, not reported
    println!("apalis_drain {:.2} jobs/s", drain(&pool, &config, &a, a.jobs).await?);
    pool.close().await;
    Ok(())
}
