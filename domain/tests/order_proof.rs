//! Order-proof state: the final state and counts are a function of the set of provider facts,
//! whatever their arrival order, and duplicates change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use chrono::{TimeZone, Utc};
use messaging_domain::*;
use proptest::prelude::*;
use uuid::Uuid;

fn at(secs: i64) -> chrono::DateTime<Utc> {
    Utc.timestamp_opt(1_764_000_000 + secs, 0)
        .single()
        .expect("valid time")
}

fn queued_and_attempted() -> Message {
    let service = ServiceRef {
        id: ServiceId::from_uuid(Uuid::nil()),
        channel: Channel::Email,
        provider: Provider::Sendgrid,
        username: "news@example.com".into(),
        name: None,
    };
    let input = MessageInput {
        to: vec![Profile::new("alice@example.com", None)],
        subject: Some("Hi".into()),
        text: Some("Hello".into()),
        ..Default::default()
    };
    let mut m = Message::default();
    let commands = vec![
        MessageCommand::Compose(Compose {
            id: MessageId::from_uuid(Uuid::nil()),
            message: build_message(&service, input).expect("valid"),
            dispatch: Dispatch::Now,
            now: at(0),
        }),
        MessageCommand::StartSendAttempt {
            now: at(1),
            attempt: 1,
        },
    ];
    for c in commands {
        for e in m.decide(c).expect("ok") {
            m.apply_event(e);
        }
    }
    m
}

/// Every kind of provider fact, indexed so proptest can pick a set of them.
fn fact_command(kind: u8, n: u8) -> MessageCommand {
    let fact = Fact {
        fact_id: format!("{kind}-{n}"),
        occurred_at: at(10 + i64::from(kind) * 7 + i64::from(n)),
    };
    match kind {
        0 => MessageCommand::RecordSent {
            provider_message_id: Some("sg-1".into()),
            at: at(2),
        },
        1 => MessageCommand::RecordDelivery {
            fact,
            outcome: DeliveryOutcome::Processed,
        },
        2 => MessageCommand::RecordDelivery {
            fact,
            outcome: DeliveryOutcome::Deferred { response: None },
        },
        3 => MessageCommand::RecordDelivery {
            fact,
            outcome: DeliveryOutcome::Delivered { response: None },
        },
        4 => MessageCommand::RecordOpen {
            fact,
            machine_open: n.is_multiple_of(2),
        },
        5 => MessageCommand::RecordClick {
            fact,
            url: Some("https://example.com/offer".into()),
        },
        6 => MessageCommand::RecordReply {
            fact,
            reply_message_id: None,
            from: Profile::new("alice@example.com", None),
        },
        7 => MessageCommand::RecordUnsubscribe {
            fact,
            group_id: None,
        },
        8 => MessageCommand::RecordSpamReport { fact },
        9 => MessageCommand::RecordDelivery {
            fact,
            outcome: DeliveryOutcome::Dropped {
                reason: Some("Bounced Address".into()),
            },
        },
        _ => MessageCommand::RecordDelivery {
            fact,
            outcome: DeliveryOutcome::Bounced {
                reason: Some("550".into()),
                bounce_type: Some("bounce".into()),
            },
        },
    }
}

fn run(commands: &[MessageCommand]) -> (MessageState, u32, u32, u32, usize) {
    let mut m = queued_and_attempted();
    let mut recorded = 0;
    for c in commands {
        let events = m.decide(c.clone()).expect("every fact is accepted");
        recorded += events.len();
        for e in events {
            m.apply_event(e);
        }
    }
    let d = m.data().expect("exists");
    (d.state, d.opens, d.clicks, d.replies, recorded)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_order_of_the_same_facts_gives_the_same_state_and_counts(
        facts in proptest::collection::btree_set((0u8..=10, 0u8..3), 1..12),
        seed in any::<u64>(),
        duplicate_every in 1usize..4,
    ) {
        let in_order: Vec<MessageCommand> =
            facts.iter().map(|(k, n)| fact_command(*k, *n)).collect();
        let expected = run(&in_order);

        // The same facts shuffled, with some delivered again as providers do.
        let mut shuffled = in_order.clone();
        for i in (0..in_order.len()).step_by(duplicate_every) {
            shuffled.push(in_order[i].clone());
        }
        let mut rng = seed;
        for i in (1..shuffled.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = (rng >> 33) as usize % (i + 1);
            shuffled.swap(i, j);
        }
        let got = run(&shuffled);
        prop_assert_eq!(got, expected, "duplicates add no events and order changes nothing");
    }
}
