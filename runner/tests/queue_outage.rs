//! Queue outage: the SQS endpoint (a moto server of this test's own) is
//! stopped while jobs are created. The API still accepts them (`pending`,
//! rows committed); once the queue is back the scheduler sends them, and
//! they all complete.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use offload::clock::Clock;
use offload::config::{SqsConfig, WorkerConfig};
use offload::queue::{create_queues, sqs_client, Queue, SqsQueue};
use offload::scheduler::{Scheduler, SchedulerConfig};
use offload::testing::{event_source, run_until_finished, TestApp, TestDb};
use serde_json::{json, Value};

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto(port: u16) -> Moto {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../.local/venv/bin/python");
    assert!(
        std::path::Path::new(python).exists(),
        "this test needs moto in .local/venv: run it through scripts/test.sh"
    );
    let moto = Moto(
        Command::new(python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto"),
    );
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return moto;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("moto did not start on port {port}");
}

#[tokio::test]
async fn jobs_created_while_the_queue_is_down_are_sent_when_it_is_back() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = SqsConfig {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        prefix: "outage".into(),
        urls: None,
        region: "us-east-1".into(),
    };
    let moto = start_moto(port);
    let queue: Arc<dyn Queue> = Arc::new(SqsQueue::connect(&cfg, 5).await.unwrap());
    let app = TestApp::spawn_with(TestDb::new().await, queue.clone()).await;

    let first: Value = app
        .create_job(json!({"type": "noop"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["status"], "queued");
    drop(moto);

    // Down: still accepted, committed as pending.
    let mut ids = Vec::new();
    for _ in 0..5 {
        let resp = app.create_job(json!({"type": "noop"})).await;
        assert_eq!(resp.status(), 202);
        let job: Value = resp.json().await.unwrap();
        assert_eq!(job["status"], "pending");
        ids.push(job["id"].as_str().unwrap().parse().unwrap());
    }
    assert_eq!(
        app.db
            .scalar_i64("SELECT count(*) FROM jobs WHERE status = 'pending'")
            .await,
        5
    );

    // Back (an emulator restarts empty: its queues are made again, as the
    // SAM template would have them).
    let _moto = start_moto(port);
    create_queues(&sqs_client(&cfg).await, &cfg.prefix, 5)
        .await
        .unwrap();
    let scheduler = Scheduler {
        store: app.db.store.clone(),
        queue: queue.clone(),
        clock: Clock::manual(chrono::Utc::now() + chrono::Duration::seconds(15)),
        config: SchedulerConfig::default(),
    };
    assert_eq!(scheduler.run_once().await.sent, 5);
    let source = event_source(
        queue.clone(),
        app.db.worker(queue.clone(), WorkerConfig::default()),
    );
    for id in ids {
        let j = run_until_finished(&app.db, &source, id, Duration::from_secs(30)).await;
        assert_eq!(j.status, offload::job::JobStatus::Completed);
    }
}
