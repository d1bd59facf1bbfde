//! The realtime channel (`/api/realtime`, WebSocket): subscribers get a
//! job's state at once and every change after, in order; idle subscribers
//! cost the database nothing; tokens open only what they name.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use offload::testing::TestApp;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Room for a thousand sockets on each side, whatever the shell's default.
fn raise_open_files() {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(65_536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn connect(app: &TestApp, token: &str) -> Socket {
    let url = format!(
        "{}/api/realtime?token={token}",
        app.base.replace("http://", "ws://")
    );
    tokio_tungstenite::connect_async(url)
        .await
        .expect("connect")
        .0
}

async fn send(ws: &mut Socket, msg: Value) {
    ws.send(Message::Text(msg.to_string().into()))
        .await
        .unwrap();
}

/// The next message, as JSON; fails the test after 20 s.
async fn next(ws: &mut Socket) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a message within 20 s")
            .expect("the connection open")
            .expect("a message");
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// Nothing arrives for `wait`.
async fn silent(ws: &mut Socket, wait: Duration) {
    if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(wait, ws.next()).await {
        panic!("expected nothing, got {t}");
    }
}

async fn browser_token(app: &TestApp, body: Value) -> String {
    let resp = app
        .req("POST", "/browser-tokens")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::CREATED);
    let b: Value = resp.json().await.unwrap();
    b["token"].as_str().unwrap().to_string()
}

async fn create(app: &TestApp, body: Value) -> String {
    let resp = app.create_job(body).await;
    assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED);
    let j: Value = resp.json().await.unwrap();
    j["id"].as_str().unwrap().to_string()
}

/// A progress write as the worker makes it.
async fn progress(app: &TestApp, job: &str, processed: i64) {
    let conn = app.db.pool.get().await.unwrap();
    let p = serde_json::to_value(offload::job::Progress::of(processed as u64, 20)).unwrap();
    conn.execute(
        "UPDATE jobs SET progress = $2, updated_at = clock_timestamp() WHERE id = $1::text::uuid",
        &[&job, &p],
    )
    .await
    .unwrap();
}

