//! Signature checks for the webhooks providers send us, and the signature on the pushes we send.
//!
//! Every provider endpoint is unauthenticated at the HTTP level (no bearer key): the only thing
//! that tells a real delivery from a forged one is the provider's signature over the exact bytes
//! it sent. So everything here works on the **raw body bytes as received**, never on re-serialised
//! JSON (key order, whitespace and `\u` escapes would all change and the check would fail, or,
//! worse, pass on something the provider never signed).
//!
//! The functions are pure (no clock, no I/O, no configuration lookups): the HTTP layer passes in
//! the header values, the raw body, the configured secret and, where a replay window applies, the
//! current time. That keeps them testable against the providers' published vectors.
//!
//! HMAC comparisons go through [`Mac::verify_slice`], which compares in constant time, so an
//! attacker cannot learn a valid signature byte by byte from response timings.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::digest::Key;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::{DigestSigner as _, DigestVerifier as _};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePublicKey as _, EncodePublicKey as _};
use sha2::{Digest as _, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Why a webhook or push signature was refused.
///
/// The variants separate "the sender is misconfigured or the request is malformed" from "the
/// signature simply does not match", so the caller can log the former loudly. None of them
/// should be shown to the sender in detail: a forger learns nothing useful from "mismatch".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The signature header was absent or blank (pass `""` for an absent header).
    #[error("the signature header is missing")]
    MissingSignature,
    /// The signature header is present but not in the provider's format.
    #[error("the signature header is malformed: {0}")]
    MalformedSignature(&'static str),
    /// The signature is well-formed but was not made with our key/secret over these bytes.
    #[error("the signature does not match the request")]
    SignatureMismatch,
    /// The configured SendGrid public key is not base64 of a P-256 SubjectPublicKeyInfo.
    #[error("the configured public key is invalid: {0}")]
    InvalidPublicKey(&'static str),
    /// The configured shared secret is empty: anyone could compute an HMAC with an empty key,
    /// so accepting it would mean accepting forgeries.
    #[error("the configured secret is empty")]
    EmptySecret,
    /// The timestamp header or `t=` field is not a decimal count of Unix seconds.
    #[error("the signature timestamp is malformed")]
    MalformedTimestamp,
    /// The signature is genuine but its timestamp lies outside the accepted window: a replay,
    /// or a sender whose clock is badly off.
    #[error(
        "the signature timestamp {timestamp} is more than {tolerance_secs}s away from now ({now})"
    )]
    StaleTimestamp {
        /// The signed timestamp, in Unix seconds.
        timestamp: i64,
        /// Our clock when checking, in Unix seconds.
        now: i64,
        /// The window we allowed, in seconds either side of `now`.
        tolerance_secs: i64,
    },
    /// [`sendgrid_test_signature`] was given a scalar that is not a valid P-256 private key
    /// (zero, or not below the group order).
    #[error("the signing key is invalid")]
    InvalidSigningKey,
}

// ---------------------------------------------------------------------------------------------
// SendGrid Event Webhook (ECDSA P-256)
// ---------------------------------------------------------------------------------------------

/// Checks SendGrid Event Webhook deliveries ("Signed Event Webhook").
///
/// SendGrid signs each POST with ECDSA over P-256 and SHA-256 and shows the verification key in
/// its settings page as one base64 string. Build this once from the configured key (parsing the
/// key is the expensive, fallible part) and share it across requests.
///
/// Exact formats:
/// - public key: base64 (standard alphabet, padded) of the DER `SubjectPublicKeyInfo` with
///   algorithm `id-ecPublicKey` and curve `prime256v1`; for P-256 it always begins
///   `MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE`.
/// - `X-Twilio-Email-Event-Webhook-Timestamp`: Unix seconds as decimal text.
/// - `X-Twilio-Email-Event-Webhook-Signature`: base64 of the ASN.1 DER `ECDSA-Sig-Value`
///   (`SEQUENCE { r INTEGER, s INTEGER }`), over SHA-256 of the timestamp header's bytes
///   immediately followed by the raw body bytes (no separator).
#[derive(Debug, Clone)]
pub struct SendgridVerifier {
    key: VerifyingKey,
}

impl SendgridVerifier {
    /// Parses the public key exactly as SendGrid displays it (surrounding whitespace, as left by
    /// copy and paste or an env file, is ignored).
    pub fn from_base64_der(public_key_base64: &str) -> Result<Self, VerifyError> {
        let der = BASE64
            .decode(public_key_base64.trim())
            .map_err(|_| VerifyError::InvalidPublicKey("not base64"))?;
        // `from_public_key_der` checks the algorithm OID and the curve OID, so an RSA or
        // Ed25519 key pasted by mistake is refused here rather than failing every request.
        let key = VerifyingKey::from_public_key_der(&der).map_err(|_| {
            VerifyError::InvalidPublicKey("not a DER SubjectPublicKeyInfo for an ECDSA P-256 key")
        })?;
        Ok(Self { key })
    }

