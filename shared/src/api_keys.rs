//! Workspace API keys (`ofk_…`): how a web app's servers call the API
//! without a user. A key belongs to one workspace, carries a role, and is
//! stored only as its SHA-256; the secret is shown once, when it is made.

use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::db::DbError;
use crate::ids::{UserId, WorkspaceId};
use crate::workspace::Role;

/// What every key starts with, so secret scanners and people recognise it.
pub const PREFIX: &str = "ofk_";
/// Characters of a key kept in the clear to tell keys apart.
const SHOWN: usize = PREFIX.len() + 6;

/// A key as listed: never its secret.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiKey {
    pub id: Uuid,
    pub workspace_id: WorkspaceId,
    pub name: String,
    pub role: Role,
    /// The key's first characters, e.g. `ofk_3fQx9a`.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Whether a bearer token is an API key rather than a JWT.
pub fn is_api_key(token: &str) -> bool {
    token.starts_with(PREFIX)
}

/// What is kept of a secret: its SHA-256.
pub(crate) fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A new secret: `prefix` and 32 random bytes in URL-safe base64.
pub(crate) fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn role(s: &str) -> Role {
    if s == "admin" {
        Role::Admin
    } else {
        Role::Member
    }
}

fn from_row(r: &tokio_postgres::Row) -> ApiKey {
    ApiKey {
        id: r.get("id"),
        workspace_id: WorkspaceId(r.get("workspace_id")),
        name: r.get("name"),
        role: role(r.get("role")),
        prefix: r.get("prefix"),
        created_at: r.get("created_at"),
        last_used_at: r.get("last_used_at"),
    }
}

const COLUMNS: &str = "id, workspace_id, name, role, prefix, created_at, last_used_at";

/// Makes a key; returns it and its secret, which is not kept.
pub async fn create(
    db: &impl GenericClient,
    workspace: WorkspaceId,
    name: &str,
    role: Role,
    created_by: UserId,
) -> Result<(ApiKey, String), DbError> {
    let secret = new_secret(PREFIX);
    let row = db
        .query_one(
            &format!(
                "INSERT INTO api_keys (id, workspace_id, name, role, secret_hash, prefix, created_by) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}"
            ),
            &[
                &Uuid::now_v7(),
                &workspace.0,
                &name,
                &role.as_str(),
                &hash(&secret),
                &&secret[..SHOWN],
                &created_by.0,
            ],
        )
        .await?;
    Ok((from_row(&row), secret))
}

/// The workspace's keys, oldest first.
pub async fn list(db: &impl GenericClient, workspace: WorkspaceId) -> Result<Vec<ApiKey>, DbError> {
    let rows = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM api_keys WHERE workspace_id = $1 ORDER BY created_at, id"
            ),
            &[&workspace.0],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect())
}

/// Revokes a key of the workspace; `false` if it has none with that id.
pub async fn revoke(
    db: &impl GenericClient,
    workspace: WorkspaceId,
    id: Uuid,
) -> Result<bool, DbError> {
    let n = db
        .execute(
            "DELETE FROM api_keys WHERE workspace_id = $1 AND id = $2",
            &[&workspace.0, &id],
        )
        .await?;
    Ok(n == 1)
}

/// The key whose secret this is, if any (none while its workspace is
/// being deleted), noting its use (at most once a
/// minute per key, so a busy server does not write on every request).
pub async fn authenticate(
    db: &deadpool_postgres::Object,
    secret: &str,
) -> Result<Option<ApiKey>, DbError> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM api_keys WHERE secret_hash = $1 AND NOT EXISTS \
             (SELECT 1 FROM workspaces w WHERE w.id = api_keys.workspace_id \
              AND w.deleting_at IS NOT NULL)"
        ))
        .await?;
    let Some(row) = db.query_opt(&stmt, &[&hash(secret)]).await? else {
        return Ok(None);
    };
    let key = from_row(&row);
    if key
        .last_used_at
        .is_none_or(|t| Utc::now() - t > chrono::Duration::minutes(1))
    {
        db.execute(
            "UPDATE api_keys SET last_used_at = now() WHERE id = $1",
            &[&key.id],
        )
        .await?;
    }
    Ok(Some(key))
}
