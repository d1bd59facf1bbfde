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
    let parent = NewJob::new(db.ws, "spawn", json!({}));
    let id = parent.id;
    let conn = db.pool.get().await?;
    offload::enqueue::create_jobs(
        &db.store,
        &pg,
        &conn,
        &[parent],
        chrono::Utc::now(),
        Duration::from_secs(10),
    )
    .await?;
    drop(conn);
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
        let job = NewJob::new(db.ws, "gate", json!({}));
        let id = job.id;
        let conn = db.pool.get().await?;
        offload::enqueue::create_jobs(
            &db.store,
            &pg,
            &conn,
            &[job],
            chrono::Utc::now(),
            Duration::from_secs(10),
        )
        .await?;
        drop(conn);
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
    let ms = token_once(args, server, args.token_waits).await?;
    report("token_resume_p50", vec![crate::percentile(&ms, 0.5)], "ms");
    report("token_resume_p99", vec![crate::percentile(&ms, 0.99)], "ms");
    Ok(())
}