    /// Verifies one delivery. Does **not** look at the clock, so SendGrid's published 2020 test
    /// vector still verifies; use [`Self::verify_with_tolerance`] on live traffic to also refuse
    /// replays.
    pub fn verify(
        &self,
        timestamp_header: &str,
        raw_body: &[u8],
        signature_header_base64: &str,
    ) -> Result<(), VerifyError> {
        let signature_b64 = signature_header_base64.trim();
        if signature_b64.is_empty() {
            return Err(VerifyError::MissingSignature);
        }
        let der = BASE64
            .decode(signature_b64)
            .map_err(|_| VerifyError::MalformedSignature("not base64"))?;
        // `from_der` also refuses r or s outside 1..n, so a malformed signature is reported as
        // such instead of as a mismatch. High-s signatures are accepted: SendGrid's signer does
        // not normalise s, and ECDSA itself does not require it.
        let signature = Signature::from_der(&der)
            .map_err(|_| VerifyError::MalformedSignature("not an ASN.1 DER ECDSA signature"))?;
        // Hash the two parts in sequence rather than concatenating them, so the body is not
        // copied. The timestamp is hashed as the header's bytes, not as a re-formatted number.
        let digest = Sha256::new()
            .chain_update(timestamp_header.as_bytes())
            .chain_update(raw_body);
        self.key
            .verify_digest(digest, &signature)
            .map_err(|_| VerifyError::SignatureMismatch)
    }

    /// Like [`Self::verify`], and also refuses a timestamp more than `tolerance_secs` before or
    /// after `now_unix`, so a captured delivery cannot be replayed later.
    ///
    /// The signature is checked first: a [`VerifyError::StaleTimestamp`] therefore always means a
    /// genuine but old (or clock-skewed) delivery, which is worth telling apart in the logs.
    pub fn verify_with_tolerance(
        &self,
        timestamp_header: &str,
        raw_body: &[u8],
        signature_header_base64: &str,
        now_unix: i64,
        tolerance_secs: i64,
    ) -> Result<(), VerifyError> {
        self.verify(timestamp_header, raw_body, signature_header_base64)?;
        let timestamp = parse_unix_seconds(timestamp_header)?;
        check_window(timestamp, now_unix, tolerance_secs)
    }
}

/// For tests and tooling: signs like SendGrid does.
///
/// Derives the P-256 key from the given 32-byte big-endian secret scalar and returns
/// `(public key as SendGrid shows it: base64 DER SubjectPublicKeyInfo, signature header value:
/// base64 DER ECDSA signature over SHA-256(timestamp || body))`. Signing is deterministic
/// (RFC 6979), so the same inputs always give the same signature. Lets integration tests drive
/// `POST /webhooks/sendgrid/events` end to end without SendGrid's private key.
pub fn sendgrid_test_signature(
    secret_scalar_bytes: &[u8; 32],
    timestamp: &str,
    body: &[u8],
) -> Result<(String, String), VerifyError> {
    let signing_key = SigningKey::from_bytes(&(*secret_scalar_bytes).into())
        .map_err(|_| VerifyError::InvalidSigningKey)?;
    let public_der = signing_key
        .verifying_key()
        .to_public_key_der()
        .map_err(|_| VerifyError::InvalidSigningKey)?;
    let digest = Sha256::new()
        .chain_update(timestamp.as_bytes())
        .chain_update(body);
    let signature: Signature = signing_key
        .try_sign_digest(digest)
        .map_err(|_| VerifyError::InvalidSigningKey)?;
    Ok((
        BASE64.encode(public_der.as_bytes()),
        BASE64.encode(signature.to_der().as_bytes()),
    ))
}

// ---------------------------------------------------------------------------------------------
// X (Twitter) Account Activity API
// ---------------------------------------------------------------------------------------------

/// The `response_token` for X's CRC challenge (`GET /webhooks/twitter?crc_token=...`).
///
/// X proves we hold the consumer secret by asking us to HMAC its random token; the exact format
/// is `sha256=` followed by standard, padded base64 of HMAC-SHA256(key = consumer secret,
/// message = crc_token as given). The caller wraps it as `{"response_token": "..."}`.
pub fn x_crc_response(consumer_secret: &str, crc_token: &str) -> String {
    let mut mac = hmac_sha256(consumer_secret.as_bytes());
    mac.update(crc_token.as_bytes());
    format!("sha256={}", BASE64.encode(mac.finalize().into_bytes()))
}

