//! [`WorkQueue`] on Amazon SQS (aws-sdk-sqs).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName,
    QueueAttributeName,
};
use aws_sdk_sqs::Client;

use super::{DeadLetter, ExtendResult, QueueError, ReceivedMessage, WorkQueue};

/// SQS accepts at most 10 entries per batch call.
const BATCH_LIMIT: usize = 10;
/// SQS caps a visibility timeout at 12 hours.
const MAX_VISIBILITY_SECS: u64 = 12 * 3600;
/// Message attribute that carries the dead-letter reason.
pub const DLQ_REASON_ATTRIBUTE: &str = "dagster_taskiq_error";

#[derive(Debug, Clone)]
pub struct SqsQueueConfig {
    pub queue_url: String,
    pub dlq_url: String,
}

/// The work queue and its dead-letter queue on SQS.
#[derive(Clone)]
pub struct SqsQueue {
    client: Client,
    config: SqsQueueConfig,
}

impl SqsQueue {
    pub fn new(client: Client, config: SqsQueueConfig) -> Self {
        Self { client, config }
    }

    pub fn config(&self) -> &SqsQueueConfig {
        &self.config
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
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .map_err(|e| classify("GetQueueAttributes", e))?;
        Ok(out
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessages))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
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
        let out = self
            .client
            .receive_message()
            .queue_url(&self.config.queue_url)
            .max_number_of_messages(max.clamp(1, BATCH_LIMIT) as i32)
            .wait_time_seconds(wait.as_secs().min(20) as i32)
            .visibility_timeout(visibility_secs(visibility))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| classify("ReceiveMessage", e))?;
        Ok(out
            .messages()
            .iter()
            .map(|m| ReceivedMessage {
                message_id: m.message_id().unwrap_or_default().to_owned(),
                receipt_handle: m.receipt_handle().unwrap_or_default().to_owned(),
                body: m.body().unwrap_or_default().to_owned(),
                receive_count: m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1),
                attributes: m
                    .message_attributes()
                    .map(|attrs| {
                        attrs
                            .iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.string_value()?.to_owned())))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect())
    }

    async fn extend(
        &self,
        receipt_handles: &[String],
        visibility: Duration,
    ) -> Result<Vec<ExtendResult>, QueueError> {
        let mut results = Vec::with_capacity(receipt_handles.len());
        for chunk in receipt_handles.chunks(BATCH_LIMIT) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, handle)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(handle)
                        .visibility_timeout(visibility_secs(visibility))
                        .build()
                        .expect("id and receipt handle are set")
                })
                .collect();
            let out = self
                .client
                .change_message_visibility_batch()
                .queue_url(&self.config.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| classify("ChangeMessageVisibilityBatch", e))?;
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
        self.client
            .change_message_visibility()
            .queue_url(&self.config.queue_url)
            .receipt_handle(receipt_handle)
            .visibility_timeout(visibility_secs(delay))
            .send()
            .await
            .map_err(|e| classify("ChangeMessageVisibility", e))?;
        Ok(())
    }

    async fn ack(&self, receipt_handle: &str) -> Result<(), QueueError> {
        self.client
            .delete_message()
            .queue_url(&self.config.queue_url)
            .receipt_handle(receipt_handle)
            .send()
            .await
            .map_err(|e| classify("DeleteMessage", e))?;
        Ok(())
    }

    async fn send(
        &self,
        body: &str,
        attributes: &HashMap<String, String>,
    ) -> Result<String, QueueError> {
        let attributes = attributes
            .iter()
            .map(|(k, v)| (k.clone(), string_attribute(v)))
            .collect();
        let out = self
            .client
            .send_message()
            .queue_url(&self.config.queue_url)
            .message_body(body)
            .set_message_attributes(Some(attributes))
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
        let attribute = string_attribute;
        // Keep the extended-payload marker so a redrive still resolves the S3 body; SQS allows
        // at most 10 attributes, so nothing else of the original's is carried over.
        let mut attributes: HashMap<String, MessageAttributeValue> = message
            .attributes
            .iter()
            .filter(|(k, _)| k.as_str() == "s3_extended_message")
            .map(|(k, v)| (k.clone(), attribute(v)))
            .collect();
        let detail: String = dead_letter.detail.chars().take(1000).collect();
        for (key, value) in [
            (DLQ_REASON_ATTRIBUTE, dead_letter.reason.as_str()),
            ("dagster_taskiq_error_detail", detail.as_str()),
            ("dagster_taskiq_error_class", dead_letter.error_class),
            ("dagster_taskiq_original_message_id", &message.message_id),
            (
                "dagster_taskiq_receive_count",
                &message.receive_count.to_string(),
            ),
            ("dagster_taskiq_controller_id", &dead_letter.controller_id),
            (
                "dagster_taskiq_dead_lettered_at",
                &chrono::Utc::now().to_rfc3339(),
            ),
        ] {
            attributes.insert(key.to_owned(), attribute(value));
        }
        self.client
            .send_message()
            .queue_url(&self.config.dlq_url)
            .message_body(if message.body.is_empty() {
                // SQS rejects empty bodies; keep the fact visible.
                "<empty body>"
            } else {
                message.body.as_str()
            })
            .set_message_attributes(Some(attributes))
            .send()
            .await
            .map_err(|e| classify("SendMessage", e))?;
        self.ack(&message.receipt_handle).await
    }
}

fn string_attribute(value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        // SQS rejects empty string attribute values.
        .string_value(if value.is_empty() { "-" } else { value })
        .build()
        .expect("data type is set")
}

fn is_lost_handle(code: &str, message: &str) -> bool {
    code.contains("ReceiptHandleIsInvalid")
        || code.contains("MessageNotInflight")
        || (code.contains("InvalidParameterValue") && message.contains("eceipt"))
}

/// Maps an SDK error to the queue's error kinds.
fn classify<E>(operation: &'static str, err: SdkError<E>) -> QueueError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let message = DisplayErrorContext(&err).to_string();
    match &err {
        SdkError::ServiceError(ctx) => {
            let code = ctx.err().code().unwrap_or_default();
            let text = ctx.err().message().unwrap_or_default();
            let status = ctx.raw().status().as_u16();
            if is_lost_handle(code, text) {
                QueueError::ReceiptHandleInvalid { operation }
            } else if code.contains("Throttl")
                || code.contains("RequestThrottled")
                || code.contains("OverLimit")
                || status == 429
            {
                QueueError::Throttled { operation, message }
            } else if status >= 500 {
                QueueError::Unavailable { operation, message }
            } else {
                QueueError::Rejected { operation, message }
            }
        }
        SdkError::ConstructionFailure(_) => QueueError::Rejected { operation, message },
        _ => QueueError::Unavailable { operation, message },
    }
}
