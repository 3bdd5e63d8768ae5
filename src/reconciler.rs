//! The controller loop and the step state machine.
//!
//! Intake long-polls the queue whenever admission has room and hands each message to its own
//! task, which decodes it, reconciles it against Dagster (skip a finished attempt or a
//! canceled run, relaunch an attempt whose execution vanished), launches it, holds its lease
//! while it runs, and settles the message only once the outcome is durable: the step's
//! terminal event is in Dagster's event log, or the bridge acknowledged our verdict, or the
//! dead-letter send succeeded.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admission::{Admission, Ticket};
use crate::dagster::{
    BridgeError, BridgePush, DagsterBridge, RunStatus, StepState as DagsterStepState, Verdict,
};
use crate::envelope::{self, StepRequest};
use crate::health::{Health, IDLE_BEAT};
use crate::launcher::{LaunchError, Launcher, RunningStep, StepExit, TIMED_OUT_EXIT};
use crate::lease::LeaseSignals;
use crate::lease::LeaseTable;
use crate::metrics::Metrics;
use crate::queue::{continuation, DeadLetter, QueueError, ReceivedMessage, WorkQueue};
use crate::results::{DecodeError, StoreError, TaskiqCompat};
use crate::retry::Backoff;
use crate::state::{StepState, StepTable, StopReason};

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
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
}

/// How long past a step's timeout the controller stops an execution that enforces the timeout
/// itself (the ECS shim): time for its container to be provisioned and pull its image.
const TIMEOUT_BACKSTOP: Duration = Duration::from_secs(600);

/// How often the runs with held steps are compared with those the bridge watches.
const WATCH_REFRESH: Duration = Duration::from_millis(200);

/// Per Dagster instance (its ref as JSON text): the ref and the run ids last sent to the
/// bridge, sorted.
type WatchedRuns = std::collections::HashMap<String, (serde_json::Value, Vec<String>)>;

/// The verdict of a step killed at its timeout, by the controller or by its own execution.
fn timed_out_cause(limit: Duration) -> String {
    format!(
        "step timed out after {:.1}s and was killed",
        limit.as_secs_f64()
    )
}

/// Allowance for clock skew between replicas when reading a hand-off time.
const CLOCK_MARGIN: Duration = Duration::from_secs(10);

/// Everything the loop needs; shared by the intake and every step task.
pub struct Controller {
    pub config: ReconcilerConfig,
    pub queue: Arc<dyn WorkQueue>,
    pub launcher: Arc<dyn Launcher>,
    pub bridge: Arc<dyn DagsterBridge>,
    pub admission: Admission,
    pub leases: Arc<LeaseTable>,
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

/// What happens to a message once this controller is done with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// The outcome is durable: delete the message.
    Ack {
        outcome: &'static str,
        state: StepState,
    },
    /// Make it visible again after `delay`.
    Release {
        delay: Duration,
        reason: &'static str,
        state: StepState,
    },
    /// Send it to the dead-letter queue.
    DeadLetter {
        /// Stable short reason: a poison name, `unknown_run`, `attempts_exhausted` ...
        reason: &'static str,
        detail: String,
        error_class: &'static str,
    },
    /// The lease was lost: the message belongs to someone else now; touch nothing.
    Abandon,
}

impl Controller {
    /// Runs until `draining` is cancelled and every held message is settled.
    pub async fn run(self: Arc<Self>) {
        let keeper_stop = CancellationToken::new();
        let keeper = tokio::spawn({
            let leases = self.leases.clone();
            let queue = self.queue.clone();
            let stop = keeper_stop.clone();
            let health = self.health.clone();
            async move {
                leases.keep(queue, stop, &health.lease_keeper).await;
                health.lease_keeper.stop();
            }
        });
        let watcher = tokio::spawn(self.clone().watch_runs(keeper_stop.clone()));
        let mut tasks = JoinSet::new();
        self.clone().intake(&mut tasks).await;
        self.health.intake.stop();

        tracing::info!(held = tasks.len(), grace = ?self.config.shutdown_grace, "draining");
        let grace_over = tokio::time::sleep(self.config.shutdown_grace);
        tokio::pin!(grace_over);
        loop {
            tokio::select! {
                joined = tasks.join_next() => if joined.is_none() { break },
                _ = &mut grace_over, if !self.abort.is_cancelled() => {
                    tracing::warn!(running = tasks.len(), "shutdown grace over: killing running steps");
                    self.abort.cancel();
                }
                _ = self.abort.cancelled(), if !grace_over.is_elapsed() => {
                    // Forced: fall through to the abort branch on the next turn.
                    grace_over.as_mut().reset(Instant::now());
                }
            }
        }
        keeper_stop.cancel();
        let _ = keeper.await;
        let _ = watcher.await;
        tracing::info!("drained");
    }

