//! Configuration, read once from the environment at start-up and validated
//! there: nothing deeper in the code reads the environment. Every variable
//! has a default for local use; a bad value stops the binary with one line
//! that names the variable.

use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;

/// The development secret used when `OFFLOAD_JWT_SECRET` is unset. Tokens
/// signed with it are worthless outside a laptop; start-up warns loudly.
pub const DEV_JWT_SECRET: &str = "offload-local-development-secret-do-not-use-in-production";

/// The local database used when `DATABASE_URL` is unset.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres:postgres@127.0.0.1:5432/offload";

#[derive(Debug, Error, PartialEq)]
#[error("{variable}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub reason: String,
}

/// Which queue backend carries job messages.
#[derive(Clone, Debug, PartialEq)]
pub enum QueueBackend {
    /// The `queue_messages` table in the same database.
    Postgres,
    /// Amazon SQS, or a local server speaking its API when `endpoint` is set.
    Sqs(SqsConfig),
}

#[derive(Clone, Debug, PartialEq)]
pub struct SqsConfig {
    /// `OFFLOAD_SQS_ENDPOINT`: a local SQS API server (moto, ElasticMQ).
    pub endpoint: Option<String>,
    /// `OFFLOAD_SQS_PREFIX`: queue names are `<prefix>-high|default|low|dlq`.
    pub prefix: String,
    /// Queue URLs given by the deployment (`OFFLOAD_SQS_{HIGH,DEFAULT,LOW,DLQ}_URL`);
    /// when absent they are looked up (or, with an endpoint, created) by name.
    pub urls: Option<[String; 4]>,
    pub region: String,
}

/// Settings of the worker's delivery rules.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerConfig {
    /// How long a claim holds a job before the scheduler may rescue it.
    pub lease: Duration,
    /// How often a running job's lease and message visibility are renewed.
    pub heartbeat: Duration,
    /// First retry delay; doubles per attempt up to `backoff_cap`, jittered
    /// between half and all of it.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// A handler is told to hand off when less than this remains before the deadline.
    pub handoff_margin: Duration,
    /// Delay before a message whose job another transaction held comes back.
    pub fairness_delay: Duration,
    /// For this long after an invocation starts, slots its finished jobs
    /// free are filled by starting their workspaces' parked jobs in the same
    /// invocation; after it, those jobs are released by message, so one busy
    /// workspace never keeps an invocation to itself.
    pub refill_window: Duration,
    /// About how long (jittered between half and all) messages wait before
    /// coming back when a whole batch could not be handled (the database
    /// unreachable, a statement refused).
    pub batch_failure_delay: Duration,
    /// Print one CloudWatch Embedded Metric Format line per finished job.
    pub emit_metrics: bool,
    /// The queues' maxReceiveCount: a retry whose message is this close to
    /// the dead-letter queue goes out as a fresh message instead.
    pub max_receive_count: u32,
    /// Runs in a row that find no database connection and snooze (no
    /// attempt spent) before the next such run counts as a failed attempt
    /// (`OFFLOAD_MAX_BUSY_SNOOZES`).
    pub max_busy_snoozes: u32,
}

/// The values [`Config::defaults`] gives, with no variable set.
impl Default for WorkerConfig {
    fn default() -> Self {
        Config::defaults().worker
    }
}

/// Settings of the local runner's event-source loop and scheduler clock.
#[derive(Clone, Debug, PartialEq)]
pub struct RunnerConfig {
    /// Messages per worker invocation (Lambda allows up to 10 000 with a
    /// batching window; the SQS backend is capped at 10 per receive).
    pub batch_size: usize,
    /// Concurrent receive loops per queue.
    pub loops_per_queue: usize,
    /// Worker invocations that may run at once per queue (the mapping's
    /// maximum concurrency; at least `loops_per_queue`).
    pub max_concurrency: usize,
    /// The invocation time limit the worker sees (Lambda's timeout).
    pub invocation_timeout: Duration,
    pub scheduler_interval: Duration,
}

