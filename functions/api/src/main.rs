//! The api Lambda: the axum router of `offload::api` behind API Gateway.
//! When API Gateway's JWT authorizer already verified the caller, its claims
//! are passed to the router instead of verifying the token again.

use lambda_http::request::RequestContext;
use lambda_http::{run, tower::ServiceExt, Error, Request, RequestExt};
use offload::auth::GatewayClaims;
use offload::config::Config;
use offload::handlers::Registry;
use offload::startup::Services;

#[tokio::main]
async fn main() -> Result<(), Error> {
    offload::telemetry::init();
    let config = Config::from_env().map_err(|e| {
        tracing::error!("configuration: {e}");
        e
    })?;
    if config.jwt_secret_is_default {
        tracing::warn!("OFFLOAD_JWT_SECRET is unset: using the development secret");
    }
    let services = Services::connect(config, Registry::builtin()).await?;
    let app = offload::api::router(services.api_state());
    run(lambda_http::service_fn(move |req: Request| {
        let app = app.clone();
        async move { app.oneshot(with_gateway_claims(req)).await }
    }))
    .await
}

/// Copies the `sub` claim verified by an API Gateway JWT authorizer into the
/// request's extensions, where the router looks for it first.
fn with_gateway_claims(mut req: Request) -> Request {
    let sub = match req.request_context_ref() {
        Some(RequestContext::ApiGatewayV2(ctx)) => ctx
            .authorizer
            .as_ref()
            .and_then(|a| a.jwt.as_ref())
            .and_then(|j| j.claims.get("sub").cloned()),
        _ => None,
    };
    if let Some(sub) = sub {
        req.extensions_mut().insert(GatewayClaims { sub });
    }
    req
}
