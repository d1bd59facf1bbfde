//! The realtime Lambda: `$connect`, `$disconnect` and the messages of the
//! stack's API Gateway WebSocket API.

use aws_lambda_events::event::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use offload::handlers::Registry;
use offload::startup::Services;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let config = offload::startup::load_config()?;
    let registry = Registry::for_config(&config);
    let services = Services::connect(config, registry).await?;
    let state = services.api_state()?;
    let state = &state;
    run(service_fn(
        move |event: LambdaEvent<ApiGatewayWebsocketProxyRequest>| async move {
            Ok::<ApiGatewayProxyResponse, Error>(
                offload_realtime::handle(state, event.payload).await,
            )
        },
    ))
    .await
}
