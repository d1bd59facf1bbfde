//! The migrate Lambda, invoked by CloudFormation as the stack's
//! `SchemaMigrations` custom resource on every deploy.

use aws_lambda_events::event::cloudformation::CloudFormationCustomResourceRequest;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use offload::config::Config;

#[tokio::main]
async fn main() -> Result<(), Error> {
    offload::telemetry::init();
    // A bad configuration is answered as FAILED, not left for CloudFormation
    // to wait an hour on.
    let url = Config::from_env()
        .map(|c| c.database_url)
        .map_err(|e| format!("configuration: {e}"));
    let http = reqwest::Client::new();
    let (url, http) = (&url, &http);
    run(service_fn(
        move |event: LambdaEvent<CloudFormationCustomResourceRequest>| async move {
            let r =
                offload_migrate::handle(http, url.as_deref().map_err(Clone::clone), &event.payload)
                    .await?;
            Ok::<_, Error>(serde_json::to_value(r)?)
        },
    ))
    .await
}
