//! Message builders, one per channel: they turn what a user typed into an [`OutboundMessage`]
//! that is valid for the channel, or say which field is wrong. A Compose command can only carry
//! an `OutboundMessage`, so an invalid message never reaches the aggregate.

use crate::channel::{Channel, Provider};
use crate::ids::ServiceId;
use crate::tweet_text;
use crate::values::{one_line, x_handle, EmailAddress, Profile};
use serde::{Deserialize, Serialize};

/// A field that failed validation, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The connected account a message is sent from, as looked up before the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRef {
    pub id: ServiceId,
    pub channel: Channel,
    pub provider: Provider,
    /// The account's own address, handle or page id.
    pub username: String,
    pub name: Option<String>,
}

/// What a user asked for, unchecked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageInput {
    pub to: Vec<Profile>,
    pub subject: Option<String>,
    pub text: Option<String>,
    pub html: Option<String>,
    pub link: Option<String>,
    pub in_reply_to: Option<String>,
}

/// A message that is valid for its channel. Only the builders make one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundMessage {
    service: ServiceRef,
    from: Profile,
    to: Vec<Profile>,
    subject: Option<String>,
    text: Option<String>,
    html: Option<String>,
    link: Option<String>,
    in_reply_to: Option<String>,
}

impl OutboundMessage {
    pub fn service(&self) -> &ServiceRef {
        &self.service
    }
    pub fn from(&self) -> &Profile {
        &self.from
    }
    pub fn to(&self) -> &[Profile] {
        &self.to
    }
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }
    pub fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }
    pub fn html(&self) -> Option<&str> {
        self.html.as_deref()
    }
    pub fn link(&self) -> Option<&str> {
        self.link.as_deref()
    }
    pub fn in_reply_to(&self) -> Option<&str> {
        self.in_reply_to.as_deref()
    }
}

/// Builds a message for the service's channel.
pub fn build_message(
    service: &ServiceRef,
    input: MessageInput,
) -> Result<OutboundMessage, FieldError> {
    match service.channel {
        Channel::Email => EmailBuilder::build(service, input),
        Channel::Twitter => TwitterBuilder::build(service, input),
        Channel::Facebook => FacebookBuilder::build(service, input),
    }
}

fn non_blank(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

/// The id a message answers, if any: one token, no spaces or line breaks (for email it goes
/// into the `In-Reply-To` and `References` headers, where a line break would start a header).
fn reply_target(value: Option<String>) -> Result<Option<String>, FieldError> {
    let Some(id) = non_blank(value) else {
        return Ok(None);
    };
    let id = id.trim().to_string();
    if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(FieldError::new(
            "in_reply_to",
            "must be one id, without spaces or line breaks",
        ));
    }
    Ok(Some(id))
}

fn sender(service: &ServiceRef) -> Profile {
    Profile::new(service.username.clone(), service.name.clone())
}

/// The longest Facebook id or username a message may name (Facebook's usernames are at most
/// 50 characters, its ids a few dozen digits).
pub const MOST_FACEBOOK_ID: usize = 100;

/// Social posts without recipients go to the service's own public profile: every message has
/// at least one recipient, as in the original system.
fn social_recipients(service: &ServiceRef, to: Vec<Profile>) -> Result<Vec<Profile>, FieldError> {
    let mut checked = Vec::with_capacity(to.len());
    for (i, p) in to.into_iter().enumerate() {
        let field = || format!("to[{i}].username");
        let username = match service.channel {
            // Stored as the service's own handle is, without its `@`, so that the list's
            // `profile` filter finds it however it was typed.
            Channel::Twitter => x_handle(&p.username)
                .map_err(|m| FieldError::new(field(), m))?
                .to_string(),
            _ => {
                let id = p.username.trim();
                if id.is_empty() {
                    return Err(FieldError::new(field(), "must not be empty"));
                }
                if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(FieldError::new(
                        field(),
                        "a Facebook id or username has no spaces or control characters",
                    ));
                }
                if id.len() > MOST_FACEBOOK_ID {
                    return Err(FieldError::new(
                        field(),
                        format!(
                            "a Facebook id or username is at most {MOST_FACEBOOK_ID} characters"
                        ),
                    ));
                }
                id.to_string()
            }
        };
        checked.push(Profile::new(username, checked_name(i, p.name)?));
    }
    let to = checked;
    Ok(if to.is_empty() {
        vec![sender(service)]
    } else {
        to
    })
}

/// A recipient's display name: one line (for email it goes into the `To` header).
fn checked_name(i: usize, name: Option<String>) -> Result<Option<String>, FieldError> {
    match name {
        Some(n) if !one_line(&n) => Err(FieldError::new(
            format!("to[{i}].name"),
            "must be one line, without control characters",
        )),
        name => Ok(name),
    }
}

/// The most recipients one email may have: SendGrid refuses a message with more.
pub const MAX_EMAIL_RECIPIENTS: usize = 1000;

fn check_link(link: &Option<String>) -> Result<(), FieldError> {
    if let Some(l) = link {
        let ok = (l.starts_with("https://") || l.starts_with("http://"))
            && l.len() > "https://".len()
            && !l.chars().any(char::is_whitespace);
        if !ok {
            return Err(FieldError::new(
                "link",
                "must be an absolute http or https URL without spaces",
            ));
        }
    }
    Ok(())
}

/// Email: at least one valid address and a subject; text or html.
pub struct EmailBuilder;