/// Checks `x-twitter-webhooks-signature` on an Account Activity delivery.
///
/// Format: `sha256=` followed by standard, padded base64 of HMAC-SHA256(key = consumer secret,
/// message = raw body). Compared in constant time.
pub fn verify_x_signature(
    consumer_secret: &str,
    raw_body: &[u8],
    header: &str,
) -> Result<(), VerifyError> {
    let encoded = strip_sha256_prefix(header)?;
    let expected = BASE64
        .decode(encoded)
        .map_err(|_| VerifyError::MalformedSignature("not base64 after sha256="))?;
    verify_hmac(consumer_secret, &[raw_body], &expected)
}

// ---------------------------------------------------------------------------------------------
// Facebook (Meta) Graph API webhooks
// ---------------------------------------------------------------------------------------------

/// Checks `X-Hub-Signature-256` on a Facebook Page webhook delivery.
///
/// Format: `sha256=` followed by lowercase hex of HMAC-SHA256(key = app secret, message = raw
/// body). Meta signs the body with non-ASCII characters escaped as `\uXXXX`, exactly as sent, so
/// only the raw bytes verify. Hex is accepted in either case; compared in constant time.
pub fn verify_facebook_signature(
    app_secret: &str,
    raw_body: &[u8],
    header: &str,
) -> Result<(), VerifyError> {
    let encoded = strip_sha256_prefix(header)?;
    let expected = hex::decode(encoded)
        .map_err(|_| VerifyError::MalformedSignature("not hex after sha256="))?;
    verify_hmac(app_secret, &[raw_body], &expected)
}

// ---------------------------------------------------------------------------------------------
// Our own push deliveries (CONTRACT "Push subscriptions")
// ---------------------------------------------------------------------------------------------

/// The `X-Messaging-Signature` header for one push delivery.
///
/// Format: `t=<unix seconds>,v1=<lowercase hex HMAC-SHA256(key = subscription secret,
/// message = "<t>.<body>")>`. The timestamp is inside the MAC so a subscriber can refuse
/// replays; the `v1` label leaves room for a future scheme without breaking parsers.
pub fn sign_push(secret: &str, unix_seconds: i64, body: &[u8]) -> String {
    let t = unix_seconds.to_string();
    let mut mac = hmac_sha256(secret.as_bytes());
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Verifies an `X-Messaging-Signature` header, as a subscriber would (and as our tests do).
///
/// Fields are comma-separated `key=value` pairs in any order; exactly one `t` is required and
/// at least one `v1` (several are allowed so a secret can be rotated by sending both
/// signatures); unknown keys are ignored for forward compatibility. The MAC is computed over the
/// `t` value as it appears in the header. After the signature, the timestamp must be within
/// `tolerance_secs` of `now_unix`, either side.
pub fn verify_push(
    secret: &str,
    header: &str,
    body: &[u8],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    let header = header.trim();
    if header.is_empty() {
        return Err(VerifyError::MissingSignature);
    }
    let mut t: Option<&str> = None;
    let mut candidates: Vec<Vec<u8>> = Vec::new();
    for field in header.split(',') {
        let (key, value) = field
            .trim()
            .split_once('=')
            .ok_or(VerifyError::MalformedSignature("expected key=value fields"))?;
        match key {
            "t" if t.is_some() => return Err(VerifyError::MalformedSignature("more than one t")),
            "t" => t = Some(value),
            "v1" => candidates.push(
                hex::decode(value).map_err(|_| VerifyError::MalformedSignature("v1 is not hex"))?,
            ),
            _ => {}
        }
    }
    let t = t.ok_or(VerifyError::MalformedSignature("no t field"))?;
    if candidates.is_empty() {
        return Err(VerifyError::MalformedSignature("no v1 field"));
    }
    let timestamp = parse_unix_seconds(t)?;
    if secret.is_empty() {
        return Err(VerifyError::EmptySecret);
    }
    // Every candidate is checked in constant time; which one matched is not secret.
    let genuine = candidates
        .iter()
        .any(|expected| verify_hmac(secret, &[t.as_bytes(), b".", body], expected).is_ok());
    if !genuine {
        return Err(VerifyError::SignatureMismatch);
    }
    check_window(timestamp, now_unix, tolerance_secs)
}

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// HMAC-SHA256 keyed with `key`, built without a `Result`.
///
/// `Hmac::new_from_slice` returns a `Result` although HMAC accepts keys of any length. Doing the
/// RFC 2104 key preparation here (hash a key longer than the 64-byte block, zero-pad the rest)
/// yields a block-sized key, which the infallible constructor takes, and gives the same MAC.
fn hmac_sha256(key: &[u8]) -> HmacSha256 {
    let mut block = Key::<HmacSha256>::default();
    if key.len() > block.len() {
        let hashed = Sha256::digest(key);
        block[..hashed.len()].copy_from_slice(&hashed);
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    HmacSha256::new(&block)
}

/// Constant-time check that `expected` is HMAC-SHA256(secret, concatenation of `parts`).
fn verify_hmac(secret: &str, parts: &[&[u8]], expected: &[u8]) -> Result<(), VerifyError> {
    if secret.is_empty() {
        return Err(VerifyError::EmptySecret);
    }
    let mut mac = hmac_sha256(secret.as_bytes());
    for part in parts {
        mac.update(part);
    }
    // `verify_slice` compares in constant time and refuses a wrong length up front.
    mac.verify_slice(expected)
        .map_err(|_| VerifyError::SignatureMismatch)
}

/// The value after `sha256=` in X's and Facebook's headers.
fn strip_sha256_prefix(header: &str) -> Result<&str, VerifyError> {
    let header = header.trim();
    if header.is_empty() {
        return Err(VerifyError::MissingSignature);
    }
    header
        .strip_prefix("sha256=")
        .ok_or(VerifyError::MalformedSignature(
            "expected sha256=<signature>",
        ))
}

/// Unix seconds as plain decimal digits. Signs, spaces and `+` are refused so that exactly one
/// spelling of a timestamp is accepted.
fn parse_unix_seconds(text: &str) -> Result<i64, VerifyError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::MalformedTimestamp);
    }
    text.parse().map_err(|_| VerifyError::MalformedTimestamp)
}

