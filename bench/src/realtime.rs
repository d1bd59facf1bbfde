//! `--only realtime`: live progress pushed over WebSockets against
//! long-polls. For each viewer count, that many WebSocket clients follow one
//! job through `/api/realtime` (nine in ten with a browser token, one in
//! ten with the user's token); the job's progress is written as the worker
//! writes it, and each receipt is timed from just before its write. Then,
//! with nothing changing, the statements the database runs for those
//! viewers; and the same for viewers long-polling (`?wait=25`, as the
//! TypeScript client does). The AWS figures apply list prices to what was
//! measured: API Gateway WebSocket messages and connection minutes against
//! an API function invocation held per long-polling viewer.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use offload::queue::{PgQueue, Queue};
use offload::workspace::Tier;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::{serve, Args, BenchDb};
use offload_bench::percentile;

/// us-east-1 list prices, December 2026.
const WS_PER_MILLION_MESSAGES: f64 = 1.00;
const WS_PER_MILLION_CONNECTION_MINUTES: f64 = 0.25;
const LAMBDA_ARM_PER_GB_SECOND: f64 = 0.000_013_333_4;
const LAMBDA_PER_MILLION_REQUESTS: f64 = 0.20;
const HTTP_API_PER_MILLION_REQUESTS: f64 = 1.00;
/// The API function's memory (template.yaml).
const API_MEMORY_GB: f64 = 0.25;
/// API Gateway closes a WebSocket idle for 10 minutes: a client reconnects
/// (connect, subscribe: two realtime invocations) at least this often.
const WS_IDLE_RECONNECTS_PER_HOUR: f64 = 6.0;

/// Room for the clients and the server's sockets in one process.
fn raise_open_files(want: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit on an initialised struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        let raised = libc::rlimit {
            rlim_cur: want.max(lim.rlim_cur),
            rlim_max: want.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return raised.rlim_cur;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        lim.rlim_cur
    }
}

/// Nanoseconds since the epoch: receipts in a helper process and writes in
/// this one are timed on the machine's one clock.
fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// Connects `count` clients to `url`, each subscribing with `subscribe`
/// and waiting for the state it answers.
async fn connect_all(
    url_of: impl Fn(usize) -> String,
    count: usize,
    subscribe: &str,
) -> anyhow::Result<Vec<Socket>> {
    let mut clients = Vec::with_capacity(count);
    let mut pending = futures::stream::iter(0..count)
        .map(|i| {
            let (url, subscribe) = (url_of(i), subscribe.to_string());
            async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
                ws.send(Message::Text(subscribe.into())).await?;
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(_))) => break,
                        Some(Ok(_)) => continue,
                        _ => anyhow::bail!("closed before the first state"),
                    }
                }
                anyhow::Ok(ws)
            }
        })
        .buffer_unordered(256);
    while let Some(ws) = pending.next().await {
        clients.push(ws?);
    }
    Ok(clients)
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A client's receipts, `(state, when in ns)`, and its socket (kept open
/// until every client is done).
type Receipts = (Vec<(u64, u128)>, Socket);

/// Each client's receipts until it has seen `writes`.
fn read_all(clients: Vec<Socket>, writes: u64) -> Vec<tokio::task::JoinHandle<Receipts>> {
    clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut seen: Vec<(u64, u128)> = Vec::with_capacity(writes as usize);
                while let Some(Ok(msg)) = ws.next().await {
                    let Message::Text(t) = msg else { continue };
                    let v: Value = serde_json::from_str(&t).unwrap_or_default();
                    if let Some(k) = v["job"]["progress"]["processed"].as_u64() {
                        seen.push((k, now_ns()));
                        if k >= writes {
                            break;
                        }
                    }
                }
                (seen, ws)
            })
        })
        .collect()
}

