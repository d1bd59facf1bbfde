//! The migrate Lambda, invoked by CloudFormation as the stack's
//! `SchemaMigrations` custom resource on every deploy.

use aws_lambda_events::event::cloudformation::CloudFormationCustomResourceRequest;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use offload::config::Config;

/// The database URL, read for each request (deploys are rare, and a secret
/// may have been rotated since the last); a bad configuration is an answer
/// of FAILED, not a request CloudFormation waits an hour on.
async fn database_url() -> Result<String, String> {
    let mut config = Config::from_env().map_err(|e| format!("configuration: {e}"))?;
    offload::startup::resolve_secrets(&mut config)
        .await
        .map_err(|e| e.to_string())?;
    Ok(config.database_url)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    // This binary runs only as a Lambda function: JSON log lines.
    offload::telemetry::init(true);
    let http = reqwest::Client::new();
    let http = &http;
    run(service_fn(
        move |event: LambdaEvent<CloudFormationCustomResourceRequest>| async move {
            let url = database_url().await;
            let r =
                offload_migrate::handle(http, url.as_deref().map_err(Clone::clone), &event.payload)
                    .await?;
            Ok::<_, Error>(serde_json::to_value(r)?)
        },
    ))
    .await
}
