//! The controller: desired state (messages) against actual state (executions), one step task
//! per message. docs/architecture.md follows one message through these files.
//!
//! - [`intake`](self::intake): long-polls when admission has room, claims each message and
//!   hands it to its own step task.
//! - [`reconcile`](self::reconcile): checks a claimed attempt against Dagster before it
//!   runs: skip, pass on, give up or (re)launch.
//! - [`step`](self::step): the step's life: admit, launch, conclude.
//! - [`supervise`](self::supervise): watches a running execution (exit, lease, stop
//!   requests, timeout, hand-off, shutdown), one function per concern.
//! - [`handoff`](self::handoff): continuations past SQS's visibility cap, and requeues.
//! - [`settle`](self::settle): the one error policy, and carrying an [`crate::outcome::Outcome`] out on the
//!   queue once it is durable (see [`crate::outcome::Outcome`]).
//! - [`runs`](self::runs): stops the steps of runs that ended in Dagster.
//! - [`calls`](self::calls): bridge and queue calls with a retry budget; bridge calls of
//!   held messages wait while Dagster cannot answer.
//! - [`outage`](self::outage): telling a Dagster outage from an error of one request; what
//!   `/readyz` and the intake read while Dagster is unreachable.

mod batch;
mod calls;
mod claim;
mod handoff;
mod intake;
mod outage;
mod reconcile;
mod runs;
mod settle;
mod step;
mod stored_step;
mod supervise;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::claims::ClaimTable;
use crate::dagster::{BridgeInfo, DagsterBridge};
use crate::flags::{invalid, parse_seconds, ConfigError};
use crate::health::Health;
use crate::launcher::Launcher;
use crate::lease::LeaseTable;
use crate::metrics::Metrics;
use crate::queue::WorkQueue;
use crate::retry::Backoff;
use crate::state::StepTable;
use crate::taskiq::TaskiqCompat;

/// Settings of the controller loop.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Identifies this replica in dead letters and events.
    pub controller_id: String,
    /// Long-poll wait of one receive (≤ 20 s).
    pub receive_wait: Duration,
    /// Deliveries of one message before it is dead-lettered.
    pub max_attempts: u32,
    /// Backoff of released messages (by receive count) and of retried calls.
    pub backoff: Backoff,
    /// How long running steps may take to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// How long to keep retrying a bridge or queue call before giving the message back.
    pub call_retry_budget: Duration,
    /// Timeout of steps without a `dagster-taskiq/timeout` tag; `None`: no limit.
    pub default_step_timeout: Option<Duration>,
    /// After SIGTERM (cancel), how long a step may take to exit before SIGKILL.
    pub stop_grace: Duration,
    /// How often the status of runs with held steps is read from Dagster.
    pub run_status_interval: Duration,
    /// After a hand-off, how long the owner waits for its continuation before fencing its
    /// step; other replicas relaunch a continuation only after this (plus a clock margin).
    pub adoption_window: Duration,
    /// A held message that waits this long for a run slot goes back to the queue for other
    /// replicas; `None`: it waits here.
    pub waiting_limit: Option<Duration>,
    /// The controller's own Dagster instance: every step and every bridge call uses it,
    /// whatever instance a message names.
    pub instance: BridgeInfo,
}

/// Everything a step task needs: the clients at the three boundaries, the tables, the
/// metrics and the shutdown signals. Shared by the intake and every step task.
pub struct Context {
    pub settings: Settings,
    pub queue: Arc<dyn WorkQueue>,
    pub launcher: Arc<dyn Launcher>,
    pub bridge: Arc<dyn DagsterBridge>,
    pub admission: Admission,
    pub leases: Arc<LeaseTable>,
    /// Durable claims of the attempts this controller runs.
    pub claims: Arc<ClaimTable>,
    pub steps: Arc<StepTable>,
    pub metrics: Arc<Metrics>,
    /// Heartbeats of the loops and the last SQS contact, for the probes.
    pub health: Arc<Health>,
    /// dagster-taskiq compatibility: extended (S3) payloads and taskiq results.
    pub taskiq: TaskiqCompat,
    /// Cancelled when draining starts (stop receiving, do not launch).
    pub draining: CancellationToken,
    /// Cancelled when the grace is over (kill running steps, release their messages).
    pub abort: CancellationToken,
}

/// Runs until `ctx.draining` is cancelled and every held message is settled: the lease
/// keeper, the run watcher and the intake side by side, then the drain.
pub async fn run(ctx: Arc<Context>) {
    let keeper_stop = CancellationToken::new();
    let keeper = tokio::spawn({
        let (leases, queue, health) = (ctx.leases.clone(), ctx.queue.clone(), ctx.health.clone());
        let stop = keeper_stop.clone();
        async move {
            leases.keep(queue, stop, &health.lease_keeper).await;
            health.lease_keeper.stop();
        }
    });
    let claim_keeper = tokio::spawn({
        let (claims, bridge, leases) = (ctx.claims.clone(), ctx.bridge.clone(), ctx.leases.clone());
        let (interval, stop) = (ctx.leases.heartbeat_interval(), keeper_stop.clone());
        async move { claims.keep(bridge, leases, interval, stop).await }
    });
    let watcher = tokio::spawn(runs::watch(ctx.clone(), keeper_stop.clone()));
    let mut tasks = JoinSet::new();
    intake::intake(&ctx, &mut tasks).await;
    ctx.health.intake.stop();
    drain(&ctx, tasks).await;
    keeper_stop.cancel();
    let _ = keeper.await;
    let _ = claim_keeper.await;
    let _ = watcher.await;
    tracing::info!("drained");
}

