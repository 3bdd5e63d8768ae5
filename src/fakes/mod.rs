//! In-memory implementations of the boundaries, for unit tests of the state machine and for
//! benchmarks of the controller's own overhead. Never the only test of a feature: the
//! integration tests use moto, real processes and real Dagster.
//!
//! Every fake lives here, behind `#[cfg(any(test, feature = "testing"))]`: the queue, the
//! launcher, the bridge and the object store in this file, the ECS API (and its S3 offload)
//! in [`ecs`].

pub mod ecs;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::watch;

use crate::dagster::{
    BridgeError, BridgePush, Claim, ClaimAnswer, ClaimBid, DagsterBridge, HeldClaim, RunStatus,
    StepState, StoredStep, Verdict, VerdictAck,
};
use crate::envelope::{AttemptId, LauncherKind, StepRequest};
use crate::launcher::{LaunchError, Launcher, RunningStep, StepExit};
use crate::queue::{DeadLetter, ExtendResult, QueueError, ReceivedMessage, Resend, WorkQueue};
use crate::taskiq::{ObjectStore, StoreError};

/// What happened to a message in the fake queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueEvent {
    Acked(String),
    Released(String, Duration),
    DeadLettered(String, String),
    Sent(String),
}

#[derive(Default)]
struct QueueInner {
    visible: VecDeque<ReceivedMessage>,
    /// Released with a delay: visible again from that time on, as on SQS.
    delayed: Vec<(tokio::time::Instant, ReceivedMessage)>,
    /// receipt handle → message, for messages in flight.
    in_flight: HashMap<String, ReceivedMessage>,
    receive_counts: HashMap<String, u32>,
    events: Vec<QueueEvent>,
    /// Handles whose extension reports a lost lease.
    lost_handles: Vec<String>,
    extend_calls: u64,
    /// Messages a receive returns beyond the `max` asked for (a misbehaving queue).
    overdeliver: usize,
    /// (message id, detail) of every dead letter.
    dead_letter_details: Vec<(String, String)>,
    /// While true, sent messages are recorded but never delivered (lost, or purged).
    lose_sends: bool,
}

/// A work queue in memory. Receives return at once (no long poll) when empty after a
/// short wait, so tests stay fast.
#[derive(Default, Clone)]
pub struct FakeQueue {
    inner: Arc<Mutex<QueueInner>>,
    next_handle: Arc<AtomicU64>,
    changed: Arc<tokio::sync::Notify>,
}

impl FakeQueue {
    /// Makes every receive return up to `extra` messages more than asked for.
    pub fn overdeliver(&self, extra: usize) {
        self.inner.lock().overdeliver = extra;
    }

    pub fn push(&self, message_id: &str, body: &str) {
        self.push_with_attributes(message_id, body, &[]);
    }

    /// Pushes a message with string message attributes (e.g. `s3_extended_message`).
    pub fn push_with_attributes(&self, message_id: &str, body: &str, attributes: &[(&str, &str)]) {
        let mut inner = self.inner.lock();
        inner.visible.push_back(ReceivedMessage {
            message_id: message_id.to_owned(),
            receipt_handle: String::new(),
            body: body.to_owned(),
            receive_count: 0,
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            sent_at_ms: Some(chrono::Utc::now().timestamp_millis()),
        });
        drop(inner);
        self.changed.notify_waiters();
    }

    pub fn events(&self) -> Vec<QueueEvent> {
        self.inner.lock().events.clone()
    }

    /// (message id, detail) of every dead letter so far.
    pub fn dead_letter_details(&self) -> Vec<(String, String)> {
        self.inner.lock().dead_letter_details.clone()
    }

    /// From now on, messages the controller sends are recorded but never delivered, as if
    /// someone deleted them or purged the queue (true), or delivered again (false).
    pub fn lose_sends(&self, lose: bool) {
        self.inner.lock().lose_sends = lose;
    }

    pub fn extend_calls(&self) -> u64 {
        self.inner.lock().extend_calls
    }

