//! Weighted length and validity of an X (Twitter) post.
//!
//! X does not count characters one by one: it applies the *weighted* counting
//! of twitter-text configuration v3, and rejects a post whose weighted length
//! exceeds [`MAX_WEIGHTED_LENGTH`]. This module reproduces that counting so a
//! post can be checked before it is sent, instead of being refused by the API.
//!
//! # Counting rules (twitter-text config v3)
//!
//! * The text is NFC-normalised first, so `A` + combining acute counts like `Á`.
//! * Code points in `U+0000–U+10FF`, `U+2000–U+200D`, `U+2010–U+201F` and
//!   `U+2032–U+2037` weigh 1; every other code point weighs 2 (CJK, emoji,
//!   most symbols).
//! * A URL, with or without `http://`/`https://`, weighs 23 whatever its
//!   length, because X rewrites every link to a 23-character `t.co` link.
//!   Detection follows twitter-text's URL grammar: a known top-level domain,
//!   DNS labels of at most 63 characters once punycode-encoded, and no bare
//!   `name.cc` country-code domain without a scheme or path (except `.co`
//!   and `.tv`).
//! * A whole emoji sequence (ZWJ sequences, skin tones, flags, keycaps, tag
//!   sequences) weighs 2, however many code points it has.
//!
//! # Known limits
//!
//! * The top-level-domain list is a curated subset of twitter-text's (all
//!   country codes, the legacy generic TLDs and the common new ones). A link
//!   on a rare TLD missing here is counted character by character.
//! * Emoji sequences are recognised by their Unicode structure rather than
//!   by twitter's fixed list of sequences, so a non-standard ZWJ combination
//!   counts as one emoji here where twitter may count its parts.
//! * Display/valid index ranges of twitter-text are not computed: only the
//!   length and the validity are needed to accept or refuse a post.
//! * Whitespace-only posts are refused, which is stricter than current
//!   twitter-text (it only rejects empty text): a blank post is never meant.

use std::collections::HashMap;
use std::sync::OnceLock;

use unicode_normalization::UnicodeNormalization;

/// Longest post X accepts, in weighted characters.
pub const MAX_WEIGHTED_LENGTH: usize = 280;

/// twitter-text works in hundredths of a character so weights stay integers.
const SCALE: usize = 100;
/// Weight of a code point outside [`LIGHT_RANGES`], and of a whole emoji.
const DEFAULT_WEIGHT: usize = 200;
/// Weight of a code point inside [`LIGHT_RANGES`].
const LIGHT_WEIGHT: usize = 100;
/// Every URL is replaced by a `t.co` link of this many characters.
const TRANSFORMED_URL_WEIGHT: usize = 23 * SCALE;
/// Code point ranges (inclusive) that count as one character: Latin, Greek,
/// Cyrillic, Hebrew, Arabic, Indic scripts… and some general punctuation.
const LIGHT_RANGES: [(u32, u32); 4] = [(0, 4351), (8192, 8205), (8208, 8223), (8242, 8247)];

/// twitter-text drops a URL longer than this (UTF-16 units, scheme included).
const MAX_URL_LENGTH: usize = 4096;
/// A DNS label can't be longer than this once punycode-encoded (RFC 1035).
const MAX_LABEL_LENGTH: usize = 63;
/// A `t.co` slug longer than this isn't a real `t.co` link.
const MAX_TCO_SLUG_LENGTH: usize = 40;
/// Scheme assumed for a URL typed without one, for the length limit.
const DEFAULT_PROTOCOL_LENGTH: usize = "https://".len();

const ZWJ: char = '\u{200D}';
const TEXT_PRESENTATION: char = '\u{FE0E}';
const EMOJI_PRESENTATION: char = '\u{FE0F}';
const KEYCAP: char = '\u{20E3}';
const CANCEL_TAG: char = '\u{E007F}';

/// Returns the weighted length of `text`, in characters, as X counts it.
///
/// ```
/// use messaging_domain::tweet_text::weighted_length;
///
/// assert_eq!(weighted_length("Hi http://test.co"), 26); // 3 + 23 for the link
/// assert_eq!(weighted_length("故人"), 4); // CJK counts double
/// assert_eq!(weighted_length("👨‍👩‍👧‍👦"), 2); // one emoji sequence
/// ```
#[must_use]
pub fn weighted_length(text: &str) -> usize {
    let chars: Vec<char> = text.nfc().collect();
    weighted_units(&chars) / SCALE
}

/// Tells whether `text` may be sent as a post.
///
/// A post is refused when it is empty or only whitespace, when its weighted
/// length exceeds [`MAX_WEIGHTED_LENGTH`], or when it holds an invalid
/// character: `U+FFFE`, `U+FEFF` or `U+FFFF`.
///
/// ```
/// use messaging_domain::tweet_text::is_valid_tweet;
///
/// assert!(is_valid_tweet("hello"));
/// assert!(!is_valid_tweet("   "));
/// assert!(!is_valid_tweet(&"x".repeat(281)));
/// ```
#[must_use]
pub fn is_valid_tweet(text: &str) -> bool {
    let chars: Vec<char> = text.nfc().collect();
    if chars.iter().all(|c| c.is_whitespace()) {
        return false;
    }
    if chars.iter().any(|&c| is_invalid_char(c)) {
        return false;
    }
    weighted_units(&chars) <= MAX_WEIGHTED_LENGTH * SCALE
}

/// Characters that make a post invalid wherever they appear.
///
/// The same set as current twitter-text: directional controls (`U+202A–U+202E`)
/// are accepted, as X accepts them in right-to-left posts.
fn is_invalid_char(c: char) -> bool {
    matches!(c, '\u{FFFE}' | '\u{FEFF}' | '\u{FFFF}')
}

