//! The work queue boundary: where step messages come from and where their fate is recorded.
//! [`SqsQueue`] is the real one; tests put fakes behind [`WorkQueue`].

mod sqs;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;

pub use sqs::{SqsQueue, SqsQueueConfig, DLQ_REASON_ATTRIBUTE};

/// Message attributes of a hand-off continuation (docs/guarantees.md).
pub mod continuation {
    /// Present (value "true") on a continuation message.
    pub const MARKER: &str = "dagster_taskiq_continuation";
    /// The controller that holds the running execution.
    pub const OWNER: &str = "dagster_taskiq_owner";
    /// When the hand-off happened, milliseconds since the Unix epoch.
    pub const HANDOFF_AT_MS: &str = "dagster_taskiq_handoff_at_ms";
    /// The message id of the message it continues.
    pub(crate) const CONTINUES: &str = "dagster_taskiq_continues";
    /// On a message requeued because it waited too long for a run slot: deliveries of the
    /// message it replaces before that one, added to the copy's receive count.
    pub const PRIOR_DELIVERIES: &str = "dagster_taskiq_prior_deliveries";

    /// Whether the message is a hand-off continuation.
    pub(crate) fn is_continuation(message: &super::ReceivedMessage) -> bool {
        message.attributes.get(MARKER).map(String::as_str) == Some("true")
    }
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
    /// SentTimestamp (ms since the epoch): when this copy was sent to the queue.
    pub sent_at_ms: Option<i64>,
}

/// A message sent in place of a received one: the same body, new attributes.
#[derive(Debug, Clone)]
pub struct Resend<'a> {
    /// The message it replaces.
    pub of: &'a ReceivedMessage,
    /// What the copy is for (`requeue`, `handoff`). On a FIFO queue it is part of the
    /// copy's deduplication id: SQS lets this intended re-send through, and drops a second
    /// copy of the same message for the same purpose (a retried call, or a redelivery of an
    /// original whose delete failed) within its 5-minute window.
    pub purpose: &'static str,
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
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            QueueError::Throttled { .. } | QueueError::Unavailable { .. }
        )
    }

    /// Short label for metrics.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            QueueError::Throttled { .. } => "throttled",
            QueueError::Unavailable { .. } => "unavailable",
            QueueError::ReceiptHandleInvalid { .. } => "receipt_handle_invalid",
            QueueError::Rejected { .. } => "rejected",
        }
    }
}

impl crate::retry::Transient for QueueError {
    fn is_transient(&self) -> bool {
        QueueError::is_transient(self)
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

    /// Sends a message in place of a received one (a requeued copy, a hand-off
    /// continuation) to the work queue. Returns its message id.
    async fn send(&self, resend: &Resend<'_>) -> Result<String, QueueError>;

    /// Sends the message to the dead-letter queue with the reason, then deletes it.
    async fn dead_letter(
        &self,
        message: &ReceivedMessage,
        dead_letter: &DeadLetter,
    ) -> Result<(), QueueError>;
}

/// Approximate message counts of one queue (GetQueueAttributes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueCounts {
    /// ApproximateNumberOfMessages.
    pub visible: u64,
    /// ApproximateNumberOfMessagesNotVisible: held by a consumer.
    pub in_flight: u64,
    /// ApproximateNumberOfMessagesDelayed.
    pub delayed: u64,
}

/// Which dead letters a redrive moves; an empty filter matches every message.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveFilter {
    /// The dead-letter reason (message attribute `dagster_taskiq_error`), e.g. `invalid_json`.
    pub reason: Option<String>,
    /// The Dagster run: label `dagster_run_id`, else the packed args' `pipeline_run_id`.
    pub run_id: Option<String>,
    /// The message's `task_id`.
    pub task_id: Option<String>,
}

