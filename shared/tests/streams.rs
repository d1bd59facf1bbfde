//! Jobs' output streams (`GET …/jobs/{id}/stream`) as their readers see
//! them: every reader gets every chunk exactly once and in order, however
//! often it drops and resumes with `Last-Event-ID`; a feed whose database
//! read fails ends its readers' responses (they resume) and is dropped, so
//! later readers get a working one; and stream connections have their own
//! per-workspace cap, leaving the long-polls' places alone and costing the
//! database nothing while their jobs are quiet.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use offload::api::watch::Watch;
use offload::config::WorkerConfig;
use offload::handlers::{JobContext, JobError, JobHandler, Outcome, Registry};
use offload::ids::JobId;
use offload::queue::Queue;
use offload::testing::{enqueue, expect_problem, new_job, TestApp, TestDb, Workers};
use offload::workspace::Tier;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// One server-sent event: its `event`, `id` and `data`.
#[derive(Clone, Debug)]
struct Sse {
    event: String,
    id: Option<String>,
    data: String,
}

impl Sse {
    /// The chunk's cursor, for a `chunk` event.
    fn chunk_id(&self) -> Option<i64> {
        (self.event == "chunk").then(|| {
            self.id
                .as_deref()
                .and_then(|i| i.parse().ok())
                .expect("a chunk carries its cursor as its id")
        })
    }
}

/// Reads `resp`'s events into a channel, which closes when the response
/// ends (or the receiver is dropped, which drops the connection).
fn events(mut resp: reqwest::Response) -> mpsc::UnboundedReceiver<Sse> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = String::new();
        loop {
            // A dropped receiver drops the connection at once, even while
            // the stream is quiet.
            let bytes = tokio::select! {
                _ = tx.closed() => return,
                b = resp.chunk() => match b {
                    Ok(Some(b)) => b,
                    _ => return,
                },
            };
            buf.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let mut e = Sse {
                    event: "message".into(),
                    id: None,
                    data: String::new(),
                };
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        e.event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        e.id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        e.data.push_str(v.trim());
                    }
                }
                // A comment, a keep-alive or the retry field carries neither.
                if e.data.is_empty() && e.id.is_none() {
                    continue;
                }
                if tx.send(e).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// `GET …/jobs/{id}/stream`, resuming after `last` when given.
async fn connect(app: &TestApp, job: JobId, last: Option<i64>) -> reqwest::Response {
    let mut req = app.req("GET", &format!("/jobs/{job}/stream"));
    if let Some(l) = last {
        req = req.header("Last-Event-ID", l.to_string());
    }
    req.send().await.expect("stream request")
}