/// Weighted length in hundredths of a character, of already-NFC text.
fn weighted_units(chars: &[char]) -> usize {
    let mut urls = url_spans(chars).into_iter().peekable();
    let mut total = 0;
    let mut index = 0;
    while let Some(&c) = chars.get(index) {
        // Spans are sorted and disjoint; drop any that the cursor has passed.
        while urls.peek().is_some_and(|&(start, _)| start < index) {
            urls.next();
        }
        if let Some(&(start, end)) = urls.peek() {
            if start == index {
                total += TRANSFORMED_URL_WEIGHT;
                index = end;
                urls.next();
                continue;
            }
        }
        if let Some(len) = emoji_len(chars, index) {
            total += DEFAULT_WEIGHT;
            index += len;
            continue;
        }
        total += char_weight(c);
        index += 1;
    }
    total
}

fn char_weight(c: char) -> usize {
    let code = u32::from(c);
    if LIGHT_RANGES
        .iter()
        .any(|&(low, high)| (low..=high).contains(&code))
    {
        LIGHT_WEIGHT
    } else {
        DEFAULT_WEIGHT
    }
}

// ---------------------------------------------------------------------------
// Emoji
// ---------------------------------------------------------------------------

/// Length in code points of the emoji sequence starting at `start`, if any.
fn emoji_len(text: &[char], start: usize) -> Option<usize> {
    let first = *text.get(start)?;
    if matches!(first, '0'..='9' | '#' | '*') {
        // A keycap: only the full `1️⃣` / `1⃣` form is an emoji; a plain
        // digit must keep its weight of 1.
        let mut end = start + 1;
        if text.get(end) == Some(&EMOJI_PRESENTATION) {
            end += 1;
        }
        return (text.get(end) == Some(&KEYCAP)).then_some(end + 1 - start);
    }
    if is_regional_indicator(first) {
        // Two regional indicators make one flag.
        let pair = text
            .get(start + 1)
            .copied()
            .is_some_and(is_regional_indicator);
        return Some(if pair { 2 } else { 1 });
    }
    let mut end = emoji_element_end(text, start)?;
    // ZWJ sequences (👨‍👩‍👧‍👦, 👨‍🎤…) render as one glyph and count once.
    while text.get(end) == Some(&ZWJ) {
        match emoji_element_end(text, end + 1) {
            Some(next) => end = next,
            None => break,
        }
    }
    Some(end - start)
}

/// End of one emoji element: a pictograph with its presentation selector,
/// skin tone and tag sequence (subdivision flags like 🏴󠁧󠁢󠁥󠁮󠁧󠁿).
fn emoji_element_end(text: &[char], start: usize) -> Option<usize> {
    let base = *text.get(start)?;
    if !is_pictographic(base) && !is_skin_tone(base) {
        return None;
    }
    // © and ® are ordinary one-weight characters unless explicitly asked to
    // render as emoji; twitter only discounts the `©️` form.
    let needs_emoji_selector = matches!(base, '\u{A9}' | '\u{AE}');
    let mut end = start + 1;
    match text.get(end) {
        // Text presentation explicitly requested: not an emoji.
        Some(&TEXT_PRESENTATION) => return None,
        Some(&EMOJI_PRESENTATION) => end += 1,
        _ if needs_emoji_selector => return None,
        _ => {}
    }
    if !is_skin_tone(base) && text.get(end).copied().is_some_and(is_skin_tone) {
        end += 1;
    }
    let tags = text.get(end..).map_or(0, |rest| {
        rest.iter()
            .take_while(|&&c| matches!(c, '\u{E0020}'..='\u{E007E}'))
            .count()
    });
    if tags > 0 && text.get(end + tags) == Some(&CANCEL_TAG) {
        end += tags + 1;
    }
    Some(end)
}

fn is_regional_indicator(c: char) -> bool {
    matches!(c, '\u{1F1E6}'..='\u{1F1FF}')
}

fn is_skin_tone(c: char) -> bool {
    matches!(c, '\u{1F3FB}'..='\u{1F3FF}')
}

/// Unicode `Extended_Pictographic` ranges (inclusive), slightly coarsened.
#[rustfmt::skip]
const PICTOGRAPHIC_RANGES: &[(u32, u32)] = &[
    (0x00A9, 0x00A9), (0x00AE, 0x00AE), (0x203C, 0x203C), (0x2049, 0x2049),
    (0x2122, 0x2122), (0x2139, 0x2139), (0x2194, 0x2199), (0x21A9, 0x21AA),
    (0x231A, 0x231B), (0x2328, 0x2328), (0x2388, 0x2388), (0x23CF, 0x23CF),
    (0x23E9, 0x23F3), (0x23F8, 0x23FA), (0x24C2, 0x24C2), (0x25AA, 0x25AB),
    (0x25B6, 0x25B6), (0x25C0, 0x25C0), (0x25FB, 0x25FE), (0x2600, 0x2605),
    (0x2607, 0x2612), (0x2614, 0x2685), (0x2690, 0x2705), (0x2708, 0x2712),
    (0x2714, 0x2714), (0x2716, 0x2716), (0x271D, 0x271D), (0x2721, 0x2721),
    (0x2728, 0x2728), (0x2733, 0x2734), (0x2744, 0x2744), (0x2747, 0x2747),
    (0x274C, 0x274C), (0x274E, 0x274E), (0x2753, 0x2755), (0x2757, 0x2757),
    (0x2763, 0x2767), (0x2795, 0x2797), (0x27A1, 0x27A1), (0x27B0, 0x27B0),
    (0x27BF, 0x27BF), (0x2934, 0x2935), (0x2B05, 0x2B07), (0x2B1B, 0x2B1C),
    (0x2B50, 0x2B50), (0x2B55, 0x2B55), (0x3030, 0x3030), (0x303D, 0x303D),
    (0x3297, 0x3297), (0x3299, 0x3299), (0x1F000, 0x1F0FF), (0x1F10D, 0x1F10F),
    (0x1F12F, 0x1F12F), (0x1F16C, 0x1F171), (0x1F17E, 0x1F17F), (0x1F18E, 0x1F18E),
    (0x1F191, 0x1F19A), (0x1F1AD, 0x1F1E5), (0x1F201, 0x1F20F), (0x1F21A, 0x1F21A),
    (0x1F22F, 0x1F22F), (0x1F232, 0x1F23A), (0x1F23C, 0x1F23F), (0x1F249, 0x1F3FA),
    (0x1F400, 0x1F53D), (0x1F546, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F774, 0x1F77F),
    (0x1F7D5, 0x1F7FF), (0x1F80C, 0x1F80F), (0x1F848, 0x1F84F), (0x1F85A, 0x1F85F),
    (0x1F888, 0x1F88F), (0x1F8AE, 0x1F8FF), (0x1F90C, 0x1F93A), (0x1F93C, 0x1F945),
    (0x1F947, 0x1FAFF), (0x1FC00, 0x1FFFD),
];

