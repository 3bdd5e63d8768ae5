//! Intake: long-poll when admission has room, claim each message, hand it to its own task.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use super::batch::CheckTicket;
use super::{count_queue_error, outage, settle, step, Context};
use crate::envelope::StepRequest;
use crate::health::IDLE_BEAT;
use crate::outcome::{DeadLetterReason, Outcome, Release};
use crate::queue::{continuation, ReceivedMessage};
use crate::taskiq::DecodeError;

/// Said in the dead letter of a message that names no attempt: nothing can be told to Dagster.
const NO_ATTEMPT: &str = "; no verdict possible: the message does not name a run, step and \
                          attempt that can be read";

/// Receives until draining starts; each message becomes a task in `tasks`.
pub(super) async fn intake(ctx: &Arc<Context>, tasks: &mut JoinSet<()>) {
    let mut failures = 0u32;
    loop {
        // Reap finished tasks so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
        ctx.health.intake.beat();
        if !pause_while_unreachable(ctx).await {
            return;
        }
        // Beat while waiting for room too: a full controller is busy, not stuck.
        let reserve = ctx.admission.reserve();
        tokio::pin!(reserve);
        let first = loop {
            tokio::select! {
                _ = ctx.draining.cancelled() => return,
                permit = &mut reserve => break permit,
                _ = tokio::time::sleep(IDLE_BEAT) => ctx.health.intake.beat(),
            }
        };
        let mut permits = vec![first];
        while permits.len() < 10 {
            match ctx.admission.try_reserve() {
                Some(permit) => permits.push(permit),
                None => break,
            }
        }
        let queue = ctx.queue.clone();
        let (max, wait, visibility) = (
            permits.len(),
            ctx.settings.receive_wait,
            ctx.leases.visibility(),
        );
        let mut receive = Box::pin(async move { queue.receive(max, wait, visibility).await });
        let received = tokio::select! {
            received = &mut receive => received,
            _ = ctx.draining.cancelled() => {
                // Dropping a long poll mid-way could hide messages SQS already handed
                // out; let it finish in the background and give back what it brings.
                let ctx = ctx.clone();
                tasks.spawn(async move {
                    if let Ok(messages) = receive.await {
                        for message in messages {
                            ctx.metrics.messages_received.inc();
                            settle::settle_unclaimed(&ctx, &message, &Outcome::shutdown()).await;
                        }
                    }
                });
                return;
            }
        };
        ctx.health.queue_contact(
            "ReceiveMessage",
            received.as_ref().err().map(ToString::to_string),
        );
        match received {
            Ok(messages) => {
                failures = 0;
                // The step-state checks of the messages handled here go in one request.
                let mut tickets = CheckTicket::for_receive(messages.len().min(permits.len()));
                for message in messages {
                    ctx.metrics.messages_received.inc();
                    ctx.metrics.message_seen(message.sent_at_ms);
                    let ctx = ctx.clone();
                    let Some(permit) = permits.pop() else {
                        // More than asked for: no room was reserved for it.
                        tracing::warn!(message_id = %message.message_id, "the queue returned more messages than asked for: giving this one back");
                        let overflow = Outcome::Released {
                            why: Release::Overflow,
                            delay: Duration::ZERO,
                        };
                        tasks.spawn(async move {
                            settle::settle_unclaimed(&ctx, &message, &overflow).await;
                        });
                        continue;
                    };
                    let ticket = tickets.pop().unwrap_or_else(CheckTicket::alone);
                    ctx.metrics.steps_in_flight.inc();
                    tasks.spawn(async move {
                        handle(&ctx, message, ticket).await;
                        ctx.metrics.steps_in_flight.dec();
                        drop(permit);
                    });
                }
            }
            Err(e) => {
                failures += 1;
                count_queue_error(ctx, "ReceiveMessage", &e);
                let pause = ctx.settings.backoff.delay(failures);
                tracing::warn!(%e, ?pause, "receiving failed; pausing intake");
                tokio::select! {
                    _ = ctx.draining.cancelled() => return,
                    _ = sleep_beating(ctx, pause) => {}
                }
            }
        }
    }
}