    async fn intake(self: Arc<Self>, tasks: &mut JoinSet<()>) {
        let mut failures = 0u32;
        loop {
            // Reap finished tasks so the set does not grow without bound.
            while tasks.try_join_next().is_some() {}
            self.health.intake.beat();
            // Beat while waiting for room too: a full controller is busy, not stuck.
            let reserve = self.admission.reserve();
            tokio::pin!(reserve);
            let first = loop {
                tokio::select! {
                    _ = self.draining.cancelled() => return,
                    permit = &mut reserve => break permit,
                    _ = tokio::time::sleep(IDLE_BEAT) => self.health.intake.beat(),
                }
            };
            let mut permits = vec![first];
            while permits.len() < 10 {
                match self.admission.try_reserve() {
                    Some(permit) => permits.push(permit),
                    None => break,
                }
            }
            let queue = self.queue.clone();
            let (max, wait, visibility) = (
                permits.len(),
                self.config.receive_wait,
                self.leases.visibility(),
            );
            let mut receive = Box::pin(async move { queue.receive(max, wait, visibility).await });
            let received = tokio::select! {
                received = &mut receive => received,
                _ = self.draining.cancelled() => {
                    // Dropping a long poll mid-way could hide messages SQS already handed
                    // out; let it finish in the background and give back what it brings.
                    let this = self.clone();
                    tasks.spawn(async move {
                        if let Ok(messages) = receive.await {
                            for message in messages {
                                this.metrics.messages_received.inc();
                                this.settle_unclaimed(&message, release_for_shutdown()).await;
                            }
                        }
                    });
                    return;
                }
            };
            self.health.queue_contact(
                "ReceiveMessage",
                received.as_ref().err().map(ToString::to_string),
            );
            match received {
                Ok(messages) => {
                    failures = 0;
                    for message in messages {
                        let permit = permits.pop().expect("no more messages than permits");
                        self.metrics.messages_received.inc();
                        self.metrics.steps_in_flight.inc();
                        let this = self.clone();
                        tasks.spawn(async move {
                            this.handle(message).await;
                            this.metrics.steps_in_flight.dec();
                            drop(permit);
                        });
                    }
                }
                Err(e) => {
                    failures += 1;
                    self.count_queue_error("ReceiveMessage", &e);
                    let pause = self.config.backoff.delay(failures);
                    tracing::warn!(%e, ?pause, "receiving failed; pausing intake");
                    tokio::select! {
                        _ = self.draining.cancelled() => return,
                        _ = self.sleep_beating(pause) => {}
                    }
                }
            }
        }
    }

    /// Sleeps, beating the intake heartbeat: a backoff pause is not a stuck loop.
    async fn sleep_beating(&self, pause: Duration) {
        let until = Instant::now() + pause;
        while Instant::now() < until {
            tokio::time::sleep_until(until.min(Instant::now() + IDLE_BEAT)).await;
            self.health.intake.beat();
        }
    }

