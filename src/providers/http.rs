//! What the HTTP providers share: the client, and the classification of failures into
//! [`SendError`]s.
//!
//! The one question that matters for a retry is "could the provider have acted on the request?"
//! - `reqwest::Error::is_connect()`: the TCP/TLS connection was never established (refused,
//!   unreachable, DNS, connect timeout). No byte of the request left us: a retry is safe.
//! - `is_timeout()` without `is_connect()`, or `is_request()`/`is_body()`: the connection was up
//!   and the request was (or may have been) written, but no complete answer came. The provider
//!   may have acted on it. What that means is per provider ([`AfterSend`]).
//! - An HTTP status: the provider answered, so we know (5xx and 429: it did not act; other
//!   4xx: it refused).

use super::{ProvidersError, SendError};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use std::time::{Duration, SystemTime};

/// Longest reason kept from a provider's error body: enough to act on, not a whole page.
const MAX_REASON_CHARS: usize = 500;

pub(super) fn client(timeout: Duration) -> Result<reqwest::Client, ProvidersError> {
    reqwest::Client::builder()
        .timeout(timeout)
        // Bounded separately so that an unreachable host fails fast as a connect error
        // (classified as safe to retry) rather than as an overall timeout.
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("messaging/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ProvidersError::HttpClient(e.to_string()))
}

/// Parses a configured base URL, keeping no trailing slash so paths join predictably.
pub(super) fn base_url(raw: &str) -> Result<Url, ProvidersError> {
    let url = Url::parse(raw.trim_end_matches('/')).map_err(|e| ProvidersError::BaseUrl {
        url: raw.to_string(),
        reason: e.to_string(),
    })?;
    if url.cannot_be_a_base() || !matches!(url.scheme(), "http" | "https") {
        return Err(ProvidersError::BaseUrl {
            url: raw.to_string(),
            reason: "must be an http:// or https:// URL".into(),
        });
    }
    Ok(url)
}

/// Joins `path` segments (already safe, or encoded here) to a base URL.
pub(super) fn endpoint(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// What a lost answer means for a provider, once the request may have been delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterSend {
    /// Duplicates are detectable downstream (email: our Message-ID and `custom_args`), so a
    /// retry is acceptable.
    Retry,
    /// A retry could publish twice (posts): the sender must not retry blindly.
    Ambiguous,
}

/// Classifies a transport-level failure (no HTTP status was received).
pub(super) fn transport_error(
    provider: &str,
    error: reqwest::Error,
    after: AfterSend,
) -> SendError {
    // Base URLs are configuration, not secrets, but keep reasons short and URL-free anyway.
    let error = error.without_url();
    let detail = error_chain(&error);
    if error.is_connect() {
        return SendError::Transient {
            reason: format!("{provider}: could not connect: {detail}"),
            retry_after: None,
        };
    }
    if error.is_builder() {
        // Raised before anything is sent, for a request we cannot even build (say, a token
        // that is not a valid header value): retrying the same request cannot help.
        return SendError::Permanent {
            reason: format!("{provider}: invalid request: {detail}"),
        };
    }
    let what = if error.is_timeout() {
        "no answer within the timeout"
    } else {
        "the connection failed after the request was sent"
    };
    match after {
        AfterSend::Retry => SendError::Transient {
            reason: format!("{provider}: {what}: {detail}"),
            retry_after: None,
        },
        AfterSend::Ambiguous => SendError::Ambiguous {
            reason: format!("{provider}: {what}; the request may have been processed: {detail}"),
        },
    }
}

/// Classifies an HTTP error status. `reason` is what the provider's error body says (already
/// extracted), `headers` carry rate-limit hints.
///
/// 429 and 503 say the request was not taken (rate limited, unavailable): safe to retry for
/// every provider. Any other 5xx (500, a gateway's 502 or 504) may come after the provider's
/// back end acted on it, the post created and only the answer lost: a retry is acceptable
/// where duplicates are detectable (`AfterSend::Retry`, email) and Ambiguous for posts.
pub(super) fn status_error(
    provider: &str,
    status: StatusCode,
    headers: &HeaderMap,
    reason: Option<String>,
    now: SystemTime,
    after: AfterSend,
) -> SendError {
    let reason = match reason {
        Some(r) => format!("{provider}: {status}: {}", truncate(&r)),
        None => format!("{provider}: {status}"),
    };
    let not_taken =
        status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE;
    if not_taken || (status.is_server_error() && after == AfterSend::Retry) {
        SendError::Transient {
            reason,
            retry_after: retry_after(headers, now),
        }
    } else if status.is_server_error() {
        SendError::Ambiguous {
            reason: format!("{reason}; the request may have been processed"),
        }
    } else {
        SendError::Permanent { reason }
    }
}

/// The provider's own hint of when to come back: `Retry-After` (delay-seconds or an HTTP date,
/// RFC 9110 section 10.2.3), else the latest of X's `x-rate-limit-reset` (epoch seconds when
/// the 15-minute window resets) and the reset of each 24-hour cap X says is used up
/// (`x-user-limit-24hour-remaining: 0`, `x-app-limit-24hour-remaining: 0`): an account at its
/// daily post cap is refused until that cap's reset, whatever its 15-minute window says, and
/// retrying at the window's reset only spends the message's attempts. A time already past
/// means "now" (zero).
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let longest = crate::process_managers::LONGEST_PROVIDER_WAIT;
    if let Some(value) = header(RETRY_AFTER.as_str()) {
        if let Ok(seconds) = value.parse::<u64>() {
            return Some(Duration::from_secs(seconds).min(longest));
        }
        if let Ok(at) = httpdate::parse_http_date(value) {
            return Some(
                at.duration_since(now)
                    .unwrap_or(Duration::ZERO)
                    .min(longest),
            );
        }
    }
    let epoch_second = |name: &str| {
        let reset = header(name)?.parse::<u64>().ok()?;
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(reset))
    };
    // X's `x-rate-limit-reset`, SendGrid's `X-RateLimit-Reset`: the epoch second it resets.
    let window = epoch_second("x-rate-limit-reset").or_else(|| epoch_second("x-ratelimit-reset"));
    let daily_caps = ["x-user-limit-24hour", "x-app-limit-24hour"]
        .into_iter()
        .filter(|cap| header(&format!("{cap}-remaining")) == Some("0"))
        .filter_map(|cap| epoch_second(&format!("{cap}-reset")));
    let at = window.into_iter().chain(daily_caps).max()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(longest),
    )
}

