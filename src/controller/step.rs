//! The step's life on this controller, once its message is claimed: reconcile, wait for a
//! slot, launch, supervise, conclude. Produces exactly one [`Outcome`].

use std::collections::BTreeMap;
use std::time::Duration;

use tracing::Instrument;

use tokio::time::Instant;

use super::batch::CheckTicket;
use super::reconcile::{reconcile, Decision};
use super::supervise::{supervise, Ended};
use super::{calls, claim, handoff, launcher_name, settle, sleep_until_deadline, Context};
use crate::admission::{Slot, Ticket};
use crate::dagster::{Verdict, META_ATTEMPT, META_TASK_ID};
use crate::envelope::{LauncherKind, StepRequest};
use crate::launcher::{LaunchError, RunningStep};
use crate::lease::LeaseSignals;
use crate::links::Link;
use crate::outcome::{DeadLetterReason, Finish, Outcome, Release};
use crate::queue::ReceivedMessage;
use crate::state::StepState;

/// How the life of one claimed message ended.
pub(super) struct Life {
    pub outcome: Outcome,
    /// Set when an execution was started (or adopted).
    pub launched: Option<Launched>,
}

pub(super) struct Launched {
    pub kind: LauncherKind,
    /// When the execution ended; `None` when this controller let go of it first.
    pub exited_at: Option<Instant>,
}

impl From<Outcome> for Life {
    fn from(outcome: Outcome) -> Self {
        Life {
            outcome,
            launched: None,
        }
    }
}

/// Lives a claimed step to its outcome.
pub(super) async fn live(
    ctx: &Context,
    step: &StepRequest,
    message: &ReceivedMessage,
    signals: LeaseSignals,
    ticket: CheckTicket,
) -> Life {
    let received_at = Instant::now();
    let stored = match reconcile(ctx, step, message, ticket).await {
        Decision::Settle(outcome) => return outcome.into(),
        Decision::Launch(stored) => stored,
    };
    // The run's own settings decide how the step launches, not the message's labels
    // (reconcile refused a message whose labels say otherwise), and its code location which
    // Python environment runs it.
    let from_run;
    let step = match stored {
        Some(stored) => {
            from_run = StepRequest {
                location: stored.location.clone(),
                stored_ecs: Some(stored.ecs),
                ..step.with_op_tags(&stored.tags, ctx.settings.default_step_timeout)
            };
            &from_run
        }
        None => step,
    };
    let waiting_since = Instant::now();
    // Held until the step has exited: the run slot is what the caps count.
    let slot = match admit(ctx, step, message, &signals).await {
        Ok(slot) => slot,
        Err(outcome) => return outcome.into(),
    };
    ctx.steps.transition(&step.task_id, StepState::Admitted);
    tokio::select! {
        _ = ctx.draining.cancelled() => return Outcome::shutdown().into(),
        _ = ctx.admission.until_launch_allowed() => {}
    }
    ctx.metrics
        .admission_wait_seconds
        .observe(waiting_since.elapsed().as_secs_f64());
    if ctx.draining.is_cancelled() {
        return Outcome::shutdown().into();
    }
    let claimed = match claim::acquire(ctx, step, message, &signals).await {
        Ok(claimed) => claimed,
        Err(outcome) => return outcome.into(),
    };
    let relaunched;
    let step = if claimed.relaunch {
        relaunched = StepRequest {
            relaunch: true,
            ..step.clone()
        };
        &relaunched
    } else {
        step
    };
    ctx.steps.transition(&step.task_id, StepState::Launching);
    let kind = ctx.launcher.kind_for(step);
    let mut running = match launch(ctx, step, message, received_at).await {
        Ok(running) => running,
        Err(outcome) => return outcome.into(),
    };
    let started = Instant::now();
    let links = running.links();
    report_launch(ctx, step, running.as_ref(), &links);
    ctx.steps.update(&step.task_id, |r| {
        r.links = links;
        r.locator = Some(running.locator());
        r.launcher = Some(launcher_name(kind).to_owned());
        r.state = StepState::Running;
        r.history.push((StepState::Running, chrono::Utc::now()));
    });
    let (outcome, exited_at) =
        match supervise(ctx, step, message, running.as_mut(), &signals, started).await {
            Ended::LetGo(outcome) => (outcome, None),
            Ended::Exited { exit, cause } => {
                // The execution is over: its slot goes to the next step now, not after the
                // bridge has read the outcome (one round trip less per step on a full pool).
                drop(slot);
                let exited_at = Instant::now();
                record_exit(ctx, step, running.as_mut(), exit, exited_at - started);
                let outcome = conclude(ctx, step, message, running.as_ref(), exit, cause).await;
                (outcome, Some(exited_at))
            }
        };
    Life {
        outcome,
        launched: Some(Launched { kind, exited_at }),
    }
}