    /// How many times this message was received.
    pub fn receive_count(&self, message_id: &str) -> u32 {
        self.inner
            .lock()
            .receive_counts
            .get(message_id)
            .copied()
            .unwrap_or(0)
    }

    /// Makes the next extension of this message's current handle report a lost lease.
    pub fn lose_lease(&self, message_id: &str) {
        let mut inner = self.inner.lock();
        let handles: Vec<String> = inner
            .in_flight
            .iter()
            .filter(|(_, m)| m.message_id == message_id)
            .map(|(h, _)| h.clone())
            .collect();
        inner.lost_handles.extend(handles);
    }

    /// Waits until `predicate` holds for the recorded events.
    /// Waits until `predicate` holds for the events so far; panics with them after two days
    /// of (usually paused, so virtual) time, so a condition that never comes fails the test.
    pub async fn wait_for(&self, predicate: impl Fn(&[QueueEvent]) -> bool) {
        let waiting = async {
            loop {
                let notified = self.changed.notified();
                if predicate(&self.events()) {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(2 * 24 * 3600), waiting)
            .await
            .is_err()
        {
            panic!(
                "the awaited queue events never came; events: {:?}",
                self.events()
            );
        }
    }

    fn record(&self, event: QueueEvent) {
        self.inner.lock().events.push(event);
        self.changed.notify_waiters();
    }

    fn take(&self, handle: &str) -> Result<ReceivedMessage, QueueError> {
        self.inner
            .lock()
            .in_flight
            .remove(handle)
            .ok_or(QueueError::ReceiptHandleInvalid { operation: "fake" })
    }
}

#[async_trait]
impl WorkQueue for FakeQueue {
    async fn receive(
        &self,
        max: usize,
        wait: Duration,
        _visibility: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            let next_due;
            {
                let mut inner = self.inner.lock();
                let now = tokio::time::Instant::now();
                let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut inner.delayed)
                    .into_iter()
                    .partition(|(at, _)| *at <= now);
                inner.delayed = later;
                inner
                    .visible
                    .extend(due.into_iter().map(|(_, message)| message));
                next_due = inner.delayed.iter().map(|(at, _)| *at).min();
                if !inner.visible.is_empty() {
                    let mut out = Vec::new();
                    while out.len() < max + inner.overdeliver {
                        let Some(mut message) = inner.visible.pop_front() else {
                            break;
                        };
                        let count = inner
                            .receive_counts
                            .entry(message.message_id.clone())
                            .or_insert(0);
                        *count += 1;
                        message.receive_count = *count;
                        message.receipt_handle =
                            format!("h{}", self.next_handle.fetch_add(1, Ordering::Relaxed));
                        inner
                            .in_flight
                            .insert(message.receipt_handle.clone(), message.clone());
                        out.push(message);
                    }
                    return Ok(out);
                }
            }
            let wake = next_due.map_or(deadline, |due| due.min(deadline));
            if tokio::time::timeout_at(wake, notified).await.is_err() && wake == deadline {
                return Ok(Vec::new());
            }
        }
    }

    async fn extend(
        &self,
        receipt_handles: &[String],
        _visibility: Duration,
    ) -> Result<Vec<ExtendResult>, QueueError> {
        let mut inner = self.inner.lock();
        inner.extend_calls += receipt_handles.len().div_ceil(10) as u64;
        Ok(receipt_handles
            .iter()
            .map(|h| {
                if inner.lost_handles.contains(h) {
                    ExtendResult::Lost("ReceiptHandleIsInvalid".into())
                } else {
                    ExtendResult::Extended
                }
            })
            .collect())
    }

    async fn release(&self, receipt_handle: &str, delay: Duration) -> Result<(), QueueError> {
        let message = self.take(receipt_handle)?;
        self.record(QueueEvent::Released(message.message_id.clone(), delay));
        let mut inner = self.inner.lock();
        if delay.is_zero() {
            inner.visible.push_back(message);
        } else {
            inner
                .delayed
                .push((tokio::time::Instant::now() + delay, message));
        }
        drop(inner);
        self.changed.notify_waiters();
        Ok(())
    }