/// Unicode `Extended_Pictographic`, slightly coarsened: outside © and ®
/// every one of these already weighs 2 alone, so the set only decides what
/// can carry selectors, skin tones and ZWJ links.
fn is_pictographic(c: char) -> bool {
    let code = u32::from(c);
    code >= 0xA9
        && PICTOGRAPHIC_RANGES
            .iter()
            .any(|&(low, high)| (low..=high).contains(&code))
}

// ---------------------------------------------------------------------------
// URLs
// ---------------------------------------------------------------------------
//
// This is a hand-written equivalent of twitter-text's `extractUrl` regular
// expression and `extractUrlsWithIndices`, kept std-only and linear: every
// candidate start is tried left to right, the domain grammar is resolved
// with the same greedy preference as the regex, and a match that then fails
// validation is skipped whole (as the regex's `lastIndex` would).

/// One match of the URL grammar, in char indices of the normalised text.
struct UrlMatch {
    start: usize,
    protocol_len: usize,
    domain_end: usize,
    has_path: bool,
    end: usize,
}

/// Char-index spans `[start, end)` of the URLs X would shorten, sorted.
fn url_spans(text: &[char]) -> Vec<(usize, usize)> {
    // Every URL has a dot in its domain: skip the work for most short posts.
    if !text.contains(&'.') {
        return Vec::new();
    }
    let mut scanner = UrlScanner::new(text);
    let mut spans = Vec::new();
    let mut position = 0;
    while position < text.len() {
        match scanner.match_at(position) {
            Some((found, before)) => {
                scanner.accept(&found, before, &mut spans);
                position = found.end.max(position + 1);
            }
            None => position += 1,
        }
    }
    spans
}

struct UrlScanner<'a> {
    text: &'a [char],
    /// For each index, the end of the run of label characters starting there.
    label_run_end: Vec<usize>,
    /// Prefix counts of `_`, allowed in subdomains but not in the domain name.
    underscores_before: Vec<usize>,
    /// Memoised greedy domain end for a label starting at each index, so a
    /// long `a.a.a.a…` text is not rescanned from every start (quadratic).
    domain_memo: Vec<Option<Option<usize>>>,
}

impl<'a> UrlScanner<'a> {
    fn new(text: &'a [char]) -> Self {
        // Filled backwards, then reversed: index `i` holds the end of the run.
        let mut label_run_end = Vec::with_capacity(text.len() + 1);
        let mut run_end = text.len();
        label_run_end.push(run_end);
        for (index, &c) in text.iter().enumerate().rev() {
            if !is_label_char(c) {
                run_end = index;
            }
            label_run_end.push(run_end);
        }
        label_run_end.reverse();
        let mut underscores_before = Vec::with_capacity(text.len() + 1);
        let mut count = 0;
        underscores_before.push(0);
        for &c in text {
            count += usize::from(c == '_');
            underscores_before.push(count);
        }
        Self {
            text,
            label_run_end,
            underscores_before,
            domain_memo: vec![None; text.len() + 1],
        }
    }

    /// Leftmost URL whose preceding character sits at `position` (or which
    /// starts the text), with that preceding character.
    fn match_at(&mut self, position: usize) -> Option<(UrlMatch, Option<char>)> {
        if let Some(&before) = self.text.get(position) {
            if is_url_preceding_char(before) {
                if let Some(found) = self.match_url(position + 1) {
                    return Some((found, Some(before)));
                }
            }
        }
        if position == 0 {
            return self.match_url(0).map(|found| (found, None));
        }
        None
    }

    fn match_url(&mut self, start: usize) -> Option<UrlMatch> {
        let protocol_len = protocol_len(self.text, start);
        if protocol_len > 0 {
            if let Some(domain_end) = self.domain_end(start + protocol_len) {
                return Some(self.finish_url(start, protocol_len, domain_end));
            }
        }
        let domain_end = self.domain_end(start)?;
        Some(self.finish_url(start, 0, domain_end))
    }

    /// Extends a matched domain with the optional port, path and query.
    fn finish_url(&self, start: usize, protocol_len: usize, domain_end: usize) -> UrlMatch {
        let text = self.text;
        let mut end = domain_end;
        if text.get(end) == Some(&':') {
            let digits = count_from(text, end + 1, |c| c.is_ascii_digit());
            if digits > 0 {
                end += 1 + digits;
            }
        }
        let has_path = text.get(end) == Some(&'/');
        if has_path {
            end = path_end(text, end + 1);
        }
        if text.get(end) == Some(&'?') {
            if let Some(query_end) = query_end(text, end + 1) {
                end = query_end;
            }
        }
        UrlMatch {
            start,
            protocol_len,
            domain_end,
            has_path,
            end,
        }
    }