/// The helper process (`--realtime-client URL`): viewers beyond what one
/// process may hold open. Prints `ready` once subscribed, then each
/// receipt as `state nanos`, then `done`.
pub async fn client_process(args: &Args, url: &str) -> anyhow::Result<()> {
    use std::io::Write;
    raise_open_files(args.realtime_client_count as u64 + 1024);
    let clients = connect_all(
        |_| url.to_string(),
        args.realtime_client_count,
        &args.realtime_subscribe,
    )
    .await?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let readers = read_all(clients, args.realtime_writes);
    let mut keep = Vec::new();
    for r in readers {
        let (seen, ws) = r.await?;
        keep.push(ws);
        for (k, at) in seen {
            writeln!(out, "{k} {at}")?;
        }
    }
    writeln!(out, "done")?;
    out.flush()?;
    Ok(())
}

/// Statements the database has run for `db` so far.
async fn statements(db: &BenchDb) -> anyhow::Result<i64> {
    let conn = db.pool.get().await?;
    Ok(conn
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND query NOT LIKE '%pg_stat_statements%'",
            &[],
        )
        .await?
        .get(0))
}

async fn write_progress(db: &BenchDb, job: &str, k: u64) -> anyhow::Result<()> {
    let p = serde_json::to_value(offload::job::Progress::of(k, 1_000_000))?;
    db.pool
        .get()
        .await?
        .execute(
            "UPDATE jobs SET progress = $2, updated_at = clock_timestamp() WHERE id = $1::text::uuid",
            &[&job, &p],
        )
        .await?;
    Ok(())
}

/// A fresh database with pg_stat_statements, the API serving it, and one
/// hour-long job to watch.
async fn watched_job(server: &str, tag: &str) -> anyhow::Result<(BenchDb, crate::Served, String)> {
    let db = BenchDb::with_tier(server, tag, Tier::Enterprise).await?;
    db.pool
        .get()
        .await?
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await?;
    let q: Arc<dyn Queue> = Arc::new(PgQueue::new(db.pool.clone(), 5));
    let s = serve(&db, q).await?;
    let created: Value = s
        .client
        .post(format!("{}/jobs", s.base))
        .bearer_auth(&s.token)
        .json(&json!({"type": "sleep", "payload": {"ms": 3_600_000}}))
        .send()
        .await?
        .json()
        .await?;
    let job = created["id"].as_str().unwrap_or_default().to_string();
    Ok((db, s, job))
}

/// What one viewer-count run measured.
struct Push {
    latencies_ms: Vec<f64>,
    idle_statements_per_viewer_minute: f64,
    idle_statements_per_minute: f64,
}

