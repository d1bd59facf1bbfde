//! Test helpers (feature `testing`): every test gets its own database, made
//! from a migrated template in milliseconds, so tests run in parallel
//! without sharing state; and helpers that read like the promises the tests
//! check.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use deadpool_postgres::Pool;
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::api::{ApiSettings, AppState};
use crate::auth::Keys;
use crate::clock::Clock;
use crate::config::{SqsConfig, WorkerConfig};
use crate::db;
use crate::event_source::EventSource;
use crate::handlers::Registry;
use crate::ids::{JobId, UserId, WorkspaceId};
use crate::job::{Job, JobStatus, QueueName};
use crate::queue::{PgQueue, Queue, SqsQueue};
use crate::store::{NewJob, Store};
use crate::worker::Worker;
use crate::workspace::{self, Role, Tier};

mod fake_crm;
mod fake_provider;
mod lambda_runtime;
mod smtp_sink;
mod tls_server;
pub use fake_crm::FakeCrm;
pub use fake_provider::{Failures, FakeProvider};
pub use lambda_runtime::{Invoked, LambdaRuntime};
pub use smtp_sink::SmtpSink;
pub use tls_server::TlsServer;

/// A free TCP port on loopback (for a server a test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What Lambda's event source hands one worker invocation: up to 10
/// messages of the default queue, hidden for 30 s, without waiting.
pub async fn receive_batch(queue: &dyn Queue) -> Vec<crate::queue::ReceivedMessage> {
    queue
        .receive(
            QueueName::Default,
            10,
            Duration::from_secs(30),
            Duration::ZERO,
        )
        .await
        .expect("receive a batch")
}

/// The secret test tokens are signed with.
pub const TEST_SECRET: &str = "offload-test-secret-offload-test-secret";

/// The server tests use: `OFFLOAD_TEST_DATABASE_URL`, else `DATABASE_URL`,
/// else the local default.
pub fn server_url() -> String {
    std::env::var("OFFLOAD_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| crate::config::DEFAULT_DATABASE_URL.to_string())
}

/// `url` with its database name replaced by `name` (query string kept).
pub fn with_db(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let base = base.rsplit_once('/').map(|(b, _)| b).unwrap_or(base);
    format!("{base}/{name}{query}")
}

static TEMPLATE: OnceCell<String> = OnceCell::const_new();

/// The migrated template database, made once per schema version across
/// all test processes (an advisory lock keeps two from making it at once).
async fn template() -> &'static str {
    TEMPLATE
        .get_or_init(|| async {
            let server = server_url();
            let name = format!("offload_tpl_v{}_{}", db::required_version(), schema_hash());
            let admin = db::connect(&with_db(&server, "postgres"))
                .await
                .unwrap_or_else(|e| panic!("tests need PostgreSQL ({e}); run scripts/test.sh"));
            admin
                .execute("SELECT pg_advisory_lock(7114244)", &[])
                .await
                .expect("advisory lock");
            let exists = admin
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
                .await
                .expect("query pg_database")
                .is_some();
            if !exists {
                let building = format!("{name}_building");
                for sql in [
                    format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
                    format!("CREATE DATABASE {building}"),
                ] {
                    admin.batch_execute(&sql).await.expect("create template");
                }
                db::migrate(&with_db(&server, &building))
                    .await
                    .expect("migrate template");
                retry_in_use(
                    &admin,
                    &format!("ALTER DATABASE {building} RENAME TO {name}"),
                )
                .await;
            }
            admin
                .execute("SELECT pg_advisory_unlock(7114244)", &[])
                .await
                .expect("advisory unlock");
            name
        })
        .await
}

/// A short fingerprint of the migrations, so a changed migration gets a new template.
fn schema_hash() -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("migrations folder")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    files.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in files {
        for b in std::fs::read(&f).unwrap_or_default() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{:08x}", h as u32)
}

/// Runs a statement that fails while another session is still attached to
/// the database it names (a just-closed connection lingers for a moment).
async fn retry_in_use(client: &tokio_postgres::Client, sql: &str) {
    for _ in 0..100 {
        match client.batch_execute(sql).await {
            Ok(()) => return,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{sql}: {e:?}"),
        }
    }
    panic!("{sql}: database stayed in use");
}

/// A database of this test's own at schema `version` (migrations up to it
/// applied, none after); its URL.
pub async fn database_at(version: i32) -> String {
    let server = server_url();
    let name = format!("offload_v{version}_{}", uuid::Uuid::new_v4().simple());
    let admin = db::connect(&with_db(&server, "postgres"))
        .await
        .expect("connect to postgres");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let url = with_db(&server, &name);
    db::migrate_to(&url, version).await.expect("migrate");
    url
}

