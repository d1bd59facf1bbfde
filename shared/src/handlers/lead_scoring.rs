//! `lead_scoring`: scores contacts by the product's rules, for one contact
//! or the whole workspace (in keyset-paginated batches, resumable). A daily
//! run is one schedule away: `{"cron": "0 2 * * *", "type": "lead_scoring"}`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::{JobContext, JobError, JobHandler, Outcome};
use crate::db::DbError;
use crate::job::Progress;

pub struct LeadScoring;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeadScoringPayload {
    /// One contact; absent: every contact of the workspace.
    pub contact_id: Option<Uuid>,
}

/// What the rules look at.
#[derive(Debug, Default, Clone)]
pub struct Lead {
    pub email: Option<String>,
    pub phone: Option<String>,
    pub company: Option<String>,
    pub title: Option<String>,
    pub estimated_value: Option<f64>,
    pub stage: String,
    pub last_activity_at: Option<DateTime<Utc>>,
}

/// Free-mail domains: an address there says nothing about a company.
const FREE_MAIL: &[&str] = &[
    "gmail.com",
    "googlemail.com",
    "yahoo.com",
    "hotmail.com",
    "outlook.com",
    "live.com",
    "icloud.com",
    "me.com",
    "aol.com",
    "proton.me",
    "protonmail.com",
    "gmx.com",
    "gmx.de",
    "mail.com",
    "yandex.com",
    "zoho.com",
];

fn present(s: &Option<String>) -> bool {
    s.as_deref().is_some_and(|s| !s.trim().is_empty())
}

