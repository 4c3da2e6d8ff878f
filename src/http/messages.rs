//! Message commands (compose, schedule, send, cancel) and queries (list, detail).

use super::error::ApiError;
use super::services::{found_service, parse_service_id};
use super::{ApiJson, ApiPath, ApiQuery, AppState};
use crate::store::{CommandError, IdempotencyClaim, ListFilter, Service};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use messaging_domain::{
    build_message, Channel, Compose, Direction, Dispatch, Message, MessageCommand, MessageError,
    MessageId, MessageInput, MessageState, Profile, ServiceRef,
};
use messaging_projections::MessageView;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/messages", get(list).post(compose))
        .route("/messages/{id}", get(show))
        .route("/messages/{id}/history", get(show_history))
        .route("/messages/{id}/schedule", post(schedule))
        .route("/messages/{id}/send", post(send))
        .route("/messages/{id}/cancel", post(cancel))
        .route("/messages/{id}/resolve", post(resolve))
        .route("/services/{id}/shares", post(share))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Recipient {
    username: String,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ComposeRequest {
    service_id: String,
    #[serde(default)]
    to: Vec<Recipient>,
    subject: Option<String>,
    text: Option<String>,
    html: Option<String>,
    link: Option<String>,
    in_reply_to: Option<String>,
    #[serde(default, deserialize_with = "time::optional")]
    publish_at: Option<DateTime<Utc>>,
    #[serde(default)]
    send: bool,
}

/// Times a client gives (`publish_at`): RFC 3339 with an offset, said so when it is not, and
/// cut to the microsecond, as PostgreSQL keeps them and as the service's own times are.
mod time {
    use chrono::{DateTime, SubsecRound, Utc};
    use serde::{Deserialize, Deserializer};

    pub fn required<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|at| at.with_timezone(&Utc).trunc_subsecs(6))
            .map_err(|e| {
                serde::de::Error::custom(format_args!(
                    "must be an RFC 3339 time with its offset, such as 2030-01-01T09:00:00Z \
                     ({e})"
                ))
            })
    }

    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        #[derive(Deserialize)]
        struct Time(#[serde(deserialize_with = "required")] DateTime<Utc>);
        Ok(Option::<Time>::deserialize(d)?.map(|Time(at)| at))
    }
}

const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Reads a JSON body into `T`, naming the path of a bad field (`to[0].username`).
fn parse_body<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let message = super::error::without_values(&e.into_inner().to_string());
        match path.as_str() {
            // The body itself (not an object, or an unknown field at its top).
            "." => ApiError::field("body", message),
            _ => ApiError::field(&path, message),
        }
    })
}

fn profiles(recipients: Vec<Recipient>) -> Vec<Profile> {
    recipients
        .into_iter()
        .map(|r| Profile::new(r.username, r.name))
        .collect()
}

fn parse_message_id(raw: &str) -> Result<MessageId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::not_found(format!("no message with id `{raw}`")))
}

/// The message as it stands in the log (read-your-writes for the caller), with its history.
async fn message_view(state: &AppState, id: MessageId) -> Result<(Value, Value), ApiError> {
    let (message, history) = state
        .store
        .message(id)
        .await?
        .ok_or_else(|| ApiError::from(MessageError::NotFound))?;
    let history = serde_json::to_value(history).map_err(ApiError::internal)?;
    Ok((view_of(id, &message)?, history))
}

/// The API's view of a message.
fn view_of(id: MessageId, message: &Message) -> Result<Value, ApiError> {
    let data = message
        .data()
        .ok_or_else(|| ApiError::internal(format!("message {id} has no first event")))?;
    serde_json::to_value(MessageView::from(data)).map_err(ApiError::internal)
}

