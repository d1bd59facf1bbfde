//! `--only workflows`: what child jobs and waits cost. A parent that creates
//! `n` no-op children and waits for them, from its start to its completion,
//! against the same `n` jobs drained on their own in a workspace of the
//! same tier; and the time from a wait token's completion (as the API
//! completes it) to its job running again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use offload::handlers::{
    ChildJob, JobContext, JobError, JobHandler, Outcome, Registry, TokenState,
};
use offload::ids::JobId;
use offload::queue::PgQueue;
use offload::store::{Completion, NewJob};
use offload::workspace::Tier;
use serde_json::{json, Value};

use crate::{until_drained, worker, Args, BenchDb, Loops};

/// Creates `n` no-op children (1 000 per statement) and waits for them.
struct Spawn {
    n: usize,
    started: Arc<Mutex<Option<Instant>>>,
}

#[async_trait]
impl JobHandler for Spawn {
    type Payload = Value;
    const TYPE: &'static str = "spawn";
    async fn run(&self, _: Value, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        if ctx.checkpoint::<Value>().is_some() {
            let kids = ctx.children(None, self.n as i64).await?;
            let done = kids.iter().filter(|k| k.status.is_terminal()).count();
            return Ok(Outcome::Completed(Some(json!({ "children": done }))));
        }
        self.started.lock().unwrap().get_or_insert(Instant::now());
        let mut first = 0;
        while first < self.n {
            let k = (self.n - first).min(1000);
            let chunk: Vec<ChildJob> = (0..k).map(|_| ChildJob::new("noop", json!({}))).collect();
            ctx.create_children(first as i32, &chunk).await?;
            first += k;
        }
        Ok(ctx.wait_for_children(&json!({ "created": true }), true))
    }
}

/// Creates one job of `job_type` as the API does (row and message in one
/// statement); returns its id.
async fn create(db: &BenchDb, pg: &PgQueue, job_type: &str) -> anyhow::Result<JobId> {
    let job = NewJob::new(db.ws, job_type, json!({}));
    let id = job.id;
    let conn = db.pool.get().await?;
    offload::enqueue::create_jobs(
        &db.store,
        pg,
        &conn,
        &[job],
        chrono::Utc::now(),
        Duration::from_secs(10),
    )
    .await?;
    Ok(id)
}

/// Seconds from the parent's start to its completion, `n` children.
async fn fan_out_once(args: &Args, server: &str, tier: Tier, n: usize) -> anyhow::Result<f64> {
    let db = BenchDb::with_tier(server, "fanout", tier).await?;
    let pg = PgQueue::new(db.pool.clone(), 5);
    let started = Arc::new(Mutex::new(None));
    let reg = Registry::builtin().with(Spawn {
        n,
        started: started.clone(),
    });
    let w = Arc::new(worker(&db, Arc::new(pg.clone()), reg));
    w.warm_limits(&[db.ws]).await?;
    let loops = Loops::start(&db, &pg, w, args.batch, args.loops);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = create(&db, &pg, "spawn").await?;
    until_drained(&db, Duration::from_secs(600)).await?;
    let end = Instant::now();
    loops.stop().await;
    let start = started
        .lock()
        .unwrap()
        .ok_or_else(|| anyhow::anyhow!("the parent never started"))?;
    let job = db.store.get_any(id).await?.expect("the parent");
    anyhow::ensure!(
        job.result == Some(json!({ "children": n })),
        "the parent ended {:?} with {:?}",
        job.status,
        job.result
    );
    db.drop_db().await?;
    Ok((end - start).as_secs_f64())
}

/// Seconds to drain `n` no-op jobs queued as a batch create queues them.
async fn alone_once(args: &Args, server: &str, tier: Tier, n: usize) -> anyhow::Result<f64> {
    let db = BenchDb::with_tier(server, "alone", tier).await?;
    let pg = PgQueue::new(db.pool.clone(), 5);
    db.seed(&pg, n, "noop").await?;
    let w = Arc::new(worker(&db, Arc::new(pg.clone()), Registry::builtin()));
    w.warm_limits(&[db.ws]).await?;
    let start = Instant::now();
    let loops = Loops::start(&db, &pg, w, args.batch, args.loops);
    until_drained(&db, Duration::from_secs(600)).await?;
    let secs = start.elapsed().as_secs_f64();
    loops.stop().await;
    db.drop_db().await?;
    Ok(secs)
}

