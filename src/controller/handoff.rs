//! Messages this controller sends about a step it holds: a continuation before SQS's
//! visibility cap, a requeued copy after the waiting limit. docs/guarantees.md, "Hand-off".

use std::time::Duration;

use super::{count_queue_error, Context};
use crate::outcome::{Outcome, Release};
use crate::queue::{continuation, ReceivedMessage, Resend};

/// Allowance for clock skew between replicas when reading a hand-off time.
const CLOCK_MARGIN: Duration = Duration::from_secs(10);

/// Before SQS's visibility cap: send a continuation of the message (same body, marked
/// with this controller as owner), then delete the old one. The intake adopts the
/// continuation when it comes back; other replicas pass it on (see [`owner_may_adopt`]).
pub(super) async fn hand_off(ctx: &Context, task_id: &str, message: &ReceivedMessage) {
    let Some(handle) = ctx.leases.receipt_handle(task_id) else {
        return;
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let mut attributes = std::collections::HashMap::from([
        (continuation::MARKER.to_owned(), "true".to_owned()),
        (
            continuation::OWNER.to_owned(),
            ctx.settings.controller_id.clone(),
        ),
        (continuation::HANDOFF_AT_MS.to_owned(), now_ms.to_string()),
        (
            continuation::CONTINUES.to_owned(),
            message.message_id.clone(),
        ),
    ]);
    // The same body: an S3 pointer stays one.
    attributes.extend(crate::taskiq::extended_marker(message));
    let continuation = Resend {
        of: message,
        purpose: "handoff",
        attributes,
    };
    match ctx.queue.send(&continuation).await {
        Ok(continuation_id) => {
            // Stop extending the old handle before deleting it.
            ctx.leases.mark_handed_off(task_id);
            if let Err(e) = ctx.queue.ack(&handle).await {
                // It comes back later and is adopted like any redelivery.
                tracing::warn!(%e, "could not delete the handed-off message");
            }
            ctx.metrics
                .lease_extensions
                .get_or_create(&[("result", "handed_off")])
                .inc();
            tracing::info!(
                continuation_id,
                "visibility cap near: lease handed off to a continuation"
            );
        }
        Err(e) => {
            count_queue_error(ctx, "SendMessage", &e);
            tracing::warn!(%e, "hand-off failed; retrying shortly");
            tokio::time::sleep(ctx.leases.heartbeat_interval()).await;
        }
    }
}

/// A message that waited too long for a run slot, or that still waits for Dagster when the
/// controller drains: a copy goes back to the queue for any replica, and this one is
/// deleted. The copy carries the deliveries so far, so that waiting never uses up the
/// message's attempts (SQS's receive count restarts). If the copy cannot be sent, the
/// message is released for `why` instead.
pub(super) async fn requeue(ctx: &Context, message: &ReceivedMessage, why: Release) -> Outcome {
    let mut attributes = message.attributes.clone();
    attributes.insert(
        continuation::PRIOR_DELIVERIES.to_owned(),
        message.receive_count.saturating_sub(1).to_string(),
    );
    let copy = Resend {
        of: message,
        purpose: "requeue",
        attributes,
    };
    match ctx.queue.send(&copy).await {
        Ok(copy_id) => {
            tracing::info!(
                copy_id,
                reason = why.name(),
                "requeued for other replicas, its deliveries so far carried over"
            );
            Outcome::Requeued
        }
        Err(e) => {
            count_queue_error(ctx, "SendMessage", &e);
            tracing::warn!(%e, "could not requeue; releasing instead");
            Outcome::Released {
                why,
                delay: Duration::ZERO,
            }
        }
    }
}

/// For a continuation owned by another controller: how long its owner may still adopt
/// it. `None` when the owner had its chance (it fences its step by then) or is us.
pub(super) fn owner_may_adopt(ctx: &Context, message: &ReceivedMessage) -> Option<Duration> {
    let owner = message.attributes.get(continuation::OWNER)?;
    if *owner == ctx.settings.controller_id {
        // We own it but no longer hold the step: that execution died with a previous
        // run of this controller.
        return None;
    }
    let handoff_ms: u64 = message
        .attributes
        .get(continuation::HANDOFF_AT_MS)?
        .parse()
        .ok()?;
    let handoff = std::time::UNIX_EPOCH + Duration::from_millis(handoff_ms);
    let fenced_by = handoff + ctx.settings.adoption_window + CLOCK_MARGIN;
    fenced_by.duration_since(std::time::SystemTime::now()).ok()
}
