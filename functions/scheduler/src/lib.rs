//! The scheduler Lambda's handler, as a function tests call directly.

use offload::scheduler::Scheduler;
use serde_json::Value;

/// Runs every duty once. The event is ignored: EventBridge rules send their
/// envelope, EventBridge Scheduler only its configured input, and either
/// must do. With `emit_metrics` the run's figures also go to standard
/// output in CloudWatch's embedded metric format, for the alarms.
pub async fn handle(scheduler: &Scheduler, _event: Value, emit_metrics: bool) -> Value {
    let report = scheduler.run_once().await;
    if emit_metrics {
        println!("{}", report.metric_line(scheduler.clock.now()));
    }
    serde_json::to_value(report).unwrap_or(Value::Null)
}