/// While a Dagster instance is unreachable the intake receives nothing: a message taken now
/// could only be held, and the queue keeps it as well. Probes the unreachable instances with
/// a backoff (held messages that get an answer end the pause too). False when draining.
async fn pause_while_unreachable(ctx: &Context) -> bool {
    let mut probes = 0u32;
    loop {
        let back = ctx.health.dagster_back();
        tokio::pin!(back);
        back.as_mut().enable();
        if ctx.health.dagster_outages().is_empty() {
            if probes > 0 {
                tracing::info!("Dagster answers again: intake resumed");
                ctx.metrics.intake_paused.set(0);
            }
            return true;
        }
        if probes == 0 {
            tracing::warn!("Dagster unreachable: intake paused");
            ctx.metrics.intake_paused.set(1);
        }
        probes += 1;
        let pause = ctx
            .settings
            .backoff
            .delay(probes)
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        tokio::select! {
            _ = ctx.draining.cancelled() => {
                ctx.metrics.intake_paused.set(0);
                return false;
            }
            _ = &mut back => continue,
            _ = sleep_beating(ctx, pause) => {}
        }
        outage::probe_unreachable(ctx).await;
    }
}

/// Sleeps, beating the intake heartbeat: a backoff pause is not a stuck loop.
async fn sleep_beating(ctx: &Context, pause: Duration) {
    let until = Instant::now() + pause;
    while Instant::now() < until {
        tokio::time::sleep_until(until.min(Instant::now() + IDLE_BEAT)).await;
        ctx.health.intake.beat();
    }
}

/// One received message to the end: decode, claim, live the step, settle.
async fn handle(ctx: &Context, mut message: ReceivedMessage, ticket: CheckTicket) {
    // A requeued copy continues the count of the message it replaced.
    let prior = message
        .attributes
        .get(continuation::PRIOR_DELIVERIES)
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    message.receive_count = message.receive_count.saturating_add(prior);
    let mut step = match ctx.taskiq.decode(&message).await {
        Ok(step) => step,
        Err(DecodeError::Unavailable { error, task_id }) => {
            let mut outcome =
                settle::error_policy(ctx, settle::Failure::Payload(error), message.receive_count);
            if let Outcome::DeadLettered { detail, .. } = &mut outcome {
                ctx.taskiq
                    .write_unrun_result(task_id.as_deref(), detail)
                    .await;
                detail.push_str(NO_ATTEMPT);
            }
            settle::settle_unclaimed(ctx, &message, &outcome).await;
            return;
        }
        Err(DecodeError::Poison {
            poison,
            mut identity,
        }) => {
            // Its verdict goes to the controller's own instance, as a step's events do.
            if let Some(attempt) = &mut identity.attempt {
                attempt.instance_ref = ctx.settings.instance.instance_ref.clone();
            }
            let span = tracing::warn_span!(
                "poison",
                message_id = %message.message_id,
                run_id = identity.attempt.as_ref().map(|a| tracing::field::display(&a.run_id)),
                step_key = identity.attempt.as_ref().map(|a| tracing::field::display(&a.step_key)),
            );
            async {
                tracing::warn!(reason = poison.name(), error = %poison, "poison message");
                let reason = DeadLetterReason::Poison(poison.name());
                let outcome = match &identity.attempt {
                    Some(attempt) => {
                        settle::dead_letter_unclaimed(
                            ctx,
                            attempt,
                            reason,
                            poison.to_string(),
                            message.receive_count,
                        )
                        .await
                    }
                    None => Outcome::dead_letter(reason, format!("{poison}{NO_ATTEMPT}")),
                };
                if outcome.ends_attempt() {
                    let why = format!("({}) {poison}", poison.name());
                    ctx.taskiq
                        .write_unrun_result(identity.task_id.as_deref(), &why)
                        .await;
                }
                settle::settle_unclaimed(ctx, &message, &outcome).await;
            }
            .instrument(span)
            .await;
            return;
        }
    };
    step.receive_count = message.receive_count;
    pin_instance(ctx, &mut step);
    // The launcher sees the timeout that applies (the ECS shim enforces it in the task).
    step.timeout = step.timeout.or(ctx.settings.default_step_timeout);
    let span = tracing::info_span!(
        "step",
        run_id = %step.run_id,
        step_key = %step.step_key,
        attempt = step.attempt,
        task_id = %step.task_id,
        message_id = %message.message_id,
    );
    async {
        if !claim(ctx, &step, &message).await {
            return;
        }
        let signals = ctx.leases.hold(&step.task_id, &message.receipt_handle);
        let life = step::live(ctx, &step, &message, signals, ticket).await;
        settle::settle(
            ctx,
            &step,
            &message,
            life.outcome,
            life.launched.as_ref().map(|l| l.kind),
        )
        .await;
        if let Some(exited_at) = life.launched.and_then(|l| l.exited_at) {
            ctx.metrics
                .exit_to_delete_seconds
                .observe(exited_at.elapsed().as_secs_f64());
        }
    }
    .instrument(span)
    .await
}

