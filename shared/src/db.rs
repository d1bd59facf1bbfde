//! Connecting to Postgres and keeping its schema in step with the code.
//! Migrations are the SQL files of `migrations/`, embedded at build time and
//! applied by refinery; binaries refuse to start against an older schema.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use thiserror::Error;

pub mod tls;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

#[derive(Debug, Error)]
pub enum DbError {
    #[error("not a valid PostgreSQL connection URL ({0}); expected postgres://user:password@host:port/database")]
    BadUrl(String),
    /// `reason` is the whole chain of causes, with the likely cause when
    /// the error alone does not name it (a certificate, a server that wants
    /// TLS), on one line.
    #[error("cannot reach the database at {target}: {reason}")]
    Unreachable { target: String, reason: String },
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
    #[error(
        "the database schema is at version {have} but this build needs version {need}; \
         run `offload migrate` (or `cargo run --release --bin offload -- migrate`) first"
    )]
    SchemaBehind { have: i64, need: i64 },
    #[error("database error: {}", pg_message(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Inconsistent(String),
    #[error("no database connection available: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// The server's own message for an error (tokio-postgres's Display says
/// only "db error").
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Parses a connection URL, with its `sslmode` and `sslrootcert` (see
/// [`tls`]), without connecting.
pub fn target(url: &str) -> Result<tls::Target, DbError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(DbError::BadUrl("it must start with postgres://".into()));
    }
    tls::target(url, None).map_err(DbError::BadUrl)
}

/// Parses a connection URL without connecting.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, DbError> {
    Ok(target(url)?.config)
}

/// A failed connection to `url`, with the likely cause when the error
/// alone does not name it (a certificate, a server that wants TLS).
pub fn unreachable(url: &str, error: tokio_postgres::Error) -> DbError {
    // The server's own message, or the client's error with its causes
    // (tokio-postgres's Display stops at "error performing TLS handshake").
    let mut reason = pg_message(&error);
    let mut cause = match error.as_db_error() {
        Some(_) => None,
        None => std::error::Error::source(&error),
    };
    while let Some(c) = cause {
        reason = format!("{reason}: {c}");
        cause = c.source();
    }
    let reason = reason.replace('\n', " ");
    let hint = target(url).ok().and_then(|t| {
        let host = describe(url);
        let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or_default();
        tls::explain(&reason, t.mode, host)
    });
    DbError::Unreachable {
        target: describe(url),
        reason: match hint {
            Some(h) => format!("{reason}; {h}"),
            None => reason,
        },
    }
}

/// Where a URL points, for messages (never the password).
pub fn describe(url: &str) -> String {
    match parse_url(url) {
        Ok(cfg) => {
            let host = cfg
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_default();
            let port = cfg.get_ports().first().copied().unwrap_or(5432);
            format!("{host}:{port}/{}", cfg.get_dbname().unwrap_or(""))
        }
        Err(_) => "<invalid url>".into(),
    }
}

/// Reads a connection URL again (from a secret that may have been rotated).
pub type Refresh = std::sync::Arc<
    dyn Fn() -> futures::future::BoxFuture<'static, Result<String, String>> + Send + Sync,
>;

/// The settings every connection of ours gets.
fn tune(cfg: &mut tokio_postgres::Config, statement_timeout: Option<Duration>) {
    cfg.connect_timeout(Duration::from_secs(5));
    cfg.application_name("offload");
    // Plans over `unnest` of hundreds of ids go bad at the default
    // random_page_cost; a forgotten open transaction must not hold back
    // vacuum of the hot tables for long; and no statement a caller can
    // make expensive runs past the process's limit (SQLSTATE 57014).
    let mut options =
        "-c random_page_cost=1.1 -c idle_in_transaction_session_timeout=60000".to_string();
    if let Some(t) = statement_timeout {
        options.push_str(&format!(" -c statement_timeout={}", t.as_millis().max(1)));
    }
    cfg.options(&options);
}

/// How the pool opens connections: with the current URL's settings; when
/// the server refuses the password, the URL is read again (at most once a
/// minute) and the connection tried once more with it. Connections already
/// open keep working through a rotation; new ones pick up the new password.
struct Connector {
    current: std::sync::RwLock<tls::Target>,
    statement_timeout: Option<Duration>,
    refresh: Option<Refresh>,
    last_refresh: tokio::sync::Mutex<Option<std::time::Instant>>,
}

type Opened = (tokio_postgres::Client, tokio::task::JoinHandle<()>);

