//! Calls across the boundaries with a retry budget, so that a passing failure costs no
//! delivery attempt, and bridge calls that wait while Dagster cannot answer.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::outage::{self, Diagnosis};
use super::Context;
use crate::dagster::BridgeError;
use crate::envelope::StepRequest;
use crate::metrics::Metrics;
use crate::queue::QueueError;
use crate::retry::{retry, RetryBudget, Transient, MIN_PAUSE};

/// Bounds of the pause between two tries of a held call: short enough to notice Dagster
/// coming back, long enough not to hammer a database that is recovering.
const HELD_PAUSE_MIN: Duration = Duration::from_millis(100);
const HELD_PAUSE_MAX: Duration = Duration::from_secs(30);

/// Why a bridge call for a held message got no answer.
#[derive(Debug, thiserror::Error)]
pub(super) enum Unanswered {
    /// Dagster answered this request with an error (after the retry budget), or refused it.
    #[error("{0}")]
    Failed(BridgeError),
    /// Dagster was still unreachable when the controller began draining.
    #[error("{0}")]
    Unreachable(BridgeError),
    /// The message's lease was lost while it waited for Dagster.
    #[error("the lease was lost while waiting for Dagster")]
    LeaseLost,
}

/// Calls the bridge for the held message of `step`. While Dagster cannot answer at all (the
/// sidecar down, hung or restarting; the storage failing for this call and for a probe of
/// the same instance) the message is kept (its lease goes on being extended) and the call
/// waits until Dagster answers again, so an outage costs no delivery attempt. An error that
/// belongs to this request (Dagster answers the probe) is retried within the call budget and
/// then returned, for the error policy.
pub(super) async fn ask_bridge<T, F, Fut>(
    ctx: &Context,
    step: &StepRequest,
    operation: &'static str,
    mut call: F,
) -> Result<T, Unanswered>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BridgeError>>,
{
    let instance = &step.instance_ref;
    let lost = ctx.leases.lost_signal(&step.task_id).unwrap_or_default();
    let mut failures = 0u32;
    let mut failing_since = None;
    let mut waits = 0u32;
    loop {
        let error = match call().await {
            Ok(value) => {
                outage::answered(ctx, instance);
                return Ok(value);
            }
            Err(e) => e,
        };
        match outage::diagnose(ctx, instance, Some(&step.run_id), &error).await {
            Diagnosis::Request => {
                outage::answered(ctx, instance);
                failures += 1;
                let since = *failing_since.get_or_insert_with(Instant::now);
                let pause = ctx.settings.backoff.delay(failures).max(MIN_PAUSE);
                if !error.is_transient() || since.elapsed() + pause > ctx.settings.call_retry_budget
                {
                    return Err(Unanswered::Failed(error));
                }
                tracing::debug!(%error, operation, ?pause, "Dagster failed this request; retrying");
                tokio::time::sleep(pause).await;
                continue;
            }
            Diagnosis::Outage(cause, detail) => outage::unreachable(ctx, instance, cause, detail),
            Diagnosis::Busy => {}
        }
        if ctx.draining.is_cancelled() {
            return Err(Unanswered::Unreachable(error));
        }
        waits += 1;
        let pause = ctx
            .settings
            .backoff
            .delay(waits)
            .clamp(HELD_PAUSE_MIN, HELD_PAUSE_MAX);
        if waits == 1 {
            tracing::warn!(%error, operation, "Dagster cannot answer: holding the message until it does");
        } else {
            tracing::debug!(%error, operation, ?pause, "Dagster still cannot answer");
        }
        let back = ctx.health.dagster_back();
        ctx.metrics.bridge_calls_held.inc();
        let lease_lost = tokio::select! {
            _ = tokio::time::sleep(pause) => false,
            _ = back => false,
            // One more try, then the drain gives the message back.
            _ = ctx.draining.cancelled() => false,
            _ = lost.cancelled() => true,
        };
        ctx.metrics.bridge_calls_held.dec();
        if lease_lost {
            return Err(Unanswered::LeaseLost);
        }
    }
}

