//! The platform: how a web app's server provisions its tenants. A platform
//! key (`ofp_…`, made by `offload platform-key create`, stored as its
//! SHA-256 like API keys) creates, finds, changes and deletes workspaces
//! and manages their members; it opens no workspace's jobs. Deleting a
//! workspace marks it (nobody opens it from then on) and hands the removal
//! of its jobs, files and rows to a `workspace_delete` job in the
//! platform's own workspace, [`PLATFORM_WORKSPACE`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::api_keys::{hash, new_secret};
use crate::db::DbError;
use crate::ids::WorkspaceId;
use crate::workspace::Tier;

/// What every platform key starts with.
pub const PREFIX: &str = "ofp_";
/// Characters of a key kept in the clear to tell keys apart.
const SHOWN: usize = PREFIX.len() + 6;

/// The platform's own workspace (V17): it holds the jobs that work on whole
/// workspaces. No member, no key opens it.
pub const PLATFORM_WORKSPACE: WorkspaceId = WorkspaceId(Uuid::nil());

/// Whether a bearer token is a platform key.
pub fn is_platform_key(token: &str) -> bool {
    token.starts_with(PREFIX)
}

/// A platform key as listed: never its secret.
#[derive(Clone, Debug)]
pub struct PlatformKey {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
}

/// Makes a platform key; returns it and its secret, which is not kept.
pub async fn create_key(
    db: &impl GenericClient,
    name: &str,
) -> Result<(PlatformKey, String), DbError> {
    let secret = new_secret(PREFIX);
    let row = db
        .query_one(
            "INSERT INTO platform_keys (id, name, secret_hash, prefix) VALUES ($1, $2, $3, $4) \
             RETURNING id, name, prefix, created_at",
            &[&Uuid::now_v7(), &name, &hash(&secret), &&secret[..SHOWN]],
        )
        .await?;
    Ok((
        PlatformKey {
            id: row.get(0),
            name: row.get(1),
            prefix: row.get(2),
            created_at: row.get(3),
        },
        secret,
    ))
}

/// Every platform key, oldest first, with when it was last used.
pub async fn list_keys(
    db: &impl GenericClient,
) -> Result<Vec<(PlatformKey, Option<DateTime<Utc>>)>, DbError> {
    let rows = db
        .query(
            "SELECT id, name, prefix, created_at, last_used_at FROM platform_keys \
             ORDER BY created_at, id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                PlatformKey {
                    id: r.get(0),
                    name: r.get(1),
                    prefix: r.get(2),
                    created_at: r.get(3),
                },
                r.get(4),
            )
        })
        .collect())
}

/// Revokes a platform key: it answers 401 from its next request. `false`
/// when there is no such key.
pub async fn revoke_key(db: &impl GenericClient, id: Uuid) -> Result<bool, DbError> {
    Ok(db
        .execute("DELETE FROM platform_keys WHERE id = $1", &[&id])
        .await?
        == 1)
}

/// The id of the platform key whose secret this is, if any, noting its use
/// at most once a minute.
pub async fn authenticate(
    db: &deadpool_postgres::Object,
    secret: &str,
) -> Result<Option<Uuid>, DbError> {
    let stmt = db
        .prepare_cached("SELECT id, last_used_at FROM platform_keys WHERE secret_hash = $1")
        .await?;
    let Some(row) = db.query_opt(&stmt, &[&hash(secret)]).await? else {
        return Ok(None);
    };
    let id: Uuid = row.get(0);
    let used: Option<DateTime<Utc>> = row.get(1);
    if used.is_none_or(|t| Utc::now() - t > chrono::Duration::minutes(1)) {
        db.execute(
            "UPDATE platform_keys SET last_used_at = now() WHERE id = $1",
            &[&id],
        )
        .await?;
    }
    Ok(Some(id))
}

/// A workspace's own limits, each replacing its tier's; `null` keeps the
/// tier's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    /// Jobs running at once.
    #[serde(default)]
    pub max_running: Option<i32>,
    /// Jobs one user (or API key) may create per hour.
    #[serde(default)]
    pub max_created_per_user_hour: Option<i32>,
    /// Jobs the whole workspace may create per hour.
    #[serde(default)]
    pub max_created_per_hour: Option<i32>,
    /// Jobs waiting or running at once.
    #[serde(default)]
    pub max_unfinished: Option<i32>,
}

