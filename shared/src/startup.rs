//! Builds the application from a [`Config`]: the pool, the schema check,
//! the queue backend, and from those the API state, the worker and the
//! scheduler. Every binary (three Lambdas, the local runner) starts here, so
//! they are wired the same way.

use std::sync::Arc;

use thiserror::Error;

use crate::api::{ApiSettings, AppState};
use crate::auth::Verifier;
use crate::clock::Clock;
use crate::config::{Config, QueueBackend};
use crate::db::{self, DbError};
use crate::handlers::Registry;
use crate::queue::{PgQueue, Queue, QueueError, SqsQueue};
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::secrets::{Secret, SecretError};
use crate::storage::Storage;
use crate::store::Store;
use crate::worker::Worker;

/// Why a binary cannot start, naming the variable to look at. The cause is
/// part of the message (not a `source`), so it is printed once.
#[derive(Debug, Error)]
pub enum StartupError {
    #[error("DATABASE_URL: {0}")]
    Database(DbError),
    #[error("OFFLOAD_QUEUE: {0}")]
    Queue(QueueError),
    #[error("OFFLOAD_STORAGE: {0}")]
    Storage(crate::storage::StorageError),
    #[error("{0}")]
    Secret(#[from] SecretError),
}

impl From<DbError> for StartupError {
    fn from(e: DbError) -> Self {
        StartupError::Database(e)
    }
}

impl From<QueueError> for StartupError {
    fn from(e: QueueError) -> Self {
        StartupError::Queue(e)
    }
}

/// Reads the configuration and sets up logging for it (JSON lines inside
/// Lambda); a bad value is logged with the variable it names.
pub fn load_config() -> Result<Config, crate::config::ConfigError> {
    let config = Config::from_env();
    crate::telemetry::init(config.as_ref().is_ok_and(|c| c.in_lambda));
    config.inspect_err(|e| tracing::error!("configuration: {e}"))
}

/// The long-lived clients of a process, made once in `main`.
#[derive(Clone)]
pub struct Services {
    pub config: Config,
    pub store: Store,
    pub queue: Arc<dyn Queue>,
    pub registry: Arc<Registry>,
    pub storage: Storage,
    pub clock: Clock,
    /// Set with the Postgres backend, so the local runner can start its
    /// LISTEN connection.
    pub pg_queue: Option<PgQueue>,
}

/// Reads the secrets `config` names by ARN (the token secret, the database
/// URL) from Secrets Manager into it, once, at start; returns how the pool
/// reads the database's again when the password it holds is refused.
pub async fn resolve_secrets(config: &mut Config) -> Result<Option<db::Refresh>, StartupError> {
    if config.database_secret_arn.is_none()
        && config.jwt_secret_arn.is_none()
        && config.browser_token_secret_arn.is_none()
    {
        return Ok(None);
    }
    let client =
        crate::secrets::client(&config.aws_region, config.secrets_endpoint.as_deref()).await;
    if let Some(arn) = &config.jwt_secret_arn {
        let secret = Secret::new(client.clone(), "OFFLOAD_JWT_SECRET_ARN", arn, "secret");
        let value = secret.fetch().await?;
        if value.len() < 32 {
            return Err(SecretError {
                variable: secret.variable,
                arn: arn.clone(),
                reason: format!(
                    "must be at least 32 characters for HS256, got {}",
                    value.len()
                ),
            }
            .into());
        }
        config.jwt_secret = Some(value);
        config.jwt_secret_is_default = false;
    }
    if let Some(arn) = &config.browser_token_secret_arn {
        let secret = Secret::new(
            client.clone(),
            "OFFLOAD_BROWSER_TOKEN_SECRET_ARN",
            arn,
            "secret",
        );
        let value = secret.fetch().await?;
        if value.len() < 32 {
            return Err(SecretError {
                variable: secret.variable,
                arn: arn.clone(),
                reason: format!("must be at least 32 characters, got {}", value.len()),
            }
            .into());
        }
        config.browser_token_secret = Some(value);
    }
    let Some(arn) = &config.database_secret_arn else {
        return Ok(None);
    };
    let secret = std::sync::Arc::new(Secret::new(
        client,
        "OFFLOAD_DATABASE_SECRET_ARN",
        arn,
        "url",
    ));
    let ca = config.db_ca_file.clone();
    let prepare = move |url: String| {
        crate::config::database_url_with_ca(&url, ca.as_deref())
            .map_err(|e| format!("the URL in the secret: {e}"))
    };
    config.database_url = prepare(secret.fetch().await?).map_err(|reason| SecretError {
        variable: "OFFLOAD_DATABASE_SECRET_ARN",
        arn: arn.clone(),
        reason,
    })?;
    Ok(Some(secret.refresher(prepare)))
}

impl Services {
    /// Connects to the database (refusing an outdated schema) and to the
    /// configured queue backend.
    pub async fn connect(mut config: Config, registry: Registry) -> Result<Services, StartupError> {
        let refresh = resolve_secrets(&mut config).await?;
        let pool = db::pool_with(
            &config.database_url,
            db::PoolOptions {
                size: config.db_pool_size,
                wait_timeout: config.db_pool_timeout,
                verify: config.in_lambda,
                statement_timeout: Some(config.statement_timeout),
            },
            refresh,
        )?;
        db::check_schema(&pool).await.map_err(|e| match e {
            DbError::Pool(deadpool_postgres::PoolError::Backend(e)) => {
                db::unreachable(&config.database_url, e)
            }
            DbError::Pool(p) => DbError::Inconsistent(format!(
                "cannot reach the database at {}: {p}",
                db::describe(&config.database_url)
            )),
            other => other,
        })?;
        let (queue, pg_queue): (Arc<dyn Queue>, _) = match &config.queue {
            QueueBackend::Postgres => {
                let q = PgQueue::new(pool.clone(), config.max_receive_count);
                (Arc::new(q.clone()), Some(q))
            }
            QueueBackend::Sqs(sqs) => (
                Arc::new(SqsQueue::connect(sqs, config.max_receive_count).await?),
                None,
            ),
        };
        let storage = Storage::from_url(
            &config.storage_url,
            &config.aws_region,
            config.s3_endpoint.as_deref(),
        )
        .map_err(StartupError::Storage)?;
        Ok(Services {
            storage,
            store: Store::new(pool).with_push(
                config
                    .realtime_endpoint
                    .as_deref()
                    .map(|e| Arc::new(crate::realtime::Pusher::new(e, &config.aws_region))),
            ),
            queue,
            registry: Arc::new(registry),
            clock: Clock::System,
            pg_queue,
            config,
        })
    }

