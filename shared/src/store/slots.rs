//! Claims and concurrency slots: which jobs of a batch start, which wait in
//! the database for a slot of their workspace ("parked"), and which parked
//! jobs take the slots that finished jobs free.
//!
//! A workspace's `running` count is kept on its row by a trigger in the
//! same statement as each status change. Every statement here that decides
//! from that count runs while the transaction holds the workspace rows'
//! locks (taken in id order by [`lock_workspaces`], or by the trigger when a
//! job leaves `running`), so a job is never parked after the last job
//! holding a slot looked for parked jobs and found none, and two claims
//! never both take the last free slot.

use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::GenericClient;

use super::Store;
use crate::db::{Conn, DbError};
use crate::ids::{JobId, WorkspaceId};
use crate::job::{Job, JobStatus};
use crate::job_columns;

/// What a claim did with a batch's jobs.
#[derive(Debug, Default)]
pub struct Claimed {
    /// Jobs now `running` under this claim's lease.
    pub running: Vec<Job>,
    /// Jobs of workspaces at their limit, now parked: their messages are done
    /// with, and a finishing job of the workspace takes them.
    pub parked: Vec<JobId>,
}

/// What the worker reads of a job whose message it could not claim.
#[derive(Clone, Debug)]
pub struct Peeked {
    pub id: JobId,
    pub status: JobStatus,
    pub run_at: DateTime<Utc>,
    pub cancel_requested: bool,
    pub lease_expires_at: Option<DateTime<Utc>>,
}

/// A job is claimable when it is waiting to start and due (a time wait
/// whose time has come included: its delayed message is what resumes it),
/// or `running` under a lease that expired with attempts left (its worker
/// died; a redelivered message takes it over before the scheduler does). A
/// job with a cancel request is never started: the worker ends it instead.
macro_rules! claimable {
    () => {
        "run_at <= $3 AND cancel_requested_at IS NULL \
         AND (status IN ('pending', 'queued') OR (status = 'waiting' AND wait_kind = 'time') \
              OR (status = 'running' AND lease_expires_at < $3 AND attempts < max_attempts))"
    };
}

/// What starting an attempt writes: `attempts + 1` and `worker_id` (this
/// claim's name) together form the lease every later write checks.
macro_rules! start_attempt {
    () => {
        "status = 'running', attempts = attempts + 1, worker_id = $2, \
         started_at = coalesce(started_at, $3), heartbeat_at = $3, lease_expires_at = $4, \
         parked_at = NULL, wait_kind = NULL, wait_until = NULL, updated_at = $3"
    };
}

/// Claims a batch's jobs of workspaces without a limit, in one statement.
///
/// Rows another transaction holds (a concurrent claim of a duplicate
/// message, a completion, the scheduler's rescue) are skipped rather than
/// waited for: two claims of overlapping batches would otherwise lock the
/// same rows in different orders and deadlock. A skipped job's message is
/// judged afterwards like any other unclaimed one.
const CLAIM: &str = concat!(
    "UPDATE jobs SET ",
    start_attempt!(),
    " WHERE id = ANY(ARRAY( \
         SELECT id FROM jobs WHERE id = ANY($1::uuid[]) AND ",
    claimable!(),
    " FOR UPDATE SKIP LOCKED)) AND ",
    claimable!(),
    " RETURNING true AS run, ",
    job_columns!()
);

