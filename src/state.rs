//! Step states and the table of step attempts this controller knows: the dedupe index
//! (an attempt is never processed twice at once here) and what the API and dashboard show.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::envelope::StepRequest;

/// The step lifecycle (docs/protocol.md and DESIGN.md):
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
    /// True once this controller is done with the message.
    pub fn is_final(self) -> bool {
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
    pub history: Vec<(StepState, DateTime<Utc>)>,
    /// `pid 1234` or a task ARN once launched.
    pub locator: Option<String>,
    pub verdict: Option<String>,
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
}

impl StepTable {
    /// Registers an attempt as received. Returns false if it is already active here.
    pub fn claim(&self, step: &StepRequest, message_id: &str, receive_count: u32) -> bool {
        let mut inner = self.inner.lock().expect("lock");
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
            locator: None,
            verdict: None,
            stderr_tail: Vec::new(),
            stop_reason: None,
            stop: CancellationToken::new(),
            instance_ref: step.instance_ref.clone(),
        };
        inner.active.insert(step.task_id.clone(), record);
        true
    }

    /// Records a transition; a final state moves the record to the recent list.
    pub fn transition(&self, task_id: &str, state: StepState) {
        self.update(task_id, |record| {
            record.state = state;
            record.history.push((state, Utc::now()));
        });
    }

    /// Changes an active record in place; a final state moves it to the recent list.
    pub fn update(&self, task_id: &str, change: impl FnOnce(&mut StepRecord)) {
        let mut inner = self.inner.lock().expect("lock");
        let Some(record) = inner.active.get_mut(task_id) else {
            return;
        };
        change(record);
        if record.state.is_final() {
            let record = inner.active.remove(task_id).expect("present");
            if inner.recent.len() == RECENT_LIMIT {
                inner.recent.pop_front();
            }
            inner.recent.push_back(record);
        }
    }

    /// Asks an active step to stop. Returns false if it is not active (or already asked).
    pub fn request_stop(&self, task_id: &str, reason: StopReason) -> bool {
        let mut inner = self.inner.lock().expect("lock");
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
    pub fn request_stop_run(&self, run_id: &str, reason: &StopReason) -> usize {
        let mut inner = self.inner.lock().expect("lock");
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
    pub fn stop_signal(&self, task_id: &str) -> Option<CancellationToken> {
        let inner = self.inner.lock().expect("lock");
        inner.active.get(task_id).map(|r| r.stop.clone())
    }

    pub fn stop_reason(&self, task_id: &str) -> Option<StopReason> {
        let inner = self.inner.lock().expect("lock");
        inner
            .active
            .get(task_id)
            .and_then(|r| r.stop_reason.clone())
    }

    /// Runs with active steps, grouped by Dagster instance (one status query per group).
    pub fn active_runs(&self) -> Vec<(Value, Vec<String>)> {
        let inner = self.inner.lock().expect("lock");
        let mut groups: Vec<(Value, Vec<String>)> = Vec::new();
        for record in inner.active.values() {
            let group = match groups.iter_mut().find(|(r, _)| *r == record.instance_ref) {
                Some(group) => group,
                None => {
                    groups.push((record.instance_ref.clone(), Vec::new()));
                    groups.last_mut().expect("just pushed")
                }
            };
            if !group.1.contains(&record.run_id) {
                group.1.push(record.run_id.clone());
            }
        }
        groups
    }

    pub fn is_active(&self, task_id: &str) -> bool {
        self.inner
            .lock()
            .expect("lock")
            .active
            .contains_key(task_id)
    }

    pub fn active_count(&self) -> usize {
        self.inner.lock().expect("lock").active.len()
    }

    /// Active records, then recent ones (newest first).
    pub fn snapshot(&self) -> Vec<StepRecord> {
        let inner = self.inner.lock().expect("lock");
        inner
            .active
            .values()
            .cloned()
            .chain(inner.recent.iter().rev().cloned())
            .collect()
    }

    pub fn get(&self, task_id: &str) -> Option<StepRecord> {
        let inner = self.inner.lock().expect("lock");
        inner
            .active
            .get(task_id)
            .or_else(|| inner.recent.iter().rev().find(|r| r.task_id == task_id))
            .cloned()
    }
}
