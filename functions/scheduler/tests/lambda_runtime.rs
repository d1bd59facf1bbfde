//! The scheduler binary started the way Lambda starts it (against a
//! stand-in for the Runtime API) and invoked with the EventBridge event of
//! `events/`.

use std::time::Duration;

use offload::testing::{Invoked, LambdaRuntime, TestDb};
use serde_json::{json, Value};

#[tokio::test]
async fn the_built_binary_runs_every_duty_on_the_scheduled_event() {
    let db = TestDb::new().await;
    let raw = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/scheduled.json"
    ))
    .unwrap();
    let event: Value = serde_json::from_str(&raw).unwrap();
    let mut rt = LambdaRuntime::serve().await;
    rt.start(
        env!("CARGO_BIN_EXE_scheduler"),
        "offload-scheduler",
        &[("DATABASE_URL", db.url.clone())],
    );
    let Invoked::Response(report) = rt.invoke(event, Duration::from_secs(30)).await else {
        panic!("the scheduled event failed");
    };
    assert_eq!(report["errors"], json!([]), "{report}");
    assert_eq!(report["rescued"], 0);
}
