//! Sending jobs' messages and recording that the queue accepted them: the
//! second half of "insert the row, then send" (DESIGN.md "Nothing lost").
//! The API, the worker's hand-offs and the scheduler's outbox all send
//! through here.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::db::DbError;
use crate::ids::JobId;
use crate::job::{Job, JobMessage, QueueName};
use crate::queue::{OutgoingMessage, Queue, QueueError, MAX_DELAY};
use crate::store::Store;

/// What one [`send_jobs`] call did.
#[derive(Debug, Default)]
pub struct Sent {
    /// Jobs whose message the queue accepted (now `queued`).
    pub sent: Vec<JobId>,
    /// Jobs left `pending` for the scheduler: too far in the future for a
    /// queue's delay, or the queue refused them.
    pub deferred: Vec<JobId>,
    /// The queue's error, when it refused any.
    pub error: Option<QueueError>,
    /// Jobs whose message was sent but whose `queued` mark failed: still
    /// `pending`, so the outbox sends them again (a duplicate message is
    /// harmless: the claim runs a job once).
    pub unmarked: Vec<JobId>,
}

/// Sends a message for each job due within the queues' maximum delay (with
/// `DelaySeconds` up to its `run_at`) and marks the sent ones `queued`. A
/// queue failure is reported in [`Sent::error`], not raised: the rows are
/// committed and stay `pending`, and the scheduler sends them later.
pub async fn send_jobs(
    store: &Store,
    queue: &dyn Queue,
    jobs: &[&Job],
    now: DateTime<Utc>,
) -> Result<Sent, DbError> {
    send_and_record(store, queue, jobs, now, None).await
}

/// [`send_jobs`] for at most `budget`: what is not sent by then stays
/// `pending` for the outbox ([`Sent::deferred`]), so a request that sends
/// many messages answers within its time.
pub async fn send_jobs_within(
    store: &Store,
    queue: &dyn Queue,
    jobs: &[&Job],
    now: DateTime<Utc>,
    budget: Duration,
) -> Result<Sent, DbError> {
    send_and_record(store, queue, jobs, now, Some(budget)).await
}

async fn send_and_record(
    store: &Store,
    queue: &dyn Queue,
    jobs: &[&Job],
    now: DateTime<Utc>,
    budget: Option<Duration>,
) -> Result<Sent, DbError> {
    let targets: Vec<Target> = jobs.iter().map(|j| Target::from(*j)).collect();
    let out = send_targets(queue, &targets, now, budget).await;
    store.mark_enqueued(&out.sent, now).await?;
    Ok(out)
}

/// What a message needs to know of its job.
#[derive(Clone, Copy)]
struct Target {
    id: JobId,
    workspace_id: crate::ids::WorkspaceId,
    queue: QueueName,
    run_at: DateTime<Utc>,
}

impl From<&Job> for Target {
    fn from(j: &Job) -> Self {
        Target {
            id: j.id,
            workspace_id: j.workspace_id,
            queue: j.queue,
            run_at: j.run_at,
        }
    }
}

impl From<&crate::store::NewJob> for Target {
    fn from(j: &crate::store::NewJob) -> Self {
        Target {
            id: j.id,
            workspace_id: j.workspace_id,
            queue: j.queue,
            run_at: j.run_at,
        }
    }
}

/// One queue's messages and the jobs they carry, in the same order.
type Group = (QueueName, Vec<JobId>, Vec<OutgoingMessage>);

/// The messages for `jobs`, by queue, with each job's delay; jobs due
/// beyond the queues' maximum delay are left out (deferred to the outbox).
fn messages_for(
    jobs: &[Target],
    now: DateTime<Utc>,
) -> (BTreeMap<&'static str, Group>, Vec<JobId>) {
    let mut by_queue: BTreeMap<&'static str, Group> = BTreeMap::new();
    let mut deferred = Vec::new();
    for job in jobs {
        let delay = (job.run_at - now).to_std().unwrap_or_default();
        if delay > MAX_DELAY {
            deferred.push(job.id);
            continue;
        }
        let entry = by_queue
            .entry(job.queue.as_str())
            .or_insert_with(|| (job.queue, Vec::new(), Vec::new()));
        entry.2.push(OutgoingMessage {
            id: entry.1.len().to_string(),
            body: JobMessage {
                job_id: job.id,
                workspace_id: job.workspace_id,
            }
            .body(),
            delay,
        });
        entry.1.push(job.id);
    }
    (by_queue, deferred)
}

/// The sending half of [`send_jobs`], for callers that record the result in
/// a transaction of their own.
pub async fn send_messages(queue: &dyn Queue, jobs: &[&Job], now: DateTime<Utc>) -> Sent {
    let targets: Vec<Target> = jobs.iter().map(|j| Target::from(*j)).collect();
    send_targets(queue, &targets, now, None).await
}

