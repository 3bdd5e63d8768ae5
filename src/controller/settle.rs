//! Settling: the one error policy, and carrying an [`Outcome`] out on the queue once it is
//! durable. A message is deleted only after its outcome is recorded (the step's terminal
//! event, our acknowledged verdict, or the dead-letter send).

use tokio::time::Instant;

use super::{calls, claim, handoff, launcher_name, Context};
use crate::dagster::{BridgeError, Verdict, VerdictAck};
use crate::envelope::{AttemptId, LauncherKind, StepRequest};
use crate::outcome::{DeadLetterReason, Disposition, Outcome, Release};
use crate::queue::{DeadLetter, ReceivedMessage};
use crate::taskiq::StoreError;

/// A failure of a boundary while handling a message (not a failure of the step).
pub(super) enum Failure {
    /// Dagster, through the bridge.
    Bridge(BridgeError),
    /// S3, reading the message's extended payload.
    Payload(StoreError),
    /// S3, writing the attempt's taskiq result.
    Result(StoreError),
}

/// The error policy: what a boundary failure means for the message. A failure that may
/// pass gives the message back with a backoff by its delivery count and never loses it;
/// one that cannot pass, or that outlasted `--max-attempts` deliveries, dead-letters it.
pub(super) fn error_policy(ctx: &Context, failure: Failure, receive_count: u32) -> Outcome {
    let exhausted = receive_count >= ctx.settings.max_attempts;
    let limits = |what: String| {
        format!(
            "delivered {receive_count} times (limit {}); {what}",
            ctx.settings.max_attempts
        )
    };
    let (why, dead_letter) = match failure {
        Failure::Bridge(e) if !e.is_transient() => {
            return Outcome::dead_letter(DeadLetterReason::BridgeRejected, e.to_string());
        }
        Failure::Bridge(e) => {
            tracing::warn!(%e, "Dagster failed this request: releasing the message for later");
            let dead_letter = exhausted.then(|| {
                Outcome::dead_letter(
                    DeadLetterReason::AttemptsExhausted,
                    limits(format!("Dagster kept failing: {e}")),
                )
            });
            (Release::BridgeUnavailable, dead_letter)
        }
        Failure::Payload(e) => {
            tracing::warn!(%e, "extended payload unavailable: releasing the message for later");
            let dead_letter = exhausted.then(|| {
                Outcome::dead_letter(
                    DeadLetterReason::PayloadUnavailable,
                    limits(format!("the extended payload stayed unreadable: {e}")),
                )
            });
            (Release::PayloadUnavailable, dead_letter)
        }
        // The outcome is durable in Dagster already: the next delivery writes the result.
        Failure::Result(e) => {
            tracing::warn!(%e, "taskiq result not written: releasing the message for later");
            (Release::ResultUnwritten, None)
        }
    };
    dead_letter.unwrap_or_else(|| Outcome::Released {
        why,
        delay: ctx.settings.backoff.delay(receive_count),
    })
}

/// A dead letter of an attempt that can be named: Dagster gets a verdict first (the executor
/// fails the step and its RetryPolicy decides), so that no run waits for ever on a step whose
/// message is gone. For a claimed step, whose lease is held: a Dagster outage is waited out.
async fn dead_letter_claimed(
    ctx: &Context,
    step: &StepRequest,
    message: &ReceivedMessage,
    reason: DeadLetterReason,
    detail: String,
) -> Outcome {
    let attempt = step.id();
    let reported = match dead_letter_verdict(reason, &detail) {
        Some(verdict) => {
            ctx.steps
                .update(&step.task_id, |r| r.verdict = Some(verdict.verdict.clone()));
            match calls::ask_bridge(ctx, step, "report_verdict", || {
                ctx.bridge.report_verdict(&attempt, &verdict)
            })
            .await
            {
                Ok(ack) => Some(Ok(ack)),
                Err(calls::Unanswered::Failed(e)) => Some(Err(e)),
                // Draining while Dagster is out, or the lease lost: not ours to dead-letter.
                Err(other) => return unanswered(ctx, other, message).await,
            }
        }
        None => None,
    };
    dead_end(
        ctx,
        &attempt,
        reason,
        detail,
        reported,
        message.receive_count,
    )
}

