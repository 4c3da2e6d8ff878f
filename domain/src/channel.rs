//! Channels, providers and directions.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The network a message travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Email,
    Twitter,
    Facebook,
}

impl Channel {
    pub fn as_str(&self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Twitter => "twitter",
            Channel::Facebook => "facebook",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "email" => Some(Channel::Email),
            "twitter" => Some(Channel::Twitter),
            "facebook" => Some(Channel::Facebook),
            _ => None,
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who carries a channel's messages for a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    Sendgrid,
    Smtp,
    X,
    Facebook,
    /// Records messages locally instead of calling a network: for trying the service offline.
    Sandbox,
}

impl Provider {
    pub fn as_str(&self) -> &'static str {
        match self {
            Provider::Sendgrid => "sendgrid",
            Provider::Smtp => "smtp",
            Provider::X => "x",
            Provider::Facebook => "facebook",
            Provider::Sandbox => "sandbox",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "sendgrid" => Some(Provider::Sendgrid),
            "smtp" => Some(Provider::Smtp),
            "x" => Some(Provider::X),
            "facebook" => Some(Provider::Facebook),
            "sandbox" => Some(Provider::Sandbox),
            _ => None,
        }
    }

    /// Whether this provider can carry messages of `channel`.
    pub fn serves(&self, channel: Channel) -> bool {
        matches!(
            (self, channel),
            (Provider::Sendgrid | Provider::Smtp, Channel::Email)
                | (Provider::X, Channel::Twitter)
                | (Provider::Facebook, Channel::Facebook)
                | (Provider::Sandbox, _)
        )
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether we sent a message or received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(&self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "outbound" => Some(Direction::Outbound),
            "inbound" => Some(Direction::Inbound),
            _ => None,
        }
    }
}
