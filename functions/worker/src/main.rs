//! The worker Lambda: SQS event source with `ReportBatchItemFailures`.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use offload::config::Config;
use offload::handlers::Registry;
use offload::startup::Services;

#[tokio::main]
async fn main() -> Result<(), Error> {
    offload::telemetry::init();
    let config = Config::from_env().inspect_err(|e| tracing::error!("configuration: {e}"))?;
    let registry = Registry::for_config(&config);
    let services = Services::connect(config, registry).await?;
    let name = std::env::var("AWS_LAMBDA_LOG_STREAM_NAME").unwrap_or_else(|_| "worker".into());
    let worker = services.worker(&name);
    let worker = &worker;
    run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let deadline = offload_worker::deadline_instant(event.context.deadline);
        Ok::<SqsBatchResponse, Error>(worker.handle(event.payload, deadline).await)
    }))
    .await
}