/// [`CLAIM`] for batches with jobs of limited workspaces (`$5` the
/// workspaces, `$6` their limits), run after [`lock_workspaces`]: within
/// each workspace the candidates are ranked by priority, those that fit
/// under the limit (given its `running` count, current under the lock)
/// start, and the waiting ones that do not are parked. One UPDATE does both,
/// so the running-count trigger sees one statement. Candidates are locked
/// with `SKIP LOCKED` before the window function ranks them (the two cannot
/// share a SELECT), so the claim never waits on a job row while it holds
/// workspace rows.
const CLAIM_OR_PARK: &str = concat!(
    "WITH cand AS MATERIALIZED ( \
       SELECT id, workspace_id, priority, created_at, status FROM jobs \
       WHERE id = ANY($1::uuid[]) AND ",
    claimable!(),
    " FOR UPDATE SKIP LOCKED), \
     ranked AS ( \
       SELECT c.id, c.status, l.lmax, w.running, \
         row_number() OVER (PARTITION BY c.workspace_id \
                            ORDER BY c.priority DESC, c.created_at, c.id) AS rn \
       FROM cand c \
       LEFT JOIN unnest($5::uuid[], $6::int8[]) AS l(lws, lmax) ON l.lws = c.workspace_id \
       LEFT JOIN workspaces w ON w.id = c.workspace_id), \
     decided AS ( \
       SELECT id AS did, (lmax IS NULL OR rn + coalesce(running, 0) <= lmax) AS run \
       FROM ranked \
       WHERE lmax IS NULL OR rn + coalesce(running, 0) <= lmax \
          OR status IN ('pending', 'queued', 'waiting')) \
     UPDATE jobs SET \
       status = CASE WHEN d.run THEN 'running' ELSE 'queued' END, \
       attempts = CASE WHEN d.run THEN attempts + 1 ELSE attempts END, \
       worker_id = CASE WHEN d.run THEN $2 ELSE worker_id END, \
       started_at = CASE WHEN d.run THEN coalesce(started_at, $3) ELSE started_at END, \
       heartbeat_at = CASE WHEN d.run THEN $3 ELSE heartbeat_at END, \
       lease_expires_at = CASE WHEN d.run THEN $4 ELSE lease_expires_at END, \
       parked_at = CASE WHEN d.run THEN NULL ELSE coalesce(parked_at, $3) END, \
       enqueued_at = CASE WHEN d.run THEN enqueued_at END, \
       wait_kind = NULL, wait_until = NULL, updated_at = $3 \
     FROM decided d WHERE jobs.id = d.did \
     RETURNING d.run, ",
    job_columns!()
);

/// The next parked jobs of each workspace in parameter `$ws` (limits in
/// `$lim`), as many as its free slots, highest priority first; rows another
/// transaction holds are skipped. Run under the workspaces' locks, after the
/// statements that freed the slots, so `w.running` is the count as it now is.
macro_rules! next_parked {
    ($ws:literal, $lim:literal) => {
        concat!(
            "id = ANY(ARRAY( SELECT p.id FROM unnest($",
            $ws,
            "::uuid[], $",
            $lim,
            "::int8[]) AS l(lws, lmax) \
           JOIN workspaces w ON w.id = l.lws \
           CROSS JOIN LATERAL ( \
             SELECT id FROM jobs WHERE workspace_id = l.lws AND parked_at IS NOT NULL \
             ORDER BY priority DESC, created_at, id \
             LIMIT greatest(l.lmax - w.running, 0) FOR UPDATE SKIP LOCKED) p)) \
         AND status = 'queued'"
        )
    };
}