    /// Stops the steps of runs that ended (canceled, failed) in Dagster and steps the executor
    /// asked to terminate. The bridge pushes both as they happen for the runs it was last
    /// asked about, so a run is asked about as soon as this controller holds one of its steps;
    /// the poll (one batched status query per Dagster instance per interval) is the fallback
    /// for a storage that cannot watch or a bridge that restarted.
    async fn watch_runs(self: Arc<Self>, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(self.config.run_status_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(WATCH_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watched = WatchedRuns::new();
        let mut pushes = self.bridge.subscribe();
        let mut pushes_open = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => self.poll_run_statuses(&mut watched, true).await,
                _ = refresh.tick() => self.poll_run_statuses(&mut watched, false).await,
                push = pushes.recv(), if pushes_open => match push {
                    Ok(BridgePush::RunEnded { run_id, status }) => self.stop_run(&run_id, status),
                    Ok(BridgePush::TerminateStep { task_id, step_key, attempt, .. }) => {
                        if self.steps.request_stop(&task_id, StopReason::Executor) {
                            tracing::info!(task_id, step_key, attempt, "executor asked to terminate the step");
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "bridge notices dropped; the next poll catches up");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => pushes_open = false,
                },
            }
        }
    }

    /// Reads the status of the runs with held steps, per Dagster instance: all of them
    /// (`all`), or only where the set of runs changed since it was last sent, which is also
    /// the set the bridge watches.
    async fn poll_run_statuses(&self, watched: &mut WatchedRuns, all: bool) {
        let groups = self.steps.active_runs();
        let keys: Vec<String> = groups.iter().map(|(r, _)| r.to_string()).collect();
        // Instances with no held step any more: clear the bridge's watches there.
        let gone: Vec<String> = watched
            .keys()
            .filter(|key| !keys.contains(key))
            .cloned()
            .collect();
        for key in gone {
            let (instance_ref, _) = watched.remove(&key).expect("listed");
            if let Err(e) = self.bridge.run_statuses(&instance_ref, &[]).await {
                tracing::debug!(%e, "clearing the bridge's run watches failed");
            }
        }
        for ((instance_ref, run_ids), key) in groups.into_iter().zip(keys) {
            if !all && watched.get(&key).is_some_and(|(_, sent)| *sent == run_ids) {
                continue;
            }
            match self.bridge.run_statuses(&instance_ref, &run_ids).await {
                Ok(statuses) => {
                    watched.insert(key, (instance_ref, run_ids));
                    for (run_id, status) in statuses {
                        if let Some(status) = status {
                            self.stop_run(&run_id, status);
                        }
                    }
                }
                Err(e) => tracing::debug!(%e, "run status poll failed; trying again next tick"),
            }
        }
    }

    /// Stops the run's steps when it is canceling, canceled or failed. Not on SUCCESS: a
    /// successful run has only steps that are already exiting.
    fn stop_run(&self, run_id: &str, status: RunStatus) {
        if !matches!(
            status,
            RunStatus::Canceling | RunStatus::Canceled | RunStatus::Failure
        ) {
            return;
        }
        let reason = StopReason::RunEnded {
            run_status: format!("{status:?}").to_uppercase(),
        };
        let asked = self.steps.request_stop_run(run_id, &reason);
        if asked > 0 {
            tracing::info!(
                run_id,
                ?status,
                steps = asked,
                "run ended in Dagster: stopping its steps"
            );
        }
    }

    /// Processes one received message to the end.
    async fn handle(&self, mut message: ReceivedMessage) {
        // A requeued copy continues the count of the message it replaced.
        let prior = message
            .attributes
            .get(continuation::PRIOR_DELIVERIES)
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0);
        message.receive_count = message.receive_count.saturating_add(prior);
        let mut step = match self.taskiq.decode(&message).await {
            Ok(step) => step,
            Err(DecodeError::Unavailable(e)) => {
                let disposition = self.payload_unavailable(e, &message);
                self.settle_unclaimed(&message, disposition).await;
                return;
            }
            Err(DecodeError::Poison { poison, task_id }) => {
                let span = tracing::warn_span!("poison", message_id = %message.message_id);
                async {
                    tracing::warn!(reason = poison.name(), error = %poison, "poison message");
                    self.taskiq
                        .write_poison_result(task_id.as_deref(), &poison)
                        .await;
                    let disposition = Disposition::DeadLetter {
                        reason: poison.name(),
                        detail: poison.to_string(),
                        error_class: "poison",
                    };
                    self.settle_unclaimed(&message, disposition).await;
                }
                .instrument(span)
                .await;
                return;
            }
        };
        step.receive_count = message.receive_count;
        // The launcher sees the timeout that applies (the ECS shim enforces it in the task).
        step.timeout = step.timeout.or(self.config.default_step_timeout);
        let span = tracing::info_span!(
            "step",
            run_id = %step.run_id,
            step_key = %step.step_key,
            attempt = step.attempt,
            task_id = %step.task_id,
            message_id = %message.message_id,
        );
        async {
            if !self
                .steps
                .claim(&step, &message.message_id, message.receive_count)
            {
                // Redelivered while we still hold it (our lease ran out and came back): the
                // new receipt handle is the valid one; the running execution is adopted.
                if self
                    .leases
                    .renew_handle(&step.task_id, &message.receipt_handle)
                {
                    tracing::info!("redelivered while running here: adopted");
                } else {
                    tracing::warn!("redelivered while being settled here: releasing");
                    let _ = self
                        .queue
                        .release(&message.receipt_handle, Duration::from_secs(5))
                        .await;
                }
                return;
            }
            let signals = self.leases.hold(&step.task_id, &message.receipt_handle);
            let mut exited_at = None;
            let disposition = self.process(&step, &message, signals, &mut exited_at).await;
            self.settle(&step, &message, disposition).await;
            if let Some(exited_at) = exited_at {
                self.metrics
                    .exit_to_delete_seconds
                    .observe(exited_at.elapsed().as_secs_f64());
            }
        }
        .instrument(span)
        .await
    }

