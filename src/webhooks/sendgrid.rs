//! SendGrid: the Event Webhook (signed batches of delivery, engagement and compliance events)
//! and Inbound Parse (replies, as multipart forms).

use super::inbox::{FactKind, InboxFact, Payload, Problem};
use super::{WebhookError, WebhookState};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use chrono::{DateTime, TimeZone, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const SIGNATURE: &str = "x-twilio-email-event-webhook-signature";
const TIMESTAMP: &str = "x-twilio-email-event-webhook-timestamp";

/// `POST /webhooks/sendgrid/events`: verified over the raw bytes before anything is parsed;
/// answered 2xx only once every event of the batch is durably in the inbox.
pub async fn events(
    State(state): State<WebhookState>,
    headers: HeaderMap,
    super::Body(body): super::Body,
) -> Result<(StatusCode, Json<Value>), WebhookError> {
    let verifier = state
        .secrets
        .sendgrid_verifier
        .as_ref()
        .ok_or(WebhookError::NotConfigured(
            "MESSAGING_SENDGRID_WEBHOOK_PUBLIC_KEY",
        ))?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(signature), Some(timestamp)) = (header(SIGNATURE), header(TIMESTAMP)) else {
        return Err(WebhookError::MissingSignature);
    };
    verifier
        .verify(timestamp, &body, signature)
        .map_err(|_| WebhookError::BadSignature)?;
    let facts = parse_events(&body);
    tracing::info!(events = facts.len(), "sendgrid events received");
    super::recorded(state.store.as_ref(), &facts).await
}

