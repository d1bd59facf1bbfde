//! The api binary started the way Lambda starts it (against a stand-in for
//! the Runtime API) and invoked with the API Gateway events of `events/`.

use std::time::Duration;

use offload::ids::{JobId, UserId, WorkspaceId};
use offload::testing::{new_job, Invoked, LambdaRuntime, TestDb, TEST_SECRET};
use offload::workspace::{self, Role, Tier};
use serde_json::{json, Value};

const WS: &str = "0ff10ad0-0000-4000-8000-00000000d3e0";
const USER: &str = "0ff10ad0-0000-4000-8000-0000000000a1";
const JOB: &str = "0ff10ad0-0000-4000-8000-00000000e001";

fn event(file: &str) -> Value {
    let raw = std::fs::read_to_string(format!(
        "{}/../../events/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    serde_json::from_str(&raw).unwrap()
}

#[tokio::test]
async fn the_built_binary_answers_every_api_event() {
    let db = TestDb::new().await;
    let conn = db.pool.get().await.unwrap();
    let ws: WorkspaceId = WS.parse().unwrap();
    workspace::ensure_workspace(&**conn, ws, "Sample", Tier::Standard)
        .await
        .unwrap();
    workspace::add_member(&**conn, ws, USER.parse::<UserId>().unwrap(), Role::Member)
        .await
        .unwrap();
    let mut nj = new_job(ws, "noop", json!({}));
    nj.id = JOB.parse::<JobId>().unwrap();
    db.insert(&[nj]).await;

    let mut rt = LambdaRuntime::serve().await;
    rt.start(
        env!("CARGO_BIN_EXE_api"),
        "offload-api",
        &[
            ("DATABASE_URL", db.url.clone()),
            ("OFFLOAD_JWT_SECRET", TEST_SECRET.into()),
        ],
    );
    let Invoked::Response(created) = rt
        .invoke(event("api-create-job.json"), Duration::from_secs(30))
        .await
    else {
        panic!("the create event failed");
    };
    assert_eq!(created["statusCode"], 202, "{created}");
    let body: Value = serde_json::from_str(created["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["type"], "sleep");
    assert!(rt.init_duration().is_some());

    let Invoked::Response(got) = rt
        .invoke(event("api-get-job.json"), Duration::from_secs(30))
        .await
    else {
        panic!("the get event failed");
    };
    assert_eq!(got["statusCode"], 200, "{got}");
    let body: Value = serde_json::from_str(got["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["id"], JOB);
}
