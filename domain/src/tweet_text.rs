//! Placeholder until the weighted counter lands.
pub const MAX_WEIGHTED_LENGTH: usize = 280;
pub fn weighted_length(text: &str) -> usize {
    text.chars().count()
}
pub fn is_valid_tweet(text: &str) -> bool {
    !text.trim().is_empty()
}
