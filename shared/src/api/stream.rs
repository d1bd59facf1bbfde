//! `GET /api/workspaces/{ws}/jobs/{id}/stream`: a job's output stream as
//! server-sent events. Each chunk is an event `chunk` whose `id` is its
//! cursor; a reader that reconnects (browsers' `EventSource` does it by
//! itself, sending `Last-Event-ID`) or passes `?cursor=` gets what came
//! after, nothing missed and nothing twice. When the job has finished and
//! every chunk is out, an event `end` carries its status. A response lasts
//! at most 25 seconds (API Gateway answers within 30, and Lambda hands the
//! body over when it is complete), or until the process's feed of the job
//! stops; the reader then reconnects from its last id. Each workspace has
//! at most `max_streams_per_workspace` connections open in a process; more
//! answer 429 at once rather than wait or poll.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use utoipa::IntoParams;

use super::error::{ApiError, Problem};
use super::extract::{from_text, Ids, Params, Viewer};
use super::jobs::JobPath;
use super::watch::{FeedItem, Full};
use super::AppState;
use crate::ids::JobId;
use crate::store::Store;

/// How long one response streams before the reader reconnects.
const STREAM_FOR: Duration = Duration::from_secs(25);

/// The query of `GET …/jobs/{id}/stream`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// The `id` of the last event read (the `Last-Event-ID` header wins);
    /// from the start when absent
    #[param(value_type = Option<String>)]
    cursor: Option<StreamCursor>,
}

/// A chunk's id, as the events carry it.
#[derive(Clone, Copy, Debug)]
pub struct StreamCursor(i64);

impl<'de> Deserialize<'de> for StreamCursor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(
            d,
            |raw| raw.parse().ok().filter(|c: &i64| *c >= 0).map(StreamCursor),
            |_| "is not an event id this API sent".into(),
        )
    }
}

/// `GET …/jobs/{id}/stream?cursor=`
#[utoipa::path(get, path = "/api/workspaces/{ws}/jobs/{id}/stream", operation_id = "job_stream", tag = "jobs",
    params(JobPath, StreamParams,
        ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event read: resume after it")),
    responses(
        (status = 200, description = "Server-sent events: `chunk` (data: the chunk's JSON, id: its cursor), then `end` (data: {\"status\"}) once the job has finished", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such workspace or job for this user", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The workspace has too many streams open in this process: retry after `Retry-After`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn stream(
    State(state): State<AppState>,
    viewer: Viewer,
    Ids(JobPath { id, .. }): Ids<JobPath>,
    Params(q): Params<StreamParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let from_header = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|c| *c >= 0)
                .ok_or_else(|| {
                    ApiError::bad_request("Last-Event-ID is not an event id this API sent")
                        .with_field("Last-Event-ID")
                })?,
        ),
    };
    let cursor = from_header.or(q.cursor.map(|c| c.0)).unwrap_or(0);
    // Taken before anything is read: a crowd beyond the cap costs the
    // database nothing.
    let place = state
        .watch
        .stream_place(viewer.workspace())
        .map_err(|Full| {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-streams",
                "Too many streams",
                "this workspace has too many job streams open at once; retry, or follow \
                 fewer jobs at a time",
            );
            e.retry_after = Some(1);
            e
        })?;
    let job = viewer.check(state.store.get_open(viewer.workspace(), id).await?)?;
    // A finished job's stream is complete in the database: no feed.
    let (feed, rx) = if job.status.is_terminal() {
        (None, None)
    } else {
        let (feed, rx) = state.watch.feed(&state.store, id);
        (Some(feed), Some(rx))
    };
    let (tx, events) = mpsc::channel::<Event>(256);
    let store = state.store.clone();
    tokio::spawn(async move {
        // The place and the feed are held while the response lasts, and
        // given back as soon as the client leaves, even from a quiet job.
        let (_place, _feed) = (place, feed);
        let deadline = tokio::time::Instant::now() + STREAM_FOR;
        tokio::select! {
            _ = tokio::time::timeout_at(deadline, follow(&store, id, cursor, rx, &tx)) => {}
            _ = tx.closed() => {}
        }
    });
    let events = futures::stream::unfold(events, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Sends the chunks after `cursor`, then what the feed passes on, until the
/// job's end, the feed's stop or the reader leaves. Without a feed (the
/// job had finished), the chunks and the end.
async fn follow(
    store: &Store,
    job: JobId,
    mut cursor: i64,
    feed: Option<broadcast::Receiver<FeedItem>>,
    tx: &mpsc::Sender<Event>,
) {
    let retry = Event::default()
        .retry(Duration::from_secs(1))
        .comment("offload");
    if tx.send(retry).await.is_err() {
        return;
    }
    // What came before this reader subscribed, from the database; then the
    // feed, skipping what the backlog already sent.
    if !backlog(store, job, &mut cursor, tx).await {
        return;
    }
    match store.get_any(job).await {
        Ok(Some(j)) if j.status.is_terminal() => {
            if backlog(store, job, &mut cursor, tx).await {
                let _ = tx.send(end(j.status)).await;
            }
            return;
        }
        Ok(_) => {}
        Err(_) => return,
    }
    let Some(mut feed) = feed else {
        return;
    };
    loop {
        match feed.recv().await {
            Ok(FeedItem::Chunks { after, chunks }) => {
                // The page starts past this reader's cursor (the feed
                // started, or passed on the chunks between, before the
                // reader's backlog read them): they are in the database.
                if after > cursor && !backlog(store, job, &mut cursor, tx).await {
                    return;
                }
                let from = cursor;
                for (id, data) in chunks.iter().filter(|c| c.0 > from) {
                    if tx.send(chunk(*id, data)).await.is_err() {
                        return;
                    }
                    cursor = *id;
                }
            }
            Ok(FeedItem::Ended(status)) => {
                if backlog(store, job, &mut cursor, tx).await {
                    let _ = tx.send(end(status)).await;
                }
                return;
            }
            // The client resumes from its last id, on a new feed.
            Ok(FeedItem::Stopped) | Err(broadcast::error::RecvError::Closed) => return,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                if !backlog(store, job, &mut cursor, tx).await {
                    return;
                }
            }
        }
    }
}

/// Sends every chunk after `cursor` from the database; `false` when the
/// reader left or the database failed (the reader reconnects).
async fn backlog(store: &Store, job: JobId, cursor: &mut i64, tx: &mpsc::Sender<Event>) -> bool {
    loop {
        let Ok(page) = store.stream_after(job, *cursor, 500).await else {
            return false;
        };
        if page.is_empty() {
            return true;
        }
        for (id, data) in &page {
            if tx.send(chunk(*id, data)).await.is_err() {
                return false;
            }
            *cursor = *id;
        }
    }
}

fn chunk(id: i64, data: &serde_json::Value) -> Event {
    Event::default()
        .event("chunk")
        .id(id.to_string())
        .data(data.to_string())
}

fn end(status: crate::job::JobStatus) -> Event {
    Event::default()
        .event("end")
        .data(json!({ "status": status }).to_string())
}
