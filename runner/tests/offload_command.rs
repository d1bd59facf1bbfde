//! The `offload` binary as a user runs it: `dev` end to end on both queue
//! backends, the operator commands, and configuration errors.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use offload::testing::{free_port, sqs_endpoint, TestDb};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_offload");

/// `offload dev` running in the background; killed when dropped.
struct Dev {
    child: Child,
    url: String,
    workspace: String,
    token: String,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_dev(database_url: &str, extra_env: &[(&str, String)]) -> Dev {
    let mut cmd = Command::new(BIN);
    cmd.arg("dev")
        .env("DATABASE_URL", database_url)
        .env("OFFLOAD_BIND", format!("127.0.0.1:{}", free_port()))
        .env("OFFLOAD_SCHEDULER_INTERVAL_SECS", "1")
        .env_remove("OFFLOAD_QUEUE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start offload dev");
    // Its log, kept for the failure message.
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let mut l = sink.lock().unwrap();
            if l.len() < 20_000 {
                l.push_str(&line);
                l.push('\n');
            }
        }
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut vars = std::collections::HashMap::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("export ") {
            let (k, v) = rest.split_once('=').unwrap();
            vars.insert(k.to_string(), v.to_string());
        }
        if vars.len() == 3 {
            break;
        }
    }
    // Keep reading, so the server never writes to a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    if vars.len() < 3 {
        let _ = child.wait();
        panic!(
            "offload dev printed {vars:?}; its log:\n{}",
            log.lock().unwrap()
        );
    }
    Dev {
        child,
        url: vars["OFFLOAD_URL"].clone(),
        workspace: vars["OFFLOAD_WORKSPACE"].clone(),
        token: vars["OFFLOAD_TOKEN"].clone(),
    }
}

