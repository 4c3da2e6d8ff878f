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
/// do not come back at once.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    base.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(max)
        .mul_f64(rand::thread_rng().gen_range(0.75..=1.25))
        .min(max)
}

/// The longest a provider's own word (`Retry-After`, a reset time, Graph's estimate) makes a
/// send wait: a longer one is a provider's mistake, and past the year 262142 the arithmetic
/// on it panicked.
pub const LONGEST_PROVIDER_WAIT: Duration = Duration::from_secs(24 * 60 * 60);
