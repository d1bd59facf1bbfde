//! The api Lambda's request path, as a function tests call directly.

use axum::Router;
use lambda_http::tower::ServiceExt;
use lambda_http::Request;

/// Serves one API Gateway request with the router. The bearer token is
/// verified here even behind the gateway's JWT authorizer: the function
/// never takes the gateway's word for who is calling.
pub async fn handle(
    app: Router,
    req: Request,
) -> Result<axum::response::Response, std::convert::Infallible> {
    app.oneshot(req).await
}
