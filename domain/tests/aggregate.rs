//! Given / when / then tests of the Message aggregate: one behaviour each.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use chrono::{DateTime, Duration, TimeZone, Utc};
use messaging_domain::*;
use uuid::Uuid;

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_764_000_000 + secs, 0)
        .single()
        .expect("valid time")
}

fn service(channel: Channel) -> ServiceRef {
    ServiceRef {
        id: ServiceId::from_uuid(Uuid::now_v7()),
        channel,
        provider: match channel {
            Channel::Email => Provider::Sendgrid,
            Channel::Twitter => Provider::X,
            Channel::Facebook => Provider::Facebook,
        },
        username: match channel {
            Channel::Email => "news@example.com".into(),
            _ => "ourbrand".into(),
        },
        name: Some("Our Brand".into()),
    }
}

fn email_input() -> MessageInput {
    MessageInput {
        to: vec![Profile::new("alice@example.com", Some("Alice".into()))],
        subject: Some("Hello".into()),
        text: Some("Hi Alice".into()),
        ..Default::default()
    }
}

fn compose(channel: Channel, dispatch: Dispatch) -> MessageCommand {
    let input = match channel {
        Channel::Email => email_input(),
        _ => MessageInput {
            text: Some("Hello world".into()),
            ..Default::default()
        },
    };
    let message = build_message(&service(channel), input).expect("valid message");
    MessageCommand::Compose(Compose {
        id: MessageId::from_uuid(Uuid::now_v7()),
        message,
        dispatch,
        now: t(0),
    })
}

fn fact(id: &str, secs: i64) -> Fact {
    Fact {
        fact_id: id.into(),
        occurred_at: t(secs),
    }
}

/// Given these commands (each must succeed), the resulting aggregate.
fn given(commands: Vec<MessageCommand>) -> Message {
    let mut m = Message::default();
    for c in commands {
        for e in m.decide(c).expect("given command succeeds") {
            m.apply_event(e);
        }
    }
    m
}

fn when(m: &Message, c: MessageCommand) -> Result<Vec<MessageEvent>, MessageError> {
    m.decide(c)
}

fn then_state(m: &Message, c: MessageCommand) -> MessageState {
    let mut m = m.clone();
    for e in m.decide(c).expect("command succeeds") {
        m.apply_event(e);
    }
    m.state().expect("exists")
}

fn sent_email() -> Message {
    given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordSent {
            provider_message_id: Some("sg-1".into()),
            at: t(2),
        },
    ])
}

fn invalid(action: &'static str, state: MessageState) -> MessageError {
    MessageError::InvalidTransition { action, state }
}

#[test]
fn an_emails_link_goes_inside_a_whole_html_documents_body() {
    let input = MessageInput {
        text: None,
        html: Some("<html><BODY><p>Hi</p></BODY></html>".into()),
        link: Some("https://example.com/a".into()),
        ..email_input()
    };
    let message = build_message(&service(Channel::Email), input).expect("valid message");
    assert_eq!(
        message.html(),
        Some("<html><BODY><p>Hi</p><p><a href=\"https://example.com/a\">https://example.com/a</a></p>\n</BODY></html>")
    );
    assert_eq!(message.text(), None);
}

#[test]
fn an_email_names_each_recipient_once() {
    let input = MessageInput {
        to: vec![
            Profile::new("alice@example.com", Some("Alice".into())),
            Profile::new("bob@example.com", None),
            Profile::new("Alice@Example.com", Some("Alice again".into())),
        ],
        ..email_input()
    };
    let message = build_message(&service(Channel::Email), input).expect("valid message");
    let to: Vec<(&str, Option<&str>)> = message
        .to()
        .iter()
        .map(|p| (p.username.as_str(), p.name.as_deref()))
        .collect();
    assert_eq!(
        to,
        vec![
            ("alice@example.com", Some("Alice")),
            ("bob@example.com", None)
        ]
    );
}

#[test]
fn addresses_with_misplaced_dots_and_reply_ids_with_line_breaks_are_refused() {
    for bad in [".a@example.com", "a.@example.com", "a..b@example.com"] {
        let input = MessageInput {
            to: vec![Profile::new(bad, None)],
            ..email_input()
        };
        let err = build_message(&service(Channel::Email), input).unwrap_err();
        assert_eq!(err.field, "to[0].username", "{bad}");
    }
    let ok = MessageInput {
        to: vec![Profile::new("first.last+news@example.com", None)],
        ..email_input()
    };
    assert!(build_message(&service(Channel::Email), ok).is_ok());
    let injected = MessageInput {
        in_reply_to: Some("<a@example.com>\r\nBcc: someone@example.org".into()),
        ..email_input()
    };
    let err = build_message(&service(Channel::Email), injected).unwrap_err();
    assert_eq!(err.field, "in_reply_to");
}

