//! A CRM on loopback for sync tests and the benchmark: the part of
//! HubSpot's CRM v3 objects API that [`crate::handlers::HubSpot`] speaks
//! (search by last-modified time, batch read, update and upsert), with
//! HubSpot's limits (100 inputs a batch, 200 a search page), its checks (an
//! e-mail must hold an `@`, one contact per e-mail), failures on chosen
//! calls, records served malformed on request, and a count of the writes
//! each record received.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde_json::{json, Map, Value};

use super::fake_provider::{refuse_call, Failures};

/// One record of the CRM.
#[derive(Clone, Debug)]
struct Record {
    properties: Map<String, Value>,
    updated_ms: i64,
    writes: u32,
    /// Fields of the answer's record left out, as a CRM with a bug might.
    left_out: Vec<String>,
}

/// The properties records are found by (one record per value).
const INDEXED: [&str; 2] = ["email", "offload_id"];

#[derive(Default)]
struct Store {
    /// Object type → id → record.
    objects: HashMap<String, BTreeMap<u64, Record>>,
    /// (object type, property, value) → id, for the [`INDEXED`] properties.
    index: HashMap<(String, String, String), u64>,
    next_id: u64,
    last_ms: i64,
}

impl Store {
    /// A modification time, never before an earlier one; in milliseconds
    /// as HubSpot's, so writes in the same millisecond share one.
    fn tick(&mut self) -> i64 {
        self.last_ms = Utc::now().timestamp_millis().max(self.last_ms);
        self.last_ms
    }

    fn records(&mut self, object: &str) -> &mut BTreeMap<u64, Record> {
        self.objects.entry(object.to_string()).or_default()
    }

    /// The record whose indexed `prop` holds `value`.
    fn find(&self, object: &str, prop: &str, value: &str) -> Option<u64> {
        self.index
            .get(&(object.to_string(), prop.to_string(), value.to_string()))
            .copied()
    }

    /// Sets properties of record `id` (created if new) at `ms`.
    fn write(&mut self, object: &str, id: u64, props: Map<String, Value>, ms: i64, by_sync: bool) {
        let r = self.records(object).entry(id).or_insert(Record {
            properties: Map::new(),
            updated_ms: ms,
            writes: 0,
            left_out: Vec::new(),
        });
        let mut moved = Vec::new();
        for (k, v) in props {
            if INDEXED.contains(&k.as_str()) {
                moved.push((k.clone(), r.properties.get(&k).cloned(), v.clone()));
            }
            r.properties.insert(k, v);
        }
        r.updated_ms = ms;
        if by_sync {
            r.writes += 1;
        }
        for (k, old, new) in moved {
            if let Some(old) = old.as_ref().and_then(Value::as_str) {
                let key = (object.to_string(), k.clone(), old.to_string());
                if self.index.get(&key) == Some(&id) {
                    self.index.remove(&key);
                }
            }
            if let Some(new) = new.as_str().filter(|v| !v.is_empty()) {
                self.index
                    .insert((object.to_string(), k, new.to_string()), id);
            }
        }
    }
}

struct Inner {
    token: String,
    failures: Failures,
    calls: AtomicU64,
    /// Every n-th batch write is applied and then answered 502, as when
    /// the answer is lost on the way back.
    lose_every: AtomicU64,
    writes: AtomicU64,
    store: Mutex<Store>,
}

/// The running CRM; it stops when dropped.
pub struct FakeCrm {
    pub base_url: String,
    pub token: String,
    inner: Arc<Inner>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeCrm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn iso(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn modified_property(object: &str) -> &'static str {
    if object == "contacts" {
        "lastmodifieddate"
    } else {
        "hs_lastmodifieddate"
    }
}

fn view(object: &str, id: u64, r: &Record, wanted: Option<&[Value]>) -> Value {
    let mut props = Map::new();
    for (k, v) in &r.properties {
        if wanted.is_none_or(|w| w.iter().any(|x| x.as_str() == Some(k))) {
            props.insert(k.clone(), v.clone());
        }
    }
    props.insert("hs_object_id".into(), json!(id.to_string()));
    props.insert(modified_property(object).into(), json!(iso(r.updated_ms)));
    let mut record = json!({
        "id": id.to_string(),
        "properties": props,
        "createdAt": iso(r.updated_ms),
        "updatedAt": iso(r.updated_ms),
        "archived": false,
    });
    for field in &r.left_out {
        record.as_object_mut().map(|o| o.remove(field));
    }
    record
}

fn error(status: StatusCode, category: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"status": "error", "category": category, "message": message.into()})),
    )
        .into_response()
}