    async fn ack(&self, receipt_handle: &str) -> Result<(), QueueError> {
        // A real delete is a network call: other tasks run meanwhile.
        tokio::task::yield_now().await;
        let message = self.take(receipt_handle)?;
        self.record(QueueEvent::Acked(message.message_id));
        Ok(())
    }

    async fn send(&self, resend: &Resend<'_>) -> Result<String, QueueError> {
        let message_id = format!("sent{}", self.next_handle.fetch_add(1, Ordering::Relaxed));
        let mut inner = self.inner.lock();
        if !inner.lose_sends {
            inner.visible.push_back(ReceivedMessage {
                message_id: message_id.clone(),
                receipt_handle: String::new(),
                body: resend.of.body.clone(),
                receive_count: 0,
                attributes: resend.attributes.clone(),
                sent_at_ms: Some(chrono::Utc::now().timestamp_millis()),
            });
        }
        inner.events.push(QueueEvent::Sent(message_id.clone()));
        drop(inner);
        self.changed.notify_waiters();
        Ok(message_id)
    }

    async fn dead_letter(
        &self,
        message: &ReceivedMessage,
        dead_letter: &DeadLetter,
    ) -> Result<(), QueueError> {
        self.take(&message.receipt_handle)?;
        self.inner
            .lock()
            .dead_letter_details
            .push((message.message_id.clone(), dead_letter.detail.clone()));
        self.record(QueueEvent::DeadLettered(
            message.message_id.clone(),
            dead_letter.reason.clone(),
        ));
        Ok(())
    }
}

/// How a fake step ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeOutcome {
    /// Exits 0 and the fake bridge records a terminal event for the attempt.
    Succeed,
    /// Exits with this status and no terminal event.
    Crash(StepExit),
    /// Runs until stopped; SIGTERM makes it write an interrupt failure, like Dagster.
    Hang,
    /// Runs until SIGKILL; ignores SIGTERM.
    HangIgnoringTerm,
}

/// Signals a fake step has received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FakeSignal {
    None,
    Term,
    Kill,
}

/// (task id, code location) of a launch.
pub type LaunchedLocation = (String, Option<String>);

/// A launcher whose steps end as told, after `duration`.
#[derive(Clone)]
pub struct FakeLauncher {
    pub bridge: FakeBridge,
    pub duration: Duration,
    outcomes: Arc<Mutex<HashMap<String, FakeOutcome>>>,
    launches: Arc<Mutex<Vec<String>>>,
    /// (task id, code location) of each launch.
    locations: Arc<Mutex<Vec<LaunchedLocation>>>,
    /// step key → (reason, detail) of a `LaunchError::Invalid`.
    refusals: Arc<Mutex<HashMap<String, (&'static str, String)>>>,
    /// Steps outlive the controller (like ECS tasks).
    survives: Arc<std::sync::atomic::AtomicBool>,
    kills: Arc<Mutex<Vec<String>>>,
}

impl FakeLauncher {
    pub fn new(bridge: FakeBridge, duration: Duration) -> Self {
        Self {
            bridge,
            duration,
            outcomes: Arc::default(),
            launches: Arc::default(),
            locations: Arc::default(),
            refusals: Arc::default(),
            survives: Arc::default(),
            kills: Arc::default(),
        }
    }

    /// Launches of this step key fail as invalid launch settings.
    pub fn refuse(&self, step_key: &str, reason: &'static str, detail: &str) {
        self.refusals
            .lock()
            .insert(step_key.to_owned(), (reason, detail.to_owned()));
    }

    /// Makes the steps outlive the controller, like ECS tasks.
    pub fn survive_controller(&self, survives: bool) {
        self.survives.store(survives, Ordering::SeqCst);
    }

    /// Task ids of the steps that were killed or terminated.
    pub fn kills(&self) -> Vec<String> {
        self.kills.lock().clone()
    }

    /// Sets how the steps with this step key end (default: succeed).
    pub fn outcome(&self, step_key: &str, outcome: FakeOutcome) {
        self.outcomes.lock().insert(step_key.to_owned(), outcome);
    }

    /// How many launches so far (cheap, for benchmarks polling it).
    pub fn launch_count(&self) -> usize {
        self.launches.lock().len()
    }