#[test]
fn an_x_recipient_is_kept_without_its_at_sign() {
    let input = MessageInput {
        to: vec![Profile::new("@Bob_Smith", None)],
        text: Some("Hello".into()),
        ..Default::default()
    };
    let message = build_message(&service(Channel::Twitter), input).expect("valid post");
    assert_eq!(message.to()[0].username, "Bob_Smith");
}

#[test]
fn recipients_and_subjects_with_control_characters_are_refused() {
    // A NUL in a username stopped PostgreSQL's message list for good (its text cannot hold
    // one); a line break in a name or subject would reach an email header.
    let post = |to: Profile| MessageInput {
        to: vec![to],
        text: Some("Hello".into()),
        ..Default::default()
    };
    for (channel, username) in [
        (Channel::Twitter, "a\u{0}b"),
        (Channel::Twitter, "@"),
        (Channel::Twitter, "a\u{1f}b"),
        (Channel::Twitter, "sixteen_letters_"),
        (Channel::Twitter, "bob smith"),
        (Channel::Facebook, "a\u{0}b"),
        (Channel::Facebook, "page id"),
    ] {
        let err = build_message(&service(channel), post(Profile::new(username, None)))
            .expect_err(username);
        assert_eq!(err.field, "to[0].username", "{channel:?} {username:?}");
    }
    let named = Profile::new("bob", Some("Bob\r\nBcc: x@example.org".into()));
    let err = build_message(&service(Channel::Twitter), post(named)).unwrap_err();
    assert_eq!(err.field, "to[0].name");
    let email = MessageInput {
        to: vec![Profile::new("a@example.com", Some("A\u{0}".into()))],
        ..email_input()
    };
    let err = build_message(&service(Channel::Email), email).unwrap_err();
    assert_eq!(err.field, "to[0].name");
    let subject = MessageInput {
        subject: Some("Hi\u{0}there".into()),
        ..email_input()
    };
    let err = build_message(&service(Channel::Email), subject).unwrap_err();
    assert_eq!(err.field, "subject");
    let fine = post(Profile::new("Bob_Smith", Some("Bob\tSmith".into())));
    assert!(build_message(&service(Channel::Twitter), fine).is_ok());
}

#[test]
fn an_email_has_at_most_a_thousand_recipients() {
    let to = |n: usize| -> Vec<Profile> {
        (0..n)
            .map(|i| Profile::new(format!("r{i}@example.com"), None))
            .collect()
    };
    let at_limit = MessageInput {
        to: to(1000),
        ..email_input()
    };
    assert!(build_message(&service(Channel::Email), at_limit).is_ok());
    let over = MessageInput {
        to: to(1001),
        ..email_input()
    };
    let err = build_message(&service(Channel::Email), over).unwrap_err();
    assert_eq!(err.field, "to");
    assert!(err.message.contains("1001 given"), "{}", err.message);
}

#[test]
fn compose_without_dispatch_makes_a_draft() {
    let m = given(vec![compose(Channel::Email, Dispatch::Draft)]);
    assert_eq!(m.state(), Some(MessageState::Draft));
}

#[test]
fn compose_with_a_future_time_schedules() {
    let m = given(vec![compose(Channel::Email, Dispatch::At(t(60)))]);
    assert_eq!(m.state(), Some(MessageState::Scheduled));
    assert_eq!(m.data().and_then(|d| d.publish_at), Some(t(60)));
}

#[test]
fn compose_with_send_queues() {
    let m = given(vec![compose(Channel::Twitter, Dispatch::Now)]);
    assert_eq!(m.state(), Some(MessageState::Pending));
}

#[test]
fn compose_in_the_past_is_refused() {
    let r = when(
        &Message::default(),
        compose(Channel::Email, Dispatch::At(t(-1))),
    );
    assert_eq!(r, Err(MessageError::ScheduleInPast { publish_at: t(-1) }));
}

#[test]
fn a_publish_at_past_the_year_9999_is_refused() {
    let far = Utc
        .with_ymd_and_hms(10000, 1, 1, 0, 0, 0)
        .single()
        .expect("a valid time");
    let err = when(
        &Message::default(),
        compose(Channel::Email, Dispatch::At(far)),
    )
    .unwrap_err();
    assert_eq!(err, MessageError::ScheduleTooFar { publish_at: far });
    let draft = given(vec![compose(Channel::Email, Dispatch::Draft)]);
    let err = when(
        &draft,
        MessageCommand::Schedule {
            publish_at: far,
            now: t(1),
        },
    )
    .unwrap_err();
    assert_eq!(err, MessageError::ScheduleTooFar { publish_at: far });
}

