//! The worker Lambda: SQS event source with `ReportBatchItemFailures`.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use offload::handlers::Registry;
use offload::startup::Services;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let config = offload::startup::load_config()?;
    let registry = Registry::for_config(&config);
    let services = Services::connect(config, registry).await?;
    let worker = services.worker(&services.config.instance_name);
    let worker = &worker;
    run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let deadline = offload_worker::deadline_instant(event.context.deadline);
        Ok::<SqsBatchResponse, Error>(worker.handle(event.payload, deadline).await)
    }))
    .await
}
