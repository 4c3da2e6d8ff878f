//! Durable catch-up subscriptions over the event log, and the read models they feed.
//!
//! Never rely on cqrs-es `Query` dispatch for these: it runs after the commit in the writing
//! process, swallows errors and is lost on a crash. A [`Subscription`] instead tails the
//! `events` table from its own checkpoint, which it updates in the same transaction as the
//! projection's writes.
//!
//! Two backends: PostgreSQL (this module's [`Subscription`], the read models' own modules)
//! and SQLite, the embedded default ([`sqlite`]). Each read model implements [`Projection`]
//! for both; the fold of events into rows is shared and only the SQL differs.

pub mod delivery;
pub mod event;
pub mod feed;
pub mod kept;
pub mod message_list;
pub mod shadow;
pub mod sqlite;
pub mod subscription;
pub mod view;

pub use delivery::DeliveryJobs;
pub use event::{load_message, StoredEvent};
pub use feed::{FeedItem, Folds, StateChangeFeed};
pub use kept::KeptConnection;
pub use message_list::MessageList;
pub use sqlite::Subscription as SqliteSubscription;
pub use subscription::{BatchOutcome, Prepared, Projection, ProjectionError, Subscription};
pub use view::{HistoryItem, MessageView};

/// Every projection this service runs on PostgreSQL, by name ([`sqlite::all`] for SQLite).
pub fn all() -> Vec<std::sync::Arc<dyn Projection<sqlx::Postgres>>> {
    vec![
        std::sync::Arc::new(MessageList::default()),
        std::sync::Arc::new(StateChangeFeed::new()),
        std::sync::Arc::new(DeliveryJobs),
    ]
}
