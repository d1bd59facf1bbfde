//! `send_email_batch`: one sequence step's e-mail to a batch of contacts.
//! The step's subject and HTML body are templates (minijinja) with merge
//! variables (`{{ first_name }}`, `{{ company | default("your team") }}`),
//! HTML-escaped in the body. Contacts that unsubscribed, are on the
//! do-not-contact list, have no address or are not in the workspace are
//! skipped with the reason. Sends go through the configured [`Mailer`] at
//! the provider's rate and the sending domain's warm-up rate (token buckets
//! shared by every worker; a short wait is slept, a long one snoozes the
//! job without spending an attempt).
//!
//! Each contact gets the step at most once, across crashes, retries and
//! other jobs: `email_deliveries` holds a row per step and contact, written
//! `sending` before the provider is called, then `sent`, `failed` or
//! `unknown`. A row found `sending` is a crash that came after the row and
//! maybe after the provider took the e-mail; which, nobody can tell, so it
//! is resolved the safe way: it becomes `unknown` and is never sent again
//! (a contact may miss the step; none gets it twice). A send the provider
//! surely did not take removes its row so a later attempt sends it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{JobContext, JobError, JobHandler, Outcome, PayloadError};
use crate::db::DbError;
use crate::email::{warmup_rate, Email, Mailer, SendError};
use crate::job::Progress;

/// Most contacts one job sends to.
pub const MAX_CONTACTS: usize = 1000;
/// Pauses before sending again when the provider surely did not take an
/// e-mail; then the job retries with backoff.
const NOT_SENT_PAUSES: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_millis(1000),
    Duration::from_millis(3000),
];
/// Sends in flight at once within a batch.
const SEND_CONCURRENCY: usize = 8;
/// A wait for the rate up to this long is slept; a longer one snoozes.
const SLEEP_AT_MOST: Duration = Duration::from_secs(2);

/// The `send_email_batch` handler, with the deployment's mailer and rates.
#[derive(Clone)]
pub struct SendEmailBatch {
    pub mailer: Arc<dyn Mailer>,
    /// The provider's sends per second (`OFFLOAD_EMAIL_RATE`).
    pub rate: f64,
    /// Days a new sending domain takes to reach `rate`
    /// (`OFFLOAD_EMAIL_WARMUP_DAYS`; 0: none).
    pub warmup_days: u32,
}

impl SendEmailBatch {
    /// SMTP to the local sink of `offload dev` (127.0.0.1:1025), 50 a
    /// second, a week's warm-up: what the defaults of the configuration give.
    pub fn local() -> SendEmailBatch {
        SendEmailBatch {
            mailer: Arc::new(
                crate::email::SmtpMailer::new(DEFAULT_TRANSPORT).expect("the default SMTP URL"),
            ),
            rate: 50.0,
            warmup_days: 7,
        }
    }
}

