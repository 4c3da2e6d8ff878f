//! The messaging domain: the Message aggregate, its commands and events, per-channel state
//! machines, value types that can only be built valid, and per-channel message builders.
//!
//! Pure: no database, network or clock. Anything external is resolved before a command and
//! carried in it, so replaying events is exact and tests need no set-up.

pub mod builder;
pub mod channel;
pub mod command;
pub mod event;
pub mod ids;
pub mod message;
pub mod state;
pub mod tweet_text;
pub mod values;

pub use builder::{build_message, FieldError, MessageInput, OutboundMessage, ServiceRef};
pub use channel::{Channel, Direction, Provider};
pub use command::{Compose, Dispatch, Fact, MessageCommand, Receive};
pub use event::{DeliveryOutcome, MessageEvent};
pub use ids::{MessageId, ServiceId};
pub use message::{Message, MessageData, MessageError};
pub use state::MessageState;
pub use values::{one_line, x_handle, EmailAddress, Profile};