#[test]
fn compose_twice_is_refused() {
    let m = given(vec![compose(Channel::Email, Dispatch::Draft)]);
    assert_eq!(
        when(&m, compose(Channel::Email, Dispatch::Draft)),
        Err(MessageError::AlreadyExists)
    );
}

#[test]
fn a_command_on_a_message_that_does_not_exist_is_not_found() {
    assert_eq!(
        when(&Message::default(), MessageCommand::Cancel { now: t(0) }),
        Err(MessageError::NotFound)
    );
}

#[test]
fn schedule_a_draft() {
    let m = given(vec![compose(Channel::Email, Dispatch::Draft)]);
    let c = MessageCommand::Schedule {
        publish_at: t(100),
        now: t(1),
    };
    assert_eq!(then_state(&m, c), MessageState::Scheduled);
}

#[test]
fn reschedule_a_scheduled_message() {
    let m = given(vec![
        compose(Channel::Email, Dispatch::At(t(60))),
        MessageCommand::Schedule {
            publish_at: t(120),
            now: t(1),
        },
    ]);
    assert_eq!(m.data().and_then(|d| d.publish_at), Some(t(120)));
}

#[test]
fn schedule_in_the_past_is_refused() {
    let m = given(vec![compose(Channel::Email, Dispatch::Draft)]);
    let r = when(
        &m,
        MessageCommand::Schedule {
            publish_at: t(0),
            now: t(5),
        },
    );
    assert_eq!(r, Err(MessageError::ScheduleInPast { publish_at: t(0) }));
}

#[test]
fn schedule_after_send_is_refused() {
    let r = when(
        &sent_email(),
        MessageCommand::Schedule {
            publish_at: t(500),
            now: t(3),
        },
    );
    assert_eq!(r, Err(invalid("schedule", MessageState::Sent)));
}

#[test]
fn send_a_draft_queues_it() {
    let m = given(vec![compose(Channel::Email, Dispatch::Draft)]);
    let c = MessageCommand::Send {
        now: t(1),
        expected_publish_at: None,
    };
    assert_eq!(then_state(&m, c), MessageState::Pending);
}

#[test]
fn send_of_a_queued_message_changes_nothing() {
    let m = given(vec![compose(Channel::Email, Dispatch::Now)]);
    let c = MessageCommand::Send {
        now: t(1),
        expected_publish_at: None,
    };
    assert_eq!(when(&m, c), Ok(vec![]));
}

#[test]
fn send_after_sent_is_refused() {
    let c = MessageCommand::Send {
        now: t(3),
        expected_publish_at: None,
    };
    assert_eq!(
        when(&sent_email(), c),
        Err(invalid("send", MessageState::Sent))
    );
}

#[test]
fn the_scheduler_firing_for_an_old_time_loses_to_a_reschedule() {
    let m = given(vec![
        compose(Channel::Email, Dispatch::At(t(60))),
        MessageCommand::Schedule {
            publish_at: t(120),
            now: t(1),
        },
    ]);
    let c = MessageCommand::Send {
        now: t(60),
        expected_publish_at: Some(t(60)),
    };
    assert_eq!(
        when(&m, c),
        Err(MessageError::StaleSchedule { expected: t(60) })
    );
}

#[test]
fn the_scheduler_firing_for_the_current_time_queues() {
    let m = given(vec![compose(Channel::Email, Dispatch::At(t(60)))]);
    let c = MessageCommand::Send {
        now: t(60),
        expected_publish_at: Some(t(60)),
    };
    assert_eq!(then_state(&m, c), MessageState::Pending);
}

#[test]
fn cancel_a_scheduled_message() {
    let m = given(vec![compose(Channel::Email, Dispatch::At(t(60)))]);
    assert_eq!(
        then_state(&m, MessageCommand::Cancel { now: t(1) }),
        MessageState::Cancelled
    );
}

#[test]
fn cancel_twice_changes_nothing() {
    let m = given(vec![
        compose(Channel::Email, Dispatch::Draft),
        MessageCommand::Cancel { now: t(1) },
    ]);
    assert_eq!(when(&m, MessageCommand::Cancel { now: t(2) }), Ok(vec![]));
}

#[test]
fn cancel_after_the_provider_call_started_is_refused() {
    let m = given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
    ]);
    assert_eq!(
        when(&m, MessageCommand::Cancel { now: t(2) }),
        Err(invalid("cancel", MessageState::Pending))
    );
}