/// Where e-mail goes when `OFFLOAD_EMAIL_TRANSPORT` is not set.
pub const DEFAULT_TRANSPORT: &str = "smtp://127.0.0.1:1025";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendEmailBatchPayload {
    pub sequence_id: Uuid,
    pub sequence_step_id: Uuid,
    pub contact_ids: Vec<Uuid>,
    /// Contacts between checkpoints (1 to 1000, default 100).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_batch() -> usize {
    100
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Cursor {
    next: usize,
    sent: u64,
    skipped: u64,
    failed: u64,
    unknown: u64,
    skipped_reasons: Vec<Reason>,
    failed_reasons: Vec<Reason>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reason {
    contact_id: Uuid,
    reason: String,
}

/// A contact as the templates see it.
struct Contact {
    id: Uuid,
    email: Option<String>,
    vars: BTreeMap<&'static str, String>,
    skip: Option<&'static str>,
}

/// The step's compiled templates.
struct Templates {
    env: minijinja::Environment<'static>,
    from: String,
}

impl Templates {
    fn new(from: String, subject: String, body: String) -> Result<Templates, JobError> {
        let mut env = minijinja::Environment::new();
        env.set_auto_escape_callback(|name| {
            if name == "body" {
                minijinja::AutoEscape::Html
            } else {
                minijinja::AutoEscape::None
            }
        });
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
        env.add_template_owned("subject", subject)
            .map_err(|e| JobError::Permanent(format!("the step's subject: {e}")))?;
        env.add_template_owned("body", body)
            .map_err(|e| JobError::Permanent(format!("the step's body: {e}")))?;
        Ok(Templates { env, from })
    }

    /// (subject, HTML body) for a contact's variables; a missing value is
    /// undefined, so `default(…)` fills it and a bare one renders empty.
    fn render(&self, vars: &BTreeMap<&'static str, String>) -> Result<(String, String), String> {
        let ctx = minijinja::Value::from_pairs(vars.iter().map(|(k, v)| (*k, v.as_str())));
        let subject = self
            .env
            .get_template("subject")
            .and_then(|t| t.render(&ctx))
            .map_err(|e| format!("subject: {e}"))?;
        let body = self
            .env
            .get_template("body")
            .and_then(|t| t.render(&ctx))
            .map_err(|e| format!("body: {e}"))?;
        // A subject is one header line.
        let subject = subject.replace(['\r', '\n'], " ");
        Ok((subject.trim().to_string(), body))
    }
}

/// The domain an address sends from (`Ann <ann@x.io>` → `x.io`).
fn domain_of(from: &str) -> Option<String> {
    from.parse::<lettre::message::Mailbox>()
        .ok()
        .map(|m| m.email.domain().to_ascii_lowercase())
}

/// The message id every attempt at this step and contact carries.
fn message_id(step: Uuid, contact: Uuid) -> String {
    format!("<{}.{}@offload>", step.simple(), contact.simple())
}

#[async_trait]
impl JobHandler for SendEmailBatch {
    type Payload = SendEmailBatchPayload;
    const TYPE: &'static str = "send_email_batch";

    fn validate(&self, p: &SendEmailBatchPayload) -> Result<(), PayloadError> {
        super::check_contact_ids(&p.contact_ids, MAX_CONTACTS)?;
        if !(1..=1000).contains(&p.batch_size) {
            return Err(PayloadError::field("batch_size", "from 1 to 1000"));
        }
        Ok(())
    }

    async fn run(
        &self,
        p: SendEmailBatchPayload,
        ctx: &mut JobContext,
    ) -> Result<Outcome, JobError> {
        let ws = ctx.workspace_id().0;
        let job = ctx.job_id().0;
        let (templates, domain, domain_days) = {
            let db = ctx.db().get().await.map_err(DbError::from)?;
            let step = db
                .query_opt(
                    "SELECT from_address, subject, body_html FROM sequence_steps \
                     WHERE id = $1 AND sequence_id = $2 AND workspace_id = $3",
                    &[&p.sequence_step_id, &p.sequence_id, &ws],
                )
                .await
                .map_err(DbError::from)?
                .ok_or_else(|| {
                    JobError::Permanent(format!(
                        "step {} of sequence {} does not exist in this workspace",
                        p.sequence_step_id, p.sequence_id
                    ))
                })?;
            let from: String = step.get(0);
            let domain = domain_of(&from).ok_or_else(|| {
                JobError::Permanent(format!("the step's sender {from:?} is not an address"))
            })?;
            let days: i64 = db
                .query_one(
                    "WITH d AS (INSERT INTO sending_domains (domain) VALUES ($1) \
                       ON CONFLICT (domain) DO NOTHING RETURNING first_sent_at) \
                     SELECT extract(day FROM now() - coalesce((SELECT first_sent_at FROM d), \
                       (SELECT first_sent_at FROM sending_domains WHERE domain = $1)))::int8",
                    &[&domain],
                )
                .await
                .map_err(DbError::from)?
                .get(0);
            (
                Templates::new(from, step.get(1), step.get(2))?,
                domain,
                days,
            )
        };
        let buckets = [
            (format!("email:{}", self.mailer.name()), self.rate),
            (
                format!("email:domain:{domain}"),
                warmup_rate(self.rate, self.warmup_days, domain_days),
            ),
        ];
        let mut cur: Cursor = ctx.checkpoint().unwrap_or_default();
        let total = p.contact_ids.len();
        while cur.next < total {
            if ctx.cancelled().await? {
                return Ok(Outcome::Cancelled(Some(result(&cur))));
            }
            if ctx.should_hand_off() {
                return Ok(ctx.hand_off(&cur));
            }
            let end = (cur.next + p.batch_size).min(total);
            let contacts = load(ctx, ws, &p.contact_ids[cur.next..end]).await?;
            // Several sends in flight (a provider answers in tens of
            // milliseconds; one at a time would never reach its rate), the
            // outcomes taken in the contacts' order.
            let outcomes: Vec<(Uuid, Result<Delivered, JobError>)> = {
                let ctx = &*ctx;
                let (templates, buckets, mailer) = (&templates, &buckets, &*self.mailer);
                futures::stream::iter(contacts.into_iter().map(|c| async move {
                    let d = match (c.skip, templates.render(&c.vars)) {
                        (Some(reason), _) => Ok(Delivered::Skipped(reason.to_string())),
                        (None, Err(e)) => Ok(Delivered::Failed(e)),
                        (None, Ok((subject, html))) => match pace(ctx, buckets).await {
                            Ok(Some(wait)) => Ok(Delivered::Wait(wait)),
                            Err(e) => Err(e),
                            Ok(None) => {
                                let email = Email {
                                    from: templates.from.clone(),
                                    to: c.email.clone().unwrap_or_default(),
                                    subject,
                                    html,
                                    message_id: message_id(p.sequence_step_id, c.id),
                                };
                                deliver(ctx, mailer, p.sequence_step_id, c.id, ws, job, &email)
                                    .await
                            }
                        },
                    };
                    (c.id, d)
                }))
                .buffered(SEND_CONCURRENCY)
                .collect()
                .await
            };
            // A batch counts only once whole: a snooze or retry part way
            // keeps the checkpoint before it, and the next run counts what
            // was done from the delivery rows.
            let mut done = cur.clone();
            for (contact_id, d) in outcomes {
                let reason = |reason| Reason { contact_id, reason };
                match d? {
                    Delivered::Sent => done.sent += 1,
                    Delivered::Unknown => done.unknown += 1,
                    Delivered::Skipped(r) => {
                        done.skipped += 1;
                        done.skipped_reasons.push(reason(r));
                    }
                    Delivered::Before(status) => {
                        done.skipped += 1;
                        done.skipped_reasons
                            .push(reason(format!("already_{status}")));
                    }
                    Delivered::Failed(r) => {
                        done.failed += 1;
                        done.failed_reasons.push(reason(r));
                    }
                    Delivered::Wait(wait) => {
                        ctx.save_checkpoint(&cur).await?;
                        return Ok(Outcome::Snooze(wait));
                    }
                    Delivered::NotSent(why) => {
                        ctx.save_checkpoint(&cur).await?;
                        return Err(JobError::Retryable(why));
                    }
                }
            }
            cur = done;
            cur.next = end;
            ctx.save_checkpoint(&cur).await?;
            ctx.progress(Progress {
                failed: cur.failed,
                stage: Some("sending".into()),
                message: Some(format!(
                    "{} sent, {} skipped, {} failed",
                    cur.sent, cur.skipped, cur.failed
                )),
                ..Progress::of(cur.next as u64, total as u64)
            })
            .await?;
        }
        ctx.log(
            "info",
            format!(
                "{} sent, {} skipped, {} failed, {} unknown",
                cur.sent, cur.skipped, cur.failed, cur.unknown
            ),
            None,
        )
        .await?;
        Ok(Outcome::Completed(Some(result(&cur))))
    }
}

fn result(cur: &Cursor) -> Value {
    json!({
        "sent": cur.sent,
        "skipped": cur.skipped,
        "failed": cur.failed,
        "unknown": cur.unknown,
        "skipped_reasons": cur.skipped_reasons,
        "failed_reasons": cur.failed_reasons,
    })
}

/// The contacts of `ids`, in order, with their merge variables and why
/// each is skipped, if it is.
async fn load(ctx: &JobContext, ws: Uuid, ids: &[Uuid]) -> Result<Vec<Contact>, JobError> {
    let db = ctx.db().get().await.map_err(DbError::from)?;
    let stmt = db
        .prepare_cached(
            "SELECT i.cid, c.id IS NOT NULL, c.email, c.first_name, c.last_name, c.company, \
               c.title, c.phone, coalesce(c.opted_out, false), \
               EXISTS (SELECT 1 FROM do_not_contact d WHERE d.workspace_id = $2 \
                       AND lower(d.email) = lower(c.email)) \
             FROM unnest($1::uuid[]) WITH ORDINALITY AS i(cid, n) \
             LEFT JOIN contacts c ON c.id = i.cid AND c.workspace_id = $2 \
             ORDER BY i.n",
        )
        .await
        .map_err(DbError::from)?;
    let rows = db.query(&stmt, &[&ids, &ws]).await.map_err(DbError::from)?;
    Ok(rows
        .iter()
        .map(|r| {
            let email: Option<String> = r.get(2);
            let mut vars = BTreeMap::new();
            for (i, name) in [
                (2, "email"),
                (3, "first_name"),
                (4, "last_name"),
                (5, "company"),
                (6, "title"),
                (7, "phone"),
            ] {
                if let Some(v) = r
                    .get::<_, Option<String>>(i)
                    .filter(|v| !v.trim().is_empty())
                {
                    vars.insert(name, v);
                }
            }
            let skip = if !r.get::<_, bool>(1) {
                Some("missing")
            } else if email.as_deref().is_none_or(|e| e.trim().is_empty()) {
                Some("no_email")
            } else if r.get::<_, bool>(8) {
                Some("unsubscribed")
            } else if r.get::<_, bool>(9) {
                Some("do_not_contact")
            } else {
                None
            };
            Contact {
                id: r.get(0),
                email,
                vars,
                skip,
            }
        })
        .collect())
}

/// Takes one send from each bucket, sleeping through a short wait; the
/// wait to snooze for when it is long.
async fn pace(ctx: &JobContext, buckets: &[(String, f64)]) -> Result<Option<Duration>, JobError> {
    for (key, rate) in buckets {
        while let Some(wait) = ctx.take_token_or_wait(key, rate.max(1.0), *rate).await? {
            if wait > SLEEP_AT_MOST {
                return Ok(Some(wait));
            }
            tokio::time::sleep(wait.max(Duration::from_millis(5))).await;
        }
    }
    Ok(None)
}

/// What became of one contact's e-mail.
enum Delivered {
    /// Not sent, for this reason (unsubscribed, on the list, …).
    Skipped(String),
    /// The rate's wait is long: the job snoozes this long first.
    Wait(Duration),
    Sent,
    Failed(String),
    /// Maybe sent, by this run or one that crashed: not sent again.
    Unknown,
    /// Another job's row: it was `sent` or `failed` already.
    Before(String),
    /// Surely not sent, after the retries: the job retries later.
    NotSent(String),
}

#[allow(clippy::too_many_arguments)]
async fn deliver(
    ctx: &JobContext,
    mailer: &dyn Mailer,
    step: Uuid,
    contact: Uuid,
    ws: Uuid,
    job: Uuid,
    email: &Email,
) -> Result<Delivered, JobError> {
    let db = ctx.db().get().await.map_err(DbError::from)?;
    let claimed = db
        .execute(
            "INSERT INTO email_deliveries (step_id, contact_id, workspace_id, job_id, status, message_id) \
             VALUES ($1, $2, $3, $4, 'sending', $5) ON CONFLICT (step_id, contact_id) DO NOTHING",
            &[&step, &contact, &ws, &job, &email.message_id],
        )
        .await
        .map_err(DbError::from)?;
    if claimed == 0 {
        // Sent, failed or begun before. A `sending` row is a crash between
        // the row and its outcome: maybe sent, so never sent again.
        let row = db
            .query_one(
                "UPDATE email_deliveries SET status = CASE WHEN status = 'sending' THEN 'unknown' ELSE status END, \
                   error = CASE WHEN status = 'sending' \
                     THEN 'a crash came between the send and its record; not sent again' ELSE error END, \
                   updated_at = now() \
                 WHERE step_id = $1 AND contact_id = $2 RETURNING status, job_id, error",
                &[&step, &contact],
            )
            .await
            .map_err(DbError::from)?;
        let (status, by): (String, Uuid) = (row.get(0), row.get(1));
        return Ok(match (status.as_str(), by == job) {
            ("sent", true) => Delivered::Sent,
            ("failed", true) => {
                Delivered::Failed(row.get::<_, Option<String>>(2).unwrap_or_default())
            }
            ("unknown", true) => Delivered::Unknown,
            (s, _) => Delivered::Before(s.to_string()),
        });
    }
    let mut pauses = NOT_SENT_PAUSES.iter();
    let outcome = loop {
        match mailer.send(email).await {
            Err(SendError::NotSent(why)) => match pauses.next() {
                Some(p) => {
                    ctx.log("warn", format!("{why}; sending again"), None)
                        .await?;
                    tokio::time::sleep(*p).await;
                }
                None => break Err(SendError::NotSent(why)),
            },
            other => break other,
        }
    };
    let (status, provider_id, error) = match &outcome {
        Ok(id) => ("sent", Some(id.as_str()), None),
        Err(SendError::Rejected(e)) => ("failed", None, Some(e.as_str())),
        Err(SendError::Unknown(e)) => ("unknown", None, Some(e.as_str())),
        Err(SendError::NotSent(why)) => {
            // Surely not taken: the row goes, so a later attempt sends it.
            db.execute(
                "DELETE FROM email_deliveries WHERE step_id = $1 AND contact_id = $2 AND status = 'sending'",
                &[&step, &contact],
            )
            .await
            .map_err(DbError::from)?;
            return Ok(Delivered::NotSent(why.clone()));
        }
    };
    db.execute(
        "UPDATE email_deliveries SET status = $3, provider_message_id = $4, error = $5, updated_at = now() \
         WHERE step_id = $1 AND contact_id = $2",
        &[&step, &contact, &status, &provider_id, &error],
    )
    .await
    .map_err(DbError::from)?;
    Ok(match outcome {
        Ok(_) => Delivered::Sent,
        Err(SendError::Rejected(e)) => Delivered::Failed(e),
        Err(_) => Delivered::Unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_variables_fill_in_with_defaults_and_the_body_is_escaped() {
        let t = Templates::new(
            "Sales <sales@acme.io>".into(),
            "Hi {{ first_name | default(\"there\") }}\r\nBcc: x@evil".into(),
            "<p>Hello {{ first_name }} at {{ company | default(\"your company\") }}</p>".into(),
        )
        .unwrap();
        let mut vars = BTreeMap::new();
        vars.insert("first_name", "<b>Ann</b> & Co".to_string());
        let (subject, body) = t.render(&vars).unwrap();
        assert_eq!(subject, "Hi <b>Ann</b> & Co  Bcc: x@evil");
        assert_eq!(
            body,
            "<p>Hello &lt;b&gt;Ann&lt;&#x2f;b&gt; &amp; Co at your company</p>"
        );
        let (subject, _) = t.render(&BTreeMap::new()).unwrap();
        assert_eq!(subject, "Hi there  Bcc: x@evil", "one header line");
        assert!(Templates::new("a@b.c".into(), "{{ oops".into(), "x".into()).is_err());
        assert_eq!(
            domain_of("Sales <Sales@ACME.io>").as_deref(),
            Some("acme.io")
        );
    }
}
