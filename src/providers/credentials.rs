//! Credentials as `POST /v1/services` receives them (shapes in `CONTRACT.md`), parsed into
//! [`Credentials`]. Parsed by hand rather than with serde: serde's messages quote the offending
//! value ("invalid type: integer `12345`"), and that value may be a password. Our messages
//! name fields only.

use super::{Credentials, SmtpTls, XRefresh};
use crate::config::Secret;
use messaging_domain::Provider;
use serde_json::{Map, Value};

/// Parses a service's credentials for `provider`. The error names the field to fix and never
/// contains a credential's value.
pub fn parse_credentials(provider: Provider, json: &Value) -> Result<Credentials, String> {
    let object = json
        .as_object()
        .ok_or_else(|| format!("{} credentials must be a JSON object", provider.as_str()))?;
    match provider {
        Provider::Sendgrid => {
            only(object, &["api_key"])?;
            Ok(Credentials::Sendgrid {
                api_key: secret(object, "api_key")?,
            })
        }
        Provider::Smtp => smtp(object),
        Provider::X => x(object),
        Provider::Facebook => {
            only(object, &["page_access_token"])?;
            Ok(Credentials::Facebook {
                page_access_token: secret(object, "page_access_token")?,
            })
        }
        Provider::Sandbox => {
            only(object, &[])?;
            Ok(Credentials::Sandbox)
        }
    }
}

fn smtp(object: &Map<String, Value>) -> Result<Credentials, String> {
    only(object, &["host", "port", "username", "password", "tls"])?;
    let host = string(object, "host")?;
    let port = match object.get("port") {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or("credentials.port: must be a port number from 1 to 65535")?,
        Some(_) => return Err("credentials.port: must be a number".into()),
        None => return Err("credentials.port: required".into()),
    };
    let username = optional_string(object, "username")?;
    let password = optional_string(object, "password")?.map(Secret::new);
    // Half a login is a mistake worth reporting now rather than at the first send.
    if username.is_some() != password.is_some() {
        return Err("credentials: give both username and password, or neither".into());
    }
    // Absent means STARTTLS: the secure choice that most submission servers (port 587) expect.
    let tls = match optional_string(object, "tls")?.as_deref() {
        None | Some("starttls") => SmtpTls::StartTls,
        Some("tls") => SmtpTls::Tls,
        Some("none") => SmtpTls::None,
        Some(_) => return Err("credentials.tls: must be one of none, starttls, tls".into()),
    };
    Ok(Credentials::Smtp {
        host,
        port,
        username,
        password,
        tls,
    })
}

const OAUTH1_FIELDS: [&str; 4] = [
    "consumer_key",
    "consumer_secret",
    "access_token",
    "access_token_secret",
];

/// An OAuth 2.0 token's companions: what renews it.
const OAUTH2_REFRESH_FIELDS: [&str; 4] =
    ["refresh_token", "client_id", "client_secret", "expires_at"];

fn x(object: &Map<String, Value>) -> Result<Credentials, String> {
    let mut allowed = OAUTH1_FIELDS.to_vec();
    allowed.push("bearer_token");
    allowed.extend(OAUTH2_REFRESH_FIELDS);
    only(object, &allowed)?;
    let has_oauth1 = OAUTH1_FIELDS.iter().any(|f| object.contains_key(*f));
    let has_oauth2 = object.contains_key("bearer_token")
        || OAUTH2_REFRESH_FIELDS
            .iter()
            .any(|f| object.contains_key(*f));
    match (has_oauth1, has_oauth2) {
        (true, true) => Err(
            "credentials: give either the four OAuth 1.0a fields or bearer_token (with its \
             refresh_token and client_id), not both"
                .into(),
        ),
        (false, true) => Ok(Credentials::XBearer {
            bearer_token: secret(object, "bearer_token")?,
            refresh: x_refresh(object)?,
        }),
        (true, false) => Ok(Credentials::XOAuth1 {
            consumer_key: secret(object, "consumer_key")?,
            consumer_secret: secret(object, "consumer_secret")?,
            access_token: secret(object, "access_token")?,
            access_token_secret: secret(object, "access_token_secret")?,
        }),
        (false, false) => Err(
            "credentials: give consumer_key, consumer_secret, access_token and \
             access_token_secret (OAuth 1.0a), or bearer_token (OAuth 2.0, with refresh_token \
             and client_id to renew it)"
                .into(),
        ),
    }
}

