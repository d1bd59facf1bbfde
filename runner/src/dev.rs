//! `offload dev`: everything on one laptop.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use offload::auth::Keys;
use offload::config::{Config, QueueBackend};
use offload::event_source::Polling;
use offload::handlers::Registry;
use offload::ids::{UserId, WorkspaceId};
use offload::startup::Services;
use offload::workspace::{self, Role, Tier};
use tokio::sync::watch;
use uuid::uuid;

/// The demo workspace and its admin: the same on every start, so a token
/// printed yesterday still names a member today (until it expires).
pub const DEMO_WORKSPACE: WorkspaceId = WorkspaceId(uuid!("0ff10ad0-0000-4000-8000-00000000d3e0"));
pub const DEMO_USER: UserId = UserId(uuid!("0ff10ad0-0000-4000-8000-0000000000a1"));

pub async fn run(config: Config) -> anyhow::Result<()> {
    if config.jwt_secret_is_default {
        eprintln!(
            "WARNING: OFFLOAD_JWT_SECRET is unset; tokens are signed with the public \
             development secret. Never expose this server beyond your machine."
        );
    }
    for m in crate::migrate(&config).await? {
        eprintln!("applied migration {m}");
    }
    let services = Services::connect(config.clone(), Registry::for_config(&config)).await?;
    {
        let db = services.store.pool().get().await?;
        workspace::ensure_workspace(&**db, DEMO_WORKSPACE, "Demo", Tier::Enterprise).await?;
        workspace::add_member(&**db, DEMO_WORKSPACE, DEMO_USER, Role::Admin).await?;
    }
    let now = Utc::now();
    // With only an identity provider configured there is no secret to sign
    // with: the line stays, empty, and clients bring the provider's tokens.
    let token = Keys::from_config(&config)
        .map(|k| k.issue(DEMO_USER, now, now + chrono::Duration::hours(24)))
        .unwrap_or_default();
    let url = format!("http://{}", config.bind);
    // Listen before printing, so the lines printed can be used at once.
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .map_err(|e| anyhow::anyhow!("OFFLOAD_BIND: cannot listen on {}: {e}", config.bind))?;

    // One write, and no panic if whoever started us stopped reading.
    let banner = format!(
        "export OFFLOAD_URL={url}\n\
         export OFFLOAD_WORKSPACE={DEMO_WORKSPACE}\n\
         export OFFLOAD_TOKEN={token}\n\
         # try it:\n\
         # curl -s -X POST \"$OFFLOAD_URL/api/workspaces/$OFFLOAD_WORKSPACE/jobs\" \\\n\
         #   -H \"Authorization: Bearer $OFFLOAD_TOKEN\" -H 'Content-Type: application/json' \\\n\
         #   -d '{{\"type\":\"sleep\",\"payload\":{{\"ms\":3000,\"steps\":6}}}}'\n\
         # curl -s \"$OFFLOAD_URL/api/workspaces/$OFFLOAD_WORKSPACE/jobs\" -H \"Authorization: Bearer $OFFLOAD_TOKEN\"\n"
    );
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes());
        let _ = out.flush();
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    let listener_task = services
        .pg_queue
        .as_ref()
        .map(|pg| pg.listen(&config.database_url));
    let worker = Arc::new(services.worker("offload-dev"));
    let batch = config
        .runner
        .batch_size
        .min(services.queue.max_receive_batch());
    let wait = match config.queue {
        QueueBackend::Postgres => Duration::from_secs(1),
        QueueBackend::Sqs(_) => Duration::from_secs(5),
    };
    offload::event_source::spawn_all(
        &mut tasks,
        services.queue.clone(),
        worker,
        &Polling {
            batch,
            loops_per_queue: config.runner.loops_per_queue,
            max_concurrency: config.runner.max_concurrency,
            visibility: config.worker.lease,
            wait,
            invocation_timeout: config.runner.invocation_timeout,
        },
        &stop_rx,
    );
    let scheduler = services.scheduler();
    let every = config.runner.scheduler_interval;
    let mut stop = stop_rx.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => { scheduler.run_once().await; }
                _ = stop.changed() => break,
            }
        }
    });

    tracing::info!(%url, queue = ?backend_name(&config), batch, "offload dev is running; Ctrl-C stops it");
    let app = offload::api::router(services.api_state()?);
    let mut stop = stop_rx.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stop.changed().await;
    });
    let server = tokio::spawn(async move { server.await });

    shutdown_signal().await;
    eprintln!("stopping: finishing in-flight batches…");
    let _ = stop_tx.send(true);
    let _ = server.await;
    // The event sources and the scheduler stop once their current batch is
    // done; the LISTEN connection never ends on its own.
    while tasks.join_next().await.is_some() {}
    if let Some(l) = listener_task {
        l.abort();
    }
    Ok(())
}

fn backend_name(config: &Config) -> &'static str {
    match config.queue {
        QueueBackend::Postgres => "postgres",
        QueueBackend::Sqs(_) => "sqs",
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
