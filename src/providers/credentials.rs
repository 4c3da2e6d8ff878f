//! Credentials as `POST /v1/services` receives them (shapes in `CONTRACT.md`), parsed into
//! [`Credentials`]. Parsed by hand rather than with serde: serde's messages quote the offending
//! value ("invalid type: integer `12345`"), and that value may be a password. Our messages
//! name fields only.

use super::{Credentials, SmtpTls};
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

fn x(object: &Map<String, Value>) -> Result<Credentials, String> {
    let mut allowed = OAUTH1_FIELDS.to_vec();
    allowed.push("bearer_token");
    only(object, &allowed)?;
    let has_oauth1 = OAUTH1_FIELDS.iter().any(|f| object.contains_key(*f));
    match (has_oauth1, object.contains_key("bearer_token")) {
        (true, true) => Err(
            "credentials: give either the four OAuth 1.0a fields or bearer_token, not both".into(),
        ),
        (false, true) => Ok(Credentials::XBearer {
            bearer_token: secret(object, "bearer_token")?,
        }),
        (true, false) => Ok(Credentials::XOAuth1 {
            consumer_key: secret(object, "consumer_key")?,
            consumer_secret: secret(object, "consumer_secret")?,
            access_token: secret(object, "access_token")?,
            access_token_secret: secret(object, "access_token_secret")?,
        }),
        (false, false) => Err(
            "credentials: give consumer_key, consumer_secret, access_token and \
             access_token_secret (OAuth 1.0a), or bearer_token (OAuth 2.0)"
                .into(),
        ),
    }
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
