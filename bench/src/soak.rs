//! `offload-soak`: a bounded run of `offload dev` under a steady stream of
//! mixed jobs while it is killed with SIGKILL and restarted, its webhook
//! receiver fails and stalls at random, and some jobs are meant to die.
//! At the end every accepted job must be in a terminal state and every side
//! effect must have happened exactly once; the figures go to stdout as
//! `name value unit` lines and to a JSON file.
//!
//! `scripts/soak.sh` builds both binaries and runs it for ten minutes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use clap::Parser;
use offload::auth::Keys;
use offload::db;
use offload::ids::{UserId, WorkspaceId};
use offload::workspace::{self, Role, Tier};
use offload_bench::{drop_database, fresh_database, percentile};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(
    about = "Soak `offload dev`: mixed jobs, random failures, crashes; count what was lost or repeated"
)]
struct Args {
    /// How long jobs are created for, in seconds (then the run drains).
    #[arg(long, default_value_t = 600)]
    secs: u64,
    /// Jobs created per second.
    #[arg(long, default_value_t = 30)]
    rate: u32,
    /// Mean seconds between SIGKILLs of the runner (each gap is 50–150 % of it); 0: never.
    #[arg(long, default_value_t = 40)]
    kill_every: u64,
    /// Share of webhook calls the receiver answers 500.
    #[arg(long, default_value_t = 0.2)]
    fail_rate: f64,
    /// Share of webhook calls the receiver holds past the job's 1 s timeout.
    #[arg(long, default_value_t = 0.03)]
    stall_rate: f64,
    /// Longest wait for the accepted jobs to finish once creation stops, in seconds.
    #[arg(long, default_value_t = 180)]
    drain_secs: u64,
    /// The `offload` binary; by default the one beside this binary.
    #[arg(long)]
    offload: Option<PathBuf>,
    /// Keep the soak's database afterwards, to look into what happened.
    #[arg(long)]
    keep_db: bool,
    /// Where the figures are written as JSON.
    #[arg(long, default_value = "target/soak-results.json")]
    out: PathBuf,
}

/// What the soak creates, with its share of the stream (out of 100).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Noop,
    /// `sleep` of 20 ms to 1.5 s in steps: batches in flight when the kill comes.
    Slow,
    /// A webhook to the receiver, which fails or stalls at random.
    Webhook,
    /// A subscription of three fresh contacts: one enrollment each, exactly.
    Subscription,
    /// A webhook answered 410: permanent, dead at once.
    Gone,
    /// A webhook always answered 503, three attempts: dead after retries.
    Down,
}

const MIX: [(Kind, u32); 6] = [
    (Kind::Noop, 35),
    (Kind::Slow, 20),
    (Kind::Webhook, 22),
    (Kind::Subscription, 15),
    (Kind::Gone, 3),
    (Kind::Down, 5),
];

impl Kind {
    fn pick(rng: &mut impl Rng) -> Kind {
        let mut n = rng.random_range(0..100);
        for (k, share) in MIX {
            if n < share {
                return k;
            }
            n -= share;
        }
        Kind::Noop
    }

    fn meant_to_die(self) -> bool {
        matches!(self, Kind::Gone | Kind::Down)
    }
}

/// The webhook receiver: answers by route, and counts each idempotency key
/// it accepted (a receiver applies a key's effect once and drops repeats).
#[derive(Default)]
struct Receiver {
    accepted: Mutex<HashMap<String, u32>>,
}