    /// Position after `label.` starting at `start`, if a label is there.
    /// Labels start and end with a domain character; `-` may appear inside,
    /// and `_` too when `allow_underscore` (subdomains only).
    fn label_end(&self, start: usize, allow_underscore: bool) -> Option<usize> {
        let text = self.text;
        if !text.get(start).copied().is_some_and(is_domain_char) {
            return None;
        }
        let end = *self.label_run_end.get(start)?;
        if text.get(end) != Some(&'.') {
            return None;
        }
        if !text
            .get(end.checked_sub(1)?)
            .copied()
            .is_some_and(is_domain_char)
        {
            return None;
        }
        if !allow_underscore
            && self.underscores_before.get(end)? != self.underscores_before.get(start)?
        {
            return None;
        }
        Some(end + 1)
    }

    /// End of the domain starting at `start`: `subdomain.* name. tld`, with
    /// as many subdomains as possible, as the greedy regex would pick.
    fn domain_end(&mut self, start: usize) -> Option<usize> {
        // Walk the chain of subdomain labels until one whose answer is known.
        let mut chain = Vec::new();
        let mut current = start;
        let mut answer = loop {
            if let Some(Some(known)) = self.domain_memo.get(current) {
                break *known;
            }
            chain.push(current);
            match self.label_end(current, true) {
                Some(next) => current = next,
                None => break None,
            }
        };
        // The best domain from a label is the best one from the next label
        // (more subdomains), else this label as the domain name.
        for &label_start in chain.iter().rev() {
            if answer.is_none() {
                answer = self
                    .label_end(label_start, false)
                    .and_then(|tld_start| tld_end(self.text, tld_start, self.text.len(), false));
            }
            if let Some(slot) = self.domain_memo.get_mut(label_start) {
                *slot = Some(answer);
            }
        }
        answer
    }

    /// Applies twitter-text's checks to a grammar match and records the span.
    fn accept(&self, found: &UrlMatch, before: Option<char>, spans: &mut Vec<(usize, usize)>) {
        let text = self.text;
        let domain_start = found.start + found.protocol_len;
        let (Some(url), Some(domain)) = (
            text.get(found.start..found.end),
            text.get(domain_start..found.domain_end),
        ) else {
            return;
        };
        let protocol_len = if found.protocol_len > 0 {
            found.protocol_len
        } else {
            DEFAULT_PROTOCOL_LENGTH
        };
        // Length first: it bounds the work of the IDNA check.
        if protocol_len + utf16_len(url) > MAX_URL_LENGTH || !is_valid_idn_domain(domain) {
            return;
        }

        if found.protocol_len > 0 {
            let mut end = found.end;
            // A t.co link ends with its slug: anything glued after it is text.
            if let Some(slug_len) = tco_slug_len(url, found.protocol_len) {
                if slug_len > MAX_TCO_SLUG_LENGTH {
                    return;
                }
                end = found.start + found.protocol_len + "t.co/".len() + slug_len;
            }
            spans.push((found.start, end));
            return;
        }

        // Without a scheme, "foo-bar.com" glued to a word or a path isn't a
        // link, and only the ASCII part of the domain is linked.
        if matches!(before, Some('-' | '_' | '.' | '/')) {
            return;
        }
        let ascii = ascii_domains(domain);
        let count = ascii.len();
        for (index, &(start, end)) in ascii.iter().enumerate() {
            let Some(candidate) = domain.get(start..end) else {
                continue;
            };
            let start = domain_start + start;
            if found.has_path && index + 1 == count {
                // The path and query belong to the last ASCII domain.
                spans.push((
                    start,
                    start + candidate.len() + (found.end - found.domain_end),
                ));
            } else if found.has_path
                || is_special_short_domain(candidate)
                || !is_short_country_domain(candidate)
            {
                spans.push((start, domain_start + end));
            }
        }
    }
}

/// `http://` or `https://`, case-insensitively, at `start`; 0 if absent.
fn protocol_len(text: &[char], start: usize) -> usize {
    ["https://", "http://"]
        .iter()
        .find(|scheme| starts_with_ignore_case(text, start, scheme))
        .map_or(0, |scheme| scheme.len())
}

fn starts_with_ignore_case(text: &[char], start: usize, prefix: &str) -> bool {
    let mut index = start;
    for expected in prefix.chars() {
        match text.get(index) {
            Some(c) if c.eq_ignore_ascii_case(&expected) => index += 1,
            _ => return false,
        }
    }
    true
}

/// Length of the `t.co` slug if `url` is a `http(s)://t.co/slug` link.
fn tco_slug_len(url: &[char], protocol_len: usize) -> Option<usize> {
    if !starts_with_ignore_case(url, protocol_len, "t.co/") {
        return None;
    }
    let slug = count_from(url, protocol_len + "t.co/".len(), |c| {
        c.is_ascii_alphanumeric()
    });
    (slug > 0).then_some(slug)
}

fn count_from(text: &[char], start: usize, accept: impl Fn(char) -> bool) -> usize {
    text.get(start..)
        .map_or(0, |rest| rest.iter().take_while(|&&c| accept(c)).count())
}

