//! `--only crm`: records per second one `sync_crm` job moves between an
//! enterprise workspace and the HubSpot-shaped CRM the tests use (a real
//! HTTP round trip per page or batch call, then the page's records, links,
//! cursor and checkpoint in one transaction). Three figures:
//! - first sync: `n` records only the CRM holds are pulled (created here)
//!   and `n` only we hold are pushed (created there), pages of 100;
//! - changes: after that, `n / 2` records changed on each side (a quarter
//!   of them on both, last write wins): pulled, read back, pushed;
//! - both again at HubSpot's limit for a Free or Starter private app, 100
//!   requests per 10 s, the rate the job keeps to.

use std::sync::Arc;

use offload::handlers::{Registry, SyncCrm};
use offload::queue::{PgQueue, Queue};
use offload::testing::{Failures, FakeCrm};
use offload::workspace::Tier;
use serde_json::{json, Value};

use crate::{run_job, worker, Args, BenchDb};

fn registry() -> Registry {
    Registry::builtin().with(SyncCrm {
        allow_private: true,
    })
}

fn payload() -> Value {
    json!({"provider": "bench", "direction": "bidirectional", "entity_types": ["contacts"],
           "on_conflict": "last_write_wins"})
}

/// A workspace with `n` contacts of its own, a CRM with `n` others, and
/// the CRM configured at `per_10s` requests per 10 s.
async fn setup(server: &str, n: usize, per_10s: i32) -> anyhow::Result<(BenchDb, FakeCrm)> {
    let db = BenchDb::with_tier(server, "crm", Tier::Enterprise).await?;
    let fake = FakeCrm::start(Failures::default()).await;
    let conn = db.pool.get().await?;
    conn.execute(
        "INSERT INTO crm_providers (workspace_id, name, base_url, access_token, batch_size, requests_per_10s) \
         VALUES ($1, 'bench', $2, $3, 100, $4)",
        &[&db.ws.0, &fake.base_url, &fake.token, &per_10s],
    )
    .await?;
    conn.execute(
        "INSERT INTO contacts (id, workspace_id, email, first_name, last_name, company, title) \
         SELECT gen_random_uuid(), $1, 'ours' || i || '@bench.io', 'First' || i, 'Last' || i, 'Acme', 'Buyer' \
         FROM generate_series(1, $2::int4) AS i",
        &[&db.ws.0, &(n as i32)],
    )
    .await?;
    drop(conn);
    for i in 0..n {
        fake.create(
            "contacts",
            json!({"email": format!("theirs{i}@bench.io"), "firstname": format!("T{i}"),
                   "lastname": "Remote", "company": "Globex", "jobtitle": "Lead"}),
        );
    }
    Ok((db, fake))
}

async fn sync(db: &BenchDb) -> anyhow::Result<(f64, Value)> {
    let q: Arc<dyn Queue> = Arc::new(PgQueue::new(db.pool.clone(), 5));
    let w = Arc::new(worker(db, q.clone(), registry()));
    let (secs, job) = run_job(db, q, w, "sync_crm", payload()).await?;
    Ok((secs, job.result.unwrap_or_default()))
}

/// (first sync, changes) in records per second.
async fn once(server: &str, n: usize, per_10s: i32) -> anyhow::Result<(f64, f64)> {
    let (db, fake) = setup(server, n, per_10s).await?;
    let (secs, r) = sync(&db).await?;
    let c = &r["counts"]["contacts"];
    anyhow::ensure!(
        c["pulled_created"] == n && c["pushed_created"] == n,
        "first sync: {r}"
    );
    anyhow::ensure!(
        fake.all("contacts").len() == 2 * n,
        "the CRM holds {}",
        fake.all("contacts").len()
    );
    let first = (2 * n) as f64 / secs;

    // Half of each side changes; every fourth record of ours also changes
    // there, earlier (ours is later and wins).
    let theirs: Vec<String> = fake
        .all("contacts")
        .into_iter()
        .filter(|(_, p)| p["email"].as_str().is_some_and(|e| e.starts_with("theirs")))
        .map(|(id, _)| id)
        .collect();
    let ours: Vec<(String, String)> = fake
        .all("contacts")
        .into_iter()
        .filter_map(|(id, p)| Some((id, p["email"].as_str()?.to_string())))
        .filter(|(_, e)| e.starts_with("ours"))
        .collect();
    for id in theirs.iter().take(n / 2) {
        fake.edit("contacts", id, json!({"jobtitle": "Director"}), None);
    }
    for (id, _) in ours.iter().take(n / 4) {
        fake.edit("contacts", id, json!({"company": "Initech"}), None);
    }
    let emails: Vec<String> = ours.iter().take(n / 2).map(|(_, e)| e.clone()).collect();
    db.pool
        .get()
        .await?
        .execute(
            "UPDATE contacts SET title = 'VP', updated_at = now() + interval '1 second' \
             WHERE workspace_id = $1 AND email = ANY($2)",
            &[&db.ws.0, &emails],
        )
        .await?;
    let (secs, r) = sync(&db).await?;
    let c = &r["counts"]["contacts"];
    let moved =
        c["pulled_updated"].as_u64().unwrap_or(0) + c["pushed_updated"].as_u64().unwrap_or(0);
    anyhow::ensure!(moved as usize == n, "changes: {r}");
    anyhow::ensure!(c["kept_local"] == n / 4, "changes: {r}");
    db.drop_db().await?;
    Ok((first, n as f64 / secs))
}

pub async fn run(
    args: &Args,
    server: &str,
    report: &mut dyn FnMut(&str, Vec<f64>, &str),
) -> anyhow::Result<()> {
    let n = args.crm_records;
    let (mut first, mut changes) = (Vec::new(), Vec::new());
    for _ in 0..args.repeat {
        let (a, b) = once(server, n, 10_000).await?;
        eprintln!(
            "  {n} + {n} records, first sync: {a:.0} records/s; {n} changes: {b:.0} records/s"
        );
        first.push(a);
        changes.push(b);
    }
    report("crm_sync_first_per_s", first, "records/s");
    report("crm_sync_changes_per_s", changes, "records/s");
    let (a, b) = once(server, n, 100).await?;
    eprintln!(
        "  at 100 requests per 10 s (HubSpot Free/Starter): first sync {a:.0} records/s; changes {b:.0} records/s"
    );
    report("crm_sync_first_hubspot_limit_per_s", vec![a], "records/s");
    report("crm_sync_changes_hubspot_limit_per_s", vec![b], "records/s");
    Ok(())
}
