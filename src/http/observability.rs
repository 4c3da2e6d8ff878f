//! Request ids, request logs and metrics for every route (API, webhooks, health), and the
//! `/metrics` scrape endpoint.

use super::AppState;
use crate::metrics::Metrics;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;
use std::time::Instant;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::{Level, Span};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The route label of requests that matched no route: one series, whatever the path.
const UNMATCHED: &str = "unmatched";

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// Wraps every route of `router` (call it after all routers are merged): the request id
/// outermost, so the request's span and every log line in it carry it; then the span and
/// its one "finished" line; then the latency histogram by matched route.
pub fn layer(router: Router, metrics: Arc<Metrics>) -> Router {
    router
        .layer(middleware::from_fn_with_state(metrics, record_metrics))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(make_span::<Body>)
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .layer(middleware::from_fn(request_id))
}

/// An incoming id is kept when it is short and plain (it goes into logs and headers);
/// anything else is replaced, so a client cannot forge log lines or bloat them.
fn sane(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|v| v.to_str().is_ok_and(sane))
        .cloned()
        .or_else(|| HeaderValue::try_from(uuid::Uuid::now_v7().to_string()).ok());
    let Some(id) = id else {
        return next.run(request).await;
    };
    request.headers_mut().insert(X_REQUEST_ID, id.clone());
    let mut response = next.run(request).await;
    response.headers_mut().insert(X_REQUEST_ID, id);
    response
}

/// The request's span. Only the path is logged, never the query string (webhook
/// verification tokens travel there) nor any header but the request id (no Authorization).
fn make_span<B>(request: &axum::http::Request<B>) -> Span {
    let request_id = request
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, MatchedPath::as_str);
    tracing::info_span!(
        "request",
        request_id,
        method = %request.method(),
        route,
        path = request.uri().path(),
    )
}

/// Methods as labels: the ones we serve, and "other" for anything a client makes up.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

async fn record_metrics(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_string(), |p| p.as_str().to_string());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.http_request(
        method,
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// `GET /metrics`: Prometheus text exposition, no bearer key (like `/healthz`; keep it off
/// the public network).
async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics.render(state.store.as_ref()).await {
        Ok(body) => (
            [(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            body,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "metrics: encoding failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
