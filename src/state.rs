//! Step states and the table of step attempts this controller knows: the dedupe index
//! (an attempt is never processed twice at once here) and what the API and dashboard show.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

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