    /// Decides the fate of a decoded message, launching it when it should run.
    async fn process(
        &self,
        step: &StepRequest,
        message: &ReceivedMessage,
        signals: LeaseSignals,
        exited_at: &mut Option<Instant>,
    ) -> Disposition {
        let received_at = Instant::now();
        let task_id = step.task_id.as_str();
        let state = match self
            .ask_bridge("step_state", || self.bridge.step_state(step))
            .await
        {
            Ok(state) => state,
            Err(e) => return self.bridge_failure(e, message),
        };
        if let Some(skip) = self.skip_reason(step, &state).await {
            return skip;
        }
        let is_continuation = message
            .attributes
            .get(continuation::MARKER)
            .map(String::as_str)
            == Some("true");
        if is_continuation {
            if let Some(wait) = self.owner_may_adopt(message) {
                // Its owner still runs the step and may receive it: pass it on.
                return Disposition::Release {
                    delay: wait.min(Duration::from_secs(1)),
                    reason: "continuation_not_ours",
                    state: StepState::Released,
                };
            }
            tracing::warn!(
                "continuation's owner did not adopt it in time: relaunching the attempt"
            );
        }
        // Passing on a continuation raises its receive count without any failure.
        let attempt_limit = if is_continuation {
            self.config.max_attempts.saturating_mul(10)
        } else {
            self.config.max_attempts
        };
        if message.receive_count > attempt_limit {
            // A controller that keeps restarting under a long ECS task redelivers it again
            // and again; the task itself is fine and is adopted, not given up on.
            if self.launcher.has_execution_to_adopt(step).await {
                tracing::info!(
                    delivery = message.receive_count,
                    "past --max-attempts, but the attempt's ECS task is there: adopting it"
                );
            } else {
                return self.give_up(step, message).await;
            }
        }
        if message.receive_count > 1 {
            self.metrics
                .steps_relaunched
                .get_or_create(&[("launcher", launcher_name(self.launcher.kind()))])
                .inc();
            tracing::info!(
                delivery = message.receive_count,
                "redelivered attempt: relaunching it (an ECS task that is still there is adopted)"
            );
            let metadata = BTreeMap::from([
                ("delivery".to_owned(), message.receive_count.to_string()),
                ("controller".to_owned(), self.config.controller_id.clone()),
            ]);
            let note = format!(
                "dagster-taskiq-controller: relaunching attempt {} of {} (delivery {}): the previous holder of the message ended without an outcome (a surviving ECS task is adopted instead)",
                step.attempt, step.step_key, message.receive_count
            );
            if let Err(e) = self.bridge.report_event(step, &note, &metadata).await {
                tracing::warn!(%e, "could not record the relaunch in Dagster");
            }
        }

        let waiting_since = Instant::now();
        let stop = self.steps.stop_signal(task_id).unwrap_or_default();
        let ticket = Ticket {
            run_id: step.run_id.clone(),
            priority: step.priority,
            tags: step.tags.clone(),
        };
        // Held until the step has exited: the run slot is what the caps count.
        let _slot = tokio::select! {
            slot = self.admission.admit(ticket) => slot,
            _ = self.draining.cancelled() => return release_for_shutdown(),
            _ = signals.lost.cancelled() => return Disposition::Abandon,
            _ = stop.cancelled() => {
                // Its run ended while it waited: the next delivery is acknowledged unrun.
                return Disposition::Release {
                    delay: Duration::ZERO,
                    reason: "stopped_while_waiting",
                    state: StepState::Released,
                };
            }
            _ = sleep_until_deadline(self.config.waiting_limit.map(|limit| waiting_since + limit)) => {
                return self.requeue(message).await;
            }
        };
        self.steps.transition(task_id, StepState::Admitted);
        tokio::select! {
            _ = self.draining.cancelled() => return release_for_shutdown(),
            _ = self.admission.until_launch_allowed() => {}
        }
        self.metrics
            .admission_wait_seconds
            .observe(waiting_since.elapsed().as_secs_f64());
        if self.draining.is_cancelled() {
            return release_for_shutdown();
        }
        self.steps.transition(task_id, StepState::Launching);
        let kind = self.launcher.kind_for(step);
        let launcher_label = [("launcher", launcher_name(kind))];
        let mut running = match self.launcher.launch(step).await {
            Ok(running) => running,
            Err(LaunchError::Invalid { reason, detail }) => {
                return self.refuse_launch(step, message, reason, detail).await;
            }
            Err(e) => {
                tracing::warn!(%e, "launch failed");
                return Disposition::Release {
                    delay: self.config.backoff.delay(message.receive_count),
                    reason: match e {
                        LaunchError::Transient(_) => "launch_transient",
                        LaunchError::Permanent(_) | LaunchError::Invalid { .. } => "launch_failed",
                    },
                    state: StepState::Backoff,
                };
            }
        };
        let started = Instant::now();
        self.metrics
            .steps_launched
            .get_or_create(&launcher_label)
            .inc();
        self.metrics
            .launch_latency_seconds
            .observe((started - received_at).as_secs_f64());
        let locator = running.locator();
        tracing::info!(%locator, "step started");
        self.steps.update(task_id, |r| {
            r.locator = Some(locator.clone());
            r.launcher = Some(launcher_name(kind).to_owned());
            r.state = StepState::Running;
            r.history.push((StepState::Running, chrono::Utc::now()));
        });

        let timeout = step.timeout;
        // An execution that enforces the timeout itself counts from its own start (an ECS
        // container may start minutes after the launch); ours is then only a backstop.
        let backstop = if running.enforces_timeout() {
            TIMEOUT_BACKSTOP
        } else {
            Duration::ZERO
        };
        let deadline = timeout.map(|t| started + t + backstop);
        let mut cause = None;
        let exit = loop {
            let handoff_at = self.leases.handoff_deadline(task_id);
            let adopt_by = self
                .leases
                .adoption_deadline(task_id, self.config.adoption_window);
            tokio::select! {
                exit = running.wait() => break exit,
                _ = signals.lost.cancelled() => {
                    if running.survives_controller() {
                        // The new holder of the message adopts the execution.
                        tracing::warn!(%locator, "lease lost: leaving the step to the new holder");
                    } else {
                        tracing::warn!(%locator, "lease lost: fencing the step");
                        running.kill();
                        running.wait().await;
                    }
                    self.finish_metric(kind, "fenced");
                    return Disposition::Abandon;
                }
                _ = self.draining.cancelled(), if running.survives_controller() => {
                    tracing::info!(%locator, "shutting down: handing the running step over to another replica");
                    self.finish_metric(kind, "handed_off");
                    return release_for_shutdown();
                }
                _ = self.abort.cancelled() => {
                    if running.survives_controller() {
                        tracing::warn!(%locator, "shutdown: leaving the step running for another replica to adopt");
                        self.finish_metric(kind, "handed_off");
                        return release_for_shutdown();
                    }
                    tracing::warn!(%locator, "shutdown grace over: killing the step; its message goes back to the queue");
                    running.kill();
                    running.wait().await;
                    self.finish_metric(kind, "killed");
                    return release_for_shutdown();
                }
                _ = sleep_until_deadline(deadline) => {
                    let limit = timeout.expect("a deadline comes from a timeout");
                    tracing::warn!(%locator, ?limit, "step timed out: killing its process group");
                    // SIGKILL, not SIGTERM: Dagster turns SIGTERM into an interrupt failure
                    // that skips the RetryPolicy; the verdict below lets the policy decide.
                    running.kill();
                    cause = Some(timed_out_cause(limit));
                    break running.wait().await;
                }
                _ = stop.cancelled() => {
                    let reason = self.steps.stop_reason(task_id);
                    tracing::info!(%locator, ?reason, "stopping the step: SIGTERM, then SIGKILL after the grace");
                    running.terminate();
                    let exit = match tokio::time::timeout(self.config.stop_grace, running.wait()).await {
                        Ok(exit) => exit,
                        Err(_) => {
                            running.kill();
                            running.wait().await
                        }
                    };
                    match reason {
                        Some(StopReason::Operator { reason }) => {
                            cause = Some(format!("step stopped by an operator: {reason}"));
                        }
                        Some(StopReason::Executor) => {
                            cause = Some("step terminated at the executor's request".to_owned());
                        }
                        _ => {}
                    }
                    break exit;
                }
                _ = sleep_until_deadline(handoff_at) => self.hand_off(task_id, message).await,
                _ = sleep_until_deadline(adopt_by) => {
                    tracing::error!(%locator, "continuation not received back in time: fencing the step");
                    running.kill();
                    running.wait().await;
                    self.finish_metric(kind, "fenced");
                    return Disposition::Abandon;
                }
                _ = signals.renewed.notified() => {}
            }
        };
        if let (
            Some(limit),
            StepExit::Ecs {
                exit_code: Some(TIMED_OUT_EXIT),
                ..
            },
        ) = (timeout, exit)
        {
            if cause.is_none() && running.enforces_timeout() {
                tracing::warn!(%locator, ?limit, "step timed out: its task killed it");
                cause = Some(timed_out_cause(limit));
            }
        }
        let exited_at_now = Instant::now();
        *exited_at = Some(exited_at_now);
        let exited_at = exited_at_now;
        self.taskiq
            .keep_output(task_id, running.take_events(), exited_at - started);
        self.metrics
            .step_duration_seconds
            .observe((exited_at - started).as_secs_f64());
        self.steps.update(task_id, |r| {
            r.state = StepState::Exited;
            r.history.push((StepState::Exited, chrono::Utc::now()));
            r.stderr_tail = running.stderr_tail();
        });
        tracing::info!(exit = %exit.short(), elapsed = ?(exited_at - started), "step exited");
        self.conclude(step, message, running.as_ref(), exit, cause)
            .await
    }

