//! `sync_crm`: keeps a workspace's contacts and accounts in sync with a CRM
//! it configured (`crm_providers`; HubSpot's CRM v3 objects API, where
//! accounts are `companies`).
//!
//! Each record type syncs in pages of the CRM's batch size, pull before
//! push. A pull page is the CRM's records modified since the pull cursor
//! (its search API, oldest first); a push page is ours updated since the
//! push cursor, in `(updated_at, id)` order. A record's link
//! (`crm_links`) holds the values both sides last agreed on, so a side has
//! changed exactly when its values differ from them: a sync's own writes
//! never come back as changes, nor do changes to fields that are not
//! synced. Both sides changed is a conflict, resolved by `last_write_wins`
//! (the later modification time) or parked as a `crm_conflicts` row for a
//! person (`manual_review`); a parked record is left alone until the
//! conflict is resolved.
//!
//! Every page commits in one transaction: our records' writes, the links,
//! the conflicts, the cursor (moved once per page) and the job's
//! checkpoint. A pull page writes only here, so a crash before its commit
//! leaves nothing. A push page writes to the CRM first (by CRM id, or an
//! upsert keyed by our id in the `offload_id` property, so doing it again
//! sets the same values and never creates a second record), then commits;
//! a crash between the two finds the CRM already holding our values and
//! only records the link. Calls keep to the provider's requests per 10
//! seconds (a wait over a few seconds snoozes the job, spending no
//! attempt); 429 snoozes for its `Retry-After`; 5xx, 408 and timeouts are
//! called again after 0.2, 0.8 and 3.2 s, then the job retries from its
//! checkpoint; a refused token is permanent; a batch the CRM rejects is
//! sent again one record at a time, and a record it rejects alone is
//! counted as failed and logged. A record the CRM sends without an id or a
//! modification time is skipped, counted as failed and named in the log
//! (once a sync), and the rest of its page syncs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::enrich::{base_client, call, ProviderError, UNAVAILABLE_PAUSES};
use super::{JobContext, JobError, JobHandler, Outcome, PayloadError};
use crate::db::DbError;
use crate::job::Progress;

/// Where HubSpot's API lives, for a provider configured without a base URL.
pub const HUBSPOT_API: &str = "https://api.hubapi.com";
/// How long the CRM has to answer one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// A wait for the request rate up to this long is slept; a longer one
/// snoozes the job.
const LONGEST_SLEEP: Duration = Duration::from_secs(3);
/// Each scan starts this long before its cursor, so what became visible
/// late is still seen: a record of ours whose transaction stamped
/// `updated_at` before the last page but committed after it, and a record
/// the CRM's search had not indexed yet (HubSpot's lags by seconds). Links
/// tell which of the records seen again have changed.
const OVERLAP: chrono::TimeDelta = chrono::TimeDelta::minutes(5);
/// Conflicts listed one by one in the result (all are counted).
const LISTED_CONFLICTS: usize = 100;
/// Unreadable records a step remembers having logged, so the checkpoint
/// stays small however many a broken CRM sends (past this, a record a
/// search returns again is logged again).
const REMEMBERED_SKIPS: usize = 200;
/// Characters of a record's JSON quoted to name one that has no id.
const QUOTED: usize = 200;
/// The CRM property holding our id, by which pushes create records.
pub const ID_PROPERTY: &str = "offload_id";

/// The values of a record's synced fields, by the CRM's property names;
/// an empty value is `None`.
pub type Props = BTreeMap<String, Option<String>>;

/// What a synced field holds, for normalising and checking values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Text,
    /// Compared in lower case, as CRMs keep it.
    Email,
    Count,
    Money,
}

/// The record types a sync covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrmEntity {
    Contacts,
    Accounts,
}

impl CrmEntity {
    pub fn name(self) -> &'static str {
        match self {
            CrmEntity::Contacts => "contacts",
            CrmEntity::Accounts => "accounts",
        }
    }

    /// HubSpot's object type.
    pub fn object(self) -> &'static str {
        match self {
            CrmEntity::Contacts => "contacts",
            CrmEntity::Accounts => "companies",
        }
    }

    /// HubSpot's last-modified property of the object type.
    pub fn modified(self) -> &'static str {
        match self {
            CrmEntity::Contacts => "lastmodifieddate",
            CrmEntity::Accounts => "hs_lastmodifieddate",
        }
    }

    /// (our column, the CRM's property, kind); the first `Email` one is the
    /// key a record of the CRM is matched to one of ours by, before they
    /// are linked.
    fn fields(self) -> &'static [(&'static str, &'static str, Kind)] {
        match self {
            CrmEntity::Contacts => &[
                ("email", "email", Kind::Email),
                ("first_name", "firstname", Kind::Text),
                ("last_name", "lastname", Kind::Text),
                ("phone", "phone", Kind::Text),
                ("company", "company", Kind::Text),
                ("title", "jobtitle", Kind::Text),
            ],
            CrmEntity::Accounts => &[
                ("name", "name", Kind::Text),
                ("domain", "domain", Kind::Email),
                ("industry", "industry", Kind::Text),
                ("employee_count", "numberofemployees", Kind::Count),
                ("revenue", "annualrevenue", Kind::Money),
            ],
        }
    }

    /// The CRM's properties a sync reads and writes.
    pub fn properties(self) -> Vec<&'static str> {
        self.fields().iter().map(|(_, p, _)| *p).collect()
    }

    /// Our column and the CRM's property records are matched by.
    fn key(self) -> (&'static str, &'static str) {
        self.fields()
            .iter()
            .find(|(_, _, k)| *k == Kind::Email)
            .map(|(c, p, _)| (*c, *p))
            .expect("every entity has a key")
    }

    fn table(self) -> &'static str {
        self.name()
    }

    /// `SELECT id, updated_at, <synced fields as text> FROM <table> t`.
    fn select(self) -> String {
        let cols: Vec<String> = self
            .fields()
            .iter()
            .map(|(c, _, k)| match k {
                Kind::Count | Kind::Money => format!("t.{c}::text"),
                _ => format!("t.{c}"),
            })
            .collect();
        format!(
            "SELECT t.id, t.updated_at, {} FROM {} t",
            cols.join(", "),
            self.table()
        )
    }

    /// Writes every synced field from `$3..` (text, cast), at `$N`.
    fn update(self) -> String {
        let sets: Vec<String> = self
            .fields()
            .iter()
            .enumerate()
            .map(|(i, (c, _, k))| format!("{c} = {}", cast(i + 3, *k)))
            .collect();
        let at = self.fields().len() + 3;
        format!(
            "UPDATE {} SET {}, updated_at = ${at} WHERE id = $1 AND workspace_id = $2",
            self.table(),
            sets.join(", ")
        )
    }

    fn insert(self) -> String {
        let cols: Vec<&str> = self.fields().iter().map(|(c, _, _)| *c).collect();
        let vals: Vec<String> = self
            .fields()
            .iter()
            .enumerate()
            .map(|(i, (_, _, k))| cast(i + 3, *k))
            .collect();
        let at = self.fields().len() + 3;
        format!(
            "INSERT INTO {} (id, workspace_id, {}, created_at, updated_at) VALUES ($1, $2, {}, ${at}, ${at})",
            self.table(),
            cols.join(", "),
            vals.join(", ")
        )
    }

    /// A record's values as the CRM holds them, normalised; `Err` names the
    /// first one we cannot take.
    fn props_of(self, properties: &Map<String, Value>) -> Result<Props, String> {
        let mut out = Props::new();
        for (_, p, k) in self.fields() {
            let raw = match properties.get(*p) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(v @ Value::Number(_)) => Some(v.to_string()),
                Some(other) => return Err(format!("{p}: {other} is not a text or number")),
            };
            let v = match raw {
                Some(s) => norm(*k, &s).map_err(|why| format!("{p}: {s:?} {why}"))?,
                None => None,
            };
            out.insert(p.to_string(), v);
        }
        Ok(out)
    }
}

