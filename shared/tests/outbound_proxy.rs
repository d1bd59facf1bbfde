//! Pinned outbound clients (webhooks, enrichment providers, CRMs) ignore
//! `HTTP_PROXY`: a proxy would resolve the host itself, so the address that
//! was checked would not be the one called. A test binary of its own, as
//! the proxy setting is process-wide (and read once per process by the
//! HTTP client).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use offload::config::WorkerConfig;
use offload::enqueue::send_jobs;
use offload::handlers::{
    Crm, CrmConfig, CrmEntity, Entity, HttpProvider, HubSpot, Provider, ProviderConfig, Registry,
    Webhook,
};
use offload::job::JobStatus;
use offload::queue::Queue;
use offload::testing::{event_source, new_job, run_until_finished, TestDb};
use offload::workspace::Tier;
use serde_json::{json, Value};

/// A server answering every request with `{"results": [], "from": name}`
/// (a JSON object for a provider, an empty page for a CRM), counting them.
async fn answering(name: &'static str) -> (String, Arc<AtomicU64>) {
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let app = Router::new().fallback(move || {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            axum::Json(json!({"results": [], "from": name}))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, seen)
}

#[tokio::test]
async fn pinned_clients_call_the_checked_address_and_never_a_proxy() {
    let (proxy, via_proxy) = answering("proxy").await;
    let (target, direct) = answering("target").await;
    // Set before any HTTP client of this process is built: the client
    // reads the proxy settings once.
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        std::env::set_var(var, &proxy);
    }
    for var in ["NO_PROXY", "no_proxy"] {
        std::env::remove_var(var);
    }

    // A webhook job.
    let db = TestDb::new().await;
    let (ws, _) = db.workspace(Tier::Unlimited).await;
    let q: Arc<dyn Queue> = Arc::new(db.pg_queue(10));
    let job = db
        .insert(&[new_job(
            ws,
            "webhook",
            json!({"url": format!("{target}/hook")}),
        )])
        .await
        .remove(0);
    send_jobs(&db.store, &*q, &[&job], chrono::Utc::now())
        .await
        .unwrap();
    let registry = Registry::builtin().with(Webhook {
        allow_private: true,
    });
    let source = event_source(
        q.clone(),
        db.worker_with(q.clone(), WorkerConfig::default(), registry),
    );
    let j = run_until_finished(&db, &source, job.id, Duration::from_secs(20)).await;
    assert_eq!(j.status, JobStatus::Completed, "{:?}", j.error_message);
    let response: Value =
        serde_json::from_str(j.result.unwrap()["response"].as_str().unwrap()).unwrap();
    assert_eq!(
        response["from"], "target",
        "the webhook went through the proxy"
    );

    // An enrichment provider.
    let provider = HttpProvider::connect(
        &ProviderConfig {
            name: "p".into(),
            base_url: target.clone(),
            api_key: "k".into(),
            field_map: BTreeMap::new(),
            calls_per_hour: 100,
        },
        true,
    )
    .await
    .unwrap();
    let answer = provider
        .lookup(Entity::Contact, "ann@acme.io")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        answer["from"], "target",
        "the provider call went through the proxy"
    );

    // A CRM.
    let crm = HubSpot::connect(
        &CrmConfig {
            name: "hub".into(),
            base_url: target.clone(),
            access_token: "t".into(),
            batch_size: 10,
            requests_per_10s: 100,
        },
        true,
    )
    .await
    .unwrap();
    let page = crm
        .changed(CrmEntity::Contacts, chrono::Utc::now(), 0, 10)
        .await
        .unwrap();
    assert!(page.records.is_empty());

    assert_eq!(via_proxy.load(Ordering::SeqCst), 0, "the proxy saw calls");
    assert_eq!(direct.load(Ordering::SeqCst), 3);
}