    /// After the execution ended: read the outcome, or write a verdict.
    async fn conclude(
        &self,
        step: &StepRequest,
        message: &ReceivedMessage,
        running: &dyn RunningStep,
        exit: StepExit,
        cause: Option<String>,
    ) -> Disposition {
        let kind = self.launcher.kind_for(step);
        let state = match self
            .ask_bridge("step_state", || self.bridge.step_state(step))
            .await
        {
            Ok(state) => state,
            Err(e) => return self.bridge_failure(e, message),
        };
        if state.attempt_finished {
            let outcome = match state.last_terminal.as_deref() {
                Some("STEP_SUCCESS") => "succeeded",
                Some("STEP_UP_FOR_RETRY") => "up_for_retry",
                _ => "failed",
            };
            self.finish_metric(kind, outcome);
            tracing::info!(outcome, "step finished");
            return Disposition::Ack {
                outcome,
                state: StepState::Acked,
            };
        }
        if state.run_status.is_some_and(|s| s.stops_new_steps()) {
            self.finish_metric(kind, "run_ended");
            return Disposition::Ack {
                outcome: "run_ended",
                state: StepState::Acked,
            };
        }
        if exit.relaunch() {
            tracing::warn!(exit = %exit.describe(), "the execution never started: relaunching the attempt after a backoff");
            self.finish_metric(kind, "never_started");
            return Disposition::Release {
                delay: self.config.backoff.delay(message.receive_count),
                reason: "never_started",
                state: StepState::Backoff,
            };
        }
        let tail = running.stderr_tail();
        let outcome = if cause.as_deref().is_some_and(|c| c.contains("timed out")) {
            "timed_out"
        } else {
            "verdict"
        };
        let verdict = Verdict {
            verdict: cause.unwrap_or_else(|| exit.describe()),
            exit: exit.short(),
            stderr_tail: tail.join("\n"),
        };
        tracing::warn!(verdict = %verdict.verdict, "no outcome in Dagster: reporting a verdict");
        self.steps
            .update(&step.task_id, |r| r.verdict = Some(verdict.verdict.clone()));
        match self
            .ask_bridge("report_verdict", || {
                self.bridge.report_verdict(step, &verdict)
            })
            .await
        {
            Ok(_) => {
                self.steps.transition(&step.task_id, StepState::Reported);
                self.finish_metric(kind, outcome);
                Disposition::Ack {
                    outcome: "verdict",
                    state: StepState::Acked,
                }
            }
            Err(e) => self.bridge_failure(e, message),
        }
    }

