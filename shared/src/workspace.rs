//! Workspaces (tenants), their members and their tier limits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tokio_postgres::GenericClient;

use crate::db::DbError;
use crate::ids::{UserId, WorkspaceId};

/// A workspace's plan; it sets the defaults of its limits (DESIGN.md "Tiers").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Free,
    #[default]
    Standard,
    Enterprise,
    /// No limits: self-hosted teams and benchmarks.
    Unlimited,
}

/// The limits in force for one workspace; `None` means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_running: Option<i64>,
    pub max_created_per_user_hour: Option<i64>,
    pub max_unfinished: Option<i64>,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Standard => "standard",
            Tier::Enterprise => "enterprise",
            Tier::Unlimited => "unlimited",
        }
    }

    pub fn limits(self) -> Limits {
        let l = |a, b, c| Limits {
            max_running: Some(a),
            max_created_per_user_hour: Some(b),
            max_unfinished: Some(c),
        };
        match self {
            Tier::Free => l(1, 10, 100),
            Tier::Standard => l(5, 1_000, 10_000),
            Tier::Enterprise => l(20, 100_000, 1_000_000),
            Tier::Unlimited => Limits {
                max_running: None,
                max_created_per_user_hour: None,
                max_unfinished: None,
            },
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Tier::Free,
            Tier::Standard,
            Tier::Enterprise,
            Tier::Unlimited,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
        .ok_or_else(|| {
            format!("unknown tier {s:?}; expected free, standard, enterprise or unlimited")
        })
    }
}

/// A member's role in a workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Member,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
        }
    }
}

/// Creates a workspace, or leaves an existing one with the same id as it is.
pub async fn ensure_workspace(
    db: &impl GenericClient,
    id: WorkspaceId,
    name: &str,
    tier: Tier,
) -> Result<(), DbError> {
    db.execute(
        "INSERT INTO workspaces (id, name, tier) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
        &[&id.0, &name, &tier.as_str()],
    )
    .await?;
    Ok(())
}

/// Makes `user` a member of `workspace` with `role` (updating the role if
/// they already are one).
pub async fn add_member(
    db: &impl GenericClient,
    workspace: WorkspaceId,
    user: UserId,
    role: Role,
) -> Result<(), DbError> {
    db.execute(
        "INSERT INTO workspace_members (workspace_id, user_id, role) VALUES ($1, $2, $3) \
         ON CONFLICT (workspace_id, user_id) DO UPDATE SET role = EXCLUDED.role",
        &[&workspace.0, &user.0, &role.as_str()],
    )
    .await?;
    Ok(())
}

/// A member of a workspace: `id` is what their jobs' `created_by` holds;
/// `issuer` is `None` for "any issuer this deployment accepts".
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct MemberRecord {
    #[schema(value_type = uuid::Uuid)]
    pub id: UserId,
    pub subject: String,
    pub issuer: Option<String>,
    #[schema(value_type = String, example = "member")]
    pub role: Role,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

const MEMBER_COLUMNS: &str = "user_id, subject, issuer, role, created_at";

fn member_from_row(r: &tokio_postgres::Row) -> MemberRecord {
    let issuer: String = r.get("issuer");
    MemberRecord {
        id: UserId(r.get("user_id")),
        subject: r.get("subject"),
        issuer: (!issuer.is_empty()).then_some(issuer),
        role: role_of(r.get("role")),
        created_at: r.get("created_at"),
    }
}

fn role_of(s: &str) -> Role {
    if s == "admin" {
        Role::Admin
    } else {
        Role::Member
    }
}

/// Makes `subject` of `issuer` (`None`: any issuer) a member of `workspace`
/// with `role`, or gives an existing member that role; `true` when the
/// member is new.
pub async fn put_member(
    db: &impl GenericClient,
    workspace: WorkspaceId,
    subject: &str,
    issuer: Option<&str>,
    role: Role,
) -> Result<(MemberRecord, bool), DbError> {
    let row = db
        .query_one(
            &format!(
                "INSERT INTO workspace_members (workspace_id, user_id, subject, issuer, role) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (workspace_id, subject, issuer) DO UPDATE SET role = EXCLUDED.role \
                 RETURNING {MEMBER_COLUMNS}, (xmax = 0) AS inserted"
            ),
            &[
                &workspace.0,
                &uuid::Uuid::now_v7(),
                &subject,
                &issuer.unwrap_or_default(),
                &role.as_str(),
            ],
        )
        .await?;
    Ok((member_from_row(&row), row.get("inserted")))
}

/// Whether taking the admin role from the member `(subject, issuer)` (or
/// the member `id`) would leave the workspace without an admin.
pub async fn is_last_admin(
    db: &impl GenericClient,
    workspace: WorkspaceId,
    member: Result<UserId, (&str, Option<&str>)>,
) -> Result<bool, DbError> {
    let (id, subject, issuer) = match member {
        Ok(id) => (Some(id.0), None, None),
        Err((s, i)) => (None, Some(s), Some(i.unwrap_or_default())),
    };
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE role = 'admin') = 1 \
                    AND bool_or(role = 'admin' AND (user_id = $2 OR (subject = $3 AND issuer = $4))) \
             FROM workspace_members WHERE workspace_id = $1",
            &[&workspace.0, &id, &subject, &issuer],
        )
        .await?;
    Ok(row.get::<_, Option<bool>>(0).unwrap_or(false))
}

