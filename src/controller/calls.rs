//! Calls across the boundaries with a retry budget, so that a passing failure costs no
//! delivery attempt.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::Context;
use crate::dagster::BridgeError;
use crate::metrics::Metrics;
use crate::queue::QueueError;

/// Calls the bridge. While the sidecar itself is down or hung the message is kept (its
/// lease goes on being extended) and the call waits for the sidecar to come back, so an
/// outage costs no delivery attempt; errors Dagster raises for this very request are
/// retried within the call budget and then returned.
pub(super) async fn ask_bridge<T, F, Fut>(
    ctx: &Context,
    operation: &'static str,
    mut call: F,
) -> Result<T, BridgeError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BridgeError>>,
{
    let mut outage = 0;
    loop {
        match retrying(ctx, operation, &mut call).await {
            Err(e @ (BridgeError::Unavailable(_) | BridgeError::Timeout(_)))
                if !ctx.draining.is_cancelled() =>
            {
                outage += 1;
                let pause = ctx
                    .settings
                    .backoff
                    .delay(outage)
                    .clamp(Duration::from_millis(100), Duration::from_secs(30));
                tracing::warn!(%e, ?pause, operation, "Dagster bridge unavailable; holding the message and waiting");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = ctx.draining.cancelled() => {}
                }
            }
            other => return other,
        }
    }
}

/// Retries a call while its errors are transient, within the configured budget.
pub(super) async fn retrying<T, E, F, Fut>(
    ctx: &Context,
    operation: &'static str,
    mut call: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: RetryableError,
{
    let deadline = Instant::now() + ctx.settings.call_retry_budget;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match call().await {
            Ok(value) => return Ok(value),
            Err(e) => {
                e.count(&ctx.metrics, operation);
                let pause = ctx
                    .settings
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

/// Errors the retry helper understands.
pub(super) trait RetryableError: std::fmt::Display {
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