/// End of a URL path that starts after its `/`: the longest run of path
/// characters and balanced parentheses that ends on a character allowed at
/// the end, so `example.com/foo.` leaves the final period out of the link.
fn path_end(text: &[char], start: usize) -> usize {
    let mut best = start;
    let mut index = start;
    loop {
        match text.get(index) {
            Some(&c) if is_path_char(c) => {
                index += 1;
                if is_path_ending_char(c) {
                    best = index;
                }
            }
            Some('(') => match balanced_parens_end(text, index) {
                Some(end) => {
                    index = end;
                    best = index;
                }
                None => break,
            },
            _ => break,
        }
    }
    best
}

/// End of `(…)` at `start`, allowing one nested level, as in Wikipedia
/// links like `/Primer_(film)`.
fn balanced_parens_end(text: &[char], start: usize) -> Option<usize> {
    let inner = start + 1;
    let first = count_from(text, inner, is_path_char);
    match text.get(inner + first) {
        Some(')') if first > 0 => Some(inner + first + 1),
        Some('(') => {
            let nested = inner + first + 1;
            let nested_len = count_from(text, nested, is_path_char);
            if nested_len == 0 || text.get(nested + nested_len) != Some(&')') {
                return None;
            }
            let after = nested + nested_len + 1;
            let tail = count_from(text, after, is_path_char);
            (text.get(after + tail) == Some(&')')).then_some(after + tail + 1)
        }
        _ => None,
    }
}

/// End of a query string starting after its `?`, if it has a valid ending.
fn query_end(text: &[char], start: usize) -> Option<usize> {
    let run = count_from(text, start, is_query_char);
    let chars = text.get(start..start + run)?;
    let last = chars.iter().rposition(|&c| is_query_ending_char(c))?;
    Some(start + last + 1)
}

/// Whether `domain` survives IDNA: every label, punycode-encoded, must be
/// 1 to 63 characters long. This is what rejects the 64-character domain
/// and the long CJK hosts of the conformance cases.
fn is_valid_idn_domain(domain: &[char]) -> bool {
    let labels_fit = domain.split(|&c| c == '.').all(|label| {
        punycode_label_len(label).is_some_and(|len| (1..=MAX_LABEL_LENGTH).contains(&len))
    });
    // A domain already in punycode must itself be ASCII.
    labels_fit && !(domain.starts_with(&['x', 'n', '-', '-']) && ascii_domains(domain).is_empty())
}

/// Length of `label` after IDNA `ToASCII` (punycode with `xn--`), or `None`
/// when it's certainly over the limit.
fn punycode_label_len(label: &[char]) -> Option<usize> {
    // Encoding never shortens, so skip encoding hopelessly long labels
    // (this also keeps the encoder's arithmetic small).
    if label.len() > MAX_LABEL_LENGTH {
        return None;
    }
    // ToASCII also splits on the ideographic and full-width full stops.
    let mut total = 0;
    for (index, part) in label
        .split(|&c| matches!(c, '\u{3002}' | '\u{FF0E}' | '\u{FF61}'))
        .enumerate()
    {
        total += usize::from(index > 0);
        total += if part.iter().all(|&c| c <= '\u{7E}') {
            part.len()
        } else {
            "xn--".len() + punycode_encoded_len(part)?
        };
    }
    Some(total)
}

/// Length of the RFC 3492 punycode encoding of `input` (without `xn--`).
fn punycode_encoded_len(input: &[char]) -> Option<usize> {
    const BASE: u64 = 36;
    const T_MIN: u64 = 1;
    const T_MAX: u64 = 26;
    const SKEW: u64 = 38;
    const DAMP: u64 = 700;

    fn adapt(delta: u64, points: u64, first_time: bool) -> u64 {
        let mut delta = if first_time { delta / DAMP } else { delta / 2 };
        delta += delta / points;
        let mut k = 0;
        while delta > ((BASE - T_MIN) * T_MAX) / 2 {
            delta /= BASE - T_MIN;
            k += BASE;
        }
        k + (BASE - T_MIN + 1) * delta / (delta + SKEW)
    }

    let basic = input.iter().filter(|c| c.is_ascii()).count();
    let mut output = basic + usize::from(basic > 0);
    let mut handled = basic;
    let mut n: u64 = 0x80;
    let mut delta: u64 = 0;
    let mut bias: u64 = 72;
    while handled < input.len() {
        let next = input
            .iter()
            .map(|&c| u64::from(u32::from(c)))
            .filter(|&c| c >= n)
            .min()?;
        delta = delta.checked_add((next - n).checked_mul(handled as u64 + 1)?)?;
        n = next;
        for &c in input {
            let c = u64::from(u32::from(c));
            if c < n {
                delta = delta.checked_add(1)?;
            }
            if c == n {
                let mut q = delta;
                let mut k = BASE;
                loop {
                    let threshold = if k <= bias {
                        T_MIN
                    } else if k >= bias + T_MAX {
                        T_MAX
                    } else {
                        k - bias
                    };
                    if q < threshold {
                        break;
                    }
                    output += 1;
                    q = (q - threshold) / (BASE - threshold);
                    k += BASE;
                }
                output += 1;
                bias = adapt(delta, handled as u64 + 1, handled == basic);
                delta = 0;
                handled += 1;
            }
        }
        delta = delta.checked_add(1)?;
        n += 1;
    }
    Some(output)
}

/// Spans of the ASCII (Latin) domains inside a domain, as twitter-text links
/// only those when no scheme is given: `(label.)+tld`, leftmost first.
fn ascii_domains(domain: &[char]) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut start = 0;
    while start < domain.len() {
        match ascii_domain_at(domain, start) {
            Some(end) => {
                found.push((start, end));
                start = end.max(start + 1);
            }
            None => start += 1,
        }
    }
    found
}