/// The job's chunk ids as the table holds them, in order.
async fn table_ids(db: &TestDb, job: JobId) -> Vec<i64> {
    db.pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT id FROM job_stream WHERE job_id = $1 ORDER BY id",
            &[&job.0],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// What separates `got` from `want`, for a failure message.
fn difference(got: &[i64], want: &[i64]) -> String {
    let first = got
        .iter()
        .zip(want)
        .position(|(g, w)| g != w)
        .unwrap_or(got.len().min(want.len()));
    let (gots, wants): (std::collections::HashSet<_>, std::collections::HashSet<_>) =
        (got.iter().collect(), want.iter().collect());
    let missing = wants.difference(&gots).count();
    let repeated = got.len() - gots.len();
    format!(
        "{} chunks, not {}: {missing} missing, {repeated} repeated, first difference at {first} \
         (got {:?}, want {:?})",
        got.len(),
        want.len(),
        got.get(first..(first + 5).min(got.len())),
        want.get(first..(first + 5).min(want.len())),
    )
}

/// Appends a chunk about every millisecond for `for_`, then completes.
struct Chatter {
    for_: Duration,
}

#[async_trait]
impl JobHandler for Chatter {
    type Payload = Value;
    const TYPE: &'static str = "chatter";
    async fn run(&self, _: Value, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let mut i = 0;
        while started.elapsed() < self.for_ {
            tick.tick().await;
            ctx.stream(&json!({ "i": i })).await?;
            i += 1;
        }
        Ok(Outcome::Completed(None))
    }
}

/// How one reader comes and goes, in milliseconds: connected for `HOLD`,
/// then away for `AWAY`; at an outage (every `OUTAGE_EVERY` or so) every
/// reader drops at once and comes back after `OUTAGE_AWAY`.
const HOLD: std::ops::Range<u64> = 5..100;
const AWAY: std::ops::Range<u64> = 5..40;
const OUTAGE_EVERY: std::ops::Range<u64> = 50..150;
const OUTAGE_AWAY: std::ops::Range<u64> = 20..80;

/// A reader that connects, reads for a while, drops the connection, stays
/// away a moment and resumes from its last id, until the `end` event; at
/// each `outage` it drops (or stays away) with every other reader. Returns
/// the chunk ids it received and its number of connections.
async fn fickle_reader(
    app: Arc<TestApp>,
    job: JobId,
    seed: u64,
    mut outage: tokio::sync::watch::Receiver<u32>,
) -> (Vec<i64>, usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let give_up = Instant::now() + Duration::from_secs(30);
    let (mut got, mut connections) = (Vec::new(), 0);
    loop {
        assert!(
            Instant::now() < give_up,
            "reader {seed} saw no end in 30 s after {connections} connections"
        );
        let resp = connect(&app, job, got.last().copied()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        connections += 1;
        let mut rx = events(resp);
        let leave = Instant::now() + Duration::from_millis(rng.random_range(HOLD));
        let back_after_outage = Duration::from_millis(rng.random_range(OUTAGE_AWAY));
        let mut away = Duration::from_millis(rng.random_range(AWAY));
        outage.mark_unchanged();
        loop {
            let e = tokio::select! {
                e = tokio::time::timeout_at(leave, rx.recv()) => e,
                _ = outage.changed() => {
                    away = back_after_outage;
                    break;
                }
            };
            let Ok(Some(e)) = e else { break };
            if e.event == "end" {
                return (got, connections);
            }
            got.extend(e.chunk_id());
        }
        // Dropping `rx` drops the connection.
        drop(rx);
        tokio::select! {
            _ = tokio::time::sleep(away) => {}
            _ = outage.changed() => tokio::time::sleep(back_after_outage).await,
        }
    }
}

/// How often a packet towards the database is held up, and for how long.
const HICCUP: f64 = 0.05;
const HICCUP_FOR: Duration = Duration::from_millis(10);

/// A TCP proxy to the test's PostgreSQL that now and then holds up a
/// statement: each packet towards the server waits [`HICCUP_FOR`] with
/// probability [`HICCUP`] (the others, and all answers, pass at once, in
/// order). It stands for the network and the scheduler between an API
/// process and its database, under which two statements sent together
/// may start in either order, and far apart. Returns its URL for `db`.
async fn hiccupping(db: &TestDb) -> String {
    let mut url = url::Url::parse(&db.url).expect("a database URL");
    let target = format!(
        "{}:{}",
        url.host_str().expect("a host"),
        url.port().unwrap_or(5432)
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pass_on(cr, sw, HICCUP));
            tokio::spawn(pass_on(sr, cw, 0.0));
        }
    });
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(port)).unwrap();
    url.to_string()
}

/// Copies `from` to `to`, holding a packet up with probability `hiccup`.
async fn pass_on(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hiccup: f64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if rng.random_bool(hiccup) {
            tokio::time::sleep(HICCUP_FOR).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

fn quick() -> WorkerConfig {
    WorkerConfig {
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(20),
        ..WorkerConfig::default()
    }
}

/// Issue 26: a new feed used to start from the newest chunk as read
/// beside its first reader's backlog, so a chunk committed between the two
/// reads reached neither, and the reader's `Last-Event-ID` moved past it
/// for good. The outages make new feeds often (every reader gone, then
/// back), and the hiccups vary the order of the feed's and the readers'
/// reads; before the fix a few readers of most runs missed chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_drop_and_resume_at_random_get_every_chunk_once_in_order() {
    let db = TestDb::new().await;
    let q = Arc::new(db.pg_queue(5));
    // The API reads through a hiccupping network; the worker appends
    // directly, a chunk about every millisecond for 3 s.
    let far = offload::store::Store::new(offload::db::pool(&hiccupping(&db).await, 8).unwrap());
    let app = Arc::new(
        TestApp::spawn_state(db, q.clone(), Tier::Enterprise, move |s| s.store = far).await,
    );
    let workers = Workers::start(
        &app.db,
        q.clone(),
        app.db.worker_with(
            q.clone(),
            quick(),
            Registry::builtin().with(Chatter {
                for_: Duration::from_secs(3),
            }),
        ),
    );
    let job = app
        .db
        .insert(&[new_job(app.workspace, "chatter", json!({}))])
        .await
        .remove(0);
    let base: u64 = rand::random::<u32>() as u64 * 100;
    let (outages, outage) = tokio::sync::watch::channel(0);
    let readers: Vec<_> = (0..20)
        .map(|i| tokio::spawn(fickle_reader(app.clone(), job.id, base + i, outage.clone())))
        .collect();
    // After each outage the first reader back starts a new feed, and the
    // others join it as they arrive.
    let outages = tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        loop {
            tokio::time::sleep(Duration::from_millis(rng.random_range(OUTAGE_EVERY))).await;
            outages.send_modify(|n| *n += 1);
        }
    });
    enqueue(&app.db, &*q, std::slice::from_ref(&job)).await;

    let mut results = Vec::new();
    for r in readers {
        results.push(r.await.unwrap());
    }
    outages.abort();
    workers.stop().await;
    let want = table_ids(&app.db, job.id).await;
    assert!(want.len() > 500, "the job appended {} chunks", want.len());
    for (i, (got, _)) in results.iter().enumerate() {
        assert!(
            got == &want,
            "reader {i} (seed {}): {}",
            base + i as u64,
            difference(got, &want)
        );
    }
    let connections: usize = results.iter().map(|r| r.1).sum();
    eprintln!(
        "{} chunks, 20 readers, {connections} connections: each reader got each chunk once",
        want.len()
    );
}

