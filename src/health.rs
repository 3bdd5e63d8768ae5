//! Liveness and readiness facts the probes read: heartbeats of the controller's loops, the
//! result of the last SQS call and the Dagster instances that do not answer. Writers are the
//! loops themselves, so a probe never calls out.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::time::Instant;

/// One loop's heartbeat: when it last went round, and whether it has stopped on purpose.
#[derive(Debug)]
pub struct Heartbeat {
    name: &'static str,
    /// Older than this and the loop counts as stuck.
    max_age: Duration,
    inner: Mutex<BeatState>,
}

#[derive(Debug, Clone, Copy)]
struct BeatState {
    last: Option<Instant>,
    stopped: bool,
}

/// What a probe reports about one loop.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct BeatReport {
    pub name: &'static str,
    /// `ok`, `stale`, `starting` (never beat yet) or `stopped` (ended on purpose).
    pub status: &'static str,
    /// Seconds since the last beat, if any.
    pub age_seconds: Option<f64>,
    pub max_age_seconds: f64,
}

impl Heartbeat {
    pub(crate) fn new(name: &'static str, max_age: Duration) -> Self {
        Self {
            name,
            max_age,
            inner: Mutex::new(BeatState {
                last: None,
                stopped: false,
            }),
        }
    }

    /// The loop went round.
    pub(crate) fn beat(&self) {
        let mut state = self.inner.lock();
        state.last = Some(Instant::now());
        state.stopped = false;
    }

    /// The loop ended on purpose (draining): silence is no longer a fault.
    pub(crate) fn stop(&self) {
        self.inner.lock().stopped = true;
    }

    pub(crate) fn report(&self) -> BeatReport {
        let state = *self.inner.lock();
        let age = state.last.map(|t| t.elapsed());
        let status = match (state.stopped, age) {
            (true, _) => "stopped",
            (false, None) => "starting",
            (false, Some(age)) if age > self.max_age => "stale",
            (false, Some(_)) => "ok",
        };
        BeatReport {
            name: self.name,
            status,
            age_seconds: age.map(|a| a.as_secs_f64()),
            max_age_seconds: self.max_age.as_secs_f64(),
        }
    }
}

/// The outcome of the most recent SQS call that tells whether SQS is reachable.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct QueueContact {
    pub ok: bool,
    pub at: DateTime<Utc>,
    /// The operation, e.g. `ReceiveMessage`.
    pub operation: &'static str,
    /// The error, when it failed.
    pub error: Option<String>,
}

/// Why Dagster cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OutageCause {
    /// The bridge sidecar is down, hung (and killed) or restarting.
    Sidecar,
    /// Dagster's storage raised for a request and for a probe of the same instance.
    Storage,
}

impl OutageCause {
    pub(crate) const ALL: [OutageCause; 2] = [OutageCause::Sidecar, OutageCause::Storage];

    /// The `cause` label of the outage metrics.
    pub(crate) fn name(self) -> &'static str {
        match self {
            OutageCause::Sidecar => "sidecar",
            OutageCause::Storage => "storage",
        }
    }
}

/// A Dagster instance that does not answer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct DagsterOutage {
    pub cause: OutageCause,
    pub since: DateTime<Utc>,
    /// The latest failure.
    pub error: String,
    /// The instance (its ref), which probes ask again.
    #[serde(skip)]
    pub instance_ref: serde_json::Value,
}

/// Everything `/healthz` and `/readyz` read.
#[derive(Debug)]
pub struct Health {
    /// The intake loop (receives messages; also beats while it waits for capacity).
    pub intake: Heartbeat,
    /// The lease keeper (extends visibility).
    pub lease_keeper: Heartbeat,
    queue: Mutex<Option<QueueContact>>,
    /// Unreachable Dagster instances, by their ref as JSON text.
    dagster: Mutex<BTreeMap<String, DagsterOutage>>,
    /// Woken when an instance answers again.
    dagster_back: tokio::sync::Notify,
}

/// How often the intake beats while it waits for room; well inside its stale bound.
pub(crate) const IDLE_BEAT: Duration = Duration::from_secs(5);

impl Health {
    /// Bounds follow the loops' own periods: a receive may long-poll `receive_wait`, and the
    /// keeper ticks every `heartbeat_interval`; each gets slack for slow calls.
    pub fn new(receive_wait: Duration, heartbeat_interval: Duration) -> Self {
        Self {
            intake: Heartbeat::new(
                "intake",
                (receive_wait + IDLE_BEAT).max(Duration::from_secs(5)) * 2 + SLACK,
            ),
            lease_keeper: Heartbeat::new("lease_keeper", heartbeat_interval * 3 + SLACK),
            queue: Mutex::new(None),
            dagster: Mutex::default(),
            dagster_back: tokio::sync::Notify::new(),
        }
    }