async fn push_once(args: &Args, server: &str, viewers: usize) -> anyhow::Result<Push> {
    let (db, s, job) = watched_job(server, "realtime").await?;
    let browser: Value = s
        .client
        .post(format!("{}/browser-tokens", s.base))
        .bearer_auth(&s.token)
        .json(&json!({"jobs": [job]}))
        .send()
        .await?
        .json()
        .await?;
    let browser = browser["token"].as_str().unwrap_or_default().to_string();
    let root = s
        .base
        .split("/api/")
        .next()
        .unwrap_or_default()
        .replace("http://", "ws://");
    let ws_id = s.base.rsplit('/').next().unwrap_or_default().to_string();
    let subscribe = json!({"action": "subscribe", "workspace": ws_id, "jobs": [job]}).to_string();
    // Viewers beyond what this process may hold open (its own sockets and
    // the server's) connect from a helper process.
    let writes = args.realtime_writes;
    let files = raise_open_files(0);
    let here = viewers.min((files.saturating_sub(2048) / 2) as usize);
    let mut helper = None;
    if here < viewers {
        let url = format!("{root}/api/realtime?token={browser}");
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args([
                "--realtime-client",
                &url,
                "--realtime-client-count",
                &(viewers - here).to_string(),
                "--realtime-subscribe",
                &subscribe,
                "--realtime-writes",
                &writes.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
            child.stdout.take().expect("piped"),
        ));
        anyhow::ensure!(
            lines.next_line().await?.as_deref() == Some("ready"),
            "the helper process did not subscribe its viewers"
        );
        helper = Some((child, lines));
    }
    let connected = Instant::now();
    let clients = connect_all(
        |i| {
            let token = if i % 10 == 0 { &s.token } else { &browser };
            format!("{root}/api/realtime?token={token}")
        },
        here,
        &subscribe,
    )
    .await?;
    eprintln!(
        "  {viewers} viewers connected and subscribed ({} in a helper process), the last {here} in {:.1} s",
        viewers - here,
        connected.elapsed().as_secs_f64()
    );
    let readers = read_all(clients, writes);
    // The idle window: nothing changes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = statements(&db).await?;
    let idle = Duration::from_secs(args.realtime_idle_secs);
    tokio::time::sleep(idle).await;
    let idle_statements = (statements(&db).await? - before) as f64;
    let per_minute = idle_statements * 60.0 / idle.as_secs_f64();
    // The writes, at the worker's progress pace.
    let mut written_at = Vec::with_capacity(writes as usize);
    for k in 1..=writes {
        written_at.push(now_ns());
        write_progress(&db, &job, k).await?;
        tokio::time::sleep(Duration::from_millis(args.realtime_interval_ms)).await;
    }
    let mut latencies = Vec::with_capacity(viewers * writes as usize);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut keep = Vec::new();
    for r in readers {
        let (seen, ws) = tokio::time::timeout_at(deadline, r).await??;
        keep.push(ws);
        for (k, at) in seen {
            if let Some(w) = written_at.get(k as usize - 1) {
                latencies.push(at.saturating_sub(*w) as f64 / 1e6);
            }
        }
    }
    if let Some((mut child, mut lines)) = helper {
        while let Some(line) = tokio::time::timeout_at(deadline, lines.next_line()).await?? {
            if line == "done" {
                break;
            }
            let mut parts = line.split(' ');
            let k: u64 = parts.next().unwrap_or_default().parse().unwrap_or(0);
            let at: u128 = parts.next().unwrap_or_default().parse().unwrap_or(0);
            if let Some(w) = written_at.get((k as usize).wrapping_sub(1)) {
                latencies.push(at.saturating_sub(*w) as f64 / 1e6);
            }
        }
        let _ = child.wait().await;
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let received = latencies.len();
    eprintln!(
        "  {received} of {} states received ({:.1} %)",
        viewers * writes as usize,
        100.0 * received as f64 / (viewers * writes as usize) as f64
    );
    drop(keep);
    s.server.abort();
    Ok(Push {
        latencies_ms: latencies,
        idle_statements_per_viewer_minute: per_minute / viewers as f64,
        idle_statements_per_minute: per_minute,
    })
}

/// Requests and statements per idle long-polling viewer per minute.
async fn long_poll_once(args: &Args, server: &str) -> anyhow::Result<(f64, f64)> {
    let viewers = args.realtime_pollers;
    let (db, s, job) = watched_job(server, "longpoll").await?;
    let s = Arc::new(s);
    let url = format!("{}/jobs/{job}?wait=25", s.base);
    let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let window = Duration::from_secs(args.realtime_idle_secs);
    let before = statements(&db).await?;
    let end = Instant::now() + window;
    let mut tasks = Vec::new();
    for i in 0..viewers {
        let (s, url, requests) = (s.clone(), url.clone(), requests.clone());
        tasks.push(tokio::spawn(async move {
            // Viewers arrive spread over the first wait, as pages open.
            tokio::time::sleep(Duration::from_millis((i as u64 * 25_000) / viewers as u64)).await;
            let mut etag: Option<String> = None;
            while Instant::now() < end {
                let mut req = s.client.get(&url).bearer_auth(&s.token);
                if let Some(e) = &etag {
                    req = req.header("if-none-match", e);
                }
                let resp = tokio::time::timeout_at(end, req.send()).await;
                requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Ok(Ok(r)) = resp {
                    etag = r
                        .headers()
                        .get("etag")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let stmts = (statements(&db).await? - before) as f64;
    let minutes = window.as_secs_f64() / 60.0;
    let reqs = requests.load(std::sync::atomic::Ordering::Relaxed) as f64;
    Ok((
        reqs / viewers as f64 / minutes,
        stmts / viewers as f64 / minutes,
    ))
}

pub async fn run(
    args: &Args,
    server: &str,
    report: &mut impl FnMut(&str, Vec<f64>, &str),
) -> anyhow::Result<()> {
    let most = args.realtime_viewers.iter().copied().max().unwrap_or(1000) as u64;
    raise_open_files(most * 2 + 4096);
    let changes_per_hour = args.realtime_changes_per_hour;
    for &viewers in &args.realtime_viewers {
        eprintln!(
            "realtime: {viewers} WebSocket viewers of one job, {} progress writes {} ms apart, idle window {} s",
            args.realtime_writes, args.realtime_interval_ms, args.realtime_idle_secs
        );
        let p = push_once(args, server, viewers).await?;
        let (p50, p99) = (
            percentile(&p.latencies_ms, 0.5),
            percentile(&p.latencies_ms, 0.99),
        );
        eprintln!(
            "  write to receipt p50 {p50:.2} ms, p99 {p99:.2} ms; idle: {:.1} statements a minute for all of them",
            p.idle_statements_per_minute
        );
        report(&format!("realtime_{viewers}_receipt_p50"), vec![p50], "ms");
        report(&format!("realtime_{viewers}_receipt_p99"), vec![p99], "ms");
        report(
            &format!("realtime_{viewers}_idle_statements_per_viewer_minute"),
            vec![p.idle_statements_per_viewer_minute],
            "statements",
        );
    }
    eprintln!(
        "long-poll: {} viewers of one idle job, ?wait=25, {} s",
        args.realtime_pollers, args.realtime_idle_secs
    );
    let (reqs, stmts) = long_poll_once(args, server).await?;
    eprintln!("  {reqs:.2} requests and {stmts:.2} statements per viewer per minute");
    report(
        "longpoll_requests_per_viewer_minute",
        vec![reqs],
        "requests",
    );
    report(
        "longpoll_idle_statements_per_viewer_minute",
        vec![stmts],
        "statements",
    );

    // 1 000 viewers for an hour on AWS, list prices. Push: connection
    // minutes, a message per change of the job (`--realtime-changes-per-hour`), and the
    // realtime function's connects and subscribes (negligible). Long-poll:
    // one API invocation held per viewer for the hour, its requests through
    // the HTTP API.
    let viewers = 1000.0;
    let push = viewers * 60.0 / 1e6 * WS_PER_MILLION_CONNECTION_MINUTES
        + viewers * changes_per_hour / 1e6 * WS_PER_MILLION_MESSAGES
        + viewers * WS_IDLE_RECONNECTS_PER_HOUR * 2.0 / 1e6 * LAMBDA_PER_MILLION_REQUESTS;
    let requests = viewers * reqs * 60.0;
    let poll = viewers * 3600.0 * API_MEMORY_GB * LAMBDA_ARM_PER_GB_SECOND
        + requests / 1e6 * (LAMBDA_PER_MILLION_REQUESTS + HTTP_API_PER_MILLION_REQUESTS);
    eprintln!(
        "AWS, 1 000 viewers for an hour: push ${push:.3} ({changes_per_hour:.0} changes a viewer an hour), \
         long-poll ${poll:.2} (and 1 000 concurrent API invocations, each holding its database pool)"
    );
    report("aws_push_1000_viewers_hour", vec![push], "USD");
    report("aws_longpoll_1000_viewers_hour", vec![poll], "USD");
    Ok(())
}