/// [`dead_letter_claimed`] for a message no lease holds (poison): the verdict is tried
/// within the call budget, and the message given back for later if Dagster cannot be
/// reached.
pub(super) async fn dead_letter_unclaimed(
    ctx: &Context,
    attempt: &AttemptId,
    reason: DeadLetterReason,
    detail: String,
    receive_count: u32,
) -> Outcome {
    let reported = match dead_letter_verdict(reason, &detail) {
        Some(verdict) => Some(
            calls::retrying(ctx, "report_verdict", || {
                ctx.bridge.report_verdict(attempt, &verdict)
            })
            .await,
        ),
        None => None,
    };
    dead_end(ctx, attempt, reason, detail, reported, receive_count)
}

/// The verdict for an attempt whose message is dead-lettered; `None` where Dagster cannot
/// take one (the run does not exist).
fn dead_letter_verdict(reason: DeadLetterReason, detail: &str) -> Option<Verdict> {
    let why = match reason {
        DeadLetterReason::UnknownRun => return None,
        DeadLetterReason::AttemptsExhausted => {
            format!("dagster-taskiq-controller gave up: {detail}")
        }
        DeadLetterReason::InvalidLaunch(_) => {
            format!("dagster-taskiq-controller cannot launch the step: {detail}")
        }
        DeadLetterReason::Poison(name) => {
            format!("dagster-taskiq-controller cannot run the step's message ({name}): {detail}")
        }
        DeadLetterReason::BridgeRejected => {
            format!(
                "Dagster rejected a request of dagster-taskiq-controller for the step: {detail}"
            )
        }
        DeadLetterReason::PayloadUnavailable => {
            format!("dagster-taskiq-controller cannot read the step's message: {detail}")
        }
        DeadLetterReason::TagsMismatch => {
            format!("dagster-taskiq-controller refused the step's message: {detail}")
        }
    };
    Some(Verdict::not_run(format!(
        "{why} (its message is in the dead-letter queue, reason {})",
        reason.name()
    )))
}

/// The dead letter, its detail saying what Dagster was told; or, when Dagster could not be
/// reached and deliveries remain, the message back for later, so that the verdict is not
/// skipped.
fn dead_end(
    ctx: &Context,
    attempt: &AttemptId,
    reason: DeadLetterReason,
    detail: String,
    reported: Option<Result<VerdictAck, BridgeError>>,
    receive_count: u32,
) -> Outcome {
    let told = match reported {
        None => "no verdict possible: the controller's Dagster instance has no such run (a \
                 run worker waiting on this step uses another instance than the controller's \
                 --dagster-home)"
            .to_owned(),
        Some(Ok(ack)) if ack.attempt_finished => {
            "no verdict needed: the attempt already has its outcome in Dagster".to_owned()
        }
        Some(Ok(_)) => {
            tracing::info!(
                task_id = %attempt.task_id,
                reason = reason.name(),
                "verdict recorded before the dead letter"
            );
            "verdict recorded in Dagster".to_owned()
        }
        Some(Err(e)) if !e.is_transient() => {
            format!("no verdict possible: Dagster refused it ({e}); fail or cancel the run by hand")
        }
        Some(Err(e)) if receive_count < ctx.settings.max_attempts => {
            tracing::warn!(%e, "the verdict could not be written: releasing the message for later");
            return Outcome::Released {
                why: Release::BridgeUnavailable,
                delay: ctx.settings.backoff.delay(receive_count),
            };
        }
        Some(Err(e)) => format!(
            "the verdict could not be written to Dagster ({e}); fail or cancel the run by hand"
        ),
    };
    // The DLQ keeps the first 1000 characters of a detail: what Dagster was told must fit.
    let room = 1000usize.saturating_sub(told.chars().count() + 2);
    let detail: String = if detail.chars().count() > room {
        detail
            .chars()
            .take(room.saturating_sub(1))
            .chain(['…'])
            .collect()
    } else {
        detail
    };
    Outcome::dead_letter(reason, format!("{detail}; {told}"))
}

/// A bridge call for a held message got no answer. An error of the request goes to the
/// error policy. Dagster still unreachable when the controller drains: the message goes back
/// as a copy that carries its deliveries, so the outage charges no attempt. A lost lease:
/// the message is someone else's now.
pub(super) async fn unanswered(
    ctx: &Context,
    unanswered: calls::Unanswered,
    message: &ReceivedMessage,
) -> Outcome {
    match unanswered {
        calls::Unanswered::Failed(e) => {
            error_policy(ctx, Failure::Bridge(e), message.receive_count)
        }
        calls::Unanswered::Unreachable(e) => {
            tracing::warn!(%e, "draining while Dagster is unreachable: requeuing the message");
            handoff::requeue(ctx, message, Release::BridgeUnavailable).await
        }
        calls::Unanswered::LeaseLost => {
            tracing::warn!("lease lost while waiting for Dagster: leaving the message");
            Outcome::Fenced
        }
    }
}