    /// The API's state; an error when no token verification is configured
    /// inside Lambda.
    pub fn api_state(&self) -> Result<AppState, crate::config::ConfigError> {
        let watch = crate::api::watch::Watch::new(
            Some(self.config.database_url.clone()),
            self.config.max_waiting_per_workspace,
            self.config.max_streams_per_workspace,
        );
        Ok(AppState {
            realtime: crate::api::realtime::Realtime::new(watch.clone(), self.store.clone()),
            store: self.store.clone(),
            queue: self.queue.clone(),
            registry: self.registry.clone(),
            auth: Verifier::from_config(&self.config)?,
            clock: self.clock.clone(),
            settings: ApiSettings::from(&self.config),
            storage: self.storage.clone(),
            watch,
            browser: self.config.browser_keys(),
        })
    }

    pub fn worker(&self, name: &str) -> Worker {
        Worker::new(
            self.store.clone(),
            self.queue.clone(),
            self.registry.clone(),
            self.config.worker.clone(),
            self.clock.clone(),
            name,
            self.storage.clone(),
        )
    }

    pub fn scheduler(&self) -> Scheduler {
        Scheduler {
            store: self.store.clone(),
            queue: self.queue.clone(),
            clock: self.clock.clone(),
            config: SchedulerConfig {
                retention: self.config.retention,
                ..SchedulerConfig::default()
            },
        }
    }
}