impl EmailBuilder {
    pub fn build(service: &ServiceRef, input: MessageInput) -> Result<OutboundMessage, FieldError> {
        if input.to.is_empty() {
            return Err(FieldError::new(
                "to",
                "an email needs at least one recipient address",
            ));
        }
        // Each address once (the first spelling and name kept): SendGrid refuses a
        // personalization that repeats an address, and no recipient wants two copies.
        let mut to: Vec<Profile> = Vec::with_capacity(input.to.len());
        for (i, p) in input.to.into_iter().enumerate() {
            let address = EmailAddress::parse(&p.username)
                .map_err(|m| FieldError::new(format!("to[{i}].username"), m))?;
            let repeated = to
                .iter()
                .any(|seen| seen.username.eq_ignore_ascii_case(address.as_str()));
            if !repeated {
                to.push(Profile::new(address.as_str(), checked_name(i, p.name)?));
            }
        }
        if to.len() > MAX_EMAIL_RECIPIENTS {
            return Err(FieldError::new(
                "to",
                format!(
                    "an email has at most {MAX_EMAIL_RECIPIENTS} recipients ({} given): \
                     send it as several messages",
                    to.len()
                ),
            ));
        }
        let subject = non_blank(input.subject)
            .ok_or_else(|| FieldError::new("subject", "an email needs a subject"))?;
        if !one_line(&subject) {
            return Err(FieldError::new(
                "subject",
                "must be a single line, without control characters",
            ));
        }
        let link = non_blank(input.link);
        check_link(&link)?;
        // The link goes in the email's body (as X's goes in its post's text): after the text,
        // and after the html as an anchor. A link alone is the body.
        let mut text = non_blank(input.text);
        let mut html = non_blank(input.html);
        if let Some(l) = &link {
            text = Some(match text {
                Some(t) => format!("{t}\n\n{l}"),
                None if html.is_none() => l.clone(),
                None => String::new(),
            })
            .filter(|t| !t.is_empty());
            if let Some(h) = html.take() {
                let l = escape_html(l);
                let anchor = format!("<p><a href=\"{l}\">{l}</a></p>");
                // Inside a whole document's body (content after it may be dropped).
                html = Some(match h.to_ascii_lowercase().rfind("</body>") {
                    Some(end) => format!("{}{anchor}\n{}", &h[..end], &h[end..]),
                    None => format!("{h}\n{anchor}"),
                });
            }
        }
        if text.is_none() && html.is_none() {
            return Err(FieldError::new(
                "text",
                "an email needs text, html or a link",
            ));
        }
        Ok(OutboundMessage {
            service: service.clone(),
            from: sender(service),
            to,
            subject: Some(subject),
            text,
            html,
            link,
            in_reply_to: reply_target(input.in_reply_to)?,
        })
    }
}

/// `s` as HTML text or a double-quoted attribute's value.
fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// X: a post of at most 280 weighted characters; a link is appended to the text, where X
/// counts it as 23.
pub struct TwitterBuilder;

impl TwitterBuilder {
    pub fn build(service: &ServiceRef, input: MessageInput) -> Result<OutboundMessage, FieldError> {
        let link = non_blank(input.link);
        check_link(&link)?;
        let text = non_blank(input.text);
        let full = match (text, &link) {
            (Some(t), Some(l)) => format!("{t} {l}"),
            (Some(t), None) => t,
            (None, Some(l)) => l.clone(),
            (None, None) => return Err(FieldError::new("text", "an X post needs text or a link")),
        };
        let weighted = tweet_text::weighted_length(&full);
        if weighted > tweet_text::MAX_WEIGHTED_LENGTH {
            return Err(FieldError::new(
                "text",
                format!(
                    "an X post counts at most {} weighted characters; this one counts {weighted}",
                    tweet_text::MAX_WEIGHTED_LENGTH
                ),
            ));
        }
        if !tweet_text::is_valid_tweet(&full) {
            return Err(FieldError::new(
                "text",
                "contains characters X does not accept",
            ));
        }
        let in_reply_to = reply_target(input.in_reply_to)?;
        if let Some(id) = &in_reply_to {
            if !id.chars().all(|c| c.is_ascii_digit()) {
                return Err(FieldError::new(
                    "in_reply_to",
                    "must be the numeric id of the post being answered",
                ));
            }
        }
        Ok(OutboundMessage {
            service: service.clone(),
            from: sender(service),
            to: social_recipients(service, input.to)?,
            subject: None,
            text: Some(full),
            html: None,
            link,
            in_reply_to,
        })
    }
}

/// Facebook: a page post with text or a link (or both).
pub struct FacebookBuilder;

impl FacebookBuilder {
    /// Facebook's documented limit for a post's message.
    pub const MAX_TEXT_CHARS: usize = 63_206;

    pub fn build(service: &ServiceRef, input: MessageInput) -> Result<OutboundMessage, FieldError> {
        let text = non_blank(input.text);
        let link = non_blank(input.link);
        check_link(&link)?;
        if text.is_none() && link.is_none() {
            return Err(FieldError::new(
                "text",
                "a Facebook post needs text or a link",
            ));
        }
        if text
            .as_ref()
            .is_some_and(|t| t.chars().count() > Self::MAX_TEXT_CHARS)
        {
            return Err(FieldError::new(
                "text",
                format!("must be at most {} characters", Self::MAX_TEXT_CHARS),
            ));
        }
        Ok(OutboundMessage {
            service: service.clone(),
            from: sender(service),
            to: social_recipients(service, input.to)?,
            subject: None,
            text,
            html: None,
            link,
            in_reply_to: reply_target(input.in_reply_to)?,
        })
    }
}
