//! `GET /v1/openapi.json`: the OpenAPI 3.1 document, built in code from one table of
//! operations ([`operations`]). The integration tests hold the table and the router to each
//! other: every documented operation answers (no router-fallback 404, no 405), and every
//! `.route(...)` in the source is documented.

use super::{ApiJson, AppState};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(document))
}

async fn document() -> ApiJson<Value> {
    ApiJson(openapi())
}

/// One documented operation.
pub struct Operation {
    pub method: &'static str,
    pub path: &'static str,
    tag: &'static str,
    summary: &'static str,
    public: bool,
    query: Vec<(&'static str, &'static str, Value)>,
    headers: Vec<(&'static str, &'static str)>,
    body: Option<&'static str>,
    responses: Vec<(u16, &'static str, Option<Value>)>,
}

/// What `Idempotency-Key` does, where a compose takes it.
const IDEMPOTENCY_KEY: &str = "up to 255 ASCII characters: a retry with the same key and body returns the same message; the same key with another body is a 422";

fn op(
    method: &'static str,
    path: &'static str,
    tag: &'static str,
    summary: &'static str,
) -> Operation {
    Operation {
        method,
        path,
        tag,
        summary,
        public: false,
        query: Vec::new(),
        headers: Vec::new(),
        body: None,
        responses: Vec::new(),
    }
}

impl Operation {
    /// No bearer key: health, metrics and provider webhooks (signed by the provider).
    fn public(mut self) -> Self {
        self.public = true;
        self
    }

    fn query(mut self, name: &'static str, description: &'static str, schema: Value) -> Self {
        self.query.push((name, description, schema));
        self
    }

    /// An optional request header the operation reads (a string).
    fn header(mut self, name: &'static str, description: &'static str) -> Self {
        self.headers.push((name, description));
        self
    }

    /// A JSON request body of the named component schema.
    fn body(mut self, schema: &'static str) -> Self {
        self.body = Some(schema);
        self
    }

    fn ok(mut self, status: u16, description: &'static str, schema: Option<Value>) -> Self {
        self.responses.push((status, description, schema));
        self
    }

    /// Error responses in the one error shape (`components.responses`).
    fn errors(mut self, statuses: &[u16]) -> Self {
        for status in statuses {
            self.responses.push((*status, "", None));
        }
        self
    }

    fn to_json(&self) -> Value {
        let mut parameters: Vec<Value> = path_params(self.path)
            .map(|name| {
                json!({"name": name, "in": "path", "required": true,
                       "schema": {"type": "string", "format": "uuid"}})
            })
            .collect();
        parameters.extend(self.query.iter().map(|(name, description, schema)| {
            json!({"name": name, "in": "query", "required": false,
                   "description": description, "schema": schema})
        }));
        parameters.extend(self.headers.iter().map(|(name, description)| {
            json!({"name": name, "in": "header", "required": false,
                   "description": description, "schema": {"type": "string"}})
        }));
        let mut responses = Map::new();
        for (status, description, schema) in &self.responses {
            let value = if description.is_empty() {
                json!({"$ref": format!("#/components/responses/{}", error_name(*status))})
            } else {
                match schema {
                    Some(schema) => json!({"description": description,
                                           "content": {"application/json": {"schema": schema}}}),
                    None => json!({"description": description}),
                }
            };
            responses.insert(status.to_string(), value);
        }
        if !self.public {
            responses
                .entry("401")
                .or_insert_with(|| json!({"$ref": "#/components/responses/Unauthorized"}));
        }
        let mut operation = json!({
            "tags": [self.tag],
            "summary": self.summary,
            "operationId": operation_id(self.method, self.path),
            "parameters": parameters,
            "responses": responses,
        });
        if let Some(obj) = operation.as_object_mut() {
            if let Some(schema) = self.body {
                obj.insert(
                    "requestBody".into(),
                    json!({"required": true, "content": {"application/json":
                           {"schema": schema_ref(schema)}}}),
                );
            }
            if self.public {
                obj.insert("security".into(), json!([]));
            }
        }
        operation
    }
}

/// An identifier client generators can use: `get_v1_messages_id` for `GET
/// /v1/messages/{id}`.
fn operation_id(method: &str, path: &str) -> String {
    let words = path
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty());
    std::iter::once(method)
        .chain(words)
        .collect::<Vec<_>>()
        .join("_")
}