fn ascii_domain_at(domain: &[char], start: usize) -> Option<usize> {
    let mut tld_starts = Vec::new();
    let mut index = start;
    loop {
        let run = count_from(domain, index, is_ascii_label_char);
        if run == 0 || domain.get(index + run) != Some(&'.') {
            break;
        }
        index += run + 1;
        tld_starts.push(index);
    }
    // Greedy: prefer the most labels before the TLD.
    tld_starts
        .iter()
        .rev()
        .find_map(|&tld_start| tld_end(domain, tld_start, domain.len(), false))
}

/// `name.cc` with a country-code TLD: not linked without a scheme or a path,
/// since words like `readme.md` or `a.it` are rarely meant as links.
fn is_short_country_domain(domain: &[char]) -> bool {
    short_domain_tld_start(domain).is_some_and(|tld_start| {
        tld_end(domain, tld_start, domain.len(), true) == Some(domain.len())
    })
}

/// `name.co` and `name.tv` are linked even without a scheme.
fn is_special_short_domain(domain: &[char]) -> bool {
    short_domain_tld_start(domain).is_some_and(|tld_start| {
        domain.get(tld_start..).is_some_and(|tld| {
            let tld: String = tld.iter().map(char::to_ascii_lowercase).collect();
            tld == "co" || tld == "tv"
        })
    })
}

/// Start of the TLD if `domain` is one valid domain-name label plus a TLD.
fn short_domain_tld_start(domain: &[char]) -> Option<usize> {
    let dot = domain.iter().position(|&c| c == '.')?;
    let name = domain.get(..dot)?;
    let edges_ok = name.first().copied().is_some_and(is_domain_char)
        && name.last().copied().is_some_and(is_domain_char);
    let inner_ok = name.iter().all(|&c| is_domain_char(c) || c == '-');
    (edges_ok && inner_ok).then_some(dot + 1)
}

/// End of a known top-level domain at `start`, looking no further than
/// `limit`. Like twitter-text, a TLD must not run on into `[0-9A-Za-z@+-]`,
/// and punycode TLDs (`xn--…`) are always accepted.
fn tld_end(text: &[char], start: usize, limit: usize, country_only: bool) -> Option<usize> {
    let visible = text.get(start..limit)?;
    let follows_ok = |after: usize| {
        !visible
            .get(after)
            .is_some_and(|&c| c.is_ascii_alphanumeric() || matches!(c, '@' | '+' | '-'))
    };

    let ascii_len = visible
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric())
        .count();
    if ascii_len > 0 {
        let candidate: String = visible
            .iter()
            .take(ascii_len)
            .map(char::to_ascii_lowercase)
            .collect();
        if is_listed_ascii_tld(&candidate, country_only) && follows_ok(ascii_len) {
            return Some(start + ascii_len);
        }
        if !country_only && starts_with_ignore_case(visible, 0, "xn--") {
            let rest = count_from(visible, 4, |c| c.is_ascii_alphanumeric() || c == '-');
            return (rest > 0).then_some(start + 4 + rest);
        }
        return None;
    }

    // Internationalised TLDs: the longest listed one that fits, compared
    // case-insensitively (Cyrillic and Greek ones have capitals).
    idn_tlds()
        .iter()
        .filter(|(_, is_country)| *is_country || !country_only)
        .filter_map(|(tld, _)| {
            let candidate = visible.get(..tld.len())?;
            let same = candidate
                .iter()
                .zip(tld)
                .all(|(&c, &expected)| fold_case(c) == expected);
            (same && follows_ok(tld.len())).then_some(tld.len())
        })
        .max()
        .map(|len| start + len)
}

/// Internationalised TLDs as case-folded chars, with whether each is a
/// country code; built once so matching doesn't re-split the lists.
fn idn_tlds() -> &'static [(Vec<char>, bool)] {
    static TLDS: OnceLock<Vec<(Vec<char>, bool)>> = OnceLock::new();
    TLDS.get_or_init(|| {
        let generic = IDN_GENERIC_TLDS.split_whitespace().map(|tld| (tld, false));
        let country = IDN_COUNTRY_TLDS.split_whitespace().map(|tld| (tld, true));
        generic
            .chain(country)
            .map(|(tld, is_country)| (tld.chars().map(fold_case).collect(), is_country))
            .collect()
    })
}

/// Simple one-to-one lowercase mapping, enough for TLD comparison.
fn fold_case(c: char) -> char {
    let mut lower = c.to_lowercase();
    match (lower.next(), lower.next()) {
        (Some(single), None) => single,
        _ => c,
    }
}

/// Whether `candidate` (lowercase ASCII) is a known TLD of the wanted kind.
fn is_listed_ascii_tld(candidate: &str, country_only: bool) -> bool {
    // Built once: a linear scan of the lists at every `label.` made long
    // dotted inputs slow.
    static KINDS: OnceLock<HashMap<&'static str, bool>> = OnceLock::new();
    let kinds = KINDS.get_or_init(|| {
        let generic = GENERIC_TLDS.split_whitespace().map(|tld| (tld, false));
        let country = COUNTRY_TLDS.split_whitespace().map(|tld| (tld, true));
        generic.chain(country).collect()
    });
    kinds
        .get(candidate)
        .is_some_and(|&is_country| is_country || !country_only)
}

fn utf16_len(text: &[char]) -> usize {
    text.iter().map(|c| c.len_utf16()).sum()
}

// --- character classes of twitter-text's URL grammar ----------------------

/// A URL must not be glued to a word, a mention, a hashtag or a cashtag.
fn is_url_preceding_char(c: char) -> bool {
    !(c.is_ascii_alphanumeric()
        || matches!(
            c,
            '@' | '\u{FF20}' | '$' | '#' | '\u{FF03}' | '\u{FFFE}' | '\u{FEFF}' | '\u{FFFF}'
        ))
}

