//! Visibility leases: while the controller holds a message, one background task keeps it
//! invisible with batched `ChangeMessageVisibilityBatch` calls. A lease that is really lost
//! (receipt handle rejected, or its deadline passed while SQS could not be reached) is
//! signalled through its token so the step is fenced: someone else may hold the message now.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::health::Heartbeat;
use crate::metrics::Metrics;
use crate::queue::{ExtendResult, WorkQueue};

use crate::flags::{invalid, parse_seconds, ConfigError};

/// Leave this much room before a deadline when deciding a lease may already be gone.
const SAFETY_MARGIN: Duration = Duration::from_secs(1);

struct Lease {
    /// `None` while handed off: the old message is deleted and its continuation not yet
    /// received back.
    receipt_handle: Option<String>,
    /// When the message becomes visible again unless extended.
    expires: Instant,
    /// When this delivery was received: SQS caps its total visibility from here.
    received: Instant,
    /// When the hand-off happened, while waiting for the continuation.
    handed_off: Option<Instant>,
    signals: LeaseSignals,
}

/// How a lease tells its step task what happened to it.
#[derive(Clone, Default)]
pub(crate) struct LeaseSignals {
    /// Cancelled when the lease is lost: fence the step.
    pub lost: CancellationToken,
    /// Notified when a new delivery (a continuation) renews the lease.
    pub renewed: Arc<Notify>,
}

/// The messages this controller holds, by task id.
pub struct LeaseTable {
    leases: Mutex<HashMap<String, Lease>>,
    visibility: Duration,
    /// Total visibility SQS allows one delivery (12 h); hand-offs happen before it.
    visibility_cap: Duration,
    metrics: Arc<Metrics>,
}

