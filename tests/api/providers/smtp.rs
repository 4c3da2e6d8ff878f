//! SMTP against a real server.

use super::*;

use mailin::{response, AuthMechanism, Handler, Response, SessionBuilder};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// What the server saw: delivered mails and every login attempt (user names).
#[derive(Debug, Default)]
struct Inbox {
    mails: Vec<Received>,
    logins: Vec<String>,
}

#[derive(Debug, Clone, Default)]
struct Received {
    from: String,
    to: Vec<String>,
    data: Vec<u8>,
    login: Option<(String, String)>,
}

/// Records each accepted mail. `rcpt_reply` lets a test refuse recipients.
#[derive(Clone)]
struct Recorder {
    current: Received,
    inbox: Arc<Mutex<Inbox>>,
    rcpt_reply: Option<Response>,
}

impl Handler for Recorder {
    fn mail(&mut self, _ip: IpAddr, _domain: &str, from: &str) -> Response {
        self.current.from = from.to_string();
        response::OK
    }
    fn rcpt(&mut self, to: &str) -> Response {
        if let Some(reply) = &self.rcpt_reply {
            return reply.clone();
        }
        self.current.to.push(to.to_string());
        response::OK
    }
    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.current.data.extend_from_slice(buf);
        Ok(())
    }
    fn data_end(&mut self) -> Response {
        let done = std::mem::take(&mut self.current);
        self.current.login = done.login.clone();
        self.inbox.lock().unwrap().mails.push(done);
        response::OK
    }
    fn auth_plain(&mut self, _authz: &str, user: &str, password: &str) -> Response {
        self.inbox.lock().unwrap().logins.push(user.to_string());
        if user == "mailer" && password == "s3cret-pass" {
            self.current.login = Some((user.into(), password.into()));
            response::AUTH_OK
        } else {
            response::INVALID_CREDENTIALS
        }
    }
}

/// A real SMTP server on 127.0.0.1: mailin's protocol state machine on a tokio socket.
/// No TLS, so the client runs with `tls: none`; AUTH PLAIN is offered when `auth`.
async fn start_server(auth: bool, rcpt_reply: Option<Response>) -> (u16, Arc<Mutex<Inbox>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let inbox = Arc::new(Mutex::new(Inbox::default()));
    let recorder = Recorder {
        current: Received::default(),
        inbox: inbox.clone(),
        rcpt_reply,
    };
    tokio::spawn(async move {
        let mut builder = SessionBuilder::new("test-smtp");
        // With AUTH offered, mailin requires it before MAIL FROM.
        if auth {
            builder
                .enable_auth(AuthMechanism::Plain)
                .insecure_enable_plaintext_auth();
        }
        while let Ok((stream, peer)) = listener.accept().await {
            let mut session = builder.build(peer.ip(), recorder.clone());
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut reader = BufReader::new(read);
                let greeting = session.greeting().buffer().unwrap();
                write.write_all(&greeting).await.unwrap();
                let mut line = Vec::new();
                loop {
                    line.clear();
                    if reader.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let reply = session.process(&line);
                    match reply.action {
                        mailin::Action::NoReply => {}
                        mailin::Action::Reply => {
                            write.write_all(&reply.buffer().unwrap()).await.unwrap();
                        }
                        mailin::Action::Close | mailin::Action::UpgradeTls => {
                            let _ = write.write_all(&reply.buffer().unwrap()).await;
                            return;
                        }
                    }
                }
            });
        }
    });
    (port, inbox)
}

fn smtp_account(port: u16, login: bool) -> Account {
    account(
        Provider::Smtp,
        "news@example.com",
        Credentials::Smtp {
            host: "127.0.0.1".into(),
            port,
            username: login.then(|| "mailer".to_string()),
            password: login.then(|| Secret::new("s3cret-pass")),
            tls: SmtpTls::None,
        },
    )
}

