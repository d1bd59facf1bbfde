//! Long-polls wait on a notification: while the job does not change, 200
//! waiting requests cost the database no statements; a change answers them
//! all at once; and a workspace's waiting requests are capped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use offload::api::watch::Watch;
use offload::queue::Queue;
use offload::testing::{expect_problem, TestApp, TestDb};
use offload::workspace::Tier;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn app(max_waiting: usize) -> TestApp {
    let db = TestDb::new().await;
    let url = db.url.clone();
    let queue: Arc<dyn Queue> = Arc::new(db.pg_queue(5));
    TestApp::spawn_state(db, queue, Tier::Enterprise, move |s| {
        s.watch = Watch::new(Some(url), max_waiting, 1_000);
    })
    .await
}

/// Connections to the test's database, other than `probe`, that ran a
/// statement since `probe`'s previous one began, by the server's account.
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

type Waiting = Vec<tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>>;

/// A new job, and `n` requests long-polling it for `secs`.
async fn wait_on_a_new_job(app: &TestApp, n: usize, secs: u32) -> (Value, String, Waiting) {
    let created: Value = app
        .create_job(json!({"type": "noop"}))
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let url = format!("{}/{id}?wait={secs}", app.jobs_url());
    let waiting = (0..n)
        .map(|_| tokio::spawn(app.client.get(&url).bearer_auth(&app.token).send()))
        .collect();
    (created, id, waiting)
}

#[tokio::test]
async fn two_hundred_waiting_requests_cost_no_statements_until_the_job_changes() {
    let app = app(1_000).await;
    let (created, id, waiting) = wait_on_a_new_job(&app, 200, 20).await;
    // Every request has registered and is waiting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(waiting.iter().all(|t| !t.is_finished()));
    let probe = offload::db::connect(&app.db.url).await.unwrap();
    let quiet_from: chrono::DateTime<chrono::Utc> =
        probe.query_one("SELECT now()", &[]).await.unwrap().get(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        busy_since(&probe, &app.db.name, quiet_from).await,
        0,
        "no connection ran a statement while 200 requests waited on an unchanged job"
    );

    // The job moves: every waiting request answers with the new state.
    let changed = Instant::now();
    app.db
        .pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE jobs SET progress = '{\"processed\": 1}', updated_at = now() WHERE id = $1",
            &[&id.parse::<uuid::Uuid>().unwrap()],
        )
        .await
        .unwrap();
    for t in waiting {
        let resp = t.await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let job: Value = resp.json().await.unwrap();
        assert_ne!(job["updated_at"], created["updated_at"], "the new state");
    }
    assert!(
        changed.elapsed() < Duration::from_secs(5),
        "answered {:?} after the change",
        changed.elapsed()
    );
    // The requests took their watches with them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        app.db.scalar_i64("SELECT count(*) FROM job_watches").await,
        0
    );
}

#[tokio::test]
async fn a_workspaces_waiting_requests_are_capped_and_a_timeout_answers_the_same_job() {
    let app = app(3).await;
    let (created, id, waiting) = wait_on_a_new_job(&app, 3, 2).await;
    let url = format!("{}/{id}?wait=2", app.jobs_url());
    tokio::time::sleep(Duration::from_millis(700)).await;
    let fourth = app
        .client
        .get(&url)
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert_eq!(fourth.headers()["retry-after"], "1");
    expect_problem(fourth, StatusCode::TOO_MANY_REQUESTS).await;
    for t in waiting {
        let resp = t.await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let job: Value = resp.json().await.unwrap();
        assert_eq!(job["status"], created["status"], "unchanged after the wait");
    }
    // Places are given back: a new wait is taken.
    let again = app
        .client
        .get(format!("{}/{id}?wait=1", app.jobs_url()))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
}