/// Everything a binary needs, parsed once.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The database's URL, with `sslrootcert` when `db_ca_file` is set. Empty
    /// until start-up when it comes from `database_secret_arn`.
    pub database_url: String,
    /// `OFFLOAD_DB_CA_FILE`: CA bundle for the database's certificate.
    pub db_ca_file: Option<String>,
    /// `OFFLOAD_DATABASE_SECRET_ARN`: a Secrets Manager secret holding the
    /// database URL (under the key `url`, or as the whole string).
    pub database_secret_arn: Option<String>,
    /// `OFFLOAD_JWT_SECRET_ARN`: a secret holding the HS256 secret (key `secret`).
    pub jwt_secret_arn: Option<String>,
    /// `OFFLOAD_SECRETS_ENDPOINT`: a local server speaking Secrets Manager (moto).
    pub secrets_endpoint: Option<String>,
    /// `OFFLOAD_DB_POOL_SIZE`: connections one process keeps at most.
    pub db_pool_size: usize,
    /// `OFFLOAD_DB_POOL_TIMEOUT_SECS`: how long a checkout waits for a free
    /// connection. In the worker, running out of it snoozes the job without
    /// spending an attempt.
    pub db_pool_timeout: Duration,
    /// Running inside AWS Lambda (`AWS_LAMBDA_FUNCTION_NAME` is set): logs
    /// are JSON and pooled connections are verified before reuse, since a
    /// frozen container comes back with dead sockets.
    pub in_lambda: bool,
    /// `AWS_LAMBDA_LOG_STREAM_NAME`: names this process's worker in leases
    /// (`worker` outside Lambda).
    pub instance_name: String,
    pub bind: SocketAddr,
    /// `OFFLOAD_BROWSER_TOKEN_SECRET`: the key browser tokens are signed
    /// with (32 characters or more). Without it (or its ARN), a process
    /// outside Lambda generates one at start; inside Lambda browser tokens
    /// are refused, since each instance would have its own.
    pub browser_token_secret: Option<String>,
    /// `OFFLOAD_BROWSER_TOKEN_SECRET_ARN`: a secret holding it (key `secret`).
    pub browser_token_secret_arn: Option<String>,
    /// `OFFLOAD_REALTIME_ENDPOINT`: the management endpoint of the stack's
    /// WebSocket API (`https://{api}.execute-api.{region}.amazonaws.com/{stage}`),
    /// where changes of followed jobs are sent; unset locally.
    pub realtime_endpoint: Option<String>,
    /// `OFFLOAD_REALTIME_URL`: where browsers connect for live changes when
    /// it is not this API's own `/api/realtime` (`wss://…/live`, the stack's
    /// WebSocket API); the dashboard is told, and its CSP allows it.
    pub realtime_url: Option<String>,
    /// `OFFLOAD_JWT_SECRET`: the HS256 secret; `None` refuses HS256 tokens.
    pub jwt_secret: Option<String>,
    /// No verification was configured outside Lambda: `jwt_secret` is the
    /// public development secret.
    pub jwt_secret_is_default: bool,
    /// `OFFLOAD_JWKS_URL`: the identity provider's key set (RS/ES tokens).
    pub jwks_url: Option<String>,
    /// `OFFLOAD_JWT_ISSUER`: the `iss` tokens must carry; without
    /// `jwks_url`, its OIDC discovery document names the key set.
    pub jwt_issuer: Option<String>,
    /// `OFFLOAD_JWT_AUDIENCE` (comma-separated): the `aud` tokens must carry
    /// one of; empty: not checked.
    pub jwt_audience: Vec<String>,
    pub queue: QueueBackend,
    /// Receives after which a message moves to the dead-letter queue.
    pub max_receive_count: u32,
    pub worker: WorkerConfig,
    pub runner: RunnerConfig,
    /// Finished jobs and their logs older than this are pruned.
    pub retention: Duration,
    /// Allowed CORS origins (`OFFLOAD_CORS_ORIGINS`, comma-separated; empty: none).
    pub cors_origins: Vec<String>,
    /// Maximum request body (`OFFLOAD_MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
    /// The longest one statement may run on this process's connections
    /// (`OFFLOAD_STATEMENT_TIMEOUT_MS`: the worker's and scheduler's; the
    /// api function takes `api_statement_timeout` instead).
    pub statement_timeout: Duration,
    /// `OFFLOAD_API_STATEMENT_TIMEOUT_MS`: the API's, shorter: a request
    /// never holds a connection long, whatever a member asks for.
    pub api_statement_timeout: Duration,
    /// Long-polls of one workspace waiting at once in an API process
    /// (`OFFLOAD_MAX_WAITING_PER_WORKSPACE`); more answer 429.
    pub max_waiting_per_workspace: usize,
    /// Job stream connections (`GET …/jobs/{id}/stream`) of one workspace
    /// open at once in an API process (`OFFLOAD_MAX_STREAMS_PER_WORKSPACE`),
    /// counted apart from the long-polls; more answer 429.
    pub max_streams_per_workspace: usize,
    /// Largest file a client may upload (`OFFLOAD_MAX_UPLOAD_BYTES`).
    pub max_upload_bytes: u64,
    /// How long an API request may take (`OFFLOAD_REQUEST_TIMEOUT_SECS`).
    pub request_timeout: Duration,
    /// How long an `Idempotency-Key` names its job (`OFFLOAD_IDEMPOTENCY_TTL_HOURS`).
    pub idempotency_ttl: Duration,
    /// Where job files go: `file:///folder` or `s3://bucket` (`OFFLOAD_STORAGE`).
    pub storage_url: String,
    /// A local server speaking S3 (`OFFLOAD_S3_ENDPOINT`), e.g. moto.
    pub s3_endpoint: Option<String>,
    /// `AWS_REGION` (default `us-east-1`).
    pub aws_region: String,
    /// Most contacts one `bulk_tag` or `bulk_delete` job may touch
    /// (`OFFLOAD_MAX_BULK_CONTACTS`).
    pub max_bulk_contacts: usize,
    /// Let `webhook` jobs call loopback and private addresses
    /// (`OFFLOAD_WEBHOOK_ALLOW_PRIVATE`; off: no server-side request forgery).
    pub webhook_allow_private: bool,
    /// Where `send_email_batch` sends: an SMTP URL, or `ses`
    /// (`OFFLOAD_EMAIL_TRANSPORT`).
    pub email_transport: String,
    /// The e-mail provider's sends per second (`OFFLOAD_EMAIL_RATE`).
    pub email_rate: f64,
    /// Days a new sending domain takes to reach that rate
    /// (`OFFLOAD_EMAIL_WARMUP_DAYS`; 0: no warm-up).
    pub email_warmup_days: u32,
}