#[test]
fn an_attempt_abandoned_before_its_call_counts_as_none() {
    let abandon = || MessageCommand::AbandonSendAttempt {
        attempt: 1,
        reason: "the service stopped before the provider call".into(),
        at: t(2),
    };
    // Only an open attempt can be abandoned.
    let queued = given(vec![compose(Channel::Email, Dispatch::Now)]);
    assert_eq!(
        when(&queued, abandon()),
        Err(invalid("abandon a send attempt of", MessageState::Pending))
    );
    let m = given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        abandon(),
    ]);
    let d = m.data().expect("exists");
    assert_eq!((d.attempts, d.attempt_in_progress), (0, false));
    // Not another attempt than the one named (a later one, once a lease ran out, stays open).
    let second = given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordSendFailure {
            attempt: 1,
            reason: "timeout".into(),
            retry_at: Some(t(2)),
            at: t(2),
        },
        MessageCommand::StartSendAttempt {
            now: t(3),
            attempt: 2,
        },
    ]);
    assert_eq!(
        when(&second, abandon()),
        Err(invalid("abandon a send attempt of", MessageState::Pending))
    );
    assert_eq!(d.state, MessageState::Pending);
    // As before any attempt: it may still be cancelled, and its next attempt is the first.
    assert_eq!(
        then_state(&m, MessageCommand::Cancel { now: t(3) }),
        MessageState::Cancelled
    );
    assert!(matches!(
        when(
            &m,
            MessageCommand::StartSendAttempt {
                now: t(3),
                attempt: 1
            }
        )
        .as_deref(),
        Ok([MessageEvent::SendAttemptStarted { attempt: 1, .. }])
    ));
}

#[test]
fn cancel_after_send_is_refused() {
    assert_eq!(
        when(&sent_email(), MessageCommand::Cancel { now: t(3) }),
        Err(invalid("cancel", MessageState::Sent))
    );
}

#[test]
fn a_cancelled_message_cannot_be_sent() {
    let m = given(vec![
        compose(Channel::Email, Dispatch::Draft),
        MessageCommand::Cancel { now: t(1) },
    ]);
    let c = MessageCommand::Send {
        now: t(2),
        expected_publish_at: None,
    };
    assert_eq!(when(&m, c), Err(invalid("send", MessageState::Cancelled)));
}

#[test]
fn a_send_attempt_needs_a_queued_message() {
    let m = given(vec![compose(Channel::Email, Dispatch::Draft)]);
    assert_eq!(
        when(
            &m,
            MessageCommand::StartSendAttempt {
                now: t(1),
                attempt: 1
            }
        ),
        Err(invalid("start a send attempt", MessageState::Draft))
    );
}

#[test]
fn record_sent_keeps_the_provider_id() {
    let m = sent_email();
    let d = m.data().expect("exists");
    assert_eq!(d.state, MessageState::Sent);
    assert_eq!(d.provider_message_id.as_deref(), Some("sg-1"));
    assert_eq!(d.sent_at, Some(t(2)));
    assert_eq!(d.previous_state, Some(MessageState::Pending));
}

#[test]
fn record_sent_before_any_attempt_is_refused() {
    let m = given(vec![compose(Channel::Email, Dispatch::Now)]);
    let c = MessageCommand::RecordSent {
        provider_message_id: None,
        at: t(1),
    };
    assert_eq!(
        when(&m, c),
        Err(invalid("record sent", MessageState::Pending))
    );
}

#[test]
fn a_transient_failure_keeps_the_message_pending_for_a_retry() {
    let m = given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordSendFailure {
            attempt: 1,
            reason: "503 from provider".into(),
            retry_at: Some(t(10)),
            at: t(2),
        },
    ]);
    assert_eq!(m.state(), Some(MessageState::Pending));
    assert_eq!(
        then_state(
            &m,
            MessageCommand::StartSendAttempt {
                now: t(10),
                attempt: 2
            }
        ),
        MessageState::Pending
    );
}

#[test]
fn no_attempt_starts_on_a_message_already_sent() {
    // A sender that read the message before another instance sent it must not send it again.
    assert_eq!(
        when(
            &sent_email(),
            MessageCommand::StartSendAttempt {
                now: t(5),
                attempt: 2
            }
        ),
        Err(invalid("start a send attempt", MessageState::Sent))
    );
    let mut resolved = unknown_x_post();
    let posted = MessageCommand::ResolveSendOutcome {
        posted: true,
        provider_message_id: Some("186".into()),
        send_again: true,
        at: t(60),
    };
    for e in when(&resolved, posted).expect("ok") {
        resolved.apply_event(e);
    }
    assert_eq!(
        when(
            &resolved,
            MessageCommand::StartSendAttempt {
                now: t(61),
                attempt: 2
            }
        ),
        Err(invalid("start a send attempt", MessageState::Sent))
    );
}