/// The workspace's members, oldest first.
pub async fn members(
    db: &impl GenericClient,
    workspace: WorkspaceId,
) -> Result<Vec<MemberRecord>, DbError> {
    let rows = db
        .query(
            &format!(
                "SELECT {MEMBER_COLUMNS} FROM workspace_members WHERE workspace_id = $1 \
                 ORDER BY created_at, user_id"
            ),
            &[&workspace.0],
        )
        .await?;
    Ok(rows.iter().map(member_from_row).collect())
}

/// Removes a member; `false` when the workspace has none with that id.
pub async fn remove_member(
    db: &impl GenericClient,
    workspace: WorkspaceId,
    id: UserId,
) -> Result<bool, DbError> {
    let n = db
        .execute(
            "DELETE FROM workspace_members WHERE workspace_id = $1 AND user_id = $2",
            &[&workspace.0, &id.0],
        )
        .await?;
    Ok(n == 1)
}

/// The member a verified token names in the workspace, with their role, or
/// `None` when they are not one (or the workspace does not exist, or is
/// being deleted: all indistinguishable on purpose). A member added for
/// one issuer is found before one added for any issuer.
pub async fn member_role(
    db: &deadpool_postgres::Object,
    workspace: WorkspaceId,
    who: &crate::auth::Identity,
) -> Result<Option<(UserId, Role)>, DbError> {
    // Asked on every request: prepared once per connection.
    let stmt = db
        .prepare_cached(
            "SELECT m.user_id, m.role FROM workspace_members m \
             JOIN workspaces w ON w.id = m.workspace_id AND w.deleting_at IS NULL \
             WHERE m.workspace_id = $1 AND m.subject = $2 AND m.issuer IN ($3, '') \
             ORDER BY m.issuer DESC LIMIT 1",
        )
        .await?;
    let row = db
        .query_opt(
            &stmt,
            &[
                &workspace.0,
                &who.subject,
                &who.issuer.as_deref().unwrap_or_default(),
            ],
        )
        .await?;
    Ok(row.map(|r| (UserId(r.get(0)), role_of(r.get(1)))))
}

/// The limits in force for a workspace: its tier's, with its overrides.
pub async fn limits(db: &impl GenericClient, workspace: WorkspaceId) -> Result<Limits, DbError> {
    let row = db
        .query_opt(
            "SELECT tier, max_running, max_created_per_user_hour, max_unfinished \
             FROM workspaces WHERE id = $1",
            &[&workspace.0],
        )
        .await?;
    let Some(row) = row else {
        return Ok(Tier::Free.limits());
    };
    let tier: Tier = row.get::<_, &str>(0).parse().unwrap_or_default();
    let base = tier.limits();
    let over = |i: usize, d: Option<i64>| row.get::<_, Option<i32>>(i).map(i64::from).or(d);
    Ok(Limits {
        max_running: over(1, base.max_running),
        max_created_per_user_hour: over(2, base.max_created_per_user_hour),
        max_unfinished: over(3, base.max_unfinished),
    })
}

/// How long a worker trusts a workspace's limit before reading it again.
const LIMIT_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// The worker's cache of workspaces' concurrency limits, so a claim needs no
/// extra statement for workspaces it has seen lately.
#[derive(Default)]
pub struct LimitCache {
    entries:
        std::sync::Mutex<std::collections::HashMap<WorkspaceId, (Option<i64>, std::time::Instant)>>,
}

impl LimitCache {
    /// The concurrency limits of those of `workspaces` that have one, each
    /// workspace once (callers pass one id per job).
    pub async fn max_running(
        &self,
        pool: &deadpool_postgres::Pool,
        workspaces: &[WorkspaceId],
    ) -> Result<Vec<(WorkspaceId, i64)>, DbError> {
        let mut out = Vec::new();
        let mut missing = Vec::new();
        let mut unique = workspaces.to_vec();
        unique.sort();
        unique.dedup();
        {
            let entries = self.entries.lock().expect("limit cache poisoned");
            for ws in &unique {
                match entries.get(ws) {
                    Some((limit, at)) if at.elapsed() < LIMIT_TTL => {
                        if let Some(l) = limit {
                            out.push((*ws, *l));
                        }
                    }
                    _ => missing.push(ws.0),
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        missing.sort();
        missing.dedup();
        let db = pool.get().await?;
        let rows = db
            .query(
                "SELECT id, tier, max_running FROM workspaces WHERE id = ANY($1)",
                &[&missing],
            )
            .await?;
        let now = std::time::Instant::now();
        let mut entries = self.entries.lock().expect("limit cache poisoned");
        for r in rows {
            let ws = WorkspaceId(r.get(0));
            let tier: Tier = r.get::<_, &str>(1).parse().unwrap_or_default();
            let limit = r
                .get::<_, Option<i32>>(2)
                .map(i64::from)
                .or(tier.limits().max_running);
            entries.insert(ws, (limit, now));
            if let Some(l) = limit {
                out.push((ws, l));
            }
        }
        Ok(out)
    }
}