/// A fresh, migrated database of this test's own.
pub struct TestDb {
    pub url: String,
    pub name: String,
    pub pool: Pool,
    pub store: Store,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let template = template().await;
        let server = server_url();
        let name = format!("offload_t_{}", uuid::Uuid::new_v4().simple());
        let admin = db::connect(&with_db(&server, "postgres"))
            .await
            .expect("connect to postgres");
        retry_in_use(
            &admin,
            &format!("CREATE DATABASE {name} TEMPLATE {template}"),
        )
        .await;
        let url = with_db(&server, &name);
        let pool = db::pool(&url, 8).expect("pool");
        TestDb {
            store: Store::new(pool.clone()),
            url,
            name,
            pool,
        }
    }

    /// A workspace of `tier` with one admin; returns both ids.
    pub async fn workspace(&self, tier: Tier) -> (WorkspaceId, UserId) {
        let ws = WorkspaceId::new();
        let user = UserId::new();
        let db = self.pool.get().await.expect("connection");
        workspace::ensure_workspace(&**db, ws, "Test", tier)
            .await
            .expect("workspace");
        workspace::add_member(&**db, ws, user, Role::Admin)
            .await
            .expect("member");
        (ws, user)
    }

    /// Inserts jobs as the API would, without sending messages.
    pub async fn insert(&self, jobs: &[NewJob]) -> Vec<Job> {
        let db = self.pool.get().await.expect("connection");
        self.store
            .insert(&db, jobs, Utc::now())
            .await
            .expect("insert")
            .into_iter()
            .map(|(j, _)| j)
            .collect()
    }

    pub async fn job(&self, id: JobId) -> Job {
        self.store
            .get_any(id)
            .await
            .expect("read job")
            .expect("job exists")
    }

    /// Polls until the job reaches `status` or `timeout` passes; returns it.
    pub async fn wait_for_status(&self, id: JobId, status: JobStatus, timeout: Duration) -> Job {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let job = self.job(id).await;
            if job.status == status {
                return job;
            }
            if tokio::time::Instant::now() > end {
                panic!(
                    "job {id} is {} after {timeout:?}, expected {status}: {job:?}",
                    job.status
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        let db = self.pool.get().await.expect("connection");
        db.query_one(sql, &[]).await.expect(sql).get(0)
    }

    /// A Postgres queue in this database.
    pub fn pg_queue(&self, max_receive_count: u32) -> PgQueue {
        PgQueue::new(self.pool.clone(), max_receive_count)
    }

    /// A storage folder of this test's own.
    pub fn storage(&self) -> crate::storage::Storage {
        crate::storage::Storage::local(
            std::env::temp_dir().join(format!("offload-test-{}", self.name)),
        )
        .expect("test storage")
    }

    pub fn worker(&self, queue: Arc<dyn Queue>, config: WorkerConfig) -> Worker {
        self.worker_with(queue, config, Registry::builtin())
    }

    pub fn worker_with(
        &self,
        queue: Arc<dyn Queue>,
        config: WorkerConfig,
        registry: Registry,
    ) -> Worker {
        Worker::new(
            self.store.clone(),
            queue,
            Arc::new(registry),
            config,
            Clock::System,
            "test-worker",
            self.storage(),
        )
    }

    pub fn api_state(&self, queue: Arc<dyn Queue>) -> AppState {
        let watch = crate::api::watch::Watch::new(
            Some(self.url.clone()),
            crate::config::Config::defaults().max_waiting_per_workspace,
            crate::config::Config::defaults().max_streams_per_workspace,
        );
        AppState {
            realtime: crate::api::realtime::Realtime::new(watch.clone(), self.store.clone()),
            store: self.store.clone(),
            queue,
            registry: Arc::new(Registry::builtin()),
            auth: crate::auth::Verifier::secret(TEST_SECRET),
            clock: Clock::System,
            settings: ApiSettings::default(),
            storage: self.storage(),
            watch,
            browser: Some(crate::browser_token::BrowserKeys::new(
                TEST_SECRET.as_bytes(),
            )),
        }
    }
}

/// Sends the jobs' messages as the API would, and checks the queue took them all.
pub async fn enqueue(db: &TestDb, queue: &dyn Queue, jobs: &[Job]) {
    let refs: Vec<&Job> = jobs.iter().collect();
    let sent = crate::enqueue::send_jobs(&db.store, queue, &refs, Utc::now())
        .await
        .expect("enqueue");
    assert_eq!(
        sent.sent.len(),
        jobs.len(),
        "the queue refused some: {:?}",
        sent.error
    );
}

/// Drains `source` until the job is finished (delayed retries come back
/// between drains), and returns it; fails the test after `within`.
pub async fn run_until_finished(
    db: &TestDb,
    source: &EventSource,
    id: JobId,
    within: Duration,
) -> Job {
    let end = tokio::time::Instant::now() + within;
    loop {
        source.drain().await;
        let j = db.job(id).await;
        if j.status.is_terminal() {
            return j;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "job stuck after {within:?}: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An event source over the `default` queue, as the local runner builds it.
pub fn event_source(queue: Arc<dyn Queue>, worker: Worker) -> EventSource {
    EventSource {
        queue,
        worker: Arc::new(worker),
        name: QueueName::Default,
        batch: 10,
        visibility: Duration::from_secs(30),
        wait: Duration::ZERO,
        invocation_timeout: Duration::from_secs(60),
        concurrency: Arc::new(tokio::sync::Semaphore::new(1)),
    }
}

/// Worker loops over every work queue, as `offload dev` runs them (2
/// receive loops per queue, 10 invocations at once, batches of 100, woken by
/// NOTIFY); stopped and awaited by [`Workers::stop`], aborted on drop.
pub struct Workers {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Workers {
    pub fn start(db: &TestDb, queue: Arc<PgQueue>, worker: Worker) -> Workers {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let listener = queue.listen(&db.url);
        tasks.spawn(async move {
            let _ = listener.await;
        });
        crate::event_source::spawn_all(
            &mut tasks,
            queue,
            Arc::new(worker),
            &crate::event_source::Polling {
                batch: 100,
                loops_per_queue: 2,
                max_concurrency: 10,
                visibility: Duration::from_secs(60),
                wait: Duration::from_secs(1),
                invocation_timeout: Duration::from_secs(60),
            },
            &rx,
        );
        Workers { stop, tasks }
    }

    /// Stops receiving and waits for the invocations in flight.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        // The listener task never ends by itself.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.tasks.len() > 1 && tokio::time::Instant::now() < deadline {
            if tokio::time::timeout(Duration::from_millis(200), self.tasks.join_next())
                .await
                .is_err()
            {
                continue;
            }
        }
        self.tasks.abort_all();
    }
}

/// What a [`HookedQueue`] does around each send.
#[async_trait::async_trait]
pub trait SendHook: Send + Sync + 'static {
    async fn before_send(&self) {}
    async fn after_send(&self) {}
}

/// The Postgres queue with a hook around each send, and without offering its
/// transaction: creates take the path SQS takes (rows committed first, then
/// the messages), against a real queue.
pub struct HookedQueue<H> {
    pub inner: PgQueue,
    pub hook: H,
}

#[async_trait::async_trait]
impl<H: SendHook> Queue for HookedQueue<H> {
    async fn send_batch(
        &self,
        q: QueueName,
        m: &[crate::queue::OutgoingMessage],
    ) -> Result<(), crate::queue::QueueError> {
        self.hook.before_send().await;
        self.inner.send_batch(q, m).await?;
        self.hook.after_send().await;
        Ok(())
    }
    async fn receive(
        &self,
        q: QueueName,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<crate::queue::ReceivedMessage>, crate::queue::QueueError> {
        self.inner.receive(q, max, visibility, wait).await
    }
    async fn change_visibility(
        &self,
        q: QueueName,
        receipt: &str,
        timeout: Duration,
    ) -> Result<(), crate::queue::QueueError> {
        self.inner.change_visibility(q, receipt, timeout).await
    }
    async fn delete_batch(
        &self,
        q: QueueName,
        receipts: &[String],
    ) -> Result<(), crate::queue::QueueError> {
        self.inner.delete_batch(q, receipts).await
    }
    async fn depth(
        &self,
        q: QueueName,
    ) -> Result<crate::queue::QueueDepth, crate::queue::QueueError> {
        self.inner.depth(q).await
    }
    fn max_receive_batch(&self) -> usize {
        crate::queue::SQS_MAX_BATCH
    }
    fn arn(&self, q: QueueName) -> String {
        self.inner.arn(q)
    }
}

/// The SQS API server the tests use (moto, started by scripts/test.sh).
pub fn sqs_endpoint() -> String {
    std::env::var("OFFLOAD_TEST_SQS_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "OFFLOAD_TEST_SQS_ENDPOINT is not set: SQS tests need moto's server; \
             run them through scripts/test.sh, which starts it"
        )
    })
}

/// Fresh SQS queues (a unique prefix) on the test server, with redrive to a
/// dead-letter queue after `max_receive_count` receives.
pub async fn sqs_queue(max_receive_count: u32) -> SqsQueue {
    let cfg = SqsConfig {
        endpoint: Some(sqs_endpoint()),
        prefix: format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        urls: None,
        region: "us-east-1".into(),
    };
    SqsQueue::connect(&cfg, max_receive_count)
        .await
        .expect("create SQS queues on the test server")
}

/// A bucket of its own on moto's S3 (the server the SQS tests use), with
/// a round trip through it checked.
pub async fn s3_bucket() -> crate::storage::Storage {
    let endpoint = sqs_endpoint();
    let bucket = format!("files-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let created = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("moto's S3");
    assert!(
        created.status().is_success(),
        "create bucket: {}",
        created.status()
    );
    let storage =
        crate::storage::Storage::s3(&bucket, "us-east-1", Some(&endpoint)).expect("S3 storage");
    storage
        .put("probe.txt", bytes::Bytes::from_static(b"hello"))
        .await
        .expect("a round trip through moto's S3");
    assert!(storage.exists("probe.txt").await.expect("head"));
    storage
}

/// A token for `user` valid for an hour, signed with [`TEST_SECRET`].
pub fn token(user: UserId) -> String {
    let now = Utc::now();
    Keys::new(TEST_SECRET).issue(user, now, now + chrono::Duration::hours(1))
}

/// A job of `job_type` with `payload`, for `workspace`.
pub fn new_job(workspace: WorkspaceId, job_type: &str, payload: Value) -> NewJob {
    NewJob::new(workspace, job_type, payload)
}

/// The fields of DESIGN.md's job object, in its order.
pub const JOB_FIELDS: [&str; 22] = [
    "id",
    "workspace_id",
    "type",
    "queue",
    "priority",
    "status",
    "payload",
    "attempts",
    "max_attempts",
    "run_at",
    "progress",
    "result",
    "error_message",
    "error_kind",
    "tags",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
    "parent_id",
    "wait",
    "created_by",
];

/// Checks that `resp` is an error of `status` with a problem body (stable
/// `type` URI, a `detail` for people) and returns the body.
pub async fn expect_problem(
    resp: reqwest::Response,
    status: reqwest::StatusCode,
) -> serde_json::Value {
    assert_eq!(resp.status(), status);
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "errors are problem bodies"
    );
    let body: serde_json::Value = resp.json().await.expect("a JSON problem body");
    assert!(
        body["type"].as_str().unwrap_or("").starts_with("https://"),
        "{body}"
    );
    assert!(!body["detail"].as_str().unwrap_or("").is_empty(), "{body}");
    body
}

/// The API served on a free loopback port; dropped with the test.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub db: TestDb,
    pub workspace: WorkspaceId,
    pub user: UserId,
    pub token: String,
    pub queue: Arc<dyn Queue>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl TestApp {
    /// A fresh database, an enterprise workspace with an admin, the Postgres
    /// queue, and the router listening on 127.0.0.1:0.
    pub async fn spawn() -> TestApp {
        let db = TestDb::new().await;
        let queue: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
        Self::spawn_with(db, queue).await
    }

    pub async fn spawn_with(db: TestDb, queue: Arc<dyn Queue>) -> TestApp {
        Self::spawn_full(db, queue, Tier::Enterprise, ApiSettings::default()).await
    }

    /// The API with a workspace of `tier` and these HTTP settings.
    pub async fn spawn_full(
        db: TestDb,
        queue: Arc<dyn Queue>,
        tier: Tier,
        settings: ApiSettings,
    ) -> TestApp {
        Self::spawn_state(db, queue, tier, |s| s.settings = settings).await
    }

    /// The API with a workspace of `tier`, its state changed by `edit`
    /// (other storage, other settings) before it serves.
    pub async fn spawn_state(
        db: TestDb,
        queue: Arc<dyn Queue>,
        tier: Tier,
        edit: impl FnOnce(&mut AppState),
    ) -> TestApp {
        let (workspace, user) = db.workspace(tier).await;
        let mut state = db.api_state(queue.clone());
        edit(&mut state);
        let app = crate::api::router(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        TestApp {
            base,
            client: reqwest::Client::new(),
            token: token(user),
            db,
            workspace,
            user,
            queue,
            server,
        }
    }

    pub fn jobs_url(&self) -> String {
        format!("{}/api/workspaces/{}/jobs", self.base, self.workspace)
    }

    /// `POST …/jobs` with `body`, as the workspace's admin.
    pub async fn create_job(&self, body: Value) -> reqwest::Response {
        self.client
            .post(self.jobs_url())
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    /// A request to `path` (after `/api/workspaces/{ws}`) as the workspace's admin.
    pub fn req(&self, method: &str, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(
                method.parse().expect("method"),
                format!("{}/api/workspaces/{}{path}", self.base, self.workspace),
            )
            .bearer_auth(&self.token)
    }

    /// `GET` `path` (after `/api/workspaces/{ws}`) as the workspace's admin:
    /// the JSON body.
    pub async fn get_json(&self, path: &str) -> Value {
        self.req("GET", path)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("a JSON body")
    }

    /// `GET …/jobs/{id}` as the workspace's admin.
    pub async fn get_job(&self, id: &str) -> reqwest::Response {
        self.client
            .get(format!("{}/{id}", self.jobs_url()))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("request")
    }
}
