//! `--only email`: e-mails rendered and handed to the SMTP sink per second
//! by one `send_email_batch` job of 1 000 contacts (the sink is aiosmtpd, as
//! in the tests; the provider's rate set out of the way), each with its
//! delivery row written before and after the send.

use std::sync::Arc;

use offload::email::{Mailer, SmtpMailer};
use offload::handlers::{Registry, SendEmailBatch};
use offload::queue::{PgQueue, Queue};
use offload::testing::SmtpSink;
use serde_json::json;
use uuid::Uuid;

use crate::{run_job, worker, Args, BenchDb};

async fn once(server: &str, sink: &SmtpSink, n: usize) -> anyhow::Result<f64> {
    let db = BenchDb::new(server, "email").await?;
    let (seq, step) = (Uuid::now_v7(), Uuid::now_v7());
    let conn = db.pool.get().await?;
    conn.execute(
        "INSERT INTO sequences (id, workspace_id, name) VALUES ($1, $2, 'bench')",
        &[&seq, &db.ws.0],
    )
    .await?;
    conn.execute(
        "INSERT INTO sequence_steps (id, sequence_id, workspace_id, position, from_address, subject, body_html) \
         VALUES ($1, $2, $3, 1, 'bench@bench.io', 'Hi {{ first_name | default(\"there\") }}', \
           '<p>Hello {{ first_name }} of {{ company | default(\"your team\") }}</p>')",
        &[&step, &seq, &db.ws.0],
    )
    .await?;
    let ids: Vec<Uuid> = conn
        .query(
            "INSERT INTO contacts (id, workspace_id, email, first_name) \
             SELECT gen_random_uuid(), $1, 'r' || i || '@bench.io', 'R' || i \
             FROM generate_series(1, $2::int4) AS i RETURNING id",
            &[&db.ws.0, &(n as i32)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(conn);
    let before = sink.messages().len();
    let mailer: Arc<dyn Mailer> =
        Arc::new(SmtpMailer::new(&sink.url()).map_err(anyhow::Error::msg)?);
    let reg = Registry::builtin().with(SendEmailBatch {
        mailer,
        rate: 100_000.0,
        warmup_days: 0,
    });
    let q: Arc<dyn Queue> = Arc::new(PgQueue::new(db.pool.clone(), 5));
    let w = Arc::new(worker(&db, q.clone(), reg));
    let (secs, job) = run_job(
        &db,
        q,
        w,
        "send_email_batch",
        json!({"sequence_id": seq, "sequence_step_id": step, "contact_ids": ids, "batch_size": 100}),
    )
    .await?;
    let r = job.result.unwrap_or_default();
    anyhow::ensure!(r["sent"] == n, "sent {r}");
    let got = sink.messages().len() - before;
    anyhow::ensure!(got == n, "the sink got {got} of {n}");
    db.drop_db().await?;
    Ok(n as f64 / secs)
}

pub async fn run(
    args: &Args,
    server: &str,
    report: &mut dyn FnMut(&str, Vec<f64>, &str),
) -> anyhow::Result<()> {
    let sink = SmtpSink::start();
    let mut rates = Vec::new();
    for _ in 0..args.repeat {
        let r = once(server, &sink, 1000).await?;
        eprintln!("  1000 e-mails rendered and handed to the SMTP sink: {r:.0}/s");
        rates.push(r);
    }
    report("email_smtp_per_s", rates, "e-mails/s");
    Ok(())
}