impl LeaseTable {
    pub fn new(visibility: Duration, visibility_cap: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            leases: Mutex::default(),
            visibility,
            visibility_cap,
            metrics,
        }
    }

    /// How long before the cap a lease is handed off: enough for a few heartbeats and the
    /// continuation's round trip, at most five minutes.
    pub(crate) fn handoff_margin(&self) -> Duration {
        (self.heartbeat_interval() * 3)
            .max(Duration::from_secs(300))
            .min(self.visibility_cap / 4)
    }

    /// When the lease of `task_id` must be handed off; `None` if not held or handed off.
    pub(crate) fn handoff_deadline(&self, task_id: &str) -> Option<Instant> {
        let leases = self.leases.lock();
        let lease = leases.get(task_id)?;
        if lease.handed_off.is_some() {
            return None;
        }
        Some(lease.received + self.visibility_cap - self.handoff_margin())
    }

    /// When the step of a handed-off lease must be fenced if its continuation has not come
    /// back; `None` if not handed off.
    pub(crate) fn adoption_deadline(&self, task_id: &str, window: Duration) -> Option<Instant> {
        let leases = self.leases.lock();
        leases.get(task_id)?.handed_off.map(|at| at + window)
    }

    /// The old message was deleted after its continuation was sent: stop extending until
    /// the continuation renews the lease.
    pub(crate) fn mark_handed_off(&self, task_id: &str) {
        let mut leases = self.leases.lock();
        if let Some(lease) = leases.get_mut(task_id) {
            lease.receipt_handle = None;
            lease.handed_off = Some(Instant::now());
        }
    }

    /// The visibility each extension asks for.
    pub(crate) fn visibility(&self) -> Duration {
        self.visibility
    }

    /// How often the keeper extends: a third of the visibility, so two extensions can fail
    /// before a lease runs out; clamped so tiny timeouts still work.
    pub fn heartbeat_interval(&self) -> Duration {
        (self.visibility / 3).clamp(Duration::from_millis(200), Duration::from_secs(60))
    }

    /// Starts holding a message just received.
    pub(crate) fn hold(&self, task_id: &str, receipt_handle: &str) -> LeaseSignals {
        let signals = LeaseSignals::default();
        let now = Instant::now();
        let lease = Lease {
            receipt_handle: Some(receipt_handle.to_owned()),
            expires: now + self.visibility,
            received: now,
            handed_off: None,
            signals: signals.clone(),
        };
        let mut leases = self.leases.lock();
        if let Some(old) = leases.insert(task_id.to_owned(), lease) {
            old.signals.lost.cancel();
        }
        self.metrics.leases_held.set(leases.len() as i64);
        signals
    }

    /// A new delivery of a message we hold (a redelivery after our lease ran out, or the
    /// continuation of a hand-off): its receipt handle is now the valid one, with a fresh
    /// visibility budget. Returns false if the task is not held here.
    pub(crate) fn renew_handle(&self, task_id: &str, receipt_handle: &str) -> bool {
        let mut leases = self.leases.lock();
        match leases.get_mut(task_id) {
            Some(lease) => {
                let now = Instant::now();
                lease.receipt_handle = Some(receipt_handle.to_owned());
                lease.expires = now + self.visibility;
                lease.received = now;
                lease.handed_off = None;
                lease.signals.renewed.notify_one();
                true
            }
            None => false,
        }
    }

    /// Cancelled when the lease of this held message is lost; `None` when it is not held.
    pub(crate) fn lost_signal(&self, task_id: &str) -> Option<CancellationToken> {
        let leases = self.leases.lock();
        leases.get(task_id).map(|l| l.signals.lost.clone())
    }

    /// The current receipt handle of a held message (`None` while handed off).
    pub(crate) fn receipt_handle(&self, task_id: &str) -> Option<String> {
        let leases = self.leases.lock();
        leases.get(task_id).and_then(|l| l.receipt_handle.clone())
    }

    /// Whether SQS keeps the message of `task_id` invisible to everyone else right now: held,
    /// not handed off, and its last extension still runs.
    pub(crate) fn is_live(&self, task_id: &str) -> bool {
        let leases = self.leases.lock();
        leases.get(task_id).is_some_and(|lease| {
            lease.receipt_handle.is_some() && Instant::now() + SAFETY_MARGIN < lease.expires
        })
    }

    /// Stops holding a message (after ack, release or dead-letter).
    pub(crate) fn drop_lease(&self, task_id: &str) {
        let mut leases = self.leases.lock();
        leases.remove(task_id);
        self.metrics.leases_held.set(leases.len() as i64);
    }

    /// When a held message becomes visible again unless extended (wall clock, for the API).
    pub(crate) fn deadline(&self, task_id: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        let leases = self.leases.lock();
        let expires = leases.get(task_id)?.expires;
        let now = Instant::now();
        let left = chrono::Duration::from_std(expires.saturating_duration_since(now)).ok()?;
        let overdue = chrono::Duration::from_std(now.saturating_duration_since(expires)).ok()?;
        Some(chrono::Utc::now() + left - overdue)
    }

    /// Extends every held lease once. Returns how many were lost.
    pub(crate) async fn extend_all(&self, queue: &dyn WorkQueue) -> usize {
        let snapshot: Vec<(String, String)> = {
            let leases = self.leases.lock();
            leases
                .iter()
                .filter_map(|(task_id, lease)| {
                    Some((task_id.clone(), lease.receipt_handle.clone()?))
                })
                .collect()
        };
        if snapshot.is_empty() {
            return 0;
        }
        let asked_at = Instant::now();
        let handles: Vec<String> = snapshot.iter().map(|(_, h)| h.clone()).collect();
        let results = match queue.extend(&handles, self.visibility).await {
            Ok(results) => results,
            Err(e) => {
                tracing::warn!(%e, leases = handles.len(), "extending leases failed; retrying");
                self.metrics
                    .queue_errors
                    .get_or_create(&[
                        ("operation", "ChangeMessageVisibilityBatch"),
                        ("kind", e.kind()),
                    ])
                    .inc();
                vec![ExtendResult::Failed(e.to_string()); handles.len()]
            }
        };
        let mut lost = 0;
        let mut leases = self.leases.lock();
        for ((task_id, handle), result) in snapshot.into_iter().zip(results) {
            let Some(lease) = leases.get_mut(&task_id) else {
                continue; // dropped meanwhile
            };
            if lease.receipt_handle.as_deref() != Some(handle.as_str()) {
                continue; // renewed meanwhile; the next round extends the new handle
            }
            let outcome = match result {
                ExtendResult::Extended => {
                    lease.expires = asked_at + self.visibility;
                    "extended"
                }
                ExtendResult::Lost(reason) => {
                    tracing::warn!(task_id, reason, "lease lost: receipt handle rejected");
                    lease.signals.lost.cancel();
                    "lost"
                }
                ExtendResult::Failed(reason) => {
                    if Instant::now() + SAFETY_MARGIN >= lease.expires {
                        tracing::warn!(task_id, reason, "lease lost: deadline passed unextended");
                        lease.signals.lost.cancel();
                        "lost"
                    } else {
                        "failed"
                    }
                }
            };
            if outcome == "lost" {
                leases.remove(&task_id);
                lost += 1;
            }
            self.metrics
                .lease_extensions
                .get_or_create(&[("result", outcome)])
                .inc();
        }
        self.metrics.leases_held.set(leases.len() as i64);
        lost
    }

    /// The keeper: extends all leases every heartbeat interval until `stop`.
    /// Each round beats `heartbeat`, so `/healthz` sees the keeper is alive.
    pub(crate) async fn keep(
        &self,
        queue: Arc<dyn WorkQueue>,
        stop: CancellationToken,
        heartbeat: &Heartbeat,
    ) {
        let mut ticker = tokio::time::interval(self.heartbeat_interval());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            heartbeat.beat();
            self.extend_all(queue.as_ref()).await;
        }
    }
}

/// SQS caps a visibility timeout at 12 hours.
const MAX_VISIBILITY_SECS: f64 = 43_200.0;

/// The lease flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LeaseArgs {
    /// Visibility timeout of a held message, in seconds; extended every third of it.
    #[arg(long, env = "DAGSTER_TASKIQ_VISIBILITY_TIMEOUT", default_value = "60", value_parser = parse_seconds)]
    pub visibility_timeout: Duration,

    /// Total visibility SQS allows one delivery, in seconds; leases are handed off to a
    /// continuation message before it. Lower only for tests.
    #[arg(long, env = "DAGSTER_TASKIQ_VISIBILITY_CAP", default_value = "43200", value_parser = parse_seconds, hide = true)]
    pub visibility_cap: Duration,
}

impl LeaseArgs {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let visibility = self.visibility_timeout.as_secs_f64();
        if !(1.0..=MAX_VISIBILITY_SECS).contains(&visibility)
            || self.visibility_timeout.subsec_nanos() != 0
        {
            return Err(invalid(
                "visibility-timeout",
                "must be a whole number of seconds from 1 to 43200 (SQS limits)",
            ));
        }
        if self.visibility_cap < self.visibility_timeout * 2
            || self.visibility_cap.as_secs_f64() > MAX_VISIBILITY_SECS
        {
            return Err(invalid(
                "visibility-cap",
                "must be at least twice --visibility-timeout and at most 43200",
            ));
        }
        Ok(())
    }
}
