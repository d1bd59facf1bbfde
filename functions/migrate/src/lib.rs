//! The migrate Lambda's handler: a CloudFormation custom resource. On
//! `Create` and `Update` it applies the migrations embedded in this build
//! and answers SUCCESS, or FAILED with the reason, so a failed migration
//! rolls the deploy back before any new code takes traffic (the other
//! functions depend on this resource). On `Delete` it changes nothing: the
//! data outlives the stack.
//!
//! The answer goes to the request's pre-signed `ResponseURL` (CloudFormation
//! waits for it, up to an hour, so every path answers, a bad configuration
//! included).

pub mod budget;

use std::collections::HashMap;
use std::time::Duration;

use budget::Budget;

use aws_lambda_events::event::cloudformation::{
    CloudFormationCustomResourceRequest as Request,
    CloudFormationCustomResourceResponse as Response,
    CloudFormationCustomResourceResponseStatus as Status,
};

/// The resource's physical id: one schema per stack, never replaced.
pub const PHYSICAL_ID: &str = "offload-schema";

/// What one request asks for.
struct Asked<'a> {
    migrate: bool,
    properties: &'a serde_json::Value,
    response_url: &'a str,
    stack_id: &'a str,
    request_id: &'a str,
    logical_resource_id: &'a str,
}

fn asked(request: &Request) -> Option<Asked<'_>> {
    Some(match request {
        Request::Create(r) => Asked {
            migrate: true,
            properties: &r.resource_properties,
            response_url: &r.response_url,
            stack_id: &r.stack_id,
            request_id: &r.request_id,
            logical_resource_id: &r.logical_resource_id,
        },
        Request::Update(r) => Asked {
            migrate: true,
            properties: &r.resource_properties,
            response_url: &r.response_url,
            stack_id: &r.stack_id,
            request_id: &r.request_id,
            logical_resource_id: &r.logical_resource_id,
        },
        Request::Delete(r) => Asked {
            migrate: false,
            properties: &r.resource_properties,
            response_url: &r.response_url,
            stack_id: &r.stack_id,
            request_id: &r.request_id,
            logical_resource_id: &r.logical_resource_id,
        },
        _ => return None,
    })
}

/// Checks the connection budget (see [`budget`]), then applies the
/// migrations (for `Create` and `Update`) to the database of
/// `database_url`, or explains why it cannot (`Err` from the
/// configuration), and builds CloudFormation's answer.
pub async fn decide(database_url: Result<&str, String>, request: &Request) -> Response {
    let mut r = Response::default();
    r.physical_resource_id = PHYSICAL_ID.into();
    let Some(a) = asked(request) else {
        r.status = Status::Failed;
        r.reason = Some("unknown RequestType".into());
        return r;
    };
    r.stack_id = a.stack_id.into();
    r.request_id = a.request_id.into();
    r.logical_resource_id = a.logical_resource_id.into();
    if !a.migrate {
        r.status = Status::Success;
        r.reason = Some("the schema and its data are kept when the stack is deleted".into());
        return r;
    }
    let outcome = match database_url {
        Err(e) => Err(format!("migrations failed: {e}")),
        Ok(url) => match check_budget(url, a.properties).await {
            Err(e) => Err(e),
            Ok(budget) => offload::db::migrate(url)
                .await
                .map(|applied| (applied, budget))
                .map_err(|e| format!("migrations failed: {e}")),
        },
    };
    match outcome {
        Ok((applied, budget)) => {
            tracing::info!(applied = ?applied, "migrations applied");
            r.status = Status::Success;
            r.data = HashMap::from([
                (
                    "SchemaVersion".to_string(),
                    offload::db::required_version().to_string(),
                ),
                ("Applied".to_string(), applied.join(",")),
            ]);
            if let Some(budget) = budget {
                r.data.insert("ConnectionBudget".to_string(), budget);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "deploy refused");
            r.status = Status::Failed;
            // CloudFormation shows the reason in the stack's events.
            r.reason = Some(e);
        }
    }
    r
}

/// The budget's verdict when the request carries one: what it comes to,
/// or why the deploy must not go on.
async fn check_budget(
    database_url: &str,
    properties: &serde_json::Value,
) -> Result<Option<String>, String> {
    let Some(budget) = Budget::from_properties(properties)? else {
        return Ok(None);
    };
    let capacity = if budget.via_proxy {
        None
    } else {
        Some(
            budget::server_capacity(database_url)
                .await
                .map_err(|e| format!("migrations failed: {e}"))?,
        )
    };
    let verdict = budget.check(capacity)?;
    tracing::info!(budget = %verdict, "connection budget");
    Ok(Some(verdict))
}

/// Sends `response` to the request's pre-signed URL, trying a few times.
pub async fn answer(
    http: &reqwest::Client,
    request: &Request,
    response: &Response,
) -> anyhow::Result<()> {
    let url = asked(request)
        .map(|a| a.response_url.to_string())
        .ok_or_else(|| anyhow::anyhow!("a request without a ResponseURL"))?;
    let body = serde_json::to_vec(response)?;
    let mut last = None;
    for pause in [0, 1, 3] {
        tokio::time::sleep(Duration::from_secs(pause)).await;
        // The URL is signed without a content type: send none.
        match http
            .put(&url)
            .header("content-type", "")
            .body(body.clone())
            .send()
            .await
        {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp) => last = Some(format!("answered {}", resp.status())),
            Err(e) => last = Some(e.to_string()),
        }
    }
    anyhow::bail!("cannot answer CloudFormation: {}", last.unwrap_or_default())
}

/// One request, decided and answered.
pub async fn handle(
    http: &reqwest::Client,
    database_url: Result<&str, String>,
    request: &Request,
) -> anyhow::Result<Response> {
    let response = decide(database_url, request).await;
    answer(http, request, &response).await?;
    Ok(response)
}