/// Messages sent per call when a time budget is set: between calls the
/// budget is checked, so a slow queue costs at most one call's overrun.
const BUDGETED_CHUNK: usize = 100;

/// Sends the targets' messages; with `budget`, what is not sent when it
/// runs out is left `deferred` (the outbox sends it).
async fn send_targets(
    queue: &dyn Queue,
    targets: &[Target],
    now: DateTime<Utc>,
    budget: Option<Duration>,
) -> Sent {
    let (by_queue, deferred) = messages_for(targets, now);
    let mut out = Sent {
        deferred,
        ..Sent::default()
    };
    let until = budget.map(|b| tokio::time::Instant::now() + b);
    for (_, (q, group, messages)) in by_queue {
        let chunk = if until.is_some() {
            BUDGETED_CHUNK
        } else {
            messages.len().max(1)
        };
        for (ids, msgs) in group.chunks(chunk).zip(messages.chunks(chunk)) {
            let result = match until {
                None => queue.send_batch(q, msgs).await,
                Some(u) => match tokio::time::timeout_at(u, queue.send_batch(q, msgs)).await {
                    Ok(r) => r,
                    Err(_) => Err(QueueError::Unavailable(format!(
                        "the request's time for sending ({} ms) ran out",
                        budget.unwrap_or_default().as_millis()
                    ))),
                },
            };
            let first = msgs
                .first()
                .map(|m| m.id.parse::<usize>().unwrap_or(0))
                .unwrap_or(0);
            match result {
                Ok(()) => out.sent.extend_from_slice(ids),
                Err(QueueError::PartialSend {
                    sent,
                    failed,
                    total,
                    reason,
                }) => {
                    for (i, id) in ids.iter().enumerate() {
                        if sent.contains(&(first + i).to_string()) {
                            out.sent.push(*id);
                        } else {
                            out.deferred.push(*id);
                        }
                    }
                    out.error = Some(QueueError::PartialSend {
                        sent,
                        failed,
                        total,
                        reason,
                    });
                }
                Err(e) => {
                    out.deferred.extend_from_slice(ids);
                    out.error = Some(e);
                }
            }
        }
    }
    out
}

/// Inserts jobs and sends their messages: with the Postgres queue in one
/// statement (the rows, already `queued`, and their messages commit
/// together: one round trip and one durable commit instead of three); with
/// SQS the rows commit first and the messages follow, for at most
/// `send_budget`. Returns each job with whether it was new (an existing
/// idempotency key returns the old job), and what was sent.
///
/// Once the rows are committed nothing fails the call: an error answered
/// now would make a client without an idempotency key create the jobs
/// again. Messages not sent in time, and jobs whose `queued` mark failed,
/// stay `pending` (the answer shows them so) and the outbox sends them.
pub async fn create_jobs(
    store: &Store,
    queue: &dyn Queue,
    db: &deadpool_postgres::Object,
    jobs: &[crate::store::NewJob],
    now: DateTime<Utc>,
    send_budget: Duration,
) -> Result<(Vec<(Job, bool)>, Sent), DbError> {
    let (mut created, sent) = insert_for(store, queue, db, jobs, now).await?;
    let sent = match sent {
        Some(sent) => sent,
        // Everything on the one connection the caller holds: taking a
        // second from the pool here could wait on requests that hold the rest.
        None => send_new(queue, db, &created, now, send_budget).await,
    };
    mark_sent(&mut created, &sent);
    Ok((created, sent))
}

/// Inserts `jobs` on `db` for `queue`: with the Postgres queue, the rows
/// (already `queued`) and their messages in one statement (one round trip
/// and one commit, and no message without its row), and what that sent;
/// with another queue the rows alone, `pending`, and `None`: the caller
/// sends once they are committed ([`send_new`]).
async fn insert_for(
    store: &Store,
    queue: &dyn Queue,
    db: &impl deadpool_postgres::GenericClient,
    jobs: &[crate::store::NewJob],
    now: DateTime<Utc>,
) -> Result<(Vec<(Job, bool)>, Option<Sent>), DbError> {
    if queue.as_postgres().is_none() {
        return Ok((store.insert(db, jobs, now).await?, None));
    }
    let (rows, sent) = postgres_messages(jobs, now);
    let created = store
        .insert_as(db, jobs, &sent.sent, Some(&rows), now)
        .await?;
    Ok((created, Some(sent)))
}