/// Starts the next parked jobs in the slots just freed, for the invocation
/// that freed them: no message, no queue round trip.
///
/// The rows picked are locked by the sub-selects, so the outer `WHERE`
/// checks only `status`: repeating `parked_at IS NOT NULL` there let the
/// planner read the whole parked index with the ids as a filter instead of
/// looking them up by primary key. For the same reason the candidates'
/// `parked_at` test is written so it does not match the index's predicate,
/// and their `workspace_id` test so no index can serve it: with statistics
/// taken before a burst of inserts (a fan-out's children, a large batch;
/// autovacuum analyzes a minute later at best), the planner believed a
/// workspace held a few dozen rows and scanned all of its index entries
/// and rows, twice per take, to find the candidates (10 ms a take; a
/// 10 000-child fan-out drained at a third of its speed). `OFFSET 0` keeps
/// the candidates' sub-select from being inlined into both places that
/// use it, so it runs once.
///
/// Finding the next parked jobs by the index walks past every entry taken
/// since the table was last vacuumed, which costs milliseconds in a long
/// drain; a workspace taking five jobs at a time would pay that every five
/// jobs. So the caller passes candidates it read earlier (`$6`, the next
/// parked ids in order): they are tried first, by primary key, and the
/// index is searched only for the slots they leave (its `LIMIT` is what
/// remains, and a `LIMIT 0` never touches the index), skipping the
/// candidates so no row counts twice. A newly parked job of higher priority
/// waits until the caller reads candidates again.
const TAKE_PARKED: &str = concat!(
    "UPDATE jobs SET ",
    start_attempt!(),
    " WHERE id = ANY(ARRAY( \
       SELECT unnest(a.ids || ARRAY( \
           SELECT id FROM jobs WHERE workspace_id = l.lws AND parked_at IS NOT NULL \
             AND id <> ALL($6::uuid[]) \
           ORDER BY priority DESC, created_at, id \
           LIMIT greatest(l.lmax - w.running, 0) - cardinality(a.ids) \
           FOR UPDATE SKIP LOCKED)) \
       FROM unnest($1::uuid[], $5::int8[]) AS l(lws, lmax) \
       JOIN workspaces w ON w.id = l.lws \
       CROSS JOIN LATERAL (SELECT ARRAY( \
           SELECT id FROM jobs WHERE id = ANY($6::uuid[]) \
             AND CASE WHEN workspace_id = l.lws THEN true ELSE false END \
             AND CASE WHEN parked_at IS NULL THEN false ELSE true END AND status = 'queued' \
           ORDER BY priority DESC, created_at, id \
           LIMIT greatest(l.lmax - w.running, 0) FOR UPDATE SKIP LOCKED) AS ids OFFSET 0) a)) \
     AND status = 'queued' \
     RETURNING true AS run, ",
    job_columns!()
);

/// Releases the next parked jobs into free slots by message: back to
/// `pending`, to be sent (and, if the send fails, sent by the outbox).
const RELEASE_PARKED: &str = concat!(
    "UPDATE jobs SET status = 'pending', parked_at = NULL, enqueued_at = NULL, updated_at = $3 \
     WHERE ",
    next_parked!(1, 2),
    " RETURNING ",
    job_columns!()
);

/// Locks workspace rows in id order (so two lockers never deadlock).
const LOCK_WORKSPACES: &str =
    "SELECT 1 FROM workspaces WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE";

/// Prepares (or finds in the connection's cache) the statements of a group
/// commit, so that issuing them together sends them in the order they are
/// polled: a statement still being prepared would let a later one overtake
/// it, and a refill that ran before the completions it follows would see
/// no free slot and leave them unfilled.
pub async fn prepare_group(db: &impl GenericClient, how: Refill) -> Result<(), DbError> {
    db.prepare_cached(LOCK_WORKSPACES).await?;
    super::lease::prepare_complete(db).await?;
    db.prepare_cached(match how {
        Refill::Take => TAKE_PARKED,
        Refill::Release => RELEASE_PARKED,
    })
    .await?;
    Ok(())
}

/// Locks workspace rows in id order (so two lockers never deadlock) for the
/// rest of the caller's transaction.
pub async fn lock_workspaces(
    db: &impl GenericClient,
    workspaces: &[WorkspaceId],
) -> Result<(), DbError> {
    let mut ids: Vec<uuid::Uuid> = workspaces.iter().map(|w| w.0).collect();
    ids.sort();
    ids.dedup();
    if ids.is_empty() {
        return Ok(());
    }
    let stmt = db.prepare_cached(LOCK_WORKSPACES).await?;
    db.execute(&stmt, &[&ids]).await?;
    Ok(())
}

/// Limits as the two arrays the statements take.
fn limit_arrays(limits: &[(WorkspaceId, i64)]) -> (Vec<uuid::Uuid>, Vec<i64>) {
    let mut sorted = limits.to_vec();
    sorted.sort();
    sorted.dedup_by_key(|l| l.0);
    sorted.into_iter().map(|(w, l)| (w.0, l)).unzip()
}

/// Parked jobs of limited workspaces either start in the caller's
/// invocation or are released by message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refill {
    /// Start them under `worker_id` (the invocation has time to run them).
    Take,
    /// Make them `pending` for a fresh message.
    Release,
}