/// `$n` cast to the column's type.
fn cast(n: usize, kind: Kind) -> String {
    match kind {
        Kind::Count => format!("${n}::text::int4"),
        Kind::Money => format!("${n}::text::numeric"),
        _ => format!("${n}::text"),
    }
}

/// A value as it is compared and written: trimmed, empty as `None`, e-mail
/// addresses and domains in lower case, numbers in one spelling.
fn norm(kind: Kind, s: &str) -> Result<Option<String>, &'static str> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    match kind {
        Kind::Text if s.chars().count() <= 1000 => Ok(Some(s.to_string())),
        Kind::Text => Err("is longer than 1 000 characters"),
        Kind::Email
            if s.len() <= 320 && !s.contains(char::is_whitespace) && !s.contains(['<', '>']) =>
        {
            Ok(Some(s.to_lowercase()))
        }
        Kind::Email => Err("is not an address"),
        Kind::Count => match s.parse::<f64>() {
            Ok(x) if x.fract() == 0.0 && (0.0..=i32::MAX as f64).contains(&x) => {
                Ok(Some((x as i64).to_string()))
            }
            _ => Err("is not a whole number from 0"),
        },
        Kind::Money => match s.parse::<f64>() {
            Ok(x) if x.is_finite() && x.abs() < 1e16 => {
                Ok(Some(((x * 100.0).round() / 100.0).to_string()))
            }
            _ => Err("is not an amount"),
        },
    }
}

/// A record of ours: its id, when it last changed, its synced values.
#[derive(Clone, Debug)]
struct Local {
    id: Uuid,
    updated_at: DateTime<Utc>,
    props: Props,
}

fn local_of(entity: CrmEntity, r: &tokio_postgres::Row) -> Local {
    let props = entity
        .fields()
        .iter()
        .enumerate()
        .map(|(i, (_, p, k))| {
            let raw: Option<String> = r.get(i + 2);
            let v = raw.and_then(|s| norm(*k, &s).unwrap_or_else(|_| Some(s.trim().to_string())));
            (p.to_string(), v)
        })
        .collect();
    Local {
        id: r.get(0),
        updated_at: r.get(1),
        props,
    }
}

/// A record of the CRM.
#[derive(Clone, Debug, PartialEq)]
pub struct Remote {
    pub id: String,
    /// Its synced values, or why they cannot be taken.
    pub props: Result<Props, String>,
    pub updated_at: DateTime<Utc>,
    /// Our id, when the record was created by a push (`offload_id`).
    pub offload_id: Option<Uuid>,
}

/// One page of the CRM's changed records; `next` pages on within the same
/// modification time.
pub struct Changed {
    pub records: Vec<Remote>,
    /// The page's records that could not be read (no id, no modification
    /// time), each named as well as it can be and said what it lacks: the
    /// sync skips them, and they still count towards the page's size.
    pub skipped: Vec<String>,
    pub next: Option<u64>,
}

/// A CRM, as `sync_crm` uses it.
#[async_trait]
pub trait Crm: Send + Sync {
    /// Up to `limit` records of `entity` modified at or after `since`,
    /// oldest first, skipping the first `after` of them.
    async fn changed(
        &self,
        entity: CrmEntity,
        since: DateTime<Utc>,
        after: u64,
        limit: usize,
    ) -> Result<Changed, ProviderError>;
    /// These records as they are now (ones gone are left out).
    async fn read(&self, entity: CrmEntity, ids: &[String]) -> Result<Vec<Remote>, ProviderError>;
    /// Sets these records' values, by CRM id.
    async fn update(
        &self,
        entity: CrmEntity,
        inputs: &[(String, Props)],
    ) -> Result<Vec<Remote>, ProviderError>;
    /// Creates these records, or updates the ones already holding our id in
    /// [`ID_PROPERTY`].
    async fn upsert(
        &self,
        entity: CrmEntity,
        inputs: &[(Uuid, Props)],
    ) -> Result<Vec<Remote>, ProviderError>;
}

/// A workspace's CRM, as configured.
#[derive(Clone, Debug)]
pub struct CrmConfig {
    pub name: String,
    pub base_url: String,
    pub access_token: String,
    pub batch_size: i32,
    pub requests_per_10s: i32,
}

impl CrmConfig {
    pub async fn load(
        db: &impl deadpool_postgres::GenericClient,
        workspace: Uuid,
        name: &str,
    ) -> Result<Option<CrmConfig>, DbError> {
        let stmt = db
            .prepare_cached(
                "SELECT base_url, access_token, batch_size, requests_per_10s FROM crm_providers \
                 WHERE workspace_id = $1 AND name = $2",
            )
            .await?;
        Ok(db
            .query_opt(&stmt, &[&workspace, &name])
            .await?
            .map(|r| CrmConfig {
                name: name.to_string(),
                base_url: r.get(0),
                access_token: r.get(1),
                batch_size: r.get(2),
                requests_per_10s: r.get(3),
            }))
    }
}

/// HubSpot's CRM v3 objects API: `POST {base}/crm/v3/objects/{object}/search`
/// (filtered and sorted by the last-modified property),
/// `…/batch/read`, `…/batch/update` and `…/batch/upsert` (keyed by
/// [`ID_PROPERTY`]), with a private app's token as `Bearer`.
pub struct HubSpot {
    client: reqwest::Client,
    base: reqwest::Url,
    token: String,
}

impl HubSpot {
    /// Resolves the API's host once and pins the client to the checked
    /// addresses; internal addresses are refused unless `allow_private`.
    pub async fn connect(config: &CrmConfig, allow_private: bool) -> Result<Self, JobError> {
        let (client, base) = base_client(
            &format!("CRM {}", config.name),
            &config.base_url,
            allow_private,
            CALL_TIMEOUT,
            "Offload-CRM-Sync/1",
            "CRM providers",
        )
        .await?;
        Ok(HubSpot {
            client,
            base,
            token: config.access_token.clone(),
        })
    }

    async fn post(
        &self,
        entity: CrmEntity,
        path: &str,
        body: Value,
    ) -> Result<Value, ProviderError> {
        let url = self
            .base
            .join(&format!("crm/v3/objects/{}/{path}", entity.object()))
            .map_err(|e| ProviderError::Refused(format!("bad CRM URL: {e}")))?;
        let req = self.client.post(url).bearer_auth(&self.token).json(&body);
        call(req, CALL_TIMEOUT)
            .await?
            .ok_or_else(|| ProviderError::Rejected(format!("{path}: 404 from the CRM")))
    }

    fn results(answer: &Value) -> Result<&[Value], ProviderError> {
        answer
            .get("results")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .ok_or_else(|| ProviderError::Rejected("the CRM answered without results".into()))
    }

    /// The records of a write's or read's answer; one that cannot be read
    /// rejects the answer (the batch is then sent again a record at a time,
    /// and a record that fails alone is counted and logged).
    fn records(entity: CrmEntity, answer: &Value) -> Result<Vec<Remote>, ProviderError> {
        HubSpot::results(answer)?
            .iter()
            .map(|r| remote_of(entity, r).map_err(ProviderError::Rejected))
            .collect()
    }

    fn properties(entity: CrmEntity) -> Vec<&'static str> {
        let mut p = entity.properties();
        p.push(entity.modified());
        p.push(ID_PROPERTY);
        p
    }
}

/// The values a push sends: an empty value clears the property.
fn outgoing(props: &Props) -> Map<String, Value> {
    props
        .iter()
        .map(|(k, v)| (k.clone(), json!(v.clone().unwrap_or_default())))
        .collect()
}