fn body_fingerprint(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A fact that could not be read: kept whole, with what was wrong.
pub fn malformed(provider: &'static str, raw: &[u8], error: &str) -> InboxFact {
    InboxFact {
        provider,
        event_id: format!("malformed:{}", body_fingerprint(raw)),
        message_id: None,
        kind: FactKind::Other,
        occurred_at: crate::clock::now(),
        payload: Payload::from_value(
            &json!({"_raw": String::from_utf8_lossy(raw), "_error": error}),
        ),
        problem: Some(Problem::Malformed),
    }
}

/// Reads a batch. Never fails as a whole: what cannot be read is kept as malformed, so one
/// bad event never costs the others. Each event's payload is its own text from the batch.
pub fn parse_events(body: &[u8]) -> Vec<InboxFact> {
    // The batch split into its events' texts, each read on its own below.
    let events = match serde_json::from_slice::<Vec<&RawValue>>(body) {
        Ok(events) => events,
        Err(split) => {
            let error = match serde_json::from_slice::<Value>(body) {
                Ok(v) if !v.is_array() => "the body is not a JSON array of events".to_string(),
                Ok(_) => format!("not JSON: {split}"),
                Err(e) => format!("not JSON: {e}"),
            };
            return vec![malformed("sendgrid", body, &error)];
        }
    };
    events.into_iter().map(parse_event).collect()
}

/// Whether the value holds a number that is not an integer (a fraction, an exponent, or too
/// large for 64 bits).
fn has_float(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}

/// One event, read as a value (which checks what splitting the batch does not: a lone
/// surrogate escape, a number out of range, nesting too deep; PostgreSQL refuses some of these,
/// and the applier reads the payload back as a value), and kept as its own text: stored as it
/// came, neither copied nor written out again. An event with a number that is not an integer
/// is stored as read instead: its text may write one that `jsonb`'s `numeric` cannot hold
/// (`1e-16384`, or 16384 digits after the point, which the value reads as 0 and 1), and
/// PostgreSQL would refuse the whole batch.
fn parse_event(raw: &RawValue) -> InboxFact {
    let event = match serde_json::from_str::<Value>(raw.get()) {
        Ok(event) => event,
        Err(e) => return malformed("sendgrid", raw.get().as_bytes(), &format!("not JSON: {e}")),
    };
    let (Some(kind), Some(event_id), Some(timestamp)) = (
        event.get("event").and_then(Value::as_str),
        event.get("sg_event_id").and_then(Value::as_str),
        event.get("timestamp").and_then(Value::as_i64),
    ) else {
        return malformed(
            "sendgrid",
            raw.get().as_bytes(),
            "an event needs `event`, `sg_event_id` and a numeric `timestamp`",
        );
    };
    let Some(occurred_at) = Utc.timestamp_opt(timestamp, 0).single() else {
        return malformed(
            "sendgrid",
            raw.get().as_bytes(),
            "`timestamp` is out of range",
        );
    };
    let kind = match kind {
        "processed" => FactKind::Processed,
        "deferred" => FactKind::Deferred,
        "delivered" => FactKind::Delivered,
        // `type` says bounce or blocked; both end delivery.
        "bounce" => FactKind::Bounced,
        "dropped" => FactKind::Dropped,
        "open" => FactKind::Open,
        "click" => FactKind::Click,
        "spamreport" => FactKind::SpamReport,
        "unsubscribe" | "group_unsubscribe" => FactKind::Unsubscribe,
        _ => FactKind::Other,
    };
    // Our id, sent as a custom arg, comes back as a top-level field.
    let message_id = event
        .get("message_id")
        .and_then(Value::as_str)
        .and_then(|s| uuid::Uuid::parse_str(s).ok());
    let problem = (kind == FactKind::Other || message_id.is_none()).then_some(Problem::Unmatched);
    InboxFact {
        provider: "sendgrid",
        event_id: event_id.to_string(),
        message_id,
        kind,
        occurred_at,
        payload: if has_float(&event) {
            Payload::from_value(&event)
        } else {
            Payload::raw(raw.to_owned())
        },
        problem,
    }
}

#[derive(Deserialize)]
pub struct InboundQuery {
    token: Option<String>,
}

/// `POST /webhooks/sendgrid/inbound`: Inbound Parse posts each received email as a multipart
/// form, parsed (`headers`, `text`, `html`, ...) or raw (`email`). With a security policy's
/// signature (`MESSAGING_SENDGRID_INBOUND_PUBLIC_KEY`), the whole form is read and verified as
/// the Event Webhook's batches are (ECDSA P-256 over timestamp + raw body) before it is parsed;
/// with `MESSAGING_SENDGRID_INBOUND_TOKEN`, the URL's `?token=` must be it. Either, both, or
/// (with a warning at start-up) neither.
pub async fn inbound(
    State(state): State<WebhookState>,
    super::WebhookQuery(query): super::WebhookQuery<InboundQuery>,
    request: axum::extract::Request,
) -> Result<(StatusCode, Json<Value>), WebhookError> {
    if let Some(expected) = &state.secrets.sendgrid_inbound_token {
        let given = query.token.unwrap_or_default();
        if !super::constant_time_eq(given.as_bytes(), expected.expose().as_bytes()) {
            return Err(WebhookError::BadSignature);
        }
    }
    let request = match &state.secrets.sendgrid_inbound_verifier {
        Some(verifier) => verified(verifier, request).await?,
        None => request,
    };
    let super::Form(mut form) =
        <super::Form as axum::extract::FromRequest<()>>::from_request(request, &()).await?;
    let mut raw = std::collections::HashMap::new();
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        let Some(name) = field.name().map(str::to_string) else {
            continue;
        };
        // Attachments are not kept; the text fields are.
        if field.file_name().is_some() {
            continue;
        }
        let value = field.bytes().await.map_err(multipart_error)?;
        raw.insert(name, value.to_vec());
    }
    let email = raw.remove("email");
    let mut fields = decode_fields(raw);
    if let Some(email) = email {
        fill_from_raw_email(&mut fields, &email);
    }
    let answered = answered_message(state.store.as_ref(), fields.get("headers")).await?;
    let fact = parse_inbound(&fields, crate::clock::now(), answered);
    tracing::info!(matched = fact.problem.is_none(), "inbound email received");
    super::recorded(state.store.as_ref(), std::slice::from_ref(&fact)).await
}