fn path_params(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn error_name(status: u16) -> &'static str {
    match status {
        400 => "BadRequest",
        401 => "Unauthorized",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        413 => "PayloadTooLarge",
        415 => "UnsupportedMediaType",
        422 => "InvalidField",
        503 => "Busy",
        _ => "Internal",
    }
}

const ERRORS: [(u16, &str); 10] = [
    (400, "malformed JSON or request"),
    (
        401,
        "missing or unknown bearer key (or a bad provider signature on webhooks)",
    ),
    (404, "no such id (or no such route)"),
    (
        405,
        "the route exists but does not take this method (any route)",
    ),
    (409, "not allowed in the message's current state"),
    (413, "the body is larger than this service accepts"),
    (
        415,
        "the body is not JSON (`Content-Type: application/json`)",
    ),
    (422, "an invalid field; the message names it"),
    (
        503,
        "the message is being changed concurrently, no database connection came free in time \
         (any route that reads or writes), or a webhook is not configured; see Retry-After",
    ),
    (500, "opaque server error; the cause is logged"),
];

/// Every route this service serves, API, health, metrics and webhooks.
pub fn operations() -> Vec<Operation> {
    let id_page = || {
        vec![
            ("limit", "page size, 1 to 500", json!({"type": "integer"})),
            (
                "cursor",
                "the previous page's `next_cursor`",
                json!({"type": "string"}),
            ),
        ]
    };
    let mut list_messages = op(
        "get",
        "/v1/messages",
        "messages",
        "The message list, newest first",
    )
    .ok(200, "a page of messages", Some(schema_ref("MessagePage")))
    .errors(&[422]);
    for (name, description) in [
        ("service_id", "only this service's messages"),
        ("channel", "email, twitter or facebook"),
        ("state", "only messages in this state"),
        ("direction", "outbound or inbound"),
        ("profile", "a username in from or to"),
    ] {
        list_messages = list_messages.query(name, description, json!({"type": "string"}));
    }
    for (name, description, schema) in id_page() {
        list_messages = list_messages.query(name, description, schema);
    }
    let command = |path, summary| {
        op("post", path, "messages", summary)
            .ok(
                200,
                "the message after the command",
                Some(schema_ref("Message")),
            )
            .errors(&[404, 409, 503])
    };
    let mut unmatched = op(
        "get",
        "/v1/webhooks/unmatched",
        "webhooks",
        "Provider input that names no message of ours, or could not be read, newest first",
    )
    .ok(
        200,
        "a page of kept input",
        Some(schema_ref("UnmatchedPage")),
    )
    .errors(&[422]);
    for (name, description, schema) in id_page() {
        unmatched = unmatched.query(name, description, schema);
    }
    vec![
        op("post", "/v1/services", "services", "Connect an account (credentials are write-only)")
            .body("CreateService")
            .ok(201, "the service", Some(schema_ref("Service")))
            .errors(&[400, 413, 415, 422]),
        op("get", "/v1/services", "services", "List services")
            .ok(200, "every service", Some(json!({"type": "object", "required": ["items"],
                "properties": {"items": {"type": "array", "items": schema_ref("Service")}}}))),
        op("get", "/v1/services/{id}", "services", "Show a service (never its credentials)")
            .ok(200, "the service", Some(schema_ref("Service")))
            .errors(&[404]),
        op("put", "/v1/services/{id}/credentials", "services",
            "Replace the account's credentials (a rotated key, a token granted again); write-only, used from the next send")
            .body("Credentials")
            .ok(200, "the service", Some(schema_ref("Service")))
            .errors(&[400, 404, 413, 415, 422]),
        op("post", "/v1/services/{id}/shares", "messages",
            "One-call share: built for the service's channel, queued now or scheduled")
            .header("Idempotency-Key", IDEMPOTENCY_KEY)
            .body("ShareRequest")
            .ok(201, "the message", Some(schema_ref("Message")))
            .errors(&[400, 404, 413, 415, 422, 503]),
        op("post", "/v1/messages", "messages",
            "Compose; `publish_at` schedules, `send: true` queues now. `Idempotency-Key` header makes retries safe")
            .header("Idempotency-Key", IDEMPOTENCY_KEY)
            .body("ComposeRequest")
            .ok(201, "the message", Some(schema_ref("Message")))
            .errors(&[400, 413, 415, 422, 503]),
        list_messages,
        op("get", "/v1/messages/{id}", "messages", "The message with its full history")
            .ok(200, "the message and its history", Some(schema_ref("MessageDetail")))
            .errors(&[404]),
        op("get", "/v1/messages/{id}/history", "messages",
            "The message's history a page at a time; `next` is the `after` of the next page")
            .query("after", "sequence to read after (0: from the first event)", json!({"type": "integer"}))
            .query("limit", "events, 1 to 1000 (100 unless given)", json!({"type": "integer"}))
            .ok(200, "a page of the history", Some(schema_ref("HistoryPage")))
            .errors(&[404, 422]),
        command("/v1/messages/{id}/schedule", "Schedule or reschedule")
            .body("ScheduleRequest")
            .errors(&[400, 415, 422]),
        command("/v1/messages/{id}/send", "Queue now"),
        command("/v1/messages/{id}/cancel", "Cancel, until the provider call starts"),
        command("/v1/messages/{id}/resolve", "Settle an unknown send outcome")
            .body("ResolveRequest")
            .errors(&[400, 415, 422]),
        op("get", "/v1/state-changes", "feed", "The state-change feed after a position; `wait` long-polls")
            .query("after", "position to read after", json!({"type": "integer"}))
            .query("limit", "items, 1 to 1000", json!({"type": "integer"}))
            .query("wait", "seconds to wait for an item, at most 60", json!({"type": "integer"}))
            .ok(200, "items and the next cursor", Some(schema_ref("FeedPage")))
            .errors(&[422]),
        op("get", "/v1/state-changes/stream", "feed",
            "The feed as server-sent events named `state_change`; resume with the `Last-Event-ID` header, `lastEventId` or `after`")
            .query("after", "position to read after", json!({"type": "integer"}))
            .query("lastEventId", "the last event id seen, for clients that cannot send the `Last-Event-ID` header", json!({"type": "integer"}))
            .header("Last-Event-ID", "the last event id seen (a feed position): the stream resumes after it")
            .ok(200, "`text/event-stream` of FeedItem, `id:` is the position", None)
            .errors(&[422]),
        op("post", "/v1/subscriptions", "feed", "Create a push subscription (signed batches)")
            .body("CreateSubscription")
            .ok(201, "the subscription", Some(schema_ref("Subscription")))
            .errors(&[400, 415, 422]),
        op("get", "/v1/subscriptions", "feed", "List push subscriptions")
            .ok(200, "every subscription", Some(json!({"type": "object", "required": ["items"],
                "properties": {"items": {"type": "array", "items": schema_ref("Subscription")}}}))),
        op("get", "/v1/subscriptions/{id}", "feed", "Show a push subscription with its lag")
            .ok(200, "the subscription", Some(schema_ref("Subscription")))
            .errors(&[404]),
        op("delete", "/v1/subscriptions/{id}", "feed", "Remove a push subscription")
            .ok(204, "removed", None)
            .errors(&[404]),
        unmatched,
        op("get", "/v1/openapi.json", "operations", "This document")
            .ok(200, "the OpenAPI 3.1 document", Some(json!({"type": "object"}))),
        op("get", "/healthz", "operations", "The process is up")
            .public()
            .ok(200, "up", Some(schema_ref("Status"))),
        op("get", "/readyz", "operations", "The database answers and migrations are applied")
            .public()
            .ok(200, "ready", Some(schema_ref("Status")))
            .ok(503, "not ready", Some(schema_ref("Status"))),
        op("get", "/metrics", "operations", "Prometheus text exposition")
            .public()
            .ok(200, "`text/plain; version=0.0.4`", None),
        op("post", "/webhooks/sendgrid/events", "webhooks", "SendGrid Event Webhook (ECDSA-signed)")
            .public()
            .ok(200, "recorded in the inbox", None)
            .errors(&[400, 401, 413, 503]),
        op("post", "/webhooks/sendgrid/inbound", "webhooks", "SendGrid Inbound Parse (ECDSA-signed under a security policy, or `?token=`)")
            .public()
            .ok(200, "recorded in the inbox", None)
            .errors(&[400, 401, 413, 503]),
        op("get", "/webhooks/twitter", "webhooks", "X CRC challenge")
            .public()
            .ok(200, "the response token", None)
            .errors(&[400, 503]),
        op("post", "/webhooks/twitter", "webhooks", "X account activity (signed)")
            .public()
            .ok(200, "recorded in the inbox", None)
            .errors(&[400, 401, 413, 503]),
        op("get", "/webhooks/facebook", "webhooks", "Facebook `hub.challenge` verification")
            .public()
            .ok(200, "the challenge", None)
            .errors(&[400, 401, 503]),
        op("post", "/webhooks/facebook", "webhooks", "Facebook page feed changes (X-Hub-Signature-256)")
            .public()
            .ok(200, "recorded in the inbox", None)
            .errors(&[400, 401, 413, 503]),
    ]
}