/// One of HubSpot's records (`{id, properties, updatedAt}`), or what is
/// wrong with it, naming it: by its id, else by the `hs_object_id` HubSpot
/// also keeps among its properties, else by the start of its JSON.
fn remote_of(entity: CrmEntity, r: &Value) -> Result<Remote, String> {
    let id_of = |v: Option<&Value>| match v {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 100 => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let id = id_of(r.get("id"));
    let bad = |what: &str| {
        let name = match id_of(r.pointer("/properties/hs_object_id")) {
            Some(hs) => format!("{} {hs}", entity.object()),
            None => format!(
                "{} {}",
                entity.object(),
                r.to_string().chars().take(QUOTED).collect::<String>()
            ),
        };
        format!("{name}: skipped, the CRM sent it without {what}")
    };
    let Some(id) = id else {
        return Err(bad("an id"));
    };
    let bad = |what: &str| {
        format!(
            "{} {id}: skipped, the CRM sent it without {what}",
            entity.object()
        )
    };
    let properties = r
        .get("properties")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("properties"))?;
    let updated_at = r
        .get("updatedAt")
        .and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| bad("an updatedAt time"))?;
    let offload_id = properties
        .get(ID_PROPERTY)
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok());
    Ok(Remote {
        id,
        props: entity.props_of(properties),
        updated_at,
        offload_id,
    })
}

#[async_trait]
impl Crm for HubSpot {
    async fn changed(
        &self,
        entity: CrmEntity,
        since: DateTime<Utc>,
        after: u64,
        limit: usize,
    ) -> Result<Changed, ProviderError> {
        let mut body = json!({
            "filterGroups": [{"filters": [{
                "propertyName": entity.modified(),
                "operator": "GTE",
                "value": since.timestamp_millis().to_string(),
            }]}],
            "sorts": [{"propertyName": entity.modified(), "direction": "ASCENDING"}],
            "properties": HubSpot::properties(entity),
            "limit": limit,
        });
        if after > 0 {
            body["after"] = json!(after.to_string());
        }
        let answer = self.post(entity, "search", body).await?;
        let next = answer.pointer("/paging/next/after").and_then(|v| match v {
            Value::String(s) => s.parse().ok(),
            other => other.as_u64(),
        });
        // One record the CRM cannot describe must not stop the others.
        let (mut records, mut skipped) = (Vec::new(), Vec::new());
        for r in HubSpot::results(&answer)? {
            match remote_of(entity, r) {
                Ok(remote) => records.push(remote),
                Err(why) => skipped.push(why),
            }
        }
        Ok(Changed {
            records,
            skipped,
            next,
        })
    }

    async fn read(&self, entity: CrmEntity, ids: &[String]) -> Result<Vec<Remote>, ProviderError> {
        let inputs: Vec<Value> = ids.iter().map(|id| json!({ "id": id })).collect();
        let answer = self
            .post(
                entity,
                "batch/read",
                json!({"properties": HubSpot::properties(entity), "inputs": inputs}),
            )
            .await?;
        HubSpot::records(entity, &answer)
    }

    async fn update(
        &self,
        entity: CrmEntity,
        inputs: &[(String, Props)],
    ) -> Result<Vec<Remote>, ProviderError> {
        let inputs: Vec<Value> = inputs
            .iter()
            .map(|(id, p)| json!({"id": id, "properties": outgoing(p)}))
            .collect();
        let answer = self
            .post(entity, "batch/update", json!({ "inputs": inputs }))
            .await?;
        HubSpot::records(entity, &answer)
    }

    async fn upsert(
        &self,
        entity: CrmEntity,
        inputs: &[(Uuid, Props)],
    ) -> Result<Vec<Remote>, ProviderError> {
        let inputs: Vec<Value> = inputs
            .iter()
            .map(|(id, p)| {
                let mut props = outgoing(p);
                props.insert(ID_PROPERTY.into(), json!(id.to_string()));
                json!({"idProperty": ID_PROPERTY, "id": id.to_string(), "properties": props})
            })
            .collect();
        let answer = self
            .post(entity, "batch/upsert", json!({ "inputs": inputs }))
            .await?;
        HubSpot::records(entity, &answer)
    }
}

/// Which way records go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Push,
    Pull,
    Bidirectional,
}

impl Direction {
    fn pulls(self) -> bool {
        self != Direction::Push
    }
    fn pushes(self) -> bool {
        self != Direction::Pull
    }
}

/// What happens when a record changed on both sides since it last synced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    /// The side modified later wins (ours by `updated_at`, the CRM's by its
    /// last-modified time).
    LastWriteWins,
    /// Neither side is written; a `crm_conflicts` row waits for a person.
    #[default]
    ManualReview,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncCrmPayload {
    /// A CRM configured for the workspace (`/crm-providers/{name}`).
    pub provider: String,
    pub direction: Direction,
    /// `contacts`, `accounts` (the CRM's companies), or both.
    pub entity_types: Vec<CrmEntity>,
    /// Sync what changed since this time instead of since the cursors.
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
    #[serde(default)]
    pub on_conflict: OnConflict,
}

/// `sync_crm`; `allow_private` lets it call CRMs on internal addresses (as
/// `OFFLOAD_WEBHOOK_ALLOW_PRIVATE` does for webhooks).
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncCrm {
    pub allow_private: bool,
}

/// What a sync did to one record type.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Counts {
    pulled_created: u64,
    pulled_updated: u64,
    pushed_created: u64,
    pushed_updated: u64,
    unchanged: u64,
    kept_local: u64,
    kept_remote: u64,
    manual_review: u64,
    awaiting_review: u64,
    failed: u64,
}

/// The job's checkpoint: the step (record type and direction) it is in,
/// where that step's next page starts, and what was done.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    step: usize,
    pull_from: Option<DateTime<Utc>>,
    pull_after: u64,
    /// The CRM's records of time `pull_from` already taken.
    #[serde(default)]
    pull_seen: Vec<String>,
    /// Unreadable records this step logged already (a search starting at
    /// or before one finds it again), as they were named.
    #[serde(default)]
    pull_skipped: Vec<String>,
    push_from: Option<(DateTime<Utc>, Uuid)>,
    counts: BTreeMap<String, Counts>,
    conflicts: Vec<Value>,
    pages: u64,
    calls: u64,
}

impl Checkpoint {
    fn counts(&mut self, entity: CrmEntity) -> &mut Counts {
        self.counts.entry(entity.name().to_string()).or_default()
    }

    fn processed(&self) -> (u64, u64) {
        self.counts.values().fold((0, 0), |(done, failed), c| {
            (
                done + c.pulled_created
                    + c.pulled_updated
                    + c.pushed_created
                    + c.pushed_updated
                    + c.unchanged
                    + c.kept_local
                    + c.kept_remote
                    + c.manual_review
                    + c.awaiting_review,
                failed + c.failed,
            )
        })
    }

    fn result(&self) -> Value {
        let manual: u64 = self.counts.values().map(|c| c.manual_review).sum();
        json!({
            "counts": self.counts,
            "manual_review": self.conflicts,
            "manual_review_total": manual,
            "pages": self.pages,
            "calls": self.calls,
        })
    }

    /// Lists a parked conflict (the first [`LISTED_CONFLICTS`]).
    fn park(&mut self, entity: CrmEntity, id: i64, local: Uuid, remote: &str) {
        self.counts(entity).manual_review += 1;
        if self.conflicts.len() < LISTED_CONFLICTS {
            self.conflicts.push(json!({
                "conflict_id": id, "entity": entity.name(),
                "local_id": local, "remote_id": remote,
            }));
        }
    }
}

/// Why a page stopped before its commit.
enum Stop {
    /// Not now: the request rate or the CRM's 429.
    Snooze(Duration),
    Failed(JobError),
}

impl From<JobError> for Stop {
    fn from(e: JobError) -> Self {
        Stop::Failed(e)
    }
}