/// Unfolds header continuation lines and returns the value of `name`.
fn header_value(message: &str, name: &str) -> Option<String> {
    let head = message.split("\r\n\r\n").next()?;
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    unfolded.split("\r\n").find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

#[tokio::test]
async fn an_smtp_server_that_never_answers_times_out_as_transient() {
    // Accepts connections and never says a word (no greeting), holding them open.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            keep.lock().unwrap().push(stream);
        }
    });
    let config = ProviderConfig {
        timeout: Duration::from_millis(300),
        ..ProviderConfig::default()
    };
    let (providers, account, message) = (providers(&config), smtp_account(port, false), email());
    let started = std::time::Instant::now();
    let sending = providers
        .for_provider(Provider::Smtp)
        .send(&account, &message);
    // Without a bound of its own the call would wait forever; 10 s is the test's patience.
    let result = tokio::time::timeout(Duration::from_secs(10), sending)
        .await
        .expect("the SMTP call ends by itself");
    match result {
        Err(SendError::Transient { reason, .. }) => {
            assert!(reason.contains("timed out"), "{reason}")
        }
        other => panic!("expected a transient timeout, got {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "three timeouts' worth"
    );
    assert_eq!(held.lock().unwrap().len(), 1, "it did connect");
}

#[tokio::test]
async fn smtp_delivers_a_threaded_multipart_email_with_our_message_id() {
    let (port, inbox) = start_server(true, None).await;
    let mut message = email();
    message.in_reply_to = Some("<original@example.org>".into());
    let accepted = providers(&ProviderConfig::default())
        .for_provider(Provider::Smtp)
        .send(&smtp_account(port, true), &message)
        .await
        .unwrap();
    let expected_id = format!("<{MESSAGE_ID}@example.com>");
    assert_eq!(
        accepted.provider_message_id.as_deref(),
        Some(expected_id.as_str())
    );

    let received = inbox.lock().unwrap().mails.clone();
    assert_eq!(received.len(), 1);
    let mail = &received[0];
    assert_eq!(mail.from, "news@example.com");
    assert_eq!(mail.to, vec!["ann@example.org", "bob@example.net"]);
    assert_eq!(
        mail.login,
        Some(("mailer".to_string(), "s3cret-pass".to_string()))
    );
    let data = String::from_utf8(mail.data.clone()).unwrap();
    assert_eq!(header_value(&data, "Message-ID").unwrap(), expected_id);
    assert_eq!(
        header_value(&data, "From").unwrap(),
        "\"Example News\" <news@example.com>"
    );
    assert_eq!(
        header_value(&data, "To").unwrap(),
        "\"Ann Smith\" <ann@example.org>, bob@example.net"
    );
    assert_eq!(header_value(&data, "Subject").unwrap(), "Spring update");
    assert_eq!(
        header_value(&data, "In-Reply-To").unwrap(),
        "<original@example.org>"
    );
    assert_eq!(
        header_value(&data, "References").unwrap(),
        "<original@example.org>"
    );
    assert!(header_value(&data, "Content-Type")
        .unwrap()
        .starts_with("multipart/alternative"));
    assert!(data.contains("Hello in plain text"), "{data}");
    assert!(data.contains("<p>Hello in <b>HTML</b></p>"), "{data}");
}

#[tokio::test]
async fn smtp_text_only_without_login() {
    let (port, inbox) = start_server(false, None).await;
    let mut message = email();
    message.html = None;
    message.to.truncate(1);
    providers(&ProviderConfig::default())
        .for_provider(Provider::Smtp)
        .send(&smtp_account(port, false), &message)
        .await
        .unwrap();
    let received = inbox.lock().unwrap().mails.clone();
    let data = String::from_utf8(received[0].data.clone()).unwrap();
    assert_eq!(received[0].login, None);
    assert!(header_value(&data, "Content-Type")
        .unwrap()
        .starts_with("text/plain"));
    assert!(header_value(&data, "In-Reply-To").is_none());
    assert!(data.contains("Hello in plain text"));
}

