//! The api Lambda: the axum router of `offload::api` behind API Gateway.

use lambda_http::{run, service_fn, Error, Request};
use offload::handlers::Registry;
use offload::startup::Services;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let config = offload::startup::load_config()?;
    if config.jwt_secret_is_default {
        tracing::warn!("OFFLOAD_JWT_SECRET is unset: using the development secret");
    }
    let registry = Registry::for_config(&config);
    let services = Services::connect(config, registry).await?;
    let app = offload::api::router(services.api_state());
    run(service_fn(move |req: Request| {
        offload_api::handle(app.clone(), req)
    }))
    .await
}
