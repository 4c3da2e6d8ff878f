//! Services (connected accounts).

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn credentials_are_write_only() {
    let app = TestApp::spawn().await;
    let (status, created) = app
        .post(
            "/v1/services",
            json!({"channel": "email", "provider": "smtp", "name": "Support",
                   "username": "support@example.com",
                   "credentials": {"host": "smtp.example.com", "port": 587, "tls": "starttls",
                                   "username": "support", "password": "p4ss-w0rd-secret"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap();
    let (status, shown) = app.get(&format!("/v1/services/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    let (_, listed) = app.get("/v1/services").await;
    for body in [&created, &shown, &listed] {
        let text = body.to_string();
        assert!(!text.contains("p4ss-w0rd-secret"), "{text}");
        assert!(!text.contains("credentials"), "{text}");
    }
    assert_eq!(shown["username"], "support@example.com");
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_service_with_no_provider_and_no_credentials_is_the_labelled_sandbox() {
    let app = TestApp::spawn().await;
    let (status, created) = app
        .post(
            "/v1/services",
            json!({"channel": "twitter", "name": "Try", "username": "ourbrand"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["provider"], "sandbox");
    assert_eq!(created["sandbox"], true);
    // With credentials, the provider must be named: they would be for someone.
    let (status, body) = app
        .post(
            "/v1/services",
            json!({"channel": "email", "name": "n", "username": "a@example.com",
                   "credentials": {"api_key": "SG.x"}}),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("provider"),
        "{body}"
    );
}

#[tokio::test]
async fn invalid_services_are_422_naming_the_field() {
    let app = TestApp::spawn().await;
    let cases = [
        (
            json!({"channel": "fax", "provider": "sandbox", "name": "n", "username": "u"}),
            "channel",
        ),
        (
            json!({"channel": "email", "provider": "x", "name": "n", "username": "a@example.com"}),
            "provider",
        ),
        (
            json!({"channel": "email", "provider": "sendgrid", "name": "n", "username": "nope"}),
            "username",
        ),
        (
            json!({"channel": "email", "provider": "sendgrid", "name": "n", "username": "a@example.com",
                "credentials": {}}),
            "credentials.api_key",
        ),
        (
            json!({"channel": "twitter", "provider": "x", "name": "n", "username": "a handle with spaces",
                "credentials": {"bearer_token": "t"}}),
            "username",
        ),
        (
            json!({"channel": "facebook", "provider": "facebook", "name": "n", "username": "123",
                "credentials": {"page_access_token": ""}}),
            "credentials.page_access_token",
        ),
        (
            json!({"channel": "email", "provider": "sandbox", "name": " ", "username": "a@example.com"}),
            "name",
        ),
        (
            json!({"channel": "facebook", "provider": "sandbox", "name": "n", "username": "1".repeat(101)}),
            "username",
        ),
        (
            json!({"channel": "email", "provider": "sendgrid", "name": "n", "username": "a@example.com",
                "credentials": {"api_key": "SG.a\u{0}b"}}),
            "credentials.api_key",
        ),
    ];
    for (body, field) in cases {
        let (status, error) = app.post("/v1/services", body.clone()).await;
        assert_error(
            status,
            &error,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        );
        assert!(
            error["error"]["message"].as_str().unwrap().contains(field),
            "{error} for {body}"
        );
    }
    let (status, error) = app.post("/v1/services", json!({"channel": "email"})).await;
    assert_error(
        status,
        &error,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    let (_, listed) = app.get("/v1/services").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 0);
    let (status, error) = app
        .get("/v1/services/01939c3a-0000-7000-8000-000000000000")
        .await;
    assert_error(status, &error, StatusCode::NOT_FOUND, "not_found");
}
