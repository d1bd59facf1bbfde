//! The api Lambda's request path, as a function tests call directly.

use axum::Router;
use lambda_http::request::RequestContext;
use lambda_http::tower::ServiceExt;
use lambda_http::{Request, RequestExt};
use offload::auth::GatewayClaims;

/// Serves one API Gateway request with the router.
pub async fn handle(
    app: Router,
    req: Request,
) -> Result<axum::response::Response, std::convert::Infallible> {
    app.oneshot(with_gateway_claims(req)).await
}

/// Copies the `sub` claim verified by an API Gateway JWT authorizer into the
/// request's extensions, where the router looks for it first. Requests that
/// did not pass an authorizer carry none, and their bearer token is verified.
pub fn with_gateway_claims(mut req: Request) -> Request {
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
