//! Running a command through cqrs-es, the same way on every backend.

use super::CommandError;
use crate::metrics::{command_name, Metrics};
use cqrs_es::persist::{PersistedEventRepository, PersistedEventStore};
use cqrs_es::{AggregateError, CqrsFramework};
use messaging_domain::{Message, MessageCommand, MessageId};
use rand::Rng;
use std::time::Duration;

/// The command side over one backend's event repository (event-store mode only: the
/// snapshot and aggregate-store modes of cqrs-es 0.5.0 apply each event twice).
pub type MessageCqrs<R> = CqrsFramework<Message, PersistedEventStore<R, Message>>;

/// How many times a command is retried when another writer appended to the same message
/// first (the repositories report that as `AggregateConflict`, which cqrs-es never retries).
const CONFLICT_RETRIES: u32 = 8;

/// Runs a command (see [`execute_with_retries`]) and counts it by type and outcome.
pub async fn execute<R: PersistedEventRepository>(
    cqrs: &MessageCqrs<R>,
    metrics: Option<&Metrics>,
    id: MessageId,
    command: MessageCommand,
) -> Result<(), CommandError> {
    let name = command_name(&command);
    let result = execute_with_retries(cqrs, id, command).await;
    if let Some(metrics) = metrics {
        metrics.command(name, &result);
    }
    result
}

/// Runs a command, deciding again when another writer appended to the message first.
async fn execute_with_retries<R: PersistedEventRepository>(
    cqrs: &MessageCqrs<R>,
    id: MessageId,
    command: MessageCommand,
) -> Result<(), CommandError> {
    let aggregate_id = id.to_string();
    for attempt in 1..=CONFLICT_RETRIES {
        match cqrs.execute(&aggregate_id, command.clone()).await {
            Ok(()) => return Ok(()),
            Err(AggregateError::UserError(e)) => return Err(CommandError::Rejected(e)),
            Err(AggregateError::AggregateConflict) => {
                // Reload and decide again after a short, jittered pause.
                let jitter = rand::thread_rng().gen_range(1..=5 * u64::from(attempt));
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            Err(e) => return Err(store_failure(e)),
        }
    }
    Err(CommandError::Busy)
}

/// A command cqrs-es could not run for a reason of the store's: unavailable when the database
/// could not be reached in time (see [`crate::store::unavailable`]), else a store error.
fn store_failure(e: AggregateError<messaging_domain::MessageError>) -> CommandError {
    let cause = match &e {
        AggregateError::DatabaseConnectionError(cause)
        | AggregateError::DeserializationError(cause)
        | AggregateError::UnexpectedError(cause) => Some(cause),
        _ => None,
    };
    if cause.is_some_and(|c| crate::store::unavailable(c.as_ref())) {
        CommandError::Unavailable(e.to_string())
    } else {
        CommandError::Store(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_that_found_no_connection_in_time_is_unavailable_not_failed() {
        let timed_out =
            AggregateError::DatabaseConnectionError(Box::new(sqlx::Error::PoolTimedOut));
        assert!(matches!(
            store_failure(timed_out),
            CommandError::Unavailable(_)
        ));
        // postgres-es reports other sqlx errors as unexpected: still unavailable when the
        // cause is the pool's.
        let closed = AggregateError::UnexpectedError(Box::new(sqlx::Error::PoolClosed));
        assert!(matches!(
            store_failure(closed),
            CommandError::Unavailable(_)
        ));
        let refused = AggregateError::UnexpectedError(Box::new(sqlx::Error::RowNotFound));
        assert!(matches!(store_failure(refused), CommandError::Store(_)));
    }
}
