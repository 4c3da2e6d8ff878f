//! The service's clock.

use chrono::{DateTime, SubsecRound, Utc};

/// Now, to the microsecond: the precision PostgreSQL keeps, so that a time the service records
/// reads back the same from either backend and from an event's payload as from a table's column.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// `wait` after `at`, to the microsecond (a provider's `Retry-After` date and a jittered
/// backoff are finer); `None` past the calendar's end.
pub fn after(at: DateTime<Utc>, wait: std::time::Duration) -> Option<DateTime<Utc>> {
    let wait = chrono::Duration::from_std(wait).ok()?;
    Some(at.checked_add_signed(wait)?.trunc_subsecs(6))
}

#[cfg(test)]
mod tests {
    use chrono::Timelike;

    #[test]
    fn now_has_whole_microseconds() {
        for _ in 0..100 {
            assert_eq!(super::now().nanosecond() % 1_000, 0);
        }
    }
}
