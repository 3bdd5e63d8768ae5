//! Liveness and readiness facts the probes read: heartbeats of the controller's loops and the
//! result of the last SQS call. Writers are the loops themselves, so a probe never calls out.

use parking_lot::Mutex;
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

/// Everything `/healthz` and `/readyz` read.
#[derive(Debug)]
pub struct Health {
    /// The intake loop (receives messages; also beats while it waits for capacity).
    pub intake: Heartbeat,
    /// The lease keeper (extends visibility).
    pub lease_keeper: Heartbeat,
    queue: Mutex<Option<QueueContact>>,
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
        }
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