/// Anything but ASCII punctuation, spaces, invalid characters and
/// directional marks may appear in a domain (IDNs included).
fn is_domain_char(c: char) -> bool {
    !(is_ascii_punct(c)
        || is_space(c)
        || is_directional_mark(c)
        || matches!(c, '\u{FFFE}' | '\u{FEFF}' | '\u{FFFF}'))
}

fn is_label_char(c: char) -> bool {
    is_domain_char(c) || c == '-' || c == '_'
}

fn is_ascii_punct(c: char) -> bool {
    // twitter-text's list: note that `"` and `` ` `` are not in it.
    "!'#%&()*+,\\-./:;<=>?@[]^_{|}~$".contains(c)
}

fn is_space(c: char) -> bool {
    matches!(
        c,
        '\u{9}'..='\u{D}'
            | ' '
            | '\u{85}'
            | '\u{A0}'
            | '\u{1680}'
            | '\u{180E}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
    )
}

fn is_directional_mark(c: char) -> bool {
    matches!(
        c,
        '\u{202A}'..='\u{202E}' | '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{2066}'..='\u{2069}'
    )
}

fn is_latin_accent(c: char) -> bool {
    matches!(
        c,
        '\u{C0}'..='\u{D6}'
            | '\u{D8}'..='\u{F6}'
            | '\u{F8}'..='\u{24F}'
            | '\u{253}'
            | '\u{254}'
            | '\u{256}'
            | '\u{257}'
            | '\u{259}'
            | '\u{25B}'
            | '\u{263}'
            | '\u{268}'
            | '\u{26F}'
            | '\u{272}'
            | '\u{289}'
            | '\u{28B}'
            | '\u{2BB}'
            | '\u{300}'..='\u{36F}'
            | '\u{1E00}'..='\u{1EFF}'
    )
}

fn is_ascii_label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || is_latin_accent(c)
}

fn is_cyrillic(c: char) -> bool {
    matches!(c, '\u{400}'..='\u{4FF}')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || is_cyrillic(c)
        || is_latin_accent(c)
        || "!*';:=+,.$/%#[]-\u{2013}_~@|&".contains(c)
}

fn is_path_ending_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || is_cyrillic(c) || is_latin_accent(c) || "+-=_#/".contains(c)
}

fn is_query_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!?*'@();:&=+$/%#[]-_.,~|".contains(c)
}

fn is_query_ending_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_&=#/".contains(c)
}

// --- top-level domains ------------------------------------------------------
//
// Whitespace-separated so the lists stay compact; the ASCII ones are loaded
// into a map on first use (see `is_listed_ascii_tld`).

/// Country-code TLDs (ISO 3166 and the few legacy ones twitter-text keeps).
const COUNTRY_TLDS: &str = "\
    ac ad ae af ag ai al am an ao aq ar as at au aw ax az ba bb bd be bf bg bh bi bj bl bm bn \
    bo bq br bs bt bv bw by bz ca cc cd cf cg ch ci ck cl cm cn co cr cu cv cw cx cy cz de dj \
    dk dm do dz ec ee eg eh er es et eu fi fj fk fm fo fr ga gb gd ge gf gg gh gi gl gm gn gp \
    gq gr gs gt gu gw gy hk hm hn hr ht hu id ie il im in io iq ir is it je jm jo jp ke kg kh \
    ki km kn kp kr kw ky kz la lb lc li lk lr ls lt lu lv ly ma mc md me mf mg mh mk ml mm mn \
    mo mp mq mr ms mt mu mv mw mx my mz na nc ne nf ng ni nl no np nr nu nz om pa pe pf pg ph \
    pk pl pm pn pr ps pt pw py qa re ro rs ru rw sa sb sc sd se sg sh si sj sk sl sm sn so sr \
    ss st su sv sx sy sz tc td tf tg th tj tk tl tm tn to tp tr tt tv tw tz ua ug uk um us uy \
    uz va vc ve vg vi vn vu wf ws ye yt za zm zw";

/// Legacy generic TLDs and the new ones commonly seen in links.
const GENERIC_TLDS: &str = "\
    academy aero agency app apple arpa art asia audio auto bank bar beer berlin best bet bid \
    bike bio biz black blog blue book boutique build business buzz cafe cam camera camp \
    capital car cards care career careers cars casa cash casino cat center ceo chat cheap \
    church city click clinic clothing cloud club coach codes coffee college com community \
    company computer consulting cool coop country credit cricket cyou dance date dating day \
    deals degree delivery dental design dev diet digital direct directory discount dog \
    domains download earth eco edu education email energy engineering enterprises estate \
    events exchange expert express fail faith family fan fans farm fashion film finance \
    financial fish fit fitness flights florist flowers food football forsale foundation free \
    fun fund furniture futbol fyi gallery game games garden gay gift gifts gives glass global \
    gmbh gold golf google gov graphics gratis green group guide guitars guru hair health \
    healthcare help hiphop hockey holdings holiday homes horse hospital host hosting house \
    how icu inc industries info ink institute insurance int international investments irish \
    jobs kim kitchen land law lawyer lease legal lgbt life lighting limited link live llc \
    loan loans lol london love ltd luxury management market marketing mba med media meme men \
    menu mil mobi moda moe mom money movie museum name navy net network news ngo ninja nyc \
    one onion online ooo org organic page paris partners parts party pet photo photography \
    photos pics pictures pink pizza place plus poker porn post press pro productions promo \
    properties property pub quebec racing radio realestate realty recipes red rehab rent \
    rentals repair report rest restaurant review reviews rip rocks run sale salon school \
    science security services sex sexy shoes shop shopping show singles site ski soccer \
    social software solar solutions space sport store stream studio study style sucks supply \
    support surf systems tattoo tax taxi team tech technology tel tennis theater tickets tips \
    today tokyo tools top tours town toys trade training travel tube university vegas \
    ventures vet video vin vip vision vote voyage wang watch webcam website wedding wiki win \
    wine work works world wtf xxx xyz yoga youtube zone";