/// Fills the free slots of `limits`' workspaces with their parked jobs, on
/// the caller's transaction, which must hold the workspaces' locks and have
/// written whatever freed the slots. Returns the jobs taken (`running`) or
/// released (`pending`). `candidates` are parked ids read earlier, tried
/// first when taking (see [`TAKE_PARKED`]).
pub async fn refill(
    db: &impl GenericClient,
    how: Refill,
    limits: &[(WorkspaceId, i64)],
    candidates: &[JobId],
    worker_id: &str,
    now: DateTime<Utc>,
    lease: Duration,
) -> Result<Vec<Job>, DbError> {
    if limits.is_empty() {
        return Ok(Vec::new());
    }
    let (lws, lmax) = limit_arrays(limits);
    let rows = match how {
        Refill::Take => {
            let cand: Vec<uuid::Uuid> = candidates.iter().map(|c| c.0).collect();
            let stmt = db.prepare_cached(TAKE_PARKED).await?;
            db.query(
                &stmt,
                &[&lws, &worker_id, &now, &(now + lease), &lmax, &cand],
            )
            .await?
        }
        Refill::Release => {
            let stmt = db.prepare_cached(RELEASE_PARKED).await?;
            db.query(&stmt, &[&lws, &lmax, &now]).await?
        }
    };
    Ok(rows.iter().map(Job::from_row).collect::<Result<_, _>>()?)
}

/// A workspace with parked jobs, as the scheduler's backstop sees it.
#[derive(Clone, Debug)]
pub struct ParkedWorkspace {
    pub id: WorkspaceId,
    pub running: i64,
    /// When its running count last changed.
    pub slots_changed_at: DateTime<Utc>,
}

impl Store {
    /// `pending|queued → running` (or an expired `running` lease taken over)
    /// for the claimable jobs among `ids`. `limits` names the workspaces with
    /// a concurrency limit: for those the claim takes at most as many jobs as
    /// the limit leaves room for (highest priority first) and parks the
    /// waiting ones that do not fit, with the workspaces' rows locked. Without
    /// limited workspaces it is one statement.
    pub async fn claim(
        &self,
        ids: &[JobId],
        worker_id: &str,
        now: DateTime<Utc>,
        lease: Duration,
        limits: &[(WorkspaceId, i64)],
    ) -> Result<Claimed, DbError> {
        let ids: Vec<_> = ids.iter().map(|i| i.0).collect();
        let rows = crate::db::retry_conflicts(|| async {
            let mut db = self.pool().get().await?;
            if limits.is_empty() {
                let stmt = db.prepare_cached(CLAIM).await?;
                return Ok(db
                    .query(&stmt, &[&ids, &worker_id, &now, &(now + lease)])
                    .await?);
            }
            let (lws, lmax) = limit_arrays(limits);
            let tx = db.transaction().await?;
            let ws: Vec<WorkspaceId> = lws.iter().map(|w| WorkspaceId(*w)).collect();
            lock_workspaces(&tx, &ws).await?;
            let stmt = tx.prepare_cached(CLAIM_OR_PARK).await?;
            let rows = tx
                .query(
                    &stmt,
                    &[&ids, &worker_id, &now, &(now + lease), &lws, &lmax],
                )
                .await?;
            tx.commit().await?;
            Ok(rows)
        })
        .await?;
        let mut out = Claimed::default();
        for r in &rows {
            let job = Job::from_row(r)?;
            if r.try_get::<_, bool>("run")? {
                out.running.push(job);
            } else {
                out.parked.push(job.id);
            }
        }
        Ok(out)
    }