    /// Records that the instance does not answer; true when it answered until now.
    pub(crate) fn dagster_unreachable(
        &self,
        instance_ref: &serde_json::Value,
        cause: OutageCause,
        error: String,
    ) -> bool {
        let mut outages = self.dagster.lock();
        match outages.get_mut(&instance_ref.to_string()) {
            Some(outage) => {
                outage.cause = cause;
                outage.error = error;
                false
            }
            None => {
                outages.insert(
                    instance_ref.to_string(),
                    DagsterOutage {
                        cause,
                        since: Utc::now(),
                        error,
                        instance_ref: instance_ref.clone(),
                    },
                );
                true
            }
        }
    }

    /// Records that the instance answered; returns the outage this ends, if any.
    pub(crate) fn dagster_answered(
        &self,
        instance_ref: &serde_json::Value,
    ) -> Option<DagsterOutage> {
        let mut outages = self.dagster.lock();
        if outages.is_empty() {
            return None; // the common case: no JSON text to build
        }
        let ended = outages.remove(&instance_ref.to_string());
        drop(outages);
        if ended.is_some() {
            self.dagster_back.notify_waiters();
        }
        ended
    }

    /// The instances that do not answer now.
    pub(crate) fn dagster_outages(&self) -> Vec<DagsterOutage> {
        self.dagster.lock().values().cloned().collect()
    }

    /// Completes when some instance answers again (enable it before checking
    /// [`Health::dagster_outages`], or a wake in between is missed).
    pub(crate) fn dagster_back(&self) -> tokio::sync::futures::Notified<'_> {
        self.dagster_back.notified()
    }

    /// Records the outcome of a call that reached (or failed to reach) SQS.
    pub fn queue_contact(&self, operation: &'static str, error: Option<String>) {
        let contact = QueueContact {
            ok: error.is_none(),
            at: Utc::now(),
            operation,
            error,
        };
        *self.queue.lock() = Some(contact);
    }

    /// The last SQS contact; `None` before the first call.
    pub(crate) fn last_queue_contact(&self) -> Option<QueueContact> {
        self.queue.lock().clone()
    }

    /// Each loop's state; the process is healthy when none is stale.
    pub(crate) fn loops(&self) -> Vec<BeatReport> {
        vec![self.intake.report(), self.lease_keeper.report()]
    }
}

/// Extra room for a slow SQS call before a loop counts as stuck.
const SLACK: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_beat_goes_stale_after_its_bound_and_stopping_clears_it() {
        let beat = Heartbeat::new("x", Duration::from_secs(10));
        assert_eq!(beat.report().status, "starting");
        beat.beat();
        assert_eq!(beat.report().status, "ok");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(beat.report().status, "stale");
        beat.stop();
        assert_eq!(beat.report().status, "stopped");
    }

    #[test]
    fn an_outage_lasts_until_its_instance_answers() {
        let health = Health::new(Duration::from_secs(20), Duration::from_secs(20));
        let (a, b) = (serde_json::json!({"a": 1}), serde_json::json!(null));
        assert!(health.dagster_unreachable(&a, OutageCause::Sidecar, "down".into()));
        assert!(!health.dagster_unreachable(&a, OutageCause::Storage, "raised".into()));
        assert!(health.dagster_unreachable(&b, OutageCause::Storage, "raised".into()));
        let outages = health.dagster_outages();
        assert_eq!(outages.len(), 2);
        assert!(outages
            .iter()
            .all(|o| o.cause == OutageCause::Storage && o.error == "raised"));
        assert_eq!(
            health.dagster_answered(&a).map(|o| o.instance_ref),
            Some(a.clone())
        );
        assert!(health.dagster_answered(&a).is_none());
        assert_eq!(health.dagster_outages().len(), 1);
    }

    #[test]
    fn queue_contact_keeps_the_latest_result() {
        let health = Health::new(Duration::from_secs(20), Duration::from_secs(20));
        assert!(health.last_queue_contact().is_none());
        health.queue_contact("ReceiveMessage", Some("connection refused".into()));
        health.queue_contact("GetQueueAttributes", None);
        let last = health.last_queue_contact().expect("recorded");
        assert!(last.ok);
        assert_eq!(last.operation, "GetQueueAttributes");
    }
}