impl FakeCrm {
    pub async fn start(failures: Failures) -> FakeCrm {
        let inner = Arc::new(Inner {
            token: format!("pat-{}", uuid::Uuid::new_v4().simple()),
            failures,
            calls: AtomicU64::new(0),
            lose_every: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            store: Mutex::new(Store {
                next_id: 1000,
                ..Store::default()
            }),
        });
        let app = Router::new()
            .route("/crm/v3/objects/{object}/search", post(search))
            .route("/crm/v3/objects/{object}/batch/{op}", post(batch))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeCrm {
            base_url: format!("http://{addr}"),
            token: inner.token.clone(),
            inner,
            server,
        }
    }

    /// Calls received, failed ones included.
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::SeqCst)
    }

    /// From now on every `n`-th batch write is applied and then answered
    /// 502 (0: none).
    pub fn lose_answers(&self, n: u64) {
        self.inner.lose_every.store(n, Ordering::SeqCst);
    }

    /// Creates a record as a CRM user would; its id.
    pub fn create(&self, object: &str, properties: Value) -> String {
        let mut s = self.inner.store.lock().unwrap();
        let ms = s.tick();
        s.next_id += 1;
        let id = s.next_id;
        s.write(
            object,
            id,
            properties.as_object().cloned().unwrap_or_default(),
            ms,
            false,
        );
        id.to_string()
    }

    /// Changes a record as a CRM user would, at `at` (now if `None`).
    pub fn edit(&self, object: &str, id: &str, properties: Value, at: Option<DateTime<Utc>>) {
        let mut s = self.inner.store.lock().unwrap();
        let ms = match at {
            Some(t) => t.timestamp_millis(),
            None => s.tick(),
        };
        let id: u64 = id.parse().unwrap();
        assert!(s.records(object).contains_key(&id), "no such record");
        s.write(
            object,
            id,
            properties.as_object().cloned().unwrap_or_default(),
            ms,
            false,
        );
    }

    /// From now on record `id` is answered without `field` of HubSpot's
    /// record (`id`, `updatedAt`, `properties`), as a CRM with a bug might;
    /// searches still find it by its modification time.
    pub fn serve_without(&self, object: &str, id: &str, field: &str) {
        let mut s = self.inner.store.lock().unwrap();
        let id: u64 = id.parse().unwrap();
        let r = s.records(object).get_mut(&id).expect("no such record");
        r.left_out.push(field.to_string());
    }

    /// A record's properties and modification time.
    pub fn get(&self, object: &str, id: &str) -> Option<(Map<String, Value>, DateTime<Utc>)> {
        let mut s = self.inner.store.lock().unwrap();
        s.records(object).get(&id.parse().ok()?).map(|r| {
            (
                r.properties.clone(),
                Utc.timestamp_millis_opt(r.updated_ms).unwrap(),
            )
        })
    }

    /// Every record of an object type: id → properties.
    pub fn all(&self, object: &str) -> BTreeMap<String, Map<String, Value>> {
        let mut s = self.inner.store.lock().unwrap();
        s.records(object)
            .iter()
            .map(|(id, r)| (id.to_string(), r.properties.clone()))
            .collect()
    }

    /// Writes the sync made to each record (updates and upserts).
    pub fn writes(&self, object: &str) -> BTreeMap<String, u32> {
        let mut s = self.inner.store.lock().unwrap();
        s.records(object)
            .iter()
            .map(|(id, r)| (id.to_string(), r.writes))
            .collect()
    }
}

async fn search(
    State(crm): State<Arc<Inner>>,
    Path(object): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = refuse_call(&crm.calls, &crm.token, crm.failures, &headers) {
        return r;
    }
    let filter = body.pointer("/filterGroups/0/filters/0");
    let since: i64 = match filter {
        Some(f) if f["propertyName"] == modified_property(&object) && f["operator"] == "GTE" => {
            match f["value"].as_str().and_then(|v| v.parse().ok()) {
                Some(v) => v,
                None => return error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "bad value"),
            }
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "VALIDATION_ERROR",
                "unsupported filter",
            )
        }
    };
    let limit = body["limit"].as_u64().unwrap_or(10) as usize;
    if limit > 200 {
        return error(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            "limit is at most 200",
        );
    }
    let after: usize = body["after"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    if after + limit > 10_000 {
        return error(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            "a search returns at most 10 000 results",
        );
    }
    let wanted = body["properties"].as_array().map(Vec::as_slice);
    let mut s = crm.store.lock().unwrap();
    let mut hits: Vec<(i64, u64)> = s
        .records(&object)
        .iter()
        .filter(|(_, r)| r.updated_ms >= since)
        .map(|(id, r)| (r.updated_ms, *id))
        .collect();
    hits.sort();
    let total = hits.len();
    let records = s.records(&object);
    let results: Vec<Value> = hits
        .iter()
        .skip(after)
        .take(limit)
        .map(|(_, id)| view(&object, *id, &records[id], wanted))
        .collect();
    let mut answer = json!({"total": total, "results": results});
    if after + limit < total {
        answer["paging"] = json!({"next": {"after": (after + limit).to_string()}});
    }
    Json(answer).into_response()
}

