//! The scheduler Lambda, invoked by EventBridge every minute. It accepts any
//! JSON: EventBridge rules send their envelope, EventBridge Scheduler only
//! the configured input.

use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use offload::handlers::Registry;
use offload::startup::Services;
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let config = offload::startup::load_config()?;
    let registry = Registry::for_config(&config);
    let services = Services::connect(config, registry).await?;
    let emit = services.config.worker.emit_metrics;
    let scheduler = services.scheduler();
    let scheduler = &scheduler;
    run(service_fn(move |event: LambdaEvent<Value>| async move {
        Ok::<Value, Error>(offload_scheduler::handle(scheduler, event.payload, emit).await)
    }))
    .await
}
