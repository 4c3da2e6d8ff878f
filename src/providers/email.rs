//! What every email path shares: our stable Message-ID and the RFC 5322 message lettre builds
//! (SMTP and the sandbox send the same bytes).
//!
//! The Message-ID is `<{message id}@{domain of the from address}>`, the same on every attempt
//! and every email provider, so replies (`In-Reply-To`/`References`) find the message, and a
//! retry after a lost answer produces a duplicate that can be recognised.

use super::{OutgoingMessage, SendError};
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::{Address, Message};

/// `<{message id}@{domain}>` for the message's sender.
pub(super) fn message_id_header(message: &OutgoingMessage) -> Result<String, SendError> {
    let domain = message
        .from
        .username
        .rsplit_once('@')
        .map(|(_, domain)| domain.trim())
        .filter(|d| !d.is_empty())
        .ok_or_else(|| SendError::Permanent {
            reason: "the sender's address has no domain".into(),
        })?;
    Ok(format!("<{}@{}>", message.message_id, domain))
}

/// A message id answered, as a header value: angle brackets added when missing.
pub(super) fn angle_bracketed(id: &str) -> String {
    let id = id.trim();
    if id.starts_with('<') && id.ends_with('>') {
        id.to_string()
    } else {
        format!("<{id}>")
    }
}

pub(super) fn mailbox(address: &str, name: Option<&str>) -> Result<Mailbox, SendError> {
    let address: Address = address.trim().parse().map_err(|_| SendError::Permanent {
        reason: format!("`{address}` is not a valid email address"),
    })?;
    let name = name
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(String::from);
    Ok(Mailbox::new(name, address))
}

/// Builds the full message. Text only or html only is a single part; both make a
/// multipart/alternative with the plain part first (readers show the last part they support).
pub(super) fn build(message: &OutgoingMessage) -> Result<Message, SendError> {
    let permanent = |reason: String| SendError::Permanent { reason };
    let mut builder = Message::builder()
        .message_id(Some(message_id_header(message)?))
        .from(mailbox(
            &message.from.username,
            message.from.name.as_deref(),
        )?)
        .subject(message.subject.clone().unwrap_or_default());
    if message.to.is_empty() {
        return Err(permanent("an email needs at least one recipient".into()));
    }
    for to in &message.to {
        builder = builder.to(mailbox(&to.username, to.name.as_deref())?);
    }
    if let Some(answered) = &message.in_reply_to {
        let answered = angle_bracketed(answered);
        builder = builder.in_reply_to(answered.clone()).references(answered);
    }
    let built = match (&message.text, &message.html) {
        (Some(text), Some(html)) => builder.multipart(MultiPart::alternative_plain_html(
            text.clone(),
            html.clone(),
        )),
        (Some(text), None) => builder.singlepart(SinglePart::plain(text.clone())),
        (None, Some(html)) => builder.singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_HTML)
                .body(html.clone()),
        ),
        (None, None) => return Err(permanent("an email needs text or html".into())),
    };
    built.map_err(|e| permanent(format!("cannot build the email: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use messaging_domain::{Channel, MessageId, Profile};

    fn message() -> OutgoingMessage {
        OutgoingMessage {
            message_id: "0190a0b0-0000-7000-8000-000000000001"
                .parse::<MessageId>()
                .unwrap(),
            channel: Channel::Email,
            from: Profile::new("news@example.com", Some("Example News".into())),
            to: vec![Profile::new("ann@example.org", Some("Ann".into()))],
            subject: Some("Hello".into()),
            text: Some("plain".into()),
            html: Some("<p>rich</p>".into()),
            link: None,
            in_reply_to: Some("abc@example.org".into()),
        }
    }

    #[test]
    fn the_message_id_names_our_id_at_the_senders_domain() {
        assert_eq!(
            message_id_header(&message()).unwrap(),
            "<0190a0b0-0000-7000-8000-000000000001@example.com>"
        );
        let mut m = message();
        m.from.username = "nodomain".into();
        assert!(matches!(
            message_id_header(&m),
            Err(SendError::Permanent { .. })
        ));
    }

    #[test]
    fn built_message_carries_threading_headers_and_both_parts() {
        let bytes = build(&message()).unwrap().formatted();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("Message-ID: <0190a0b0-0000-7000-8000-000000000001@example.com>"));
        assert!(text.contains("In-Reply-To: <abc@example.org>"));
        assert!(text.contains("References: <abc@example.org>"));
        assert!(text.contains("multipart/alternative"));
        let plain = text.find("text/plain").unwrap();
        let html = text.find("text/html").unwrap();
        assert!(plain < html, "plain part first");
    }

    #[test]
    fn an_invalid_recipient_is_permanent() {
        let mut m = message();
        m.to[0].username = "not an address".into();
        assert!(matches!(build(&m), Err(SendError::Permanent { .. })));
    }
}