    /// Task ids launched, in order.
    pub fn launches(&self) -> Vec<String> {
        self.launches.lock().clone()
    }

    /// (task id, code location) of each launch, in order.
    pub fn locations(&self) -> Vec<LaunchedLocation> {
        self.locations.lock().clone()
    }
}

#[async_trait]
impl Launcher for FakeLauncher {
    fn kind(&self) -> LauncherKind {
        LauncherKind::Process
    }

    /// Like ECS: an attempt launched before, by a launcher whose steps outlive controllers.
    async fn has_execution_to_adopt(&self, step: &StepRequest) -> bool {
        self.survives.load(Ordering::SeqCst) && self.launches.lock().contains(&step.task_id)
    }

    async fn launch(&self, step: &StepRequest) -> Result<Box<dyn RunningStep>, LaunchError> {
        if let Some((reason, detail)) = self.refusals.lock().get(&step.step_key) {
            return Err(LaunchError::Invalid {
                reason,
                detail: detail.clone(),
            });
        }
        self.launches.lock().push(step.task_id.clone());
        self.locations
            .lock()
            .push((step.task_id.clone(), step.location.clone()));
        let outcome = self
            .outcomes
            .lock()
            .get(&step.step_key)
            .copied()
            .unwrap_or(FakeOutcome::Succeed);
        let (kill_tx, kill_rx) = watch::channel(FakeSignal::None);
        Ok(Box::new(FakeStep {
            step: step.clone(),
            outcome,
            duration: self.duration,
            bridge: self.bridge.clone(),
            kill_tx,
            kill_rx,
            survives: self.survives.load(Ordering::SeqCst),
            kills: self.kills.clone(),
        }))
    }
}

struct FakeStep {
    step: StepRequest,
    outcome: FakeOutcome,
    duration: Duration,
    bridge: FakeBridge,
    kill_tx: watch::Sender<FakeSignal>,
    kill_rx: watch::Receiver<FakeSignal>,
    survives: bool,
    kills: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl RunningStep for FakeStep {
    fn locator(&self) -> String {
        format!("fake {}", self.step.task_id)
    }

    fn pid(&self) -> Option<u32> {
        None
    }

    async fn wait(&mut self) -> StepExit {
        let outcome = self.outcome;
        let finished = async {
            match outcome {
                FakeOutcome::Hang | FakeOutcome::HangIgnoringTerm => {
                    std::future::pending::<()>().await
                }
                _ => tokio::time::sleep(self.duration).await,
            }
        };
        let mut signals = self.kill_rx.clone();
        let stopped = signals.wait_for(|signal| match signal {
            FakeSignal::Kill => true,
            FakeSignal::Term => outcome != FakeOutcome::HangIgnoringTerm,
            FakeSignal::None => false,
        });
        tokio::select! {
            signal = stopped => match *signal.expect("sender alive") {
                FakeSignal::Kill => StepExit::Signal(libc::SIGKILL),
                _ => {
                    // Dagster's interrupt handling writes STEP_FAILURE and exits 1.
                    self.bridge.finish(&self.step, "STEP_FAILURE");
                    StepExit::Code(1)
                }
            },
            _ = finished => match outcome {
                FakeOutcome::Succeed => {
                    self.bridge.finish(&self.step, "STEP_SUCCESS");
                    StepExit::Code(0)
                }
                FakeOutcome::Crash(exit) => exit,
                FakeOutcome::Hang | FakeOutcome::HangIgnoringTerm => unreachable!(),
            },
        }
    }

    fn terminate(&mut self) {
        if *self.kill_tx.borrow() == FakeSignal::None {
            let _ = self.kill_tx.send(FakeSignal::Term);
        }
    }

    fn kill(&mut self) {
        self.kills.lock().push(self.step.task_id.clone());
        let _ = self.kill_tx.send(FakeSignal::Kill);
    }

    fn stderr_tail(&self) -> Vec<String> {
        vec!["fake stderr".into()]
    }

    /// A successful step printed one serialized event (when its events are collected).
    fn take_events(&mut self) -> Option<crate::launcher::EventLines> {
        let mut events = crate::launcher::EventLines::default();
        if self.step.collect_events
            && self.step.print_serialized_events
            && self.outcome == FakeOutcome::Succeed
        {
            events.push(fake_event_line(&self.step.step_key, "STEP_SUCCESS"));
        }
        Some(events)
    }

    fn survives_controller(&self) -> bool {
        self.survives
    }
}

#[derive(Default)]
struct BridgeInner {
    run_statuses: HashMap<String, RunStatus>,
    /// (run_id, step_key) → terminal event types in order.
    terminal: HashMap<(String, String), Vec<String>>,
    verdicts: Vec<(String, String)>,
    events: Vec<(String, String)>,
    calls: u64,
    /// While true, every call fails as if the sidecar were down.
    down: bool,
    /// While true, every call fails as rejected.
    rejecting: bool,
    /// Runs that do not exist.
    unknown_runs: std::collections::HashSet<String>,
    /// Durable claims by (run id, step key, attempt), as the sidecar keys them.
    claims: HashMap<(String, String, u32), Claim>,
    /// While true, every call that reads or writes the instance raises, as when Dagster's
    /// storage is unreachable; a plain ping still answers.
    storage_down: bool,
    /// Step keys whose `step_state` raises although the storage answers.
    failing_steps: Vec<String>,
    /// The size of each `step_states` request.
    step_state_batches: Vec<usize>,
    probes: u64,
    /// The steps as their runs stored them, by (run id, step key); none: not checked.
    stored_steps: HashMap<(String, String), StoredStep>,
}

/// A Dagster instance in memory: runs default to STARTED.
#[derive(Clone)]
pub struct FakeBridge {
    inner: Arc<Mutex<BridgeInner>>,
    pushes: tokio::sync::broadcast::Sender<BridgePush>,
}

impl Default for FakeBridge {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            pushes: tokio::sync::broadcast::channel(64).0,
        }
    }
}

