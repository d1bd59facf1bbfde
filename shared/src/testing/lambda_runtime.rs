//! A stand-in for the AWS Lambda Runtime API, so a function's binary is
//! started the way Lambda starts it (`AWS_LAMBDA_RUNTIME_API` and the other
//! variables of its environment) and handed events one at a time; the tests
//! read what it answered. The stand-in for `sam local invoke`, which needs
//! Docker.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde_json::Value;
use tokio::sync::Notify;

/// How an invocation ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Invoked {
    /// What the handler returned.
    Response(Value),
    /// What the runtime reported as the handler's error.
    Error(Value),
}

#[derive(Default)]
struct Inner {
    pending: Mutex<VecDeque<(String, Value)>>,
    event_ready: Notify,
    answers: Mutex<HashMap<String, Invoked>>,
    answered: Notify,
    init_error: Mutex<Option<Value>>,
    first_poll: Mutex<Option<Instant>>,
}

/// The Runtime API on a loopback port, and the function process using it.
pub struct LambdaRuntime {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    child: Option<Child>,
    started: Option<Instant>,
    /// Where the function's stdout and stderr go (see [`Self::capture_output`]).
    output: Option<std::path::PathBuf>,
}

impl Drop for LambdaRuntime {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn next(State(inner): State<Arc<Inner>>) -> (HeaderMap, String) {
    inner
        .first_poll
        .lock()
        .unwrap()
        .get_or_insert_with(Instant::now);
    loop {
        let waiting = inner.event_ready.notified();
        if let Some((id, event)) = inner.pending.lock().unwrap().pop_front() {
            let mut h = HeaderMap::new();
            let deadline = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                + 60_000;
            h.insert("lambda-runtime-aws-request-id", id.parse().unwrap());
            h.insert(
                "lambda-runtime-deadline-ms",
                deadline.to_string().parse().unwrap(),
            );
            h.insert(
                "lambda-runtime-invoked-function-arn",
                "arn:aws:lambda:eu-west-1:123456789012:function:offload-test"
                    .parse()
                    .unwrap(),
            );
            h.insert(
                "lambda-runtime-trace-id",
                "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1"
                    .parse()
                    .unwrap(),
            );
            h.insert("content-type", "application/json".parse().unwrap());
            return (h, event.to_string());
        }
        waiting.await;
    }
}

fn answer(inner: &Inner, id: String, a: Invoked) -> StatusCode {
    inner.answers.lock().unwrap().insert(id, a);
    inner.answered.notify_waiters();
    StatusCode::ACCEPTED
}

async fn response(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> StatusCode {
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
    answer(&inner, id, Invoked::Response(v))
}

async fn error(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> StatusCode {
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    answer(&inner, id, Invoked::Error(v))
}

async fn init_error(State(inner): State<Arc<Inner>>, body: axum::body::Bytes) -> StatusCode {
    *inner.init_error.lock().unwrap() = Some(serde_json::from_slice(&body).unwrap_or(Value::Null));
    inner.answered.notify_waiters();
    StatusCode::ACCEPTED
}

impl LambdaRuntime {
    /// Serves the Runtime API on a free loopback port.
    pub async fn serve() -> LambdaRuntime {
        let inner = Arc::new(Inner::default());
        let app = axum::Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        LambdaRuntime {
            addr,
            inner,
            child: None,
            started: None,
            output: None,
        }
    }

    /// Sends what the next started function prints (stdout and stderr, as
    /// CloudWatch Logs receives them in Lambda) to the file at `path`.
    pub fn capture_output(&mut self, path: &std::path::Path) {
        self.output = Some(path.to_path_buf());
    }

    /// Starts `binary` as Lambda would for function `name`, with `env` on
    /// top of the variables Lambda sets.
    pub fn start(&mut self, binary: &str, name: &str, env: &[(&str, String)]) {
        let mut cmd = Command::new(binary);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AWS_LAMBDA_RUNTIME_API", self.addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", name)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}"))
            .env(
                "AWS_LAMBDA_LOG_STREAM_NAME",
                "2026/12/01/[$LATEST]0123456789",
            )
            .env("AWS_REGION", "eu-west-1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(path) = &self.output {
            let file = std::fs::File::create(path)
                .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
            let err = file
                .try_clone()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            cmd.stdout(file).stderr(err);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.started = Some(Instant::now());
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("start {binary}: {e}")),
        );
    }

    /// Time from the process's start to its first request for an event
    /// (Lambda's init phase), once it has asked.
    pub fn init_duration(&self) -> Option<Duration> {
        let first = (*self.inner.first_poll.lock().unwrap())?;
        Some(first - self.started?)
    }

    /// Hands `event` to the function and waits for its answer (or an init
    /// error, or the process exiting), at most `timeout`.
    pub async fn invoke(&mut self, event: Value, timeout: Duration) -> Invoked {
        let id = uuid::Uuid::new_v4().to_string();
        self.inner
            .pending
            .lock()
            .unwrap()
            .push_back((id.clone(), event));
        self.inner.event_ready.notify_waiters();
        let end = Instant::now() + timeout;
        loop {
            let answered = self.inner.answered.notified();
            if let Some(a) = self.inner.answers.lock().unwrap().remove(&id) {
                return a;
            }
            if let Some(e) = self.inner.init_error.lock().unwrap().clone() {
                panic!("the function failed to start: {e}");
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("the function exited ({status}) before answering");
            }
            assert!(Instant::now() < end, "no answer within {timeout:?}");
            let _ = tokio::time::timeout(Duration::from_millis(100), answered).await;
        }
    }
}