impl LimitOverrides {
    /// The first limit that is not a positive number, by name.
    pub fn invalid(&self) -> Option<&'static str> {
        [
            ("max_running", self.max_running),
            ("max_created_per_user_hour", self.max_created_per_user_hour),
            ("max_created_per_hour", self.max_created_per_hour),
            ("max_unfinished", self.max_unfinished),
        ]
        .into_iter()
        .find(|(_, v)| v.is_some_and(|n| n < 1))
        .map(|(name, _)| name)
    }
}

/// A workspace as the platform routes show it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct WorkspaceRecord {
    #[schema(value_type = Uuid)]
    pub id: WorkspaceId,
    pub name: String,
    #[schema(value_type = String, example = "standard")]
    pub tier: Tier,
    /// The app's own id for this tenant, when it gave one.
    pub external_id: Option<String>,
    pub limits: LimitOverrides,
    pub created_at: DateTime<Utc>,
    /// Set once a delete was asked: the workspace answers nobody from then
    /// on, and its rows are being removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleting_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, name, tier, external_id, max_running, max_created_per_user_hour, \
     max_created_per_hour, max_unfinished, created_at, deleting_at";

fn from_row(r: &tokio_postgres::Row) -> WorkspaceRecord {
    WorkspaceRecord {
        id: WorkspaceId(r.get("id")),
        name: r.get("name"),
        tier: r.get::<_, &str>("tier").parse().unwrap_or_default(),
        external_id: r.get("external_id"),
        limits: LimitOverrides {
            max_running: r.get("max_running"),
            max_created_per_user_hour: r.get("max_created_per_user_hour"),
            max_created_per_hour: r.get("max_created_per_hour"),
            max_unfinished: r.get("max_unfinished"),
        },
        created_at: r.get("created_at"),
        deleting_at: r.get("deleting_at"),
    }
}

/// Creates a workspace, or, when one already has `external_id`, returns
/// that one with `false` (whatever else was asked: provisioning is safe to
/// repeat).
pub async fn create_workspace(
    db: &impl GenericClient,
    name: &str,
    tier: Tier,
    external_id: Option<&str>,
    limits: LimitOverrides,
) -> Result<(WorkspaceRecord, bool), DbError> {
    // A racing create with the same external id inserts nothing here and
    // finds the winner's row below.
    let inserted = db
        .query_opt(
            &format!(
                "INSERT INTO workspaces (id, name, tier, external_id, max_running, \
                 max_created_per_user_hour, max_created_per_hour, max_unfinished) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (external_id) WHERE external_id IS NOT NULL DO NOTHING \
                 RETURNING {COLUMNS}"
            ),
            &[
                &WorkspaceId::new().0,
                &name,
                &tier.as_str(),
                &external_id,
                &limits.max_running,
                &limits.max_created_per_user_hour,
                &limits.max_created_per_hour,
                &limits.max_unfinished,
            ],
        )
        .await?;
    if let Some(row) = inserted {
        return Ok((from_row(&row), true));
    }
    let row = db
        .query_one(
            &format!("SELECT {COLUMNS} FROM workspaces WHERE external_id = $1"),
            &[&external_id],
        )
        .await?;
    Ok((from_row(&row), false))
}

/// A workspace by id (not the platform's own).
pub async fn workspace(
    db: &impl GenericClient,
    id: WorkspaceId,
) -> Result<Option<WorkspaceRecord>, DbError> {
    if id == PLATFORM_WORKSPACE {
        return Ok(None);
    }
    let row = db
        .query_opt(
            &format!("SELECT {COLUMNS} FROM workspaces WHERE id = $1"),
            &[&id.0],
        )
        .await?;
    Ok(row.as_ref().map(from_row))
}

/// The workspace the app knows by `external_id`.
pub async fn by_external_id(
    db: &impl GenericClient,
    external_id: &str,
) -> Result<Option<WorkspaceRecord>, DbError> {
    let row = db
        .query_opt(
            &format!("SELECT {COLUMNS} FROM workspaces WHERE external_id = $1"),
            &[&external_id],
        )
        .await?;
    Ok(row.as_ref().map(from_row))
}