/// `refresh_token` with the `client_id` of the app it was granted to (and its
/// `client_secret` for a confidential client, `expires_at` when known), or none of them.
fn x_refresh(object: &Map<String, Value>) -> Result<Option<XRefresh>, String> {
    let Some(refresh_token) = optional_string(object, "refresh_token")? else {
        if let Some(field) = ["client_id", "client_secret", "expires_at"]
            .into_iter()
            .find(|f| object.contains_key(*f))
        {
            return Err(format!(
                "credentials.{field}: only with a refresh_token (an access token granted with \
                 the offline.access scope comes with one)"
            ));
        }
        return Ok(None);
    };
    let client_id = optional_string(object, "client_id")?.ok_or(
        "credentials.client_id: required with a refresh_token (the OAuth 2.0 Client ID of the \
         app it was granted to)",
    )?;
    let expires_at = optional_string(object, "expires_at")?
        .map(|at| {
            chrono::DateTime::parse_from_rfc3339(&at)
                .map(|at| at.with_timezone(&chrono::Utc))
                .map_err(|_| {
                    "credentials.expires_at: an RFC 3339 time with an offset, such as \
                     2026-11-30T18:00:00Z"
                        .to_string()
                })
        })
        .transpose()?;
    Ok(Some(XRefresh {
        refresh_token: Secret::new(refresh_token),
        client_id,
        client_secret: optional_string(object, "client_secret")?.map(Secret::new),
        expires_at,
    }))
}

/// Unknown fields are refused: a misspelt `apikey` should fail now, not at the first send.
fn only(object: &Map<String, Value>, allowed: &[&str]) -> Result<(), String> {
    let mut unknown: Vec<&str> = object
        .keys()
        .map(String::as_str)
        .filter(|k| !allowed.contains(k))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort_unstable();
    let expected = if allowed.is_empty() {
        "none".to_string()
    } else {
        allowed.join(", ")
    };
    Err(format!(
        "credentials: unknown field(s) {}; expected: {expected}",
        unknown.join(", ")
    ))
}

fn string(object: &Map<String, Value>, field: &str) -> Result<String, String> {
    optional_string(object, field)?.ok_or_else(|| format!("credentials.{field}: required"))
}

fn optional_string(object: &Map<String, Value>, field: &str) -> Result<Option<String>, String> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(format!("credentials.{field}: must not be blank"))
        }
        // No key, token or password has one, and PostgreSQL's `jsonb` cannot hold a NUL.
        Some(Value::String(s)) if s.chars().any(char::is_control) => Err(format!(
            "credentials.{field}: must not contain control characters"
        )),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("credentials.{field}: must be a string")),
    }
}

