//! Provider webhooks (no bearer key: each is authenticated by its provider's signature over
//! the raw body, checked before anything is parsed). Every fact lands in a durable inbox in the
//! request's transaction; the applier records it on its message.

pub mod applier;
pub mod inbox;
pub mod sendgrid;
pub mod social;
pub mod verify;

use crate::config::Secret;
use crate::store::{Store, StoreError};
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

/// What the webhooks verify with. `None` means not configured: that webhook refuses everything,
/// except Inbound Parse, which SendGrid signs only under a security policy: without its public
/// key or its token it accepts any caller (a warning at start-up says so).
#[derive(Default)]
pub struct WebhookSecrets {
    pub sendgrid_verifier: Option<verify::SendgridVerifier>,
    /// The Inbound Parse security policy's signature key (not the Event Webhook's).
    pub sendgrid_inbound_verifier: Option<verify::SendgridVerifier>,
    pub sendgrid_inbound_token: Option<Secret>,
    pub x_consumer_secret: Option<Secret>,
    pub facebook_app_secret: Option<Secret>,
    pub facebook_verify_token: Option<Secret>,
}

#[derive(Clone)]
pub struct WebhookState {
    pub store: Arc<dyn Store>,
    pub secrets: Arc<WebhookSecrets>,
}

/// Why a webhook delivery was refused; the same error shape as the API.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("this webhook is not configured: set {0}")]
    NotConfigured(&'static str),
    #[error("the signature header is missing")]
    MissingSignature,
    #[error("the signature does not match the body")]
    BadSignature,
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Database(#[from] StoreError),
}

impl IntoResponse for WebhookError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            WebhookError::NotConfigured(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_configured"),
            WebhookError::MissingSignature | WebhookError::BadSignature => {
                (StatusCode::UNAUTHORIZED, "bad_signature")
            }
            WebhookError::Malformed(_) => (StatusCode::BAD_REQUEST, "malformed"),
            WebhookError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            WebhookError::Database(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        };
        let message = match &self {
            // Opaque to the caller (the provider retries a 5xx); the cause goes to the log.
            WebhookError::Database(e) => {
                tracing::error!(error = %e, "webhook not recorded");
                "not recorded; retry later".to_string()
            }
            other => {
                tracing::warn!(reason = %other, "webhook refused");
                other.to_string()
            }
        };
        (
            status,
            Json(json!({"error": {"code": code, "message": message}})),
        )
            .into_response()
    }
}

/// A delivery's raw body, refused in the error shape when it cannot be read (over the
/// route's limit: 413), not with axum's plain text.
pub struct Body(pub axum::body::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = WebhookError;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::body::Bytes::from_request(request, state)
            .await
            .map(Body)
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    WebhookError::TooLarge(format!(
                        "the body is larger than {} MB",
                        WEBHOOK_BODY_LIMIT >> 20
                    ))
                } else {
                    WebhookError::Malformed(format!(
                        "the body could not be read: {}",
                        e.body_text()
                    ))
                }
            })
    }
}

/// A multipart form (Inbound Parse), refused in the error shape when the request is not one.
pub struct Form(pub axum::extract::Multipart);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Form {
    type Rejection = WebhookError;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Multipart::from_request(request, state)
            .await
            .map(Form)
            .map_err(|e| {
                WebhookError::Malformed(format!(
                    "send the email as a multipart/form-data form: {}",
                    e.body_text()
                ))
            })
    }
}

/// A query string, refused in the error shape when it cannot be read (a parameter given
/// twice, say).
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(WebhookError))]
pub struct WebhookQuery<T>(pub T);

impl From<axum::extract::rejection::QueryRejection> for WebhookError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        WebhookError::Malformed(format!("query string: {}", rejection.body_text()))
    }
}

/// Records a delivery's facts (one statement, one transaction) and says so: the 2xx is sent
/// only once they are durable.
pub async fn recorded(
    store: &dyn Store,
    facts: &[inbox::InboxFact],
) -> Result<(StatusCode, Json<serde_json::Value>), WebhookError> {
    let new = store
        .record_webhook_facts(&inbox::InboxFact::storable(facts))
        .await?;
    Ok((
        StatusCode::OK,
        Json(json!({"received": facts.len(), "new": new})),
    ))
}

/// Compares secrets without leaking, through timing, how much of them matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A SendGrid batch of a thousand events is about half a megabyte; leave room.
const WEBHOOK_BODY_LIMIT: usize = 8 * 1024 * 1024;

/// Inbound Parse posts a whole email, attachments included, and SendGrid takes emails of up
/// to 30 MB: room for that and the form's encoding. Attachments are read past, not kept.
pub const INBOUND_BODY_LIMIT: usize = 32 * 1024 * 1024;

pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route("/webhooks/sendgrid/events", post(sendgrid::events))
        .route(
            "/webhooks/sendgrid/inbound",
            post(sendgrid::inbound).layer(DefaultBodyLimit::max(INBOUND_BODY_LIMIT)),
        )
        .route(
            "/webhooks/twitter",
            get(social::x_crc).post(social::x_events),
        )
        .route(
            "/webhooks/facebook",
            get(social::facebook_challenge).post(social::facebook_events),
        )
        .layer(DefaultBodyLimit::max(WEBHOOK_BODY_LIMIT))
        .with_state(state)
}