/// Workspaces in creation order after `after`, at most `limit`.
pub async fn list(
    db: &impl GenericClient,
    after: Option<WorkspaceId>,
    limit: i64,
) -> Result<Vec<WorkspaceRecord>, DbError> {
    let rows = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM workspaces WHERE id <> $1 AND ($2::uuid IS NULL OR id > $2) \
                 ORDER BY id LIMIT $3"
            ),
            &[&PLATFORM_WORKSPACE.0, &after.map(|a| a.0), &limit],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect())
}

/// What a `PATCH` changes: each field given replaces the stored one; a
/// limit given as `null` goes back to the tier's.
#[derive(Debug, Default)]
pub struct Change {
    pub name: Option<String>,
    pub tier: Option<Tier>,
    pub external_id: Option<Option<String>>,
    pub max_running: Option<Option<i32>>,
    pub max_created_per_user_hour: Option<Option<i32>>,
    pub max_created_per_hour: Option<Option<i32>>,
    pub max_unfinished: Option<Option<i32>>,
}

/// Applies `change` to a workspace that is not being deleted; `None` when
/// there is no such workspace.
pub async fn update(
    db: &impl GenericClient,
    id: WorkspaceId,
    change: &Change,
) -> Result<Option<WorkspaceRecord>, DbError> {
    if id == PLATFORM_WORKSPACE {
        return Ok(None);
    }
    let given = |o: &Option<Option<i32>>| o.is_some();
    let row = db
        .query_opt(
            &format!(
                "UPDATE workspaces SET \
                   name = coalesce($2, name), \
                   tier = coalesce($3, tier), \
                   external_id = CASE WHEN $4 THEN $5 ELSE external_id END, \
                   max_running = CASE WHEN $6 THEN $7 ELSE max_running END, \
                   max_created_per_user_hour = CASE WHEN $8 THEN $9 ELSE max_created_per_user_hour END, \
                   max_created_per_hour = CASE WHEN $10 THEN $11 ELSE max_created_per_hour END, \
                   max_unfinished = CASE WHEN $12 THEN $13 ELSE max_unfinished END \
                 WHERE id = $1 AND deleting_at IS NULL RETURNING {COLUMNS}"
            ),
            &[
                &id.0,
                &change.name,
                &change.tier.map(Tier::as_str),
                &change.external_id.is_some(),
                &change.external_id.clone().flatten(),
                &given(&change.max_running),
                &change.max_running.flatten(),
                &given(&change.max_created_per_user_hour),
                &change.max_created_per_user_hour.flatten(),
                &given(&change.max_created_per_hour),
                &change.max_created_per_hour.flatten(),
                &given(&change.max_unfinished),
                &change.max_unfinished.flatten(),
            ],
        )
        .await?;
    Ok(row.as_ref().map(from_row))
}

/// Marks a workspace deleted (its members, keys and browser tokens open
/// nothing from this statement on) and disables its schedules in the same
/// transaction; its removal job then stops its jobs first. The record, or
/// `None` when there is no such workspace.
pub async fn mark_deleting(
    db: &mut deadpool_postgres::Object,
    id: WorkspaceId,
) -> Result<Option<WorkspaceRecord>, DbError> {
    if id == PLATFORM_WORKSPACE {
        return Ok(None);
    }
    let tx = db.transaction().await?;
    let row = tx
        .query_opt(
            &format!(
                "UPDATE workspaces SET deleting_at = coalesce(deleting_at, now()) \
                 WHERE id = $1 RETURNING {COLUMNS}"
            ),
            &[&id.0],
        )
        .await?;
    if row.is_some() {
        tx.execute(
            "UPDATE schedules SET enabled = false WHERE workspace_id = $1 AND enabled",
            &[&id.0],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(row.as_ref().map(from_row))
}

/// The idempotency key of the job removing `ws`: a delete asked twice makes
/// one job.
pub fn deletion_key(ws: WorkspaceId) -> String {
    format!("workspace-delete:{ws}")
}