impl From<DbError> for Stop {
    fn from(e: DbError) -> Self {
        Stop::Failed(e.into())
    }
}

impl From<tokio_postgres::Error> for Stop {
    fn from(e: tokio_postgres::Error) -> Self {
        Stop::Failed(DbError::from(e).into())
    }
}

/// Everything a page needs besides the job's context.
struct Run<'a> {
    crm: &'a dyn Crm,
    config: &'a CrmConfig,
    direction: Direction,
    on_conflict: OnConflict,
    since: Option<DateTime<Utc>>,
    bucket: String,
}

impl Run<'_> {
    fn scope(&self, ctx: &JobContext, entity: CrmEntity) -> Scope<'_> {
        Scope {
            ws: ctx.workspace_id().0,
            provider: &self.config.name,
            entity,
        }
    }

    /// Calls the CRM within the request rate, calling again after a 5xx or
    /// timeout; `Ok(Err(why))` is the CRM rejecting the request.
    async fn call<T, F, Fut>(
        &self,
        ctx: &JobContext,
        cur: &mut Checkpoint,
        mut f: F,
    ) -> Result<Result<T, String>, Stop>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let per_10s = f64::from(self.config.requests_per_10s);
        let mut pauses = UNAVAILABLE_PAUSES.iter();
        loop {
            while let Some(wait) = ctx
                .take_token_or_wait(&self.bucket, per_10s, per_10s / 10.0)
                .await?
            {
                if wait > LONGEST_SLEEP {
                    ctx.log(
                        "info",
                        format!(
                            "{}: {} requests per 10 s used up; resuming in {} s",
                            self.config.name,
                            self.config.requests_per_10s,
                            wait.as_secs().max(1)
                        ),
                        None,
                    )
                    .await?;
                    return Err(Stop::Snooze(wait));
                }
                tokio::time::sleep(wait).await;
            }
            cur.calls += 1;
            match f().await {
                Ok(v) => return Ok(Ok(v)),
                Err(ProviderError::Rejected(why)) => return Ok(Err(why)),
                Err(ProviderError::RateLimited(wait)) => {
                    ctx.log(
                        "info",
                        format!(
                            "{} answered 429; resuming in {} s",
                            self.config.name,
                            wait.as_secs()
                        ),
                        None,
                    )
                    .await?;
                    return Err(Stop::Snooze(wait));
                }
                Err(ProviderError::Refused(why)) => {
                    return Err(Stop::Failed(JobError::Permanent(format!(
                        "{} refused the access token: {why}",
                        self.config.name
                    ))))
                }
                Err(ProviderError::Unavailable(why)) => match pauses.next() {
                    Some(p) => {
                        ctx.log("warn", format!("{why}; calling again"), None)
                            .await?;
                        tokio::time::sleep(*p).await;
                    }
                    None => return Err(Stop::Failed(JobError::Retryable(why))),
                },
            }
        }
    }

    /// Sends updates (`Left`: by CRM id) or upserts (`Right`: by our id)
    /// in one batch; when the CRM rejects it, one record at a time. Returns
    /// the records written and the inputs rejected, with why.
    async fn write<I: Clone + Send + Sync>(
        &self,
        ctx: &JobContext,
        cur: &mut Checkpoint,
        entity: CrmEntity,
        inputs: &[I],
        send: impl for<'b> Fn(
            &'b dyn Crm,
            CrmEntity,
            &'b [I],
        ) -> std::pin::Pin<
            Box<dyn Future<Output = Result<Vec<Remote>, ProviderError>> + Send + 'b>,
        >,
    ) -> Result<(Vec<Remote>, Vec<(I, String)>), Stop> {
        if inputs.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        match self
            .call(ctx, cur, || send(self.crm, entity, inputs))
            .await?
        {
            Ok(done) => return Ok((done, Vec::new())),
            Err(why) if inputs.len() == 1 => {
                return Ok((Vec::new(), vec![(inputs[0].clone(), why)]))
            }
            Err(_) => {}
        }
        let (mut done, mut rejected) = (Vec::new(), Vec::new());
        for one in inputs.chunks(1) {
            match self.call(ctx, cur, || send(self.crm, entity, one)).await? {
                Ok(d) => done.extend(d),
                Err(why) => rejected.push((one[0].clone(), why)),
            }
        }
        Ok((done, rejected))
    }
}

/// A link: the CRM's id and the values both sides last agreed on.
struct Link {
    remote_id: String,
    synced: Props,
}

