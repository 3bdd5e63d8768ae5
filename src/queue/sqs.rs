//! [`WorkQueue`] on Amazon SQS (aws-sdk-sqs).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
};
use aws_sdk_sqs::Client;

use super::{
    DeadLetter, DeadLetterEntry, ExtendResult, QueueAdmin, QueueCounts, QueueError,
    ReceivedMessage, RedriveError, RedriveFilter, RedriveReport, Resend, WorkQueue,
};
use crate::aws::{self, ErrorClass, Fifo};
use crate::metrics::Metrics;

/// SQS accepts at most 10 entries per batch call.
const BATCH_LIMIT: usize = 10;
/// SQS caps a visibility timeout at 12 hours.
const MAX_VISIBILITY_SECS: u64 = 12 * 3600;
/// taskiq-aio-sqs's marker of a body kept in S3, carried over to the copies this module sends.
const EXTENDED_MESSAGE_ATTRIBUTE: &str = "s3_extended_message";
/// Message attribute that carries the dead-letter reason.
pub const DLQ_REASON_ATTRIBUTE: &str = "dagster_taskiq_error";

#[derive(Debug, Clone)]
pub struct SqsQueueConfig {
    pub queue_url: String,
    pub dlq_url: String,
}

/// How long a redrive hides the dead letters it looks at but leaves, so one pass does not see
/// them twice; they are made visible again when the pass ends.
const REDRIVE_HOLD_SECS: i32 = 60;
/// A redrive looks at no more than this many dead letters per moved message asked for, so a
/// narrow filter over a large DLQ ends.
const REDRIVE_SCAN_FACTOR: usize = 10;

/// The work queue and its dead-letter queue on SQS.
#[derive(Clone)]
pub struct SqsQueue {
    client: Client,
    config: SqsQueueConfig,
    metrics: Option<Arc<Metrics>>,
}

impl SqsQueue {
    pub fn new(client: Client, config: SqsQueueConfig) -> Self {
        Self {
            client,
            config,
            metrics: None,
        }
    }