/// Sends the messages of the jobs of `created` that are new, within
/// `budget`, and marks them ([`send_and_mark`]).
async fn send_new(
    queue: &dyn Queue,
    db: &deadpool_postgres::Object,
    created: &[(Job, bool)],
    now: DateTime<Utc>,
    budget: Duration,
) -> Sent {
    let new: Vec<Target> = created
        .iter()
        .filter(|(_, n)| *n)
        .map(|(j, _)| Target::from(j))
        .collect();
    send_and_mark(queue, db, &new, now, budget).await
}

/// The Postgres queue's message rows for `jobs`, written by the statement
/// that inserts them, and what that sends. Ids are made before the insert,
/// so the messages can name jobs not yet inserted.
fn postgres_messages(
    jobs: &[crate::store::NewJob],
    now: DateTime<Utc>,
) -> (crate::store::MessageRows, Sent) {
    let targets: Vec<Target> = jobs.iter().map(Target::from).collect();
    let (by_queue, deferred) = messages_for(&targets, now);
    let mut sent = Sent {
        deferred,
        ..Sent::default()
    };
    let mut rows = crate::store::MessageRows::default();
    for (_, (q, group, messages)) in by_queue {
        for m in messages {
            rows.queues.push(q.as_str());
            rows.bodies.push(m.body);
            rows.delays_ms.push(m.delay.as_millis() as f64);
        }
        sent.sent.extend(group);
    }
    (rows, sent)
}

/// [`create_jobs`] for the children of the job `parent` holds: the lease
/// is checked, and the job's row locked, in the transaction that inserts
/// them. `None` when the lease is lost: nothing is created.
async fn create_children_of(
    store: &Store,
    queue: &dyn Queue,
    db: &mut deadpool_postgres::Object,
    jobs: &[crate::store::NewJob],
    parent: &crate::store::Lease,
    now: DateTime<Utc>,
    send_budget: Duration,
) -> Result<Option<(Vec<(Job, bool)>, Sent)>, DbError> {
    let tx = db.transaction().await?;
    if !crate::store::lock_held(&tx, parent).await? {
        return Ok(None);
    }
    let (mut created, sent) = insert_for(store, queue, &tx, jobs, now).await?;
    tx.commit().await?;
    let sent = match sent {
        Some(sent) => sent,
        None => send_new(queue, db, &created, now, send_budget).await,
    };
    mark_sent(&mut created, &sent);
    Ok(Some((created, sent)))
}

/// Inserts a batch for a workspace with a concurrency limit that it cannot
/// all run at once: the jobs enter the database parked (no message each),
/// and in the same transaction, under the workspace row's lock, as many
/// parked jobs as the workspace has free slots are released and then sent.
/// Creating them with a message each put the whole backlog in the queue,
/// where other tenants' jobs waited behind it until the worker had parked
/// it message by message. The lock is the one the worker's claims and
/// refills take, so a job is never parked after the last slot-holder looked.
/// Like [`create_jobs`], nothing fails the call once the rows are committed.
#[allow(clippy::too_many_arguments)]
pub async fn create_parked(
    store: &Store,
    queue: &dyn Queue,
    db: &mut deadpool_postgres::Object,
    jobs: &[crate::store::NewJob],
    workspace: crate::ids::WorkspaceId,
    limit: i64,
    now: DateTime<Utc>,
    send_budget: Duration,
) -> Result<(Vec<(Job, bool)>, Sent), DbError> {
    let created = create_parked_under(
        store,
        queue,
        db,
        jobs,
        workspace,
        limit,
        None,
        now,
        send_budget,
    )
    .await?;
    created.ok_or_else(|| DbError::Inconsistent("a create without a lease lost one".into()))
}

/// [`create_parked`], with the children of the job `parent` holds checked
/// against its lease in the same transaction (before the workspace's lock,
/// in the order a rescue takes the two rows). `None` when it is lost.
#[allow(clippy::too_many_arguments)]
async fn create_parked_under(
    store: &Store,
    queue: &dyn Queue,
    db: &mut deadpool_postgres::Object,
    jobs: &[crate::store::NewJob],
    workspace: crate::ids::WorkspaceId,
    limit: i64,
    parent: Option<&crate::store::Lease>,
    now: DateTime<Utc>,
    send_budget: Duration,
) -> Result<Option<(Vec<(Job, bool)>, Sent)>, DbError> {
    let tx = db.transaction().await?;
    if let Some(lease) = parent {
        if !crate::store::lock_held(&tx, lease).await? {
            return Ok(None);
        }
    }
    crate::store::lock_workspaces(&tx, &[workspace]).await?;
    let mut created = store.insert(&tx, jobs, now).await?;
    let new: Vec<uuid::Uuid> = created
        .iter()
        .filter(|(_, n)| *n)
        .map(|(j, _)| j.id.0)
        .collect();
    let park = tx
        .prepare_cached(
            "UPDATE jobs SET status = 'queued', parked_at = $2, updated_at = $2 \
             WHERE id = ANY($1) AND status = 'pending'",
        )
        .await?;
    tx.execute(&park, &[&new, &now]).await?;
    let released = crate::store::refill(
        &tx,
        crate::store::Refill::Release,
        &[(workspace, limit)],
        &[],
        "",
        now,
        chrono::Duration::zero(),
    )
    .await?;
    tx.commit().await?;
    for (j, is_new) in created.iter_mut() {
        if *is_new {
            j.status = crate::job::JobStatus::Queued;
        }
    }
    let targets: Vec<Target> = released.iter().map(Target::from).collect();
    let sent = send_and_mark(queue, db, &targets, now, send_budget).await;
    // Released jobs whose message did not go out wait for the outbox.
    let waiting: std::collections::HashSet<JobId> = sent
        .deferred
        .iter()
        .chain(&sent.unmarked)
        .copied()
        .collect();
    for (j, _) in created.iter_mut() {
        if waiting.contains(&j.id) {
            j.status = crate::job::JobStatus::Pending;
        }
    }
    Ok(Some((created, sent)))
}

