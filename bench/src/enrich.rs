//! `--only enrich`: contacts enriched per second by one `enrich_contact`
//! job against the loopback provider the tests use (a real HTTP round trip
//! per contact, then the contact, its snapshot and the checkpoint in one
//! transaction), with a quota that does not bind; and past an hourly quota
//! (its bucket holds an hour's calls, spent at once): the job's pace is then
//! the quota's, and the figure says how close to it the snoozes keep it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use offload::handlers::{EnrichContact, Registry};
use offload::queue::{PgQueue, Queue};
use offload::testing::{Failures, FakeProvider};
use serde_json::json;

use crate::{run_job, worker, Args, BenchDb};

async fn setup(
    server: &str,
    n: usize,
    per_hour: i32,
) -> anyhow::Result<(BenchDb, FakeProvider, Vec<uuid::Uuid>)> {
    let db = BenchDb::new(server, "enrich").await?;
    let fake = FakeProvider::start(Failures::default()).await;
    let conn = db.pool.get().await?;
    conn.execute(
        "INSERT INTO enrichment_providers (workspace_id, name, base_url, api_key, field_map, calls_per_hour) \
         VALUES ($1, 'bench', $2, $3, $4, $5)",
        &[
            &db.ws.0,
            &fake.base_url,
            &fake.api_key,
            &json!({"title": "person.title", "phone": "person.phone",
                    "company": "person.organization.name", "linkedin_url": "person.linkedin"}),
            &per_hour,
        ],
    )
    .await?;
    let ids: Vec<uuid::Uuid> = conn
        .query(
            "INSERT INTO contacts (id, workspace_id, email) \
             SELECT gen_random_uuid(), $1, 'e' || i || '@bench.io' FROM generate_series(1, $2::int4) AS i \
             RETURNING id",
            &[&db.ws.0, &(n as i32)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(conn);
    Ok((db, fake, ids))
}

fn registry() -> Registry {
    Registry::builtin().with(EnrichContact {
        allow_private: true,
    })
}

/// Contacts per second for one job of `n`, the quota not binding.
async fn unbound_once(server: &str, n: usize) -> anyhow::Result<f64> {
    let (db, fake, ids) = setup(server, n, 1_000_000).await?;
    let q: Arc<dyn Queue> = Arc::new(PgQueue::new(db.pool.clone(), 5));
    let w = Arc::new(worker(&db, q.clone(), registry()));
    let (secs, job) = run_job(
        &db,
        q,
        w,
        "enrich_contact",
        json!({"contact_ids": ids, "provider": "bench"}),
    )
    .await?;
    let r = job.result.unwrap_or_default();
    anyhow::ensure!(r["enriched"] == n, "enriched {r}");
    anyhow::ensure!(
        fake.answered().len() == n,
        "the provider answered {}",
        fake.answered().len()
    );
    db.drop_db().await?;
    Ok(n as f64 / secs)
}

/// With a quota of `per_hour` calls (a bucket that starts full): contacts
/// per second over the `n - per_hour` contacts past the first `per_hour`.
async fn bound_once(server: &str, n: usize, per_hour: i32) -> anyhow::Result<f64> {
    let (db, _fake, ids) = setup(server, n, per_hour).await?;
    let pg = PgQueue::new(db.pool.clone(), 5);
    let q: Arc<dyn Queue> = Arc::new(pg.clone());
    let w = Arc::new(worker(&db, q.clone(), registry()));
    let loops = crate::Loops::start(&db, &pg, w, 10, 2);
    let conn = db.pool.get().await?;
    let job = offload::store::NewJob::new(
        db.ws,
        "enrich_contact",
        json!({"contact_ids": ids, "provider": "bench"}),
    );
    let id = job.id;
    offload::enqueue::create_jobs(
        &db.store,
        &pg,
        &conn,
        &[job],
        chrono::Utc::now(),
        Duration::from_secs(10),
    )
    .await?;
    drop(conn);
    // The burst: the bucket's first `per_hour` calls.
    let burst = per_hour as i64;
    let start = loop {
        let j = db.store.get_any(id).await?.expect("the job");
        if j.progress.processed as i64 >= burst {
            break Instant::now();
        }
        anyhow::ensure!(
            !j.status.is_terminal(),
            "ended {:?}: {:?}",
            j.status,
            j.error_message
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let end = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let j = db.store.get_any(id).await?.expect("the job");
        if j.status.is_terminal() {
            break j;
        }
        anyhow::ensure!(Instant::now() < end, "not done: {:?}", j.progress);
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let secs = start.elapsed().as_secs_f64();
    loops.stop().await;
    anyhow::ensure!(
        done.result.as_ref().is_some_and(|r| r["enriched"] == n),
        "{:?}",
        done.result
    );
    db.drop_db().await?;
    Ok((n as i64 - burst) as f64 / secs)
}

pub async fn run(
    args: &Args,
    server: &str,
    report: &mut dyn FnMut(&str, Vec<f64>, &str),
) -> anyhow::Result<()> {
    let n = args.enrich_contacts;
    let mut free = Vec::new();
    for _ in 0..args.repeat {
        let r = unbound_once(server, n).await?;
        eprintln!("  {n} contacts, quota not binding: {r:.0} contacts/s");
        free.push(r);
    }
    report("enrich_contacts_per_s", free, "contacts/s");
    // A bucket holds an hour's calls: 720 go at once, then one every 5 s.
    let pace = bound_once(server, 726, 720).await?;
    eprintln!("  past a quota of 720 calls an hour (0.200/s): {pace:.3} contacts/s");
    report("enrich_past_quota_per_s", vec![pace], "contacts/s");
    Ok(())
}