impl Config {
    /// What every setting is with no variable set: the one place defaults
    /// are written.
    pub fn defaults() -> Config {
        Config::from_lookup(|_| None).expect("the defaults are valid")
    }

    /// An error unless tokens can be verified some way: an issuer or key
    /// set (RS/ES), or a shared secret (HS256), given or named by ARN.
    /// Outside Lambda the development secret counts; inside, it is never
    /// set, so a deployed API without a setting refuses to start.
    pub fn require_token_verification(&self) -> Result<(), ConfigError> {
        if self.jwks_url.is_some()
            || self.jwt_issuer.is_some()
            || self.jwt_secret.is_some()
            || self.jwt_secret_arn.is_some()
        {
            return Ok(());
        }
        Err(ConfigError {
            variable: "OFFLOAD_JWT_ISSUER",
            reason: "no token verification is configured: set OFFLOAD_JWT_ISSUER or \
                     OFFLOAD_JWKS_URL (tokens your identity provider signs with RS/ES keys), \
                     or OFFLOAD_JWT_SECRET / OFFLOAD_JWT_SECRET_ARN (HS256)"
                .into(),
        })
    }

    /// The key browser tokens are signed with: the configured one, or one
    /// generated for this process outside Lambda; `None` inside Lambda
    /// without one.
    pub fn browser_keys(&self) -> Option<crate::browser_token::BrowserKeys> {
        match &self.browser_token_secret {
            Some(s) => Some(crate::browser_token::BrowserKeys::new(s.as_bytes())),
            None if self.in_lambda => None,
            None => Some(crate::browser_token::BrowserKeys::generated()),
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads configuration through `get`, so tests need not touch the
    /// process environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let var = |k: &str| get(k).filter(|v| !v.trim().is_empty());

        let db_ca_file = var("OFFLOAD_DB_CA_FILE");
        if let Some(ca) = &db_ca_file {
            crate::db::tls::read_ca_file(std::path::Path::new(ca)).map_err(|reason| {
                ConfigError {
                    variable: "OFFLOAD_DB_CA_FILE",
                    reason,
                }
            })?;
        }
        let database_secret_arn = var("OFFLOAD_DATABASE_SECRET_ARN");
        let jwt_secret_arn = var("OFFLOAD_JWT_SECRET_ARN");
        // With a secret ARN the URL comes from Secrets Manager at start.
        let database_url = match (&database_secret_arn, var("DATABASE_URL")) {
            (Some(_), None) => String::new(),
            (_, url) => database_url_with_ca(
                &url.unwrap_or_else(|| DEFAULT_DATABASE_URL.into()),
                db_ca_file.as_deref(),
            )
            .map_err(|reason| ConfigError {
                variable: "DATABASE_URL",
                reason,
            })?,
        };

        let bind = match var("OFFLOAD_BIND") {
            None => SocketAddr::from(([127, 0, 0, 1], 3000)),
            Some(v) => v.parse().map_err(|_| ConfigError {
                variable: "OFFLOAD_BIND",
                reason: format!("{v:?} is not an address like 127.0.0.1:3000"),
            })?,
        };

        let in_lambda = var("AWS_LAMBDA_FUNCTION_NAME").is_some();
        let jwks_url = var("OFFLOAD_JWKS_URL");
        if let Some(u) = &jwks_url {
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                return Err(ConfigError {
                    variable: "OFFLOAD_JWKS_URL",
                    reason: format!("{u:?} is not an http(s) URL"),
                });
            }
        }
        let jwt_issuer = var("OFFLOAD_JWT_ISSUER");
        let jwt_audience: Vec<String> = var("OFFLOAD_JWT_AUDIENCE")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if jwks_url.is_some() && jwt_issuer.is_none() && jwt_audience.is_empty() {
            // Every project of a provider may sign with the same keys (all
            // Firebase projects do): without `iss` or `aud` pinned, another
            // project's token naming one of your users' subjects would pass.
            return Err(ConfigError {
                variable: "OFFLOAD_JWKS_URL",
                reason: "a key set alone does not say whose tokens these are: set \
                         OFFLOAD_JWT_ISSUER or OFFLOAD_JWT_AUDIENCE as well (your project's \
                         issuer, or its audience)"
                    .into(),
            });
        }
        let (jwt_secret, jwt_secret_is_default) = match var("OFFLOAD_JWT_SECRET") {
            Some(s) if s.len() < 32 => {
                return Err(ConfigError {
                    variable: "OFFLOAD_JWT_SECRET",
                    reason: format!("must be at least 32 characters for HS256, got {}", s.len()),
                })
            }
            Some(s) => (Some(s), false),
            // Read from Secrets Manager at start (startup.rs).
            None if jwt_secret_arn.is_some() => (None, false),
            // Tokens come from an identity provider; HS256 is refused.
            None if jwks_url.is_some() || jwt_issuer.is_some() => (None, false),
            // Lambda never falls back to a public secret: the API refuses
            // to start (auth::Verifier::from_config).
            None if in_lambda => (None, false),
            None => (Some(DEV_JWT_SECRET.to_string()), true),
        };

        let browser_token_secret = var("OFFLOAD_BROWSER_TOKEN_SECRET");
        if let Some(s) = browser_token_secret.as_ref().filter(|s| s.len() < 32) {
            return Err(ConfigError {
                variable: "OFFLOAD_BROWSER_TOKEN_SECRET",
                reason: format!("must be at least 32 characters, got {}", s.len()),
            });
        }
        let browser_token_secret_arn = var("OFFLOAD_BROWSER_TOKEN_SECRET_ARN");
        let realtime_endpoint = var("OFFLOAD_REALTIME_ENDPOINT");
        let realtime_url = var("OFFLOAD_REALTIME_URL");
        if let Some(u) = realtime_url.as_ref().filter(|u| {
            !(u.starts_with("wss://") || u.starts_with("ws://"))
                || reqwest::Url::parse(u).is_err()
                || u.contains(['"', '\'', ';', ' '])
        }) {
            return Err(ConfigError {
                variable: "OFFLOAD_REALTIME_URL",
                reason: format!(
                    "{u:?} is not a WebSocket URL such as wss://abc123.execute-api.us-east-1.amazonaws.com/live"
                ),
            });
        }
        if let Some(e) = realtime_endpoint.as_ref().filter(|e| {
            !(e.starts_with("https://") || e.starts_with("http://"))
                || reqwest::Url::parse(e).is_err()
        }) {
            return Err(ConfigError {
                variable: "OFFLOAD_REALTIME_ENDPOINT",
                reason: format!(
                    "{e:?} is not a URL such as https://abc123.execute-api.us-east-1.amazonaws.com/live"
                ),
            });
        }

        let queue = match var("OFFLOAD_QUEUE").as_deref() {
            None | Some("postgres") => QueueBackend::Postgres,
            Some("sqs") => {
                let urls = [
                    "OFFLOAD_SQS_HIGH_URL",
                    "OFFLOAD_SQS_DEFAULT_URL",
                    "OFFLOAD_SQS_LOW_URL",
                    "OFFLOAD_SQS_DLQ_URL",
                ]
                .map(&var);
                let urls = if urls.iter().all(Option::is_some) {
                    Some(urls.map(Option::unwrap))
                } else if urls.iter().any(Option::is_some) {
                    return Err(ConfigError {
                        variable: "OFFLOAD_SQS_HIGH_URL",
                        reason: "set all four of OFFLOAD_SQS_{HIGH,DEFAULT,LOW,DLQ}_URL, or none"
                            .into(),
                    });
                } else {
                    None
                };
                QueueBackend::Sqs(SqsConfig {
                    endpoint: var("OFFLOAD_SQS_ENDPOINT"),
                    prefix: var("OFFLOAD_SQS_PREFIX").unwrap_or_else(|| "offload".into()),
                    urls,
                    region: var("AWS_REGION")
                        .or_else(|| var("AWS_DEFAULT_REGION"))
                        .unwrap_or_else(|| "us-east-1".into()),
                })
            }
            Some(other) => {
                return Err(ConfigError {
                    variable: "OFFLOAD_QUEUE",
                    reason: format!("unknown queue backend {other:?}; expected postgres or sqs"),
                })
            }
        };

        let lease = secs(&var, "OFFLOAD_LEASE_SECS", 60, 5..=43_200)?;
        let max_receive_count = num(&var, "OFFLOAD_MAX_RECEIVE_COUNT", 5, 1..=1_000)? as u32;
        let worker = WorkerConfig {
            lease,
            heartbeat: lease / 4,
            backoff_base: Duration::from_millis(num(
                &var,
                "OFFLOAD_BACKOFF_BASE_MS",
                2_000,
                1..=3_600_000,
            )?),
            backoff_cap: secs(&var, "OFFLOAD_BACKOFF_CAP_SECS", 3_600, 1..=1_209_600)?,
            handoff_margin: secs(&var, "OFFLOAD_HANDOFF_MARGIN_SECS", 30, 1..=600)?,
            fairness_delay: secs(&var, "OFFLOAD_FAIRNESS_DELAY_SECS", 5, 1..=900)?,
            refill_window: Duration::from_millis(num(
                &var,
                "OFFLOAD_REFILL_WINDOW_MS",
                1_000,
                0..=900_000,
            )?),
            batch_failure_delay: secs(&var, "OFFLOAD_BATCH_FAILURE_DELAY_SECS", 5, 1..=900)?,
            emit_metrics: var("OFFLOAD_EMIT_METRICS")
                .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
                .unwrap_or(false),
            max_receive_count,
            max_busy_snoozes: num(&var, "OFFLOAD_MAX_BUSY_SNOOZES", 20, 0..=10_000)? as u32,
        };

        let runner = RunnerConfig {
            batch_size: num(&var, "OFFLOAD_BATCH_SIZE", 100, 1..=10_000)? as usize,
            loops_per_queue: num(&var, "OFFLOAD_LOOPS_PER_QUEUE", 2, 1..=64)? as usize,
            max_concurrency: num(&var, "OFFLOAD_MAX_CONCURRENCY", 10, 1..=1_000)? as usize,
            invocation_timeout: secs(&var, "OFFLOAD_INVOCATION_TIMEOUT_SECS", 900, 1..=900)?,
            scheduler_interval: secs(&var, "OFFLOAD_SCHEDULER_INTERVAL_SECS", 5, 1..=3_600)?,
        };

        Ok(Config {
            database_url,
            db_ca_file,
            database_secret_arn,
            jwt_secret_arn,
            secrets_endpoint: var("OFFLOAD_SECRETS_ENDPOINT"),
            db_pool_size: num(&var, "OFFLOAD_DB_POOL_SIZE", 16, 1..=1_000)? as usize,
            db_pool_timeout: secs(&var, "OFFLOAD_DB_POOL_TIMEOUT_SECS", 10, 1..=300)?,
            in_lambda,
            instance_name: var("AWS_LAMBDA_LOG_STREAM_NAME").unwrap_or_else(|| "worker".into()),
            bind,
            jwt_secret,
            jwt_secret_is_default,
            browser_token_secret,
            browser_token_secret_arn,
            realtime_endpoint,
            realtime_url,
            jwks_url,
            jwt_issuer,
            jwt_audience,
            queue,
            max_receive_count,
            worker,
            runner,
            retention: Duration::from_secs(
                num(&var, "OFFLOAD_RETENTION_DAYS", 7, 1..=3_650)? * 86_400,
            ),
            cors_origins: var("OFFLOAD_CORS_ORIGINS")
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            max_body_bytes: num(&var, "OFFLOAD_MAX_BODY_BYTES", 1 << 20, 1_024..=(64 << 20))?
                as usize,
            statement_timeout: Duration::from_millis(num(
                &var,
                "OFFLOAD_STATEMENT_TIMEOUT_MS",
                120_000,
                100..=3_600_000,
            )?),
            api_statement_timeout: Duration::from_millis(num(
                &var,
                "OFFLOAD_API_STATEMENT_TIMEOUT_MS",
                5_000,
                100..=600_000,
            )?),
            max_waiting_per_workspace: num(
                &var,
                "OFFLOAD_MAX_WAITING_PER_WORKSPACE",
                200,
                1..=100_000,
            )? as usize,
            // As many browsers as the benchmark's readers of one job: a
            // stream costs its process memory, not the database.
            max_streams_per_workspace: num(
                &var,
                "OFFLOAD_MAX_STREAMS_PER_WORKSPACE",
                1_000,
                1..=100_000,
            )? as usize,
            max_upload_bytes: num(
                &var,
                "OFFLOAD_MAX_UPLOAD_BYTES",
                100 << 20,
                1_024..=(5 << 30),
            )?,
            request_timeout: secs(&var, "OFFLOAD_REQUEST_TIMEOUT_SECS", 29, 1..=900)?,
            idempotency_ttl: Duration::from_secs(
                num(&var, "OFFLOAD_IDEMPOTENCY_TTL_HOURS", 24, 1..=24 * 365)? * 3600,
            ),
            storage_url: match var("OFFLOAD_STORAGE") {
                Some(u) if u.starts_with("file:///") || u.starts_with("s3://") => u,
                Some(u) => {
                    return Err(ConfigError {
                        variable: "OFFLOAD_STORAGE",
                        reason: format!("{u:?} is not file:///absolute/folder or s3://bucket"),
                    })
                }
                None => format!(
                    "file://{}",
                    std::env::current_dir()
                        .unwrap_or_else(|_| std::env::temp_dir())
                        .join(".local/storage")
                        .display()
                ),
            },
            s3_endpoint: var("OFFLOAD_S3_ENDPOINT"),
            aws_region: var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
            max_bulk_contacts: num(&var, "OFFLOAD_MAX_BULK_CONTACTS", 10_000, 1..=1_000_000)?
                as usize,
            webhook_allow_private: var("OFFLOAD_WEBHOOK_ALLOW_PRIVATE")
                .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
                .unwrap_or(false),
            email_transport: {
                let t = var("OFFLOAD_EMAIL_TRANSPORT")
                    .unwrap_or_else(|| crate::handlers::SEND_EMAIL_DEFAULT_TRANSPORT.into());
                if t != "ses" {
                    crate::email::SmtpMailer::new(&t).map_err(|e| ConfigError {
                        variable: "OFFLOAD_EMAIL_TRANSPORT",
                        reason: format!("{e} (an smtp:// or smtps:// URL, or ses)"),
                    })?;
                }
                t
            },
            email_rate: num(&var, "OFFLOAD_EMAIL_RATE", 50, 1..=100_000)? as f64,
            email_warmup_days: num(&var, "OFFLOAD_EMAIL_WARMUP_DAYS", 7, 0..=60)? as u32,
        })
    }
}

