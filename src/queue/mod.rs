//! The work queue boundary: where step messages come from and where their fate is recorded.
//! [`SqsQueue`] is the real one; tests put fakes behind [`WorkQueue`].

mod sqs;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;

pub use sqs::{SqsQueue, SqsQueueConfig};

/// Message attributes of a hand-off continuation (docs/guarantees.md).
pub mod continuation {
    /// Present (value "true") on a continuation message.
    pub const MARKER: &str = "dagster_taskiq_continuation";
    /// The controller that holds the running execution.
    pub const OWNER: &str = "dagster_taskiq_owner";
    /// When the hand-off happened, milliseconds since the Unix epoch.
    pub const HANDOFF_AT_MS: &str = "dagster_taskiq_handoff_at_ms";
    /// The message id of the message it continues.
    pub const CONTINUES: &str = "dagster_taskiq_continues";
}

/// One message as received, with what SQS told us about its delivery.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    pub message_id: String,
    /// Valid for this delivery only; a later receive of the same message gets a new one.
    pub receipt_handle: String,
    pub body: String,
    /// ApproximateReceiveCount: 1 on the first delivery.
    pub receive_count: u32,
    /// String message attributes (e.g. `s3_extended_message`).
    pub attributes: HashMap<String, String>,
}

/// Why a message goes to the dead-letter queue; sent along as message attributes.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Stable short reason, e.g. `invalid_json` or `attempts_exhausted`.
    pub reason: String,
    /// Human-readable detail.
    pub detail: String,
    /// `poison` or `transient`.
    pub error_class: &'static str,
    pub controller_id: String,
}

/// Outcome of one entry of a batched visibility change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtendResult {
    Extended,
    /// The receipt handle is no longer valid: someone else holds the message now.
    Lost(String),
    /// Failed for a reason that may pass; try again.
    Failed(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error("queue throttled the request ({operation}): {message}")]
    Throttled {
        operation: &'static str,
        message: String,
    },
    #[error("queue unreachable or failing ({operation}): {message}")]
    Unavailable {
        operation: &'static str,
        message: String,
    },
    #[error("receipt handle is no longer valid ({operation})")]
    ReceiptHandleInvalid { operation: &'static str },
    #[error("queue request rejected ({operation}): {message}")]
    Rejected {
        operation: &'static str,
        message: String,
    },
}

impl QueueError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            QueueError::Throttled { .. } | QueueError::Unavailable { .. }
        )
    }

    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            QueueError::Throttled { .. } => "throttled",
            QueueError::Unavailable { .. } => "unavailable",
            QueueError::ReceiptHandleInvalid { .. } => "receipt_handle_invalid",
            QueueError::Rejected { .. } => "rejected",
        }
    }
}

/// The SQS operations the controller needs. Implementations must be cheap to share.
#[async_trait]
pub trait WorkQueue: Send + Sync + 'static {
    /// Long-polls for up to `max` (≤ 10) messages, waiting at most `wait` (≤ 20 s).
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError>;

    /// Sets the visibility of each held message to `visibility` from now, in batches.
    /// Returns one result per handle, in order.
    async fn extend(
        &self,
        receipt_handles: &[String],
        visibility: Duration,
    ) -> Result<Vec<ExtendResult>, QueueError>;

    /// Makes a held message visible again after `delay` (0: at once).
    async fn release(&self, receipt_handle: &str, delay: Duration) -> Result<(), QueueError>;

    /// Deletes a message whose outcome is durable.
    async fn ack(&self, receipt_handle: &str) -> Result<(), QueueError>;

    /// Sends a new message to the work queue (a hand-off continuation or a redrive).
    /// Returns its message id.
    async fn send(
        &self,
        body: &str,
        attributes: &HashMap<String, String>,
    ) -> Result<String, QueueError>;

    /// Sends the message to the dead-letter queue with the reason, then deletes it.
    async fn dead_letter(
        &self,
        message: &ReceivedMessage,
        dead_letter: &DeadLetter,
    ) -> Result<(), QueueError>;
}