async fn compose(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, ApiJson<Value>), ApiError> {
    // serde_json keeps object keys sorted, so equal bodies hash equal however they were spaced.
    let request_hash = request_hash(&headers, || body.to_string());
    let request: ComposeRequest = parse_body(body)?;
    let service_id = parse_service_id(&request.service_id)
        .map_err(|_| ApiError::field("service_id", "is not a service id"))?;
    let service = state
        .store
        .service(service_id)
        .await?
        .ok_or_else(|| ApiError::field("service_id", "no service with this id"))?;
    let input = MessageInput {
        to: profiles(request.to),
        subject: request.subject,
        text: request.text,
        html: request.html,
        link: request.link,
        in_reply_to: request.in_reply_to,
    };
    let dispatch = dispatch(request.publish_at, request.send)?;
    compose_for(&state, &service, input, dispatch, &headers, &request_hash).await
}

/// The hash an `Idempotency-Key` is stored with, of the request as `text` gives it; only
/// computed when the request has a key (it is compared only then).
fn request_hash(headers: &HeaderMap, text: impl FnOnce() -> String) -> String {
    if headers.contains_key(IDEMPOTENCY_KEY) {
        hex::encode(Sha256::digest(text().as_bytes()))
    } else {
        String::new()
    }
}

/// What to do once composed: `publish_at` schedules, `send` queues now, neither keeps a draft.
/// A `publish_at` in the past is refused by the Compose itself (422), not here: a retry under
/// an `Idempotency-Key` must still find its message once that time has passed.
fn dispatch(publish_at: Option<DateTime<Utc>>, send: bool) -> Result<Dispatch, ApiError> {
    match (publish_at, send) {
        (Some(_), true) => Err(ApiError::field(
            "publish_at",
            "give either publish_at (send later) or send: true (send now), not both",
        )),
        (Some(at), false) => Ok(Dispatch::At(at)),
        (None, true) => Ok(Dispatch::Now),
        (None, false) => Ok(Dispatch::Draft),
    }
}

