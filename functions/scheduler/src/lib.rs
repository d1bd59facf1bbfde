//! The scheduler Lambda's handler, as a function tests call directly.

use offload::scheduler::Scheduler;
use serde_json::Value;

/// Runs every duty once. The event is ignored: EventBridge rules send their
/// envelope, EventBridge Scheduler only its configured input, and either
/// must do.
pub async fn handle(scheduler: &Scheduler, _event: Value) -> Value {
    serde_json::to_value(scheduler.run_once().await).unwrap_or(Value::Null)
}