impl FakeBridge {
    /// Sends a notice as the sidecar does for a watched run.
    pub fn push(&self, push: BridgePush) {
        let _ = self.pushes.send(push);
    }

    pub fn set_run_status(&self, run_id: &str, status: RunStatus) {
        self.inner
            .lock()
            .run_statuses
            .insert(run_id.to_owned(), status);
    }

    /// Records a terminal event for the step's next attempt.
    pub fn finish(&self, step: &StepRequest, event: &str) {
        self.inner
            .lock()
            .terminal
            .entry((step.run_id.clone(), step.step_key.clone()))
            .or_default()
            .push(event.to_owned());
    }

    /// (task_id, verdict) pairs written.
    pub fn verdicts(&self) -> Vec<(String, String)> {
        self.inner.lock().verdicts.clone()
    }

    /// (task_id, message) informational events written.
    pub fn events(&self) -> Vec<(String, String)> {
        self.inner.lock().events.clone()
    }

    pub fn calls(&self) -> u64 {
        self.inner.lock().calls
    }

    /// The durable claim of an attempt, if any.
    pub fn claim(&self, run_id: &str, step_key: &str, attempt: u32) -> Option<Claim> {
        let key = (run_id.to_owned(), step_key.to_owned(), attempt);
        self.inner.lock().claims.get(&key).cloned()
    }

    /// Puts a claim in place as another controller would.
    pub fn put_claim(&self, run_id: &str, step_key: &str, attempt: u32, claim: Claim) {
        let key = (run_id.to_owned(), step_key.to_owned(), attempt);
        self.inner.lock().claims.insert(key, claim);
    }

    /// Makes every call fail as unavailable (true) or work again (false).
    pub fn set_down(&self, down: bool) {
        self.inner.lock().down = down;
    }

    /// Makes a run unknown to the instance, as if it never existed.
    pub fn forget_run(&self, run_id: &str) {
        self.inner.lock().unknown_runs.insert(run_id.to_owned());
    }