/// The whole document.
pub fn openapi() -> Value {
    let mut paths = Map::new();
    for operation in operations() {
        let entry = paths
            .entry(operation.path)
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(methods) = entry.as_object_mut() {
            methods.insert(operation.method.into(), operation.to_json());
        }
    }
    let mut responses = Map::new();
    for (status, description) in ERRORS {
        responses.insert(
            error_name(status).into(),
            json!({"description": description,
                   "content": {"application/json": {"schema": schema_ref("Error")}}}),
        );
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "messaging",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Event-sourced messaging: email, X and Facebook. Every /v1 call needs `Authorization: Bearer <key>`. Every response carries `X-Request-Id`.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": responses,
            "schemas": schemas(),
        },
    })
}

fn nullable(kind: &str) -> Value {
    json!({"type": [kind, "null"]})
}

fn datetime() -> Value {
    json!({"type": "string", "format": "date-time"})
}

fn schemas() -> Value {
    let string = json!({"type": "string"});
    let integer = json!({"type": "integer"});
    let page = |item: &str, cursor: &str| {
        json!({"type": "object", "required": ["items", cursor], "properties": {
            "items": {"type": "array", "items": schema_ref(item)},
            cursor: nullable("string"),
        }})
    };
    json!({
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "description": "stable, machine-readable: invalid_field, not_found, invalid_transition, busy, ..."},
                    "message": {"type": "string", "description": "what to fix (client errors) or an opaque note (server errors)"},
                }}},
        },
        "Status": {"type": "object", "properties": {"status": string}},
        "Profile": {"type": "object", "required": ["username"],
                    "properties": {"username": string, "name": string}},
        "Message": {
            "type": "object",
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "channel": {"enum": ["email", "twitter", "facebook"]},
                "direction": {"enum": ["outbound", "inbound"]},
                "service_id": {"type": "string", "format": "uuid"},
                "provider": {"enum": ["sendgrid", "smtp", "x", "facebook", "sandbox"]},
                "sandbox": {"type": "boolean"},
                "from": schema_ref("Profile"),
                "to": {"type": "array", "items": schema_ref("Profile")},
                "subject": nullable("string"), "text": nullable("string"),
                "html": nullable("string"), "link": nullable("string"),
                "in_reply_to": nullable("string"),
                "state": string, "previous_state": nullable("string"),
                "publish_at": {"type": ["string", "null"], "format": "date-time"},
                "sent_at": {"type": ["string", "null"], "format": "date-time"},
                "provider_message_id": nullable("string"),
                "attempts": integer,
                "send_outcome_unknown": {"type": "boolean"},
                "last_error": nullable("string"),
                "opens": integer, "clicks": integer, "replies": integer,
                "created_at": datetime(), "updated_at": datetime(),
            },
        },
        "HistoryItem": {"type": "object", "properties": {
            "sequence": integer, "type": string, "state": string,
            "previous_state": nullable("string"),
            "occurred_at": datetime(), "recorded_at": datetime(),
            "data": {"description": "the event's own facts"},
        }},
        "MessageDetail": {"allOf": [schema_ref("Message"), {"type": "object", "properties": {
            "history": {"type": "array", "items": schema_ref("HistoryItem")}}}]},
        "MessagePage": page("Message", "next_cursor"),
        "HistoryPage": {"type": "object", "required": ["items", "next"], "properties": {
            "items": {"type": "array", "items": schema_ref("HistoryItem")},
            "next": nullable("integer")}},
        "ComposeRequest": {
            "type": "object", "required": ["service_id"], "additionalProperties": false,
            "properties": {
                "service_id": {"type": "string", "format": "uuid"},
                "to": {"type": "array", "items": schema_ref("Profile")},
                "subject": string, "text": string, "html": string, "link": string,
                "in_reply_to": string,
                "publish_at": datetime(),
                "send": {"type": "boolean", "default": false},
            },
        },
        "ShareRequest": {"type": "object", "additionalProperties": false, "properties": {
            "text": string, "link": string, "publish_at": datetime(),
            "to": {"type": "array", "items": schema_ref("Profile")}, "subject": string,
        }},
        "ScheduleRequest": {"type": "object", "required": ["publish_at"], "additionalProperties": false,
                            "properties": {"publish_at": datetime()}},
        "ResolveRequest": {"type": "object", "required": ["posted"], "additionalProperties": false, "properties": {
            "posted": {"type": "boolean"}, "provider_message_id": string,
            "send_again": {"type": "boolean", "default": true,
                           "description": "when not posted: send it again, or give it up (failed)"}}},
        "Service": {"type": "object", "properties": {
            "id": {"type": "string", "format": "uuid"},
            "channel": {"enum": ["email", "twitter", "facebook"]},
            "provider": {"enum": ["sendgrid", "smtp", "x", "facebook", "sandbox"]},
            "name": string, "username": string, "sandbox": {"type": "boolean"},
            "created_at": datetime(),
        }},
        "Credentials": {
            "type": "object",
            "description": "the provider's shape, as on create: sendgrid {api_key}; smtp {host, port, username, password, tls}; x {consumer_key, consumer_secret, access_token, access_token_secret} or {bearer_token, refresh_token, client_id, client_secret, expires_at}; facebook {page_access_token}; sandbox {}",
        },
        "CreateService": {
            "type": "object", "required": ["channel", "name", "username"], "additionalProperties": false,
            "properties": {
                "channel": {"enum": ["email", "twitter", "facebook"]},
                "provider": {"enum": ["sendgrid", "smtp", "x", "facebook", "sandbox"]},
                "name": string, "username": string,
                "credentials": schema_ref("Credentials"),
            },
        },
        "FeedItem": {"type": "object", "properties": {
            "position": integer, "message_id": {"type": "string", "format": "uuid"},
            "channel": string, "service_id": {"type": "string", "format": "uuid"},
            "previous_state": nullable("string"), "state": string, "cause": string,
            "occurred_at": datetime(), "recorded_at": datetime(),
        }},
        "FeedPage": {"type": "object", "required": ["items", "next"], "properties": {
            "items": {"type": "array", "items": schema_ref("FeedItem")}, "next": integer}},
        "Subscription": {"type": "object", "properties": {
            "id": {"type": "string", "format": "uuid"}, "url": string,
            "states": {"type": ["array", "null"], "items": string},
            "channels": {"type": ["array", "null"], "items": string},
            "cursor": integer, "lag": integer, "delivered": integer, "failures": integer,
            "last_error": nullable("string"),
            "last_attempt_at": {"type": ["string", "null"], "format": "date-time"},
            "next_attempt_at": datetime(), "created_at": datetime(),
        }},
        "CreateSubscription": {"type": "object", "required": ["url", "secret"], "additionalProperties": false, "properties": {
            "url": {"type": "string", "format": "uri"},
            "secret": {"type": "string", "minLength": 16, "description": "write-only"},
            "states": {"type": "array", "items": string},
            "channels": {"type": "array", "items": string},
            "after": integer,
        }},
        "UnmatchedPage": {"type": "object", "required": ["items", "next_cursor"], "properties": {
            "items": {"type": "array", "items": {"type": "object"}},
            "next_cursor": nullable("string"),
        }},
    })
}