async fn links_by_local(
    db: &impl deadpool_postgres::GenericClient,
    ws: Uuid,
    provider: &str,
    entity: CrmEntity,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Link>, DbError> {
    let stmt = db
        .prepare_cached(
            "SELECT local_id, remote_id, synced FROM crm_links \
             WHERE workspace_id = $1 AND provider = $2 AND entity = $3 AND local_id = ANY($4)",
        )
        .await?;
    Ok(db
        .query(&stmt, &[&ws, &provider, &entity.name(), &ids])
        .await?
        .iter()
        .map(|r| {
            (
                r.get(0),
                Link {
                    remote_id: r.get(1),
                    synced: serde_json::from_value(r.get(2)).unwrap_or_default(),
                },
            )
        })
        .collect())
}

async fn open_conflicts(
    db: &impl deadpool_postgres::GenericClient,
    ws: Uuid,
    provider: &str,
    entity: CrmEntity,
    ids: &[Uuid],
) -> Result<HashSet<Uuid>, DbError> {
    let stmt = db
        .prepare_cached(
            "SELECT local_id FROM crm_conflicts WHERE workspace_id = $1 AND provider = $2 \
             AND entity = $3 AND status = 'open' AND local_id = ANY($4)",
        )
        .await?;
    Ok(db
        .query(&stmt, &[&ws, &provider, &entity.name(), &ids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A record type of one workspace's CRM.
struct Scope<'a> {
    ws: Uuid,
    provider: &'a str,
    entity: CrmEntity,
}

/// Writes (or moves) a link.
async fn save_link(
    tx: &deadpool_postgres::Transaction<'_>,
    scope: &Scope<'_>,
    local: Uuid,
    remote: &str,
    synced: &Props,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO crm_links (workspace_id, provider, entity, local_id, remote_id, synced, synced_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (workspace_id, provider, entity, local_id) DO UPDATE \
             SET remote_id = EXCLUDED.remote_id, synced = EXCLUDED.synced, synced_at = EXCLUDED.synced_at",
        )
        .await?;
    let synced = serde_json::to_value(synced).unwrap_or_default();
    tx.execute(
        &stmt,
        &[
            &scope.ws,
            &scope.provider,
            &scope.entity.name(),
            &local,
            &remote,
            &synced,
            &now,
        ],
    )
    .await?;
    Ok(())
}

/// Parks a conflict for a person; its id (an open one already parked for
/// the record is kept).
async fn park(
    tx: &deadpool_postgres::Transaction<'_>,
    ctx: &JobContext,
    provider: &str,
    entity: CrmEntity,
    local: &Local,
    remote: &Remote,
    remote_props: &Props,
) -> Result<i64, DbError> {
    let stmt = tx
        .prepare_cached(
            "WITH parked AS ( \
               INSERT INTO crm_conflicts (workspace_id, provider, entity, local_id, remote_id, local, remote, \
                                          local_updated_at, remote_updated_at, job_id, created_at) \
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
               ON CONFLICT (workspace_id, provider, entity, local_id) WHERE status = 'open' DO NOTHING \
               RETURNING id) \
             SELECT id FROM parked UNION ALL \
             SELECT id FROM crm_conflicts WHERE workspace_id = $1 AND provider = $2 AND entity = $3 \
               AND local_id = $4 AND status = 'open' LIMIT 1",
        )
        .await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &ctx.workspace_id().0,
                &provider,
                &entity.name(),
                &local.id,
                &remote.id,
                &serde_json::to_value(&local.props).unwrap_or_default(),
                &serde_json::to_value(remote_props).unwrap_or_default(),
                &local.updated_at,
                &remote.updated_at,
                &ctx.job_id().0,
                &ctx.now(),
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// Writes a record's synced values here (a new record when `create`).
async fn write_local(
    tx: &deadpool_postgres::Transaction<'_>,
    ws: Uuid,
    entity: CrmEntity,
    id: Uuid,
    props: &Props,
    create: bool,
    now: DateTime<Utc>,
) -> Result<u64, DbError> {
    let sql = if create {
        entity.insert()
    } else {
        entity.update()
    };
    let stmt = tx.prepare_cached(&sql).await?;
    let values: Vec<Option<String>> = entity
        .fields()
        .iter()
        .map(|(_, p, _)| props.get(*p).cloned().flatten())
        .collect();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&id, &ws];
    for v in &values {
        params.push(v);
    }
    params.push(&now);
    Ok(tx.execute(&stmt, &params).await?)
}

/// Moves a record type's cursor past a committed page.
async fn advance(
    tx: &deadpool_postgres::Transaction<'_>,
    ws: Uuid,
    provider: &str,
    entity: CrmEntity,
    pulled_to: Option<DateTime<Utc>>,
    pushed_to: Option<(DateTime<Utc>, Uuid)>,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO crm_sync_cursors AS c (workspace_id, provider, entity, pulled_to, pushed_to, pushed_id, pages, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 1, $7) \
             ON CONFLICT (workspace_id, provider, entity) DO UPDATE SET \
               pulled_to = GREATEST(c.pulled_to, EXCLUDED.pulled_to), \
               pushed_id = CASE WHEN EXCLUDED.pushed_to IS NULL OR c.pushed_to > EXCLUDED.pushed_to \
                             THEN c.pushed_id ELSE EXCLUDED.pushed_id END, \
               pushed_to = GREATEST(c.pushed_to, EXCLUDED.pushed_to), \
               pages = c.pages + 1, updated_at = EXCLUDED.updated_at",
        )
        .await?;
    let (at, id) = pushed_to.unzip();
    tx.execute(
        &stmt,
        &[&ws, &provider, &entity.name(), &pulled_to, &at, &id, &now],
    )
    .await?;
    Ok(())
}

/// Where a record type's steps start: `since`, else its cursors.
async fn starts(
    ctx: &JobContext,
    provider: &str,
    entity: CrmEntity,
    since: Option<DateTime<Utc>>,
) -> Result<(DateTime<Utc>, (DateTime<Utc>, Uuid)), JobError> {
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    if let Some(s) = since {
        return Ok((s, (s, Uuid::nil())));
    }
    let db = ctx.db().get().await.map_err(DbError::from)?;
    let row = db
        .query_opt(
            "SELECT pulled_to, pushed_to FROM crm_sync_cursors \
             WHERE workspace_id = $1 AND provider = $2 AND entity = $3",
            &[&ctx.workspace_id().0, &provider, &entity.name()],
        )
        .await
        .map_err(DbError::from)?;
    let (pulled, pushed): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
        row.map_or((None, None), |r| (r.get(0), r.get(1)));
    Ok((
        pulled.map_or(epoch, |t| t - OVERLAP),
        (pushed.map_or(epoch, |t| t - OVERLAP), Uuid::nil()),
    ))
}

/// One pull page: `Ok(false)` when there was none left.
async fn pull_page(
    ctx: &mut JobContext,
    sync: &Run<'_>,
    entity: CrmEntity,
    cur: &mut Checkpoint,
) -> Result<bool, Stop> {
    let scope = sync.scope(ctx, entity);
    let (ws, provider) = (scope.ws, scope.provider);
    let from = cur.pull_from.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    let limit = sync.config.batch_size as usize;
    let after = cur.pull_after;
    let page = match sync
        .call(ctx, cur, || sync.crm.changed(entity, from, after, limit))
        .await?
    {
        Ok(p) => p,
        Err(why) => {
            return Err(Stop::Failed(JobError::Permanent(format!(
                "{provider} refused the search for changed {}: {why}",
                entity.object()
            ))))
        }
    };
    // What the CRM sent, the unreadable records included: a page that
    // came full has more after it.
    let returned = page.records.len() + page.skipped.len();
    // The search starts at the last page's time, so records of that time
    // taken then come again: they are left out. So are unreadable records
    // logged already (their time is unknown, so they may come again on any
    // later page of the step).
    let fresh: Vec<Remote> = page
        .records
        .iter()
        .filter(|r| !(r.updated_at == from && cur.pull_seen.contains(&r.id)))
        .cloned()
        .collect();
    let skipped: Vec<String> = page
        .skipped
        .iter()
        .filter(|s| !cur.pull_skipped.contains(s))
        .cloned()
        .collect();
    if fresh.is_empty() && skipped.is_empty() {
        return match page.next {
            // A whole page of them: page on within that time.
            Some(next) if returned == limit => {
                cur.pull_after = next;
                ctx.save_checkpoint(&*cur).await?;
                Ok(true)
            }
            _ => Ok(false),
        };
    }
    let page = Changed {
        records: fresh,
        skipped,
        next: page.next,
    };
    let now = ctx.now();
    let mut db = ctx.db().get().await.map_err(DbError::from)?;
    let tx = db.transaction().await?;
    // Links of these records; then ours: linked, created by a push (their
    // `offload_id`), or with the same key, locked for the page.
    let remote_ids: Vec<String> = page.records.iter().map(|r| r.id.clone()).collect();
    let linked: HashMap<String, (Uuid, Props)> = tx
        .query(
            "SELECT remote_id, local_id, synced FROM crm_links \
             WHERE workspace_id = $1 AND provider = $2 AND entity = $3 AND remote_id = ANY($4)",
            &[&ws, &provider, &entity.name(), &remote_ids],
        )
        .await?
        .iter()
        .map(|r| {
            (
                r.get(0),
                (
                    r.get(1),
                    serde_json::from_value(r.get(2)).unwrap_or_default(),
                ),
            )
        })
        .collect();
    let (key_col, key_prop) = entity.key();
    let mut want: Vec<Uuid> = linked.values().map(|(l, _)| *l).collect();
    want.extend(page.records.iter().filter_map(|r| r.offload_id));
    let keys: Vec<String> = page
        .records
        .iter()
        .filter_map(|r| r.props.as_ref().ok()?.get(key_prop).cloned().flatten())
        .collect();
    let locals: Vec<Local> = tx
        .query(
            &format!(
                "{} WHERE t.workspace_id = $1 AND (t.id = ANY($2) OR lower(t.{key_col}) = ANY($3)) \
                 ORDER BY t.id FOR UPDATE",
                entity.select()
            ),
            &[&ws, &want, &keys],
        )
        .await?
        .iter()
        .map(|r| local_of(entity, r))
        .collect();
    let ids: Vec<Uuid> = locals.iter().map(|l| l.id).collect();
    let by_local = links_by_local(&tx, ws, provider, entity, &ids).await?;
    let parked = open_conflicts(&tx, ws, provider, entity, &ids).await?;
    let mut next = cur.clone();
    let mut claimed: HashSet<Uuid> = HashSet::new();
    let mut lines: Vec<String> = Vec::new();
    let mut warnings: Vec<String> = Vec::new();
    for why in &page.skipped {
        next.counts(entity).failed += 1;
        warnings.push(why.clone());
        if next.pull_skipped.len() < REMEMBERED_SKIPS {
            next.pull_skipped.push(why.clone());
        }
    }
    for r in &page.records {
        let props = match &r.props {
            Ok(p) => p.clone(),
            Err(why) => {
                next.counts(entity).failed += 1;
                lines.push(format!("{} {}: not taken: {why}", entity.object(), r.id));
                continue;
            }
        };
        let link = linked.get(&r.id);
        let local = match link {
            Some((l, _)) => locals.iter().find(|x| x.id == *l),
            None => r
                .offload_id
                .and_then(|o| locals.iter().find(|x| x.id == o))
                .or_else(|| {
                    let key = props.get(key_prop).cloned().flatten()?;
                    locals
                        .iter()
                        .find(|x| x.props.get(key_prop).cloned().flatten().as_deref() == Some(&key))
                }),
        };
        if let Some(l) = local {
            if !claimed.insert(l.id) {
                next.counts(entity).failed += 1;
                lines.push(format!(
                    "{} {}: another record of this page already matched {} {}",
                    entity.object(),
                    r.id,
                    entity.name(),
                    l.id
                ));
                continue;
            }
        }
        match (link, local) {
            (Some((l, _)), None) => {
                next.counts(entity).failed += 1;
                lines.push(format!(
                    "{} {}: its {} {l} was deleted here; not re-created",
                    entity.object(),
                    r.id,
                    entity.name()
                ));
            }
            (None, None) => {
                let id = Uuid::new_v4();
                write_local(&tx, ws, entity, id, &props, true, now).await?;
                save_link(&tx, &scope, id, &r.id, &props, now).await?;
                next.counts(entity).pulled_created += 1;
            }
            (link, Some(l)) => {
                if parked.contains(&l.id) {
                    next.counts(entity).awaiting_review += 1;
                    continue;
                }
                if let (None, Some(other)) = (link, by_local.get(&l.id)) {
                    if other.remote_id != r.id {
                        next.counts(entity).failed += 1;
                        lines.push(format!(
                            "{} {}: matches {} {}, which is linked to {} {} already",
                            entity.object(),
                            r.id,
                            entity.name(),
                            l.id,
                            entity.object(),
                            other.remote_id
                        ));
                        continue;
                    }
                }
                let synced = link.map(|(_, s)| s);
                let remote_changed = synced != Some(&props);
                let local_changed = synced != Some(&l.props);
                if !remote_changed {
                    next.counts(entity).unchanged += 1;
                } else if l.props == props {
                    save_link(&tx, &scope, l.id, &r.id, &props, now).await?;
                    next.counts(entity).unchanged += 1;
                } else if !local_changed {
                    write_local(&tx, ws, entity, l.id, &props, false, now).await?;
                    save_link(&tx, &scope, l.id, &r.id, &props, now).await?;
                    next.counts(entity).pulled_updated += 1;
                } else {
                    match sync.on_conflict {
                        OnConflict::ManualReview => {
                            let id = park(&tx, ctx, provider, entity, l, r, &props).await?;
                            next.park(entity, id, l.id, &r.id);
                            lines.push(format!(
                                "{} {} and {} {} both changed: conflict {id} waits for review",
                                entity.name(),
                                l.id,
                                entity.object(),
                                r.id
                            ));
                        }
                        OnConflict::LastWriteWins if r.updated_at >= l.updated_at => {
                            write_local(&tx, ws, entity, l.id, &props, false, now).await?;
                            save_link(&tx, &scope, l.id, &r.id, &props, now).await?;
                            next.counts(entity).kept_remote += 1;
                            lines.push(format!(
                                "{} {} and {} {} both changed: the CRM's is later and was kept",
                                entity.name(),
                                l.id,
                                entity.object(),
                                r.id
                            ));
                        }
                        OnConflict::LastWriteWins => {
                            // Ours is later: the push step writes it (and
                            // counts it); a pull alone leaves both as they are.
                            if link.is_none() {
                                let synced: Props =
                                    props.keys().map(|k| (k.clone(), None)).collect();
                                save_link(&tx, &scope, l.id, &r.id, &synced, now).await?;
                            }
                            if !sync.direction.pushes() {
                                next.counts(entity).kept_local += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    let last = page.records.last().map(|r| r.updated_at).unwrap_or(from);
    // The next page starts at the last record's time; when the whole page
    // had one time (or no readable record), it pages on within it.
    if last > from {
        next.pull_from = Some(last);
        next.pull_after = 0;
        next.pull_seen.clear();
    } else {
        next.pull_after = page.next.unwrap_or(after + returned as u64);
    }
    next.pull_seen.extend(
        page.records
            .iter()
            .filter(|r| r.updated_at == last)
            .map(|r| r.id.clone()),
    );
    next.pages += 1;
    advance(&tx, ws, provider, entity, Some(last), None, now).await?;
    let c = next.counts(entity).clone();
    lines.push(format!(
        "pulled {} {} modified from {}: {} created, {} updated, {} conflicts kept theirs, {} parked so far",
        page.records.len(),
        entity.object(),
        from.to_rfc3339(),
        c.pulled_created,
        c.pulled_updated,
        c.kept_remote,
        c.manual_review
    ));
    for line in warnings {
        ctx.log_in(&tx, "warn", line, None).await?;
    }
    for line in lines {
        ctx.log_in(&tx, "info", line, None).await?;
    }
    ctx.save_checkpoint_in(&tx, &next).await?;
    tx.commit().await?;
    *cur = next;
    Ok(true)
}

/// One push page: `Ok(false)` when there was none left.
async fn push_page(
    ctx: &mut JobContext,
    sync: &Run<'_>,
    entity: CrmEntity,
    cur: &mut Checkpoint,
) -> Result<bool, Stop> {
    let scope = sync.scope(ctx, entity);
    let (ws, provider) = (scope.ws, scope.provider);
    let (from_at, from_id) = cur
        .push_from
        .unwrap_or((DateTime::<Utc>::UNIX_EPOCH, Uuid::nil()));
    let limit = i64::from(sync.config.batch_size);
    let (candidates, links, parked) = {
        let db = ctx.db().get().await.map_err(DbError::from)?;
        let rows = db
            .query(
                &format!(
                    "{} WHERE t.workspace_id = $1 AND (t.updated_at, t.id) > ($2, $3) \
                     ORDER BY t.updated_at, t.id LIMIT $4",
                    entity.select()
                ),
                &[&ws, &from_at, &from_id, &limit],
            )
            .await?;
        let candidates: Vec<Local> = rows.iter().map(|r| local_of(entity, r)).collect();
        let ids: Vec<Uuid> = candidates.iter().map(|l| l.id).collect();
        (
            candidates,
            links_by_local(&db, ws, provider, entity, &ids).await?,
            open_conflicts(&db, ws, provider, entity, &ids).await?,
        )
    };
    let Some(last) = candidates.last().map(|l| (l.updated_at, l.id)) else {
        return Ok(false);
    };
    let mut next = cur.clone();
    let mut lines: Vec<String> = Vec::new();
    let mut creates: Vec<(Uuid, Props)> = Vec::new();
    let mut changed: Vec<&Local> = Vec::new();
    for l in &candidates {
        if parked.contains(&l.id) {
            next.counts(entity).awaiting_review += 1;
        } else {
            match links.get(&l.id) {
                None => creates.push((l.id, l.props.clone())),
                Some(link) if link.synced == l.props => next.counts(entity).unchanged += 1,
                Some(_) => changed.push(l),
            }
        }
    }
    // The CRM's side of the records changed here: changed there too is a
    // conflict.
    let remote_ids: Vec<String> = changed
        .iter()
        .map(|l| links[&l.id].remote_id.clone())
        .collect();
    let remotes: HashMap<String, Remote> = if remote_ids.is_empty() {
        HashMap::new()
    } else {
        match sync
            .call(ctx, &mut next, || sync.crm.read(entity, &remote_ids))
            .await?
        {
            Ok(rs) => rs.into_iter().map(|r| (r.id.clone(), r)).collect(),
            Err(why) => {
                return Err(Stop::Failed(JobError::Permanent(format!(
                    "{provider} refused to read {}: {why}",
                    entity.object()
                ))))
            }
        }
    };
    let mut updates: Vec<(String, Props)> = Vec::new();
    let mut converged: Vec<(&Local, String)> = Vec::new();
    let mut theirs: Vec<(&Local, &Remote, Props)> = Vec::new();
    let mut conflicts: Vec<(&Local, &Remote, Props)> = Vec::new();
    for l in changed {
        let link = &links[&l.id];
        let Some(r) = remotes.get(&link.remote_id) else {
            next.counts(entity).failed += 1;
            lines.push(format!(
                "{} {}: its {} {} is gone from the CRM; not re-created",
                entity.name(),
                l.id,
                entity.object(),
                link.remote_id
            ));
            continue;
        };
        let props = match &r.props {
            Ok(p) => p.clone(),
            Err(why) => {
                next.counts(entity).failed += 1;
                lines.push(format!("{} {}: not taken: {why}", entity.object(), r.id));
                continue;
            }
        };
        if props == l.props {
            converged.push((l, r.id.clone()));
        } else if props == link.synced {
            updates.push((r.id.clone(), l.props.clone()));
        } else {
            match sync.on_conflict {
                OnConflict::ManualReview => conflicts.push((l, r, props)),
                OnConflict::LastWriteWins if r.updated_at >= l.updated_at => {
                    if sync.direction.pulls() {
                        theirs.push((l, r, props));
                    } else {
                        next.counts(entity).kept_remote += 1;
                    }
                }
                OnConflict::LastWriteWins => {
                    next.counts(entity).kept_local += 1;
                    lines.push(format!(
                        "{} {} and {} {} both changed: ours is later and was kept",
                        entity.name(),
                        l.id,
                        entity.object(),
                        r.id
                    ));
                    updates.push((r.id.clone(), l.props.clone()));
                }
            }
        }
    }
    let (updated, rejected_updates) = sync
        .write(ctx, &mut next, entity, &updates, |crm, e, inputs| {
            crm.update(e, inputs)
        })
        .await?;
    let (created, rejected_creates) = sync
        .write(ctx, &mut next, entity, &creates, |crm, e, inputs| {
            crm.upsert(e, inputs)
        })
        .await?;
    let now = ctx.now();
    let mut db = ctx.db().get().await.map_err(DbError::from)?;
    let tx = db.transaction().await?;
    // What each CRM record was sent, and whose it is; a record in the
    // answer that was not sent is ignored.
    let local_of: HashMap<&str, Uuid> = links
        .iter()
        .map(|(l, k)| (k.remote_id.as_str(), *l))
        .collect();
    let pushed_update: HashMap<&str, (Uuid, &Props)> = updates
        .iter()
        .filter_map(|(id, p)| Some((id.as_str(), (*local_of.get(id.as_str())?, p))))
        .collect();
    for r in &updated {
        if let Some((l, props)) = pushed_update.get(r.id.as_str()) {
            save_link(&tx, &scope, *l, &r.id, props, now).await?;
            next.counts(entity).pushed_updated += 1;
        }
    }
    let sent: HashMap<Uuid, &Props> = creates.iter().map(|(id, p)| (*id, p)).collect();
    for (i, r) in created.iter().enumerate() {
        let id = r
            .offload_id
            .or_else(|| (created.len() == creates.len()).then(|| creates[i].0));
        if let Some(id) = id.filter(|id| sent.contains_key(id)) {
            save_link(&tx, &scope, id, &r.id, sent[&id], now).await?;
            next.counts(entity).pushed_created += 1;
        }
    }
    for ((id, _), why) in &rejected_updates {
        next.counts(entity).failed += 1;
        lines.push(format!(
            "{} {id}: the CRM rejected the update: {why}",
            entity.object()
        ));
    }
    for ((id, _), why) in &rejected_creates {
        next.counts(entity).failed += 1;
        lines.push(format!(
            "{} {id}: the CRM rejected it: {why}",
            entity.name()
        ));
    }
    for (l, remote_id) in &converged {
        save_link(&tx, &scope, l.id, remote_id, &l.props, now).await?;
        next.counts(entity).unchanged += 1;
    }
    for (l, r, props) in &theirs {
        // Written only if ours did not change again since it was read.
        let stmt = tx
            .prepare_cached(&format!(
                "SELECT 1 FROM {} WHERE id = $1 AND workspace_id = $2 AND updated_at = $3 FOR UPDATE",
                entity.table()
            ))
            .await?;
        if tx
            .query_opt(&stmt, &[&l.id, &ws, &l.updated_at])
            .await?
            .is_some()
        {
            write_local(&tx, ws, entity, l.id, props, false, now).await?;
            save_link(&tx, &scope, l.id, &r.id, props, now).await?;
            next.counts(entity).kept_remote += 1;
            lines.push(format!(
                "{} {} and {} {} both changed: the CRM's is later and was kept",
                entity.name(),
                l.id,
                entity.object(),
                r.id
            ));
        }
    }
    for (l, r, props) in &conflicts {
        let id = park(&tx, ctx, provider, entity, l, r, props).await?;
        next.park(entity, id, l.id, &r.id);
        lines.push(format!(
            "{} {} and {} {} both changed: conflict {id} waits for review",
            entity.name(),
            l.id,
            entity.object(),
            r.id
        ));
    }
    next.push_from = Some(last);
    next.pages += 1;
    advance(&tx, ws, provider, entity, None, Some(last), now).await?;
    let c = next.counts(entity).clone();
    lines.push(format!(
        "pushed {} {}: {} created, {} updated, {} rejected so far",
        candidates.len(),
        entity.name(),
        c.pushed_created,
        c.pushed_updated,
        c.failed
    ));
    for line in lines {
        ctx.log_in(&tx, "info", line, None).await?;
    }
    ctx.save_checkpoint_in(&tx, &next).await?;
    tx.commit().await?;
    *cur = next;
    Ok(true)
}

/// Which side a person keeps when resolving a conflict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    /// Ours: the next push writes it to the CRM.
    Local,
    /// The CRM's values as the conflict holds them, written here now.
    Remote,
}

/// How resolving a conflict went.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    Done,
    NotFound,
    /// Resolved before, as this.
    Already(String),
    /// Our record is gone.
    Gone,
}

/// Resolves open conflict `id` of `ws`, keeping `keep`: the CRM's values
/// are written to our record, or ours are marked to be pushed (the link
/// takes the CRM's values as the last agreed, and the record's
/// `updated_at` moves so the next push scan sees it). Either way the
/// record syncs again.
pub async fn resolve_conflict(
    db: &mut deadpool_postgres::Object,
    ws: Uuid,
    id: i64,
    keep: Keep,
    now: DateTime<Utc>,
) -> Result<Resolved, DbError> {
    let tx = db.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "SELECT provider, entity, local_id, remote_id, remote, status FROM crm_conflicts \
             WHERE workspace_id = $1 AND id = $2 FOR UPDATE",
            &[&ws, &id],
        )
        .await?
    else {
        return Ok(Resolved::NotFound);
    };
    let status: String = row.get(5);
    if status != "open" {
        return Ok(Resolved::Already(status));
    }
    let provider: String = row.get(0);
    let entity = match row.get::<_, &str>(1) {
        "accounts" => CrmEntity::Accounts,
        _ => CrmEntity::Contacts,
    };
    let (local, remote_id): (Uuid, String) = (row.get(2), row.get(3));
    let remote: Props = serde_json::from_value(row.get(4)).unwrap_or_default();
    let scope = Scope {
        ws,
        provider: &provider,
        entity,
    };
    let written = match keep {
        Keep::Remote => write_local(&tx, ws, entity, local, &remote, false, now).await?,
        Keep::Local => {
            tx.execute(
                &format!(
                    "UPDATE {} SET updated_at = $3 WHERE id = $1 AND workspace_id = $2",
                    entity.table()
                ),
                &[&local, &ws, &now],
            )
            .await?
        }
    };
    if written == 0 {
        return Ok(Resolved::Gone);
    }
    save_link(&tx, &scope, local, &remote_id, &remote, now).await?;
    tx.execute(
        "UPDATE crm_conflicts SET status = $3, resolved_at = $4 WHERE workspace_id = $1 AND id = $2",
        &[
            &ws,
            &id,
            &match keep {
                Keep::Local => "kept_local",
                Keep::Remote => "kept_remote",
            },
            &now,
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(Resolved::Done)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Pull,
    Push,
}

/// Runs a sync from its checkpoint with any [`Crm`].
pub(crate) async fn run_sync(
    ctx: &mut JobContext,
    p: &SyncCrmPayload,
    config: &CrmConfig,
    crm: &dyn Crm,
) -> Result<Outcome, JobError> {
    let steps: Vec<(CrmEntity, Phase)> = p
        .entity_types
        .iter()
        .flat_map(|e| {
            let mut s = Vec::new();
            if p.direction.pulls() {
                s.push((*e, Phase::Pull));
            }
            if p.direction.pushes() {
                s.push((*e, Phase::Push));
            }
            s
        })
        .collect();
    let sync = Run {
        crm,
        config,
        direction: p.direction,
        on_conflict: p.on_conflict,
        since: p.since,
        bucket: format!("crm:{}:{}", ctx.workspace_id().0, config.name),
    };
    let mut cur: Checkpoint = ctx.checkpoint().unwrap_or_default();
    while let Some(&(entity, phase)) = steps.get(cur.step) {
        if ctx.cancelled().await? {
            return Ok(Outcome::Cancelled(Some(cur.result())));
        }
        if cur.pull_from.is_none() && cur.push_from.is_none() {
            let (pull, push) = starts(ctx, &config.name, entity, sync.since).await?;
            cur.pull_from = Some(pull);
            cur.push_from = Some(push);
            cur.pull_after = 0;
            cur.pull_seen.clear();
            cur.pull_skipped.clear();
        }
        let more = match phase {
            Phase::Pull => pull_page(ctx, &sync, entity, &mut cur).await,
            Phase::Push => push_page(ctx, &sync, entity, &mut cur).await,
        };
        match more {
            Ok(true) => {}
            Ok(false) => {
                cur.step += 1;
                cur.pull_from = None;
                cur.push_from = None;
                cur.pull_after = 0;
                cur.pull_seen.clear();
                cur.pull_skipped.clear();
                ctx.save_checkpoint(&cur).await?;
            }
            Err(Stop::Snooze(wait)) => {
                return Ok(Outcome::Snooze(wait.max(Duration::from_secs(1))))
            }
            Err(Stop::Failed(e)) => return Err(e),
        }
        let (done, failed) = cur.processed();
        ctx.progress(Progress {
            total: None,
            processed: done,
            failed,
            percentage: None,
            stage: Some(format!(
                "{} {}",
                match phase {
                    Phase::Pull => "pulling",
                    Phase::Push => "pushing",
                },
                entity.name()
            )),
            message: Some(format!("{} pages, {} calls", cur.pages, cur.calls)),
        })
        .await?;
        if steps.get(cur.step).is_some() && ctx.should_hand_off() {
            return Ok(ctx.hand_off(&cur));
        }
    }
    let (done, failed) = cur.processed();
    ctx.log(
        "info",
        format!(
            "sync with {} done: {done} records, {failed} failed, {} waiting for review; {} pages, {} calls",
            config.name,
            cur.counts.values().map(|c| c.manual_review).sum::<u64>(),
            cur.pages,
            cur.calls
        ),
        None,
    )
    .await?;
    Ok(Outcome::Completed(Some(cur.result())))
}

#[async_trait]
impl JobHandler for SyncCrm {
    type Payload = SyncCrmPayload;
    const TYPE: &'static str = "sync_crm";

    fn validate(&self, p: &SyncCrmPayload) -> Result<(), PayloadError> {
        if !super::enrich::valid_provider_name(&p.provider) {
            return Err(PayloadError::field(
                "provider",
                "the name of a configured CRM: 1 to 40 of a-z, 0-9, _ and -",
            ));
        }
        if p.entity_types.is_empty() {
            return Err(PayloadError::field(
                "entity_types",
                "one or both of \"contacts\" and \"accounts\"",
            ));
        }
        if let Some(i) =
            (1..p.entity_types.len()).find(|&i| p.entity_types[..i].contains(&p.entity_types[i]))
        {
            return Err(PayloadError::field(
                &format!("entity_types[{i}]"),
                "appears twice",
            ));
        }
        if p.since.is_some_and(|s| s.timestamp() < 0) {
            return Err(PayloadError::field("since", "a time from 1970 on"));
        }
        Ok(())
    }

    async fn run(&self, p: SyncCrmPayload, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let config = {
            let db = ctx.db().get().await.map_err(DbError::from)?;
            CrmConfig::load(&db, ctx.workspace_id().0, &p.provider).await?
        }
        .ok_or_else(|| {
            JobError::Permanent(format!(
                "no CRM {:?} is configured for this workspace",
                p.provider
            ))
        })?;
        let crm = HubSpot::connect(&config, self.allow_private).await?;
        run_sync(ctx, &p, &config, &crm).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_compared_in_one_spelling() {
        assert_eq!(
            norm(Kind::Email, " Ann@Acme.IO "),
            Ok(Some("ann@acme.io".into()))
        );
        assert_eq!(norm(Kind::Text, "  "), Ok(None));
        assert_eq!(norm(Kind::Count, "250.0"), Ok(Some("250".into())));
        assert!(norm(Kind::Count, "-3").is_err());
        assert_eq!(norm(Kind::Money, "1000.00"), Ok(Some("1000".into())));
        assert_eq!(norm(Kind::Money, "1234.567"), Ok(Some("1234.57".into())));
        assert!(norm(Kind::Money, "lots").is_err());
        assert!(norm(Kind::Email, "a b@c").is_err());
    }

    #[test]
    fn statements_name_every_synced_field() {
        let u = CrmEntity::Accounts.update();
        assert!(u.contains("employee_count = $6::text::int4"), "{u}");
        assert!(u.contains("updated_at = $8"), "{u}");
        let i = CrmEntity::Contacts.insert();
        assert!(i.contains("VALUES ($1, $2, $3::text, $4::text, $5::text, $6::text, $7::text, $8::text, $9, $9)"), "{i}");
    }

    #[test]
    fn a_hubspot_record_is_read_with_its_values_checked() {
        let r = remote_of(
            CrmEntity::Accounts,
            &json!({"id": "42", "updatedAt": "2026-01-02T03:04:05.678Z",
                    "properties": {"name": "Acme", "domain": "ACME.io", "numberofemployees": "12",
                                   "annualrevenue": "", "offload_id": "2c5ea4c0-4067-11e9-8bad-9b1deb4d3b7d"}}),
        )
        .unwrap();
        assert_eq!(r.id, "42");
        let p = r.props.unwrap();
        assert_eq!(p["domain"].as_deref(), Some("acme.io"));
        assert_eq!(p["annualrevenue"], None);
        assert_eq!(p["industry"], None);
        assert!(r.offload_id.is_some());
        let bad = remote_of(
            CrmEntity::Accounts,
            &json!({"id": "7", "updatedAt": "2026-01-02T03:04:05Z",
                    "properties": {"numberofemployees": "many"}}),
        )
        .unwrap();
        assert!(bad.props.unwrap_err().contains("numberofemployees"));
        assert!(remote_of(CrmEntity::Contacts, &json!({"id": "1", "properties": {}})).is_err());
    }
}