    /// Stores a step of a run with these op tags, as its execution plan would.
    pub fn store_step(&self, run_id: &str, step_key: &str, job_name: &str, tags: &[(&str, &str)]) {
        self.inner.lock().stored_steps.insert(
            (run_id.to_owned(), step_key.to_owned()),
            StoredStep {
                found: true,
                tags: tags
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                job_name: job_name.to_owned(),
                location: None,
                ecs: Default::default(),
            },
        );
    }

    /// Gives a stored step's run a code location, as a run launched from a workspace has.
    pub fn set_location(&self, run_id: &str, step_key: &str, location: &str) {
        if let Some(stored) = self
            .inner
            .lock()
            .stored_steps
            .get_mut(&(run_id.to_owned(), step_key.to_owned()))
        {
            stored.location = Some(location.to_owned());
        }
    }

    /// Makes every call fail as rejected, as a bridge does for an instance ref it cannot
    /// open (true), or work again (false).
    pub fn set_rejecting(&self, rejecting: bool) {
        self.inner.lock().rejecting = rejecting;
    }

    /// Makes every call that touches the instance raise (true), as when Dagster's database
    /// is unreachable, or work again (false).
    pub fn set_storage_down(&self, down: bool) {
        self.inner.lock().storage_down = down;
    }

    /// Makes `step_state` of this step key raise while the storage answers.
    pub fn fail_step_state(&self, step_key: &str) {
        self.inner.lock().failing_steps.push(step_key.to_owned());
    }

    /// Probes asked so far.
    /// The number of steps of each `step_states` request, in order.
    pub fn step_state_batches(&self) -> Vec<usize> {
        self.inner.lock().step_state_batches.clone()
    }

    pub fn probes(&self) -> u64 {
        self.inner.lock().probes
    }

    fn enter(&self) -> Result<parking_lot::MutexGuard<'_, BridgeInner>, BridgeError> {
        let mut inner = self.inner.lock();
        inner.calls += 1;
        if inner.down {
            return Err(BridgeError::Unavailable("fake bridge is down".into()));
        }
        if inner.rejecting {
            return Err(BridgeError::Rejected {
                kind: "bad_request".into(),
                message: "instance_ref is not a packed InstanceRef".into(),
            });
        }
        if inner.storage_down {
            return Err(BridgeError::Internal(
                "OperationalError: could not connect to the database".into(),
            ));
        }
        Ok(inner)
    }

    fn state(inner: &BridgeInner, run_id: &str, step_key: &str, attempt: u32) -> StepState {
        let events = inner
            .terminal
            .get(&(run_id.to_owned(), step_key.to_owned()))
            .cloned()
            .unwrap_or_default();
        let run_status = (!inner.unknown_runs.contains(run_id)).then(|| {
            inner
                .run_statuses
                .get(run_id)
                .cloned()
                .unwrap_or(RunStatus::Started)
        });
        StepState {
            run_status,
            terminal_events: events.len() as u32,
            attempt_finished: events.len() as u32 > attempt,
            last_terminal: events.last().cloned(),
            stored_step: inner
                .stored_steps
                .get(&(run_id.to_owned(), step_key.to_owned()))
                .cloned(),
            failure_classes: Vec::new(),
        }
    }
}

#[async_trait]
impl DagsterBridge for FakeBridge {
    async fn run_statuses(
        &self,
        _instance_ref: &Value,
        run_ids: &[String],
    ) -> Result<HashMap<String, Option<RunStatus>>, BridgeError> {
        let inner = self.enter()?;
        Ok(run_ids
            .iter()
            .map(|id| (id.clone(), Self::state(&inner, id, "", 0).run_status))
            .collect())
    }

    async fn step_state(&self, step: &StepRequest) -> Result<StepState, BridgeError> {
        let inner = self.enter()?;
        if inner.failing_steps.contains(&step.step_key) {
            return Err(BridgeError::Internal(format!(
                "KeyError: no step {}",
                step.step_key
            )));
        }
        Ok(Self::state(
            &inner,
            &step.run_id,
            &step.step_key,
            step.attempt,
        ))
    }