async fn open(target: tls::Target) -> Result<Opened, tokio_postgres::Error> {
    let (client, conn) = target.config.connect(target.tls).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok((client, task))
}

impl Connector {
    fn target(&self) -> tls::Target {
        self.current.read().expect("connector lock").clone()
    }

    /// Reads the URL again unless that happened less than a minute ago;
    /// returns whether the settings changed.
    async fn reread(&self) -> bool {
        let Some(refresh) = &self.refresh else {
            return false;
        };
        let mut last = self.last_refresh.lock().await;
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        match refresh().await.and_then(|url| {
            let mut t = target(&url).map_err(|e| e.to_string())?;
            tune(&mut t.config, self.statement_timeout);
            Ok(t)
        }) {
            Ok(t) => {
                tracing::info!("the database refused the password: its secret was read again");
                *self.current.write().expect("connector lock") = t;
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the database secret again");
                false
            }
        }
    }
}

impl deadpool_postgres::Connect for Connector {
    fn connect(
        &self,
        _: &tokio_postgres::Config,
    ) -> futures::future::BoxFuture<'_, Result<Opened, tokio_postgres::Error>> {
        Box::pin(async move {
            match open(self.target()).await {
                Err(e)
                    if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
                        && self.reread().await =>
                {
                    open(self.target()).await
                }
                other => other,
            }
        })
    }
}

/// How a pool is sized and behaves.
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Connections it keeps at most.
    pub size: usize,
    /// How long a checkout waits for a free connection before it fails
    /// with a pool timeout.
    pub wait_timeout: Duration,
    /// Check a connection with a round trip before reuse: a Lambda that was
    /// frozen comes back with dead sockets, and verified recycling replaces
    /// them instead of failing the first query. A long-running process (the
    /// local runner, a benchmark) skips that round trip per checkout and
    /// only drops connections it knows are closed.
    pub verify: bool,
    /// The longest a statement may run on these connections (none: the
    /// server's setting).
    pub statement_timeout: Option<Duration>,
}

impl PoolOptions {
    /// `size` connections, the configured default wait, no verification.
    pub fn new(size: usize) -> PoolOptions {
        PoolOptions {
            size,
            wait_timeout: crate::config::Config::defaults().db_pool_timeout,
            verify: false,
            statement_timeout: None,
        }
    }
}

/// A pool of `size` connections (see [`PoolOptions::new`]).
pub fn pool(url: &str, size: usize) -> Result<Pool, DbError> {
    pool_with(url, PoolOptions::new(size), None)
}

/// A pool whose new connections, with `refresh`, read the URL again when
/// the server refuses the password (a rotated secret).
pub fn pool_with(
    url: &str,
    options: PoolOptions,
    refresh: Option<Refresh>,
) -> Result<Pool, DbError> {
    let mut t = target(url)?;
    tune(&mut t.config, options.statement_timeout);
    let mgr = Manager::from_connect(
        t.config.clone(),
        Connector {
            current: std::sync::RwLock::new(t),
            statement_timeout: options.statement_timeout,
            refresh,
            last_refresh: tokio::sync::Mutex::new(None),
        },
        ManagerConfig {
            recycling_method: if options.verify {
                RecyclingMethod::Verified
            } else {
                RecyclingMethod::Fast
            },
        },
    );
    Pool::builder(mgr)
        .max_size(options.size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(options.wait_timeout))
        .create_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| DbError::BadUrl(e.to_string()))
}

/// LISTENs on `channel` over a connection of its own until the connection
/// ends: `listening` once the server has taken the LISTEN, then `payload`
/// for each notification. Returns the error that ended it.
pub async fn listen(
    url: &str,
    channel: &str,
    mut listening: impl FnMut(),
    mut payload: impl FnMut(&str),
) -> Result<(), DbError> {
    use futures::StreamExt;
    let target = target(url)?;
    let (client, mut conn) = target
        .config
        .connect(target.tls)
        .await
        .map_err(|e| unreachable(url, e))?;
    let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
    let statement = format!("LISTEN {channel}");
    let listen = client.batch_execute(&statement);
    tokio::pin!(listen);
    let mut started = false;
    loop {
        tokio::select! {
            r = &mut listen, if !started => {
                r?;
                started = true;
                listening();
            }
            m = messages.next() => match m {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => payload(n.payload()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            }
        }
    }
}

/// Opens one connection outside any pool (migrations, LISTEN).
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, DbError> {
    let mut t = target(url)?;
    t.config.connect_timeout(Duration::from_secs(5));
    let (client, _) = open(t).await.map_err(|e| unreachable(url, e))?;
    Ok(client)
}

/// Applies every pending migration and returns the names of those applied.
pub async fn migrate(url: &str) -> Result<Vec<String>, DbError> {
    let mut client = connect(url).await?;
    // Migrations a newer release applied are accepted (a rolled-back
    // deploy runs this on a schema ahead of it); one that differs from this
    // build's copy of the same version is refused.
    let report = embedded::migrations::runner()
        .set_abort_divergent(true)
        .set_abort_missing(false)
        .run_async(&mut client)
        .await?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect())
}

