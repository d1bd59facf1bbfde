//! Database outage: a private PostgreSQL server (its own data directory and
//! port, so other tests are untouched) is stopped while jobs are created and
//! processed through `offload dev`, then started again. While it is down the
//! API answers 503 with a problem body; afterwards everything completes and
//! nothing accepted is lost.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// Runs a PostgreSQL tool as the `postgres` user when we are root (initdb
/// refuses to run as root).
fn pg(tool: &str, args: &[&str]) -> std::process::Output {
    let path = format!("{BIN_DIR}/{tool}");
    assert!(
        std::path::Path::new(&path).exists(),
        "this test needs PostgreSQL 15's server binaries in {BIN_DIR} (Debian: apt-get install postgresql-15)"
    );
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let out = if is_root {
        Command::new("runuser")
            .args(["-u", "postgres", "--", &path])
            .args(args)
            .output()
    } else {
        Command::new(&path).args(args).output()
    }
    .expect("run a PostgreSQL tool");
    out
}

struct PrivateServer {
    dir: PathBuf,
    port: u16,
}

impl PrivateServer {
    fn new() -> PrivateServer {
        let dir =
            std::env::temp_dir().join(format!("offload-outage-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("chown")
            .args(["postgres:postgres", dir.to_str().unwrap()])
            .status();
        let data = dir.join("data");
        let out = pg(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "--auth=trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let s = PrivateServer { dir, port };
        s.start();
        s
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/offload", self.port)
    }

    fn start(&self) {
        let data = self.dir.join("data");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        let out = pg(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stop(&self) {
        let data = self.dir.join("data");
        let out = pg(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.stop_quietly();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl PrivateServer {
    fn stop_quietly(&self) {
        let data = self.dir.join("data");
        let _ = pg(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
    }
}

struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_database_outage_answers_503_and_loses_nothing() {
    let server = PrivateServer::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_offload"))
        .arg("dev")
        .env("DATABASE_URL", server.url())
        .env("OFFLOAD_BIND", format!("127.0.0.1:{port}"))
        .env("OFFLOAD_LEASE_SECS", "5")
        .env("OFFLOAD_SCHEDULER_INTERVAL_SECS", "1")
        .env_remove("OFFLOAD_QUEUE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut vars = std::collections::HashMap::new();
    for line in lines.by_ref() {
        if let Some((k, v)) = line
            .unwrap()
            .strip_prefix("export ")
            .and_then(|r| r.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
        {
            vars.insert(k, v);
        }
        if vars.len() == 3 {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let _dev = Dev(child);
    let client = reqwest::Client::new();
    let jobs_url = format!(
        "{}/api/workspaces/{}/jobs",
        vars["OFFLOAD_URL"], vars["OFFLOAD_WORKSPACE"]
    );
    let token = vars["OFFLOAD_TOKEN"].clone();
    let create = |body: Value| {
        client
            .post(&jobs_url)
            .bearer_auth(&token)
            .json(&body)
            .send()
    };

    // The server binds right after printing its exports.
    for _ in 0..100 {
        if client
            .get(format!("{}/health", vars["OFFLOAD_URL"]))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut accepted: Vec<String> = Vec::new();
    for _ in 0..10 {
        let r = create(json!({"type": "sleep", "payload": {"ms": 300, "steps": 3}}))
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        accepted.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.stop();

    // Down: creates are refused plainly, nothing is half-accepted.
    for _ in 0..3 {
        let r = create(json!({"type": "noop"})).await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        assert_eq!(
            r.headers()["retry-after"],
            "2",
            "a client knows when to try again"
        );
    }
    let health = client
        .get(format!("{}/health", vars["OFFLOAD_URL"]))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 503);
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.start();

    // Up again: new work is accepted and everything accepted completes.
    for _ in 0..5 {
        let mut r = create(json!({"type": "noop"})).await.unwrap();
        for _ in 0..50 {
            if r.status() == 202 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            r = create(json!({"type": "noop"})).await.unwrap();
        }
        assert_eq!(r.status(), 202);
        accepted.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    for id in &accepted {
        loop {
            let j: Value = client
                .get(format!("{jobs_url}/{id}"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap_or(Value::Null);
            if j["status"] == "completed" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "job {id} never completed: {j}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