/// Waits for its token; when it runs again after the completion, stamps
/// the time and completes.
struct Gate {
    resumed: Arc<Mutex<Vec<(String, Instant)>>>,
}

#[async_trait]
impl JobHandler for Gate {
    type Payload = Value;
    const TYPE: &'static str = "gate";
    async fn run(&self, _: Value, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let token = ctx.create_token("go", Duration::from_secs(3600)).await?;
        match ctx.token_state(&token).await? {
            TokenState::Open => Ok(ctx.wait_for_token(&json!({}), &token)),
            _ => {
                self.resumed.lock().unwrap().push((token, Instant::now()));
                Ok(Outcome::Completed(None))
            }
        }
    }
}

/// Milliseconds from each token's completion to its job running again,
/// `k` jobs one after another, sorted.
async fn token_once(args: &Args, server: &str, k: usize) -> anyhow::Result<Vec<f64>> {
    let db = BenchDb::with_tier(server, "token", Tier::Enterprise).await?;
    let pg = PgQueue::new(db.pool.clone(), 5);
    let resumed = Arc::new(Mutex::new(Vec::new()));
    let reg = Registry::builtin().with(Gate {
        resumed: resumed.clone(),
    });
    let w = Arc::new(worker(&db, Arc::new(pg.clone()), reg));
    let loops = Loops::start(&db, &pg, w, args.batch, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ms = Vec::with_capacity(k);
    for _ in 0..k {
        let id = create(&db, &pg, "gate").await?;
        let token = loop {
            let j = db.store.get_any(id).await?.expect("the job");
            if let Some(t) = j.wait.and_then(|w| w.token) {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let t = Instant::now();
        // As the API's route completes it: the commit, then the message.
        match db
            .store
            .complete_token(db.ws, &token, &json!({}), chrono::Utc::now())
            .await?
        {
            Completion::Done {
                woken: Some(job), ..
            } => {
                offload::enqueue::send_jobs(&db.store, &pg, &[&*job], chrono::Utc::now()).await?;
            }
            other => anyhow::bail!("token not completed: {other:?}"),
        }
        let end = Instant::now() + Duration::from_secs(10);
        let at = loop {
            if let Some((_, at)) = resumed.lock().unwrap().iter().find(|(x, _)| *x == token) {
                break *at;
            }
            anyhow::ensure!(Instant::now() < end, "job {id} did not run again");
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        ms.push((at - t).as_secs_f64() * 1000.0);
    }
    loops.stop().await;
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    db.drop_db().await?;
    Ok(ms)
}

/// Appends `n` chunks 10 ms apart, stamping when each was appended.
struct Chatter {
    n: usize,
    appended: Arc<Mutex<Vec<(i64, Instant)>>>,
}

#[async_trait]
impl JobHandler for Chatter {
    type Payload = Value;
    const TYPE: &'static str = "chatter";
    async fn run(&self, _: Value, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        for i in 0..self.n {
            let id = ctx
                .stream(&json!({ "i": i, "text": "lorem ipsum dolor sit amet" }))
                .await?;
            self.appended.lock().unwrap().push((id, Instant::now()));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Outcome::Completed(None))
    }
}

/// `readers` browsers following one job's stream over loopback HTTP while
/// it appends `chunks`: every reader gets every chunk once; returns the
/// append-to-receipt latencies (ms, sorted) and the database's
/// transactions per chunk over the run (all of them: the appends, the
/// feed's reads, the worker's own).
async fn readers_once(
    server: &str,
    readers: usize,
    chunks: usize,
) -> anyhow::Result<(Vec<f64>, f64)> {
    let db = BenchDb::with_tier(server, "readers", Tier::Enterprise).await?;
    let pg = PgQueue::new(db.pool.clone(), 5);
    let s = Arc::new(crate::serve(&db, Arc::new(pg.clone())).await?);
    let appended = Arc::new(Mutex::new(Vec::new()));
    let reg = Registry::builtin().with(Chatter {
        n: chunks,
        appended: appended.clone(),
    });
    let id = create(&db, &pg, "chatter").await?;
    // Every reader connected (and subscribed) before the job starts.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(readers);
    let mut tasks = Vec::with_capacity(readers);
    for _ in 0..readers {
        let (s, ready) = (s.clone(), ready_tx.clone());
        tasks.push(tokio::spawn(async move {
            let mut resp = s
                .client
                .get(format!("{}/jobs/{id}/stream", s.base))
                .bearer_auth(&s.token)
                .send()
                .await?;
            anyhow::ensure!(resp.status() == 200, "stream answered {}", resp.status());
            let _ = ready.send(()).await;
            let (mut buf, mut got) = (String::new(), Vec::new());
            while let Some(bytes) = resp.chunk().await? {
                let at = Instant::now();
                buf.push_str(&String::from_utf8_lossy(&bytes));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    if block.contains("event: end") {
                        return Ok(got);
                    }
                    if let Some(line) = block.lines().find(|l| l.starts_with("id:")) {
                        got.push((line[3..].trim().parse::<i64>()?, at));
                    }
                }
            }
            anyhow::bail!("the stream ended without its end event")
        }));
    }
    drop(ready_tx);
    for _ in 0..readers {
        ready_rx.recv().await;
    }
    let xact = |db: &BenchDb| {
        let pool = db.pool.clone();
        let name = db.name.clone();
        async move {
            let row = pool
                .get()
                .await?
                .query_one(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
                    &[&name],
                )
                .await?;
            anyhow::Ok(row.get::<_, i64>(0))
        }
    };
    let before = xact(&db).await?;
    let w = Arc::new(worker(&db, Arc::new(pg.clone()), reg));
    let loops = Loops::start(&db, &pg, w, 10, 1);
    let mut ms = Vec::with_capacity(readers * chunks);
    let stamps: std::collections::HashMap<i64, Instant> = {
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await??);
        }
        let stamps: std::collections::HashMap<i64, Instant> =
            appended.lock().unwrap().iter().copied().collect();
        for got in &all {
            let ids: Vec<i64> = got.iter().map(|g| g.0).collect();
            let mut want: Vec<i64> = stamps.keys().copied().collect();
            want.sort();
            anyhow::ensure!(
                ids == want,
                "a reader got {} chunks, not each of {} once",
                ids.len(),
                want.len()
            );
            for (cid, at) in got {
                ms.push(at.saturating_duration_since(stamps[cid]).as_secs_f64() * 1000.0);
            }
        }
        stamps
    };
    loops.stop().await;
    // The statistics reach pg_stat_database within a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let per_chunk = (xact(&db).await? - before) as f64 / stamps.len() as f64;
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    // The server (and its watch listener) goes before its database.
    if let Ok(s) = Arc::try_unwrap(s) {
        s.server.abort();
    }
    db.drop_db().await?;
    Ok((ms, per_chunk))
}

/// The figures: for each tier, fan-out seconds, alone seconds and the
/// overhead; then the token latencies.
pub async fn run(
    args: &Args,
    server: &str,
    report: &mut dyn FnMut(&str, Vec<f64>, &str),
) -> anyhow::Result<()> {
    let n = args.fan_out_children;
    for &tier in &args.fan_out_tiers {
        let (mut fan, mut alone, mut over) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.repeat {
            let f = fan_out_once(args, server, tier, n).await?;
            let a = alone_once(args, server, tier, n).await?;
            eprintln!("  {tier}: fan-out {f:.2} s, the same jobs alone {a:.2} s");
            fan.push(f);
            alone.push(a);
            over.push(f - a);
        }
        report(&format!("fan_out_{n}_{tier}"), fan, "s");
        report(&format!("alone_{n}_{tier}"), alone, "s");
        report(&format!("fan_out_overhead_{tier}"), over, "s");
    }
    let (ms, per_chunk) = readers_once(server, args.stream_readers, args.stream_chunks).await?;
    eprintln!(
        "  {} readers of one job's {} chunks: p50 {:.1} ms, p99 {:.1} ms, {per_chunk:.1} transactions per chunk",
        args.stream_readers,
        args.stream_chunks,
        crate::percentile(&ms, 0.5),
        crate::percentile(&ms, 0.99)
    );
    report(
        &format!("stream_{}_readers_p50", args.stream_readers),
        vec![crate::percentile(&ms, 0.5)],
        "ms",
    );
    report(
        &format!("stream_{}_readers_p99", args.stream_readers),
        vec![crate::percentile(&ms, 0.99)],
        "ms",
    );
    report(
        "stream_db_transactions_per_chunk",
        vec![per_chunk],
        "transactions",
    );
    let ms = token_once(args, server, args.token_waits).await?;
    report("token_resume_p50", vec![crate::percentile(&ms, 0.5)], "ms");
    report("token_resume_p99", vec![crate::percentile(&ms, 0.99)], "ms");
    Ok(())
}
