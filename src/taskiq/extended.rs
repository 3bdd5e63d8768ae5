//! How taskiq-aio-sqs marks a message whose body is an S3 pointer (an extended payload).

use crate::queue::ReceivedMessage;

/// Message attribute that marks an extended (S3) message; taskiq-aio-sqs sets it to `True`.
pub(crate) const EXTENDED_MESSAGE_ATTRIBUTE: &str = "s3_extended_message";
/// Longest S3 key; a pointer naming a longer one is not read.
pub(crate) const MAX_S3_KEY_BYTES: usize = 1024;

/// Whether the message's body is an S3 pointer (taskiq-aio-sqs tests the attribute's
/// presence; it always sends `True`).
pub(crate) fn is_extended(message: &ReceivedMessage) -> bool {
    message
        .attributes
        .get(EXTENDED_MESSAGE_ATTRIBUTE)
        .is_some_and(|v| !v.is_empty() && !v.eq_ignore_ascii_case("false"))
}

/// The extended-payload marker of a message, to carry over to a message with the same body
/// (a hand-off continuation).
pub(crate) fn extended_marker(message: &ReceivedMessage) -> Option<(String, String)> {
    message
        .attributes
        .get_key_value(EXTENDED_MESSAGE_ATTRIBUTE)
        .map(|(k, v)| (k.clone(), v.clone()))
}