/// Refuses `timestamp` unless it is within `tolerance_secs` of `now_unix` (either side: a
/// timestamp far in the future is as suspicious as an old one). Computed in i128 so extreme
/// inputs cannot overflow; a negative tolerance accepts only the exact second.
fn check_window(timestamp: i64, now_unix: i64, tolerance_secs: i64) -> Result<(), VerifyError> {
    let distance = (i128::from(now_unix) - i128::from(timestamp)).abs();
    if distance <= i128::from(tolerance_secs.max(0)) {
        Ok(())
    } else {
        Err(VerifyError::StaleTimestamp {
            timestamp,
            now: now_unix,
            tolerance_secs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }

    /// SendGrid's published example: `key=value` lines; the payload is the rest of its line
    /// (the file's final newline is not part of what SendGrid signed).
    struct Vector {
        public_key: String,
        signature: String,
        timestamp: String,
        payload: Vec<u8>,
    }

    fn sendgrid_vector() -> Vector {
        let text = String::from_utf8(fixture("sendgrid-webhook-test-vector.txt")).unwrap();
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("{name} missing from the test vector"))
                .to_owned()
        };
        Vector {
            public_key: field("public_key"),
            signature: field("signature"),
            timestamp: field("timestamp"),
            payload: field("payload").into_bytes(),
        }
    }

    /// Positions spread over `len`, always including the first and the last.
    fn positions(len: usize, step: usize) -> Vec<usize> {
        let mut out: Vec<usize> = (0..len).step_by(step).collect();
        if len > 0 && out.last() != Some(&(len - 1)) {
            out.push(len - 1);
        }
        out
    }

    const SENDGRID_KEY_PREFIX: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE";

    // --- SendGrid: the published vector ---------------------------------------------------

    #[test]
    fn sendgrids_published_test_vector_verifies() {
        let v = sendgrid_vector();
        let verifier = SendgridVerifier::from_base64_der(&v.public_key).unwrap();
        assert_eq!(
            verifier.verify(&v.timestamp, &v.payload, &v.signature),
            Ok(())
        );
    }

    #[test]
    fn the_file_newline_is_not_part_of_the_signed_payload() {
        let v = sendgrid_vector();
        let verifier = SendgridVerifier::from_base64_der(&v.public_key).unwrap();
        let mut with_newline = v.payload.clone();
        with_newline.push(b'\n');
        assert_eq!(
            verifier.verify(&v.timestamp, &with_newline, &v.signature),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn flipping_any_body_byte_is_refused() {
        let v = sendgrid_vector();
        let verifier = SendgridVerifier::from_base64_der(&v.public_key).unwrap();
        for i in positions(v.payload.len(), 1) {
            let mut body = v.payload.clone();
            body[i] ^= 0x01;
            assert_eq!(
                verifier.verify(&v.timestamp, &body, &v.signature),
                Err(VerifyError::SignatureMismatch),
                "body byte {i} flipped"
            );
        }
    }

    #[test]
    fn flipping_any_timestamp_byte_is_refused() {
        let v = sendgrid_vector();
        let verifier = SendgridVerifier::from_base64_der(&v.public_key).unwrap();
        for i in 0..v.timestamp.len() {
            let mut bytes = v.timestamp.clone().into_bytes();
            bytes[i] ^= 0x01; // digit to digit (or ':'/'8'/'9' neighbours): still ASCII
            let timestamp = String::from_utf8(bytes).unwrap();
            assert_eq!(
                verifier.verify(&timestamp, &v.payload, &v.signature),
                Err(VerifyError::SignatureMismatch),
                "timestamp byte {i} flipped"
            );
        }
    }

    #[test]
    fn flipping_any_signature_byte_is_refused() {
        let v = sendgrid_vector();
        let verifier = SendgridVerifier::from_base64_der(&v.public_key).unwrap();
        let der = BASE64.decode(&v.signature).unwrap();
        for i in positions(der.len(), 1) {
            let mut flipped = der.clone();
            flipped[i] ^= 0x01;
            // Depending on the byte, the DER no longer parses or r/s change: refused either way.
            let result = verifier.verify(&v.timestamp, &v.payload, &BASE64.encode(&flipped));
            assert!(
                matches!(
                    result,
                    Err(VerifyError::SignatureMismatch | VerifyError::MalformedSignature(_))
                ),
                "signature byte {i} flipped: {result:?}"
            );
        }
    }

    #[test]
    fn a_missing_signature_is_reported_as_missing() {
        let v = sendgrid_vector();
        let verifier = SendgridVerifier::from_base64_der(&v.public_key).unwrap();
        for blank in ["", "  "] {
            assert_eq!(
                verifier.verify(&v.timestamp, &v.payload, blank),
                Err(VerifyError::MissingSignature)
            );
        }
    }

    #[test]
    fn a_garbled_signature_is_reported_as_malformed() {
        let v = sendgrid_vector();
        let verifier = SendgridVerifier::from_base64_der(&v.public_key).unwrap();
        let der = BASE64.decode(&v.signature).unwrap();
        let raw_r_s = Signature::from_der(&der).unwrap().to_bytes(); // 64 bytes, not DER
        for garbled in [
            "not base64!".to_owned(),
            BASE64.encode(b"hello"),
            BASE64.encode(raw_r_s),
            BASE64.encode(&der[..der.len() - 1]),
        ] {
            assert!(
                matches!(
                    verifier.verify(&v.timestamp, &v.payload, &garbled),
                    Err(VerifyError::MalformedSignature(_))
                ),
                "{garbled}"
            );
        }
    }

    #[test]
    fn a_garbled_public_key_is_refused_with_a_clear_error() {
        let v = sendgrid_vector();
        let der = BASE64.decode(&v.public_key).unwrap();
        // An Ed25519 SubjectPublicKeyInfo (RFC 8410): well-formed, wrong algorithm.
        let mut ed25519 = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        ed25519.extend_from_slice(&[7; 32]);
        for garbled in [
            String::new(),
            "not base64!".to_owned(),
            BASE64.encode(&der[..der.len() - 1]),
            BASE64.encode(ed25519),
        ] {
            let error = SendgridVerifier::from_base64_der(&garbled).unwrap_err();
            assert!(
                matches!(error, VerifyError::InvalidPublicKey(_)),
                "{garbled}"
            );
            assert!(error
                .to_string()
                .starts_with("the configured public key is invalid"));
        }
    }

    #[test]
    fn whitespace_around_a_pasted_key_is_ignored() {
        let v = sendgrid_vector();
        let verifier = SendgridVerifier::from_base64_der(&format!(" {}\n", v.public_key)).unwrap();
        assert_eq!(
            verifier.verify(&v.timestamp, &v.payload, &v.signature),
            Ok(())
        );
    }

    // --- SendGrid: the time window ------------------------------------------------------------

    #[test]
    fn a_timestamp_inside_the_window_verifies_on_either_side() {
        let v = sendgrid_vector();
        let verifier = SendgridVerifier::from_base64_der(&v.public_key).unwrap();
        let t: i64 = v.timestamp.parse().unwrap();
        for now in [t, t + 300, t - 300] {
            assert_eq!(
                verifier.verify_with_tolerance(&v.timestamp, &v.payload, &v.signature, now, 300),
                Ok(()),
                "now = {now}"
            );
        }
    }

    #[test]
    fn a_timestamp_outside_the_window_is_refused_as_stale() {
        let v = sendgrid_vector();
        let verifier = SendgridVerifier::from_base64_der(&v.public_key).unwrap();
        let t: i64 = v.timestamp.parse().unwrap();
        for now in [t + 301, t - 301, 1_764_000_000] {
            assert_eq!(
                verifier.verify_with_tolerance(&v.timestamp, &v.payload, &v.signature, now, 300),
                Err(VerifyError::StaleTimestamp {
                    timestamp: t,
                    now,
                    tolerance_secs: 300
                })
            );
        }
    }

    #[test]
    fn a_forged_stale_delivery_is_reported_as_a_mismatch_not_as_stale() {
        let v = sendgrid_vector();
        let verifier = SendgridVerifier::from_base64_der(&v.public_key).unwrap();
        assert_eq!(
            verifier.verify_with_tolerance(&v.timestamp, b"[]", &v.signature, 1_764_000_000, 300),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn a_signed_but_non_numeric_timestamp_is_refused_by_the_window_check() {
        let (key, signature) = sendgrid_test_signature(&[0x11; 32], "+1764000000", b"[]").unwrap();
        let verifier = SendgridVerifier::from_base64_der(&key).unwrap();
        assert_eq!(verifier.verify("+1764000000", b"[]", &signature), Ok(()));
        assert_eq!(
            verifier.verify_with_tolerance("+1764000000", b"[]", &signature, 1_764_000_000, 300),
            Err(VerifyError::MalformedTimestamp)
        );
    }

    // --- SendGrid: keys we make ourselves -----------------------------------------------------

    #[test]
    fn our_own_key_exports_like_sendgrid_shows_it_and_verifies() {
        let body = br#"[{"event":"delivered","message_id":"m-1"}]"#;
        let (key, signature) = sendgrid_test_signature(&[0x11; 32], "1764000000", body).unwrap();
        assert!(key.starts_with(SENDGRID_KEY_PREFIX), "{key}");
        assert_eq!(key.len(), sendgrid_vector().public_key.len());
        let verifier = SendgridVerifier::from_base64_der(&key).unwrap();
        assert_eq!(verifier.verify("1764000000", body, &signature), Ok(()));
        assert_eq!(
            verifier.verify("1764000001", body, &signature),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn a_signature_from_a_different_key_is_refused() {
        let (key, _) = sendgrid_test_signature(&[0x11; 32], "1764000000", b"[]").unwrap();
        let (other_key, forged) =
            sendgrid_test_signature(&[0x22; 32], "1764000000", b"[]").unwrap();
        assert_ne!(key, other_key);
        let verifier = SendgridVerifier::from_base64_der(&key).unwrap();
        assert_eq!(
            verifier.verify("1764000000", b"[]", &forged),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn test_signatures_are_deterministic() {
        let first = sendgrid_test_signature(&[0x33; 32], "1", b"x").unwrap();
        assert_eq!(
            sendgrid_test_signature(&[0x33; 32], "1", b"x").unwrap(),
            first
        );
    }

    #[test]
    fn an_out_of_range_test_scalar_is_refused() {
        for scalar in [[0x00; 32], [0xff; 32]] {
            assert_eq!(
                sendgrid_test_signature(&scalar, "1", b"x"),
                Err(VerifyError::InvalidSigningKey)
            );
        }
    }

    // --- HMAC key handling --------------------------------------------------------------------

    #[test]
    fn block_sized_key_preparation_matches_rfc_4231() {
        // RFC 4231 test case 2 (short key) and test case 6 (key longer than the block).
        let mut short = hmac_sha256(b"Jefe");
        short.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(short.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let mut long = hmac_sha256(&[0xaa; 131]);
        long.update(b"Test Using Larger Than Block-Size Key - Hash Key First");
        assert_eq!(
            hex::encode(long.finalize().into_bytes()),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn block_sized_key_preparation_matches_new_from_slice_for_every_length() {
        for len in 0..=130 {
            let key: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut ours = hmac_sha256(&key);
            let mut reference = HmacSha256::new_from_slice(&key).unwrap();
            ours.update(b"message");
            reference.update(b"message");
            assert_eq!(
                ours.finalize().into_bytes(),
                reference.finalize().into_bytes(),
                "key length {len}"
            );
        }
    }

    // --- X ------------------------------------------------------------------------------------

    // Expected values computed independently with Python's hmac module.
    const X_SECRET: &str = "x-consumer-secret";
    const X_FIXTURE_SIGNATURE: &str = "sha256=Ay7T07rTFgJMNBnrkT88KCHMiRsmLwiWdC/iPKQYNxI=";

    #[test]
    fn the_crc_response_is_sha256_and_base64_of_the_hmac() {
        assert_eq!(
            x_crc_response(X_SECRET, "challenge-token-123"),
            "sha256=CmBvj7AGUxwzCxYJc7XUiLou4CfyXRizZIqjBwI+0Po="
        );
    }

    #[test]
    fn a_genuine_x_delivery_verifies() {
        let body = fixture("x-account-activity-reply.json");
        assert_eq!(
            verify_x_signature(X_SECRET, &body, X_FIXTURE_SIGNATURE),
            Ok(())
        );
    }

    #[test]
    fn an_x_delivery_with_a_changed_body_or_secret_is_refused() {
        let body = fixture("x-account-activity-reply.json");
        for i in positions(body.len(), 37) {
            let mut tampered = body.clone();
            tampered[i] ^= 0x01;
            assert_eq!(
                verify_x_signature(X_SECRET, &tampered, X_FIXTURE_SIGNATURE),
                Err(VerifyError::SignatureMismatch),
                "body byte {i} flipped"
            );
        }
        assert_eq!(
            verify_x_signature("another-secret", &body, X_FIXTURE_SIGNATURE),
            Err(VerifyError::SignatureMismatch)
        );
        let truncated = &X_FIXTURE_SIGNATURE[..X_FIXTURE_SIGNATURE.len() - 4];
        assert_eq!(
            verify_x_signature(X_SECRET, &body, truncated),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn a_missing_or_misformatted_x_signature_is_refused() {
        let body = fixture("x-account-activity-reply.json");
        assert_eq!(
            verify_x_signature(X_SECRET, &body, ""),
            Err(VerifyError::MissingSignature)
        );
        let bare = X_FIXTURE_SIGNATURE.trim_start_matches("sha256=");
        for garbled in [bare, "sha1=abc", "sha256=not base64!"] {
            assert!(
                matches!(
                    verify_x_signature(X_SECRET, &body, garbled),
                    Err(VerifyError::MalformedSignature(_))
                ),
                "{garbled}"
            );
        }
    }

    #[test]
    fn an_empty_secret_never_verifies() {
        let forged = x_crc_response("", "payload");
        assert_eq!(
            verify_x_signature("", b"payload", &forged),
            Err(VerifyError::EmptySecret)
        );
        let mut mac = hmac_sha256(b"");
        mac.update(b"payload");
        let forged_fb = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(
            verify_facebook_signature("", b"payload", &forged_fb),
            Err(VerifyError::EmptySecret)
        );
        assert_eq!(
            verify_push("", &sign_push("", 10, b"[]"), b"[]", 10, 300),
            Err(VerifyError::EmptySecret)
        );
    }

    #[test]
    fn the_crc_response_is_what_verify_x_signature_accepts_for_the_token() {
        let response = x_crc_response(X_SECRET, "token");
        assert_eq!(verify_x_signature(X_SECRET, b"token", &response), Ok(()));
    }

    // --- Facebook -----------------------------------------------------------------------------

    const FB_SECRET: &str = "fb-app-secret";
    const FB_FIXTURE_SIGNATURE: &str =
        "sha256=07babe055955b3420fd487c3b5b4c2c6e0ecd132df42617f6d0caee50466297b";

    #[test]
    fn a_genuine_facebook_delivery_verifies_in_either_hex_case() {
        let body = fixture("facebook-feed-comment.json");
        assert_eq!(
            verify_facebook_signature(FB_SECRET, &body, FB_FIXTURE_SIGNATURE),
            Ok(())
        );
        let upper = format!("sha256={}", FB_FIXTURE_SIGNATURE[7..].to_uppercase());
        assert_eq!(verify_facebook_signature(FB_SECRET, &body, &upper), Ok(()));
    }

    #[test]
    fn a_facebook_delivery_with_a_changed_body_or_secret_is_refused() {
        let body = fixture("facebook-feed-comment.json");
        for i in positions(body.len(), 41) {
            let mut tampered = body.clone();
            tampered[i] ^= 0x01;
            assert_eq!(
                verify_facebook_signature(FB_SECRET, &tampered, FB_FIXTURE_SIGNATURE),
                Err(VerifyError::SignatureMismatch),
                "body byte {i} flipped"
            );
        }
        // Re-serialising the JSON (here: dropping the whitespace) is a different body.
        let reserialised: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let compact = serde_json::to_vec(&reserialised).unwrap();
        assert_eq!(
            verify_facebook_signature(FB_SECRET, &compact, FB_FIXTURE_SIGNATURE),
            Err(VerifyError::SignatureMismatch)
        );
        assert_eq!(
            verify_facebook_signature("another-secret", &body, FB_FIXTURE_SIGNATURE),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn a_missing_or_misformatted_facebook_signature_is_refused() {
        let body = fixture("facebook-feed-comment.json");
        assert_eq!(
            verify_facebook_signature(FB_SECRET, &body, " "),
            Err(VerifyError::MissingSignature)
        );
        let bare = FB_FIXTURE_SIGNATURE.trim_start_matches("sha256=");
        let base64_instead = format!("sha256={}", BASE64.encode(hex::decode(bare).unwrap()));
        for garbled in [bare, "sha1=0123abcd", base64_instead.as_str()] {
            assert!(
                matches!(
                    verify_facebook_signature(FB_SECRET, &body, garbled),
                    Err(VerifyError::MalformedSignature(_))
                ),
                "{garbled}"
            );
        }
    }

    // --- Push ---------------------------------------------------------------------------------

    const PUSH_SECRET: &str = "whsec-test";
    const PUSH_BODY: &[u8] = br#"[{"id":1}]"#;
    const PUSH_T: i64 = 1_764_000_000;

    #[test]
    fn sign_push_has_the_contract_format() {
        // Computed independently: HMAC-SHA256("whsec-test", "1764000000.[{\"id\":1}]") in Python.
        assert_eq!(
            sign_push(PUSH_SECRET, PUSH_T, PUSH_BODY),
            "t=1764000000,v1=28f77c023aac13a6c22f5c354f9081e0d906127e8161520aa7b7ab19125e6759"
        );
    }

    #[test]
    fn a_push_round_trips() {
        let header = sign_push(PUSH_SECRET, PUSH_T, PUSH_BODY);
        for now in [PUSH_T, PUSH_T + 300, PUSH_T - 300] {
            assert_eq!(
                verify_push(PUSH_SECRET, &header, PUSH_BODY, now, 300),
                Ok(())
            );
        }
    }

    #[test]
    fn a_push_with_a_tampered_body_secret_or_timestamp_is_refused() {
        let header = sign_push(PUSH_SECRET, PUSH_T, PUSH_BODY);
        assert_eq!(
            verify_push(PUSH_SECRET, &header, br#"[{"id":2}]"#, PUSH_T, 300),
            Err(VerifyError::SignatureMismatch)
        );
        assert_eq!(
            verify_push("other", &header, PUSH_BODY, PUSH_T, 300),
            Err(VerifyError::SignatureMismatch)
        );
        // Moving t (still inside the window) breaks the MAC: t is signed.
        let moved = header.replace("t=1764000000", "t=1764000001");
        assert_eq!(
            verify_push(PUSH_SECRET, &moved, PUSH_BODY, PUSH_T, 300),
            Err(VerifyError::SignatureMismatch)
        );
    }

    #[test]
    fn a_stale_or_future_push_is_refused() {
        let header = sign_push(PUSH_SECRET, PUSH_T, PUSH_BODY);
        for now in [PUSH_T + 301, PUSH_T - 301] {
            assert_eq!(
                verify_push(PUSH_SECRET, &header, PUSH_BODY, now, 300),
                Err(VerifyError::StaleTimestamp {
                    timestamp: PUSH_T,
                    now,
                    tolerance_secs: 300
                })
            );
        }
    }

    #[test]
    fn push_header_fields_may_come_in_any_order_with_extra_and_rotated_signatures() {
        let header = sign_push(PUSH_SECRET, PUSH_T, PUSH_BODY);
        let (t, v1) = header.split_once(',').unwrap();
        let old_secret = sign_push("old-secret", PUSH_T, PUSH_BODY);
        let old_v1 = old_secret.split_once(',').unwrap().1;
        for variant in [
            format!("{v1},{t}"),
            format!("{t}, {v1}, v0=whatever"),
            format!("{t},{old_v1},{v1}"),
        ] {
            assert_eq!(
                verify_push(PUSH_SECRET, &variant, PUSH_BODY, PUSH_T, 300),
                Ok(()),
                "{variant}"
            );
        }
    }

    #[test]
    fn a_malformed_push_header_is_refused() {
        let header = sign_push(PUSH_SECRET, PUSH_T, PUSH_BODY);
        let (t, v1) = header.split_once(',').unwrap();
        assert_eq!(
            verify_push(PUSH_SECRET, "", PUSH_BODY, PUSH_T, 300),
            Err(VerifyError::MissingSignature)
        );
        for garbled in [
            v1.to_owned(),
            t.to_owned(),
            format!("{t},{t},{v1}"),
            format!("{t},v1=xyz"),
            format!("{t};{v1}"),
        ] {
            assert!(
                matches!(
                    verify_push(PUSH_SECRET, &garbled, PUSH_BODY, PUSH_T, 300),
                    Err(VerifyError::MalformedSignature(_))
                ),
                "{garbled}"
            );
        }
        for timestamp in ["t=", "t=-5", "t=+1764000000", "t=soon"] {
            assert_eq!(
                verify_push(
                    PUSH_SECRET,
                    &format!("{timestamp},{v1}"),
                    PUSH_BODY,
                    PUSH_T,
                    300
                ),
                Err(VerifyError::MalformedTimestamp),
                "{timestamp}"
            );
        }
    }
}