/// Runs the step against the controller's own Dagster instance, whatever the message
/// names: an `InstanceRef` imports and runs code (docs/security.md).
fn pin_instance(ctx: &Context, step: &mut StepRequest) {
    let pinned = &ctx.settings.instance;
    if pinned.is_foreign(&step.instance_ref) {
        ctx.metrics.foreign_instance_refs.inc();
        tracing::debug!(run_id = %step.run_id, "the message names another Dagster instance: ignored");
    }
    step.instance_ref = pinned.instance_ref.clone();
}

/// Whether `message` is the message this controller holds for the attempt (same message id:
/// a redelivery) or this controller's own hand-off continuation of it.
fn is_ours_again(ctx: &Context, task_id: &str, message: &ReceivedMessage) -> bool {
    let held = ctx.steps.get(task_id).map(|r| r.message_id);
    let own_continuation = continuation::is_continuation(message)
        && message.attributes.get(continuation::OWNER) == Some(&ctx.settings.controller_id);
    held.as_deref() == Some(message.message_id.as_str()) || own_continuation
}

/// How long another message of an attempt held here waits for that attempt to settle: long
/// enough for a requeued copy whose original is being deleted right now.
const SETTLE_WAIT: Duration = Duration::from_secs(5);

/// Claims the attempt for this message. When the attempt is already active here: adopts
/// the held message's redelivery (or our own hand-off continuation), whose new receipt
/// handle is now the valid one; waits a moment for any other message of the attempt (a
/// requeued copy that arrived while its original is being deleted here) and claims it once
/// the attempt settled; gives it back if the attempt is still running. Returns whether this
/// message is now claimed.
async fn claim(ctx: &Context, step: &StepRequest, message: &ReceivedMessage) -> bool {
    let claim = || {
        ctx.steps
            .claim(step, &message.message_id, message.receive_count)
    };
    if claim() {
        return true;
    }
    if is_ours_again(ctx, &step.task_id, message)
        && ctx
            .leases
            .renew_handle(&step.task_id, &message.receipt_handle)
    {
        ctx.claims.set_message(&step.task_id, &message.message_id);
        tracing::info!("redelivered while running here: adopted");
        return false;
    }
    if ctx.steps.settled_within(&step.task_id, SETTLE_WAIT).await && claim() {
        return true;
    }
    tracing::warn!("another message of an attempt running here: giving it back");
    let duplicate = Outcome::Released {
        why: Release::Duplicate,
        delay: SETTLE_WAIT,
    };
    settle::settle_unclaimed(ctx, message, &duplicate).await;
    false
}