    /// Counts every SQS call (and its errors and latency) in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Sends one SDK request, counting it, and maps its error.
    async fn call<T, E>(
        &self,
        operation: &'static str,
        request: impl Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    ) -> Result<T, QueueError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let started = Instant::now();
        let result = request.await.map_err(|e| classify(operation, e));
        if let Some(metrics) = &self.metrics {
            let label = [("operation", operation)];
            metrics.sqs_requests.get_or_create(&label).inc();
            metrics
                .sqs_request_duration_seconds
                .get_or_create(&label)
                .observe(started.elapsed().as_secs_f64());
            if let Err(e) = &result {
                metrics
                    .sqs_request_errors
                    .get_or_create(&[("operation", operation), ("kind", e.kind())])
                    .inc();
            }
        }
        result
    }

    /// Finds the dead-letter queue named by the work queue's RedrivePolicy.
    /// `Ok(None)`: the queue has no RedrivePolicy.
    pub async fn discover_dlq(
        client: &Client,
        queue_url: &str,
    ) -> Result<Option<String>, QueueError> {
        let attributes = client
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(|e| classify("GetQueueAttributes", e))?;
        let Some(policy) = attributes
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
        else {
            return Ok(None);
        };
        let arn = serde_json::from_str::<serde_json::Value>(policy)
            .ok()
            .and_then(|p| p.get("deadLetterTargetArn")?.as_str().map(str::to_owned))
            .ok_or_else(|| QueueError::Rejected {
                operation: "GetQueueAttributes",
                message: format!("RedrivePolicy has no deadLetterTargetArn: {policy}"),
            })?;
        // arn:aws:sqs:<region>:<account>:<name>
        let parts: Vec<&str> = arn.split(':').collect();
        let (Some(account), Some(name)) = (parts.get(4), parts.get(5)) else {
            return Err(QueueError::Rejected {
                operation: "GetQueueAttributes",
                message: format!("cannot parse dead-letter queue ARN {arn:?}"),
            });
        };
        let url = client
            .get_queue_url()
            .queue_name(*name)
            .queue_owner_aws_account_id(*account)
            .send()
            .await
            .map_err(|e| classify("GetQueueUrl", e))?;
        Ok(url.queue_url().map(str::to_owned))
    }

    /// Approximate number of visible messages, for dashboards and `doctor`.
    pub async fn depth(&self, queue_url: &str) -> Result<u64, QueueError> {
        Ok(self.queue_counts(queue_url).await?.visible)
    }

    /// Visible, in-flight and delayed message counts of one queue, in one call.
    pub(crate) async fn queue_counts(&self, queue_url: &str) -> Result<QueueCounts, QueueError> {
        let out = self
            .call(
                "GetQueueAttributes",
                self.client
                    .get_queue_attributes()
                    .queue_url(queue_url)
                    .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                    .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                    .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
                    .send(),
            )
            .await?;
        let count = |name: QueueAttributeName| {
            out.attributes()
                .and_then(|a| a.get(&name))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(QueueCounts {
            visible: count(QueueAttributeName::ApproximateNumberOfMessages),
            in_flight: count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            delayed: count(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        })
    }

    /// Moves up to `max` dead letters accepted by `filter` back to the work queue: each is
    /// sent to the work queue first and deleted from the DLQ only after the send succeeded,
    /// so a failure midway can duplicate a message (the controller dedupes by task id) but
    /// never lose one. Dead letters left behind become visible again when the pass ends.
    pub async fn redrive_where(
        &self,
        max: usize,
        filter: impl Fn(&ReceivedMessage) -> bool,
    ) -> Result<RedriveReport, RedriveError> {
        let mut report = RedriveReport::default();
        let mut left = Vec::new();
        let scan_limit = max.saturating_mul(REDRIVE_SCAN_FACTOR).max(100);
        let result = self
            .redrive_pass(max, scan_limit, &filter, &mut report, &mut left)
            .await;
        self.release_dead_letters(left).await;
        match result {
            Ok(()) => Ok(report),
            Err(source) => Err(RedriveError { report, source }),
        }
    }

    /// Reads up to `max` dead letters without removing them: each is held for a moment and
    /// made visible again at the end (receiving adds one to its receive count).
    pub async fn list_dead_letters(&self, max: usize) -> Result<Vec<DeadLetterEntry>, QueueError> {
        let mut entries = Vec::new();
        let mut held = Vec::new();
        let result = async {
            while entries.len() < max {
                let batch = self
                    .receive_from(
                        &self.config.dlq_url,
                        (max - entries.len()).min(BATCH_LIMIT),
                        Duration::from_secs(1),
                        REDRIVE_HOLD_SECS,
                    )
                    .await?;
                if batch.is_empty() {
                    break;
                }
                for (message, sent_ms) in batch {
                    held.push(message.receipt_handle.clone());
                    entries.push(DeadLetterEntry::from_message(&message, sent_ms));
                }
            }
            Ok(())
        }
        .await;
        self.release_dead_letters(held).await;
        result.map(|()| entries)
    }

    /// Makes held dead letters visible again. Best effort: a handle we fail to release
    /// becomes visible when its hold runs out.
    async fn release_dead_letters(&self, handles: Vec<String>) {
        for batch in handles.chunks(BATCH_LIMIT) {
            let entries = visibility_entries(batch, 0);
            let _ = self
                .call(
                    "ChangeMessageVisibilityBatch",
                    self.client
                        .change_message_visibility_batch()
                        .queue_url(&self.config.dlq_url)
                        .set_entries(Some(entries))
                        .send(),
                )
                .await;
        }
    }

    async fn redrive_pass(
        &self,
        max: usize,
        scan_limit: usize,
        filter: &impl Fn(&ReceivedMessage) -> bool,
        report: &mut RedriveReport,
        left: &mut Vec<String>,
    ) -> Result<(), QueueError> {
        // Only what was dead-lettered before the pass began: a message we move that fails
        // again and comes back must not be moved again in the same pass.
        let pass_started_ms = chrono::Utc::now().timestamp_millis();
        while report.moved < max && report.examined < scan_limit {
            let batch = self
                .receive_from(
                    &self.config.dlq_url,
                    BATCH_LIMIT,
                    // A short wait: SQS short polls sample servers and may miss messages.
                    Duration::from_secs(1),
                    REDRIVE_HOLD_SECS,
                )
                .await?;
            if batch.is_empty() {
                return Ok(());
            }
            for (message, sent_ms) in batch {
                report.examined += 1;
                let arrived_during_pass = sent_ms.is_some_and(|sent| sent > pass_started_ms);
                if report.moved >= max || arrived_during_pass || !filter(&message) {
                    left.push(message.receipt_handle);
                    continue;
                }
                self.send_back(&message).await?;
                self.call(
                    "DeleteMessage",
                    self.client
                        .delete_message()
                        .queue_url(&self.config.dlq_url)
                        .receipt_handle(&message.receipt_handle)
                        .send(),
                )
                .await?;
                tracing::info!(message_id = %message.message_id, "dead letter redriven to the work queue");
                report.moved += 1;
                report.message_ids.push(message.message_id);
            }
        }
        Ok(())
    }

    /// Sends a dead letter's body back to the work queue as a new message.
    async fn send_back(&self, message: &ReceivedMessage) -> Result<(), QueueError> {
        let attributes = message
            .attributes
            .iter()
            .filter(|(k, _)| k.as_str() == EXTENDED_MESSAGE_ATTRIBUTE)
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain([("dagster_taskiq_redriven_from", message.message_id.as_str())]);
        let send = aws::send_message(
            &self.client,
            &self.config.queue_url,
            &message.body,
            attributes,
            Some(fifo_ids(message, "redrive")),
        );
        self.call("SendMessage", send.send()).await?;
        Ok(())
    }

    /// Receives from `queue_url`; each message comes with its SentTimestamp (ms), if given.
    async fn receive_from(
        &self,
        queue_url: &str,
        max: usize,
        wait: Duration,
        visibility_secs: i32,
    ) -> Result<Vec<(ReceivedMessage, Option<i64>)>, QueueError> {
        let out = self
            .call(
                "ReceiveMessage",
                self.client
                    .receive_message()
                    .queue_url(queue_url)
                    .max_number_of_messages(max.clamp(1, BATCH_LIMIT) as i32)
                    .wait_time_seconds(wait.as_secs().min(20) as i32)
                    .visibility_timeout(visibility_secs)
                    .message_system_attribute_names(
                        MessageSystemAttributeName::ApproximateReceiveCount,
                    )
                    .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
                    .message_attribute_names("All")
                    .send(),
            )
            .await?;
        Ok(out
            .messages()
            .iter()
            .map(|m| {
                let message = received(m);
                let sent_ms = message.sent_at_ms;
                (message, sent_ms)
            })
            .collect())
    }
}

/// The FIFO ids of a message sent in place of `message` (used only on `.fifo` queues): one
/// group per step attempt, as the executor sends (the body's task id; the message id for a
/// body without one), so group locking never serializes a run's steps; a deduplication id
/// per (replaced message, purpose), so an intended re-send is not taken for a repeat of the
/// original while a repeated re-send is.
fn fifo_ids(message: &ReceivedMessage, purpose: &str) -> Fifo {
    let group = serde_json::from_str::<serde_json::Value>(&message.body)
        .ok()
        .and_then(|b| b.get("task_id")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| message.message_id.clone());
    Fifo {
        group,
        deduplication_id: format!("{}-{purpose}", message.message_id),
    }
}

fn received(m: &aws_sdk_sqs::types::Message) -> ReceivedMessage {
    ReceivedMessage {
        message_id: m.message_id().unwrap_or_default().to_owned(),
        receipt_handle: m.receipt_handle().unwrap_or_default().to_owned(),
        body: m.body().unwrap_or_default().to_owned(),
        receive_count: m
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
        sent_at_ms: m
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::SentTimestamp))
            .and_then(|v| v.parse().ok()),
        attributes: m
            .message_attributes()
            .map(|attrs| {
                attrs
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.string_value()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Batch entries that set these handles' visibility; the entry id is the index in `handles`.
fn visibility_entries(
    handles: &[String],
    visibility_secs: i32,
) -> Vec<ChangeMessageVisibilityBatchRequestEntry> {
    handles
        .iter()
        .enumerate()
        .map(|(i, handle)| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(handle)
                .visibility_timeout(visibility_secs)
                .build()
                .expect("id and receipt handle are set")
        })
        .collect()
}

#[async_trait]
impl QueueAdmin for SqsQueue {
    async fn counts(&self) -> Result<(QueueCounts, QueueCounts), QueueError> {
        let (work, dlq) = futures::join!(
            self.queue_counts(&self.config.queue_url),
            self.queue_counts(&self.config.dlq_url)
        );
        Ok((work?, dlq?))
    }

    async fn redrive(
        &self,
        max: usize,
        filter: &RedriveFilter,
    ) -> Result<RedriveReport, RedriveError> {
        self.redrive_where(max, |m| filter.matches(m)).await
    }
}

fn visibility_secs(visibility: Duration) -> i32 {
    visibility.as_secs().min(MAX_VISIBILITY_SECS) as i32
}

#[async_trait]
impl WorkQueue for SqsQueue {
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        Ok(self
            .receive_from(
                &self.config.queue_url,
                max,
                wait,
                visibility_secs(visibility),
            )
            .await?
            .into_iter()
            .map(|(message, _)| message)
            .collect())
    }

    async fn extend(
        &self,
        receipt_handles: &[String],
        visibility: Duration,
    ) -> Result<Vec<ExtendResult>, QueueError> {
        let mut results = Vec::with_capacity(receipt_handles.len());
        for chunk in receipt_handles.chunks(BATCH_LIMIT) {
            let entries = visibility_entries(chunk, visibility_secs(visibility));
            let out = self
                .call(
                    "ChangeMessageVisibilityBatch",
                    self.client
                        .change_message_visibility_batch()
                        .queue_url(&self.config.queue_url)
                        .set_entries(Some(entries))
                        .send(),
                )
                .await?;
            let mut chunk_results = vec![ExtendResult::Extended; chunk.len()];
            for failed in out.failed() {
                let Ok(index) = failed.id().parse::<usize>() else {
                    continue;
                };
                let text = format!("{}: {}", failed.code(), failed.message().unwrap_or(""));
                if let Some(slot) = chunk_results.get_mut(index) {
                    *slot = if is_lost_handle(failed.code(), failed.message().unwrap_or("")) {
                        ExtendResult::Lost(text)
                    } else {
                        ExtendResult::Failed(text)
                    };
                }
            }
            results.extend(chunk_results);
        }
        Ok(results)
    }

    async fn release(&self, receipt_handle: &str, delay: Duration) -> Result<(), QueueError> {
        self.call(
            "ChangeMessageVisibility",
            self.client
                .change_message_visibility()
                .queue_url(&self.config.queue_url)
                .receipt_handle(receipt_handle)
                .visibility_timeout(visibility_secs(delay))
                .send(),
        )
        .await?;
        Ok(())
    }

    async fn ack(&self, receipt_handle: &str) -> Result<(), QueueError> {
        self.call(
            "DeleteMessage",
            self.client
                .delete_message()
                .queue_url(&self.config.queue_url)
                .receipt_handle(receipt_handle)
                .send(),
        )
        .await?;
        Ok(())
    }

    async fn send(&self, resend: &Resend<'_>) -> Result<String, QueueError> {
        let out = aws::send_message(
            &self.client,
            &self.config.queue_url,
            &resend.of.body,
            &resend.attributes,
            Some(fifo_ids(resend.of, resend.purpose)),
        )
        .send()
        .await
        .map_err(|e| classify("SendMessage", e))?;
        Ok(out.message_id().unwrap_or_default().to_owned())
    }

    async fn dead_letter(
        &self,
        message: &ReceivedMessage,
        dead_letter: &DeadLetter,
    ) -> Result<(), QueueError> {
        // Keep the extended-payload marker so a redrive still resolves the S3 body; SQS allows
        // at most 10 attributes, so nothing else of the original's is carried over.
        let mut attributes: Vec<(&str, String)> = message
            .attributes
            .iter()
            .filter(|(k, _)| k.as_str() == EXTENDED_MESSAGE_ATTRIBUTE)
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let detail: String = dead_letter.detail.chars().take(1000).collect();
        attributes.extend([
            (DLQ_REASON_ATTRIBUTE, dead_letter.reason.clone()),
            ("dagster_taskiq_error_detail", detail),
            (
                "dagster_taskiq_error_class",
                dead_letter.error_class.to_owned(),
            ),
            (
                "dagster_taskiq_original_message_id",
                message.message_id.clone(),
            ),
            (
                "dagster_taskiq_receive_count",
                message.receive_count.to_string(),
            ),
            (
                "dagster_taskiq_controller_id",
                dead_letter.controller_id.clone(),
            ),
            (
                "dagster_taskiq_dead_lettered_at",
                chrono::Utc::now().to_rfc3339(),
            ),
        ]);
        let body = if message.body.is_empty() {
            // SQS rejects empty bodies; keep the fact visible.
            "<empty body>"
        } else {
            message.body.as_str()
        };
        let send = aws::send_message(
            &self.client,
            &self.config.dlq_url,
            body,
            attributes,
            Some(fifo_ids(message, "dead-letter")),
        );
        self.call("SendMessage", send.send()).await?;
        self.ack(&message.receipt_handle).await
    }
}

fn is_lost_handle(code: &str, message: &str) -> bool {
    code.contains("ReceiptHandleIsInvalid")
        || code.contains("MessageNotInflight")
        || (code.contains("InvalidParameterValue") && message.contains("eceipt"))
}

/// Maps an SDK error to the queue's error kinds.
fn classify<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> QueueError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let failure = aws::classify(&err);
    let message = failure.text;
    let lost = failure.code.as_deref().is_some_and(|code| {
        is_lost_handle(code, failure.service_message.as_deref().unwrap_or_default())
    });
    if lost {
        return QueueError::ReceiptHandleInvalid { operation };
    }
    match failure.class {
        ErrorClass::Throttled => QueueError::Throttled { operation, message },
        ErrorClass::Transient => QueueError::Unavailable { operation, message },
        ErrorClass::Permanent => QueueError::Rejected { operation, message },
    }
}