    async fn step_states(
        &self,
        steps: &[StepRequest],
    ) -> Result<Vec<Result<StepState, BridgeError>>, BridgeError> {
        self.enter()?.step_state_batches.push(steps.len());
        let mut states = Vec::with_capacity(steps.len());
        for step in steps {
            states.push(self.step_state(step).await);
        }
        Ok(states)
    }

    async fn report_verdict(
        &self,
        attempt: &AttemptId,
        verdict: &Verdict,
    ) -> Result<VerdictAck, BridgeError> {
        let mut inner = self.enter()?;
        if inner.unknown_runs.contains(&attempt.run_id) {
            return Err(BridgeError::Rejected {
                kind: "not_found".into(),
                message: format!("no run {}", attempt.run_id),
            });
        }
        let state = Self::state(&inner, &attempt.run_id, &attempt.step_key, attempt.attempt);
        if state.attempt_finished {
            return Ok(VerdictAck {
                written: false,
                attempt_finished: true,
            });
        }
        if inner
            .verdicts
            .iter()
            .any(|(task_id, _)| *task_id == attempt.task_id)
        {
            return Ok(VerdictAck {
                written: false,
                attempt_finished: false,
            });
        }
        inner
            .verdicts
            .push((attempt.task_id.clone(), verdict.verdict.clone()));
        Ok(VerdictAck {
            written: true,
            attempt_finished: false,
        })
    }

    async fn report_event(
        &self,
        step: &StepRequest,
        message: &str,
        _metadata: &BTreeMap<String, String>,
        _links: &[crate::links::Link],
    ) -> Result<(), BridgeError> {
        let mut inner = self.inner.lock();
        inner.calls += 1;
        inner
            .events
            .push((step.task_id.clone(), message.to_owned()));
        Ok(())
    }

    async fn claim_attempt(
        &self,
        step: &StepRequest,
        bid: &ClaimBid<'_>,
    ) -> Result<ClaimAnswer, BridgeError> {
        let mut inner = self.enter()?;
        let mine = Claim {
            holder: bid.holder.to_owned(),
            token: bid.token.to_owned(),
            message_id: bid.message_id.to_owned(),
            beat: 0,
            ended: None,
        };
        let key = claim_key(&step.run_id, &step.step_key, step.attempt);
        let current = inner.claims.get(&key).cloned();
        let claimed = match (&current, bid.replace_token) {
            (None, None) => true,
            (Some(held), Some(replace)) => held.token == replace,
            _ => false,
        };
        if claimed {
            inner.claims.insert(key, mine.clone());
            return Ok(ClaimAnswer {
                claimed: true,
                current: Some(mine),
                state: Some(Self::state(
                    &inner,
                    &step.run_id,
                    &step.step_key,
                    step.attempt,
                )),
            });
        }
        Ok(ClaimAnswer {
            claimed: current.as_ref().is_some_and(|c| c.token == bid.token),
            current,
            state: None,
        })
    }

    async fn renew_claims(
        &self,
        _instance_ref: &Value,
        claims: &[HeldClaim],
    ) -> Result<Vec<bool>, BridgeError> {
        let mut inner = self.enter()?;
        Ok(claims
            .iter()
            .map(|held| {
                let key = claim_key(&held.run_id, &held.step_key, held.attempt);
                match inner.claims.get_mut(&key) {
                    Some(claim) if claim.token == held.token && claim.ended.is_none() => {
                        claim.beat += 1;
                        claim.message_id.clone_from(&held.message_id);
                        true
                    }
                    _ => false,
                }
            })
            .collect())
    }

    async fn release_claim(
        &self,
        step: &StepRequest,
        token: &str,
        ended: Option<&str>,
    ) -> Result<bool, BridgeError> {
        let mut inner = self.enter()?;
        let key = claim_key(&step.run_id, &step.step_key, step.attempt);
        let Some(claim) = inner.claims.get_mut(&key) else {
            return Ok(false);
        };
        if claim.token != token {
            return Ok(false);
        }
        match ended {
            Some(verdict) => claim.ended = Some(verdict.to_owned()),
            None => {
                inner.claims.remove(&key);
            }
        }
        Ok(true)
    }

