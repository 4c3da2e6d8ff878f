//! Process managers: the only place side effects happen. They react to the schedule and the
//! send queue (tables derived from the log), call providers, and record every outcome as a
//! command on the message.

pub mod push;
pub mod scheduler;
pub mod sender;

use rand::Rng;
use std::time::Duration;

/// Exponential backoff with ±25 % jitter: `base` before the second attempt, doubling for each
/// one after, never more than `max`. The jitter spreads retries so that many failures at once
/// do not come back at once. In whole microseconds, as the service's times are (a retry time
/// is recorded in an event and a table alike; see [`crate::clock`]).
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let wait = base
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(max)
        .mul_f64(rand::thread_rng().gen_range(0.75..=1.25))
        .min(max);
    Duration::from_micros(u64::try_from(wait.as_micros()).unwrap_or(u64::MAX))
}

/// The longest a provider's own word (`Retry-After`, a reset time, Graph's estimate) makes a
/// send wait: a longer one is a provider's mistake, and past the year 262142 the arithmetic
/// on it panicked.
pub const LONGEST_PROVIDER_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_backoff_is_in_whole_microseconds_within_its_jitter() {
        for attempt in 1..8 {
            let wait = super::backoff(Duration::from_millis(333), Duration::from_secs(60), attempt);
            assert_eq!(wait.subsec_nanos() % 1_000, 0, "{wait:?}");
            let nominal =
                (Duration::from_millis(333) * 2u32.pow(attempt - 1)).min(Duration::from_secs(60));
            assert!(
                wait >= nominal.mul_f64(0.75) - Duration::from_micros(1)
                    && wait <= nominal.mul_f64(1.25).min(Duration::from_secs(60)),
                "{wait:?}"
            );
        }
    }
}