/// Builds the message with the service channel's builder and composes it, under the request's
/// `Idempotency-Key` when it has one.
async fn compose_for(
    state: &AppState,
    service: &Service,
    input: MessageInput,
    dispatch: Dispatch,
    headers: &HeaderMap,
    request_hash: &str,
) -> Result<(StatusCode, ApiJson<Value>), ApiError> {
    let service_ref = ServiceRef::from(service);
    let message = build_message(&service_ref, input)?;
    let now = crate::clock::now();
    let mut id = MessageId::from_uuid(uuid::Uuid::now_v7());
    // Whether this request made the key's claim (a retry under it did not).
    let mut claimed = false;
    let idempotency_key = headers
        .get(IDEMPOTENCY_KEY)
        .map(|v| v.to_str().map(str::trim))
        .transpose()
        .map_err(|_| ApiError::field("Idempotency-Key", "must be visible ASCII"))?;
    if let Some(key) = idempotency_key {
        if key.is_empty() || key.len() > 255 {
            return Err(ApiError::field(
                "Idempotency-Key",
                "must be 1 to 255 characters",
            ));
        }
        match state
            .store
            .claim_idempotency_key(key, request_hash, id)
            .await?
        {
            IdempotencyClaim::Claimed => claimed = true,
            IdempotencyClaim::Existing {
                id: existing,
                request_hash: hash,
            } if hash == request_hash => {
                // A retry: the message the key made, as it stands now. Looked up before any
                // Compose, whose checks depend on the time (its `publish_at` may have passed
                // since) and which on PostgreSQL decides without reading the message first.
                if let Some((message, _)) = state.store.message(existing).await? {
                    let view = view_of(existing, &message)?;
                    return Ok((StatusCode::CREATED, ApiJson(view)));
                }
                // The first request claimed the key but composed nothing: compose it now.
                id = existing
            }
            IdempotencyClaim::Existing { .. } => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different request body; use a new key",
                ))
            }
        }
    }
    let command = MessageCommand::Compose(Compose {
        id,
        message,
        dispatch,
        now,
    });
    // Refused (a `publish_at` already past): nothing was composed under the key, so the
    // request that claimed it gives it back, and the corrected request may use it (not "used
    // with another body"). Not a retry under it: the first request may have composed the
    // message meanwhile, at a time when its `publish_at` was still ahead (the store keeps a
    // key whose message exists, in any case). The command and the giving back run on a task of
    // their own: a client gone meanwhile (this handler dropped, the command still decided by
    // its writer) would otherwise leave the key held by a message that never was, and the
    // corrected request refused as "used with another body" for ever.
    let (executed, released) = match (idempotency_key, claimed) {
        (Some(key), true) => {
            let (store, key, compose) = (state.store.clone(), key.to_string(), command.clone());
            tokio::spawn(async move {
                let executed = store.execute(id, compose).await;
                let released = match &executed {
                    Err(CommandError::Rejected(e)) if *e != MessageError::AlreadyExists => {
                        store.release_idempotency_key(&key, id).await
                    }
                    _ => Ok(()),
                };
                (executed, released)
            })
            .await
            .map_err(ApiError::internal)?
        }
        _ => (state.store.execute(id, command.clone()).await, Ok(())),
    };
    let view = match executed {
        // The aggregate is pure and a Compose succeeds only on a new message: its events are
        // the ones decided here, so the message as composed needs no read back.
        Ok(()) => composed_view(command)?,
        // A retry under the same key raced the first request, or repeats it: same message.
        Err(CommandError::Rejected(MessageError::AlreadyExists)) if idempotency_key.is_some() => {
            message_view(state, id).await?.0
        }
        Err(CommandError::Rejected(e)) => {
            released?;
            return Err(CommandError::Rejected(e).into());
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(message_id = %id, service_id = %service.id, "message composed");
    Ok((StatusCode::CREATED, ApiJson(view)))
}

/// The view of the message a Compose command creates, as its events leave it.
fn composed_view(command: MessageCommand) -> Result<Value, ApiError> {
    let mut message = Message::default();
    for event in message.decide(command)? {
        message.apply_event(event);
    }
    let data = message
        .data()
        .ok_or_else(|| ApiError::internal("a composed message has no data"))?;
    serde_json::to_value(MessageView::from(data)).map_err(ApiError::internal)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShareRequest {
    text: Option<String>,
    link: Option<String>,
    #[serde(default, deserialize_with = "time::optional")]
    publish_at: Option<DateTime<Utc>>,
    /// Email shares need recipients and a subject; posts go to the service's own profile.
    #[serde(default)]
    to: Vec<Recipient>,
    subject: Option<String>,
}

/// The front end's one-call share: built for the service's channel, then queued now or
/// scheduled.
async fn share(
    State(state): State<AppState>,
    ApiPath(service_id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, ApiJson<Value>), ApiError> {
    let request_hash = request_hash(&headers, || format!("share:{service_id}:{body}"));
    let request: ShareRequest = parse_body(body)?;
    let service = found_service(&state, &service_id).await?;
    let input = MessageInput {
        to: profiles(request.to),
        subject: request.subject,
        text: request.text,
        link: request.link,
        ..Default::default()
    };
    let dispatch = dispatch(request.publish_at, request.publish_at.is_none())?;
    compose_for(&state, &service, input, dispatch, &headers, &request_hash).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleRequest {
    #[serde(deserialize_with = "time::required")]
    publish_at: DateTime<Utc>,
}

async fn run(
    state: &AppState,
    id: &str,
    command: MessageCommand,
) -> Result<ApiJson<Value>, ApiError> {
    let id = parse_message_id(id)?;
    let action = command.action();
    // The message as this command left it: on PostgreSQL the writer's own fold, not a read.
    let message = state.store.execute_and_load(id, command).await?;
    tracing::info!(message_id = %id, action, "message command");
    Ok(ApiJson(view_of(id, &message)?))
}

async fn schedule(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<ScheduleRequest>,
) -> Result<ApiJson<Value>, ApiError> {
    let command = MessageCommand::Schedule {
        publish_at: body.publish_at,
        now: crate::clock::now(),
    };
    run(&state, &id, command).await
}

async fn send(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Value>, ApiError> {
    let command = MessageCommand::Send {
        now: crate::clock::now(),
        expected_publish_at: None,
    };
    run(&state, &id, command).await
}

async fn cancel(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Value>, ApiError> {
    run(
        &state,
        &id,
        MessageCommand::Cancel {
            now: crate::clock::now(),
        },
    )
    .await
}

/// The longest provider id `resolve` takes: X's and Facebook's ids are a few dozen characters.
const MOST_PROVIDER_ID: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveRequest {
    /// Whether the post was published after all (check the account on X or Facebook).
    posted: bool,
    provider_message_id: Option<String>,
    /// When not posted: send it again (the default), or give it up (`false`: failed).
    #[serde(default = "send_again_by_default")]
    send_again: bool,
}

fn send_again_by_default() -> bool {
    true
}

/// Settles an unknown send outcome: `posted: true` records it as sent, `posted: false` sends
/// it again, or with `send_again: false` gives it up (failed). A post recorded as published
/// is given the replies to it that were kept as unmatched (or still wait for it); the same
/// `posted: true` with the same id again answers as the first did, and gives them again (for
/// when that step failed after the outcome was recorded).
async fn resolve(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<ResolveRequest>,
) -> Result<ApiJson<Value>, ApiError> {
    let id = parse_message_id(&id)?;
    let provider_message_id = body.provider_message_id.filter(|p| !p.trim().is_empty());
    if let Some(p) = &provider_message_id {
        if p.len() > MOST_PROVIDER_ID || p.chars().any(char::is_control) {
            return Err(ApiError::field(
                "provider_message_id",
                format!(
                    "the provider's id of the post (at most {MOST_PROVIDER_ID} bytes, no control characters)"
                ),
            ));
        }
    }
    // Replies to a post are matched by its id, as the provider writes it in their webhooks:
    // without it, or in another form, none ever would be.
    let social = if body.posted {
        state
            .store
            .load_message(id)
            .await?
            .and_then(|m| m.data().map(|d| d.channel))
            .filter(|c| matches!(c, Channel::Twitter | Channel::Facebook))
    } else {
        None
    };
    if let Some(channel) = social {
        let (post, form) = match channel {
            Channel::Facebook => ("a Facebook post", "its Graph API id, `<page-id>_<post-id>`"),
            _ => ("an X post", "its id, the number at the end of its URL"),
        };
        let well_formed = provider_message_id.as_deref().is_some_and(|p| {
            let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
            match channel {
                Channel::Facebook => p
                    .split_once('_')
                    .is_some_and(|(a, b)| digits(a) && digits(b)),
                _ => digits(p),
            }
        });
        if !well_formed {
            return Err(ApiError::field(
                "provider_message_id",
                format!("required when {post} was published: {form}; replies are matched by it"),
            ));
        }
    }
    let command = MessageCommand::ResolveSendOutcome {
        posted: body.posted,
        provider_message_id: provider_message_id.clone(),
        send_again: body.send_again,
        at: crate::clock::now(),
    };
    let message = match state.store.execute_and_load(id, command).await {
        Ok(message) => message,
        // The same resolution again (its answer was lost, or its replies were not given):
        // answered as the first was.
        Err(CommandError::Rejected(e @ MessageError::InvalidTransition { .. })) => {
            let again = match (&provider_message_id, social) {
                (Some(post), Some(_)) => state.store.load_message(id).await?.filter(|m| {
                    m.data().is_some_and(|d| {
                        d.sent_at.is_some() && d.provider_message_id.as_ref() == Some(post)
                    })
                }),
                _ => None,
            };
            again.ok_or(ApiError::from(CommandError::Rejected(e)))?
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(message_id = %id, action = "resolve the send outcome of", "message command");
    if let (Some(channel), Some(post)) = (social, &provider_message_id) {
        // The outcome is recorded whatever happens here: a failure is logged, and the same
        // request again gives the replies again.
        match state.store.rematch_replies(channel, post, id).await {
            Ok(0) => {}
            Ok(replies) => {
                tracing::info!(message_id = %id, replies, "unmatched replies given to the resolved post")
            }
            Err(error) => {
                tracing::error!(message_id = %id, %error, "replies to the resolved post not given to it; resolve it again the same way")
            }
        }
    }
    Ok(ApiJson(view_of(id, &message)?))
}

async fn show(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Value>, ApiError> {
    let (mut view, history) = message_view(&state, parse_message_id(&id)?).await?;
    if let Some(obj) = view.as_object_mut() {
        obj.insert("history".into(), history);
    }
    Ok(ApiJson(view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    after: Option<String>,
    limit: Option<String>,
}

/// A page's `limit`: `default` when not given, else 1 to `max`.
fn page_limit(raw: Option<&str>, default: i64, max: i64) -> Result<i64, ApiError> {
    match raw {
        None => Ok(default),
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| ApiError::field("limit", format!("must be 1 to {max}"))),
    }
}

const DEFAULT_HISTORY_PAGE: i64 = 100;
const MAX_HISTORY_PAGE: i64 = 1000;

/// `GET /v1/messages/{id}/history`: the message's history a page at a time (an email opened
/// and clicked by thousands gathers thousands of events, all of which the detail returns).
async fn show_history(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<ApiJson<Value>, ApiError> {
    let id = parse_message_id(&id)?;
    let after = match q.after.as_deref() {
        None => 0,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::field("after", "must be a sequence number, 0 or more"))?,
    };
    let limit = page_limit(q.limit.as_deref(), DEFAULT_HISTORY_PAGE, MAX_HISTORY_PAGE)?;
    let items = state
        .store
        .message_history(id, after, limit)
        .await?
        .ok_or_else(|| ApiError::from(MessageError::NotFound))?;
    // A full page may have more after it; a short one is the end.
    let next = if items.len() as i64 == limit {
        items.last().map(|item| item.sequence)
    } else {
        None
    };
    Ok(ApiJson(json!({"items": items, "next": next})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    service_id: Option<String>,
    channel: Option<String>,
    state: Option<String>,
    direction: Option<String>,
    profile: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;

async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<ApiJson<Value>, ApiError> {
    let limit = page_limit(q.limit.as_deref(), DEFAULT_PAGE, MAX_PAGE)?;
    let filter = ListFilter {
        service_id: q
            .service_id
            .as_deref()
            .map(|s| {
                s.parse()
                    .map_err(|_| ApiError::field("service_id", "is not a service id"))
            })
            .transpose()?,
        channel: q
            .channel
            .as_deref()
            .map(|c| {
                Channel::parse(c).ok_or_else(|| {
                    ApiError::field("channel", "must be one of email, twitter, facebook")
                })
            })
            .transpose()?,
        state: q
            .state
            .map(|s| {
                MessageState::parse(&s)
                    .map(|st| st.as_str().to_string())
                    .ok_or_else(|| ApiError::field("state", super::not_a_state(&s)))
            })
            .transpose()?,
        direction: q
            .direction
            .map(|d| {
                Direction::parse(&d)
                    .map(|d| d.as_str().to_string())
                    .ok_or_else(|| ApiError::field("direction", "must be outbound or inbound"))
            })
            .transpose()?,
        // An X handle may be asked for with its `@`; it is stored without.
        profile: q
            .profile
            .map(|p| p.trim().trim_start_matches('@').to_string())
            .filter(|p| !p.is_empty()),
        before: q
            .cursor
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(|c| {
                c.parse::<MessageId>()
                    .map_err(|_| ApiError::field("cursor", "is not a cursor from a previous page"))
            })
            .transpose()?,
        limit: limit + 1,
    };
    let mut messages = state.store.list_messages(&filter).await?;
    let more = messages.len() as i64 > limit;
    messages.truncate(limit as usize);
    let items: Vec<MessageView> = messages
        .iter()
        .filter_map(|m| m.data().map(MessageView::from))
        .collect();
    let next_cursor = if more {
        items.last().map(|v| v.id.clone())
    } else {
        None
    };
    Ok(ApiJson(json!({"items": items, "next_cursor": next_cursor})))
}