/// `url`, checked, with the CA bundle `ca_file` as libpq's `sslrootcert`
/// unless the URL names one itself: every connection made from the URL then
/// uses it.
pub fn database_url_with_ca(url: &str, ca_file: Option<&str>) -> Result<String, String> {
    let mut url = url.to_string();
    if let Some(ca) = ca_file {
        if !url.contains("sslrootcert=") {
            let sep = if url.contains('?') { '&' } else { '?' };
            let encoded: String = url::form_urlencoded::byte_serialize(ca.as_bytes()).collect();
            url = format!("{url}{sep}sslrootcert={encoded}");
        }
    }
    crate::db::parse_url(&url).map_err(|e| e.to_string())?;
    Ok(url)
}

/// The AWS SDK's configuration for `region`, or for a local server speaking
/// the service's API (`endpoint`: moto), with local credentials if none are
/// set.
pub async fn aws_sdk_config(region: &str, endpoint: Option<&str>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()));
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "offload-local",
                "offload-local",
                None,
                None,
                "offload-local",
            ));
        }
    }
    loader.load().await
}

fn num(
    var: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    let Some(raw) = var(name) else {
        return Ok(default);
    };
    match raw.trim().parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(ConfigError {
            variable: name,
            reason: format!(
                "{raw:?} is not a whole number from {} to {}",
                range.start(),
                range.end()
            ),
        }),
    }
}