    /// The next `per_workspace` parked ids of each workspace, in the order
    /// they run, read without locks: candidates for [`refill`].
    pub async fn parked_candidates(
        &self,
        workspaces: &[WorkspaceId],
        per_workspace: i64,
    ) -> Result<Vec<(WorkspaceId, JobId)>, DbError> {
        let ws: Vec<uuid::Uuid> = workspaces.iter().map(|w| w.0).collect();
        let db = crate::db::Conn::get(self.pool()).await?;
        let rows = db
            .query(
                "SELECT l.ws, p.id FROM unnest($1::uuid[]) AS l(ws) \
                 CROSS JOIN LATERAL (SELECT id FROM jobs \
                   WHERE workspace_id = l.ws AND parked_at IS NOT NULL \
                   ORDER BY priority DESC, created_at, id LIMIT $2) p",
                &[&ws, &per_workspace],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (WorkspaceId(r.get(0)), JobId(r.get(1))))
            .collect())
    }

    /// Workspaces that have parked jobs, with their running counts.
    pub async fn parked_workspaces(&self, limit: i64) -> Result<Vec<ParkedWorkspace>, DbError> {
        let db = crate::db::Conn::get(self.pool()).await?;
        // A loose index scan over the parked index: one probe per workspace,
        // however many jobs each has parked.
        let rows = db
            .query(
                "WITH RECURSIVE p AS ( \
                   (SELECT workspace_id FROM jobs WHERE parked_at IS NOT NULL \
                    ORDER BY workspace_id LIMIT 1) \
                   UNION ALL \
                   SELECT (SELECT workspace_id FROM jobs WHERE parked_at IS NOT NULL \
                           AND workspace_id > p.workspace_id ORDER BY workspace_id LIMIT 1) \
                   FROM p WHERE p.workspace_id IS NOT NULL) \
                 SELECT w.id, w.running::int8, w.slots_changed_at \
                 FROM p JOIN workspaces w ON w.id = p.workspace_id LIMIT $1",
                &[&limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ParkedWorkspace {
                id: WorkspaceId(r.get(0)),
                running: r.get(1),
                slots_changed_at: r.get(2),
            })
            .collect())
    }

    /// Releases parked jobs into the free slots of `limits`' workspaces (each
    /// in its own locked transaction) and returns them, `pending`, for the
    /// caller to send.
    pub async fn release_parked(
        &self,
        limits: &[(WorkspaceId, i64)],
        now: DateTime<Utc>,
    ) -> Result<Vec<Job>, DbError> {
        crate::db::retry_conflicts(|| async {
            let mut db = self.pool().get().await?;
            let tx = db.transaction().await?;
            let ws: Vec<WorkspaceId> = limits.iter().map(|l| l.0).collect();
            lock_workspaces(&tx, &ws).await?;
            let jobs = refill(&tx, Refill::Release, limits, &[], "", now, Duration::zero()).await?;
            tx.commit().await?;
            Ok(jobs)
        })
        .await
    }
}

impl Store {
    /// Status, due time and cancel flag of jobs, for deciding what to do
    /// with messages whose job could not be claimed.
    pub async fn peek(&self, ids: &[JobId]) -> Result<Vec<Peeked>, DbError> {
        let db = Conn::get(&self.pool).await?;
        let ids: Vec<_> = ids.iter().map(|i| i.0).collect();
        let rows = db
            .query(
                // A time wait is delivered by its delayed message like a
                // queued job: judged as one (due: back shortly; early: later).
                "SELECT id, CASE WHEN status = 'waiting' AND wait_kind = 'time' THEN 'queued' \
                   ELSE status END, run_at, cancel_requested_at IS NOT NULL, lease_expires_at \
                 FROM jobs WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Peeked {
                id: JobId(r.get(0)),
                status: r.get::<_, &str>(1).parse().unwrap_or(JobStatus::Dead),
                run_at: r.get(2),
                cancel_requested: r.get(3),
                lease_expires_at: r.get(4),
            })
            .collect())
    }

    /// Ends `cancelled` the jobs among `ids` whose cancel was requested and
    /// that nobody holds (waiting, or running under an expired lease): a
    /// cancel wins over starting them again. Returns the ids it ended.
    pub async fn end_cancel_requested(
        &self,
        ids: &[JobId],
        now: DateTime<Utc>,
    ) -> Result<Vec<JobId>, DbError> {
        let db = Conn::get(&self.pool).await?;
        let ids: Vec<_> = ids.iter().map(|i| i.0).collect();
        let rows = db
            .query(
                "UPDATE jobs SET status = 'cancelled', finished_at = $2, updated_at = $2, \
                   parked_at = NULL, lease_expires_at = NULL \
                 WHERE id = ANY($1) AND cancel_requested_at IS NOT NULL \
                   AND (status IN ('pending', 'queued') \
                        OR (status = 'running' AND lease_expires_at < $2)) \
                 RETURNING id",
                &[&ids, &now],
            )
            .await?;
        Ok(rows.iter().map(|r| JobId(r.get(0))).collect())
    }
}
