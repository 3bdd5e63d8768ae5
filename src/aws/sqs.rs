//! The SendMessage call every SQS send goes through (a hand-off continuation, a dead letter,
//! a redrive).

use aws_sdk_sqs::operation::send_message::builders::SendMessageFluentBuilder;
use aws_sdk_sqs::types::MessageAttributeValue;

/// A message's FIFO parameters, used when the queue is a FIFO queue (its URL ends in
/// `.fifo`) and ignored otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fifo {
    pub group: String,
    pub deduplication_id: String,
}

/// A SendMessage call of `body` to `queue_url` with string attributes; on a FIFO queue with
/// the `fifo` ids when given. Ready to `.send()`.
pub(crate) fn send_message<K, V>(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    body: &str,
    attributes: impl IntoIterator<Item = (K, V)>,
    fifo: Option<Fifo>,
) -> SendMessageFluentBuilder
where
    K: Into<String>,
    V: AsRef<str>,
{
    let attributes = attributes
        .into_iter()
        .map(|(k, v)| (k.into(), string_attribute(v.as_ref())))
        .collect();
    let mut send = client
        .send_message()
        .queue_url(queue_url)
        .message_body(body)
        .set_message_attributes(Some(attributes));
    if let Some(fifo) = fifo.filter(|_| is_fifo(queue_url)) {
        send = send
            .message_group_id(fifo.group)
            .message_deduplication_id(fifo.deduplication_id);
    }
    send
}

/// Whether the queue is a FIFO queue (SQS requires the suffix on their names).
pub(crate) fn is_fifo(queue_url: &str) -> bool {
    queue_url.ends_with(".fifo")
}

fn string_attribute(value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        // SQS rejects empty string attribute values.
        .string_value(if value.is_empty() { "-" } else { value })
        .build()
        .expect("data type is set")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_ids_go_to_fifo_queues_only() {
        assert!(is_fifo("https://sqs.eu-west-1.amazonaws.com/1/steps.fifo"));
        assert!(!is_fifo("https://sqs.eu-west-1.amazonaws.com/1/steps"));
    }

    #[test]
    fn empty_attribute_values_are_replaced() {
        assert_eq!(string_attribute("").string_value(), Some("-"));
        assert_eq!(string_attribute("x").string_value(), Some("x"));
    }
}