#[test]
fn no_retry_once_the_provider_said_it_processed_the_email() {
    // Our record of SendGrid's answer was lost (a timeout recorded as a transient failure),
    // but its `processed` event came: it has the email, and a retry would send it twice.
    let m = given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordSendFailure {
            attempt: 1,
            reason: "timed out".into(),
            retry_at: Some(t(10)),
            at: t(2),
        },
        MessageCommand::RecordDelivery {
            fact: fact("p1", 3),
            outcome: DeliveryOutcome::Processed,
        },
    ]);
    assert_eq!(
        when(
            &m,
            MessageCommand::StartSendAttempt {
                now: t(10),
                attempt: 2
            }
        ),
        Err(invalid("start a send attempt", MessageState::Pending))
    );
    assert!(m.data().expect("exists").provider_has_it());
}

#[test]
fn the_last_failure_fails_the_message_with_its_reason() {
    let m = given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordSendFailure {
            attempt: 1,
            reason: "400 invalid recipient".into(),
            retry_at: None,
            at: t(2),
        },
    ]);
    let d = m.data().expect("exists");
    assert_eq!(d.state, MessageState::Failed);
    assert_eq!(d.last_error.as_deref(), Some("400 invalid recipient"));
}

/// Each attempt command names its attempt: one decided on a read from before another
/// worker's attempt changes nothing. A worker whose round read an abandoned attempt #1 must not
/// close attempt #2, started since by another worker and still in its provider call (its email
/// would be sent twice); one that read the message before attempt #1 failed and was given a
/// retry time must not start attempt #2 at once.
#[test]
fn an_attempt_command_decided_on_an_older_read_is_refused() {
    let second_open = given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordSendFailure {
            attempt: 1,
            reason: "the sender stopped during the provider call".into(),
            retry_at: Some(t(200)),
            at: t(130),
        },
        MessageCommand::StartSendAttempt {
            now: t(200),
            attempt: 2,
        },
    ]);
    let stale_recovery = MessageCommand::RecordSendFailure {
        attempt: 1,
        reason: "the sender stopped during the provider call".into(),
        retry_at: Some(t(210)),
        at: t(205),
    };
    assert_eq!(
        when(&second_open, stale_recovery),
        Err(invalid("record a send failure", MessageState::Pending))
    );
    let stale_unknown = MessageCommand::RecordSendOutcomeUnknown {
        attempt: 1,
        reason: "x".into(),
        at: t(205),
    };
    assert!(when(&second_open, stale_unknown).is_err());
    let d = second_open.data().expect("exists");
    assert!(d.attempt_in_progress && d.attempts == 2);
    // The open one is closed by its own number.
    let current = MessageCommand::RecordSendFailure {
        attempt: 2,
        reason: "503".into(),
        retry_at: Some(t(900)),
        at: t(205),
    };
    assert!(when(&second_open, current).is_ok());

    let retry_waiting = given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordSendFailure {
            attempt: 1,
            reason: "429".into(),
            retry_at: Some(t(900)),
            at: t(2),
        },
    ]);
    // Read before attempt #1: it would start attempt #1 again, at once.
    assert_eq!(
        when(
            &retry_waiting,
            MessageCommand::StartSendAttempt {
                now: t(3),
                attempt: 1
            }
        ),
        Err(invalid("start a send attempt", MessageState::Pending))
    );
}

#[test]
fn a_failure_without_an_attempt_is_refused() {
    let m = given(vec![compose(Channel::Email, Dispatch::Now)]);
    let c = MessageCommand::RecordSendFailure {
        attempt: 0,
        reason: "x".into(),
        retry_at: None,
        at: t(1),
    };
    assert_eq!(
        when(&m, c),
        Err(invalid("record a send failure", MessageState::Pending))
    );
}

