//! X Account Activity and Facebook Page webhooks: challenges answered as documented, deliveries
//! verified over the raw body, and replies to our posts recorded.

use super::inbox::{FactKind, InboxFact, Payload, Problem};
use super::sendgrid::malformed;
use super::verify::{verify_facebook_signature, verify_x_signature, x_crc_response};
use super::{constant_time_eq, WebhookError, WebhookState};
use crate::store::{Store, StoreError};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, TimeZone, Utc};
use messaging_domain::Channel;
use serde::Deserialize;
use serde_json::{json, Value};

/// The longest `crc_token` answered: X's are a few dozen characters.
const MOST_CRC_TOKEN: usize = 256;

#[derive(Deserialize)]
pub struct CrcQuery {
    crc_token: Option<String>,
}

/// `GET /webhooks/twitter?crc_token=...`: X's challenge-response check.
pub async fn x_crc(
    State(state): State<WebhookState>,
    super::WebhookQuery(q): super::WebhookQuery<CrcQuery>,
) -> Result<Json<Value>, WebhookError> {
    let secret = state
        .secrets
        .x_consumer_secret
        .as_ref()
        .ok_or(WebhookError::NotConfigured("MESSAGING_X_CONSUMER_SECRET"))?;
    let token = q
        .crc_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| WebhookError::Malformed("crc_token is required".into()))?;
    // The answer is the same HMAC, with the same key, that signs a delivery's body: answering a
    // token that is itself a delivery would sign a forged one for anyone who asks. X's tokens
    // are short random strings; a JSON document is refused, and so is anything long.
    if token.len() > MOST_CRC_TOKEN
        || serde_json::from_str::<Value>(&token).is_ok_and(|v| v.is_object() || v.is_array())
    {
        return Err(WebhookError::Malformed(format!(
            "crc_token must be X's challenge token (at most {MOST_CRC_TOKEN} characters, not a JSON document)"
        )));
    }
    Ok(Json(
        json!({"response_token": x_crc_response(secret.expose(), &token)}),
    ))
}

/// Our sent post with this provider id on this channel, if any.
async fn our_post(
    store: &dyn Store,
    channel: Channel,
    provider_id: &str,
) -> Result<Option<uuid::Uuid>, StoreError> {
    // No post of ours has such an id (theirs are digits and underscores), and the database's
    // text could not even hold it for the lookup.
    if provider_id.contains('\0') {
        return Ok(None);
    }
    let id = store.outbound_message_id(channel, provider_id).await?;
    Ok(id.map(|id| id.as_uuid()))
}

/// A reply. `payload` names the post it answers (`answered_post`, on `channel`) when it
/// answers one: if that post is not ours as far as the message list knows yet, the fact waits
/// for it (the inbox lease looks it up), since the list may be behind the log. A reply that
/// answers no post is unmatched at once.
fn reply_fact(
    provider: &'static str,
    event_id: String,
    message_id: Option<uuid::Uuid>,
    occurred_at: DateTime<Utc>,
    payload: Value,
) -> InboxFact {
    let answers_a_post = payload.get("answered_post").is_some_and(Value::is_string);
    InboxFact {
        provider,
        event_id,
        message_id,
        kind: FactKind::Reply,
        occurred_at,
        payload: Payload::from_value(&payload),
        problem: (message_id.is_none() && !answers_a_post).then_some(Problem::Unmatched),
    }
}

/// The two signed social deliveries: same shape, their own secret, header and payload.
#[derive(Clone, Copy)]
enum Social {
    X,
    Facebook,
}

/// Verifies a signed delivery over its raw bytes, turns it into facts and records them.
async fn social_delivery(
    state: WebhookState,
    headers: HeaderMap,
    body: Bytes,
    social: Social,
) -> Result<(StatusCode, Json<Value>), WebhookError> {
    let (secret, setting, header, verify, provider): (_, _, _, VerifyFn, _) = match social {
        Social::X => (
            &state.secrets.x_consumer_secret,
            "MESSAGING_X_CONSUMER_SECRET",
            "x-twitter-webhooks-signature",
            verify_x_signature,
            "x",
        ),
        Social::Facebook => (
            &state.secrets.facebook_app_secret,
            "MESSAGING_FACEBOOK_APP_SECRET",
            "x-hub-signature-256",
            verify_facebook_signature,
            "facebook",
        ),
    };
    let secret = secret
        .as_ref()
        .ok_or(WebhookError::NotConfigured(setting))?;
    let signature = headers
        .get(header)
        .and_then(|v| v.to_str().ok())
        .ok_or(WebhookError::MissingSignature)?;
    verify(secret.expose(), &body, signature).map_err(|_| WebhookError::BadSignature)?;
    let facts = match (serde_json::from_slice::<Value>(&body), social) {
        // X signs with the key its CRC challenge uses, whose answer anyone can ask for: of a
        // body that could be a challenge token (anything but a JSON object: X's deliveries
        // always are one), a valid signature proves nothing. Refused, not kept.
        (delivery, Social::X) if !delivery.as_ref().is_ok_and(Value::is_object) => {
            return Err(WebhookError::Malformed(
                "an Account Activity delivery is a JSON object".into(),
            ))
        }
        (Ok(delivery), Social::X) => x_facts(state.store.as_ref(), &delivery).await?,
        (Ok(delivery), Social::Facebook) => facebook_facts(state.store.as_ref(), &delivery).await?,
        (Err(e), _) => vec![malformed(provider, &body, &format!("not JSON: {e}"))],
    };
    super::recorded(state.store.as_ref(), &facts).await
}