/// Applies the migrations up to `version` and no further: tests of a
/// migration run it on a database holding the rows of the schema before.
#[cfg(feature = "testing")]
pub async fn migrate_to(url: &str, version: i32) -> Result<(), DbError> {
    let mut client = connect(url).await?;
    embedded::migrations::runner()
        .set_target(refinery::Target::Version(version))
        .run_async(&mut client)
        .await?;
    Ok(())
}

/// The schema version this build was compiled against.
pub fn required_version() -> i64 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version() as i64)
        .max()
        .unwrap_or(0)
}

/// Fails with [`DbError::SchemaBehind`] unless every migration of this build
/// has been applied, and with [`DbError::Unreachable`] when the database
/// cannot be reached.
pub async fn check_schema(pool: &Pool) -> Result<(), DbError> {
    let client = pool.get().await?;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let have: i64 = if exists {
        client
            .query_one(
                "SELECT coalesce(max(version), 0)::int8 FROM refinery_schema_history",
                &[],
            )
            .await?
            .get(0)
    } else {
        0
    };
    let need = required_version();
    if have < need {
        return Err(DbError::SchemaBehind { have, need });
    }
    Ok(())
}

/// Whether an error is the server or network going away (as opposed to a
/// bad statement): callers treat those as "database unreachable".
pub fn is_connection_error(e: &DbError) -> bool {
    match e {
        DbError::Unreachable { .. } | DbError::Pool(_) => true,
        DbError::Query(q) => q.is_closed() || q.code().is_none(),
        _ => false,
    }
}

/// Whether the server cancelled the statement for running past the
/// connection's `statement_timeout`.
pub fn is_statement_timeout(e: &DbError) -> bool {
    matches!(e, DbError::Query(q) if q.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED))
}

/// Creates the database named in `url` when it does not exist, connecting
/// to the server's `postgres` database to do so. Returns whether it created it.
pub async fn ensure_database(url: &str) -> Result<bool, DbError> {
    let mut admin = target(url)?;
    let name = admin
        .config
        .get_dbname()
        .ok_or_else(|| DbError::BadUrl("it names no database".into()))?
        .to_string();
    admin.config.dbname("postgres");
    admin.config.connect_timeout(Duration::from_secs(5));
    let (client, _) = open(admin).await.map_err(|e| unreachable(url, e))?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if exists {
        return Ok(false);
    }
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    match client
        .batch_execute(&format!("CREATE DATABASE {quoted}"))
        .await
    {
        Ok(()) => Ok(true),
        // Another process created it first.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// A pooled connection whose statements are prepared once per connection
/// and reused: a plain `query(&str)` costs two round trips (prepare, then
/// execute), a cached one costs one. The hot paths (receive, claim,
/// complete, delete) go through this.
pub struct Conn(pub deadpool_postgres::Object);

type Params<'a> = &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)];

impl Conn {
    pub async fn get(pool: &Pool) -> Result<Conn, DbError> {
        Ok(Conn(pool.get().await?))
    }

    pub async fn query(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<tokio_postgres::Row>, DbError> {
        let stmt = self.0.prepare_cached(sql).await?;
        Ok(self.0.query(&stmt, params).await?)
    }

    pub async fn query_opt(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<tokio_postgres::Row>, DbError> {
        let stmt = self.0.prepare_cached(sql).await?;
        Ok(self.0.query_opt(&stmt, params).await?)
    }

    pub async fn query_one(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<tokio_postgres::Row, DbError> {
        let stmt = self.0.prepare_cached(sql).await?;
        Ok(self.0.query_one(&stmt, params).await?)
    }

    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, DbError> {
        let stmt = self.0.prepare_cached(sql).await?;
        Ok(self.0.execute(&stmt, params).await?)
    }
}

/// Text as PostgreSQL can store it: `text` and `jsonb` refuse the NUL
/// character, so outside text (a webhook's answer, a handler's error) that
/// carries one has it replaced by U+FFFD instead of failing the write.
pub fn storable_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// A message for a job's `error_message` or its logs: [`storable_text`],
/// with every URL in it stripped of credentials and query string
/// ([`crate::redact`]), since every member of the workspace reads it.
pub fn storable_message(s: &str) -> std::borrow::Cow<'_, str> {
    match crate::redact::text(s) {
        std::borrow::Cow::Borrowed(b) => storable_text(b),
        std::borrow::Cow::Owned(o) => std::borrow::Cow::Owned(storable_text(&o).into_owned()),
    }
}

/// [`storable_json`] with [`storable_message`]'s redaction of every string
/// (a log line's metadata); borrowed when no string holds a URL or a NUL.
pub fn storable_message_json(v: &serde_json::Value) -> std::borrow::Cow<'_, serde_json::Value> {
    if !any_text(v, &|s| s.contains('\0') || s.contains("://")) {
        return std::borrow::Cow::Borrowed(v);
    }
    std::borrow::Cow::Owned(map_text(v, &storable_message))
}

/// [`storable_text`] for every string and key of a JSON value; borrowed
/// when there is nothing to replace, which is nearly always.
pub fn storable_json(v: &serde_json::Value) -> std::borrow::Cow<'_, serde_json::Value> {
    if nul_path(v).is_none() {
        return std::borrow::Cow::Borrowed(v);
    }
    std::borrow::Cow::Owned(map_text(v, &storable_text))
}

/// Whether a string or key of `v` satisfies `p`.
fn any_text(v: &serde_json::Value, p: &impl Fn(&str) -> bool) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => p(s),
        Value::Array(a) => a.iter().any(|x| any_text(x, p)),
        Value::Object(m) => m.iter().any(|(k, x)| p(k) || any_text(x, p)),
        _ => false,
    }
}