impl RedriveFilter {
    /// Whether a dead letter matches. Bodies stored in S3 (extended messages) carry no run or
    /// task id here, so they match only filters without those fields.
    pub fn matches(&self, message: &ReceivedMessage) -> bool {
        if let Some(reason) = &self.reason {
            if message.attributes.get(DLQ_REASON_ATTRIBUTE) != Some(reason) {
                return false;
            }
        }
        if self.run_id.is_none() && self.task_id.is_none() {
            return true;
        }
        let body: serde_json::Value = match serde_json::from_str(&message.body) {
            Ok(body) => body,
            Err(_) => return false,
        };
        if let Some(task_id) = &self.task_id {
            if body.get("task_id").and_then(serde_json::Value::as_str) != Some(task_id.as_str()) {
                return false;
            }
        }
        if let Some(run_id) = &self.run_id {
            let labelled = body
                .pointer("/labels/dagster_run_id")
                .and_then(serde_json::Value::as_str);
            let packed = body
                .pointer("/kwargs/execute_step_args_packed/pipeline_run_id")
                .and_then(serde_json::Value::as_str);
            if labelled.or(packed) != Some(run_id.as_str()) {
                return false;
            }
        }
        true
    }
}

/// One dead letter as `dlq list` shows it; read from the attributes the controller wrote and
/// from the body, where it is a step message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetterEntry {
    pub message_id: String,
    /// `dagster_taskiq_error`, or None for a message SQS moved itself (maxReceiveCount).
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub run_id: Option<String>,
    pub step_key: Option<String>,
    pub task_id: Option<String>,
    /// When the controller dead-lettered it, else when it was sent to the DLQ.
    pub dead_lettered_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Receives of the original message before it was dead-lettered.
    pub original_receive_count: Option<u32>,
}

impl DeadLetterEntry {
    pub(crate) fn from_message(message: &ReceivedMessage, sent_ms: Option<i64>) -> Self {
        let attribute = |name: &str| message.attributes.get(name).cloned();
        let body: Option<serde_json::Value> = serde_json::from_str(&message.body).ok();
        let text = |pointer: &str| {
            body.as_ref()
                .and_then(|b| b.pointer(pointer)?.as_str().map(str::to_owned))
        };
        let dead_lettered_at = attribute("dagster_taskiq_dead_lettered_at")
            .and_then(|at| chrono::DateTime::parse_from_rfc3339(&at).ok())
            .map(|at| at.with_timezone(&chrono::Utc))
            .or_else(|| sent_ms.and_then(chrono::DateTime::from_timestamp_millis));
        Self {
            message_id: message.message_id.clone(),
            reason: attribute(DLQ_REASON_ATTRIBUTE),
            detail: attribute("dagster_taskiq_error_detail"),
            run_id: text("/labels/dagster_run_id")
                .or_else(|| text("/kwargs/execute_step_args_packed/pipeline_run_id")),
            step_key: text("/labels/dagster_step_key")
                .or_else(|| text("/kwargs/execute_step_args_packed/step_keys_to_execute/0")),
            task_id: text("/task_id"),
            dead_lettered_at,
            original_receive_count: attribute("dagster_taskiq_receive_count")
                .and_then(|n| n.parse().ok()),
        }
    }
}

/// What a redrive did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RedriveReport {
    /// Dead letters sent back to the work queue and deleted from the DLQ.
    pub moved: usize,
    /// Dead letters looked at (moved or left).
    pub examined: usize,
    /// Message ids (in the DLQ) of the moved messages.
    pub message_ids: Vec<String>,
}

/// A redrive that stopped on a queue error; `moved` messages had already been moved.
#[derive(Debug, Clone, thiserror::Error)]
#[error("redrive stopped after moving {} message(s): {source}", .report.moved)]
pub struct RedriveError {
    pub report: RedriveReport,
    #[source]
    pub source: QueueError,
}

/// Operator actions on the queues: depths for the dashboard and moving dead letters back.
#[async_trait]
pub trait QueueAdmin: Send + Sync + 'static {
    /// Counts of the work queue and of the dead-letter queue.
    async fn counts(&self) -> Result<(QueueCounts, QueueCounts), QueueError>;

    /// Moves up to `max` dead letters that match `filter` back to the work queue.
    async fn redrive(
        &self,
        max: usize,
        filter: &RedriveFilter,
    ) -> Result<RedriveReport, RedriveError>;
}