/// Reads an error response's body as JSON and lets `extract` pick the provider's reason.
pub(super) async fn error_reason(
    response: reqwest::Response,
    extract: impl Fn(&serde_json::Value) -> Option<String>,
) -> Option<String> {
    let body = response.text().await.ok()?;
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(json) => extract(&json),
        // Not JSON (a proxy's HTML page, say): a short excerpt still helps an operator.
        Err(_) if !body.trim().is_empty() && !body.trim_start().starts_with('<') => {
            Some(body.trim().to_string())
        }
        Err(_) => None,
    }
}

/// Removes every secret value from a reason before it is stored or logged: some providers
/// echo parts of a request back in their error messages.
pub(super) fn redact(error: SendError, secrets: &[&str]) -> SendError {
    let clean = |reason: String| {
        secrets
            .iter()
            .filter(|s| !s.is_empty())
            .fold(reason, |r, s| without_cut_secret(r.replace(s, "***"), s))
    };
    match error {
        SendError::Transient {
            reason,
            retry_after,
        } => SendError::Transient {
            reason: clean(reason),
            retry_after,
        },
        SendError::Permanent { reason } => SendError::Permanent {
            reason: clean(reason),
        },
        SendError::Ambiguous { reason } => SendError::Ambiguous {
            reason: clean(reason),
        },
        SendError::NotCalled { reason } => SendError::NotCalled {
            reason: clean(reason),
        },
    }
}

/// The shortest start of a secret that [`redact`] removes where a reason's cut split it.
const LEAST_CUT_SECRET: usize = 4;

