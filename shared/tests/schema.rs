//! The rule that makes a rollback safe: a binary runs against the schema it
//! was built for or any newer one (migrations are additive first; a removal
//! ships in a later release than the code that stopped using it).

use offload::db;
use offload::testing::{new_job, TestDb};
use offload::workspace::Tier;
use serde_json::json;

#[tokio::test]
async fn a_binary_runs_against_a_schema_one_release_ahead() {
    let db = TestDb::new().await;
    // The next release's additive migration, applied by that release.
    let next = db::required_version() as i32 + 1;
    db.pool
        .get()
        .await
        .unwrap()
        .execute("ALTER TABLE jobs ADD COLUMN next_release_column text", &[])
        .await
        .unwrap();
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
             VALUES ($1, 'next_release_column', \
             to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), '1')",
            &[&next],
        )
        .await
        .unwrap();

    // This (older) binary starts, its migrate changes nothing, and its
    // statements still work on the wider table.
    db::check_schema(&db.pool)
        .await
        .expect("a newer schema is accepted");
    assert!(db::migrate(&db.url).await.unwrap().is_empty());
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let made = db.insert(&[new_job(ws, "noop", json!({"n": 1}))]).await;
    let read = db.store.get(ws, made[0].id).await.unwrap().unwrap();
    assert_eq!(read.payload, json!({"n": 1}));
}

#[tokio::test]
async fn a_binary_refuses_a_schema_behind_it_and_says_how_to_fix_it() {
    let db = TestDb::new().await;
    db.pool
        .get()
        .await
        .unwrap()
        .execute(
            "DELETE FROM refinery_schema_history WHERE version = $1",
            &[&(db::required_version() as i32)],
        )
        .await
        .unwrap();
    let e = db::check_schema(&db.pool).await.unwrap_err().to_string();
    assert!(e.contains("run `offload migrate`"), "{e}");
}

#[tokio::test]
async fn every_pooled_connection_stops_a_statement_at_the_processs_limit() {
    let db = TestDb::new().await;
    // What the api function does with its configuration: the short limit.
    let config = offload::config::Config {
        database_url: db.url.clone(),
        statement_timeout: offload::config::Config::defaults().api_statement_timeout,
        ..offload::config::Config::defaults()
    };
    let services =
        offload::startup::Services::connect(config, offload::handlers::Registry::builtin())
            .await
            .unwrap();
    let conn = services.store.pool().get().await.unwrap();
    let shown: String = conn
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, "5s");

    let short = db::pool_with(
        &db.url,
        db::PoolOptions {
            statement_timeout: Some(std::time::Duration::from_millis(200)),
            ..db::PoolOptions::new(1)
        },
        None,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let err = short
        .get()
        .await
        .unwrap()
        .query_one("SELECT pg_sleep(5)", &[])
        .await
        .map_err(db::DbError::from)
        .unwrap_err();
    assert!(db::is_statement_timeout(&err), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    // The connection is still good for the next statement.
    let one: i32 = short
        .get()
        .await
        .unwrap()
        .query_one("SELECT 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(one, 1);
}