fn secs(
    var: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Duration, ConfigError> {
    num(var, name, default, range).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_for_a_laptop() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.bind.to_string(), "127.0.0.1:3000");
        assert_eq!(c.queue, QueueBackend::Postgres);
        assert!(c.jwt_secret_is_default);
        assert_eq!(c.database_url, DEFAULT_DATABASE_URL);
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let cases = [
            ("DATABASE_URL", "mysql://nope"),
            ("OFFLOAD_QUEUE", "rabbit"),
            ("OFFLOAD_BIND", "localhost"),
            ("OFFLOAD_JWT_SECRET", "short"),
            ("OFFLOAD_BATCH_SIZE", "0"),
            ("OFFLOAD_LEASE_SECS", "ten"),
            ("OFFLOAD_BROWSER_TOKEN_SECRET", "short"),
            ("OFFLOAD_REALTIME_ENDPOINT", "abc123.execute-api"),
            (
                "OFFLOAD_REALTIME_URL",
                "https://abc123.execute-api.eu-west-1.amazonaws.com/live",
            ),
            ("OFFLOAD_REALTIME_URL", "wss://x/live\"><script>"),
            (
                "OFFLOAD_JWKS_URL",
                "https://idp.example/.well-known/jwks.json",
            ),
        ];
        for (k, v) in cases {
            let err = parse(&[(k, v)]).unwrap_err();
            assert_eq!(err.variable, k, "{err}");
            assert!(err.to_string().starts_with(k), "{err}");
        }
    }

    #[test]
    fn sqs_backend_takes_endpoint_and_all_or_no_urls() {
        let c = parse(&[
            ("OFFLOAD_QUEUE", "sqs"),
            ("OFFLOAD_SQS_ENDPOINT", "http://127.0.0.1:5000"),
        ])
        .unwrap();
        let QueueBackend::Sqs(sqs) = c.queue else {
            panic!("expected sqs")
        };
        assert_eq!(sqs.endpoint.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(sqs.urls, None);
        let err = parse(&[("OFFLOAD_QUEUE", "sqs"), ("OFFLOAD_SQS_HIGH_URL", "x")]).unwrap_err();
        assert!(err.reason.contains("all four"));
    }
}