/// Settles a claimed step: its taskiq result first (when due), then the queue, the
/// metrics and the steps table. `launched` names the launcher of an execution that this
/// delivery started. A dead letter gets its verdict before anything else.
pub(super) async fn settle(
    ctx: &Context,
    step: &StepRequest,
    message: &ReceivedMessage,
    outcome: Outcome,
    launched: Option<LauncherKind>,
) {
    let outcome = match outcome {
        Outcome::DeadLettered { reason, detail } => {
            dead_letter_claimed(ctx, step, message, reason, detail).await
        }
        other => other,
    };
    let task_id = step.task_id.as_str();
    if let Some(kind) = launched {
        ctx.metrics
            .steps_finished
            .get_or_create(&[
                ("launcher", launcher_name(kind)),
                ("outcome", outcome.name()),
            ])
            .inc();
    }
    let outcome = match ctx.taskiq.write_result(step, &outcome).await {
        Ok(()) => outcome,
        Err(e) => error_policy(ctx, Failure::Result(e), message.receive_count),
    };
    // The outcome is recorded (or nothing runs any more): another copy may be claimed.
    claim::release(ctx, step, &outcome).await;
    // A redelivery may have renewed the handle meanwhile.
    let mut current = message.clone();
    if let Some(handle) = ctx.leases.receipt_handle(task_id) {
        current.receipt_handle = handle;
    }
    let final_state = outcome.final_state();
    ctx.steps
        .update(task_id, |r| r.outcome = Some(outcome.name()));
    // One line per step attempt with what happened to it.
    tracing::info!(
        state = final_state.as_str(),
        outcome = outcome.name(),
        "message settled"
    );
    let settle_started = Instant::now();
    settle_unclaimed(ctx, &current, &outcome).await;
    ctx.metrics
        .settle_latency_seconds
        .observe(settle_started.elapsed().as_secs_f64());
    ctx.leases.drop_lease(task_id);
    ctx.steps.transition(task_id, final_state);
}

/// Carries out an outcome on the queue, retrying transient failures within budget.
pub(super) async fn settle_unclaimed(ctx: &Context, message: &ReceivedMessage, outcome: &Outcome) {
    let handle = message.receipt_handle.as_str();
    let name = outcome.name();
    let result = match outcome.disposition() {
        Disposition::Delete => {
            let r = calls::retrying(ctx, "DeleteMessage", || ctx.queue.ack(handle)).await;
            if r.is_ok() {
                ctx.metrics
                    .messages_acked
                    .get_or_create(&[("outcome", name)])
                    .inc();
            }
            r
        }
        Disposition::Release(delay) => {
            let r = calls::retrying(ctx, "ChangeMessageVisibility", || {
                ctx.queue.release(handle, delay)
            })
            .await;
            if r.is_ok() {
                tracing::info!(?delay, reason = name, "message released");
                ctx.metrics
                    .messages_released
                    .get_or_create(&[("reason", name)])
                    .inc();
            }
            r
        }
        Disposition::DeadLetter { reason, detail } => {
            let dead_letter = DeadLetter {
                reason: reason.name().to_owned(),
                detail: detail.to_owned(),
                error_class: reason.error_class(),
                controller_id: ctx.settings.controller_id.clone(),
            };
            let r = calls::retrying(ctx, "SendMessage", || {
                ctx.queue.dead_letter(message, &dead_letter)
            })
            .await;
            if r.is_ok() {
                tracing::warn!(reason = name, detail, "message dead-lettered");
                ctx.metrics
                    .messages_dead_lettered
                    .get_or_create(&[("reason", name)])
                    .inc();
            }
            r
        }
        Disposition::Nothing => Ok(()),
    };
    if let Err(e) = result {
        // Nothing is lost: the message becomes visible again when its visibility runs
        // out, and the next delivery finds the durable outcome or relaunches.
        tracing::error!(%e, ?outcome, "could not settle the message; it will be redelivered");
    }
}