/// The product's scoring rules:
/// e-mail present +15, on a corporate (not free-mail) domain +10; phone +10;
/// company +10; a title +10, or +15 for C-level and VP titles; estimated
/// value +10 (any), +15 (≥ 10 000) or +20 (≥ 50 000); stage lead 0, mql +10,
/// sql +25, opportunity +40, customer +50; activity in the last 7 days +10,
/// in the last 30 days +5.
pub fn score(lead: &Lead, now: DateTime<Utc>) -> i32 {
    let mut s = 0;
    if present(&lead.email) {
        s += 15;
        let domain = lead
            .email
            .as_deref()
            .and_then(|e| e.rsplit_once('@'))
            .map(|(_, d)| d.trim().to_lowercase());
        if domain.is_some_and(|d| !d.is_empty() && !FREE_MAIL.contains(&d.as_str())) {
            s += 10;
        }
    }
    if present(&lead.phone) {
        s += 10;
    }
    if present(&lead.company) {
        s += 10;
    }
    if let Some(title) = lead.title.as_deref().filter(|t| !t.trim().is_empty()) {
        let t = title.to_lowercase();
        let senior = t.contains("chief")
            || t.contains("vice president")
            || t.split(|c: char| !c.is_alphanumeric()).any(|w| {
                matches!(
                    w,
                    "ceo" | "cto" | "cfo" | "coo" | "cmo" | "cio" | "vp" | "svp" | "evp"
                )
            });
        s += if senior { 15 } else { 10 };
    }
    match lead.estimated_value {
        Some(v) if v >= 50_000.0 => s += 20,
        Some(v) if v >= 10_000.0 => s += 15,
        Some(v) if v > 0.0 => s += 10,
        _ => {}
    }
    s += match lead.stage.as_str() {
        "mql" => 10,
        "sql" => 25,
        "opportunity" => 40,
        "customer" => 50,
        _ => 0,
    };
    if let Some(at) = lead.last_activity_at {
        let age = now - at;
        if age <= chrono::Duration::days(7) {
            s += 10;
        } else if age <= chrono::Duration::days(30) {
            s += 5;
        }
    }
    s
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Cursor {
    after: Option<Uuid>,
    scored: u64,
    total: u64,
}

const BATCH: i64 = 500;

#[async_trait]
impl JobHandler for LeadScoring {
    type Payload = LeadScoringPayload;
    const TYPE: &'static str = "lead_scoring";

    async fn run(&self, p: LeadScoringPayload, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        let ws = ctx.workspace_id().0;
        let mut cur: Cursor = match ctx.checkpoint() {
            Some(c) => c,
            None => {
                let db = ctx.db().get().await.map_err(DbError::from)?;
                let total: i64 = match p.contact_id {
                    Some(id) => {
                        db.query_one(
                            "SELECT count(*) FROM contacts WHERE workspace_id = $1 AND id = $2",
                            &[&ws, &id],
                        )
                        .await
                    }
                    None => {
                        db.query_one(
                            "SELECT count(*) FROM contacts WHERE workspace_id = $1",
                            &[&ws],
                        )
                        .await
                    }
                }
                .map_err(DbError::from)?
                .get(0);
                if total == 0 && p.contact_id.is_some() {
                    return Err(JobError::Permanent(
                        "contact not found in this workspace".into(),
                    ));
                }
                Cursor {
                    total: total as u64,
                    ..Cursor::default()
                }
            }
        };
        loop {
            if ctx.cancelled().await? {
                return Ok(Outcome::Cancelled(Some(json!({ "scored": cur.scored }))));
            }
            if ctx.should_hand_off() {
                return Ok(ctx.hand_off(&cur));
            }
            let db = ctx.db().get().await.map_err(DbError::from)?;
            let stmt = db
                .prepare_cached(
                    "SELECT id, email, phone, company, title, estimated_value::float8, stage, last_activity_at \
                     FROM contacts WHERE workspace_id = $1 AND ($2::uuid IS NULL OR id > $2) \
                       AND ($3::uuid IS NULL OR id = $3) \
                     ORDER BY id LIMIT $4",
                )
                .await
                .map_err(DbError::from)?;
            let rows = db
                .query(&stmt, &[&ws, &cur.after, &p.contact_id, &BATCH])
                .await
                .map_err(DbError::from)?;
            if rows.is_empty() {
                break;
            }
            let now = Utc::now();
            let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
            let scores: Vec<i32> = rows
                .iter()
                .map(|r| {
                    score(
                        &Lead {
                            email: r.get(1),
                            phone: r.get(2),
                            company: r.get(3),
                            title: r.get(4),
                            estimated_value: r.get(5),
                            stage: r.get(6),
                            last_activity_at: r.get(7),
                        },
                        now,
                    )
                })
                .collect();
            let update = db
                .prepare_cached(
                    "UPDATE contacts SET score = u.s, scored_at = $4, updated_at = $4 \
                     FROM unnest($1::uuid[], $2::int4[]) AS u(cid, s) \
                     WHERE id = u.cid AND workspace_id = $3",
                )
                .await
                .map_err(DbError::from)?;
            db.execute(&update, &[&ids, &scores, &ws, &now])
                .await
                .map_err(DbError::from)?;
            drop(db);
            cur.scored += ids.len() as u64;
            cur.after = ids.last().copied();
            ctx.save_checkpoint(&cur).await?;
            ctx.progress(Progress {
                stage: Some("scoring".into()),
                ..Progress::of(cur.scored, cur.total.max(cur.scored))
            })
            .await?;
            if p.contact_id.is_some() || (ids.len() as i64) < BATCH {
                break;
            }
        }
        ctx.log("info", format!("Scored {} contacts", cur.scored), None)
            .await?;
        Ok(Outcome::Completed(Some(json!({ "scored": cur.scored }))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn an_empty_lead_scores_zero() {
        assert_eq!(
            score(
                &Lead {
                    stage: "lead".into(),
                    ..Lead::default()
                },
                now()
            ),
            0
        );
    }

    #[test]
    fn each_rule_adds_its_points() {
        let base = Lead {
            stage: "lead".into(),
            ..Lead::default()
        };
        let with = |f: &dyn Fn(&mut Lead)| {
            let mut l = base.clone();
            f(&mut l);
            score(&l, now())
        };
        assert_eq!(with(&|l| l.email = Some("ann@gmail.com".into())), 15);
        assert_eq!(with(&|l| l.email = Some("ann@acme.io".into())), 25);
        assert_eq!(with(&|l| l.phone = Some("+33 1 23".into())), 10);
        assert_eq!(with(&|l| l.company = Some("Acme".into())), 10);
        assert_eq!(with(&|l| l.title = Some("Engineer".into())), 10);
        assert_eq!(with(&|l| l.title = Some("VP Sales".into())), 15);
        assert_eq!(
            with(&|l| l.title = Some("Chief Executive Officer".into())),
            15
        );
        assert_eq!(
            with(&|l| l.title = Some("Development lead".into())),
            10,
            "'dev' is not 'vp'"
        );
        assert_eq!(with(&|l| l.estimated_value = Some(500.0)), 10);
        assert_eq!(with(&|l| l.estimated_value = Some(10_000.0)), 15);
        assert_eq!(with(&|l| l.estimated_value = Some(75_000.0)), 20);
        assert_eq!(with(&|l| l.stage = "mql".into()), 10);
        assert_eq!(with(&|l| l.stage = "customer".into()), 50);
        assert_eq!(
            with(&|l| l.last_activity_at = Some(now() - chrono::Duration::days(3))),
            10
        );
        assert_eq!(
            with(&|l| l.last_activity_at = Some(now() - chrono::Duration::days(20))),
            5
        );
        assert_eq!(
            with(&|l| l.last_activity_at = Some(now() - chrono::Duration::days(90))),
            0
        );
        assert_eq!(
            with(&|l| l.email = Some("   ".into())),
            0,
            "blank is absent"
        );
    }

    #[test]
    fn the_best_lead_scores_the_sum_of_the_maxima() {
        let best = Lead {
            email: Some("ceo@acme.io".into()),
            phone: Some("1".into()),
            company: Some("Acme".into()),
            title: Some("CEO".into()),
            estimated_value: Some(1e6),
            stage: "customer".into(),
            last_activity_at: Some(now()),
        };
        assert_eq!(score(&best, now()), 25 + 10 + 10 + 15 + 20 + 50 + 10);
    }
}