type VerifyFn = fn(&str, &[u8], &str) -> Result<(), super::verify::VerifyError>;

/// `POST /webhooks/twitter`: `tweet_create_events` that answer one of our sent posts.
pub async fn x_events(
    State(state): State<WebhookState>,
    headers: HeaderMap,
    super::Body(body): super::Body,
) -> Result<(StatusCode, Json<Value>), WebhookError> {
    social_delivery(state, headers, body, Social::X).await
}

/// An X delivery's activity other than new tweets (likes, follows, deletions, direct
/// messages: the Account Activity API sends each as a `*_events` array), or a delivery in a
/// shape not known here: kept for inspection as unmatched (or malformed), not applied, as
/// Facebook's other page activity is. Never dropped silently.
fn x_other_activity(delivery: &Value) -> Vec<InboxFact> {
    // Kept under its kind (`{"favorite_events": {...}}`), so the inbox says what it was.
    let kept = |kind: &str, item: &Value| {
        let payload = json!({ kind: item });
        let mut fact = malformed("x", payload.to_string().as_bytes(), "");
        fact.problem = Some(Problem::Unmatched);
        fact.payload = Payload::from_value(&payload);
        fact
    };
    let Some(fields) = delivery.as_object() else {
        return vec![malformed(
            "x",
            delivery.to_string().as_bytes(),
            "not a JSON object",
        )];
    };
    let mut facts = Vec::new();
    for (key, value) in fields {
        match (key.as_str(), value) {
            ("tweet_create_events", Value::Array(_)) => {}
            // Fleeting signals, many per conversation, with nothing to inspect later.
            (
                "direct_message_indicate_typing_events" | "direct_message_mark_read_events",
                Value::Array(_),
            ) => {}
            (key, Value::Array(items)) if key.ends_with("_events") => {
                facts.extend(items.iter().map(|item| kept(key, item)));
            }
            (key, _) if key.ends_with("_events") => facts.push(malformed(
                "x",
                delivery.to_string().as_bytes(),
                &format!("`{key}` is not an array"),
            )),
            _ => {}
        }
    }
    let known = ["for_user_id", "user_has_blocked", "users", "apps", "source"];
    let has_events = fields.keys().any(|k| k.ends_with("_events"));
    if facts.is_empty() && !has_events && fields.keys().any(|k| !known.contains(&k.as_str())) {
        facts.push(kept("delivery", delivery));
    }
    facts
}

async fn x_facts(store: &dyn Store, delivery: &Value) -> Result<Vec<InboxFact>, StoreError> {
    let ours = delivery.get("for_user_id").and_then(Value::as_str);
    let mut facts = x_other_activity(delivery);
    for tweet in delivery
        .get("tweet_create_events")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let s = |k: &str| tweet.get(k).and_then(Value::as_str);
        let user = |k: &str| {
            tweet
                .get("user")
                .and_then(|u| u.get(k))
                .and_then(Value::as_str)
        };
        let Some(id) = s("id_str") else {
            facts.push(malformed(
                "x",
                tweet.to_string().as_bytes(),
                "a tweet without id_str",
            ));
            continue;
        };
        // Our own posts come back too: they are not replies to record.
        if user("id_str").is_some() && user("id_str") == ours {
            continue;
        }
        let message_id = match s("in_reply_to_status_id_str") {
            Some(answered) => our_post(store, Channel::Twitter, answered).await?,
            None => None,
        };
        let occurred_at = s("created_at")
            .and_then(|t| DateTime::parse_from_str(t, "%a %b %d %H:%M:%S %z %Y").ok())
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(crate::clock::now);
        facts.push(reply_fact(
            "x",
            format!("tweet:{id}"),
            message_id,
            occurred_at,
            json!({
                "from_username": user("screen_name"),
                "from_name": user("name"),
                "text": s("text"),
                "provider_message_id": id,
                "in_reply_to": s("in_reply_to_status_id_str"),
                "answered_post": s("in_reply_to_status_id_str"),
                "channel": Channel::Twitter.as_str(),
            }),
        ));
    }
    Ok(facts)
}