/// Inbound Parse's raw mode ("POST the raw, full MIME message") posts the email as it came,
/// in `email`, instead of its `headers`, `text` and `html`: those are taken from it (decoded
/// from their transfer encodings and charsets), and `subject` and `from` where the form has
/// none. A field the form has is kept.
fn fill_from_raw_email(fields: &mut std::collections::HashMap<String, String>, email: &[u8]) {
    let header_end = [&b"\r\n\r\n"[..], b"\n\n"]
        .iter()
        .filter_map(|blank| email.windows(blank.len()).position(|w| w == *blank))
        .min()
        .unwrap_or(email.len());
    fields
        .entry("headers".into())
        .or_insert_with(|| String::from_utf8_lossy(&email[..header_end]).into_owned());
    let Some(parsed) = mail_parser::MessageParser::default().parse(email) else {
        return;
    };
    let mut fill = |name: &str, value: Option<String>| {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            fields.entry(name.into()).or_insert(value);
        }
    };
    fill("subject", parsed.subject().map(str::to_string));
    let from = parsed.from().and_then(|from| from.first());
    fill(
        "from",
        from.and_then(|a| {
            let address = a.address()?;
            Some(match a.name() {
                Some(name) => format!("{name} <{address}>"),
                None => address.to_string(),
            })
        }),
    );
    // An html-only email's text is its html as text (better than the markup itself).
    fill("text", parsed.body_text(0).map(|t| t.into_owned()));
    fill("html", parsed.body_html(0).map(|t| t.into_owned()));
}

/// The form's fields as text, each in the charset SendGrid names for it in the `charsets`
/// field (`{"text": "iso-8859-1", "subject": "UTF-8", ...}`: the email's own charsets, which
/// SendGrid passes on unconverted); UTF-8 where it names none or one we do not know.
pub fn decode_fields(
    raw: std::collections::HashMap<String, Vec<u8>>,
) -> std::collections::HashMap<String, String> {
    let charsets: std::collections::HashMap<String, String> = raw
        .get("charsets")
        .and_then(|c| serde_json::from_slice(c).ok())
        .unwrap_or_default();
    raw.into_iter()
        .map(|(name, bytes)| {
            let encoding = charsets
                .get(&name)
                .and_then(|label| encoding_rs::Encoding::for_label(label.trim().as_bytes()))
                .unwrap_or(encoding_rs::UTF_8);
            let (text, _, _) = encoding.decode(&bytes);
            (name, text.into_owned())
        })
        .collect()
}

/// The request, its body read whole (within [`super::INBOUND_BODY_LIMIT`]) and its signature
/// checked over it, given back to be parsed.
async fn verified(
    verifier: &super::verify::SendgridVerifier,
    request: axum::extract::Request,
) -> Result<axum::extract::Request, WebhookError> {
    use http_body_util::BodyExt;
    let (parts, body) = request.into_parts();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(signature), Some(timestamp)) = (header(SIGNATURE), header(TIMESTAMP)) else {
        return Err(WebhookError::MissingSignature);
    };
    let too_large = || {
        WebhookError::TooLarge(format!(
            "the form is larger than {} MB",
            super::INBOUND_BODY_LIMIT >> 20
        ))
    };
    // Refused before a byte is read when it says so itself.
    if parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|length| length > super::INBOUND_BODY_LIMIT)
    {
        return Err(too_large());
    }
    let body = http_body_util::Limited::new(body, super::INBOUND_BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                WebhookError::Malformed(format!("the body could not be read: {e}"))
            }
        })?
        .to_bytes();
    verifier
        .verify(timestamp, &body, signature)
        .map_err(|_| WebhookError::BadSignature)?;
    Ok(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(body),
    ))
}

/// A form that could not be read: too large (413, with the limit), or not a form (400).
fn multipart_error(e: axum::extract::multipart::MultipartError) -> WebhookError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        WebhookError::TooLarge(format!(
            "the form is larger than {} MB",
            super::INBOUND_BODY_LIMIT >> 20
        ))
    } else {
        WebhookError::Malformed(format!("multipart: {}", e.body_text()))
    }
}

