//! Step states and the table of step attempts this controller knows: the dedupe index
//! (an attempt is never processed twice at once here) and what the API and dashboard show.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::envelope::{LauncherKind, StepRequest};
use crate::history::History;
use crate::links::Link;

fn serialize_history<S: serde::Serializer>(
    history: &[(StepState, DateTime<Utc>)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Transition<'a> {
        state: StepState,
        at: &'a DateTime<Utc>,
    }
    serializer.collect_seq(
        history
            .iter()
            .map(|(state, at)| Transition { state: *state, at }),
    )
}

/// The step lifecycle (docs/architecture.md, "States and outcomes"):
/// `Received → Admitted → Launching → Running → Exited → Reported → Acked`, with side exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Received,
    Admitted,
    Launching,
    Running,
    Exited,
    Reported,
    Acked,
    /// Transient failure: released with a backoff delay.
    Backoff,
    DeadLettered,
    /// Run canceled or attempt already finished: acknowledged without running.
    Skipped,
    /// Lease lost: execution killed, nothing reported.
    Fenced,
    /// Given back to the queue (shutdown).
    Released,
}

impl StepState {
    pub(crate) const ALL: [StepState; 12] = [
        StepState::Received,
        StepState::Admitted,
        StepState::Launching,
        StepState::Running,
        StepState::Exited,
        StepState::Reported,
        StepState::Acked,
        StepState::Backoff,
        StepState::DeadLettered,
        StepState::Skipped,
        StepState::Fenced,
        StepState::Released,
    ];

    /// The name used in JSON and in API filters, e.g. `dead_lettered`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StepState::Received => "received",
            StepState::Admitted => "admitted",
            StepState::Launching => "launching",
            StepState::Running => "running",
            StepState::Exited => "exited",
            StepState::Reported => "reported",
            StepState::Acked => "acked",
            StepState::Backoff => "backoff",
            StepState::DeadLettered => "dead_lettered",
            StepState::Skipped => "skipped",
            StepState::Fenced => "fenced",
            StepState::Released => "released",
        }
    }

    /// Parses an API filter value.
    pub(crate) fn parse(name: &str) -> Option<StepState> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// True once this controller is done with the message.
    pub(crate) fn is_final(self) -> bool {
        matches!(
            self,
            StepState::Acked
                | StepState::Backoff
                | StepState::DeadLettered
                | StepState::Skipped
                | StepState::Fenced
                | StepState::Released
        )
    }
}

/// Why a running step is being stopped from outside its own task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StopReason {
    /// The run is canceling, canceled or over: Dagster writes the interrupt failure.
    RunEnded { run_status: String },
    /// An operator asked (dashboard or API).
    Operator { reason: String },
    /// The run's executor asked (its `terminate_step`), e.g. while it is being interrupted.
    Executor,
}

/// What the controller knows about one step attempt.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub task_id: String,
    pub run_id: String,
    pub step_key: String,
    pub attempt: u32,
    pub message_id: String,
    pub receive_count: u32,
    pub state: StepState,
    /// Every transition, oldest first; serialized as `{"state", "at"}` objects.
    #[serde(serialize_with = "serialize_history")]
    pub history: Vec<(StepState, DateTime<Utc>)>,
    /// `process` or `ecs`: as labelled on the message, then the launcher that ran it.
    pub launcher: Option<String>,
    /// `pid 1234` or a task ARN once launched.
    pub locator: Option<String>,
    /// Where the execution's own pages are (an ECS task, its log stream), once launched.
    pub links: Vec<Link>,
    pub verdict: Option<String>,
    /// How the controller settled the message: `succeeded`, `failed`, `verdict`, a dead-letter
    /// or release reason, ...
    pub outcome: Option<&'static str>,
    pub stderr_tail: Vec<String>,
    /// Set when someone asked the step to stop.
    pub stop_reason: Option<StopReason>,
    /// Cancelled together with `stop_reason` being set.
    #[serde(skip)]
    pub stop: CancellationToken,
    /// The run's Dagster instance, for batched run-status queries.
    #[serde(skip)]
    pub instance_ref: Value,
}

/// How many finished records to keep for the API.
const RECENT_LIMIT: usize = 1000;

#[derive(Default)]
struct Inner {
    active: HashMap<String, StepRecord>,
    recent: VecDeque<StepRecord>,
}

/// Thread-safe table of active and recently finished step attempts.
#[derive(Default)]
pub struct StepTable {
    inner: Mutex<Inner>,
    /// Notified whenever an attempt reaches its final state here.
    settled: tokio::sync::Notify,
    /// The last hour of launches, outcomes and messages held, fed by the transitions.
    history: History,
}

impl StepTable {
    /// Registers an attempt as received. Returns false if it is already active here.
    pub(crate) fn claim(&self, step: &StepRequest, message_id: &str, receive_count: u32) -> bool {
        let mut inner = self.inner.lock();
        if inner.active.contains_key(&step.task_id) {
            return false;
        }
        let record = StepRecord {
            task_id: step.task_id.clone(),
            run_id: step.run_id.clone(),
            step_key: step.step_key.clone(),
            attempt: step.attempt,
            message_id: message_id.to_owned(),
            receive_count,
            state: StepState::Received,
            history: vec![(StepState::Received, Utc::now())],
            launcher: step.launcher.map(|kind| {
                match kind {
                    LauncherKind::Process => "process",
                    LauncherKind::Ecs => "ecs",
                }
                .to_owned()
            }),
            locator: None,
            links: Vec::new(),
            verdict: None,
            outcome: None,
            stderr_tail: Vec::new(),
            stop_reason: None,
            stop: CancellationToken::new(),
            instance_ref: step.instance_ref.clone(),
        };
        inner.active.insert(step.task_id.clone(), record);
        self.history
            .record_in_flight(Utc::now(), inner.active.len());
        true
    }

