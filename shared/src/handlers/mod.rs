//! Job handlers: the trait a job type implements, the context it runs with,
//! the registry that maps a job's `type` to its handler, and the built-in
//! types.
//!
//! A handler declares a typed payload. The API validates a new job's payload
//! by deserializing it into that type (unknown fields and out-of-range values
//! are rejected there, before anything reaches a queue), and the worker hands
//! the handler the same typed value.

mod approval;
mod bulk_export;
mod bulk_tag;
mod contact_import;
mod context;
mod enrich;
mod fan_out;
mod lead_scoring;
mod noop;
mod send_email_batch;
mod sequence_subscription;
mod sleep;
mod sync_crm;
mod webhook;
mod workspace_delete;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde_json::Value;
use thiserror::Error;

pub use approval::{Approval, ApprovalPayload};
pub use bulk_export::BulkExport;
pub use bulk_tag::{BulkDelete, BulkTag};
pub use contact_import::ContactImport;
pub use context::{ChildJob, JobContext, TokenState};
pub(crate) use enrich::valid_provider_name;
pub use enrich::{
    EnrichAccount, EnrichAccountPayload, EnrichContact, EnrichContactPayload, Entity, HttpProvider,
    Provider, ProviderConfig, ProviderError,
};
pub use fan_out::{FanOut, FanOutPayload};
pub use lead_scoring::{score as lead_score, Lead, LeadScoring};
pub use noop::Noop;
pub use send_email_batch::{
    SendEmailBatch, SendEmailBatchPayload, DEFAULT_TRANSPORT as SEND_EMAIL_DEFAULT_TRANSPORT,
};
pub use sequence_subscription::SequenceSubscription;
pub use sleep::{Sleep, SleepPayload};
pub use sync_crm::{
    resolve_conflict, Crm, CrmConfig, CrmEntity, HubSpot, Keep, Props, Remote, Resolved, SyncCrm,
    SyncCrmPayload, HUBSPOT_API, ID_PROPERTY,
};
pub(crate) use webhook::http_url;
pub use webhook::{is_internal, Webhook};
pub use workspace_delete::WorkspaceDelete;

use crate::db::DbError;
use crate::ids::WorkspaceId;

/// How a run ended when it did not fail.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Done; the value becomes the job's `result`.
    Completed(Option<Value>),
    /// Stopped on a cancel request; the value (what was done so far) becomes
    /// the job's `result`.
    Cancelled(Option<Value>),
    /// The invocation's deadline is near: continue from the saved checkpoint
    /// in a fresh message. Does not use an attempt.
    HandOff,
    /// Not now (a rate limit is empty): try again after the delay. Does not
    /// use an attempt.
    Snooze(Duration),
    /// Suspend (`waiting`, no worker held) until the wait is over, then run
    /// again from the checkpoint saved with it (see
    /// [`JobContext::wait_for_children`], [`JobContext::wait_until`],
    /// [`JobContext::wait_for_token`]). Does not use an attempt.
    Wait(WaitOn),
}

/// What a waiting job waits for.
#[derive(Clone, Debug, PartialEq)]
pub enum WaitOn {
    /// Every child created with [`JobContext::create_children`] to finish;
    /// with `fail_fast`, a dead child ends the wait at once.
    Children { fail_fast: bool },
    /// This time (a queue's delayed message up to 15 minutes ahead, the
    /// scheduler beyond).
    Until(chrono::DateTime<chrono::Utc>),
    /// This wait token (from [`JobContext::create_token`]) to be completed
    /// or to time out.
    Token(String),
}

/// How a run failed.
#[derive(Debug, Error, PartialEq)]
pub enum JobError {
    /// Worth trying again after a backoff (a timeout, a 5xx, a lost connection).
    #[error("{0}")]
    Retryable(String),
    /// Will fail the same way every time (bad input, a 4xx): the job is `dead`.
    #[error("{0}")]
    Permanent(String),
    /// This worker no longer holds the job (its lease expired and the job was
    /// rescued); nothing it does now is written.
    #[error("the job's lease was lost to another worker")]
    LeaseLost,
    /// The database had no connection to give: the pool's wait ran out, or
    /// the server is at its connection limit. That says nothing about the
    /// job, so it comes back after a short pause without using an attempt.
    #[error("{0}")]
    Busy(String),
}