/// The header `name` from a raw header block, continuation lines unfolded.
fn header_value(headers: &str, name: &str) -> Option<String> {
    let unfolded = headers
        .replace("\r\n", "\n")
        .replace("\n ", " ")
        .replace("\n\t", " ");
    unfolded.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// The Message-IDs a reply's `In-Reply-To` and `References` name that could be ours, in that
/// order (the direct parent first, then the thread from its newest): ours are
/// `<{message id}@{domain}>` with a time-ordered (version 7) UUID. Mail clients make
/// Message-IDs of random (version 4) UUIDs too, so a candidate is only that.
fn candidate_messages(headers: &str) -> Vec<uuid::Uuid> {
    let ids = |h: &str| -> Vec<uuid::Uuid> {
        header_value(headers, h)
            .unwrap_or_default()
            .split(['<', '>', ' ', ',', '\t'])
            .filter_map(|id| id.split_once('@'))
            .filter_map(|(local, _)| uuid::Uuid::parse_str(local).ok())
            .filter(|id| id.get_version_num() == 7)
            .collect()
    };
    let mut candidates = ids("In-Reply-To");
    candidates.extend(ids("References").into_iter().rev());
    let mut seen = std::collections::HashSet::new();
    candidates.retain(|id| seen.insert(*id));
    // Each is a lookup: a thread's newest few are where ours is, not a header of thousands.
    candidates.truncate(MAX_CANDIDATES);
    candidates
}

/// The most Message-IDs of a reply's headers looked up (see [`candidate_messages`]).
const MAX_CANDIDATES: usize = 20;

/// The email of ours the reply answers: the first candidate (see [`candidate_messages`]) that
/// is an outbound email in the log. The log, not the message list: a message is in the log
/// from its Compose on, before any reply can name it. A reply in a thread that others joined
/// names their Message-IDs too, often first.
async fn answered_message(
    store: &dyn crate::store::Store,
    headers: Option<&String>,
) -> Result<Option<uuid::Uuid>, WebhookError> {
    for candidate in candidate_messages(headers.map(String::as_str).unwrap_or_default()) {
        let message = store
            .message(messaging_domain::MessageId::from_uuid(candidate))
            .await?;
        let ours = message
            .as_ref()
            .and_then(|(m, _)| m.data())
            .is_some_and(|d| {
                d.channel == messaging_domain::Channel::Email
                    && d.direction == messaging_domain::Direction::Outbound
            });
        if ours {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

/// `Name <address>` or a bare address.
fn parse_from(from: &str) -> (String, Option<String>) {
    match (from.rfind('<'), from.rfind('>')) {
        (Some(start), Some(end)) if start < end => {
            let name = from[..start].trim().trim_matches('"').trim();
            (
                from[start + 1..end].trim().to_string(),
                (!name.is_empty()).then(|| name.to_string()),
            )
        }
        _ => (from.trim().to_string(), None),
    }
}

/// The fact an inbound email is recorded as; `answered` is our message it replies to, if any
/// (see [`answered_message`]).
pub fn parse_inbound(
    fields: &std::collections::HashMap<String, String>,
    received_at: DateTime<Utc>,
    answered: Option<uuid::Uuid>,
) -> InboxFact {
    let headers = fields
        .get("headers")
        .map(String::as_str)
        .unwrap_or_default();
    let (from_username, from_name) =
        parse_from(fields.get("from").map(String::as_str).unwrap_or_default());
    let text = fields
        .get("text")
        .or_else(|| fields.get("html"))
        .cloned()
        .unwrap_or_default();
    let event_id = header_value(headers, "Message-ID").unwrap_or_else(|| {
        format!(
            "inbound:{}",
            body_fingerprint(format!("{headers}\n{from_username}\n{text}").as_bytes())
        )
    });
    let message_id = answered;
    InboxFact {
        provider: "sendgrid_inbound",
        event_id,
        message_id,
        kind: FactKind::Reply,
        occurred_at: received_at,
        payload: Payload::from_value(&json!({
            "from_username": from_username,
            "from_name": from_name,
            "subject": fields.get("subject"),
            "text": text,
            "provider_message_id": header_value(headers, "Message-ID"),
        })),
        problem: message_id.is_none().then_some(Problem::Unmatched),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_email_gives_the_fields_the_form_lacks() {
        let email = b"From: =?UTF-8?Q?Ren=C3=A9e_Doe?= <renee@example.net>\n\
                      Subject: =?ISO-8859-1?Q?R=E9ponse?=\n\
                      In-Reply-To: <0193b6c2-8f1e-7c3a-9d41-5a6e2f0b7c11@example.com>\n\
                      Content-Type: text/html; charset=utf-8\n\
                      \n\
                      <p>Tr\xc3\xa8s <b>bien</b></p>\n";
        let mut fields = std::collections::HashMap::from([("to".to_string(), "x".to_string())]);
        fill_from_raw_email(&mut fields, email);
        assert_eq!(fields["from"], "Renée Doe <renee@example.net>");
        assert_eq!(fields["subject"], "Réponse");
        assert!(
            fields["headers"].ends_with("charset=utf-8"),
            "{}",
            fields["headers"]
        );
        assert_eq!(
            candidate_messages(&fields["headers"]),
            ["0193b6c2-8f1e-7c3a-9d41-5a6e2f0b7c11"
                .parse::<uuid::Uuid>()
                .unwrap()]
        );
        // An html-only email's text is its html as text.
        assert_eq!(fields["text"].trim(), "Très bien");
        // A field the form has is kept.
        let mut fields =
            std::collections::HashMap::from([("subject".to_string(), "Given".to_string())]);
        fill_from_raw_email(&mut fields, email);
        assert_eq!(fields["subject"], "Given");
    }

    #[test]
    fn a_bad_event_never_costs_the_rest_of_the_batch() {
        let body = br#"[{"event":"delivered","sg_event_id":"a","timestamp":1764000005,"message_id":"0193b6c2-8f1e-7c3a-9d41-5a6e2f0b7c11"},
                        {"event":"open"},
                        {"event":"teleported","sg_event_id":"b","timestamp":1764000006}]"#;
        let facts = parse_events(body);
        assert_eq!(facts.len(), 3);
        assert_eq!(facts[0].problem, None);
        assert_eq!(facts[0].kind, FactKind::Delivered);
        assert_eq!(facts[1].problem, Some(Problem::Malformed));
        assert_eq!(facts[2].problem, Some(Problem::Unmatched));
        assert_eq!(parse_events(b"{nope").len(), 1);
    }

    #[test]
    fn an_event_is_read_as_a_value_would_read_it_and_kept_as_its_own_text() {
        let id = "0193b6c2-8f1e-7c3a-9d41-5a6e2f0b7c11";
        let body = format!(
            r#"[{{"event":"open", "sg_event_id":"a","timestamp":1764000005,"message_id":"{id}","ip":"203.0.113.7"}},
                {{"event":"open","event":"click","sg_event_id":"b","timestamp":1764000006,"message_id":"{id}"}},
                {{"event":"open","sg_event_id":"c","timestamp":1764000007,"message_id":7}},
                {{"event":"open","sg_event_id":"d","timestamp":1764000008.5,"message_id":"{id}"}},
                {{"event":"op\u0065n","sg_event_id":"e","timestamp":1764000009,"message_id":null}},
                5]"#
        );
        let facts = parse_events(body.as_bytes());
        assert_eq!(facts.len(), 6);
        // Its own text, spaces and all.
        assert_eq!(
            facts[0].payload.text(),
            format!(
                r#"{{"event":"open", "sg_event_id":"a","timestamp":1764000005,"message_id":"{id}","ip":"203.0.113.7"}}"#
            )
        );
        assert_eq!((facts[0].kind, facts[0].problem), (FactKind::Open, None));
        // A key given twice: the last, as a value reads it.
        assert_eq!((facts[1].kind, facts[1].problem), (FactKind::Click, None));
        // An id that is not text names no message; a timestamp that is not an integer cannot
        // be read.
        assert_eq!(facts[2].problem, Some(Problem::Unmatched));
        assert_eq!(facts[2].event_id, "c");
        assert_eq!(facts[3].problem, Some(Problem::Malformed));
        // Escapes are read; null is absent.
        assert_eq!(facts[4].kind, FactKind::Open);
        assert_eq!(
            (facts[4].message_id, facts[4].problem),
            (None, Some(Problem::Unmatched))
        );
        assert_eq!(facts[5].problem, Some(Problem::Malformed));
        assert_eq!(facts[5].payload.value()["_raw"], "5");
    }

    #[test]
    fn an_event_a_value_cannot_hold_is_kept_as_malformed_alone() {
        let facts = parse_events(
            br#"[{"event":"open","sg_event_id":"a","timestamp":1,"ua":"\ud83d\udce7"},
                 {"event":"open","sg_event_id":"b","timestamp":1,"ua":"\ud83d"},
                 {"event":"open","sg_event_id":"c","timestamp":1,"n":1e400},
                 {"event":"open","sg_event_id":"d","timestamp":1}]"#,
        );
        assert_eq!(facts.len(), 4);
        assert_eq!(facts[0].payload.value()["ua"], "\u{1f4e7}");
        assert_eq!(facts[0].problem, Some(Problem::Unmatched));
        for bad in &facts[1..3] {
            assert_eq!(bad.problem, Some(Problem::Malformed));
            assert!(bad.payload.value()["_error"]
                .as_str()
                .unwrap()
                .starts_with("not JSON"));
        }
        assert_eq!(facts[3].event_id, "d");
    }

    #[test]
    fn candidates_are_time_ordered_ids_parent_first_then_the_thread_newest_first() {
        let ours = "0193b6c2-8f1e-7c3a-9d41-5a6e2f0b7c11";
        let older = "0193b6c2-0000-7c3a-9d41-5a6e2f0b7c11";
        // A mail client's Message-ID: a random (version 4) UUID.
        let theirs = "5f0c6a52-9d2b-4e61-a3c7-0d8b7e9f1a24";
        let headers = format!(
            "Message-ID: <reply-1@mail.example.net>\r\nIn-Reply-To: <{theirs}@her.org>\r\n\
             References: <{older}@example.com> <other@x.org>\r\n <{ours}@example.com>\r\n\t<{theirs}@her.org>\r\n\
             Subject: Re: Hello"
        );
        let found: Vec<String> = candidate_messages(&headers)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(found, vec![ours.to_string(), older.to_string()]);
    }

    #[test]
    fn each_field_is_read_in_the_charset_sendgrid_names_for_it() {
        let raw = std::collections::HashMap::from([
            (
                "charsets".to_string(),
                br#"{"text": "iso-8859-1", "subject": "UTF-8", "html": "x-unknown"}"#.to_vec(),
            ),
            (
                "text".to_string(),
                b"Merci, c'est parfait \xe0 caf\xe9".to_vec(),
            ),
            ("subject".to_string(), "Re: Caf\u{e9}".as_bytes().to_vec()),
            (
                "html".to_string(),
                "<p>d\u{e9}j\u{e0}</p>".as_bytes().to_vec(),
            ),
            ("from".to_string(), b"Zo\xc3\xa9 <zoe@example.fr>".to_vec()),
        ]);
        let fields = decode_fields(raw);
        assert_eq!(fields["text"], "Merci, c'est parfait \u{e0} caf\u{e9}");
        assert_eq!(fields["subject"], "Re: Caf\u{e9}");
        // An unknown label and no label are read as UTF-8.
        assert_eq!(fields["html"], "<p>d\u{e9}j\u{e0}</p>");
        assert_eq!(fields["from"], "Zo\u{e9} <zoe@example.fr>");
    }

    #[test]
    fn a_reply_is_recorded_on_the_message_it_answers() {
        let id = "0193b6c2-8f1e-7c3a-9d41-5a6e2f0b7c11";
        let mut fields = std::collections::HashMap::new();
        fields.insert(
            "headers".to_string(),
            format!("Message-ID: <reply-1@mail.example.net>\r\nReferences: <other@x.org>\r\n <{id}@example.com>\r\nSubject: Re: Hello"),
        );
        fields.insert(
            "from".to_string(),
            "Alice Doe <alice@example.com>".to_string(),
        );
        fields.insert("text".to_string(), "Thanks!".to_string());
        let fact = parse_inbound(&fields, Utc::now(), Some(id.parse().unwrap()));
        assert_eq!(fact.message_id.map(|u| u.to_string()).as_deref(), Some(id));
        assert_eq!(fact.event_id, "<reply-1@mail.example.net>");
        assert_eq!(fact.payload.value()["from_username"], "alice@example.com");
        assert_eq!(fact.payload.value()["from_name"], "Alice Doe");
    }
}
