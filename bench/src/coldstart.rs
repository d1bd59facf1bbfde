//! Cold starts: each function's release binary started the way Lambda
//! starts it (against the Runtime API stand-in of `offload::testing`), ten
//! fresh processes each. Init is the time from the process's start to its
//! first request for an event (connecting to the database and checking its
//! schema included); for the api, the first request end to end is the time
//! from the process's start to the answer of the sample create event.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use offload::testing::{Invoked, LambdaRuntime, TEST_SECRET};
use serde_json::Value;

use super::BenchDb;

/// Where `cargo build --release --bins` put the function binaries.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: run `cargo build --release --bins` first",
        path.display()
    );
    Ok(path)
}

/// Median init time of `name` over `runs` fresh starts, ms; with `event`,
/// also the median time from start to its answer.
pub async fn measure(
    db: &BenchDb,
    name: &str,
    runs: usize,
    event: Option<&Value>,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, u64)> {
    let path = binary(name)?;
    let size = std::fs::metadata(&path)?.len();
    let (mut init, mut first) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut rt = LambdaRuntime::serve().await;
        let started = Instant::now();
        rt.start(
            path.to_str().unwrap_or_default(),
            &format!("offload-{name}"),
            &[
                ("DATABASE_URL", db.url.clone()),
                ("OFFLOAD_JWT_SECRET", TEST_SECRET.into()),
            ],
        );
        match event {
            Some(e) => {
                let answer = rt.invoke(e.clone(), Duration::from_secs(30)).await;
                anyhow::ensure!(matches!(answer, Invoked::Response(_)), "{name}: {answer:?}");
                first.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            None => {
                let end = Instant::now() + Duration::from_secs(30);
                while rt.init_duration().is_none() {
                    anyhow::ensure!(Instant::now() < end, "{name} never asked for an event");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        let d = rt
            .init_duration()
            .ok_or_else(|| anyhow::anyhow!("{name} never asked for an event"))?;
        init.push(d.as_secs_f64() * 1000.0);
    }
    Ok((init, first, size))
}

/// Warm invocations of the worker's release binary, each a batch of 10
/// no-op jobs received from the queue as Lambda's event source mapping
/// delivers them, with the template's settings (`RUST_LOG=info`, metrics
/// on): the time from the invoke to the answer, ms (the duration Lambda
/// bills, less its own overhead), sorted ascending; and the bytes the
/// function printed per job (what CloudWatch Logs ingests, less Lambda's
/// own lines). The first invocation, which pays for the cold start, is left
/// out of both.
pub async fn warm_worker(db: &BenchDb, batches: usize) -> anyhow::Result<(Vec<f64>, f64)> {
    use offload::event_source::to_event;
    use offload::job::QueueName;
    use offload::queue::{PgQueue, Queue};
    let q = PgQueue::new(db.pool.clone(), 5);
    db.seed(&q, (batches + 1) * 10, "noop").await?;
    let mut rt = LambdaRuntime::serve().await;
    let out = std::env::temp_dir().join(format!("offload-bench-worker-{}.log", std::process::id()));
    rt.capture_output(&out);
    rt.start(
        binary("worker")?.to_str().unwrap_or_default(),
        "offload-worker",
        &[
            ("DATABASE_URL", db.url.clone()),
            ("RUST_LOG", "info".into()),
            ("OFFLOAD_EMIT_METRICS", "true".into()),
        ],
    );
    let mut ms = Vec::with_capacity(batches);
    let mut cold_bytes = 0;
    for i in 0..=batches {
        let msgs = q
            .receive(
                QueueName::Default,
                10,
                Duration::from_secs(900),
                Duration::from_millis(100),
            )
            .await?;
        anyhow::ensure!(msgs.len() == 10, "received {} messages, not 10", msgs.len());
        let event = serde_json::to_value(to_event(&msgs, &q.arn(QueueName::Default)))?;
        let started = Instant::now();
        let answer = rt.invoke(event, Duration::from_secs(30)).await;
        let Invoked::Response(r) = answer else {
            anyhow::bail!("the worker failed: {answer:?}");
        };
        anyhow::ensure!(
            r["batchItemFailures"].as_array().is_some_and(Vec::is_empty),
            "failures in a batch of no-op jobs: {r}"
        );
        if i > 0 {
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
        } else {
            cold_bytes = std::fs::metadata(&out)?.len();
        }
    }
    ms.sort_by(f64::total_cmp);
    let bytes = std::fs::metadata(&out)?.len().saturating_sub(cold_bytes);
    let _ = std::fs::remove_file(&out);
    Ok((ms, bytes as f64 / (batches * 10) as f64))
}

/// What Lambda itself writes to CloudWatch Logs per invocation: its START,
/// END and REPORT lines (about 70, 50 and 135 bytes in the text format).
const LAMBDA_PLATFORM_LOG_BYTES: f64 = 255.0;

/// Dollars per million no-op jobs on Lambda (arm64) and SQS at list prices
/// (us-east-1), created by batch creates of 1 000 and run in batches of 10
/// that each take `batch_ms`: Lambda requests and GB-seconds of the worker
/// (512 MB) and the API (256 MB, `create_ms` per batch create), SQS
/// requests (a SendMessageBatch, a receive and a DeleteMessageBatch per 10
/// jobs), API Gateway requests, and CloudWatch Logs ingestion: the worker's
/// `log_bytes_per_job` and Lambda's own lines per invocation (the API's
/// per batch create are left out: under a byte a job). The database, fixed
/// per month, is not in it.
pub fn cost_per_million(
    batch_ms: f64,
    create_ms: f64,
    log_bytes_per_job: f64,
) -> Vec<(&'static str, f64)> {
    const LAMBDA_REQUEST: f64 = 0.20 / 1e6;
    const LAMBDA_GB_SECOND_ARM: f64 = 0.000_013_333_4;
    const SQS_REQUEST: f64 = 0.40 / 1e6;
    const HTTP_API_REQUEST: f64 = 1.00 / 1e6;
    const LOGS_INGESTED_GB: f64 = 0.50;
    let jobs = 1e6;
    let worker_invocations = jobs / 10.0;
    let creates = jobs / 1000.0;
    // Lambda bills each invocation's duration rounded up to the millisecond.
    let gb_s = |n: f64, ms: f64, gb: f64| n * ms.ceil() / 1000.0 * gb;
    let worker = worker_invocations * LAMBDA_REQUEST
        + gb_s(worker_invocations, batch_ms, 0.5) * LAMBDA_GB_SECOND_ARM;
    let api = creates * (LAMBDA_REQUEST + HTTP_API_REQUEST)
        + gb_s(creates, create_ms, 0.25) * LAMBDA_GB_SECOND_ARM;
    let sqs = jobs * 0.3 * SQS_REQUEST;
    let log_bytes = jobs * log_bytes_per_job + worker_invocations * LAMBDA_PLATFORM_LOG_BYTES;
    let logs = log_bytes / 1e9 * LOGS_INGESTED_GB;
    vec![
        ("worker", worker),
        ("api", api),
        ("sqs", sqs),
        ("logs", logs),
        ("total", worker + api + sqs + logs),
    ]
}

/// Warm invocations of the api's release binary, each a `POST /jobs/batch`
/// of 1 000 no-op jobs as API Gateway delivers it, for a member of an
/// enterprise workspace (its running limit parks what it cannot start):
/// the time from the invoke to the answer, ms. The cold first invocation
/// is left out. Sorted, ascending.
pub async fn warm_api_batch(
    db: &BenchDb,
    sample: &Value,
    user: offload::ids::UserId,
    runs: usize,
) -> anyhow::Result<Vec<f64>> {
    use offload::workspace::{self, Role, Tier};
    let ws = offload::ids::WorkspaceId::new();
    {
        let conn = db.pool.get().await?;
        workspace::ensure_workspace(&**conn, ws, "Cost", Tier::Enterprise).await?;
        workspace::add_member(&**conn, ws, user, Role::Member).await?;
    }
    let path = format!("/api/workspaces/{ws}/jobs/batch");
    let jobs: Vec<Value> = (0..1000)
        .map(|_| serde_json::json!({"type": "noop"}))
        .collect();
    let mut event = sample.clone();
    event["rawPath"] = path.clone().into();
    event["requestContext"]["http"]["path"] = path.into();
    event["body"] = serde_json::json!({ "jobs": jobs }).to_string().into();
    if let Some(h) = event["headers"].as_object_mut() {
        h.remove("idempotency-key");
    }
    let mut rt = LambdaRuntime::serve().await;
    rt.start(
        binary("api")?.to_str().unwrap_or_default(),
        "offload-api",
        &[
            ("DATABASE_URL", db.url.clone()),
            ("OFFLOAD_JWT_SECRET", TEST_SECRET.into()),
        ],
    );
    let mut ms = Vec::with_capacity(runs);
    for i in 0..=runs {
        let started = Instant::now();
        let answer = rt.invoke(event.clone(), Duration::from_secs(30)).await;
        let Invoked::Response(r) = answer else {
            anyhow::bail!("the api failed: {answer:?}");
        };
        anyhow::ensure!(r["statusCode"] == 202, "the batch create answered {r}");
        if i > 0 {
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}
