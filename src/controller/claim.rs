//! The durable claim of an attempt, taken right before it launches and let go once its
//! outcome is recorded (docs/guarantees.md, "Claims"). Of two controllers holding copies of
//! one attempt's message, one wins the claim and runs it; the other acknowledges its copy
//! only once it has seen the winner's lease live, or takes the claim over once the winner is
//! known to be fenced or gone.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::{calls, settle, Context};
use crate::dagster::{BridgeError, Claim, ClaimBid};
use crate::envelope::StepRequest;
use crate::lease::LeaseSignals;
use crate::outcome::{Outcome, Release, Skip};
use crate::queue::ReceivedMessage;

/// A claim won.
pub(super) struct Claimed {
    /// An earlier execution of the attempt may have started (a redelivery, or a claim taken
    /// over): it is relaunched without Dagster's step verification, which would refuse it.
    pub relaunch: bool,
}

/// What to do about a claim someone else holds.
enum Judgement {
    Wait,
    /// Its holder keeps a live lease on another message of the attempt: ours is a duplicate.
    Duplicate,
    /// Its holder is fenced or gone: take the claim over.
    TakeOver,
}

/// A claim held by someone else, as first seen.
struct Watch {
    claim: Claim,
    since: Instant,
}

/// Claims the attempt of `message`. While someone else holds the claim, waits with the
/// message held (its lease extended) until that holder's fate is known.
pub(super) async fn acquire(
    ctx: &Context,
    step: &StepRequest,
    message: &ReceivedMessage,
    signals: &LeaseSignals,
) -> Result<Claimed, Outcome> {
    let token = format!("{:032x}", rand::rng().random::<u128>());
    let mut replace: Option<String> = None;
    let mut watching: Option<Watch> = None;
    let mut adoption_asked = false;
    loop {
        let bid = ClaimBid {
            holder: &ctx.settings.controller_id,
            token: &token,
            message_id: &message.message_id,
            replace_token: replace.as_deref(),
        };
        let answer = match calls::ask_bridge(ctx, step, "claim_attempt", || {
            ctx.bridge.claim_attempt(step, &bid)
        })
        .await
        {
            Ok(answer) => answer,
            Err(calls::Unanswered::Failed(BridgeError::Rejected { kind, message: why }))
                if kind == "unsupported" =>
            {
                count(ctx, "unsupported");
                tracing::error!(%why, "this Dagster instance cannot hold claims: launching without one (duplicates rely on Dagster's step verification alone)");
                return Ok(Claimed { relaunch: false });
            }
            Err(unanswered) => return Err(settle::unanswered(ctx, unanswered, message).await),
        };
        if answer.claimed {
            let took_over = replace.is_some();
            // A claim lost later fences the step as a lost lease does.
            ctx.claims
                .hold(step, &token, &message.message_id, signals.lost.clone());
            if let Some(skip) = answer.state.and_then(|state| {
                if state.attempt_finished {
                    Some(Outcome::Skipped(Skip::AlreadyFinished))
                } else {
                    // Its run ended meanwhile: the next delivery is skipped with a verdict.
                    state
                        .run_status
                        .is_none_or(|s| s.stops_new_steps())
                        .then_some(Outcome::Released {
                            why: Release::StoppedWhileWaiting,
                            delay: Duration::ZERO,
                        })
                }
            }) {
                tracing::info!(outcome = skip.name(), "claimed, but the attempt is over");
                return Err(skip);
            }
            count(ctx, if took_over { "took_over" } else { "won" });
            if took_over {
                tracing::warn!("claim taken over: relaunching the attempt");
            }
            return Ok(Claimed {
                relaunch: took_over || message.receive_count > 1,
            });
        }
        replace = None;
        let Some(current) = answer.current else {
            continue; // let go of in between: bid again
        };
        if let Some(verdict) = &current.ended {
            count(ctx, "ended");
            tracing::info!(%verdict, "the attempt already ended with a verdict: acknowledging without running");
            return Err(Outcome::Skipped(Skip::AlreadyFinished));
        }
        let mut judgement = judge(ctx, &current, message, &mut watching);
        if matches!(judgement, Judgement::Wait)
            && current.message_id == message.message_id
            && !adoption_asked
        {
            adoption_asked = true;
            if ctx.launcher.has_execution_to_adopt(step).await {
                // Its execution outlives controllers (an ECS task): taking it over adopts that
                // execution instead of starting another, and a holder that is still alive leaves
                // it to whoever holds the message now.
                judgement = Judgement::TakeOver;
            }
        }
        match judgement {
            Judgement::TakeOver => {
                tracing::warn!(holder = %current.holder, "the claim's holder is fenced or gone: taking the claim over");
                replace = Some(current.token);
                continue;
            }
            Judgement::Duplicate => {
                count(ctx, "duplicate");
                tracing::warn!(holder = %current.holder, "another controller runs this attempt under a live lease: acknowledging this copy without running it");
                return Err(Outcome::Skipped(Skip::HeldElsewhere));
            }
            Judgement::Wait => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(poll_interval(ctx)) => {}
            _ = signals.lost.cancelled() => return Err(Outcome::Fenced),
            _ = ctx.draining.cancelled() => return Err(Outcome::shutdown()),
        }
    }
}