/// A reason with the start of `secret` removed where [`truncate`] cut it off (just before a
/// `...`): the whole secret is replaced elsewhere, but a cut one would not be found.
fn without_cut_secret(mut reason: String, secret: &str) -> String {
    let mut from = 0;
    while let Some(found) = reason[from..].find("...") {
        let at = from + found;
        let cut = (LEAST_CUT_SECRET..secret.len())
            .rev()
            .filter(|k| secret.is_char_boundary(*k))
            .find(|k| reason[..at].ends_with(&secret[..*k]));
        match cut {
            Some(k) => {
                reason.replace_range(at - k..at, "***");
                from = at - k + "***...".len();
            }
            None => from = at + "...".len(),
        }
    }
    reason
}

fn truncate(reason: &str) -> String {
    match reason.char_indices().nth(MAX_REASON_CHARS) {
        Some((cut, _)) => format!("{}...", &reason[..cut]),
        None => reason.to_string(),
    }
}

/// reqwest's top-level message is generic ("error sending request"); the cause is below it.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn at(epoch_seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(epoch_seconds)
    }

    #[test]
    fn retry_after_in_seconds() {
        let h = headers(&[("retry-after", "120")]);
        assert_eq!(retry_after(&h, at(0)), Some(Duration::from_secs(120)));
    }

    #[test]
    fn retry_after_as_an_http_date() {
        // 1_700_000_000 is Tue, 14 Nov 2023 22:13:20 GMT.
        let h = headers(&[("retry-after", "Tue, 14 Nov 2023 22:13:50 GMT")]);
        assert_eq!(
            retry_after(&h, at(1_700_000_000)),
            Some(Duration::from_secs(30))
        );
        // A date already past means: now.
        assert_eq!(retry_after(&h, at(1_800_000_000)), Some(Duration::ZERO));
    }

    #[test]
    fn x_rate_limit_reset_is_an_epoch_time() {
        let h = headers(&[("x-rate-limit-reset", "1700000900")]);
        assert_eq!(
            retry_after(&h, at(1_700_000_000)),
            Some(Duration::from_secs(900))
        );
    }

    #[test]
    fn sendgrids_reset_header_is_read_and_absurd_waits_are_capped() {
        let h = headers(&[("x-ratelimit-reset", "1700000060")]);
        assert_eq!(
            retry_after(&h, at(1_700_000_000)),
            Some(Duration::from_secs(60))
        );
        let day = crate::process_managers::LONGEST_PROVIDER_WAIT;
        for h in [
            headers(&[("retry-after", "99999999999999")]),
            headers(&[("x-rate-limit-reset", "9000000000000000")]),
        ] {
            assert_eq!(retry_after(&h, at(1_700_000_000)), Some(day));
        }
        // Past what a clock can hold: ignored, not a panic.
        let h = headers(&[("x-rate-limit-reset", "18446744073709551615")]);
        assert_eq!(retry_after(&h, at(1_700_000_000)), None);
    }

    #[test]
    fn a_used_up_daily_cap_waits_for_its_own_reset() {
        // At X's 24-hour post cap the 15-minute window may still have room: its reset is not
        // when the account can post again.
        let h = headers(&[
            ("x-rate-limit-reset", "1700000900"),
            ("x-rate-limit-remaining", "299"),
            ("x-user-limit-24hour-remaining", "0"),
            ("x-user-limit-24hour-reset", "1700050000"),
            ("x-app-limit-24hour-remaining", "1200"),
            ("x-app-limit-24hour-reset", "1700070000"),
        ]);
        assert_eq!(
            retry_after(&h, at(1_700_000_000)),
            Some(Duration::from_secs(50_000))
        );
        // The app's cap used up, no window header at all.
        let h = headers(&[
            ("x-app-limit-24hour-remaining", "0"),
            ("x-app-limit-24hour-reset", "1700003000"),
        ]);
        assert_eq!(
            retry_after(&h, at(1_700_000_000)),
            Some(Duration::from_secs(3000))
        );
        // A cap with posts left does not hold the retry back.
        let h = headers(&[
            ("x-rate-limit-reset", "1700000900"),
            ("x-user-limit-24hour-remaining", "3"),
            ("x-user-limit-24hour-reset", "1700050000"),
        ]);
        assert_eq!(
            retry_after(&h, at(1_700_000_000)),
            Some(Duration::from_secs(900))
        );
    }

    #[test]
    fn retry_after_wins_over_the_reset_time_and_garbage_is_ignored() {
        let h = headers(&[("retry-after", "5"), ("x-rate-limit-reset", "1700000900")]);
        assert_eq!(
            retry_after(&h, at(1_700_000_000)),
            Some(Duration::from_secs(5))
        );
        let h = headers(&[("retry-after", "soon")]);
        assert_eq!(retry_after(&h, at(0)), None);
    }

    #[test]
    fn statuses_are_classified() {
        let none = HeaderMap::new();
        let now = at(0);
        for after in [AfterSend::Retry, AfterSend::Ambiguous] {
            assert!(matches!(
                status_error(
                    "p",
                    StatusCode::SERVICE_UNAVAILABLE,
                    &none,
                    None,
                    now,
                    after
                ),
                SendError::Transient { .. }
            ));
        }
        // Past a gateway's 500, 502 or 504 a post may exist: not retried blindly.
        for status in [500, 502, 504].map(|s| StatusCode::from_u16(s).unwrap()) {
            assert!(matches!(
                status_error("p", status, &none, None, now, AfterSend::Retry),
                SendError::Transient { .. }
            ));
            assert!(matches!(
                status_error("p", status, &none, None, now, AfterSend::Ambiguous),
                SendError::Ambiguous { .. }
            ));
        }
        assert_eq!(
            status_error(
                "p",
                StatusCode::TOO_MANY_REQUESTS,
                &headers(&[("retry-after", "7")]),
                None,
                now,
                AfterSend::Ambiguous
            ),
            SendError::Transient {
                reason: "p: 429 Too Many Requests".into(),
                retry_after: Some(Duration::from_secs(7)),
            }
        );
        assert_eq!(
            status_error(
                "p",
                StatusCode::BAD_REQUEST,
                &none,
                Some("bad from".into()),
                now,
                AfterSend::Ambiguous
            ),
            SendError::Permanent {
                reason: "p: 400 Bad Request: bad from".into()
            }
        );
    }

    #[test]
    fn long_reasons_are_cut() {
        let long = "é".repeat(2 * MAX_REASON_CHARS);
        let cut = truncate(&long);
        assert_eq!(cut.chars().count(), MAX_REASON_CHARS + 3);
    }

    #[test]
    fn redaction_removes_a_secret_the_cut_split() {
        let secret = "EAAGm0PX4ZCpsBAKZC9secret";
        let body = format!(
            "{}{secret} is not a valid token",
            "x".repeat(MAX_REASON_CHARS - 10)
        );
        let e = status_error(
            "facebook",
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            Some(body),
            SystemTime::now(),
            AfterSend::Ambiguous,
        );
        let SendError::Permanent { reason } = redact(e, &[secret]) else {
            panic!("a 400 is permanent");
        };
        assert!(!reason.contains(&secret[..LEAST_CUT_SECRET]), "{reason}");
        assert!(reason.ends_with("***..."), "{reason}");
    }

    #[test]
    fn redaction_removes_secrets_from_every_kind() {
        let e = SendError::Permanent {
            reason: "token abc123 is invalid".into(),
        };
        assert_eq!(
            redact(e, &["abc123", ""]),
            SendError::Permanent {
                reason: "token *** is invalid".into()
            }
        );
    }

    #[test]
    fn endpoints_join_segments_and_encode_them() {
        let base = base_url("http://127.0.0.1:9/prefix/").unwrap();
        assert_eq!(
            endpoint(&base, &["v21.0", "12/34", "feed"]).as_str(),
            "http://127.0.0.1:9/prefix/v21.0/12%2F34/feed"
        );
        assert!(base_url("ftp://x").is_err());
        assert!(base_url("not a url").is_err());
    }
}
