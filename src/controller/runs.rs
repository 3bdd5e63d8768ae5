//! Run watching: stops the steps of runs that ended (canceled, failed) in Dagster and the
//! steps the executor asked to terminate. The bridge pushes both as they happen for the
//! runs it was last asked about, so a run is asked about as soon as this controller holds
//! one of its steps; the poll (one batched status query per Dagster instance per interval)
//! is the fallback for a storage that cannot watch or a bridge that restarted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::outage::{self, Diagnosis};
use super::Context;
use crate::dagster::{BridgePush, RunStatus};
use crate::state::StopReason;

/// How often the runs with held steps are compared with those the bridge watches.
const WATCH_REFRESH: Duration = Duration::from_millis(200);

/// Per Dagster instance (its ref as JSON text): the ref and the run ids last sent to the
/// bridge, sorted.
type WatchedRuns = HashMap<String, (serde_json::Value, Vec<String>)>;

/// Watches until `stop` is cancelled.
pub(super) async fn watch(ctx: Arc<Context>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(ctx.settings.run_status_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh = tokio::time::interval(WATCH_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watched = WatchedRuns::new();
    let mut pushes = ctx.bridge.subscribe();
    let mut pushes_open = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {
                // A sidecar killed or dead while nothing asked comes back now, not with the
                // next message.
                ctx.bridge.revive().await;
                poll_run_statuses(&ctx, &mut watched, true).await;
            }
            _ = refresh.tick() => poll_run_statuses(&ctx, &mut watched, false).await,
            push = pushes.recv(), if pushes_open => match push {
                Ok(push) => on_push(&ctx, push),
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "bridge notices dropped; the next poll catches up");
                }
                Err(RecvError::Closed) => pushes_open = false,
            },
        }
    }
}

fn on_push(ctx: &Context, push: BridgePush) {
    match push {
        BridgePush::RunEnded { run_id, status } => stop_run(ctx, &run_id, status),
        BridgePush::TerminateStep {
            task_id,
            step_key,
            attempt,
            ..
        } => {
            if ctx.steps.request_stop(&task_id, StopReason::Executor) {
                tracing::info!(
                    task_id,
                    step_key,
                    attempt,
                    "executor asked to terminate the step"
                );
            }
        }
    }
}

/// Reads the status of the runs with held steps, per Dagster instance: all of them
/// (`all`), or only where the set of runs changed since it was last sent, which is also
/// the set the bridge watches.
async fn poll_run_statuses(ctx: &Context, watched: &mut WatchedRuns, all: bool) {
    let groups = ctx.steps.active_runs();
    let keys: Vec<String> = groups.iter().map(|(r, _)| r.to_string()).collect();
    // Instances with no held step any more: clear the bridge's watches there.
    let gone: Vec<String> = watched
        .keys()
        .filter(|key| !keys.contains(key))
        .cloned()
        .collect();
    for key in gone {
        let Some((instance_ref, _)) = watched.remove(&key) else {
            continue;
        };
        if let Err(e) = ctx.bridge.run_statuses(&instance_ref, &[]).await {
            tracing::debug!(%e, "clearing the bridge's run watches failed");
        }
    }
    for ((instance_ref, run_ids), key) in groups.into_iter().zip(keys) {
        if !all && watched.get(&key).is_some_and(|(_, sent)| *sent == run_ids) {
            continue;
        }
        match ctx.bridge.run_statuses(&instance_ref, &run_ids).await {
            Ok(statuses) => {
                outage::answered(ctx, &instance_ref);
                watched.insert(key, (instance_ref, run_ids));
                for (run_id, status) in statuses {
                    if let Some(status) = status {
                        stop_run(ctx, &run_id, status);
                    }
                }
            }
            Err(e) => {
                tracing::debug!(%e, "run status poll failed; trying again next tick");
                // The poll runs every interval: it notices an outage before any step does.
                let run_id = run_ids.first().map(String::as_str);
                if let Diagnosis::Outage(cause, detail) =
                    outage::diagnose(ctx, &instance_ref, run_id, &e).await
                {
                    outage::unreachable(ctx, &instance_ref, cause, detail);
                }
            }
        }
    }
}

/// Stops the run's steps when it is canceling, canceled or failed. Not on SUCCESS: a
/// successful run has only steps that are already exiting.
fn stop_run(ctx: &Context, run_id: &str, status: RunStatus) {
    // Not on any other status, including one this build does not know.
    if !matches!(
        status,
        RunStatus::Canceling | RunStatus::Canceled | RunStatus::Failure
    ) {
        return;
    }
    let reason = StopReason::RunEnded {
        run_status: status.name().to_owned(),
    };
    let asked = ctx.steps.request_stop_run(run_id, &reason);
    if asked > 0 {
        tracing::info!(
            run_id,
            ?status,
            steps = asked,
            "run ended in Dagster: stopping its steps"
        );
    }
}