#[test]
fn an_unknown_outcome_blocks_a_blind_retry() {
    let m = given(vec![
        compose(Channel::Twitter, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordSendOutcomeUnknown {
            attempt: 1,
            reason: "timed out after the request was sent".into(),
            at: t(31),
        },
    ]);
    assert!(m.data().expect("exists").outcome_unknown);
    assert_eq!(
        when(
            &m,
            MessageCommand::StartSendAttempt {
                now: t(40),
                attempt: 2
            }
        ),
        Err(invalid("start a send attempt", MessageState::Pending))
    );
}

#[test]
fn an_unknown_outcome_without_an_attempt_is_refused() {
    let m = given(vec![compose(Channel::Twitter, Dispatch::Now)]);
    let c = MessageCommand::RecordSendOutcomeUnknown {
        attempt: 0,
        reason: "x".into(),
        at: t(1),
    };
    assert!(matches!(
        when(&m, c),
        Err(MessageError::InvalidTransition { .. })
    ));
}

#[test]
fn record_delivery_moves_sent_to_delivered() {
    let c = MessageCommand::RecordDelivery {
        fact: fact("d1", 5),
        outcome: DeliveryOutcome::Delivered { response: None },
    };
    assert_eq!(then_state(&sent_email(), c), MessageState::Delivered);
}

#[test]
fn processed_is_recorded_but_changes_no_state() {
    let c = MessageCommand::RecordDelivery {
        fact: fact("p1", 5),
        outcome: DeliveryOutcome::Processed,
    };
    let events = when(&sent_email(), c.clone()).expect("ok");
    assert_eq!(events.len(), 1);
    assert_eq!(then_state(&sent_email(), c), MessageState::Sent);
}

#[test]
fn record_open_counts_and_moves_to_opened() {
    let m = given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordSent {
            provider_message_id: None,
            at: t(2),
        },
        MessageCommand::RecordOpen {
            fact: fact("o1", 10),
            machine_open: false,
        },
        MessageCommand::RecordOpen {
            fact: fact("o2", 11),
            machine_open: true,
        },
    ]);
    let d = m.data().expect("exists");
    assert_eq!((d.state, d.opens), (MessageState::Opened, 2));
}

#[test]
fn record_an_open_on_a_draft_is_refused() {
    let m = given(vec![compose(Channel::Email, Dispatch::Draft)]);
    let c = MessageCommand::RecordOpen {
        fact: fact("o1", 1),
        machine_open: false,
    };
    assert_eq!(
        when(&m, c),
        Err(invalid("record an open", MessageState::Draft))
    );
}

#[test]
fn record_an_open_on_an_x_post_is_not_supported() {
    let m = given(vec![
        compose(Channel::Twitter, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
    ]);
    let c = MessageCommand::RecordOpen {
        fact: fact("o1", 1),
        machine_open: false,
    };
    assert_eq!(
        when(&m, c),
        Err(MessageError::NotSupportedOnChannel {
            action: "record an open",
            channel: Channel::Twitter
        })
    );
}

#[test]
fn record_click_counts_and_moves_to_clicked() {
    let c = MessageCommand::RecordClick {
        fact: fact("c1", 5),
        url: Some("https://example.com".into()),
    };
    assert_eq!(then_state(&sent_email(), c), MessageState::Clicked);
}

#[test]
fn record_reply_on_an_x_post() {
    let m = given(vec![
        compose(Channel::Twitter, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordSent {
            provider_message_id: Some("186".into()),
            at: t(2),
        },
    ]);
    let c = MessageCommand::RecordReply {
        fact: fact("tweet-9", 5),
        reply_message_id: None,
        from: Profile::new("someone", None),
    };
    assert_eq!(then_state(&m, c), MessageState::Replied);
}

#[test]
fn record_a_reply_on_a_scheduled_message_is_refused() {
    let m = given(vec![compose(Channel::Facebook, Dispatch::At(t(100)))]);
    let c = MessageCommand::RecordReply {
        fact: fact("r", 5),
        reply_message_id: None,
        from: Profile::new("someone", None),
    };
    assert_eq!(
        when(&m, c),
        Err(invalid("record a reply", MessageState::Scheduled))
    );
}

#[test]
fn spam_report_and_unsubscribe_rank_above_replies() {
    let m = given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordUnsubscribe {
            fact: fact("u", 5),
            group_id: Some(7),
        },
    ]);
    assert_eq!(m.state(), Some(MessageState::Unsubscribed));
    assert_eq!(
        then_state(&m, MessageCommand::RecordSpamReport { fact: fact("s", 6) }),
        MessageState::SpamReported
    );
}

#[test]
fn a_late_delivery_never_moves_an_opened_message_back() {
    let m = given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordOpen {
            fact: fact("o", 50),
            machine_open: false,
        },
    ]);
    let c = MessageCommand::RecordDelivery {
        fact: fact("d", 10),
        outcome: DeliveryOutcome::Delivered { response: None },
    };
    assert_eq!(then_state(&m, c.clone()), MessageState::Opened);
    assert_eq!(when(&m, c).map(|e| e.len()), Ok(1), "still recorded");
}