/// Decides about a claim someone else holds, from what was seen of it so far.
fn judge(
    ctx: &Context,
    current: &Claim,
    message: &ReceivedMessage,
    watching: &mut Option<Watch>,
) -> Judgement {
    // An earlier process under our id (a restart): its executions died with it.
    if current.holder == ctx.settings.controller_id && !ctx.claims.holds_token(&current.token) {
        return Judgement::TakeOver;
    }
    let now = Instant::now();
    let watch = match watching {
        Some(watch) if watch.claim.token == current.token => watch,
        _ => {
            tracing::info!(holder = %current.holder, "the attempt is claimed by another controller: waiting to see whether it is alive");
            *watching = Some(Watch {
                claim: current.clone(),
                since: now,
            });
            return Judgement::Wait;
        }
    };
    // We hold the very message the claim was taken for, so its holder's lease ran out: a
    // live holder fences its step and lets go; a dead one stops beating.
    let ours = current.message_id == message.message_id;
    if current.beat != watch.claim.beat {
        if !ours {
            // Renewed after we received our copy: renewals come only with a live lease.
            return Judgement::Duplicate;
        }
        watch.claim = current.clone();
        watch.since = now;
        return Judgement::Wait;
    }
    let limit = if ours {
        fence_grace(ctx)
    } else {
        ctx.claims.stale_after()
    };
    if now.duration_since(watch.since) >= limit {
        Judgement::TakeOver
    } else {
        Judgement::Wait
    }
}

/// How long a claim on the message we now hold may stay unchanged before it is taken over:
/// two renewal rounds, and a margin for its holder's fence and the clocks.
fn fence_grace(ctx: &Context) -> Duration {
    ctx.leases.heartbeat_interval() * 2 + FENCE_MARGIN
}

const FENCE_MARGIN: Duration = Duration::from_secs(5);

fn poll_interval(ctx: &Context) -> Duration {
    (ctx.leases.heartbeat_interval() / 2).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

fn count(ctx: &Context, result: &'static str) {
    ctx.metrics
        .claims
        .get_or_create(&[("result", result)])
        .inc();
}

/// Lets go of the attempt's claim once its outcome is recorded (or nothing runs any more):
/// deleted, or kept as the record of our verdict so a late duplicate is not run after it.
pub(super) async fn release(ctx: &Context, step: &StepRequest, outcome: &Outcome) {
    let Some(token) = ctx.claims.forget(&step.task_id) else {
        return;
    };
    let ended = match outcome {
        Outcome::Verdict { cause, .. } | Outcome::ContinuationLost { cause } => {
            Some(cause.as_str())
        }
        _ => None,
    };
    // One try: the outcome is durable already, and a claim left behind only goes stale.
    match ctx.bridge.release_claim(step, &token, ended).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!("the claim was no longer ours to let go of"),
        Err(e) => {
            tracing::warn!(%e, stale_after = ?ctx.claims.stale_after(), "could not let go of the claim; another controller may take it over once it is stale")
        }
    }
}
