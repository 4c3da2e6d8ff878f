//! The state-change feed for Automation: pull with a cursor, long-polled with `wait`.

use super::error::ApiError;
use super::{ApiJson, ApiQuery, AppState};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::Router;
use futures::Stream;
use messaging_projections::FeedItem;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::time::Duration;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/state-changes", get(state_changes))
        .route("/state-changes/stream", get(stream))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    after: Option<String>,
    /// Where EventSource polyfills that cannot set headers put the last event id when they
    /// reconnect: read as `Last-Event-ID` is.
    #[serde(rename = "lastEventId")]
    last_event_id: Option<String>,
}

/// `GET /v1/state-changes/stream`: the same items as server-sent events, each with its
/// position as the event id, so a client that reconnects with `Last-Event-ID` (or `after`)
/// resumes exactly where it stopped.
async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError> {
    // An empty Last-Event-ID is no event id (the SSE standard's reset); one that is not text
    // is refused rather than ignored, which would replay the feed from `after` or its start.
    let last_event_id = match headers.get("last-event-id").map(|v| v.to_str()) {
        None => None,
        Some(Err(_)) => {
            return Err(ApiError::field(
                "Last-Event-ID",
                "must be a feed position (0 or more)",
            ))
        }
        Some(Ok(id)) => Some(id.trim().to_string()).filter(|id| !id.is_empty()),
    };
    let polyfilled = q
        .last_event_id
        .as_deref()
        .map(str::trim)
        .filter(|id| !id.is_empty());
    // The error names whichever the value came from.
    let (given, field) = match (last_event_id.as_deref(), polyfilled) {
        (Some(id), _) => (Some(id), "Last-Event-ID"),
        (None, Some(id)) => (Some(id), "lastEventId"),
        (None, None) => (q.after.as_deref(), "after"),
    };
    let after = number(
        given,
        field,
        0i64,
        |n| *n >= 0,
        "must be a feed position (0 or more)",
    )?;
    within_feed(&state, after, field).await?;
    let wake = state.feed_wake.clone();
    let start = (after, VecDeque::<FeedItem>::new(), state, wake);
    let events = futures::stream::unfold(
        start,
        |(mut after, mut queue, mut state, mut wake)| async move {
            loop {
                // The server is stopping: the stream ends (the client reconnects elsewhere
                // with Last-Event-ID and loses nothing).
                if *state.draining.borrow() {
                    return None;
                }
                if let Some(item) = queue.pop_front() {
                    after = item.position;
                    let event = Event::default()
                        .id(item.position.to_string())
                        .event("state_change")
                        .json_data(&item)
                        .unwrap_or_else(|_| Event::default().comment("unserializable item"));
                    return Some((Ok(event), (after, queue, state, wake)));
                }
                wake.borrow_and_update();
                match state.store.state_changes(after, 500).await {
                    Ok(items) if !items.is_empty() => queue.extend(items),
                    Ok(_) => {
                        // A wake-up, or a look anyway now and then: a notification missed
                        // while the listener reconnected must not leave the stream silent.
                        tokio::select! {
                            changed = wake.changed() => {
                                if changed.is_err() {
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                }
                            }
                            _ = tokio::time::sleep(STREAM_LOOKS_EVERY) => {}
                            _ = state.draining.changed() => {}
                        }
                    }
                    Err(error) => {
                        // The client reconnects with Last-Event-ID and loses nothing.
                        tracing::error!(%error, "state-change stream failed");
                        return None;
                    }
                }
            }
        },
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedQuery {
    after: Option<String>,
    limit: Option<String>,
    wait: Option<String>,
}

const MAX_LIMIT: i64 = 1000;
/// An idle stream reads the feed at least this often, woken or not.
const STREAM_LOOKS_EVERY: Duration = Duration::from_secs(5);
const MAX_WAIT_SECONDS: u64 = 60;

fn number<T: std::str::FromStr>(
    raw: Option<&str>,
    field: &str,
    default: T,
    ok: impl Fn(&T) -> bool,
    hint: &str,
) -> Result<T, ApiError> {
    match raw {
        None => Ok(default),
        Some(r) => r
            .parse::<T>()
            .ok()
            .filter(ok)
            .ok_or_else(|| ApiError::field(field, hint)),
    }
}

/// Refuses a position past the feed's end (one it never served: a client's cursor from before
/// a `state_changes` rebuild, or a made-up one), which would wait for, then skip, every item up
/// to it. A position is within the feed when an item is at it or after it.
async fn within_feed(state: &AppState, after: i64, field: &str) -> Result<(), ApiError> {
    past_the_end(
        state,
        after,
        field,
        "use a position the feed has served (its `next`), or 0 to read it from the start",
    )
    .await
}

/// 422 for `field` when `after` is past the feed's end, saying `what_instead`. While the feed
/// has events of the log still to project, a position up to as many past its end is not: each
/// event makes at most one item, and one of them may yet be there. (Feed batches commit
/// without waiting for their WAL flush: after a database server crash, the last items served
/// come back, at the same positions, only once projected again. A client's cursor among them
/// is valid, and a 422 would send it back to the start.) Such a position is read as any other:
/// nothing there yet, waited for where the call waits.
pub(super) async fn past_the_end(
    state: &AppState,
    after: i64,
    field: &str,
    what_instead: &str,
) -> Result<(), ApiError> {
    if after > 0 && state.store.state_changes(after - 1, 1).await?.is_empty() {
        // The lag first, the end after it: a batch committed in between (the item at `after`
        // made, the lag 0) still finds `after` within the end.
        let to_come = state.store.projection_lag("state_changes").await?;
        if after <= state.store.feed_end().await?.saturating_add(to_come) {
            return Ok(());
        }
        return Err(ApiError::field(
            field,
            format!("is past the end of the feed: {what_instead}"),
        ));
    }
    Ok(())
}

async fn state_changes(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<FeedQuery>,
) -> Result<ApiJson<Value>, ApiError> {
    let after = number(
        q.after.as_deref(),
        "after",
        0i64,
        |n| *n >= 0,
        "must be a position (0 or more)",
    )?;
    let limit = number(
        q.limit.as_deref(),
        "limit",
        100i64,
        |n| (1..=MAX_LIMIT).contains(n),
        "must be 1 to 1000",
    )?;
    let wait = number(
        q.wait.as_deref(),
        "wait",
        0u64,
        |n| *n <= MAX_WAIT_SECONDS,
        "must be 0 to 60 seconds",
    )?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let mut wake = state.feed_wake.clone();
    let mut draining = state.draining.clone();
    let mut first = true;
    loop {
        // Mark the wake-up seen before reading, so an item that lands after the read wakes us.
        wake.borrow_and_update();
        let items = state.store.state_changes(after, limit).await?;
        if items.is_empty() && std::mem::take(&mut first) {
            within_feed(&state, after, "after").await?;
        }
        // A stopping server answers at once, with what there is.
        let stopping = *draining.borrow();
        if !items.is_empty() || stopping || tokio::time::Instant::now() >= deadline {
            let next = items.last().map(|i| i.position).unwrap_or(after);
            return Ok(ApiJson(json!({"items": items, "next": next})));
        }
        tokio::select! {
            changed = wake.changed() => {
                if changed.is_err() {
                    // No listener: fall back to a short poll.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {}
            _ = draining.changed() => {}
        }
    }
}
