//! The api Lambda: the axum router of `offload::api` behind API Gateway.

use lambda_http::{run, service_fn, Error, Request};
use offload::handlers::Registry;
use offload::startup::Services;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let config = offload::startup::load_config()?;
    // Before anything else: a deployed API never falls back to a public secret.
    config
        .require_token_verification()
        .inspect_err(|e| tracing::error!("configuration: {e}"))?;
    if config.jwt_secret_is_default {
        tracing::warn!("OFFLOAD_JWT_SECRET is unset: using the development secret");
    }
    // Requests get the short statement limit; jobs the long one.
    let config = offload::config::Config {
        statement_timeout: config.api_statement_timeout,
        ..config
    };
    let registry = Registry::for_config(&config);
    let services = Services::connect(config, registry).await?;
    let state = services
        .api_state()
        .inspect_err(|e| tracing::error!("configuration: {e}"))?;
    let app = offload::api::router(state);
    run(service_fn(move |req: Request| {
        offload_api::handle(app.clone(), req)
    }))
    .await
}