#[derive(Deserialize)]
pub struct HubQuery {
    #[serde(rename = "hub.mode")]
    mode: Option<String>,
    #[serde(rename = "hub.verify_token")]
    verify_token: Option<String>,
    #[serde(rename = "hub.challenge")]
    challenge: Option<String>,
}

/// `GET /webhooks/facebook`: echoes `hub.challenge` when the verify token is ours.
pub async fn facebook_challenge(
    State(state): State<WebhookState>,
    super::WebhookQuery(q): super::WebhookQuery<HubQuery>,
) -> Result<Response, WebhookError> {
    let expected =
        state
            .secrets
            .facebook_verify_token
            .as_ref()
            .ok_or(WebhookError::NotConfigured(
                "MESSAGING_FACEBOOK_VERIFY_TOKEN",
            ))?;
    let token_ok = q
        .verify_token
        .as_deref()
        .is_some_and(|t| constant_time_eq(t.as_bytes(), expected.expose().as_bytes()));
    match (q.mode.as_deref(), token_ok, q.challenge) {
        (Some("subscribe"), true, Some(challenge)) => {
            Ok((StatusCode::OK, challenge).into_response())
        }
        _ => Err(WebhookError::BadSignature),
    }
}

/// `POST /webhooks/facebook`: comments added on our page posts.
pub async fn facebook_events(
    State(state): State<WebhookState>,
    headers: HeaderMap,
    super::Body(body): super::Body,
) -> Result<(StatusCode, Json<Value>), WebhookError> {
    social_delivery(state, headers, body, Social::Facebook).await
}

async fn facebook_facts(store: &dyn Store, delivery: &Value) -> Result<Vec<InboxFact>, StoreError> {
    let mut facts = Vec::new();
    // Each change with the id of the page it happened on (the entry's `id`).
    let mut changes: Vec<(Option<&str>, &Value)> = Vec::new();
    for entry in delivery
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let page = entry.get("id").and_then(Value::as_str);
        for change in entry
            .get("changes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            changes.push((page, change));
        }
    }
    for (page, change) in changes {
        let value = change.get("value").cloned().unwrap_or(Value::Null);
        // The page answering on its own post comes back too: not a reply to record.
        let author = value
            .get("from")
            .and_then(|f| f.get("id"))
            .and_then(Value::as_str);
        if page.is_some() && author == page {
            continue;
        }
        let s = |k: &str| value.get(k).and_then(Value::as_str);
        let is_new_comment = change.get("field").and_then(Value::as_str) == Some("feed")
            && s("item") == Some("comment")
            && s("verb") == Some("add");
        let (true, Some(comment_id)) = (is_new_comment, s("comment_id")) else {
            // Other page activity is kept for inspection, not applied.
            let raw = change.to_string();
            let mut fact = malformed("facebook", raw.as_bytes(), "not a new comment");
            fact.problem = Some(Problem::Unmatched);
            fact.payload = Payload::from_value(change);
            facts.push(fact);
            continue;
        };
        // A comment answering a comment names it as its parent (a top-level comment names
        // the post): the reply is to that comment when it is one of ours (the page answered
        // someone, and they answered back), else to the post.
        let parent = s("parent_id").filter(|p| Some(*p) != s("post_id"));
        let mut message_id = None;
        let mut answered = s("post_id");
        if let Some(parent) = parent {
            message_id = our_post(store, Channel::Facebook, parent).await?;
            if message_id.is_some() {
                answered = Some(parent);
            }
        }
        if message_id.is_none() {
            if let Some(post) = s("post_id") {
                message_id = our_post(store, Channel::Facebook, post).await?;
            }
        }
        let occurred_at = value
            .get("created_time")
            .and_then(Value::as_i64)
            .and_then(|t| Utc.timestamp_opt(t, 0).single())
            .unwrap_or_else(crate::clock::now);
        let from = |k: &str| {
            value
                .get("from")
                .and_then(|f| f.get(k))
                .and_then(Value::as_str)
        };
        facts.push(reply_fact(
            "facebook",
            format!("comment:{comment_id}"),
            message_id,
            occurred_at,
            json!({
                "from_username": from("id"),
                "from_name": from("name"),
                "text": s("message"),
                "provider_message_id": comment_id,
                "post_id": s("post_id"),
                "answered_post": answered,
                "channel": Channel::Facebook.as_str(),
            }),
        ));
    }
    Ok(facts)
}
