//! Jobs' output streams (V12's `job_stream`): chunks appended by the job's
//! worker under its lease, read in order from a cursor.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{Lease, Store};
use crate::db::{storable_json, Conn, DbError};
use crate::ids::{JobId, WorkspaceId};

impl Store {
    /// Appends `data` to the stream of the job `lease` holds, notifies its
    /// watchers (if any) and queues it for its WebSocket subscribers (if
    /// any, in AWS). Returns the chunk's id (its cursor), or
    /// `None` when the lease is lost (nothing was written).
    pub async fn append_stream(
        &self,
        lease: &Lease,
        workspace: WorkspaceId,
        data: &Value,
        now: DateTime<Utc>,
    ) -> Result<Option<i64>, DbError> {
        let db = Conn::get(self.pool()).await?;
        let row = db
            .query_one(
                "WITH ins AS (INSERT INTO job_stream (job_id, workspace_id, data, created_at) \
                   SELECT $1, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM jobs \
                     WHERE id = $1 AND status = 'running' AND attempts = $2 AND worker_id = $3) \
                   RETURNING id), \
                 told AS (SELECT pg_notify('offload_jobs', $1::text) FROM ins \
                   WHERE EXISTS (SELECT 1 FROM job_watches WHERE job_id = $1)), \
                 pushed AS (INSERT INTO realtime_outbox (job_id, chunk_id) SELECT $1, id FROM ins \
                   WHERE EXISTS (SELECT 1 FROM realtime_subscriptions \
                     WHERE job_id = $1 AND stream) RETURNING 1) \
                 SELECT (SELECT id FROM ins), (SELECT count(*) FROM told), \
                   (SELECT count(*) FROM pushed)",
                &[
                    &lease.job_id.0,
                    &lease.attempt,
                    &lease.worker_id,
                    &workspace.0,
                    &*storable_json(data),
                    &now,
                ],
            )
            .await?;
        // A chunk someone follows over the WebSocket API goes out now, not
        // with the job's next progress write.
        if row.get::<_, i64>(2) > 0 {
            self.push_changes_soon();
        }
        Ok(row.get(0))
    }

    /// Up to `limit` chunks of `job`'s stream after cursor `after`, in order.
    pub async fn stream_after(
        &self,
        job: JobId,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, Value)>, DbError> {
        let db = Conn::get(self.pool()).await?;
        let rows = db
            .query(
                "SELECT id, data FROM job_stream WHERE job_id = $1 AND id > $2 \
                 ORDER BY id LIMIT $3",
                &[&job.0, &after, &limit],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}