    /// Before SQS's visibility cap: send a continuation of the message (same body, marked
    /// with this controller as owner), then delete the old one. The intake adopts the
    /// continuation when it comes back; other replicas pass it on (see `owner_may_adopt`).
    async fn hand_off(&self, task_id: &str, message: &ReceivedMessage) {
        let Some(handle) = self.leases.receipt_handle(task_id) else {
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
                self.config.controller_id.clone(),
            ),
            (continuation::HANDOFF_AT_MS.to_owned(), now_ms.to_string()),
            (
                continuation::CONTINUES.to_owned(),
                message.message_id.clone(),
            ),
        ]);
        // The same body: an S3 pointer stays one.
        attributes.extend(crate::results::extended_marker(message));
        match self.queue.send(&message.body, &attributes).await {
            Ok(continuation_id) => {
                // Stop extending the old handle before deleting it.
                self.leases.mark_handed_off(task_id);
                if let Err(e) = self.queue.ack(&handle).await {
                    // It comes back later and is adopted like any redelivery.
                    tracing::warn!(%e, "could not delete the handed-off message");
                }
                self.metrics
                    .lease_extensions
                    .get_or_create(&[("result", "handed_off")])
                    .inc();
                tracing::info!(
                    continuation_id,
                    "visibility cap near: lease handed off to a continuation"
                );
            }
            Err(e) => {
                self.count_queue_error("SendMessage", &e);
                tracing::warn!(%e, "hand-off failed; retrying shortly");
                tokio::time::sleep(self.leases.heartbeat_interval()).await;
            }
        }
    }

    /// A message that waited too long for a run slot: a copy goes back to the queue for any
    /// replica with room, and this one is deleted. The copy carries the deliveries so far, so
    /// that waiting never uses up the message's attempts (SQS's receive count restarts).
    async fn requeue(&self, message: &ReceivedMessage) -> Disposition {
        let mut attributes = message.attributes.clone();
        attributes.insert(
            continuation::PRIOR_DELIVERIES.to_owned(),
            message.receive_count.saturating_sub(1).to_string(),
        );
        match self.queue.send(&message.body, &attributes).await {
            Ok(copy_id) => {
                tracing::info!(
                    copy_id,
                    "waited too long for a run slot: requeued for other replicas"
                );
                Disposition::Ack {
                    outcome: "requeued",
                    state: StepState::Released,
                }
            }
            Err(e) => {
                self.count_queue_error("SendMessage", &e);
                tracing::warn!(%e, "could not requeue; releasing instead");
                Disposition::Release {
                    delay: Duration::ZERO,
                    reason: "waited_too_long",
                    state: StepState::Released,
                }
            }
        }
    }

    /// For a continuation owned by another controller: how long its owner may still adopt
    /// it. `None` when the owner had its chance (it fences its step by then) or is us.
    fn owner_may_adopt(&self, message: &ReceivedMessage) -> Option<Duration> {
        let owner = message.attributes.get(continuation::OWNER)?;
        if *owner == self.config.controller_id {
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
        let fenced_by = handoff + self.config.adoption_window + CLOCK_MARGIN;
        fenced_by.duration_since(std::time::SystemTime::now()).ok()
    }

    /// A message that must not run: its attempt already finished, or its run is over.
    async fn skip_reason(
        &self,
        step: &StepRequest,
        state: &DagsterStepState,
    ) -> Option<Disposition> {
        let Some(run_status) = state.run_status else {
            return Some(Disposition::DeadLetter {
                reason: "unknown_run",
                detail: format!(
                    "run {} does not exist in the Dagster instance named by the message",
                    step.run_id
                ),
                error_class: "poison",
            });
        };
        if state.attempt_finished {
            tracing::info!("attempt already finished in Dagster: acknowledging without running");
            return Some(Disposition::Ack {
                outcome: "already_finished",
                state: StepState::Skipped,
            });
        }
        if run_status.stops_new_steps() {
            tracing::info!(?run_status, "run is over: acknowledging without running");
            // As a verdict, so that a run worker still waiting on this step (a cancel that did
            // not interrupt it) sees it fail instead of waiting forever.
            let verdict = Verdict {
                verdict: format!(
                    "dagster-taskiq-controller did not run this step: the run is {}",
                    format!("{run_status:?}").to_uppercase()
                ),
                exit: "not run".into(),
                stderr_tail: String::new(),
            };
            if let Err(e) = self.bridge.report_verdict(step, &verdict).await {
                tracing::warn!(%e, "could not record the skip in Dagster");
            }
            return Some(Disposition::Ack {
                outcome: "run_ended",
                state: StepState::Skipped,
            });
        }
        None
    }

    /// The step's launch settings can never work: tell Dagster (so the run does not wait for
    /// it), then dead-letter the message with the reason.
    async fn refuse_launch(
        &self,
        step: &StepRequest,
        message: &ReceivedMessage,
        reason: &'static str,
        detail: String,
    ) -> Disposition {
        tracing::error!(reason, %detail, "invalid launch settings");
        let verdict = Verdict {
            verdict: format!("dagster-taskiq-controller cannot launch the step: {detail}"),
            exit: "not run".into(),
            stderr_tail: String::new(),
        };
        match self
            .retrying("report_verdict", || {
                self.bridge.report_verdict(step, &verdict)
            })
            .await
        {
            Ok(_) => Disposition::DeadLetter {
                reason,
                detail,
                error_class: "poison",
            },
            Err(e) => self.bridge_failure(e, message),
        }
    }

    /// Too many deliveries without an outcome: tell Dagster, then dead-letter.
    async fn give_up(&self, step: &StepRequest, message: &ReceivedMessage) -> Disposition {
        let detail = format!(
            "delivered {} times (limit {}) without reaching an outcome",
            message.receive_count, self.config.max_attempts
        );
        tracing::error!(%detail, "giving up on the attempt");
        let verdict = Verdict {
            verdict: format!("dagster-taskiq-controller gave up: {detail}"),
            exit: "not run".into(),
            stderr_tail: String::new(),
        };
        let detail = match self
            .ask_bridge("report_verdict", || {
                self.bridge.report_verdict(step, &verdict)
            })
            .await
        {
            Ok(_) => detail,
            // Bounded retries matter more than the event: the dead letter keeps the message.
            Err(e) => format!("{detail}; the verdict could not be written to Dagster: {e}"),
        };
        Disposition::DeadLetter {
            reason: "attempts_exhausted",
            detail,
            error_class: "transient",
        }
    }

    /// The bridge could not answer: give the message back for later, never lose it; past
    /// the delivery limit, dead-letter it with the error.
    fn bridge_failure(&self, e: BridgeError, message: &ReceivedMessage) -> Disposition {
        if !e.is_transient() {
            return Disposition::DeadLetter {
                reason: "bridge_rejected",
                detail: e.to_string(),
                error_class: "poison",
            };
        }
        if message.receive_count >= self.config.max_attempts {
            return Disposition::DeadLetter {
                reason: "attempts_exhausted",
                detail: format!(
                    "delivered {} times (limit {}); Dagster kept failing: {e}",
                    message.receive_count, self.config.max_attempts
                ),
                error_class: "transient",
            };
        }
        tracing::warn!(%e, "Dagster bridge failing: releasing the message for later");
        Disposition::Release {
            delay: self.config.backoff.delay(message.receive_count),
            reason: "bridge_unavailable",
            state: StepState::Backoff,
        }
    }

    /// Calls the bridge. While the sidecar itself is down or hung the message is kept (its
    /// lease goes on being extended) and the call waits for the sidecar to come back, so an
    /// outage costs no delivery attempt; errors Dagster raises for this very request are
    /// retried within the call budget and then returned.
    async fn ask_bridge<T, F, Fut>(
        &self,
        operation: &'static str,
        mut call: F,
    ) -> Result<T, BridgeError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BridgeError>>,
    {
        let mut outage = 0;
        loop {
            match self.retrying(operation, &mut call).await {
                Err(e @ (BridgeError::Unavailable(_) | BridgeError::Timeout(_)))
                    if !self.draining.is_cancelled() =>
                {
                    outage += 1;
                    let pause = self
                        .config
                        .backoff
                        .delay(outage)
                        .clamp(Duration::from_millis(100), Duration::from_secs(30));
                    tracing::warn!(%e, ?pause, operation, "Dagster bridge unavailable; holding the message and waiting");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = self.draining.cancelled() => {}
                    }
                }
                other => return other,
            }
        }
    }

    /// dagster-taskiq's executor waits for a taskiq result: write it before the message is
    /// deleted; when it cannot be written yet, keep the message (released for later).
    async fn write_taskiq_result(
        &self,
        step: &StepRequest,
        message: &ReceivedMessage,
        disposition: Disposition,
    ) -> Disposition {
        if !self.taskiq.results_enabled() {
            return disposition;
        }
        let verdict = self.steps.get(&step.task_id).and_then(|r| r.verdict);
        match self
            .taskiq
            .write_result(step, &disposition, verdict.as_deref())
            .await
        {
            Ok(()) => disposition,
            Err(e) => {
                tracing::warn!(%e, "taskiq result not written: releasing the message for later");
                Disposition::Release {
                    delay: self.config.backoff.delay(message.receive_count),
                    reason: "result_unwritten",
                    state: StepState::Backoff,
                }
            }
        }
    }

    /// An extended payload that S3 cannot serve now: release for later; past the delivery
    /// limit, dead-letter with the error.
    fn payload_unavailable(&self, e: StoreError, message: &ReceivedMessage) -> Disposition {
        if message.receive_count >= self.config.max_attempts {
            return Disposition::DeadLetter {
                reason: "payload_unavailable",
                detail: format!(
                    "delivered {} times (limit {}); the extended payload stayed unreadable: {e}",
                    message.receive_count, self.config.max_attempts
                ),
                error_class: "transient",
            };
        }
        tracing::warn!(message_id = %message.message_id, %e, "extended payload unavailable: releasing the message for later");
        Disposition::Release {
            delay: self.config.backoff.delay(message.receive_count),
            reason: "payload_unavailable",
            state: StepState::Backoff,
        }
    }

    /// Carries out a disposition for a claimed step.
    async fn settle(
        &self,
        step: &StepRequest,
        message: &ReceivedMessage,
        disposition: Disposition,
    ) {
        let task_id = step.task_id.as_str();
        let disposition = self.write_taskiq_result(step, message, disposition).await;
        // A redelivery may have renewed the handle meanwhile.
        let mut current = message.clone();
        if let Some(handle) = self.leases.receipt_handle(task_id) {
            current.receipt_handle = handle;
        }
        let (final_state, outcome) = match &disposition {
            Disposition::Ack { state, outcome } => (*state, *outcome),
            Disposition::Release { state, reason, .. } => (*state, *reason),
            Disposition::DeadLetter { reason, .. } => (StepState::DeadLettered, *reason),
            Disposition::Abandon => (StepState::Fenced, "lease_lost"),
        };
        self.steps
            .update(task_id, |r| r.outcome = Some(outcome.to_owned()));
        let settle_started = Instant::now();
        let outcome = match &disposition {
            Disposition::Ack { outcome, .. } => *outcome,
            Disposition::Release { reason, .. } => reason,
            Disposition::DeadLetter { reason, .. } => reason,
            Disposition::Abandon => "lease_lost",
        };
        // One line per step attempt with what happened to it.
        tracing::info!(state = final_state.as_str(), outcome, "message settled");
        self.settle_unclaimed(&current, disposition).await;
        self.metrics
            .settle_latency_seconds
            .observe(settle_started.elapsed().as_secs_f64());
        self.leases.drop_lease(task_id);
        self.steps.transition(task_id, final_state);
    }

    /// Carries out a disposition on the queue, retrying transient failures within budget.
    async fn settle_unclaimed(&self, message: &ReceivedMessage, disposition: Disposition) {
        let handle = message.receipt_handle.as_str();
        let result = match &disposition {
            Disposition::Ack { outcome, .. } => {
                let r = self
                    .retrying("DeleteMessage", || self.queue.ack(handle))
                    .await;
                if r.is_ok() {
                    self.metrics
                        .messages_acked
                        .get_or_create(&[("outcome", outcome)])
                        .inc();
                }
                r
            }
            Disposition::Release { delay, reason, .. } => {
                let r = self
                    .retrying("ChangeMessageVisibility", || {
                        self.queue.release(handle, *delay)
                    })
                    .await;
                if r.is_ok() {
                    tracing::info!(?delay, reason, "message released");
                    self.metrics
                        .messages_released
                        .get_or_create(&[("reason", reason)])
                        .inc();
                }
                r
            }
            Disposition::DeadLetter {
                reason,
                detail,
                error_class,
            } => {
                let dead_letter = DeadLetter {
                    reason: reason.to_string(),
                    detail: detail.clone(),
                    error_class,
                    controller_id: self.config.controller_id.clone(),
                };
                let r = self
                    .retrying("SendMessage", || {
                        self.queue.dead_letter(message, &dead_letter)
                    })
                    .await;
                if r.is_ok() {
                    tracing::warn!(reason, detail, "message dead-lettered");
                    self.metrics
                        .messages_dead_lettered
                        .get_or_create(&[("reason", reason)])
                        .inc();
                }
                r
            }
            Disposition::Abandon => Ok(()),
        };
        if let Err(e) = result {
            // Nothing is lost: the message becomes visible again when its visibility runs
            // out, and the next delivery finds the durable outcome or relaunches.
            tracing::error!(%e, ?disposition, "could not settle the message; it will be redelivered");
        }
    }

    /// Retries a call while its errors are transient, within the configured budget.
    async fn retrying<T, E, F, Fut>(&self, operation: &'static str, mut call: F) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: RetryableError,
    {
        let deadline = Instant::now() + self.config.call_retry_budget;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match call().await {
                Ok(value) => return Ok(value),
                Err(e) => {
                    e.count(&self.metrics, operation);
                    let pause = self
                        .config
                        .backoff
                        .delay(attempt)
                        .max(Duration::from_millis(50));
                    if !e.is_transient() || Instant::now() + pause > deadline {
                        return Err(e);
                    }
                    tracing::debug!(operation, attempt, ?pause, "transient failure; retrying");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    fn finish_metric(&self, kind: envelope::LauncherKind, outcome: &'static str) {
        self.metrics
            .steps_finished
            .get_or_create(&[("launcher", launcher_name(kind)), ("outcome", outcome)])
            .inc();
    }

    fn count_queue_error(&self, operation: &'static str, e: &QueueError) {
        self.metrics
            .queue_errors
            .get_or_create(&[("operation", operation), ("kind", e.kind())])
            .inc();
    }
}

async fn sleep_until_deadline(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn release_for_shutdown() -> Disposition {
    Disposition::Release {
        delay: Duration::ZERO,
        reason: "shutdown",
        state: StepState::Released,
    }
}

fn launcher_name(kind: envelope::LauncherKind) -> &'static str {
    match kind {
        envelope::LauncherKind::Process => "process",
        envelope::LauncherKind::Ecs => "ecs",
    }
}

/// Errors the retry helper understands.
pub trait RetryableError: std::fmt::Display {
    fn is_transient(&self) -> bool;
    fn count(&self, metrics: &Metrics, operation: &'static str);
}

impl RetryableError for QueueError {
    fn is_transient(&self) -> bool {
        QueueError::is_transient(self)
    }
    fn count(&self, metrics: &Metrics, operation: &'static str) {
        metrics
            .queue_errors
            .get_or_create(&[("operation", operation), ("kind", self.kind())])
            .inc();
    }
}

impl RetryableError for BridgeError {
    fn is_transient(&self) -> bool {
        BridgeError::is_transient(self)
    }
    fn count(&self, _metrics: &Metrics, _operation: &'static str) {
        // Counted by the bridge client per method.
    }
}
