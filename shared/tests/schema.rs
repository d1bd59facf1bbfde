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