/// Internationalised country-code TLDs.
const IDN_COUNTRY_TLDS: &str = "\
    한국 香港 澳門 新加坡 台灣 台湾 中國 中国 გე ລາວ ไทย ලංකා ഭാരതം ಭಾರತ భారత్ சிங்கப்பூர் இலங்கை \
    இந்தியா ଭାରତ ભારત ਭਾਰਤ ভাৰত ভারত বাংলা भारोत भारतम् भारत ڀارت پاکستان موريتانيا مليسيا مصر قطر \
    فلسطين عمان عراق سورية سودان تونس بھارت بارت ایران امارات المغرب السعودية الجزائر البحرين \
    الاردن հայ қаз укр срб рф мон мкд ею бел бг ευ ελ";

/// Internationalised generic TLDs in common use.
const IDN_GENERIC_TLDS: &str = "\
    닷컴 닷넷 公司 网络 网站 网址 在线 中文网 商城 商店 机构 游戏 移动 我爱你 コム みんな ком орг \
    онлайн рус сайт москва дети كوم موقع شبكة عرب";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_plain_latin_and_cjk() {
        assert_eq!(weighted_length("hello"), 5);
        assert_eq!(weighted_length("故人西辞"), 8);
        assert_eq!(weighted_length(""), 0);
    }

    #[test]
    fn normalises_before_counting() {
        // "A" + combining acute composes to one "Á".
        assert_eq!(weighted_length("A\u{301}"), 1);
    }

    #[test]
    fn counts_links_as_23() {
        assert_eq!(weighted_length("http://test.co"), 23);
        assert_eq!(weighted_length("see example.com/path."), 4 + 23 + 1);
        assert_eq!(weighted_length("https://t.co/abc123 x"), 23 + 2);
        assert_eq!(weighted_length("https://example.com/w/Primer_(film)"), 23);
        assert_eq!(weighted_length("https://example.com/?q=1&x=y"), 23);
        assert_eq!(weighted_length("HTTPS://EXAMPLE.COM"), 23);
        assert_eq!(weighted_length("http://xn--p1ai.xn--p1ai"), 23);
    }

    #[test]
    fn does_not_link_bare_country_domains_or_glued_text() {
        // "a.de" without scheme or path stays text; ".co" is the exception.
        assert_eq!(weighted_length("a.de"), 4);
        assert_eq!(weighted_length("a.co"), 23);
        assert_eq!(weighted_length("www.a.de"), 23);
        assert_eq!(weighted_length("a.de/x"), 23);
        assert_eq!(weighted_length("user@example.com"), 16);
        // Glued to "-" a bare domain stays text.
        assert_eq!(weighted_length("a -example.com"), 14);
        assert_eq!(weighted_length("foo.unknowntld"), 14);
    }

    #[test]
    fn counts_emoji_sequences_once() {
        assert_eq!(weighted_length("1\u{20E3}"), 2);
        assert_eq!(weighted_length("1\u{FE0F}\u{20E3}"), 2);
        assert_eq!(weighted_length("🇫🇷"), 2);
        assert_eq!(weighted_length("👍🏽"), 2);
        assert_eq!(weighted_length("©"), 1);
        assert_eq!(weighted_length("©\u{FE0F}"), 2);
        assert_eq!(weighted_length("\u{200D}"), 1);
    }

    #[test]
    fn validates_posts() {
        assert!(is_valid_tweet("ok"));
        assert!(!is_valid_tweet(""));
        assert!(!is_valid_tweet(" \n\t"));
        assert!(!is_valid_tweet("bad\u{FFFE}"));
        assert!(
            is_valid_tweet("right-to-left \u{202E}ok"),
            "X accepts directional controls"
        );
        assert!(is_valid_tweet(&"x".repeat(MAX_WEIGHTED_LENGTH)));
        assert!(!is_valid_tweet(&"x".repeat(MAX_WEIGHTED_LENGTH + 1)));
        assert!(!is_valid_tweet(&"故".repeat(141)));
    }

    #[test]
    fn punycode_matches_rfc_3492_samples() {
        // RFC 3492 7.1 (B): "Pročprostěnemluvíčesky" → "Proprostnemluvesky-uyb24dma41a".
        let czech: Vec<char> = "Pročprostěnemluvíčesky".chars().collect();
        assert_eq!(
            punycode_encoded_len(&czech),
            Some("Proprostnemluvesky-uyb24dma41a".len())
        );
        // RFC 3492 7.1 (A): Arabic (Egyptian) → "egbpdaj6bu4bxfgehfvwxn".
        let arabic: Vec<char> = "ليهمابتكلموشعربي؟".chars().collect();
        assert_eq!(
            punycode_encoded_len(&arabic),
            Some("egbpdaj6bu4bxfgehfvwxn".len())
        );
    }

    #[test]
    fn long_inputs_stay_fast() {
        // Would be quadratic without the domain memo.
        let dots = "a.".repeat(50_000);
        assert_eq!(weighted_length(&dots), 100_000);
        let kana_dots = "あ.".repeat(20_000);
        assert_eq!(weighted_length(&kana_dots), 60_000);
        let links = "https://example.com/a ".repeat(5_000);
        assert_eq!(weighted_length(&links), 5_000 * 24);
        let long_label = format!("{}.com", "a".repeat(100_000));
        assert_eq!(weighted_length(&long_label), 100_004);
    }
}