async fn receiver(fail_rate: f64, stall_rate: f64) -> anyhow::Result<(String, Arc<Receiver>)> {
    let state = Arc::new(Receiver::default());
    let s = state.clone();
    let app = Router::new()
        .route(
            "/hook",
            post(move |headers: HeaderMap| {
                let s = s.clone();
                async move {
                    let roll: f64 = rand::rng().random();
                    if roll < stall_rate {
                        tokio::time::sleep(Duration::from_millis(1_500)).await;
                        return StatusCode::OK;
                    }
                    if roll < stall_rate + fail_rate {
                        return StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    let key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    *s.accepted.lock().unwrap().entry(key).or_default() += 1;
                    StatusCode::OK
                }
            }),
        )
        .route("/gone", post(|| async { StatusCode::GONE }))
        .route("/down", post(|| async { StatusCode::SERVICE_UNAVAILABLE }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((base, state))
}

/// The runner under test, restarted after each kill.
struct Runner {
    bin: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Runner {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.bin)
            .arg("dev")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("OFFLOAD_QUEUE")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL: no graceful shutdown
            let _ = c.wait();
        }
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One accepted job.
struct Accepted {
    id: Uuid,
    kind: Kind,
    contacts: Vec<Uuid>,
}

/// Creates one job, retrying (same idempotency key) while the runner is
/// down or restarting, so a create whose answer was lost is not made twice.
async fn create(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: &Value,
    give_up: Instant,
) -> anyhow::Result<(Uuid, u32)> {
    let key = Uuid::new_v4().to_string();
    let mut tries = 0;
    loop {
        tries += 1;
        let resp = client
            .post(url)
            .bearer_auth(token)
            .header("idempotency-key", &key)
            .json(body)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match resp {
            Ok(r) if r.status() == StatusCode::ACCEPTED || r.status() == StatusCode::OK => {
                let v: Value = r.json().await?;
                let id = v["id"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("a create answered without an id: {v}"))?;
                return Ok((id, tries));
            }
            Ok(r)
                if r.status().is_client_error() && r.status() != StatusCode::TOO_MANY_REQUESTS =>
            {
                let status = r.status();
                anyhow::bail!("{body} was refused: {status} {}", r.text().await?);
            }
            _ if Instant::now() > give_up => {
                anyhow::bail!("the API did not accept a job for 60 s");
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[derive(serde::Serialize, Default)]
struct Report {
    secs: u64,
    rate: u32,
    kills: u32,
    accepted: i64,
    create_retries: i64,
    processed: i64,
    completed: i64,
    dead: i64,
    dead_as_meant: i64,
    dead_unplanned: i64,
    retried: i64,
    attempts: i64,
    lost: i64,
    duplicated: i64,
    webhook_repeats_dropped: i64,
    wait_p50_ms: f64,
    wait_p99_ms: f64,
    wait_max_ms: f64,
    drain_secs: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = match &args.offload {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("offload"),
    };
    anyhow::ensure!(
        bin.exists(),
        "{} does not exist: build it first (`cargo build --release --bin offload`) or pass --offload",
        bin.display()
    );
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| offload::config::DEFAULT_DATABASE_URL.into());
    let name = format!("offload_soak_{}", std::process::id());
    let url = fresh_database(&server, &name).await?;
    let result = soak(&args, bin, &url).await;
    if args.keep_db {
        eprintln!("the database is kept: {url}");
    } else {
        drop_database(&server, &name).await?;
    }
    let report = result?;
    let failed = report.lost != 0 || report.duplicated != 0;
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    eprintln!("figures written to {}", args.out.display());
    anyhow::ensure!(
        !failed,
        "{} jobs lost and {} effects duplicated",
        report.lost,
        report.duplicated
    );
    Ok(())
}

async fn soak(args: &Args, bin: PathBuf, url: &str) -> anyhow::Result<Report> {
    db::migrate(url).await?;
    let pool = db::pool(url, 4)?;
    let ws = WorkspaceId::new();
    let user = UserId::new();
    let seq = Uuid::now_v7();
    {
        let conn = pool.get().await?;
        workspace::ensure_workspace(&**conn, ws, "soak", Tier::Unlimited).await?;
        workspace::add_member(&**conn, ws, user, Role::Admin).await?;
        conn.execute(
            "INSERT INTO sequences (id, workspace_id, name) VALUES ($1, $2, 'soak')",
            &[&seq, &ws.0],
        )
        .await?;
    }
    let (hooks, recv) = receiver(args.fail_rate, args.stall_rate).await?;
    let secret = format!("soak-{}-{}", Uuid::new_v4(), Uuid::new_v4());
    let now = chrono::Utc::now();
    let token = Keys::new(&secret).issue(user, now, now + chrono::Duration::days(1));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = args.out.with_extension("log");
    let _ = std::fs::remove_file(&log);
    let mut runner = Runner {
        bin,
        env: [
            ("DATABASE_URL", url.to_string()),
            ("OFFLOAD_BIND", format!("127.0.0.1:{port}")),
            ("OFFLOAD_JWT_SECRET", secret),
            ("OFFLOAD_LEASE_SECS", "10".into()),
            ("OFFLOAD_SCHEDULER_INTERVAL_SECS", "1".into()),
            ("OFFLOAD_BACKOFF_BASE_MS", "200".into()),
            ("OFFLOAD_BACKOFF_CAP_SECS", "5".into()),
            ("OFFLOAD_WEBHOOK_ALLOW_PRIVATE", "true".into()),
            (
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        log: log.clone(),
        child: None,
    };
    runner.start()?;
    eprintln!(
        "soak: {} s at {} jobs/s, a kill every ~{} s, webhooks failing {:.0} % and stalling {:.0} %; runner log {}",
        args.secs,
        args.rate,
        args.kill_every,
        args.fail_rate * 100.0,
        args.stall_rate * 100.0,
        log.display()
    );

    let jobs_url = format!("http://127.0.0.1:{port}/api/workspaces/{ws}/jobs");
    let client = reqwest::Client::new();
    let accepted: Arc<Mutex<Vec<Accepted>>> = Arc::default();
    let retries = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let in_flight = Arc::new(Semaphore::new(64));
    let started = Instant::now();
    let end = started + Duration::from_secs(args.secs);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut next_kill = next_kill_at(args.kill_every);
    let mut kills = 0;
    let mut last_report = Instant::now();
    while Instant::now() < end {
        tick.tick().await;
        if next_kill.is_some_and(|t| Instant::now() >= t) {
            runner.kill();
            kills += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            runner.start()?;
            next_kill = next_kill_at(args.kill_every);
        } else if !runner.alive() {
            anyhow::bail!("the runner exited by itself; see {}", log.display());
        }
        let (kind, body, contacts) = {
            let mut rng = rand::rng();
            let kind = Kind::pick(&mut rng);
            let contacts: Vec<Uuid> = if kind == Kind::Subscription {
                (0..3).map(|_| Uuid::now_v7()).collect()
            } else {
                Vec::new()
            };
            let body = match kind {
                Kind::Noop => json!({"type": "noop"}),
                Kind::Slow => json!({"type": "sleep", "payload": {
                    "ms": rng.random_range(20..1_500), "steps": rng.random_range(1..5)}}),
                Kind::Webhook => json!({"type": "webhook", "payload": {
                    "url": format!("{hooks}/hook"), "timeout_ms": 1_000, "body": {"n": 1}}}),
                Kind::Subscription => json!({"type": "sequence_subscription",
                    "payload": {"sequence_id": seq, "contact_ids": contacts}}),
                Kind::Gone => {
                    json!({"type": "webhook", "payload": {"url": format!("{hooks}/gone")}})
                }
                Kind::Down => json!({"type": "webhook", "max_attempts": 3,
                    "payload": {"url": format!("{hooks}/down"), "timeout_ms": 1_000}}),
            };
            (kind, body, contacts)
        };
        if !contacts.is_empty() {
            pool.get()
                .await?
                .execute(
                    "INSERT INTO contacts (id, workspace_id) SELECT unnest($1::uuid[]), $2",
                    &[&contacts, &ws.0],
                )
                .await?;
        }
        let permit = in_flight.clone().acquire_owned().await?;
        let (client, url, token) = (client.clone(), jobs_url.clone(), token.clone());
        let (done, retries, errors) = (accepted.clone(), retries.clone(), errors.clone());
        tokio::spawn(async move {
            let give_up = Instant::now() + Duration::from_secs(60);
            match create(&client, &url, &token, &body, give_up).await {
                Ok((id, tries)) => {
                    retries.fetch_add(i64::from(tries - 1), std::sync::atomic::Ordering::Relaxed);
                    done.lock().unwrap().push(Accepted { id, kind, contacts });
                }
                Err(e) => errors.lock().unwrap().push(e.to_string()),
            }
            drop(permit);
        });
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            eprintln!(
                "  {:>4.0} s: {} accepted, {} kills",
                started.elapsed().as_secs_f64(),
                accepted.lock().unwrap().len(),
                kills
            );
        }
    }
    // Every create has been answered before the drain starts.
    let _ = in_flight.acquire_many(64).await?;
    if let Some(e) = errors.lock().unwrap().first() {
        anyhow::bail!("a create failed: {e}");
    }
    let accepted = std::mem::take(&mut *accepted.lock().unwrap());
    let ids: Vec<Uuid> = accepted.iter().map(|a| a.id).collect();
    eprintln!("creation stopped: {} accepted; draining", ids.len());

    let drain_start = Instant::now();
    let conn = pool.get().await?;
    let open_sql = "SELECT count(*) FROM jobs WHERE id = ANY($1) \
                    AND status NOT IN ('completed', 'dead', 'cancelled')";
    loop {
        let open: i64 = conn.query_one(open_sql, &[&ids]).await?.get(0);
        if open == 0 || drain_start.elapsed() > Duration::from_secs(args.drain_secs) {
            break;
        }
        if !runner.alive() {
            anyhow::bail!("the runner exited by itself; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let drain_secs = drain_start.elapsed().as_secs_f64();
    runner.kill();

    // The verdict, from the database and the receiver.
    let rows = conn
        .query(
            "SELECT id, status::text, attempts, result, coalesce(error_message, ''), \
                    (extract(epoch FROM (started_at - created_at)) * 1000)::float8 \
             FROM jobs WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
    struct Row {
        status: String,
        attempts: i32,
        result: Option<Value>,
        error: String,
    }
    let mut found: HashMap<Uuid, Row> = HashMap::new();
    let mut waits = Vec::new();
    for r in &rows {
        found.insert(
            r.get(0),
            Row {
                status: r.get(1),
                attempts: r.get(2),
                result: r.get(3),
                error: r.get(4),
            },
        );
        if let Some(ms) = r.get::<_, Option<f64>>(5) {
            waits.push(ms);
        }
    }
    waits.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let enrolled: HashMap<Uuid, i64> = conn
        .query(
            "SELECT contact_id, count(*) FROM sequence_enrollments WHERE sequence_id = $1 GROUP BY 1",
            &[&seq],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let keys = recv.accepted.lock().unwrap().clone();

    let mut rep = Report {
        secs: args.secs,
        rate: args.rate,
        kills,
        accepted: ids.len() as i64,
        create_retries: retries.load(std::sync::atomic::Ordering::Relaxed),
        drain_secs,
        wait_p50_ms: percentile(&waits, 0.50),
        wait_p99_ms: percentile(&waits, 0.99),
        wait_max_ms: waits.last().copied().unwrap_or(f64::NAN),
        ..Report::default()
    };
    let mut problems: Vec<String> = Vec::new();
    for a in &accepted {
        let Some(row) = found.get(&a.id) else {
            rep.lost += 1;
            problems.push(format!("{} ({:?}) is not in the database", a.id, a.kind));
            continue;
        };
        rep.attempts += i64::from(row.attempts);
        if row.attempts > 1 {
            rep.retried += 1;
        }
        match row.status.as_str() {
            "completed" => {
                rep.processed += 1;
                rep.completed += 1;
            }
            "dead" => {
                rep.processed += 1;
                rep.dead += 1;
                if a.kind.meant_to_die() {
                    rep.dead_as_meant += 1;
                } else {
                    rep.dead_unplanned += 1;
                    eprintln!(
                        "  dead after {} attempts ({:?}): {}",
                        row.attempts, a.kind, row.error
                    );
                }
            }
            "cancelled" => rep.processed += 1,
            other => {
                rep.lost += 1;
                problems.push(format!("{} ({:?}) is still {other}", a.id, a.kind));
                continue;
            }
        }
        let completed = row.status == "completed";
        match a.kind {
            Kind::Webhook => {
                let key = a.id.to_string();
                match (completed, keys.get(&key).copied().unwrap_or(0)) {
                    (true, 0) => {
                        rep.lost += 1;
                        problems.push(format!(
                            "webhook {key} completed but never reached the receiver"
                        ));
                    }
                    (_, n) if n > 1 => rep.webhook_repeats_dropped += i64::from(n - 1),
                    _ => {}
                }
            }
            Kind::Subscription if completed => {
                let counts: Vec<i64> = a
                    .contacts
                    .iter()
                    .map(|c| enrolled.get(c).copied().unwrap_or(0))
                    .collect();
                let succeeded = row
                    .result
                    .as_ref()
                    .and_then(|r| r["succeeded"].as_i64())
                    .unwrap_or(-1);
                for n in &counts {
                    match n {
                        0 => {
                            rep.lost += 1;
                            problems.push(format!(
                                "subscription {} completed without an enrollment",
                                a.id
                            ));
                        }
                        1 => {}
                        n => {
                            rep.duplicated += n - 1;
                            problems.push(format!(
                                "subscription {} enrolled a contact {n} times",
                                a.id
                            ));
                        }
                    }
                }
                if succeeded != a.contacts.len() as i64 {
                    rep.duplicated += 1;
                    problems.push(format!(
                        "subscription {} reports {succeeded} succeeded for {} fresh contacts",
                        a.id,
                        a.contacts.len()
                    ));
                }
            }
            _ => {}
        }
    }
    // The gone/down jobs must die; anything else dying is reported, not hidden.
    for a in &accepted {
        if a.kind.meant_to_die() && found.get(&a.id).is_some_and(|r| r.status == "completed") {
            problems.push(format!(
                "{} ({:?}) completed, yet its receiver never accepts",
                a.id, a.kind
            ));
            rep.duplicated += 1;
        }
    }
    for p in problems.iter().take(20) {
        eprintln!("  PROBLEM: {p}");
    }

    for (name, value, unit) in [
        ("soak_seconds", rep.secs as f64, "s"),
        ("soak_kills", f64::from(rep.kills), "kills"),
        ("soak_accepted", rep.accepted as f64, "jobs"),
        ("soak_create_retries", rep.create_retries as f64, "requests"),
        ("soak_processed", rep.processed as f64, "jobs"),
        ("soak_completed", rep.completed as f64, "jobs"),
        ("soak_retried", rep.retried as f64, "jobs"),
        ("soak_dead", rep.dead as f64, "jobs"),
        ("soak_dead_unplanned", rep.dead_unplanned as f64, "jobs"),
        ("soak_lost", rep.lost as f64, "jobs"),
        ("soak_duplicated", rep.duplicated as f64, "effects"),
        (
            "soak_webhook_repeats_dropped",
            rep.webhook_repeats_dropped as f64,
            "calls",
        ),
        ("soak_wait_p50", rep.wait_p50_ms, "ms"),
        ("soak_wait_p99", rep.wait_p99_ms, "ms"),
        ("soak_wait_max", rep.wait_max_ms, "ms"),
        ("soak_drain", rep.drain_secs, "s"),
    ] {
        println!("{name} {value:.2} {unit}");
    }
    Ok(rep)
}

fn next_kill_at(mean_secs: u64) -> Option<Instant> {
    (mean_secs > 0).then(|| {
        let ms = mean_secs * 1000;
        Instant::now() + Duration::from_millis(rand::rng().random_range(ms / 2..=ms * 3 / 2))
    })
}
