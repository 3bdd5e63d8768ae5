//! Durable per-attempt claims (docs/guarantees.md, "Claims"): before it launches an attempt,
//! a controller claims it in the Dagster instance's storage, where only one holder can win.
//! This module keeps the claims this controller holds: one background task renews them (a
//! renewal says "my lease on the message is live"), and a claim that was taken over or could
//! not be renewed for half the stale time is signalled lost, so its step is fenced.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dagster::{BridgeError, DagsterBridge, HeldClaim};
use crate::envelope::StepRequest;
use crate::lease::LeaseTable;
use crate::metrics::Metrics;

struct Held {
    claim: HeldClaim,
    instance_ref: Value,
    /// Cancelled when the claim is lost: fence the step.
    lost: CancellationToken,
    /// Last successful renewal (or the claim itself).
    renewed: Instant,
}

/// The claims this controller holds, by task id.
pub struct ClaimTable {
    held: Mutex<HashMap<String, Held>>,
    /// A claim not renewed for this long may be taken over by another controller.
    stale_after: Duration,
    metrics: Arc<Metrics>,
}

impl ClaimTable {
    pub fn new(stale_after: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            held: Mutex::default(),
            stale_after,
            metrics,
        }
    }

    pub(crate) fn stale_after(&self) -> Duration {
        self.stale_after
    }

    /// Records a claim just won; `lost` is cancelled if it is lost.
    pub(crate) fn hold(
        &self,
        step: &StepRequest,
        token: &str,
        message_id: &str,
        lost: CancellationToken,
    ) {
        let held = Held {
            claim: HeldClaim {
                run_id: step.run_id.clone(),
                step_key: step.step_key.clone(),
                attempt: step.attempt,
                token: token.to_owned(),
                message_id: message_id.to_owned(),
            },
            instance_ref: step.instance_ref.clone(),
            lost,
            renewed: Instant::now(),
        };
        let mut held_claims = self.held.lock();
        held_claims.insert(step.task_id.clone(), held);
        self.metrics.claims_held.set(held_claims.len() as i64);
    }

    /// Whether this controller holds a claim with this token (a claim under our id that we
    /// do not hold belongs to an earlier process with the same id).
    pub(crate) fn holds_token(&self, token: &str) -> bool {
        self.held.lock().values().any(|h| h.claim.token == token)
    }

    /// The attempt now runs under another message (a hand-off's continuation).
    pub(crate) fn set_message(&self, task_id: &str, message_id: &str) {
        if let Some(held) = self.held.lock().get_mut(task_id) {
            held.claim.message_id = message_id.to_owned();
        }
    }

    /// Stops holding the claim of `task_id`; its token, to release it with.
    pub(crate) fn forget(&self, task_id: &str) -> Option<String> {
        let mut held_claims = self.held.lock();
        let held = held_claims.remove(task_id)?;
        self.metrics.claims_held.set(held_claims.len() as i64);
        Some(held.claim.token)
    }

    /// Renews every claim whose message lease is live, every `interval`, until `stop`.
    pub async fn keep(
        &self,
        bridge: Arc<dyn DagsterBridge>,
        leases: Arc<LeaseTable>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            for (instance_ref, task_ids, claims) in self.due(&leases) {
                let renewed = bridge.renew_claims(&instance_ref, &claims).await;
                self.record(&task_ids, &claims, renewed);
            }
        }
    }

    /// The claims to renew now, grouped by instance: those whose lease is live (a holder
    /// renews only while SQS keeps its message invisible to everyone else).
    fn due(&self, leases: &LeaseTable) -> Vec<(Value, Vec<String>, Vec<HeldClaim>)> {
        let mut groups: BTreeMap<String, (Value, Vec<String>, Vec<HeldClaim>)> = BTreeMap::new();
        for (task_id, held) in self.held.lock().iter() {
            if !leases.is_live(task_id) {
                continue;
            }
            let group = groups
                .entry(held.instance_ref.to_string())
                .or_insert_with(|| (held.instance_ref.clone(), Vec::new(), Vec::new()));
            group.1.push(task_id.clone());
            group.2.push(held.claim.clone());
        }
        groups.into_values().collect()
    }

    fn record(
        &self,
        task_ids: &[String],
        claims: &[HeldClaim],
        renewed: Result<Vec<bool>, BridgeError>,
    ) {
        let now = Instant::now();
        let mut held_claims = self.held.lock();
        for (i, task_id) in task_ids.iter().enumerate() {
            let Some(held) = held_claims.get_mut(task_id) else {
                continue; // settled meanwhile
            };
            if held.claim.token != claims[i].token {
                continue;
            }
            let result = match &renewed {
                Ok(alive) if alive.get(i) == Some(&true) => {
                    held.renewed = now;
                    "ok"
                }
                Ok(_) => fence(task_id, held, "taken over by another controller"),
                Err(e) => {
                    let since = now.duration_since(held.renewed);
                    if since > self.stale_after / 2 {
                        let why = format!(
                            "not renewed for {since:?} ({e}); another controller may take it over"
                        );
                        fence(task_id, held, &why)
                    } else {
                        tracing::warn!(task_id, %e, "renewing the claim failed; trying again");
                        "error"
                    }
                }
            };
            self.metrics
                .claim_renewals
                .get_or_create(&[("result", result)])
                .inc();
        }
    }
}

fn fence(task_id: &str, held: &Held, why: &str) -> &'static str {
    tracing::error!(task_id, why, "claim lost: fencing the step");
    held.lost.cancel();
    "lost"
}