/// Appends `n` chunks to `job`'s stream as a worker's append does (and
/// tells its watchers), without a lease: the readers are what is tested.
async fn append(db: &TestDb, job: JobId, n: i64) -> Vec<i64> {
    let c = db.pool.get().await.unwrap();
    let ids: Vec<i64> = c
        .query(
            "INSERT INTO job_stream (job_id, workspace_id, data) \
             SELECT id, workspace_id, jsonb_build_object('i', g) \
             FROM jobs, generate_series(1, $2::bigint) g WHERE id = $1 ORDER BY g RETURNING id",
            &[&job.0, &n],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    c.execute(
        "SELECT pg_notify('offload_jobs', $1::uuid::text)",
        &[&job.0],
    )
    .await
    .unwrap();
    ids
}

/// Waits until some feed has registered its watch of `job`.
async fn until_watched(db: &TestDb, job: JobId) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let n: i64 = db
            .pool
            .get()
            .await
            .unwrap()
            .query_one(
                "SELECT count(*) FROM job_watches WHERE job_id = $1",
                &[&job.0],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return;
        }
        assert!(Instant::now() < end, "no feed watches job {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next `n` chunk ids from `rx`, within `within`.
async fn next_chunks(
    rx: &mut mpsc::UnboundedReceiver<Sse>,
    n: usize,
    within: Duration,
) -> Vec<i64> {
    let end = Instant::now() + within;
    let mut ids = Vec::new();
    while ids.len() < n {
        match tokio::time::timeout_at(end, rx.recv()).await {
            Ok(Some(e)) => ids.extend(e.chunk_id()),
            Ok(None) => panic!("the response ended after {ids:?}"),
            Err(_) => panic!("{} chunks in {within:?}, not {n}: {ids:?}", ids.len()),
        }
    }
    ids
}

#[tokio::test]
async fn a_feed_whose_read_fails_ends_its_readers_responses_and_the_next_reader_gets_a_working_one()
{
    let app = TestApp::spawn().await;
    let job = app
        .db
        .insert(&[new_job(app.workspace, "noop", json!({}))])
        .await
        .remove(0)
        .id;
    let mut first = events(connect(&app, job, None).await);
    until_watched(&app.db, job).await;
    let before = append(&app.db, job, 3).await;
    assert_eq!(
        next_chunks(&mut first, 3, Duration::from_secs(3)).await,
        before
    );

    // The feed's next read fails: the table is away.
    let admin = app.db.pool.get().await.unwrap();
    admin
        .batch_execute("ALTER TABLE job_stream RENAME TO job_stream_away")
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_notify('offload_jobs', $1::uuid::text)",
            &[&job.0],
        )
        .await
        .unwrap();
    // Its reader is told: its response ends, with nothing more sent, so
    // the client resumes instead of waiting on a feed that says nothing.
    match tokio::time::timeout(Duration::from_secs(3), first.recv()).await {
        Ok(None) => {}
        Ok(Some(e)) => panic!("the reader of a broken feed got {e:?}"),
        Err(_) => panic!("the reader of a broken feed was left waiting, its response open"),
    }
    admin
        .batch_execute("ALTER TABLE job_stream_away RENAME TO job_stream")
        .await
        .unwrap();

    // It resumes from its last id on a working feed, as does a new reader.
    let mut resumed = events(connect(&app, job, before.last().copied()).await);
    let mut fresh = events(connect(&app, job, None).await);
    until_watched(&app.db, job).await;
    assert_eq!(
        next_chunks(&mut fresh, 3, Duration::from_secs(3)).await,
        before
    );
    let after = append(&app.db, job, 3).await;
    assert_eq!(
        next_chunks(&mut resumed, 3, Duration::from_secs(3)).await,
        after
    );
    assert_eq!(
        next_chunks(&mut fresh, 3, Duration::from_secs(3)).await,
        after
    );
}

#[tokio::test]
async fn a_feed_that_cannot_start_ends_its_readers_responses_after_their_backlog() {
    let app = TestApp::spawn().await;
    let job = app
        .db
        .insert(&[new_job(app.workspace, "noop", json!({}))])
        .await
        .remove(0)
        .id;
    let before = append(&app.db, job, 3).await;
    // The feed cannot register its watch; the reader's own reads work.
    let admin = app.db.pool.get().await.unwrap();
    admin
        .batch_execute("ALTER TABLE job_watches RENAME TO job_watches_away")
        .await
        .unwrap();
    let mut reader = events(connect(&app, job, None).await);
    assert_eq!(
        next_chunks(&mut reader, 3, Duration::from_secs(3)).await,
        before
    );
    match tokio::time::timeout(Duration::from_secs(3), reader.recv()).await {
        Ok(None) => {}
        Ok(Some(e)) => panic!("the reader of a feed that never started got {e:?}"),
        Err(_) => panic!("the reader of a feed that never started was left waiting"),
    }
    admin
        .batch_execute("ALTER TABLE job_watches_away RENAME TO job_watches")
        .await
        .unwrap();

    let mut resumed = events(connect(&app, job, before.last().copied()).await);
    until_watched(&app.db, job).await;
    let after = append(&app.db, job, 2).await;
    assert_eq!(
        next_chunks(&mut resumed, 2, Duration::from_secs(3)).await,
        after
    );
}

/// Connections to the test's database, other than `probe`, that ran a
/// statement since `since`, by the server's account.
async fn busy_since(
    probe: &tokio_postgres::Client,
    db: &str,
    since: chrono::DateTime<chrono::Utc>,
) -> i64 {
    probe
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid() AND state_change > $2",
            &[&db, &since],
        )
        .await
        .unwrap()
        .get(0)
}

