//! Inspection of webhook input we could not use: it is kept, never dropped.

use super::error::ApiError;
use super::{ApiJson, ApiQuery, AppState};
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

pub fn router() -> Router<AppState> {
    Router::new().route("/webhooks/unmatched", get(unmatched))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnmatchedQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

/// `GET /v1/webhooks/unmatched`: provider input that names no message of ours, or that could
/// not be read, newest first, with the reason and the payload as received.
async fn unmatched(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<UnmatchedQuery>,
) -> Result<ApiJson<Value>, ApiError> {
    let limit = match q.limit.as_deref() {
        None => 100,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=500).contains(n))
            .ok_or_else(|| ApiError::field("limit", "must be 1 to 500"))?,
    };
    let before = q
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| ApiError::field("cursor", "is not a cursor from a previous page"))
        })
        .transpose()?;
    let items = state.store.webhook_problems(before, limit + 1).await?;
    let more = items.len() as i64 > limit;
    let items: Vec<_> = items.into_iter().take(limit as usize).collect();
    let next_cursor = if more {
        items.last().map(|i| i.id.to_string())
    } else {
        None
    };
    Ok(ApiJson(json!({"items": items, "next_cursor": next_cursor})))
}