fn secret(object: &Map<String, Value>, field: &str) -> Result<Secret, String> {
    string(object, field).map(Secret::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sendgrid_needs_an_api_key() {
        let parsed = parse_credentials(Provider::Sendgrid, &json!({"api_key": "SG.x"})).unwrap();
        assert!(matches!(parsed, Credentials::Sendgrid { api_key } if api_key.expose() == "SG.x"));
        let err = parse_credentials(Provider::Sendgrid, &json!({})).unwrap_err();
        assert_eq!(err, "credentials.api_key: required");
    }

    #[test]
    fn smtp_parses_every_field() {
        let parsed = parse_credentials(
            Provider::Smtp,
            &json!({"host": "mail.example.com", "port": 465, "username": "u", "password": "p", "tls": "tls"}),
        )
        .unwrap();
        match parsed {
            Credentials::Smtp {
                host,
                port,
                username,
                password,
                tls,
            } => {
                assert_eq!(host, "mail.example.com");
                assert_eq!(port, 465);
                assert_eq!(username.as_deref(), Some("u"));
                assert_eq!(password.unwrap().expose(), "p");
                assert_eq!(tls, SmtpTls::Tls);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn smtp_defaults_to_starttls_and_allows_no_login() {
        let parsed = parse_credentials(Provider::Smtp, &json!({"host": "h", "port": 587})).unwrap();
        assert!(matches!(
            parsed,
            Credentials::Smtp {
                tls: SmtpTls::StartTls,
                username: None,
                password: None,
                ..
            }
        ));
    }

    #[test]
    fn smtp_refuses_bad_ports_tls_modes_and_half_logins() {
        for (body, expected) in [
            (json!({"host": "h", "port": 0}), "credentials.port"),
            (json!({"host": "h", "port": 70000}), "credentials.port"),
            (json!({"host": "h", "port": "25"}), "credentials.port"),
            (
                json!({"host": "h", "port": 25, "tls": "ssl"}),
                "credentials.tls",
            ),
            (
                json!({"host": "h", "port": 25, "username": "u"}),
                "both username and password",
            ),
            (json!({"port": 25}), "credentials.host"),
        ] {
            let err = parse_credentials(Provider::Smtp, &body).unwrap_err();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }

    #[test]
    fn x_takes_oauth1_or_a_bearer_token_but_not_both() {
        let oauth1 = json!({"consumer_key": "ck", "consumer_secret": "cs", "access_token": "at", "access_token_secret": "ats"});
        assert!(matches!(
            parse_credentials(Provider::X, &oauth1).unwrap(),
            Credentials::XOAuth1 { .. }
        ));
        assert!(matches!(
            parse_credentials(Provider::X, &json!({"bearer_token": "b"})).unwrap(),
            Credentials::XBearer { .. }
        ));
        let renewable = json!({"bearer_token": "b", "refresh_token": "r", "client_id": "c",
                               "client_secret": "s", "expires_at": "2026-11-30T18:00:00Z"});
        match parse_credentials(Provider::X, &renewable).unwrap() {
            Credentials::XBearer {
                refresh: Some(r), ..
            } => {
                assert_eq!(r.refresh_token.expose(), "r");
                assert_eq!(r.client_id, "c");
                assert_eq!(r.client_secret.unwrap().expose(), "s");
                assert_eq!(
                    r.expires_at.unwrap().to_rfc3339(),
                    "2026-11-30T18:00:00+00:00"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        for (body, expected) in [
            (
                json!({"bearer_token": "b", "refresh_token": "r"}),
                "credentials.client_id: required",
            ),
            (
                json!({"bearer_token": "b", "client_id": "c"}),
                "credentials.client_id: only with a refresh_token",
            ),
            (
                json!({"bearer_token": "b", "refresh_token": "r", "client_id": "c", "expires_at": "tomorrow"}),
                "credentials.expires_at: an RFC 3339 time",
            ),
            (
                json!({"refresh_token": "r", "client_id": "c"}),
                "credentials.bearer_token: required",
            ),
            (
                json!({"consumer_key": "ck", "refresh_token": "r"}),
                "not both",
            ),
        ] {
            let err = parse_credentials(Provider::X, &body).unwrap_err();
            assert!(err.contains(expected), "{err} should say {expected}");
        }
        let both = json!({"consumer_key": "ck", "bearer_token": "b"});
        assert!(parse_credentials(Provider::X, &both)
            .unwrap_err()
            .contains("not both"));
        let partial = json!({"consumer_key": "ck", "consumer_secret": "cs"});
        assert_eq!(
            parse_credentials(Provider::X, &partial).unwrap_err(),
            "credentials.access_token: required"
        );
    }

    #[test]
    fn facebook_and_sandbox_shapes() {
        assert!(matches!(
            parse_credentials(Provider::Facebook, &json!({"page_access_token": "t"})).unwrap(),
            Credentials::Facebook { .. }
        ));
        assert!(matches!(
            parse_credentials(Provider::Sandbox, &json!({})).unwrap(),
            Credentials::Sandbox
        ));
        assert!(parse_credentials(Provider::Sandbox, &json!([])).is_err());
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = parse_credentials(Provider::Sendgrid, &json!({"apikey": "x"})).unwrap_err();
        assert_eq!(
            err,
            "credentials: unknown field(s) apikey; expected: api_key"
        );
    }

    #[test]
    fn errors_never_contain_secret_values() {
        let secret_value = "hunter2-very-secret";
        for (provider, body) in [
            (
                Provider::Smtp,
                json!({"host": "h", "port": 25, "username": 5, "password": secret_value}),
            ),
            (Provider::Smtp, json!({"host": "h", "port": secret_value})),
            (
                Provider::Smtp,
                json!({"host": "h", "port": 25, "tls": secret_value}),
            ),
            (Provider::X, json!({"consumer_key": secret_value})),
            (Provider::Sendgrid, json!({"api_key": [secret_value]})),
            (
                Provider::Facebook,
                json!({"page_access_token": 12345, "x": secret_value}),
            ),
        ] {
            let err = parse_credentials(provider, &body).unwrap_err();
            assert!(!err.contains(secret_value), "{err}");
            assert!(!err.contains("12345"), "{err}");
        }
    }
}