#[test]
fn a_bounce_after_delivery_is_allowed() {
    let m = given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordDelivery {
            fact: fact("d", 10),
            outcome: DeliveryOutcome::Delivered { response: None },
        },
    ]);
    let c = MessageCommand::RecordDelivery {
        fact: fact("b", 20),
        outcome: DeliveryOutcome::Bounced {
            reason: Some("550".into()),
            bounce_type: Some("bounce".into()),
        },
    };
    assert_eq!(then_state(&m, c), MessageState::Bounced);
}

#[test]
fn a_provider_fact_before_our_sent_record_is_kept_and_sent_does_not_lower_it() {
    let m = given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordDelivery {
            fact: fact("d", 3),
            outcome: DeliveryOutcome::Delivered { response: None },
        },
        MessageCommand::RecordSent {
            provider_message_id: Some("sg".into()),
            at: t(4),
        },
    ]);
    let d = m.data().expect("exists");
    assert_eq!(d.state, MessageState::Delivered);
    assert_eq!(d.provider_message_id.as_deref(), Some("sg"));
}

#[test]
fn a_duplicate_fact_changes_nothing() {
    let m = given(vec![
        compose(Channel::Email, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordOpen {
            fact: fact("o", 5),
            machine_open: false,
        },
    ]);
    let again = MessageCommand::RecordOpen {
        fact: fact("o", 5),
        machine_open: false,
    };
    assert_eq!(when(&m, again), Ok(vec![]));
}

#[test]
fn an_inbound_message_is_received_and_cannot_be_sent() {
    let svc = service(Channel::Email);
    let m = given(vec![MessageCommand::Receive(Receive {
        id: MessageId::from_uuid(Uuid::now_v7()),
        service: svc,
        from: Profile::new("alice@example.com", None),
        subject: Some("Re: Hello".into()),
        text: Some("Thanks".into()),
        in_reply_to: None,
        provider_message_id: None,
        received_at: t(9),
    })]);
    assert_eq!(m.state(), Some(MessageState::Received));
    let c = MessageCommand::Send {
        now: t(10),
        expected_publish_at: None,
    };
    assert_eq!(when(&m, c), Err(invalid("send", MessageState::Received)));
}

#[test]
fn events_round_trip_through_json_with_permanent_names() {
    let m = sent_email();
    let _ = m;
    let e = MessageEvent::DeliveryRecorded {
        fact_id: "x".into(),
        outcome: DeliveryOutcome::Bounced {
            reason: Some("550".into()),
            bounce_type: Some("blocked".into()),
        },
        occurred_at: t(1) + Duration::milliseconds(5),
    };
    let json = serde_json::to_value(&e).expect("serializes");
    assert_eq!(json["DeliveryRecorded"]["outcome"], "bounced");
    let back: MessageEvent = serde_json::from_value(json).expect("deserializes");
    assert_eq!(back, e);
    assert_eq!(cqrs_es::DomainEvent::event_type(&e), "DeliveryRecorded");
}

#[test]
fn publish_at_is_kept_to_the_microsecond_the_store_keeps() {
    let m = given(vec![compose(Channel::Email, Dispatch::Draft)]);
    let precise = t(100) + Duration::nanoseconds(123_456_789);
    let c = MessageCommand::Schedule {
        publish_at: precise,
        now: t(1),
    };
    let mut m = m.clone();
    for e in when(&m, c).expect("ok") {
        m.apply_event(e);
    }
    let stored = t(100) + Duration::microseconds(123_456);
    assert_eq!(m.data().and_then(|d| d.publish_at), Some(stored));
    let fire = MessageCommand::Send {
        now: t(100),
        expected_publish_at: Some(stored),
    };
    assert_eq!(then_state(&m, fire), MessageState::Pending);
}

fn unknown_x_post() -> Message {
    given(vec![
        compose(Channel::Twitter, Dispatch::Now),
        MessageCommand::StartSendAttempt {
            now: t(1),
            attempt: 1,
        },
        MessageCommand::RecordSendOutcomeUnknown {
            attempt: 1,
            reason: "timed out after the request was sent".into(),
            at: t(31),
        },
    ])
}

#[test]
fn an_unknown_outcome_resolved_as_posted_is_sent() {
    let c = MessageCommand::ResolveSendOutcome {
        posted: true,
        provider_message_id: Some("186".into()),
        send_again: true,
        at: t(60),
    };
    let mut m = unknown_x_post();
    for e in when(&m, c).expect("ok") {
        m.apply_event(e);
    }
    let d = m.data().expect("exists");
    assert_eq!(d.state, MessageState::Sent);
    assert_eq!(d.provider_message_id.as_deref(), Some("186"));
    assert!(!d.outcome_unknown);
}

#[test]
fn an_unknown_outcome_resolved_as_not_posted_may_be_sent_again() {
    let c = MessageCommand::ResolveSendOutcome {
        posted: false,
        provider_message_id: None,
        send_again: true,
        at: t(60),
    };
    let mut m = unknown_x_post();
    for e in when(&m, c).expect("ok") {
        m.apply_event(e);
    }
    assert_eq!(m.state(), Some(MessageState::Pending));
    assert_eq!(
        then_state(
            &m,
            MessageCommand::StartSendAttempt {
                now: t(61),
                attempt: 2
            }
        ),
        MessageState::Pending
    );
}

#[test]
fn an_unknown_outcome_resolved_as_not_posted_can_be_given_up() {
    let give_up = MessageCommand::ResolveSendOutcome {
        posted: false,
        provider_message_id: None,
        send_again: false,
        at: t(60),
    };
    let mut m = unknown_x_post();
    for e in when(&m, give_up.clone()).expect("ok") {
        m.apply_event(e);
    }
    let d = m.data().expect("exists");
    assert_eq!(d.state, MessageState::Failed);
    assert!(!d.outcome_unknown);
    assert!(d
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("by hand")));
    // Settled: neither sent again nor resolved again.
    assert_eq!(
        when(
            &m,
            MessageCommand::StartSendAttempt {
                now: t(61),
                attempt: 2
            }
        ),
        Err(invalid("start a send attempt", MessageState::Failed))
    );
    assert_eq!(
        when(&m, give_up),
        Err(invalid("resolve the send outcome of", MessageState::Failed))
    );
}

