//! Value types that can only be built valid.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An email address, checked for the shape that mail servers accept: one `@`, a local part of
/// at most 64 bytes, a domain of dot-separated labels, no spaces or control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EmailAddress(String);

impl EmailAddress {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let s = raw.trim();
        if s.is_empty() {
            return Err("an email address is required".into());
        }
        if s.len() > 254 {
            return Err(format!("`{s}` is longer than 254 characters"));
        }
        if s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || "<>()[],;:\\\"".contains(c))
        {
            return Err(format!(
                "`{s}` contains a character not allowed in an email address"
            ));
        }
        let (local, domain) = s
            .rsplit_once('@')
            .ok_or_else(|| format!("`{s}` is not an email address (no `@`)"))?;
        if local.is_empty() || local.len() > 64 || local.contains('@') {
            return Err(format!("`{s}` has an invalid local part"));
        }
        // Dots separate the local part's atoms: none first, last, or two in a row (quoted
        // local parts, which would allow them, are not accepted at all).
        if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return Err(format!(
                "`{s}` has a dot at the start or end of its local part, or two in a row"
            ));
        }
        let labels: Vec<&str> = domain.split('.').collect();
        let label_ok = |l: &&str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_alphanumeric() || c == '-')
        };
        if labels.len() < 2 || !labels.iter().all(label_ok) {
            return Err(format!("`{s}` has an invalid domain"));
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part after the `@`, used for the stable `Message-ID` of outgoing mail.
    pub fn domain(&self) -> &str {
        self.0.rsplit_once('@').map(|(_, d)| d).unwrap_or_default()
    }
}

impl TryFrom<String> for EmailAddress {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<EmailAddress> for String {
    fn from(value: EmailAddress) -> Self {
        value.0
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An X handle as X allows them: 1 to 15 letters, digits or underscores; the `@` it may be
/// typed with is not part of it.
pub fn x_handle(raw: &str) -> Result<&str, &'static str> {
    let raw = raw.trim();
    let handle = raw.strip_prefix('@').unwrap_or(raw);
    let ok = (1..=15).contains(&handle.len())
        && handle
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(handle)
    } else {
        Err("an X handle is 1 to 15 letters, digits or underscores")
    }
}

/// Free text meant for one line (a name, a subject): no line breaks or other control
/// characters (a tab aside). A NUL, which PostgreSQL's text cannot hold, is one of them.
pub fn one_line(value: &str) -> bool {
    !value.chars().any(|c| c.is_control() && c != '\t')
}

/// A profile: someone on a network, named by the network's username (an email address, an X
/// handle, a Facebook id). The network is the message's channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Profile {
    pub username: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Profile {
    pub fn new(username: impl Into<String>, name: Option<String>) -> Self {
        Self {
            username: username.into(),
            name,
        }
    }
}
