//! Offload's library: everything the three Lambda functions and the local
//! runner share. Each module owns one part of the domain:
//!
//! - [`job`]: the job model, its status machine and the JSON a client sees.
//! - [`store`]: every read and compare-and-set write of jobs in Postgres.
//! - [`queue`]: the queue interface and its SQS and Postgres backends.
//! - [`handlers`]: the job-handler trait, the registry and the built-in types.
//! - [`worker`]: the SQS event handler that claims and runs jobs.
//! - [`scheduler`]: the periodic duties (rescue, outbox, dead letters, pruning).
//! - [`api`]: the HTTP API (axum router), its auth and its errors.
//! - [`config`], [`db`], [`telemetry`]: start-up wiring shared by every binary.
#![forbid(unsafe_code)]

pub mod api;
pub mod api_keys;
pub mod auth;
pub mod browser_token;
pub mod clock;
pub mod config;
pub mod db;
pub mod email;
pub mod enqueue;
pub mod event_source;
pub mod handlers;
pub mod ids;
pub mod job;
pub mod platform;
pub mod queue;
pub mod ratelimit;
pub mod realtime;
pub mod redact;
pub mod run_metrics;
pub mod schedule;
pub mod scheduler;
pub mod secrets;
pub mod startup;
pub mod storage;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod worker;
pub mod workspace;

pub use ids::{JobId, UserId, WorkspaceId};
pub use job::{ErrorKind, Job, JobStatus, Progress, QueueName};
