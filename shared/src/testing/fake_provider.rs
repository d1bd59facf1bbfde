//! A data provider on loopback for enrichment tests and the benchmark: the
//! HTTP shape [`crate::handlers::HttpProvider`] speaks, with failures on
//! chosen calls and a count of what it answered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// Which calls fail, by their number (the first call is 1).
#[derive(Clone, Copy, Debug, Default)]
pub struct Failures {
    /// Every n-th call answers 429 with `Retry-After: 1`.
    pub too_many_every: Option<u64>,
    /// Every n-th call answers 503.
    pub unavailable_every: Option<u64>,
}

#[derive(Default)]
struct Seen {
    calls: AtomicU64,
    /// Lookup key → 200 answers given for it.
    answered: Mutex<HashMap<String, u32>>,
}

struct Fake {
    api_key: String,
    failures: Failures,
    seen: Seen,
}

/// The running provider; it stops when dropped.
pub struct FakeProvider {
    pub base_url: String,
    pub api_key: String,
    fake: Arc<Fake>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeProvider {
    pub async fn start(failures: Failures) -> FakeProvider {
        let fake = Arc::new(Fake {
            api_key: format!("key-{}", uuid::Uuid::new_v4().simple()),
            failures,
            seen: Seen::default(),
        });
        let app = Router::new()
            .route("/v1/people/enrich", post(person))
            .route("/v1/companies/enrich", post(company))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeProvider {
            base_url: format!("http://{addr}/v1"),
            api_key: fake.api_key.clone(),
            fake,
            server,
        }
    }

    /// Calls received, failed ones included.
    pub fn calls(&self) -> u64 {
        self.fake.seen.calls.load(Ordering::SeqCst)
    }

    /// 200 answers given for each lookup key.
    pub fn answered(&self) -> HashMap<String, u32> {
        self.fake.seen.answered.lock().unwrap().clone()
    }

    /// The title the provider gives the person with this e-mail.
    pub fn title_of(email: &str) -> String {
        format!("Head of {}", email.split('@').next().unwrap_or(email))
    }
}

/// The failure this call is chosen for, if any; or a 401 for a wrong key.
fn refuse(fake: &Fake, headers: &HeaderMap) -> Option<Response> {
    refuse_call(&fake.seen.calls, &fake.api_key, fake.failures, headers)
}

/// Counts a call to a fake server and answers it with the failure it is
/// chosen for, if any; or a 401 when it lacks `Bearer {key}`.
pub(super) fn refuse_call(
    calls: &AtomicU64,
    key: &str,
    failures: Failures,
    headers: &HeaderMap,
) -> Option<Response> {
    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if auth != format!("Bearer {key}") {
        return Some((StatusCode::UNAUTHORIZED, "bad api key").into_response());
    }
    if failures.too_many_every.is_some_and(|k| n.is_multiple_of(k)) {
        return Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1")],
                "slow down",
            )
                .into_response(),
        );
    }
    if failures
        .unavailable_every
        .is_some_and(|k| n.is_multiple_of(k))
    {
        return Some((StatusCode::SERVICE_UNAVAILABLE, "try later").into_response());
    }
    None
}

fn answered(fake: &Fake, key: &str) {
    *fake
        .seen
        .answered
        .lock()
        .unwrap()
        .entry(key.to_string())
        .or_default() += 1;
}

async fn person(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = refuse(&fake, &headers) {
        return r;
    }
    let Some(email) = body["email"].as_str() else {
        return (StatusCode::UNPROCESSABLE_ENTITY, "email is required").into_response();
    };
    if email.starts_with("nobody") {
        return (StatusCode::NOT_FOUND, "unknown person").into_response();
    }
    if email.starts_with("invalid") {
        return (StatusCode::BAD_REQUEST, "not an e-mail we accept").into_response();
    }
    answered(&fake, email);
    let local = email.split('@').next().unwrap_or(email);
    Json(json!({
        "person": {
            "title": FakeProvider::title_of(email),
            "phone": format!("+1 555 {:04}", local.len()),
            "linkedin": format!("https://linkedin.test/in/{local}"),
            "organization": { "name": format!("Org of {}", email.split('@').nth(1).unwrap_or("")) },
            "age": "not a field of ours",
        }
    }))
    .into_response()
}

async fn company(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = refuse(&fake, &headers) {
        return r;
    }
    let Some(domain) = body["domain"].as_str() else {
        return (StatusCode::UNPROCESSABLE_ENTITY, "domain is required").into_response();
    };
    answered(&fake, domain);
    Json(json!({
        "company": {
            "name": format!("{} Inc.", domain.split('.').next().unwrap_or(domain)),
            "industry": "Software",
            "employees": "250",
            "annual_revenue": 12500000.5,
            "tech": ["rust", "postgres"],
            "links": { "linkedin": format!("https://linkedin.test/company/{domain}") },
        }
    }))
    .into_response()
}
