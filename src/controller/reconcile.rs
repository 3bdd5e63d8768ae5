//! Reconcile: a claimed attempt against what Dagster knows, before anything runs. The
//! answer is either an [`Outcome`] (skip it, pass it on, give up) or "launch it".

use std::collections::BTreeMap;
use std::time::Duration;

use super::batch::CheckTicket;
use super::{calls, handoff, launcher_name, settle, stored_step, Context};
use crate::dagster::{
    StepState as DagsterStepState, StoredStep, Verdict, META_ATTEMPT, META_TASK_ID,
};
use crate::envelope::StepRequest;
use crate::outcome::{DeadLetterReason, Outcome, Release, Skip};
use crate::queue::{continuation, ReceivedMessage};

/// What to do with a claimed attempt.
pub(super) enum Decision {
    /// Do not run it; settle with this outcome.
    Settle(Outcome),
    /// Run it (a first delivery, or a relaunch of an attempt whose execution vanished), with
    /// the launch settings its run stored for the step when Dagster has them.
    Launch(Option<StoredStep>),
}

/// Reads the attempt's state in Dagster and decides.
pub(super) async fn reconcile(
    ctx: &Context,
    step: &StepRequest,
    message: &ReceivedMessage,
    ticket: CheckTicket,
) -> Decision {
    // The first try goes with the other checks of the message's receive, a retry alone.
    let bridge = ctx.bridge.as_ref();
    let mut ticket = Some(ticket);
    let asked = calls::ask_bridge(ctx, step, "step_state", || {
        let ticket = ticket.take().unwrap_or_else(CheckTicket::alone);
        ticket.step_state(bridge, step)
    });
    let state = match asked.await {
        Ok(state) => state,
        Err(e) => return Decision::Settle(settle::unanswered(ctx, e, message).await),
    };
    if let Some(skip) = skip(ctx, step, &state).await {
        return Decision::Settle(skip);
    }
    let is_continuation = continuation::is_continuation(message);
    if is_continuation {
        if let Some(wait) = handoff::owner_may_adopt(ctx, message) {
            // Its owner still runs the step and may receive it: pass it on.
            return Decision::Settle(Outcome::Released {
                why: Release::ContinuationNotOurs,
                delay: wait.min(Duration::from_secs(1)),
            });
        }
        tracing::warn!("continuation's owner did not adopt it in time: relaunching the attempt");
    }
    // Passing on a continuation raises its receive count without any failure.
    let attempt_limit = if is_continuation {
        ctx.settings.max_attempts.saturating_mul(10)
    } else {
        ctx.settings.max_attempts
    };
    if message.receive_count > attempt_limit {
        // A controller that keeps restarting under a long ECS task redelivers it again
        // and again; the task itself is fine and is adopted, not given up on.
        if ctx.launcher.has_execution_to_adopt(step).await {
            tracing::info!(
                delivery = message.receive_count,
                "past --max-attempts, but the attempt's ECS task is there: adopting it"
            );
        } else {
            return Decision::Settle(give_up(ctx, message));
        }
    }
    if message.receive_count > 1 {
        note_relaunch(ctx, step, message).await;
    }
    Decision::Launch(state.stored_step)
}

/// A message that must not run: its run is unknown or over, or its attempt finished.
async fn skip(ctx: &Context, step: &StepRequest, state: &DagsterStepState) -> Option<Outcome> {
    let Some(run_status) = &state.run_status else {
        return Some(Outcome::dead_letter(
            DeadLetterReason::UnknownRun,
            format!(
                "run {} does not exist in the controller's Dagster instance",
                step.run_id
            ),
        ));
    };
    if state.attempt_finished {
        tracing::info!("attempt already finished in Dagster: acknowledging without running");
        return Some(Outcome::Skipped(Skip::AlreadyFinished));
    }
    if let Some(why) = state
        .stored_step
        .as_ref()
        .and_then(|stored| stored_step::mismatch(step, stored))
    {
        tracing::warn!(%why, "the message's launch settings are not its run's: refused");
        return Some(Outcome::dead_letter(DeadLetterReason::TagsMismatch, why));
    }
    if run_status.stops_new_steps() {
        tracing::info!(?run_status, "run is over: acknowledging without running");
        // As a verdict, so that a run worker still waiting on this step (a cancel that did
        // not interrupt it) sees it fail instead of waiting forever.
        let verdict = Verdict::not_run(format!(
            "dagster-taskiq-controller did not run this step: the run is {}",
            run_status.name()
        ));
        if let Err(e) = ctx.bridge.report_verdict(&step.id(), &verdict).await {
            tracing::warn!(%e, "could not record the skip in Dagster");
        }
        return Some(Outcome::Skipped(Skip::RunEnded));
    }
    None
}

/// Too many deliveries without an outcome: dead-letter (settling tells Dagster first).
fn give_up(ctx: &Context, message: &ReceivedMessage) -> Outcome {
    let detail = format!(
        "delivered {} times (limit {}) without reaching an outcome",
        message.receive_count, ctx.settings.max_attempts
    );
    tracing::error!(%detail, "giving up on the attempt");
    Outcome::dead_letter(DeadLetterReason::AttemptsExhausted, detail)
}

/// A redelivered attempt is launched again: say so in the run's event log.
async fn note_relaunch(ctx: &Context, step: &StepRequest, message: &ReceivedMessage) {
    ctx.metrics
        .steps_relaunched
        .get_or_create(&[("launcher", launcher_name(ctx.launcher.kind()))])
        .inc();
    tracing::info!(
        delivery = message.receive_count,
        "redelivered attempt: relaunching it (an ECS task that is still there is adopted)"
    );
    // The attempt and task id mark the event as the controller's for this attempt (the
    // executor's start watchdog reads it as the attempt picked up).
    let metadata = BTreeMap::from([
        ("delivery".to_owned(), message.receive_count.to_string()),
        ("controller".to_owned(), ctx.settings.controller_id.clone()),
        (META_ATTEMPT.to_owned(), step.attempt.to_string()),
        (META_TASK_ID.to_owned(), step.task_id.clone()),
    ]);
    let note = format!(
        "dagster-taskiq-controller: relaunching attempt {} of {} (delivery {}): the previous holder of the message ended without an outcome (a surviving ECS task is adopted instead)",
        step.attempt, step.step_key, message.receive_count
    );
    if let Err(e) = ctx.bridge.report_event(step, &note, &metadata, &[]).await {
        tracing::warn!(%e, "could not record the relaunch in Dagster");
    }
}