/// Creates a batch of one workspace whose concurrency limit is `limit`:
/// more due jobs than it may run at once go in parked ([`create_parked`]),
/// any other batch is created as usual ([`create_jobs`]).
#[allow(clippy::too_many_arguments)]
pub async fn create_batch(
    store: &Store,
    queue: &dyn Queue,
    db: &mut deadpool_postgres::Object,
    jobs: &[crate::store::NewJob],
    workspace: crate::ids::WorkspaceId,
    limit: Option<i64>,
    now: DateTime<Utc>,
    send_budget: Duration,
) -> Result<(Vec<(Job, bool)>, Sent), DbError> {
    match parks(jobs, limit, now) {
        Some(limit) => {
            create_parked(store, queue, db, jobs, workspace, limit, now, send_budget).await
        }
        None => create_jobs(store, queue, db, jobs, now, send_budget).await,
    }
}

/// [`create_batch`] for children of the job `parent` holds, as a handler
/// makes them: nothing is created once its lease is lost (`None`), like
/// every other write of a handler.
#[allow(clippy::too_many_arguments)]
pub async fn create_children(
    store: &Store,
    queue: &dyn Queue,
    db: &mut deadpool_postgres::Object,
    jobs: &[crate::store::NewJob],
    workspace: crate::ids::WorkspaceId,
    limit: Option<i64>,
    parent: &crate::store::Lease,
    now: DateTime<Utc>,
    send_budget: Duration,
) -> Result<Option<(Vec<(Job, bool)>, Sent)>, DbError> {
    match parks(jobs, limit, now) {
        Some(limit) => {
            create_parked_under(
                store,
                queue,
                db,
                jobs,
                workspace,
                limit,
                Some(parent),
                now,
                send_budget,
            )
            .await
        }
        None => create_children_of(store, queue, db, jobs, parent, now, send_budget).await,
    }
}

/// The limit to park under: a batch of more due jobs than the workspace
/// may run at once.
fn parks(jobs: &[crate::store::NewJob], limit: Option<i64>, now: DateTime<Utc>) -> Option<i64> {
    limit.filter(|l| jobs.len() as i64 > *l && jobs.iter().all(|j| j.run_at <= now))
}

/// Sends committed jobs' messages within `budget` and marks the sent ones
/// `queued` on `db`. Nothing fails: what was not sent is `deferred`, and if
/// the mark fails the sent ones are `unmarked` (still `pending`, so the
/// outbox sends them again; a duplicate message is harmless).
async fn send_and_mark(
    queue: &dyn Queue,
    db: &deadpool_postgres::Object,
    targets: &[Target],
    now: DateTime<Utc>,
    budget: Duration,
) -> Sent {
    let mut sent = send_targets(queue, targets, now, Some(budget)).await;
    // The mark can deadlock with a claim of the same rows (seen at 4 000
    // jobs/s); it is idempotent, so it is tried again in place.
    let marked =
        crate::db::retry_conflicts(|| crate::store::mark_enqueued_on(db, &sent.sent, now)).await;
    if let Err(e) = marked {
        tracing::warn!(error = %e, jobs = sent.sent.len(),
            "sent, but not marked queued; they show as pending and the outbox sends them again");
        sent.unmarked = std::mem::take(&mut sent.sent);
    }
    sent
}

/// Shows the jobs that were sent as `queued` in the answer.
fn mark_sent(created: &mut [(Job, bool)], sent: &Sent) {
    let ids: std::collections::HashSet<JobId> = sent.sent.iter().copied().collect();
    for (j, _) in created.iter_mut() {
        if ids.contains(&j.id) {
            j.status = crate::job::JobStatus::Queued;
        }
    }
}