/// `v` with its strings passed through `f`, and its keys through
/// [`storable_text`] (a key is never a message).
fn map_text(
    v: &serde_json::Value,
    f: &impl Fn(&str) -> std::borrow::Cow<'_, str>,
) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => Value::String(f(s).into_owned()),
        Value::Array(a) => Value::Array(a.iter().map(|x| map_text(x, f)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (storable_text(k).into_owned(), map_text(x, f)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Where in `v` a string or key holds the NUL character, as a path like
/// `body[0]` (empty for `v` itself), or `None`.
pub fn nul_path(v: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match v {
        Value::String(s) if s.contains('\0') => Some(String::new()),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| nul_path(x).map(|p| format!("[{i}]{}", dotted(&p)))),
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            if k.contains('\0') {
                Some(k.replace('\0', "\\u0000"))
            } else {
                nul_path(x).map(|p| format!("{k}{}", dotted(&p)))
            }
        }),
        _ => None,
    }
}

fn dotted(rest: &str) -> String {
    if rest.is_empty() || rest.starts_with('[') {
        rest.to_string()
    } else {
        format!(".{rest}")
    }
}

/// Whether an error is a deadlock (40P01) or a serialization failure
/// (40001): the server rolled the transaction back and the same work may
/// simply be tried again.
pub fn is_conflict(e: &DbError) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(e, DbError::Query(q)
        if q.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED)
            || q.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE))
}

/// Runs `work` again, up to four more times with a short random pause, while
/// it fails with a deadlock or a serialization failure. Each try must be a
/// whole transaction (or one statement): the server rolled back the last one.
pub async fn retry_conflicts<T, F, Fut>(mut work: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut tries = 0;
    loop {
        match work().await {
            Err(e) if is_conflict(&e) && tries < 4 => {
                tries += 1;
                tracing::debug!(error = %e, tries, "transaction conflict; trying again");
                let pause = rand::random_range(1..=10u64 * tries);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod nul_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_characters_are_found_and_replaced() {
        let v = json!({"a": [1, {"b": "x\u{0}y"}], "c": "fine"});
        assert_eq!(nul_path(&v).as_deref(), Some("a[1].b"));
        assert_eq!(
            storable_json(&v).into_owned(),
            json!({"a": [1, {"b": "x\u{FFFD}y"}], "c": "fine"})
        );
        let clean = json!({"a": "b"});
        assert!(matches!(
            storable_json(&clean),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(storable_text("a\0b"), "a\u{FFFD}b");
        assert_eq!(nul_path(&json!("\u{0}")).as_deref(), Some(""));
    }
}