/// Rows in `job_watches`.
async fn watches(db: &TestDb) -> i64 {
    db.scalar_i64("SELECT count(*) FROM job_watches").await
}

#[tokio::test]
async fn streams_have_a_cap_of_their_own_leave_long_polls_their_places_and_cost_nothing_while_quiet(
) {
    let db = TestDb::new().await;
    let url = db.url.clone();
    let queue: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    // 200 long-polls and 250 streams per workspace.
    let app = TestApp::spawn_state(db, queue, Tier::Enterprise, move |s| {
        s.watch = Watch::new(Some(url), 200, 250);
    })
    .await;
    let jobs: Vec<JobId> = app
        .db
        .insert(
            &(0..251)
                .map(|_| new_job(app.workspace, "noop", json!({})))
                .collect::<Vec<_>>(),
        )
        .await
        .iter()
        .map(|j| j.id)
        .collect();
    // 250 streams of 250 jobs: 250 feeds, each watching its job.
    let mut open = Vec::new();
    for &job in &jobs[..250] {
        let resp = connect(&app, job, None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        open.push(events(resp));
    }
    let end = Instant::now() + Duration::from_secs(5);
    while watches(&app.db).await < 250 {
        assert!(
            Instant::now() < end,
            "{} feeds watch their jobs",
            watches(&app.db).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each feed reads once more a second after its watch is in place.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // While the jobs are quiet, their streams cost the database nothing.
    let probe = offload::db::connect(&app.db.url).await.unwrap();
    let quiet_from: chrono::DateTime<chrono::Utc> =
        probe.query_one("SELECT now()", &[]).await.unwrap().get(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        busy_since(&probe, &app.db.name, quiet_from).await,
        0,
        "no connection ran a statement while 250 streams followed quiet jobs"
    );

    // A long-poll of the workspace still finds its place.
    let wait = app.get_job(&format!("{}?wait=1", jobs[250])).await;
    assert_eq!(
        wait.status(),
        StatusCode::OK,
        "a long-poll beside 250 open streams"
    );

    // One more stream is beyond the workspace's cap of streams: 429.
    let beyond = connect(&app, jobs[250], None).await;
    assert_eq!(beyond.headers()["retry-after"], "1");
    expect_problem(beyond, StatusCode::TOO_MANY_REQUESTS).await;
    // A place given back (the client left) is taken again.
    drop(open.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        connect(&app, jobs[250], None).await.status(),
        StatusCode::OK
    );
}
