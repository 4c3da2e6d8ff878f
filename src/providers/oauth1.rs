//! OAuth 1.0a request signing (RFC 5849, HMAC-SHA1), as X documents it for user-context calls.
//!
//! The signature covers the method, the base URL, the oauth_* parameters and any query or
//! form parameters. A JSON body is not a parameter (RFC 5849 section 3.4.1.3.1 only takes
//! `application/x-www-form-urlencoded` bodies), so `POST /2/tweets` signs the oauth_*
//! parameters alone. Nonce and timestamp are arguments, so the signature is testable against
//! X's published example.

use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::Url;
use sha1::Sha1;

/// RFC 3986 section 2.3: everything but ALPHA / DIGIT / "-" / "." / "_" / "~" is encoded.
const RFC3986: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode(value: &str) -> String {
    utf8_percent_encode(value, RFC3986).to_string()
}

/// The four keys of a user-context request.
pub struct OAuth1Keys<'a> {
    pub consumer_key: &'a str,
    pub consumer_secret: &'a str,
    pub token: &'a str,
    pub token_secret: &'a str,
}

/// The base64 HMAC-SHA1 signature of a request. `params` are the request's query and form
/// parameters plus every oauth_* parameter except `oauth_signature`, unencoded.
pub fn oauth1_signature(
    method: &str,
    url: &Url,
    params: &[(&str, &str)],
    consumer_secret: &str,
    token_secret: &str,
) -> String {
    // Section 3.4.1.3.2: encode each name and value, sort by name then value, join.
    let mut encoded: Vec<(String, String)> =
        params.iter().map(|(k, v)| (encode(k), encode(v))).collect();
    encoded.sort();
    let parameter_string = encoded
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let base_string = format!(
        "{}&{}&{}",
        method.to_ascii_uppercase(),
        encode(&base_string_uri(url)),
        encode(&parameter_string)
    );
    let key = format!("{}&{}", encode(consumer_secret), encode(token_secret));
    // HMAC accepts keys of any length, so this cannot fail; the fallback keeps the code free
    // of a panic path all the same.
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(key.as_bytes()) else {
        return String::new();
    };
    mac.update(base_string.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Section 3.4.1.2: lowercase scheme and host, the port only when not the default, the path,
/// no query or fragment. `Url` already lowercases and drops default ports.
fn base_string_uri(url: &Url) -> String {
    format!("{}{}", url.origin().ascii_serialization(), url.path())
}

/// The `Authorization` header value for a request with no query or form parameters (such as
/// a JSON POST), signed with the given nonce and timestamp.
pub fn oauth1_authorization(
    method: &str,
    url: &Url,
    keys: &OAuth1Keys<'_>,
    nonce: &str,
    timestamp: u64,
) -> String {
    let timestamp = timestamp.to_string();
    let mut oauth = vec![
        ("oauth_consumer_key", keys.consumer_key),
        ("oauth_nonce", nonce),
        ("oauth_signature_method", "HMAC-SHA1"),
        ("oauth_timestamp", timestamp.as_str()),
        ("oauth_token", keys.token),
        ("oauth_version", "1.0"),
    ];
    // Query parameters, if a caller ever adds some, are part of the signature too.
    let query: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let mut params = oauth.clone();
    params.extend(query.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let signature = oauth1_signature(
        method,
        url,
        &params,
        keys.consumer_secret,
        keys.token_secret,
    );
    oauth.push(("oauth_signature", &signature));
    oauth.sort();
    let fields = oauth
        .iter()
        .map(|(k, v)| format!("{}=\"{}\"", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("OAuth {fields}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// X's documented example ("Creating a signature").
    #[test]
    fn signature_matches_the_documented_example() {
        let url = Url::parse("https://api.twitter.com/1.1/statuses/update.json").unwrap();
        let params = [
            (
                "status",
                "Hello Ladies + Gentlemen, a signed OAuth request!",
            ),
            ("include_entities", "true"),
            ("oauth_consumer_key", "xvz1evFS4wEEPTGEFPHBog"),
            ("oauth_nonce", "kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg"),
            ("oauth_signature_method", "HMAC-SHA1"),
            ("oauth_timestamp", "1318622958"),
            (
                "oauth_token",
                "370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb",
            ),
            ("oauth_version", "1.0"),
        ];
        let signature = oauth1_signature(
            "POST",
            &url,
            &params,
            "kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw",
            "LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE",
        );
        assert_eq!(signature, "hCtSmYh+iHYCEqBWrE7C7hYmtUk=");
    }

    #[test]
    fn encoding_follows_rfc_3986() {
        assert_eq!(encode("Ladies + Gentlemen"), "Ladies%20%2B%20Gentlemen");
        assert_eq!(encode("a-b.c_d~e!*'()"), "a-b.c_d~e%21%2A%27%28%29");
        assert_eq!(encode("☃"), "%E2%98%83");
    }

    #[test]
    fn base_string_uri_drops_default_ports_and_queries_but_keeps_others() {
        let url = Url::parse("HTTPS://API.X.com:443/2/tweets?a=b").unwrap();
        assert_eq!(base_string_uri(&url), "https://api.x.com/2/tweets");
        let url = Url::parse("http://127.0.0.1:8080/2/tweets").unwrap();
        assert_eq!(base_string_uri(&url), "http://127.0.0.1:8080/2/tweets");
    }

    #[test]
    fn authorization_header_is_deterministic_for_a_given_nonce_and_time() {
        let url = Url::parse("https://api.x.com/2/tweets").unwrap();
        let keys = OAuth1Keys {
            consumer_key: "xvz1evFS4wEEPTGEFPHBog",
            consumer_secret: "kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw",
            token: "370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb",
            token_secret: "LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE",
        };
        let header = oauth1_authorization("POST", &url, &keys, "nonce123", 1318622958);
        let expected_signature = oauth1_signature(
            "POST",
            &url,
            &[
                ("oauth_consumer_key", keys.consumer_key),
                ("oauth_nonce", "nonce123"),
                ("oauth_signature_method", "HMAC-SHA1"),
                ("oauth_timestamp", "1318622958"),
                ("oauth_token", keys.token),
                ("oauth_version", "1.0"),
            ],
            keys.consumer_secret,
            keys.token_secret,
        );
        assert_eq!(
            header,
            format!(
                "OAuth oauth_consumer_key=\"xvz1evFS4wEEPTGEFPHBog\", oauth_nonce=\"nonce123\", \
                 oauth_signature=\"{}\", oauth_signature_method=\"HMAC-SHA1\", \
                 oauth_timestamp=\"1318622958\", \
                 oauth_token=\"370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb\", \
                 oauth_version=\"1.0\"",
                encode(&expected_signature)
            )
        );
        // Secrets sign the request; they never appear in it.
        assert!(!header.contains(keys.consumer_secret));
        assert!(!header.contains(keys.token_secret));
    }
}