async fn batch(
    State(crm): State<Arc<Inner>>,
    Path((object, op)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = refuse_call(&crm.calls, &crm.token, crm.failures, &headers) {
        return r;
    }
    let inputs = body["inputs"].as_array().cloned().unwrap_or_default();
    if inputs.is_empty() || inputs.len() > 100 {
        return error(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            "1 to 100 inputs a batch",
        );
    }
    let mut s = crm.store.lock().unwrap();
    if op == "read" {
        let wanted = body["properties"].as_array().map(Vec::as_slice);
        let records = s.records(&object);
        let results: Vec<Value> = inputs
            .iter()
            .filter_map(|i| {
                let id: u64 = i["id"].as_str()?.parse().ok()?;
                Some(view(&object, id, records.get(&id)?, wanted))
            })
            .collect();
        return Json(json!({"status": "COMPLETE", "results": results})).into_response();
    }
    if op != "update" && op != "upsert" {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", format!("no batch/{op}"));
    }
    // Checked first, so a rejected batch changes nothing (as HubSpot's).
    for i in &inputs {
        let props = i["properties"].as_object().cloned().unwrap_or_default();
        let Some(email) = props.get("email").and_then(Value::as_str) else {
            continue;
        };
        if email.is_empty() {
            continue;
        }
        if !email.contains('@') {
            return error(
                StatusCode::BAD_REQUEST,
                "VALIDATION_ERROR",
                format!("Property values were not valid: email {email:?} is not an e-mail address"),
            );
        }
        if object != "contacts" {
            continue;
        }
        let target = target(&mut s, &object, &op, i);
        let holder = s.find(&object, "email", email);
        if let Some(h) = holder.filter(|h| Some(*h) != target) {
            return error(
                StatusCode::CONFLICT,
                "CONFLICT",
                format!("Contact already exists. Existing ID: {h}"),
            );
        }
    }
    let mut results = Vec::new();
    for i in &inputs {
        let props = i["properties"].as_object().cloned().unwrap_or_default();
        let id = match (op.as_str(), target(&mut s, &object, &op, i)) {
            (_, Some(id)) => id,
            ("upsert", None) => {
                s.next_id += 1;
                let id = s.next_id;
                let key = i["idProperty"].as_str().unwrap_or_default().to_string();
                s.write(
                    &object,
                    id,
                    Map::from_iter([(key, i["id"].clone())]),
                    0,
                    false,
                );
                id
            }
            ("update", None) => {
                return error(
                    StatusCode::NOT_FOUND,
                    "OBJECT_NOT_FOUND",
                    format!("no {object} {}", i["id"]),
                )
            }
            _ => unreachable!("checked above"),
        };
        let ms = s.tick();
        s.write(&object, id, props, ms, true);
        let r = s.records(&object)[&id].clone();
        results.push(view(&object, id, &r, None));
    }
    drop(s);
    let n = crm.writes.fetch_add(1, Ordering::SeqCst) + 1;
    let lose = crm.lose_every.load(Ordering::SeqCst);
    if lose > 0 && n.is_multiple_of(lose) {
        return error(
            StatusCode::BAD_GATEWAY,
            "BAD_GATEWAY",
            "the answer was lost",
        );
    }
    Json(json!({"status": "COMPLETE", "results": results})).into_response()
}

/// The record an update (by id) or upsert (by its `idProperty`, one of
/// [`INDEXED`]) input writes, if it exists.
fn target(s: &mut Store, object: &str, op: &str, input: &Value) -> Option<u64> {
    match op {
        "update" => input["id"]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|id| s.records(object).contains_key(id)),
        "upsert" => s.find(object, input["idProperty"].as_str()?, input["id"].as_str()?),
        _ => None,
    }
}