    /// The last hour at one-minute resolution, for the dashboard's charts.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Feeds the history after a change of `record` from state `before`.
    fn record_history(&self, before: StepState, record: &StepRecord) {
        if record.state == before {
            return;
        }
        let now = Utc::now();
        if record.state == StepState::Running {
            let received = record.history.first().map_or(now, |(_, at)| *at);
            let latency = (now - received).num_microseconds().unwrap_or(0) as f64 / 1e6;
            self.history.record_launch(now, latency);
        } else if record.state.is_final() {
            self.history
                .record_outcome(now, record.outcome.unwrap_or(record.state.as_str()));
        }
    }

    /// Records a transition; a final state moves the record to the recent list.
    pub(crate) fn transition(&self, task_id: &str, state: StepState) {
        self.update(task_id, |record| {
            record.state = state;
            record.history.push((state, Utc::now()));
        });
    }

    /// Changes an active record in place; a final state moves it to the recent list.
    pub(crate) fn update(&self, task_id: &str, change: impl FnOnce(&mut StepRecord)) {
        let mut inner = self.inner.lock();
        let Some(record) = inner.active.get_mut(task_id) else {
            return;
        };
        let before = record.state;
        change(record);
        self.record_history(before, record);
        if record.state.is_final() {
            let record = inner.active.remove(task_id).expect("present");
            if inner.recent.len() == RECENT_LIMIT {
                inner.recent.pop_front();
            }
            inner.recent.push_back(record);
            self.history
                .record_in_flight(Utc::now(), inner.active.len());
            drop(inner);
            self.settled.notify_waiters();
        }
    }

    /// Waits until the attempt is no longer active here, for at most `limit`. Returns
    /// whether it settled in time.
    pub(crate) async fn settled_within(&self, task_id: &str, limit: std::time::Duration) -> bool {
        let settled = async {
            loop {
                let notified = self.settled.notified();
                if !self.is_active(task_id) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, settled).await.is_ok()
    }

    /// Asks an active step to stop. Returns false if it is not active (or already asked).
    pub fn request_stop(&self, task_id: &str, reason: StopReason) -> bool {
        let mut inner = self.inner.lock();
        match inner.active.get_mut(task_id) {
            Some(record) if record.stop_reason.is_none() => {
                record.stop_reason = Some(reason);
                record.stop.cancel();
                true
            }
            _ => false,
        }
    }

    /// Asks every active step of a run to stop. Returns how many were asked.
    pub(crate) fn request_stop_run(&self, run_id: &str, reason: &StopReason) -> usize {
        let mut inner = self.inner.lock();
        let mut asked = 0;
        for record in inner.active.values_mut() {
            if record.run_id == run_id && record.stop_reason.is_none() {
                record.stop_reason = Some(reason.clone());
                record.stop.cancel();
                asked += 1;
            }
        }
        asked
    }

    /// The stop signal of an active step and, once signalled, why.
    pub(crate) fn stop_signal(&self, task_id: &str) -> Option<CancellationToken> {
        let inner = self.inner.lock();
        inner.active.get(task_id).map(|r| r.stop.clone())
    }

    pub(crate) fn stop_reason(&self, task_id: &str) -> Option<StopReason> {
        let inner = self.inner.lock();
        inner
            .active
            .get(task_id)
            .and_then(|r| r.stop_reason.clone())
    }

    /// Runs with active steps, grouped by Dagster instance (one status query per group), run
    /// ids sorted.
    pub(crate) fn active_runs(&self) -> Vec<(Value, Vec<String>)> {
        let inner = self.inner.lock();
        let mut groups: Vec<(Value, std::collections::BTreeSet<String>)> = Vec::new();
        for record in inner.active.values() {
            let group = match groups.iter_mut().find(|(r, _)| *r == record.instance_ref) {
                Some(group) => group,
                None => {
                    groups.push((record.instance_ref.clone(), Default::default()));
                    groups.last_mut().expect("just pushed")
                }
            };
            group.1.insert(record.run_id.clone());
        }
        groups
            .into_iter()
            .map(|(instance_ref, runs)| (instance_ref, runs.into_iter().collect()))
            .collect()
    }

    /// Messages held here now.
    pub fn active_count(&self) -> usize {
        self.inner.lock().active.len()
    }

    pub fn is_active(&self, task_id: &str) -> bool {
        self.inner.lock().active.contains_key(task_id)
    }

    /// Active records, then recent ones (newest first).
    pub fn snapshot(&self) -> Vec<StepRecord> {
        let inner = self.inner.lock();
        inner
            .active
            .values()
            .cloned()
            .chain(inner.recent.iter().rev().cloned())
            .collect()
    }

    pub fn get(&self, task_id: &str) -> Option<StepRecord> {
        let inner = self.inner.lock();
        inner
            .active
            .get(task_id)
            .or_else(|| inner.recent.iter().rev().find(|r| r.task_id == task_id))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_match_their_json() {
        for state in StepState::ALL {
            let json = serde_json::to_value(state).expect("serializes");
            assert_eq!(json, serde_json::Value::String(state.as_str().to_owned()));
            assert_eq!(StepState::parse(state.as_str()), Some(state));
        }
        assert_eq!(StepState::parse("nope"), None);
    }
}