    async fn probe(
        &self,
        instance_ref: Option<&Value>,
        _run_id: Option<&str>,
    ) -> Result<(), BridgeError> {
        self.inner.lock().probes += 1;
        match instance_ref {
            Some(_) => self.enter().map(drop),
            None if self.inner.lock().down => {
                Err(BridgeError::Unavailable("fake bridge is down".into()))
            }
            None => Ok(()),
        }
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<BridgePush> {
        self.pushes.subscribe()
    }
}

fn claim_key(run_id: &str, step_key: &str, attempt: u32) -> (String, String, u32) {
    (run_id.to_owned(), step_key.to_owned(), attempt)
}

/// A serialized DagsterEvent line, as `dagster api execute_step` prints it (abridged).
pub fn fake_event_line(step_key: &str, event_type: &str) -> String {
    serde_json::json!({"__class__": "DagsterEvent", "event_type_value": event_type,
                       "step_key": step_key})
    .to_string()
}

/// A valid step message body for the fakes.
pub fn step_body(task_id: &str, run_id: &str, step_key: &str, attempt: u32) -> String {
    serde_json::json!({
        "task_id": task_id,
        "task_name": "execute_plan",
        "labels": {"dagster_run_id": run_id, "dagster_step_key": step_key,
                   "dagster_attempt": attempt.to_string()},
        "labels_types": {},
        "args": [],
        "kwargs": {
            "execute_step_args_packed": {
                "__class__": "ExecuteStepArgs",
                "pipeline_run_id": run_id,
                "step_keys_to_execute": [step_key],
                "instance_ref": null,
                "known_state": {"__class__": "KnownExecutionState",
                                "previous_retry_attempts": {step_key: attempt}},
            },
            "executable_dict": {},
        },
    })
    .to_string()
}

#[derive(Default)]
struct ObjectStoreInner {
    objects: HashMap<(String, String), Vec<u8>>,
    /// Calls that fail (transiently) before the store works again.
    failing: u32,
    puts: u64,
    gets: u64,
}

/// S3 in memory, for the taskiq results and extended payloads.
#[derive(Default, Clone)]
pub struct FakeObjectStore {
    inner: Arc<Mutex<ObjectStoreInner>>,
}

impl FakeObjectStore {
    pub fn insert(&self, bucket: &str, key: &str, body: Vec<u8>) {
        self.inner
            .lock()
            .objects
            .insert((bucket.to_owned(), key.to_owned()), body);
    }

    pub fn object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        self.inner
            .lock()
            .objects
            .get(&(bucket.to_owned(), key.to_owned()))
            .cloned()
    }

    /// Successful puts so far.
    pub fn puts(&self) -> u64 {
        self.inner.lock().puts
    }

    /// Gets asked so far (whatever their answer).
    pub fn gets(&self) -> u64 {
        self.inner.lock().gets
    }

    /// The next `calls` calls fail as if S3 were unreachable (0: work again).
    pub fn fail_next(&self, calls: u32) {
        self.inner.lock().failing = calls;
    }

    fn fail(&self, operation: &'static str, bucket: &str, key: &str) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        if inner.failing == 0 {
            return Ok(());
        }
        inner.failing -= 1;
        Err(StoreError::Transient {
            operation,
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            message: "fake outage".into(),
        })
    }
}

#[async_trait]
impl ObjectStore for FakeObjectStore {
    async fn get(&self, bucket: &str, key: &str, limit: usize) -> Result<Vec<u8>, StoreError> {
        self.inner.lock().gets += 1;
        self.fail("GetObject", bucket, key)?;
        match self.object(bucket, key) {
            None => Err(StoreError::NotFound {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            }),
            Some(body) if body.len() > limit => Err(StoreError::TooLarge {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                size: body.len() as u64,
                limit,
            }),
            Some(body) => Ok(body),
        }
    }

    async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) -> Result<(), StoreError> {
        self.fail("PutObject", bucket, key)?;
        self.insert(bucket, key, body);
        self.inner.lock().puts += 1;
        Ok(())
    }

    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, StoreError> {
        self.fail("HeadObject", bucket, key)?;
        Ok(self.object(bucket, key).is_some())
    }
}