#[tokio::test]
async fn smtp_5yz_is_permanent_and_4yz_transient() {
    let (port, _) = start_server(true, Some(response::NO_MAILBOX)).await;
    let error = providers(&ProviderConfig::default())
        .for_provider(Provider::Smtp)
        .send(&smtp_account(port, true), &email())
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::Permanent { .. }), "{error:?}");

    let (port, _) = start_server(true, Some(Response::custom(450, "Mailbox busy".into()))).await;
    let error = providers(&ProviderConfig::default())
        .for_provider(Provider::Smtp)
        .send(&smtp_account(port, true), &email())
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::Transient { .. }), "{error:?}");
}

#[tokio::test]
async fn smtp_wrong_password_is_permanent_and_never_echoed() {
    let (port, _) = start_server(true, None).await;
    let mut account = smtp_account(port, true);
    if let Credentials::Smtp { password, .. } = &mut account.credentials {
        *password = Some(Secret::new("wrong-pass-123"));
    }
    let error = providers(&ProviderConfig::default())
        .for_provider(Provider::Smtp)
        .send(&account, &email())
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::Permanent { .. }), "{error:?}");
    assert!(!error.to_string().contains("wrong-pass-123"));
}

#[tokio::test]
async fn smtp_connection_refused_is_transient() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let error = providers(&ProviderConfig::default())
        .for_provider(Provider::Smtp)
        .send(&smtp_account(port, false), &email())
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::Transient { .. }), "{error:?}");
}

#[tokio::test]
async fn starttls_is_required_so_a_plain_server_never_sees_the_password() {
    // The test server offers AUTH but not STARTTLS: a downgrade. The client must stop before
    // authenticating rather than fall back to clear text.
    let (port, inbox) = start_server(true, None).await;
    let mut account = smtp_account(port, true);
    if let Credentials::Smtp { tls, .. } = &mut account.credentials {
        *tls = SmtpTls::StartTls;
    }
    let error = providers(&ProviderConfig::default())
        .for_provider(Provider::Smtp)
        .send(&account, &email())
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::Transient { .. }), "{error:?}");
    let inbox = inbox.lock().unwrap();
    assert!(inbox.mails.is_empty());
    assert!(inbox.logins.is_empty(), "credentials sent without TLS");
}

/// Through the whole service: an SMTP service composes, queues and sends; the server receives
/// the mail with our stable Message-ID, and the message records it.
#[tokio::test]
async fn the_service_sends_email_through_a_real_smtp_server() {
    let (port, inbox) = start_server(true, None).await;
    let app = crate::helpers::TestApp::spawn().await;
    let (status, service) = app
        .post(
            "/v1/services",
            serde_json::json!({"channel": "email", "provider": "smtp", "name": "Support",
                   "username": "support@example.com",
                   "credentials": {"host": "127.0.0.1", "port": port, "tls": "none",
                                   "username": "mailer", "password": "s3cret-pass"}}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{service}");
    let view = app
        .compose_email(
            service["id"].as_str().unwrap(),
            "alice@example.com",
            serde_json::json!({"send": true}),
        )
        .await;
    let id = view["id"].as_str().unwrap().to_string();
    crate::helpers::eventually(|| async {
        let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
        m["state"] == "sent"
    })
    .await;
    let (_, m) = app.get(&format!("/v1/messages/{id}")).await;
    let message_id = format!("<{id}@example.com>");
    assert_eq!(m["provider_message_id"], message_id.as_str());
    let inbox = inbox.lock().unwrap();
    assert_eq!(inbox.mails.len(), 1);
    let mail = String::from_utf8_lossy(&inbox.mails[0].data).to_string();
    assert_eq!(
        header_value(&mail, "Message-ID").as_deref(),
        Some(message_id.as_str())
    );
    assert_eq!(header_value(&mail, "Subject").as_deref(), Some("Hello"));
    assert_eq!(inbox.mails[0].to, ["alice@example.com"]);
    assert_eq!(
        inbox.mails[0].login.as_ref().map(|l| l.0.as_str()),
        Some("mailer")
    );
}