impl From<DbError> for JobError {
    fn from(e: DbError) -> Self {
        use deadpool_postgres::PoolError;
        let busy = match &e {
            DbError::Pool(PoolError::Timeout(_)) => true,
            DbError::Pool(PoolError::Backend(b)) => {
                b.code() == Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS)
            }
            _ => false,
        };
        if busy {
            JobError::Busy(format!("database busy: {e}"))
        } else {
            JobError::Retryable(format!("database: {e}"))
        }
    }
}

/// Storage that fails is worth another try later, like the database.
impl From<crate::storage::StorageError> for JobError {
    fn from(e: crate::storage::StorageError) -> Self {
        JobError::Retryable(e.to_string())
    }
}

/// A payload that does not fit its job type's schema.
#[derive(Debug, Error, PartialEq)]
#[error("{message}")]
pub struct PayloadError {
    /// The offending field as a path (`contact_ids[3]`), when known.
    pub field: Option<String>,
    pub message: String,
}

impl PayloadError {
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        PayloadError {
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

/// `contact_ids` of a payload: 1 to `max` ids, none twice.
pub(crate) fn check_contact_ids(ids: &[uuid::Uuid], max: usize) -> Result<(), PayloadError> {
    if ids.is_empty() || ids.len() > max {
        return Err(PayloadError::field(
            "contact_ids",
            format!("1 to {max} contact ids"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    match ids.iter().position(|id| !seen.insert(*id)) {
        Some(i) => Err(PayloadError::field(
            &format!("contact_ids[{i}]"),
            "appears twice",
        )),
        None => Ok(()),
    }
}

/// A job type. Implement it for a new kind of background work and register
/// it in [`Registry`]; see README "Adding a job type".
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// The input, deserialized from the job's `payload`. Use
    /// `#[serde(deny_unknown_fields)]` so typos are caught at creation.
    type Payload: DeserializeOwned + Send + Sync + 'static;

    /// The name clients pass as the job's `type`.
    const TYPE: &'static str;

    /// Only a workspace admin may create (or retry) jobs of this type:
    /// destructive work such as `bulk_delete`.
    const ADMIN_ONLY: bool = false;

    /// Runs only in the platform's own workspace
    /// ([`crate::platform::PLATFORM_WORKSPACE`]): work on whole workspaces,
    /// which no tenant may create.
    const PLATFORM_ONLY: bool = false;

    /// Checks what serde cannot (ranges, sizes); runs at creation and before
    /// each run.
    fn validate(&self, _payload: &Self::Payload) -> Result<(), PayloadError> {
        Ok(())
    }

    /// The storage keys the job reads, each with the payload field naming
    /// it. Each must lie under the job's workspace's prefix
    /// (`workspaces/{id}/`): checked at creation (a 422 naming the field)
    /// and again before each run, so no job reads another tenant's files.
    fn objects<'a>(&self, _payload: &'a Self::Payload) -> Vec<(&'static str, &'a str)> {
        Vec::new()
    }

    /// The jobs this payload asks to create as children (`fan_out`): for
    /// each, the payload field that holds it, its type and its payload. The
    /// registry validates each as a job of its own (known type, valid
    /// payload, admin rule), so a bad child is refused at creation.
    fn children<'a>(&self, _payload: &'a Self::Payload) -> Vec<(String, &'a str, &'a Value)> {
        Vec::new()
    }

    /// Does the work. Long work goes in steps: between steps, check
    /// [`JobContext::cancelled`] and [`JobContext::should_hand_off`], report
    /// [`JobContext::progress`], and save a checkpoint.
    async fn run(&self, payload: Self::Payload, ctx: &mut JobContext) -> Result<Outcome, JobError>;
}

/// Parses a payload into `T`, naming the offending field on failure.
pub fn parse_payload<T: DeserializeOwned>(payload: &Value) -> Result<T, PayloadError> {
    serde_path_to_error::deserialize(payload).map_err(|e| {
        let path = e.path().to_string();
        PayloadError {
            field: (path != ".").then_some(path),
            message: e.into_inner().to_string(),
        }
    })
}

/// The object-safe face of a [`JobHandler`], so handlers with different
/// payload types live in one registry.
#[async_trait]
trait ErasedHandler: Send + Sync {
    fn validate(&self, payload: &Value, workspace: WorkspaceId) -> Result<(), PayloadError>;
    fn admin_only(&self) -> bool;
    /// [`JobHandler::children`] of a payload that parses: (field, type, payload).
    fn children_of(&self, payload: &Value) -> Vec<(String, String, Value)>;
    async fn run(&self, payload: &Value, ctx: &mut JobContext) -> Result<Outcome, JobError>;
}

#[async_trait]
impl<H: JobHandler> ErasedHandler for H {
    fn admin_only(&self) -> bool {
        H::ADMIN_ONLY
    }

    fn children_of(&self, payload: &Value) -> Vec<(String, String, Value)> {
        match parse_payload::<H::Payload>(payload) {
            Ok(typed) => JobHandler::children(self, &typed)
                .into_iter()
                .map(|(field, ty, p)| (field, ty.to_string(), p.clone()))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    fn validate(&self, payload: &Value, workspace: WorkspaceId) -> Result<(), PayloadError> {
        platform_only::<H>(workspace)?;
        let typed: H::Payload = parse_payload(payload)?;
        JobHandler::validate(self, &typed)?;
        own_objects(self, &typed, workspace)
    }

    async fn run(&self, payload: &Value, ctx: &mut JobContext) -> Result<Outcome, JobError> {
        // A payload that passed validation at creation but fails now (the
        // type changed under it) will never pass: a permanent error.
        platform_only::<H>(ctx.workspace_id()).map_err(|e| JobError::Permanent(e.message))?;
        let typed: H::Payload = parse_payload(payload)
            .map_err(|e| JobError::Permanent(format!("invalid payload: {e}")))?;
        JobHandler::validate(self, &typed)
            .and_then(|()| own_objects(self, &typed, ctx.workspace_id()))
            .map_err(|e| JobError::Permanent(format!("invalid payload: {e}")))?;
        JobHandler::run(self, typed, ctx).await
    }
}

/// Refuses a platform-only type anywhere but the platform's workspace.
fn platform_only<H: JobHandler>(workspace: WorkspaceId) -> Result<(), PayloadError> {
    if H::PLATFORM_ONLY && workspace != crate::platform::PLATFORM_WORKSPACE {
        return Err(PayloadError {
            field: None,
            message: format!(
                "{} jobs are made by the platform (e.g. DELETE /api/workspaces/{{ws}}), not created \
                 in a workspace",
                H::TYPE
            ),
        });
    }
    Ok(())
}

/// An error naming the first storage key of the payload outside the
/// workspace's prefix.
fn own_objects<H: JobHandler>(
    handler: &H,
    payload: &H::Payload,
    workspace: WorkspaceId,
) -> Result<(), PayloadError> {
    match handler
        .objects(payload)
        .into_iter()
        .find(|(_, key)| !crate::storage::in_workspace(workspace, key))
    {
        None => Ok(()),
        Some((field, key)) => Err(PayloadError::field(
            field,
            format!(
                "{key:?} is not a file of this workspace: keys start with {} (upload files \
                 with POST /api/workspaces/{workspace}/uploads)",
                crate::storage::workspace_prefix(workspace)
            ),
        )),
    }
}

/// The job types a deployment knows, by name. Cloning is shallow.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<&'static str, Arc<dyn ErasedHandler>>,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    /// The built-in types: the product's bulk operations, and `noop` and
    /// `sleep` (for trying the system and for tests).
    pub fn builtin() -> Self {
        Registry::new()
            .with(Noop)
            .with(Sleep)
            .with(SequenceSubscription)
            .with(BulkTag::default())
            .with(BulkDelete::default())
            .with(LeadScoring)
            .with(Webhook::default())
            .with(ContactImport)
            .with(BulkExport)
            .with(FanOut)
            .with(Approval)
            .with(EnrichContact::default())
            .with(EnrichAccount::default())
            .with(SendEmailBatch::local())
            .with(SyncCrm::default())
            .with(WorkspaceDelete)
    }

    /// The built-in types as configured for this deployment.
    pub fn for_config(config: &crate::config::Config) -> Self {
        Registry::builtin()
            .with(Webhook {
                allow_private: config.webhook_allow_private,
            })
            .with(EnrichContact {
                allow_private: config.webhook_allow_private,
            })
            .with(EnrichAccount {
                allow_private: config.webhook_allow_private,
            })
            .with(SyncCrm {
                allow_private: config.webhook_allow_private,
            })
            .with(SendEmailBatch {
                mailer: crate::email::from_config(&config.email_transport, &config.aws_region)
                    .expect("OFFLOAD_EMAIL_TRANSPORT was checked when the configuration was read"),
                rate: config.email_rate,
                warmup_days: config.email_warmup_days,
            })
            .with(BulkTag {
                max_contacts: config.max_bulk_contacts,
            })
            .with(BulkDelete {
                max_contacts: config.max_bulk_contacts,
            })
    }

    /// Adds a handler under its `TYPE` (replacing one of the same name).
    pub fn with<H: JobHandler>(mut self, handler: H) -> Self {
        self.handlers.insert(H::TYPE, Arc::new(handler));
        self
    }

    /// The registered type names, sorted.
    pub fn types(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.handlers.keys().copied()
    }

    pub fn contains(&self, job_type: &str) -> bool {
        self.handlers.contains_key(job_type)
    }

    /// The admin-only type that creating a job of `job_type` with `payload`
    /// would run, if any: the type itself, or the type of one of the
    /// children it asks for (a member cannot reach `bulk_delete` through a
    /// `fan_out`).
    pub fn admin_only(&self, job_type: &str, payload: &Value) -> Option<String> {
        let h = self.handlers.get(job_type)?;
        if h.admin_only() {
            return Some(job_type.to_string());
        }
        h.children_of(payload)
            .into_iter()
            .find(|(_, ty, _)| {
                self.handlers
                    .get(ty.as_str())
                    .is_some_and(|c| c.admin_only())
            })
            .map(|(_, ty, _)| ty)
    }

    /// How many jobs creating one of `job_type` with `payload` makes: the
    /// job and the children it asks for (a `fan_out` of 1 000 is 1 001
    /// against the creation limits).
    pub fn jobs_made(&self, job_type: &str, payload: &Value) -> usize {
        1 + self
            .handlers
            .get(job_type)
            .map_or(0, |h| h.children_of(payload).len())
    }

    /// Validates a payload for a type; unknown types are an error too.
    pub fn validate(
        &self,
        job_type: &str,
        payload: &Value,
        workspace: WorkspaceId,
    ) -> Result<(), PayloadError> {
        match self.handlers.get(job_type) {
            Some(h) => {
                h.validate(payload, workspace)?;
                for (field, ty, child) in h.children_of(payload) {
                    let Some(c) = self.handlers.get(ty.as_str()) else {
                        return Err(self.unknown_type(&format!("{field}.type"), &ty));
                    };
                    if !c.children_of(&child).is_empty() {
                        return Err(PayloadError::field(
                            &format!("{field}.type"),
                            format!("a child job cannot create children of its own ({ty})"),
                        ));
                    }
                    c.validate(&child, workspace).map_err(|e| PayloadError {
                        field: Some(match e.field {
                            Some(f) => format!("{field}.payload.{f}"),
                            None => format!("{field}.payload"),
                        }),
                        message: e.message,
                    })?;
                }
                Ok(())
            }
            None => Err(self.unknown_type("type", job_type)),
        }
    }

    /// The error for a `type` this registry does not know, at `field`.
    fn unknown_type(&self, field: &str, job_type: &str) -> PayloadError {
        PayloadError::field(
            field,
            format!(
                "unknown job type {job_type:?}; known types: {}",
                self.types().collect::<Vec<_>>().join(", ")
            ),
        )
    }

    /// Runs a job's handler.
    pub async fn run(
        &self,
        job_type: &str,
        payload: &Value,
        ctx: &mut JobContext,
    ) -> Result<Outcome, JobError> {
        match self.handlers.get(job_type) {
            Some(h) => h.run(payload, ctx).await,
            None => Err(JobError::Permanent(format!(
                "no handler is registered for job type {job_type:?} in this worker"
            ))),
        }
    }
}