/// Statements the database has run for this test's database so far
/// (pg_stat_statements, which the scripts preload), leaving out this count.
async fn statements(app: &TestApp) -> i64 {
    let conn = app.db.pool.get().await.unwrap();
    conn.query_one(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND query NOT LIKE '%pg_stat_statements%'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// A new connection following `job`'s stream: the chunk `{"token": word}`
/// appended after it subscribed, as it receives it, and the connection
/// (kept open by the caller where the test needs the feed to stay).
async fn follow_stream(app: &TestApp, job: &str, word: &str) -> (Value, Socket) {
    let mut ws = connect(app, &app.token).await;
    send(
        &mut ws,
        json!({"action": "subscribe", "workspace": app.workspace, "jobs": [job], "stream": true}),
    )
    .await;
    assert_eq!(next(&mut ws).await["type"], "job");
    // The feed's first read is behind it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let data = json!({ "token": word });
    app.db
        .pool
        .get()
        .await
        .unwrap()
        .execute(
            "WITH ins AS (INSERT INTO job_stream (job_id, workspace_id, data) \
               VALUES ($1::text::uuid, $2, $3) RETURNING id) \
             SELECT pg_notify('offload_jobs', $1) FROM ins",
            &[&job, &app.workspace.0, &data],
        )
        .await
        .unwrap();
    loop {
        let m = next(&mut ws).await;
        if m["type"] == "chunk" {
            return (m, ws);
        }
    }
}

#[tokio::test]
async fn a_thousand_subscribers_get_every_change_in_order_and_cost_nothing_while_idle() {
    raise_open_files();
    let app = TestApp::spawn().await;
    {
        let conn = app.db.pool.get().await.unwrap();
        conn.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await
            .expect("pg_stat_statements (scripts/lib.sh preloads it)");
        conn.query_one("SELECT count(*) FROM pg_stat_statements", &[])
            .await
            .expect("pg_stat_statements loaded: shared_preload_libraries (scripts/lib.sh sets it)");
    }
    let job = create(&app, json!({"type": "sleep", "payload": {"ms": 60000}})).await;
    let token = browser_token(&app, json!({"jobs": [job]})).await;
    let subscribe = json!({"action": "subscribe", "workspace": app.workspace, "jobs": [job]});
    let mut clients = Vec::new();
    for i in 0..1000 {
        // Most with the page's browser token, some with the user's own.
        let t = if i % 10 == 0 {
            app.token.clone()
        } else {
            token.clone()
        };
        let mut ws = connect(&app, &t).await;
        send(&mut ws, subscribe.clone()).await;
        clients.push(ws);
    }
    for ws in clients.iter_mut() {
        let first = next(ws).await;
        assert_eq!(first["type"], "job", "{first}");
        assert_eq!(first["job"]["id"], job.as_str());
        assert_eq!(first["job"]["status"], "queued");
    }
    // The subscriptions' re-read a moment after, then quiet.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = statements(&app).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = statements(&app).await;
    assert_eq!(
        after - before,
        0,
        "1 000 idle subscribers made the database run statements"
    );

    // Every change, in order: the writer goes on once the first client has
    // the change (a person's pace, not a burst).
    let (sentinel, rest) = clients.split_first_mut().unwrap();
    let processed = |m: &Value| m["job"]["progress"]["processed"].as_i64();
    for k in 1..=20 {
        progress(&app, &job, k).await;
        loop {
            let m = next(sentinel).await;
            if processed(&m) == Some(k) {
                break;
            }
            assert!(processed(&m) < Some(k), "out of order: {m}");
        }
    }
    for ws in rest.iter_mut() {
        let mut seen = Vec::new();
        while seen.last() != Some(&20) {
            let m = next(ws).await;
            assert_eq!(m["type"], "job", "{m}");
            if let Some(p) = processed(&m) {
                if seen.last() != Some(&p) {
                    seen.push(p);
                }
            }
        }
        assert_eq!(seen, (1..=20).collect::<Vec<_>>());
    }

    // A client that reconnects gets the state it missed first: the final one.
    let mut ws = clients.pop().unwrap();
    ws.close(None).await.unwrap();
    drop(clients);
    app.db
        .pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE jobs SET status = 'cancelled', finished_at = now(), updated_at = now() \
             WHERE id = $1::text::uuid",
            &[&job],
        )
        .await
        .unwrap();
    let mut again = connect(&app, &token).await;
    send(&mut again, subscribe).await;
    let first = next(&mut again).await;
    assert_eq!(first["job"]["status"], "cancelled", "{first}");
}

#[tokio::test]
async fn tokens_open_only_what_they_name_and_tags_and_streams_are_followed() {
    let app = TestApp::spawn().await;
    let a = create(&app, json!({"type": "sleep", "payload": {"ms": 60000}})).await;
    let b = create(
        &app,
        json!({"type": "sleep", "payload": {"ms": 60000}, "tags": ["import:9"]}),
    )
    .await;
    let only_a = browser_token(&app, json!({"jobs": [a]})).await;
    let mut ws = connect(&app, &only_a).await;
    send(
        &mut ws,
        json!({"action": "subscribe", "workspace": app.workspace, "jobs": [b]}),
    )
    .await;
    let m = next(&mut ws).await;
    assert_eq!(m["type"], "error");
    assert!(m["detail"].as_str().unwrap().contains(&b), "{m}");
    send(
        &mut ws,
        json!({"action": "subscribe", "workspace": app.workspace, "tags": ["import:9"]}),
    )
    .await;
    assert_eq!(next(&mut ws).await["type"], "error");
    send(
        &mut ws,
        json!({"action": "subscribe", "workspace": offload::ids::WorkspaceId::new(), "jobs": [a]}),
    )
    .await;
    assert_eq!(next(&mut ws).await["type"], "error");
    ws.send(Message::Text("{not json".into())).await.unwrap();
    let m = next(&mut ws).await;
    assert!(m["detail"].as_str().unwrap().contains("subscribe"), "{m}");
    // Changes of a job it does not follow never reach it.
    progress(&app, &b, 3).await;
    silent(&mut ws, Duration::from_millis(700)).await;
    // A subscribe naming one job it opens and one it does not: the first
    // is followed, the second named in an error.
    send(
        &mut ws,
        json!({"action": "subscribe", "workspace": app.workspace, "jobs": [a, b]}),
    )
    .await;
    let (mut got_a, mut refused) = (false, false);
    while !(got_a && refused) {
        let m = next(&mut ws).await;
        match m["type"].as_str() {
            Some("job") => {
                assert_eq!(m["job"]["id"], a.as_str());
                got_a = true;
            }
            Some("error") => {
                let d = m["detail"].as_str().unwrap();
                assert!(d.contains(&b) && !d.contains(&a), "{d}");
                refused = true;
            }
            _ => panic!("{m}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_millis(100), ws.next()).await {}
    progress(&app, &a, 2).await;
    assert_eq!(next(&mut ws).await["job"]["progress"]["processed"], 2);

    // By tag: the tagged job at once, its changes, nothing of the other.
    let by_tag = browser_token(&app, json!({"tags": ["import:9"]})).await;
    let mut tagged = connect(&app, &by_tag).await;
    send(
        &mut tagged,
        json!({"action": "subscribe", "workspace": app.workspace, "tags": ["import:9"]}),
    )
    .await;
    let m = next(&mut tagged).await;
    assert_eq!(m["job"]["id"], b.as_str());
    progress(&app, &b, 4).await;
    let m = next(&mut tagged).await;
    assert_eq!(m["job"]["progress"]["processed"], 4);
    progress(&app, &a, 4).await;
    silent(&mut tagged, Duration::from_millis(700)).await;
    // Unsubscribed: quiet.
    send(
        &mut tagged,
        json!({"action": "unsubscribe", "workspace": app.workspace, "tags": ["import:9"]}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    progress(&app, &b, 5).await;
    silent(&mut tagged, Duration::from_millis(700)).await;

    // Stream chunks, for a subscription that asks.
    // The first follower stays connected: its feed ends with the job below.
    let (chunk, _first) = follow_stream(&app, &a, "Hello").await;
    assert_eq!(chunk["job_id"], a.as_str());
    assert_eq!(chunk["data"]["token"], "Hello");
    assert!(chunk["cursor"].as_str().unwrap().parse::<i64>().unwrap() > 0);

    // The job ends (its feed with it), is retried and streams again: a
    // subscriber asking now gets the new chunks.
    let set_status = |status: &'static str| {
        let (pool, a) = (app.db.pool.clone(), a.clone());
        async move {
            pool.get()
                .await
                .unwrap()
                .execute(
                    "UPDATE jobs SET status = $2, updated_at = clock_timestamp() WHERE id = $1::text::uuid",
                    &[&a, &status],
                )
                .await
                .unwrap();
        }
    };
    set_status("cancelled").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    set_status("running").await;
    let (chunk, _) = follow_stream(&app, &a, "again").await;
    assert_eq!(chunk["data"]["token"], "again");

    // No token, a made-up one, a platform key: refused before the upgrade.
    let url = format!("{}/api/realtime", app.base);
    let resp = app.client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
    let resp = app
        .client
        .get(format!("{url}?token=ofb_nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::UNAUTHORIZED);
    let bad = format!(
        "{}/api/realtime?token=ofb_nope",
        app.base.replace("http://", "ws://")
    );
    assert!(tokio_tungstenite::connect_async(bad).await.is_err());
}

#[tokio::test]
async fn a_connection_whose_token_no_longer_opens_its_jobs_is_closed_within_a_round() {
    let db = offload::testing::TestDb::new().await;
    let queue: std::sync::Arc<dyn offload::queue::Queue> = std::sync::Arc::new(db.pg_queue(5));
    let mut hub = None;
    let app = TestApp::spawn_state(db, queue, offload::workspace::Tier::Enterprise, |s| {
        hub = Some(s.realtime.clone())
    })
    .await;
    let hub = hub.unwrap();
    let job = create(&app, json!({"type": "sleep", "payload": {"ms": 60000}})).await;
    let user = offload::ids::UserId::new();
    {
        let conn = app.db.pool.get().await.unwrap();
        offload::workspace::add_member(
            &**conn,
            app.workspace,
            user,
            offload::workspace::Role::Member,
        )
        .await
        .unwrap();
    }
    let subscribe = json!({"action": "subscribe", "workspace": app.workspace, "jobs": [job]});
    let mut member = connect(&app, &offload::testing::token(user)).await;
    send(&mut member, subscribe.clone()).await;
    assert_eq!(next(&mut member).await["type"], "job");
    let browser = browser_token(&app, json!({"jobs": [job]})).await;
    let mut page = connect(&app, &browser).await;
    send(&mut page, subscribe.clone()).await;
    assert_eq!(next(&mut page).await["type"], "job");

    // Nothing changed: both stay.
    hub.revalidate().await.unwrap();
    silent(&mut member, Duration::from_millis(300)).await;
    silent(&mut page, Duration::from_millis(300)).await;

    // The member is removed: the next round closes their connection, and a
    // new subscribe is refused at once.
    app.db
        .pool
        .get()
        .await
        .unwrap()
        .execute(
            "DELETE FROM workspace_members WHERE user_id = $1",
            &[&user.0],
        )
        .await
        .unwrap();
    let mut again = connect(&app, &offload::testing::token(user)).await;
    send(&mut again, subscribe.clone()).await;
    assert_eq!(next(&mut again).await["type"], "error");
    hub.revalidate().await.unwrap();
    let m = next(&mut member).await;
    assert_eq!(m["type"], "error", "{m}");
    assert!(
        m["detail"].as_str().unwrap().contains("no longer opens"),
        "{m}"
    );
    silent(&mut page, Duration::from_millis(300)).await;

    // The workspace is being deleted: the page's browser token goes too.
    app.db
        .pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE workspaces SET deleting_at = now() WHERE id = $1",
            &[&app.workspace.0],
        )
        .await
        .unwrap();
    hub.revalidate().await.unwrap();
    let m = next(&mut page).await;
    assert!(
        m["detail"].as_str().unwrap().contains("no longer opens"),
        "{m}"
    );
    let resp = app
        .client
        .get(format!("{}/{job}", app.jobs_url()))
        .bearer_auth(&browser)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        reqwest::StatusCode::NOT_FOUND,
        "nothing of a workspace being deleted"
    );
}
