//! Services: the connected accounts messages are sent from. Credentials are write-only.

use super::error::ApiError;
use super::{ApiJson, ApiPath, AppState};
use crate::providers::parse_credentials;
use crate::store::Service;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::Router;
use messaging_domain::{one_line, x_handle, Channel, EmailAddress, Provider, ServiceId};
use serde::Deserialize;
use serde_json::{json, Value};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/services", get(list).post(create))
        .route("/services/{id}", get(show))
        .route("/services/{id}/credentials", put(replace_credentials))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateService {
    channel: String,
    /// `sandbox` when omitted with no credentials.
    #[serde(default)]
    provider: Option<String>,
    name: String,
    username: String,
    #[serde(default)]
    credentials: Option<Value>,
}

fn view(s: &Service) -> Value {
    json!({
        "id": s.id,
        "channel": s.channel,
        "provider": s.provider,
        "name": s.name,
        "username": s.username,
        "sandbox": s.provider == Provider::Sandbox,
        "created_at": s.created_at,
    })
}

pub fn parse_service_id(raw: &str) -> Result<ServiceId, ApiError> {
    raw.parse().map_err(|_| no_service(raw))
}

fn no_service(id: impl std::fmt::Display) -> ApiError {
    ApiError::not_found(format!("no service with id `{id}`"))
}

/// The service the path names (`raw`), or 404.
pub async fn found_service(state: &AppState, raw: &str) -> Result<Service, ApiError> {
    let id = parse_service_id(raw)?;
    state.store.service(id).await?.ok_or_else(|| no_service(id))
}

async fn create(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateService>,
) -> Result<(StatusCode, ApiJson<Value>), ApiError> {
    let channel = Channel::parse(&body.channel)
        .ok_or_else(|| ApiError::field("channel", "must be one of email, twitter, facebook"))?;
    let provider = match (&body.provider, &body.credentials) {
        (Some(provider), _) => Provider::parse(provider).ok_or_else(|| {
            ApiError::field(
                "provider",
                "must be one of sendgrid, smtp, x, facebook, sandbox",
            )
        })?,
        // No provider and nothing to send with: the offline sandbox, labelled as such.
        (None, None) => Provider::Sandbox,
        (None, Some(_)) => {
            return Err(ApiError::field(
                "provider",
                "is required with credentials: one of sendgrid, smtp, x, facebook",
            ))
        }
    };
    if !provider.serves(channel) {
        return Err(ApiError::field(
            "provider",
            format!("{provider} cannot send {channel} messages"),
        ));
    }
    let name = body.name.trim();
    if name.is_empty() {
        return Err(ApiError::field("name", "must not be empty"));
    }
    if !one_line(name) {
        return Err(ApiError::field(
            "name",
            "must be one line, without control characters",
        ));
    }
    let username = check_username(channel, &body.username)?;
    let credentials = body.credentials.unwrap_or_else(|| json!({}));
    // The parser the sender uses, so that what is accepted here can send: one check, not
    // two that disagree (a looser one here let through services that failed every send).
    parse_credentials(provider, &credentials).map_err(|message| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
    })?;
    let service = Service {
        id: ServiceId::from_uuid(uuid::Uuid::now_v7()),
        channel,
        provider,
        name: name.to_string(),
        username,
        created_at: crate::clock::now(),
    };
    state.store.create_service(&service, &credentials).await?;
    tracing::info!(service_id = %service.id, %channel, %provider, "service created");
    Ok((StatusCode::CREATED, ApiJson(view(&service))))
}

async fn list(State(state): State<AppState>) -> Result<ApiJson<Value>, ApiError> {
    let services = state.store.services().await?;
    Ok(ApiJson(
        json!({"items": services.iter().map(view).collect::<Vec<_>>()}),
    ))
}

async fn show(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Value>, ApiError> {
    Ok(ApiJson(view(&found_service(&state, &id).await?)))
}

/// `PUT /v1/services/{id}/credentials`: the account's new credentials (a rotated key, a
/// token granted again), in the shape its provider takes on create. Write-only like those;
/// the next send uses them, on every instance (the sender reads them for each round).
async fn replace_credentials(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(credentials): ApiJson<Value>,
) -> Result<ApiJson<Value>, ApiError> {
    let service = found_service(&state, &id).await?;
    let id = service.id;
    parse_credentials(service.provider, &credentials).map_err(|message| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
    })?;
    if !state
        .store
        .replace_service_credentials(id, &credentials, None)
        .await?
    {
        return Err(no_service(id));
    }
    tracing::info!(service_id = %id, "service credentials replaced");
    Ok(ApiJson(view(&service)))
}

fn check_username(channel: Channel, raw: &str) -> Result<String, ApiError> {
    let raw = raw.trim();
    match channel {
        Channel::Email => EmailAddress::parse(raw)
            .map(|a| a.as_str().to_string())
            .map_err(|m| ApiError::field("username", m)),
        Channel::Twitter => x_handle(raw)
            .map(str::to_string)
            .map_err(|m| ApiError::field("username", m)),
        Channel::Facebook => {
            if !raw.is_empty()
                && raw.len() <= messaging_domain::builder::MOST_FACEBOOK_ID
                && raw.chars().all(|c| c.is_ascii_digit())
            {
                Ok(raw.to_string())
            } else {
                Err(ApiError::field(
                    "username",
                    "a Facebook page id is numeric (a few dozen digits at most)",
                ))
            }
        }
    }
}