/// Writes an engine event with the execution's pages (an ECS task, its log stream) into the
/// step's Dagster log, in the background: the Dagster UI then leads to the step's logs. An
/// execution without such pages (a local process) writes nothing, nor does an adopted one
/// (the delivery that launched it wrote its event).
fn report_launch(ctx: &Context, step: &StepRequest, running: &dyn RunningStep, links: &[Link]) {
    if links.is_empty() || running.adopted() {
        return;
    }
    let metadata = BTreeMap::from([
        (META_ATTEMPT.to_owned(), step.attempt.to_string()),
        (META_TASK_ID.to_owned(), step.task_id.clone()),
        ("locator".to_owned(), running.locator()),
    ]);
    let note = format!(
        "dagster-taskiq-controller: attempt {} of {} runs as {}",
        step.attempt,
        step.step_key,
        running.locator()
    );
    let (bridge, step, links) = (ctx.bridge.clone(), step.clone(), links.to_vec());
    tokio::spawn(
        async move {
            if let Err(e) = bridge.report_event(&step, &note, &metadata, &links).await {
                tracing::warn!(%e, "could not write the step's links into Dagster");
            }
        }
        .in_current_span(),
    );
}

/// Waits for a run slot. Gives up on it when draining, when the lease is lost, when the
/// run ended meanwhile, or past the waiting limit (the message is then requeued).
async fn admit(
    ctx: &Context,
    step: &StepRequest,
    message: &ReceivedMessage,
    signals: &LeaseSignals,
) -> Result<Slot, Outcome> {
    let waiting_since = Instant::now();
    let stop = ctx.steps.stop_signal(&step.task_id).unwrap_or_default();
    let ticket = Ticket {
        run_id: step.run_id.clone(),
        priority: step.priority,
        tags: step.tags.clone(),
    };
    let waiting_limit = ctx
        .settings
        .waiting_limit
        .map(|limit| waiting_since + limit);
    tokio::select! {
        slot = ctx.admission.admit(ticket) => Ok(slot),
        _ = ctx.draining.cancelled() => Err(Outcome::shutdown()),
        _ = signals.lost.cancelled() => Err(Outcome::Fenced),
        // Its run ended while it waited: the next delivery is acknowledged unrun.
        _ = stop.cancelled() => Err(Outcome::Released {
            why: Release::StoppedWhileWaiting,
            delay: Duration::ZERO,
        }),
        _ = sleep_until_deadline(waiting_limit) => {
            Err(handoff::requeue(ctx, message, Release::WaitedTooLong).await)
        }
    }
}

/// Starts the execution; a launch that fails is an outcome.
async fn launch(
    ctx: &Context,
    step: &StepRequest,
    message: &ReceivedMessage,
    received_at: Instant,
) -> Result<Box<dyn RunningStep>, Outcome> {
    let kind = ctx.launcher.kind_for(step);
    match ctx.launcher.launch(step).await {
        Ok(running) => {
            ctx.metrics
                .steps_launched
                .get_or_create(&[("launcher", launcher_name(kind))])
                .inc();
            ctx.metrics
                .launch_latency_seconds
                .observe(received_at.elapsed().as_secs_f64());
            ctx.metrics.step_started(
                step.labels
                    .get(crate::scale::SENT_AT_LABEL)
                    .map(String::as_str),
                message.sent_at_ms,
            );
            tracing::info!(locator = %running.locator(), "step started");
            Ok(running)
        }
        Err(LaunchError::Invalid { reason, detail }) => Err(refuse_launch(reason, detail)),
        Err(e) => {
            tracing::warn!(%e, "launch failed");
            let why = match e {
                LaunchError::Transient(_) => Release::LaunchTransient,
                LaunchError::Permanent(_) | LaunchError::Invalid { .. } => Release::LaunchFailed,
            };
            Err(Outcome::Released {
                why,
                delay: ctx.settings.backoff.delay(message.receive_count),
            })
        }
    }
}

/// The step's launch settings can never work: dead-letter the message with the reason
/// (settling tells Dagster first, so the run does not wait for it).
fn refuse_launch(reason: &'static str, detail: String) -> Outcome {
    tracing::error!(reason, %detail, "invalid launch settings");
    Outcome::dead_letter(DeadLetterReason::InvalidLaunch(reason), detail)
}

/// What an ended execution leaves behind: its output for the taskiq result, its duration,
/// its stderr tail for the API.
fn record_exit(
    ctx: &Context,
    step: &StepRequest,
    running: &mut dyn RunningStep,
    exit: crate::launcher::StepExit,
    ran_for: Duration,
) {
    ctx.taskiq
        .keep_output(&step.task_id, running.take_events(), ran_for);
    ctx.metrics
        .step_duration_seconds
        .observe(ran_for.as_secs_f64());
    ctx.steps.update(&step.task_id, |r| {
        r.state = StepState::Exited;
        r.history.push((StepState::Exited, chrono::Utc::now()));
        r.stderr_tail = running.stderr_tail();
    });
    tracing::info!(exit = %exit.short(), elapsed = ?ran_for, "step exited");
}

