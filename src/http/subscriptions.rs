//! Push subscriptions for Automation: signed deliveries of feed items, each subscription with
//! its own cursor. The secret is write-only.

use super::error::ApiError;
use super::{ApiJson, ApiPath, AppState};
use crate::store::NewSubscription;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use messaging_domain::{Channel, MessageState};
use serde::Deserialize;
use serde_json::{json, Value};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/subscriptions", get(list).post(create))
        .route("/subscriptions/{id}", get(show).delete(delete))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSubscription {
    url: String,
    secret: String,
    states: Option<Vec<String>>,
    channels: Option<Vec<String>>,
    /// Start after this feed position (0 replays everything); default: only new changes.
    after: Option<i64>,
}

/// Secrets shorter than this are too easy to guess for an HMAC key.
const MIN_SECRET_LEN: usize = 16;

async fn create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateSubscription>,
) -> Result<(StatusCode, ApiJson<Value>), ApiError> {
    let url = body.url.trim();
    // Parsed as the pusher's client will parse it at every delivery: a URL it cannot call
    // (a port past 65535, an unclosed IPv6 bracket, no host) would fail every delivery with
    // nothing to say why.
    let url_ok = !url.contains(|c: char| c.is_whitespace() || c.is_control())
        && reqwest::Url::parse(url).is_ok_and(|parsed| {
            matches!(parsed.scheme(), "http" | "https")
                && parsed.host_str().is_some_and(|host| !host.is_empty())
        });
    if !url_ok {
        return Err(ApiError::field(
            "url",
            "must be an absolute http or https URL",
        ));
    }
    if body.secret.len() < MIN_SECRET_LEN {
        return Err(ApiError::field(
            "secret",
            format!("must be at least {MIN_SECRET_LEN} characters"),
        ));
    }
    if body.secret.chars().any(char::is_control) {
        return Err(ApiError::field(
            "secret",
            "must not contain control characters",
        ));
    }
    if let Some(states) = &body.states {
        if let Some(bad) = states.iter().find(|s| MessageState::parse(s).is_none()) {
            return Err(ApiError::field("states", super::not_a_state(bad)));
        }
    }
    if let Some(channels) = &body.channels {
        if let Some(bad) = channels.iter().find(|c| Channel::parse(c).is_none()) {
            return Err(ApiError::field(
                "channels",
                format!("`{bad}` is not one of email, twitter, facebook"),
            ));
        }
    }
    if body.after.is_some_and(|a| a < 0) {
        return Err(ApiError::field(
            "after",
            "must be a feed position (0 or more)",
        ));
    }
    // A cursor past the feed's end would deliver nothing until the feed grew past it, and
    // every change up to there would be skipped: refused (it is within the feed when some
    // item is at or after it).
    if let Some(after) = body.after {
        super::feed::past_the_end(
            &state,
            after,
            "after",
            "use a position the feed has served (`next` of GET /v1/state-changes), or leave it out to start at the end",
        )
        .await?;
    }
    let subscription = state
        .store
        .create_subscription(&NewSubscription {
            url: url.to_string(),
            secret: body.secret,
            states: body.states.filter(|s| !s.is_empty()),
            channels: body.channels.filter(|c| !c.is_empty()),
            after: body.after,
        })
        .await?;
    tracing::info!(subscription_id = %subscription.id, "push subscription created");
    Ok((StatusCode::CREATED, ApiJson(json!(subscription))))
}

fn parse_id(raw: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(raw)
        .map_err(|_| ApiError::not_found(format!("no subscription with id `{raw}`")))
}

async fn show(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Value>, ApiError> {
    let id = parse_id(&id)?;
    let subscription = state
        .store
        .subscription(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no subscription with id `{id}`")))?;
    Ok(ApiJson(json!(subscription)))
}

async fn list(State(state): State<AppState>) -> Result<ApiJson<Value>, ApiError> {
    Ok(ApiJson(
        json!({"items": state.store.subscriptions().await?}),
    ))
}

async fn delete(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    if state.store.delete_subscription(id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "no subscription with id `{id}`"
        )))
    }
}
