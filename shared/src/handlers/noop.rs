//! `noop`: does nothing and completes. Payload `{}`.

use async_trait::async_trait;
use serde::Deserialize;

use super::{JobContext, JobError, JobHandler, Outcome};

/// The cheapest job there is: for trying the system and for benchmarks.
pub struct Noop;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoopPayload {}

#[async_trait]
impl JobHandler for Noop {
    type Payload = NoopPayload;
    const TYPE: &'static str = "noop";

    async fn run(&self, _: NoopPayload, _: &mut JobContext) -> Result<Outcome, JobError> {
        Ok(Outcome::Completed(None))
    }
}
