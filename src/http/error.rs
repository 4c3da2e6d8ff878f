//! The one error shape: `{"error": {"code": "...", "message": "..."}}`. Client errors say what
//! to fix; server errors are opaque to the client and logged in full.

use crate::store::{CommandError, StoreError};
use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use messaging_domain::{FieldError, MessageError};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn field(field: &str, message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("{field}: {message}"),
        )
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer <key>` with one of the configured API keys",
        )
    }

    /// The database could not be reached in time (every connection busy, or none could be
    /// made): 503 with `Retry-After`, nothing was done, the same request may be sent again.
    pub fn unavailable(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "request refused: the database is unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the database is busy or unreachable; nothing was done, try again shortly",
        )
    }

    /// A server-side failure: the cause goes to the log, the client gets an opaque message.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "something went wrong on our side; it has been logged",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, axum::Json(body)).into_response();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        Self::field(&e.field, e.message)
    }
}

impl From<MessageError> for ApiError {
    fn from(e: MessageError) -> Self {
        match e {
            MessageError::NotFound => Self::not_found("no message with this id"),
            MessageError::AlreadyExists => {
                Self::new(StatusCode::CONFLICT, "already_exists", e.to_string())
            }
            MessageError::InvalidTransition { .. } | MessageError::StaleSchedule { .. } => {
                Self::new(StatusCode::CONFLICT, "invalid_transition", e.to_string())
            }
            MessageError::NotSupportedOnChannel { .. } => Self::new(
                StatusCode::CONFLICT,
                "not_supported_on_channel",
                e.to_string(),
            ),
            MessageError::ScheduleInPast { .. } => {
                Self::field("publish_at", "must be in the future")
            }
            MessageError::ScheduleTooFar { .. } => {
                Self::field("publish_at", "must be before the year 10000")
            }
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Rejected(e) => e.into(),
            // Not the client's fault: say when to retry.
            CommandError::Busy => Self::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string()),
            CommandError::Store(cause) => Self::internal(cause),
            CommandError::Unavailable(cause) => Self::unavailable(cause),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.unavailable {
            Self::unavailable(e)
        } else {
            Self::internal(e)
        }
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("query string: {}", rejection.body_text()),
        )
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::PathRejection) -> Self {
        Self::not_found(format!("no such resource: {}", rejection.body_text()))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                without_values(
                    // The field and what is wrong with it, as parse_body says it.
                    e.body_text().trim_start_matches(
                        "Failed to deserialize the JSON body into the target type: ",
                    ),
                ),
            ),
            JsonRejection::JsonSyntaxError(e) => {
                Self::new(StatusCode::BAD_REQUEST, "malformed_json", e.body_text())
            }
            JsonRejection::MissingJsonContentType(_) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with `Content-Type: application/json`",
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => too_large(),
            other => Self::new(StatusCode::BAD_REQUEST, "bad_request", other.body_text()),
        }
    }
}

/// A deserializer's message without the value it was given (`invalid type: integer `123`,
/// expected a string` says `invalid type: integer, expected a string`): the value may be a
/// secret, and the API never shows one back.
pub fn without_values(message: &str) -> String {
    let mut out = message.to_string();
    for lead in ["invalid type: ", "invalid value: ", "invalid length "] {
        let Some(start) = out.find(lead).map(|i| i + lead.len()) else {
            continue;
        };
        // What was expected comes last and is the service's own text; the value sits before it.
        let Some(end) = out.rfind(", expected").filter(|&end| end >= start) else {
            continue;
        };
        let given = &out[start..end];
        let kind = given
            .find(['`', '"'])
            .map_or(given, |quote| given[..quote].trim_end());
        out = format!("{}{kind}{}", &out[..start], &out[end..]);
    }
    // The request's Rust type means nothing to a client.
    if let Some(start) = out.find("expected struct ") {
        let name_end = out[start + 16..]
            .find(|c: char| !c.is_alphanumeric())
            .map_or(out.len(), |i| start + 16 + i);
        out.replace_range(start..name_end, "expected a JSON object");
    }
    out
}

pub fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "the request body is larger than this service accepts",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserializer_messages_do_not_show_the_value_given() {
        for (given, shown) in [
            (
                "secret: invalid type: integer `12345678901234567890`, expected a string at line 1 column 30",
                "secret: invalid type: integer, expected a string at line 1 column 30",
            ),
            (
                r#"to: invalid type: string "hunter2, expected", expected a sequence"#,
                "to: invalid type: string, expected a sequence",
            ),
            (
                "send: invalid value: boolean `true`, expected false",
                "send: invalid value: boolean, expected false",
            ),
            (
                "to: invalid type: map, expected a sequence",
                "to: invalid type: map, expected a sequence",
            ),
            ("missing field `url`", "missing field `url`"),
            (
                "invalid type: null, expected struct ComposeRequest",
                "invalid type: null, expected a JSON object",
            ),
        ] {
            assert_eq!(without_values(given), shown);
        }
    }

    #[test]
    fn no_connection_in_time_is_503_with_retry_after_and_other_store_errors_500() {
        let response = ApiError::from(StoreError::from(sqlx::Error::PoolTimedOut)).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");

        let command = CommandError::Unavailable("pool timed out".into());
        let response = ApiError::from(command).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);

        let response = ApiError::from(StoreError::from(sqlx::Error::RowNotFound)).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
    }
}
