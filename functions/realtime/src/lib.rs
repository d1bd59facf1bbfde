//! The realtime Lambda: the stack's API Gateway WebSocket API calls it at
//! `$connect` (the token, from `?token=`, verified as the API verifies it:
//! a browser token, a user's token or an API key; a refusal is the
//! connection's HTTP answer), at `$disconnect`, and with each message
//! (`$default`: subscribe, unsubscribe). A subscribe answers at once with
//! the jobs' current states; later changes are sent by the functions that
//! make them ([`offload::realtime`]).

use aws_lambda_events::encodings::Body;
use aws_lambda_events::event::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use offload::api::{AppState, Member, Viewer};
use offload::ids::{UserId, WorkspaceId};
use offload::realtime::{self, db_detail, Bearer, Posted};

fn answer(status: i64, body: &str) -> ApiGatewayProxyResponse {
    let mut r = ApiGatewayProxyResponse::default();
    r.status_code = status;
    r.body = Some(Body::Text(body.to_string()));
    r
}

/// One event of the WebSocket API.
pub async fn handle(
    state: &AppState,
    event: ApiGatewayWebsocketProxyRequest,
) -> ApiGatewayProxyResponse {
    let ctx = &event.request_context;
    let Some(connection) = ctx.connection_id.clone() else {
        return answer(400, "not an event of a WebSocket API: no connection id");
    };
    let route = ctx.route_key.clone().unwrap_or_default();
    let result = match route.as_str() {
        "$connect" => {
            let token = event
                .query_string_parameters
                .first("token")
                .map(str::to_string);
            return connect(state, &connection, token).await;
        }
        "$disconnect" => disconnect(state, &connection).await,
        _ => {
            message(
                state,
                &connection,
                event.body.as_deref().unwrap_or_default(),
            )
            .await
        }
    };
    match result {
        Ok(()) => answer(200, ""),
        Err(detail) => {
            // Said to the client over its connection; the route succeeded.
            if let Some(p) = state.store.pusher() {
                let _ = p.post(&connection, &realtime::error_text(&detail)).await;
            }
            answer(200, "")
        }
    }
}

async fn connect(
    state: &AppState,
    connection: &str,
    token: Option<String>,
) -> ApiGatewayProxyResponse {
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return answer(
            401,
            "no token: connect with ?token=<a browser token, user token or API key>",
        );
    };
    let bearer = match offload::api::realtime::verify(state, &token).await {
        Ok(b) => b,
        Err(e) => return answer(i64::from(e.status.as_u16()), &e.detail),
    };
    let db = match state.db().await {
        Ok(db) => db,
        Err(e) => return answer(503, &db_detail(&e)),
    };
    if let Err(e) = realtime::connect(&**db, connection, &bearer).await {
        return answer(503, &db_detail(&e));
    }
    if let Some(p) = state.store.pusher() {
        p.someone_connected();
    }
    answer(200, "")
}

async fn disconnect(state: &AppState, connection: &str) -> Result<(), String> {
    let db = state.db().await.map_err(|e| db_detail(&e))?;
    realtime::disconnect(&**db, connection)
        .await
        .map_err(|e| db_detail(&e))
}

/// The connection's viewer of `ws`: checked at each subscribe (a member's
/// membership, an API key's workspace), and again by every send.
async fn viewer(state: &AppState, bearer: &Bearer, ws: WorkspaceId) -> Result<Viewer, String> {
    let nothing = || format!("this token opens nothing in workspace {ws}");
    match bearer {
        Bearer::Browser(g) if g.workspace == ws => {
            Ok(Viewer::Browser(std::sync::Arc::new(g.clone())))
        }
        Bearer::Browser(_) => Err(nothing()),
        Bearer::ApiKey { id, workspace } if *workspace == ws => {
            // The key may have been revoked, or its workspace closed, since
            // the connection opened.
            let db = state.db().await.map_err(|e| db_detail(&e))?;
            let open = db
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM api_keys k JOIN workspaces w \
                     ON w.id = k.workspace_id AND w.deleting_at IS NULL WHERE k.id = $1)",
                    &[id],
                )
                .await
                .map_err(|e| db_detail(&e.into()))?
                .get::<_, bool>(0);
            if !open {
                return Err(nothing());
            }
            Ok(Viewer::Member(Member {
                user: UserId(*id),
                workspace: ws,
                role: offload::workspace::Role::Member,
            }))
        }
        Bearer::ApiKey { .. } => Err(nothing()),
        Bearer::User { issuer, subject } => {
            let db = state.db().await.map_err(|e| db_detail(&e))?;
            let who = offload::auth::Identity {
                issuer: issuer.clone(),
                subject: subject.clone(),
            };
            match offload::workspace::member_role(&db, ws, &who)
                .await
                .map_err(|e| db_detail(&e))?
            {
                Some((user, role)) => Ok(Viewer::Member(Member {
                    user,
                    workspace: ws,
                    role,
                })),
                None => Err(nothing()),
            }
        }
    }
}

async fn message(state: &AppState, connection: &str, text: &str) -> Result<(), String> {
    let req = realtime::parse(text)?;
    let db = state.db().await.map_err(|e| db_detail(&e))?;
    let bearer = realtime::bearer(&**db, connection)
        .await
        .map_err(|e| db_detail(&e))?
        .ok_or("this connection is not known: connect again")?;
    if !req.subscribe {
        return realtime::unsubscribe(&**db, connection, req.workspace, &req.jobs, &req.tags)
            .await
            .map_err(|e| db_detail(&e));
    }
    let viewer = viewer(state, &bearer, req.workspace).await?;
    let counts = db
        .query_one(
            "SELECT count(job_id), count(tag) FROM realtime_subscriptions WHERE connection_id = $1",
            &[&connection],
        )
        .await
        .map_err(|e| db_detail(&e.into()))?;
    if counts.get::<_, i64>(0) as usize + req.jobs.len() > realtime::MAX_JOBS_PER_CONNECTION {
        return Err(format!(
            "a connection follows at most {} jobs",
            realtime::MAX_JOBS_PER_CONNECTION
        ));
    }
    if counts.get::<_, i64>(1) as usize + req.tags.len() > realtime::MAX_TAGS_PER_CONNECTION {
        return Err(format!(
            "a connection follows at most {} tags",
            realtime::MAX_TAGS_PER_CONNECTION
        ));
    }
    let realtime::Admitted {
        jobs: visible,
        refusal,
    } = realtime::admit(&state.store, &viewer, &req).await?;
    realtime::subscribe(
        &**db,
        connection,
        req.workspace,
        &visible,
        &req.tags,
        req.stream,
    )
    .await
    .map_err(|e| db_detail(&e))?;
    drop(db);
    // The current states, read after the rows are in: a change after them
    // is queued, one before them is in this read.
    let Some(pusher) = state.store.pusher() else {
        return refusal.map_or(Ok(()), Err);
    };
    pusher.someone_connected();
    let now = realtime::current(&state.store, &viewer, req.workspace, &visible, &req.tags).await?;
    for job in &now {
        if pusher.send_job(connection, job).await? == Posted::Gone {
            let db = state.db().await.map_err(|e| db_detail(&e))?;
            let _ = realtime::disconnect(&**db, connection).await;
            return Ok(());
        }
    }
    refusal.map_or(Ok(()), Err)
}