/// After the execution ended: read the outcome, or write a verdict.
async fn conclude(
    ctx: &Context,
    step: &StepRequest,
    message: &ReceivedMessage,
    running: &dyn RunningStep,
    exit: crate::launcher::StepExit,
    cause: Option<Cause>,
) -> Outcome {
    let state =
        match calls::ask_bridge(ctx, step, "step_state", || ctx.bridge.step_state(step)).await {
            Ok(state) => state,
            Err(e) => return settle::unanswered(ctx, e, message).await,
        };
    if state.attempt_finished {
        let finish = Finish::from_event(state.last_terminal.as_deref());
        let outcome = Outcome::Finished(finish);
        tracing::info!(outcome = outcome.name(), "step finished");
        if finish != Finish::Succeeded {
            if let Some(note) = running.out_of_memory(state.failed_allocation()) {
                note_out_of_memory(ctx, step, &note).await;
            }
        }
        return outcome;
    }
    if state.run_status.is_some_and(|s| s.stops_new_steps()) {
        return Outcome::RunEnded;
    }
    if exit.relaunch() {
        tracing::warn!(exit = %exit.describe(), "the execution never started: relaunching the attempt after a backoff");
        return Outcome::Released {
            why: Release::NeverStarted,
            delay: ctx.settings.backoff.delay(message.receive_count),
        };
    }
    let timed_out = matches!(cause, Some(Cause::TimedOut(_)));
    // A step its memory limit ended: the verdict names the limit, not just the signal.
    let out_of_memory = cause
        .is_none()
        .then(|| running.out_of_memory(false))
        .flatten();
    if out_of_memory.is_some() {
        ctx.metrics.steps_out_of_memory.inc();
    }
    let verdict = Verdict {
        verdict: cause.map_or_else(
            || out_of_memory.unwrap_or_else(|| exit.describe()),
            |c| c.describe(),
        ),
        exit: exit.short(),
        stderr_tail: running.stderr_tail().join("\n"),
        links: running.links(),
    };
    tracing::warn!(verdict = %verdict.verdict, "no outcome in Dagster: reporting a verdict");
    ctx.steps
        .update(&step.task_id, |r| r.verdict = Some(verdict.verdict.clone()));
    let attempt = step.id();
    match calls::ask_bridge(ctx, step, "report_verdict", || {
        ctx.bridge.report_verdict(&attempt, &verdict)
    })
    .await
    {
        Ok(_) => {
            ctx.steps.transition(&step.task_id, StepState::Reported);
            Outcome::Verdict {
                cause: verdict.verdict,
                timed_out,
            }
        }
        Err(e) => settle::unanswered(ctx, e, message).await,
    }
}

/// A step that failed with Dagster's own event (its op got the failed allocation, e.g. a
/// `MemoryError` under the address-space rlimit) but ended for its memory limit: an engine
/// event says so next to the failure, whose RetryPolicy decides as usual.
async fn note_out_of_memory(ctx: &Context, step: &StepRequest, note: &str) {
    tracing::warn!(%note, "the step failed for its memory limit");
    ctx.metrics.steps_out_of_memory.inc();
    ctx.steps
        .update(&step.task_id, |r| r.verdict = Some(note.to_owned()));
    // No verdict or attempt key: this is no verdict, Dagster has the attempt's outcome.
    let metadata = BTreeMap::from([
        (OUT_OF_MEMORY_KEY.to_owned(), note.to_owned()),
        ("controller".to_owned(), ctx.settings.controller_id.clone()),
    ]);
    let message = format!(
        "dagster-taskiq-controller: attempt {} of {} failed for its memory limit: {note}",
        step.attempt, step.step_key
    );
    if let Err(e) = ctx
        .bridge
        .report_event(step, &message, &metadata, &[])
        .await
    {
        tracing::warn!(%e, "could not record the out-of-memory failure in Dagster");
    }
}

/// Engine-event metadata key of [`note_out_of_memory`].
const OUT_OF_MEMORY_KEY: &str = "dagster_taskiq_controller/out_of_memory";

/// Why the controller ended an execution itself; the verdict says so when Dagster has no
/// outcome for the attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Cause {
    /// Killed at its timeout (by the controller, or by its own execution).
    TimedOut(Duration),
    /// An operator asked (dashboard or API).
    Operator(String),
    /// The run's executor asked (its `terminate_step`).
    Executor,
}

impl Cause {
    fn describe(&self) -> String {
        match self {
            Cause::TimedOut(limit) => format!(
                "step timed out after {:.1}s and was killed",
                limit.as_secs_f64()
            ),
            Cause::Operator(reason) => format!("step stopped by an operator: {reason}"),
            Cause::Executor => "step terminated at the executor's request".to_owned(),
        }
    }
}
