//! Supervision of a running execution: wait for the next thing that happens to it, then
//! handle that one thing. Each concern (exit, lease, shutdown, timeout, stop request,
//! hand-off) has its own function.

use std::time::Duration;

use tokio::time::Instant;

use super::step::Cause;
use super::{calls, handoff, sleep_until_deadline, Context};
use crate::dagster::Verdict;
use crate::envelope::StepRequest;
use crate::launcher::{RunningStep, StepExit, TIMED_OUT_EXIT};
use crate::lease::LeaseSignals;
use crate::outcome::Outcome;
use crate::queue::ReceivedMessage;
use crate::state::StopReason;

/// How long past a step's timeout the controller stops an execution that enforces the timeout
/// itself (the ECS shim): time for its container to be provisioned and pull its image.
const TIMEOUT_BACKSTOP: Duration = Duration::from_secs(600);

/// How supervision ended.
pub(super) enum Ended {
    /// The execution ended; `cause` says why when the controller ended it.
    Exited {
        exit: StepExit,
        cause: Option<Cause>,
    },
    /// This controller let go of the execution (lease lost, shutdown): nothing to conclude.
    LetGo(Outcome),
}

/// What woke the supervisor.
enum Event {
    Exited(StepExit),
    LeaseLost,
    /// Draining, and the execution survives the controller.
    Draining,
    /// The shutdown grace is over.
    Abort,
    TimedOut(Duration),
    StopRequested,
    HandoffDue,
    /// A hand-off's continuation did not come back in time.
    AdoptionOverdue,
    /// The lease's receipt handle changed: deadlines are read again.
    Renewed,
}

/// Supervises `running` until it ends or this controller lets go of it.
pub(super) async fn supervise(
    ctx: &Context,
    step: &StepRequest,
    message: &ReceivedMessage,
    running: &mut dyn RunningStep,
    signals: &LeaseSignals,
    started: Instant,
) -> Ended {
    let locator = running.locator();
    let timeout = step.timeout;
    // An execution that enforces the timeout itself counts from its own start (an ECS
    // container may start minutes after the launch); ours is then only a backstop.
    let backstop = if running.enforces_timeout() {
        TIMEOUT_BACKSTOP
    } else {
        Duration::ZERO
    };
    let deadline = timeout.map(|t| (started + t + backstop, t));
    let stop = ctx.steps.stop_signal(&step.task_id).unwrap_or_default();
    loop {
        let event = next_event(ctx, step, running, signals, &stop, deadline).await;
        let ended = match event {
            Event::Exited(exit) => Some(Ended::Exited { exit, cause: None }),
            Event::LeaseLost => Some(lease_lost(running, &locator).await),
            Event::Draining => {
                tracing::info!(%locator, "shutting down: handing the running step over to another replica");
                Some(Ended::LetGo(Outcome::HandedOff))
            }
            Event::Abort => Some(abort(running, &locator).await),
            Event::TimedOut(limit) => Some(time_out(running, &locator, limit).await),
            Event::StopRequested => Some(stop_requested(ctx, step, running, &locator).await),
            Event::HandoffDue => {
                handoff::hand_off(ctx, &step.task_id, message).await;
                None
            }
            Event::AdoptionOverdue => Some(continuation_lost(ctx, step, running, &locator).await),
            Event::Renewed => None,
        };
        if let Some(ended) = ended {
            return timed_out_in_task(ended, running, timeout, &locator);
        }
    }
}

async fn next_event(
    ctx: &Context,
    step: &StepRequest,
    running: &mut dyn RunningStep,
    signals: &LeaseSignals,
    stop: &tokio_util::sync::CancellationToken,
    deadline: Option<(Instant, Duration)>,
) -> Event {
    let handoff_at = ctx.leases.handoff_deadline(&step.task_id);
    let adopt_by = ctx
        .leases
        .adoption_deadline(&step.task_id, ctx.settings.adoption_window);
    let survives = running.survives_controller();
    tokio::select! {
        exit = running.wait() => Event::Exited(exit),
        _ = signals.lost.cancelled() => Event::LeaseLost,
        _ = ctx.draining.cancelled(), if survives => Event::Draining,
        _ = ctx.abort.cancelled() => Event::Abort,
        _ = sleep_until_deadline(deadline.map(|(at, _)| at)) => {
            Event::TimedOut(deadline.map(|(_, limit)| limit).unwrap_or_default())
        }
        _ = stop.cancelled() => Event::StopRequested,
        _ = sleep_until_deadline(handoff_at) => Event::HandoffDue,
        _ = sleep_until_deadline(adopt_by) => Event::AdoptionOverdue,
        _ = signals.renewed.notified() => Event::Renewed,
    }
}