/// The slice a newcomer tries first: create a noop and a sleep job with the
/// printed token, watch the sleep job's progress move, see both completed.
async fn create_watch_complete(dev: &Dev) {
    let client = reqwest::Client::new();
    let jobs = format!("{}/api/workspaces/{}/jobs", dev.url, dev.workspace);
    // The server may still be binding.
    for _ in 0..100 {
        if client
            .get(format!("{}/health", dev.url))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let create = |body: Value| {
        client
            .post(&jobs)
            .bearer_auth(&dev.token)
            .json(&body)
            .send()
    };
    let noop: Value = create(json!({"type": "noop"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sleep = create(json!({"type": "sleep", "payload": {"ms": 2000, "steps": 8}}))
        .await
        .unwrap();
    assert_eq!(sleep.status(), 202);
    let sleep: Value = sleep.json().await.unwrap();

    let get = |id: &Value| {
        client
            .get(format!("{jobs}/{}", id.as_str().unwrap()))
            .bearer_auth(&dev.token)
            .send()
    };
    let mut seen_progress = std::collections::BTreeSet::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s: Value = get(&sleep["id"]).await.unwrap().json().await.unwrap();
        if let Some(p) = s["progress"]["processed"].as_u64() {
            seen_progress.insert(p);
        }
        if s["status"] == "completed" {
            break;
        }
        assert!(tokio::time::Instant::now() < end, "sleep job stuck: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen_progress.iter().filter(|p| (1..8).contains(*p)).count() >= 2,
        "progress did not move visibly: {seen_progress:?}"
    );
    let n: Value = get(&noop["id"]).await.unwrap().json().await.unwrap();
    assert_eq!(n["status"], "completed");
    let s: Value = get(&sleep["id"]).await.unwrap().json().await.unwrap();
    assert_eq!(s["result"], json!({"slept_ms": 2000, "steps": 8}));
    assert_eq!(s["progress"]["percentage"], 100.0);
}

#[tokio::test]
async fn dev_runs_jobs_end_to_end_on_the_postgres_queue() {
    let db = TestDb::new().await;
    let dev = start_dev(&db.url, &[]);
    create_watch_complete(&dev).await;
}

#[tokio::test]
async fn dev_runs_jobs_end_to_end_over_tls_with_every_connection_encrypted() {
    // A server that refuses clear text; DATABASE_URL checks its certificate
    // and name, with the CA given as an operator would (OFFLOAD_DB_CA_FILE).
    let tls = offload::testing::TlsServer::get().await;
    let name = format!("dev_tls_{}", uuid::Uuid::new_v4().simple());
    let url = tls.url("localhost", &name, "sslmode=verify-full");
    let dev = start_dev(
        &url,
        &[("OFFLOAD_DB_CA_FILE", tls.ca_file.display().to_string())],
    );
    // The API (creates and reads), the worker (runs), the LISTEN connection
    // (wakes it) and the scheduler (every second) all reach the database.
    create_watch_complete(&dev).await;
    let admin = offload::db::connect(&format!(
        "{}&sslrootcert={}",
        tls.url("localhost", &name, "sslmode=verify-full"),
        tls.ca_file.display()
    ))
    .await
    .unwrap();
    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl), \
               count(*) FILTER (WHERE a.query = 'LISTEN offload_queue') \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let (encrypted, clear, listening): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(clear, 0, "a connection of offload dev in clear text");
    assert_eq!(listening, 1, "the LISTEN connection");
    assert!(encrypted >= 2, "{encrypted} encrypted connections");
    let runs: i64 = admin
        .query_one("SELECT count(*) FROM jobs WHERE status = 'completed'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(runs, 2);
}

#[tokio::test]
async fn dev_runs_jobs_end_to_end_on_sqs() {
    let db = TestDb::new().await;
    let prefix = format!("dev{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let dev = start_dev(
        &db.url,
        &[
            ("OFFLOAD_QUEUE", "sqs".into()),
            ("OFFLOAD_SQS_ENDPOINT", sqs_endpoint()),
            ("OFFLOAD_SQS_PREFIX", prefix),
        ],
    );
    create_watch_complete(&dev).await;
}

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test]
async fn migrate_workspace_and_token_print_what_a_script_needs() {
    let db = TestDb::new().await;
    let env = [("DATABASE_URL", db.url.as_str())];
    let (code, out, _) = run(&["migrate"], &env);
    assert_eq!(code, 0);
    assert!(out.starts_with("schema is up to date"), "{out}");

    let owner = uuid::Uuid::new_v4().to_string();
    let (code, out, err) = run(
        &[
            "workspace",
            "create",
            "--name",
            "Acme",
            "--tier",
            "free",
            "--owner",
            &owner,
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    let ws: uuid::Uuid = out.trim().parse().expect("a workspace id alone on stdout");
    let tier: String = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT tier FROM workspaces WHERE id = $1", &[&ws])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tier, "free");

    let (code, out, _) = run(
        &[
            "token",
            "--workspace",
            &ws.to_string(),
            "--user",
            &owner,
            "--ttl",
            "2h",
        ],
        &env,
    );
    assert_eq!(code, 0);
    assert_eq!(out.trim().split('.').count(), 3, "a JWT: {out}");

    let (code, _, err) = run(
        &["workspace", "create", "--name", "X", "--tier", "gold"],
        &env,
    );
    assert_ne!(code, 0);
    assert!(err.contains("gold"), "{err}");
    // Any identity provider's subject is a user.
    let (code, out, _) = run(
        &[
            "token",
            "--workspace",
            &ws.to_string(),
            "--user",
            "auth0|bob",
        ],
        &env,
    );
    assert_eq!(code, 0);
    let signed_for = offload::auth::Verifier::secret(offload::config::DEV_JWT_SECRET)
        .verify(out.trim())
        .await
        .expect("a token the API accepts");
    assert_eq!(signed_for.subject, "auth0|bob");
    let (code, _, err) = run(
        &["token", "--workspace", &ws.to_string(), "--user", ""],
        &env,
    );
    assert_ne!(code, 0);
    assert!(err.contains("--user"), "{err}");

    // A platform key, printed once, stored hashed.
    let (code, out, err) = run(&["platform-key", "create", "--name", "acme web app"], &env);
    assert_eq!(code, 0, "{err}");
    let key = out.trim();
    assert!(key.starts_with("ofp_") && key.len() > 40, "{key}");
    let stored: String = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT prefix FROM platform_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert!(key.starts_with(&stored) && stored.len() < 12, "{stored}");
    let (code, _, err) = run(&["platform-key", "create", "--name", ""], &env);
    assert_ne!(code, 0);
    assert!(err.contains("--name"), "{err}");

    // Listed (never the secret), revoked, and then refused.
    let (code, out, _) = run(&["platform-key", "list"], &env);
    assert_eq!(code, 0);
    let line = out.lines().next().expect("one key listed");
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(fields[1], "acme web app");
    assert_eq!(fields[2], stored);
    assert_eq!(fields[4], "never");
    assert!(!out.contains(key), "the secret is never shown again");
    let id = fields[0];
    let conn = db.pool.get().await.unwrap();
    assert!(offload::platform::authenticate(&conn, key)
        .await
        .unwrap()
        .is_some());
    let (code, out, _) = run(&["platform-key", "revoke", "--id", id], &env);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("revoked {id}"));
    assert!(offload::platform::authenticate(&conn, key)
        .await
        .unwrap()
        .is_none());
    let (code, _, err) = run(&["platform-key", "revoke", "--id", id], &env);
    assert_ne!(code, 0);
    assert!(err.contains("no platform key"), "{err}");
}

#[test]
fn configuration_errors_stop_with_one_line_naming_the_variable() {
    for (var, value) in [
        ("DATABASE_URL", "mysql://nope"),
        ("OFFLOAD_QUEUE", "kafka"),
        ("OFFLOAD_BIND", "everywhere"),
    ] {
        let (code, out, err) = run(&["migrate"], &[(var, value)]);
        assert_eq!(code, 2, "{var}: {err}");
        assert!(out.is_empty());
        assert!(err.contains(var), "{var}: {err}");
    }
    let (code, _, err) = run(
        &["migrate"],
        &[("DATABASE_URL", "postgres://postgres:x@127.0.0.1:1/offload")],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot reach the database at 127.0.0.1:1/offload"),
        "{err}"
    );
}

#[tokio::test]
async fn the_functions_refuse_a_database_whose_schema_is_behind() {
    let db = TestDb::new().await;
    db.pool
        .get()
        .await
        .unwrap()
        .batch_execute("DELETE FROM refinery_schema_history")
        .await
        .unwrap();
    let config =
        offload::config::Config::from_lookup(|k| (k == "DATABASE_URL").then(|| db.url.clone()))
            .unwrap();
    let err = offload::startup::Services::connect(config, offload::handlers::Registry::builtin())
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("offload migrate"), "{msg}");
    assert!(msg.starts_with("DATABASE_URL"), "{msg}");
}

#[tokio::test]
async fn the_operator_commands_start_from_secret_arns_alone() {
    let db = TestDb::new().await;
    let secrets = offload::secrets::client("us-east-1", Some(&sqs_endpoint())).await;
    let mut arns = Vec::new();
    for value in [json!({"url": db.url}), json!({"secret": "s".repeat(40)})] {
        let made = secrets
            .create_secret()
            .name(format!("offload-cli-{}", uuid::Uuid::new_v4()))
            .secret_string(value.to_string())
            .send()
            .await
            .unwrap();
        arns.push(made.arn.unwrap());
    }
    let run_from_secrets = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("OFFLOAD_JWT_SECRET")
            .env("OFFLOAD_DATABASE_SECRET_ARN", &arns[0])
            .env("OFFLOAD_JWT_SECRET_ARN", &arns[1])
            .env("OFFLOAD_SECRETS_ENDPOINT", sqs_endpoint())
            .env("AWS_REGION", "us-east-1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(run_from_secrets(&["migrate"]).starts_with("schema is up to date"));
    let ws: uuid::Uuid = run_from_secrets(&["workspace", "create", "--name", "From secrets"])
        .parse()
        .unwrap();
    let named: i64 = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM workspaces WHERE id = $1", &[&ws])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        named, 1,
        "the workspace is in the database the secret names"
    );
    let user = offload::ids::UserId::new();
    let token = run_from_secrets(&[
        "token",
        "--workspace",
        &ws.to_string(),
        "--user",
        &user.to_string(),
    ]);
    let signed_for = offload::auth::Verifier::secret(&"s".repeat(40))
        .verify(&token)
        .await
        .expect("signed with the secret from Secrets Manager");
    assert_eq!(signed_for.subject, user.to_string());
}