#[test]
fn resolving_an_outcome_that_is_not_unknown_is_refused() {
    let c = MessageCommand::ResolveSendOutcome {
        posted: true,
        provider_message_id: None,
        send_again: true,
        at: t(60),
    };
    assert_eq!(
        when(&sent_email(), c),
        Err(invalid("resolve the send outcome of", MessageState::Sent))
    );
}

#[test]
fn a_batch_decides_each_command_against_the_state_the_previous_ones_left() {
    let c = MessageCommand::Batch(vec![
        MessageCommand::RecordOpen {
            fact: fact("o1", 5),
            machine_open: false,
        },
        MessageCommand::RecordOpen {
            fact: fact("o1", 5),
            machine_open: false,
        },
        MessageCommand::RecordClick {
            fact: fact("c1", 6),
            url: None,
        },
    ]);
    let events = when(&sent_email(), c.clone()).expect("ok");
    assert_eq!(
        events.len(),
        2,
        "the duplicate inside the batch adds nothing"
    );
    assert_eq!(then_state(&sent_email(), c), MessageState::Clicked);
}

#[test]
fn a_batch_with_one_invalid_command_records_nothing() {
    let m = given(vec![compose(Channel::Email, Dispatch::Draft)]);
    let c = MessageCommand::Batch(vec![
        MessageCommand::Schedule {
            publish_at: t(100),
            now: t(1),
        },
        MessageCommand::RecordOpen {
            fact: fact("o1", 5),
            machine_open: false,
        },
    ]);
    assert_eq!(
        when(&m, c),
        Err(invalid("record an open", MessageState::Scheduled))
    );
}

/// A stored snapshot is the message serialized: read back, it is the same message, and it
/// decides every command as the fold of its events does (a fact it has seen is no news).
#[test]
fn a_message_read_back_from_its_snapshot_decides_as_its_fold() {
    let mut m = sent_email();
    for n in 0..5 {
        for e in when(
            &m,
            MessageCommand::RecordOpen {
                fact: fact(&format!("o{n}"), 10 + n),
                machine_open: false,
            },
        )
        .expect("an open")
        {
            m.apply_event(e);
        }
    }
    let snapshot = serde_json::to_string(&m).expect("serialized");
    let restored: Message = serde_json::from_str(&snapshot).expect("read back");
    assert_eq!(restored, m);
    let seen = MessageCommand::RecordOpen {
        fact: fact("o3", 13),
        machine_open: false,
    };
    assert_eq!(when(&restored, seen), Ok(vec![]));
    let new = MessageCommand::RecordOpen {
        fact: fact("o9", 19),
        machine_open: false,
    };
    assert_eq!(when(&restored, new.clone()), when(&m, new));
}