/// Retries a call while its errors are transient, within the configured budget (the shared
/// [`retry`] helper). Every failed call is counted, the last one too.
pub(super) async fn retrying<T, E, F, Fut>(
    ctx: &Context,
    operation: &'static str,
    mut call: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: CallError,
{
    let budget = RetryBudget::within(ctx.settings.backoff, ctx.settings.call_retry_budget);
    retry(
        budget,
        || {
            let called = call();
            async move {
                let result = called.await;
                if let Err(e) = &result {
                    e.count(&ctx.metrics, operation);
                }
                result
            }
        },
        |_, attempt, pause| {
            tracing::debug!(operation, attempt, ?pause, "transient failure; retrying");
        },
    )
    .await
}

/// Errors of the calls `retrying` makes: whether to retry ([`Transient`]) and how a failed
/// call is counted.
pub(super) trait CallError: Transient {
    fn count(&self, metrics: &Metrics, operation: &'static str);
}

impl CallError for crate::dagster::BridgeError {
    fn count(&self, _metrics: &Metrics, _operation: &'static str) {
        // Counted by the bridge client per method.
    }
}

impl CallError for QueueError {
    fn count(&self, metrics: &Metrics, operation: &'static str) {
        metrics
            .queue_errors
            .get_or_create(&[("operation", operation), ("kind", self.kind())])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::admission::{Admission, AdmissionConfig};
    use crate::claims::ClaimTable;
    use crate::controller::Settings;
    use crate::fakes::{FakeBridge, FakeLauncher, FakeQueue};
    use crate::health::Health;
    use crate::lease::LeaseTable;
    use crate::retry::Backoff;
    use crate::state::StepTable;
    use crate::taskiq::TaskiqCompat;

    fn context(call_retry_budget: Duration) -> Context {
        let bridge = FakeBridge::default();
        let metrics = Arc::new(Metrics::new());
        Context {
            settings: Settings {
                controller_id: "test".into(),
                receive_wait: Duration::from_secs(1),
                max_attempts: 3,
                backoff: Backoff {
                    base: Duration::from_millis(10),
                    cap: Duration::from_secs(1),
                },
                shutdown_grace: Duration::from_secs(10),
                call_retry_budget,
                default_step_timeout: None,
                stop_grace: Duration::from_secs(3),
                run_status_interval: Duration::from_secs(1),
                adoption_window: Duration::from_secs(60),
                waiting_limit: None,
                instance: Default::default(),
            },
            queue: Arc::new(FakeQueue::default()),
            launcher: Arc::new(FakeLauncher::new(bridge.clone(), Duration::ZERO)),
            bridge: Arc::new(bridge),
            admission: Admission::new(AdmissionConfig::capped(1)),
            leases: Arc::new(LeaseTable::new(
                Duration::from_secs(3),
                Duration::from_secs(60),
                metrics.clone(),
            )),
            claims: Arc::new(ClaimTable::new(Duration::from_secs(600), metrics.clone())),
            steps: Arc::new(StepTable::default()),
            metrics,
            health: Arc::new(Health::new(Duration::from_secs(1), Duration::from_secs(10))),
            taskiq: TaskiqCompat::default(),
            draining: CancellationToken::new(),
            abort: CancellationToken::new(),
        }
    }

    fn errors(ctx: &Context, kind: &'static str) -> u64 {
        ctx.metrics
            .queue_errors
            .get_or_create(&[("operation", "DeleteMessage"), ("kind", kind)])
            .get()
    }

    fn unavailable() -> QueueError {
        QueueError::Unavailable {
            operation: "DeleteMessage",
            message: "down".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn every_failed_call_is_counted_and_transient_ones_retried_within_the_budget() {
        let ctx = context(Duration::from_secs(2));
        let calls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let result: Result<(), _> = retrying(&ctx, "DeleteMessage", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(unavailable())
        })
        .await;
        assert!(result.is_err());
        assert!(started.elapsed() <= Duration::from_secs(2));
        let calls = u64::from(calls.load(Ordering::SeqCst));
        assert!(calls > 1, "retried");
        assert_eq!(errors(&ctx, "unavailable"), calls, "the last failure too");

        let calls = AtomicU32::new(0);
        let result = retrying(&ctx, "DeleteMessage", || async {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(QueueError::ReceiptHandleInvalid {
                    operation: "DeleteMessage",
                })
            } else {
                Ok(())
            }
        })
        .await;
        assert!(result.is_err(), "a permanent error is returned at once");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(errors(&ctx, "receipt_handle_invalid"), 1);
    }
}