/// Waits for every step task; past the shutdown grace (or on a second signal), aborts the
/// rest, which kills their executions and gives their messages back.
async fn drain(ctx: &Context, mut tasks: JoinSet<()>) {
    tracing::info!(held = tasks.len(), grace = ?ctx.settings.shutdown_grace, "draining");
    let grace_over = tokio::time::sleep(ctx.settings.shutdown_grace);
    tokio::pin!(grace_over);
    loop {
        tokio::select! {
            joined = tasks.join_next() => if joined.is_none() { break },
            _ = &mut grace_over, if !ctx.abort.is_cancelled() => {
                tracing::warn!(running = tasks.len(), "shutdown grace over: killing running steps");
                ctx.abort.cancel();
            }
            _ = ctx.abort.cancelled(), if !grace_over.is_elapsed() => {
                // Forced: fall through to the abort branch on the next turn.
                grace_over.as_mut().reset(Instant::now());
            }
        }
    }
}

async fn sleep_until_deadline(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn launcher_name(kind: crate::envelope::LauncherKind) -> &'static str {
    match kind {
        crate::envelope::LauncherKind::Process => "process",
        crate::envelope::LauncherKind::Ecs => "ecs",
    }
}

/// Counts a queue failure the loop saw (receive, send) by operation and kind.
fn count_queue_error(ctx: &Context, operation: &'static str, e: &crate::queue::QueueError) {
    ctx.metrics
        .queue_errors
        .get_or_create(&[("operation", operation), ("kind", e.kind())])
        .inc();
}

/// The controller loop's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// Deliveries of one message before it is dead-lettered with a verdict.
    #[arg(long, env = "DAGSTER_TASKIQ_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,

    /// Base of the exponential backoff, in seconds.
    #[arg(long, env = "DAGSTER_TASKIQ_BACKOFF_BASE", default_value = "1", value_parser = parse_seconds)]
    pub backoff_base: Duration,

    /// Cap of the exponential backoff, in seconds.
    #[arg(long, env = "DAGSTER_TASKIQ_BACKOFF_CAP", default_value = "300", value_parser = parse_seconds)]
    pub backoff_cap: Duration,

    /// Seconds running steps get to finish after SIGTERM before they are killed and released.
    #[arg(long, env = "DAGSTER_TASKIQ_SHUTDOWN_GRACE", default_value = "110", value_parser = parse_seconds)]
    pub shutdown_grace: Duration,

    /// Timeout of steps without a `dagster-taskiq/timeout` op tag, in seconds; 0: none.
    #[arg(long, env = "DAGSTER_TASKIQ_STEP_TIMEOUT", default_value = "0", value_parser = parse_seconds)]
    pub step_timeout: Duration,

    /// Seconds a canceled step gets between SIGTERM and SIGKILL.
    #[arg(long, env = "DAGSTER_TASKIQ_STOP_GRACE", default_value = "10", value_parser = parse_seconds)]
    pub stop_grace: Duration,

    /// How often the status of runs with running steps is read from Dagster, in seconds. The
    /// bridge also pushes cancellations and terminate requests as they are written; this poll
    /// is the fallback.
    #[arg(long, env = "DAGSTER_TASKIQ_RUN_STATUS_INTERVAL", default_value = "1", value_parser = parse_seconds)]
    pub run_status_interval: Duration,

    /// Long-poll wait of one receive, in seconds (at most 20).
    #[arg(long, env = "DAGSTER_TASKIQ_RECEIVE_WAIT", default_value = "20", value_parser = parse_seconds)]
    pub receive_wait: Duration,

    /// Name of this replica in dead letters, events and claims. Default: hostname and pid.
    /// A stable id lets a restarted replica take over its own claims at once.
    #[arg(long, env = "DAGSTER_TASKIQ_CONTROLLER_ID")]
    pub controller_id: Option<String>,

    /// Seconds after which a claim whose holder stopped renewing it may be taken over by
    /// another replica holding a copy of the attempt's message; a holder that cannot renew
    /// for half of this fences its step (docs/guarantees.md, "Claims").
    #[arg(long, env = "DAGSTER_TASKIQ_CLAIM_STALE_AFTER", default_value = "600", value_parser = parse_seconds)]
    pub claim_stale_after: Duration,
}

impl ControllerArgs {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(invalid("max-attempts", "must be at least 1"));
        }
        if self.backoff_base > self.backoff_cap {
            return Err(invalid("backoff-base", "must not exceed --backoff-cap"));
        }
        if self.receive_wait > Duration::from_secs(20) {
            return Err(invalid("receive-wait", "SQS long polls at most 20 seconds"));
        }
        if self.claim_stale_after < Duration::from_secs(10) {
            return Err(invalid(
                "claim-stale-after",
                "must be at least 10 seconds (holders fence themselves at half of it)",
            ));
        }
        if self.run_status_interval < Duration::from_millis(100) {
            return Err(invalid(
                "run-status-interval",
                "must be at least 0.1 seconds",
            ));
        }
        Ok(())
    }

    /// `None`: steps without a timeout tag run as long as they take.
    pub fn step_timeout(&self) -> Option<Duration> {
        Some(self.step_timeout).filter(|t| !t.is_zero())
    }

    pub fn backoff(&self) -> Backoff {
        Backoff {
            base: self.backoff_base,
            cap: self.backoff_cap,
        }
    }

    /// The configured id, or `<hostname>-<pid>`.
    pub fn controller_id(&self) -> String {
        self.controller_id.clone().unwrap_or_else(|| {
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "controller".into());
            format!("{host}-{}", std::process::id())
        })
    }
}
