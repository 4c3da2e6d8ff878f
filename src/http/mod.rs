//! The HTTP API (`CONTRACT.md`, "HTTP API"). Each resource module exposes `router()`;
//! handlers stay thin: extract, build the command, execute, map the result.

pub mod error;
mod feed;
mod health;
mod messages;
pub mod observability;
mod openapi;
mod services;
mod subscriptions;
mod webhooks;

use crate::store::Store;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use error::ApiError;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// SHA-256 of each accepted API key: compared by digest, never kept or logged in clear.
    pub api_key_digests: Arc<Vec<[u8; 32]>>,
    /// Bumped whenever the feed projector commits new items (NOTIFY `state_changes`).
    pub feed_wake: watch::Receiver<u64>,
    /// True once the server stops taking requests: streams and long polls end (see
    /// `startup::Application::run`).
    pub draining: watch::Receiver<bool>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// JSON bodies with our error shape for every rejection.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// A query string with our error shape when it cannot be read (a repeated parameter, say).
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// Path parameters with our error shape when they cannot be read (not UTF-8, say).
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

async fn require_api_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    // The scheme is case-insensitive (RFC 9110, section 11.1): `bearer` is `Bearer`.
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, k)| digest(k.trim()));
    match presented {
        Some(d) if state.api_key_digests.contains(&d) => Ok(next.run(request).await),
        _ => Err(ApiError::unauthorized()),
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /v1/openapi.json")
}

pub(crate) async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this route does not take {method}; see /v1/openapi.json"),
    )
}

pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let v1 = Router::new()
        .merge(services::router())
        .merge(messages::router())
        .merge(feed::router())
        .merge(webhooks::router())
        .merge(subscriptions::router())
        .merge(openapi::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // A layer, not a route layer: every `/v1/*` request needs a key, an unknown route's
        // and a wrong method's too (a caller without one learns nothing of what exists).
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .nest("/v1", v1)
        .merge(health::router())
        .merge(observability::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// What a state filter says of a name that is not a state: the states there are.
fn not_a_state(given: &str) -> String {
    let states: Vec<&str> = messaging_domain::MessageState::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    format!(
        "`{given}` is not a message state (one of: {})",
        states.join(", ")
    )
}