/// Someone else holds the message now: fence a local execution, leave a surviving one to
/// the new holder, who adopts it.
async fn lease_lost(running: &mut dyn RunningStep, locator: &str) -> Ended {
    if running.survives_controller() {
        tracing::warn!(%locator, "lease lost: leaving the step to the new holder");
    } else {
        tracing::warn!(%locator, "lease lost: fencing the step");
        running.kill();
        running.wait().await;
    }
    Ended::LetGo(Outcome::Fenced)
}

/// A hand-off's continuation did not come back within the adoption window: it was lost
/// (deleted, purged), or another replica will relaunch it after the window. The original is
/// deleted already, so nobody else may ever report this attempt: stop the execution and tell
/// Dagster (the executor fails the step; its RetryPolicy decides). A relaunch of a
/// continuation that does come back finds the attempt finished and skips it.
async fn continuation_lost(
    ctx: &Context,
    step: &StepRequest,
    running: &mut dyn RunningStep,
    locator: &str,
) -> Ended {
    tracing::error!(%locator, "continuation not received back in time: fencing the step");
    running.kill();
    running.wait().await;
    let window = ctx.settings.adoption_window.as_secs();
    let verdict = Verdict {
        verdict: format!(
            "dagster-taskiq-controller stopped the step: its message was handed off to a \
             continuation before SQS's visibility cap, and the continuation did not come back \
             within {window}s (deleted, purged or lost)"
        ),
        exit: "killed".into(),
        stderr_tail: running.stderr_tail().join("\n"),
        links: running.links(),
    };
    let attempt = step.id();
    match calls::ask_bridge(ctx, step, "report_verdict", || {
        ctx.bridge.report_verdict(&attempt, &verdict)
    })
    .await
    {
        Ok(_) => {
            ctx.steps
                .update(&step.task_id, |r| r.verdict = Some(verdict.verdict.clone()));
            Ended::LetGo(Outcome::ContinuationLost {
                cause: verdict.verdict,
            })
        }
        Err(e) => {
            tracing::error!(%e, "could not record the lost continuation in Dagster");
            Ended::LetGo(Outcome::Fenced)
        }
    }
}

/// The shutdown grace is over: a surviving execution is left for another replica, a local
/// one is killed; either way the message goes back to the queue.
async fn abort(running: &mut dyn RunningStep, locator: &str) -> Ended {
    if running.survives_controller() {
        tracing::warn!(%locator, "shutdown: leaving the step running for another replica to adopt");
        return Ended::LetGo(Outcome::HandedOff);
    }
    tracing::warn!(%locator, "shutdown grace over: killing the step; its message goes back to the queue");
    running.kill();
    running.wait().await;
    Ended::LetGo(Outcome::Killed)
}

/// SIGKILL at once (a SIGTERM Dagster did not ask for would end the step the same way, only
/// later); the "timed out" verdict written afterwards lets the RetryPolicy decide.
async fn time_out(running: &mut dyn RunningStep, locator: &str, limit: Duration) -> Ended {
    tracing::warn!(%locator, ?limit, "step timed out: killing its process group");
    running.kill();
    Ended::Exited {
        exit: running.wait().await,
        cause: Some(Cause::TimedOut(limit)),
    }
}

/// Its run ended, an operator or the executor asked: SIGTERM (Dagster writes the interrupt
/// failure), then SIGKILL after the grace.
async fn stop_requested(
    ctx: &Context,
    step: &StepRequest,
    running: &mut dyn RunningStep,
    locator: &str,
) -> Ended {
    let reason = ctx.steps.stop_reason(&step.task_id);
    tracing::info!(%locator, ?reason, "stopping the step: SIGTERM, then SIGKILL after the grace");
    running.terminate();
    let exit = match tokio::time::timeout(ctx.settings.stop_grace, running.wait()).await {
        Ok(exit) => exit,
        Err(_) => {
            running.kill();
            running.wait().await
        }
    };
    let cause = match reason {
        Some(StopReason::Operator { reason }) => Some(Cause::Operator(reason)),
        Some(StopReason::Executor) => Some(Cause::Executor),
        Some(StopReason::RunEnded { .. }) | None => None,
    };
    Ended::Exited { exit, cause }
}

/// An execution that enforces its own timeout (the ECS shim) says so by its exit code.
fn timed_out_in_task(
    ended: Ended,
    running: &dyn RunningStep,
    timeout: Option<Duration>,
    locator: &str,
) -> Ended {
    match (ended, timeout) {
        (
            Ended::Exited {
                exit:
                    exit @ StepExit::Ecs {
                        exit_code: Some(TIMED_OUT_EXIT),
                        ..
                    },
                cause: None,
            },
            Some(limit),
        ) if running.enforces_timeout() => {
            tracing::warn!(%locator, ?limit, "step timed out: its task killed it");
            Ended::Exited {
                exit,
                cause: Some(Cause::TimedOut(limit)),
            }
        }
        (ended, _) => ended,
    }
}
