//! Dagster outages: telling a Dagster that cannot answer at all (its sidecar down, hung or
//! restarting; its storage failing) from an error of one request, and keeping the record
//! that `/readyz`, the metrics and the intake read. While an instance is unreachable, held
//! messages wait for it ([`super::calls::ask_bridge`]) and the intake receives nothing
//! (`intake::pause_while_unreachable`): an outage spends no step's attempts.

use serde_json::Value;

use super::Context;
use crate::dagster::BridgeError;
use crate::health::OutageCause;

/// What a failed bridge call says about Dagster.
pub(super) enum Diagnosis {
    /// Dagster answers; the error belongs to this request.
    Request,
    /// Dagster cannot answer anything now.
    Outage(OutageCause, String),
    /// The sidecar has too many requests waiting: ask again later.
    Busy,
}

/// Diagnoses a failed call to the instance `instance_ref`. Dagster raising (an internal
/// error) is told apart with a probe of the same instance (and run): when the probe fails
/// too, the storage is down, not the request.
pub(super) async fn diagnose(
    ctx: &Context,
    instance_ref: &Value,
    run_id: Option<&str>,
    error: &BridgeError,
) -> Diagnosis {
    let probed;
    let error = match error {
        BridgeError::Internal(_) => match ctx.bridge.probe(Some(instance_ref), run_id).await {
            Ok(()) => return Diagnosis::Request,
            Err(e) => {
                probed = e;
                &probed
            }
        },
        other => other,
    };
    match error {
        e if e.is_sidecar_down() => Diagnosis::Outage(OutageCause::Sidecar, e.to_string()),
        e @ BridgeError::Internal(_) => Diagnosis::Outage(OutageCause::Storage, e.to_string()),
        BridgeError::Busy(_) => Diagnosis::Busy,
        _ => Diagnosis::Request,
    }
}

/// Records that the instance does not answer.
pub(super) fn unreachable(ctx: &Context, instance_ref: &Value, cause: OutageCause, error: String) {
    if ctx
        .health
        .dagster_unreachable(instance_ref, cause, error.clone())
    {
        tracing::warn!(
            cause = cause.name(),
            error,
            "Dagster unreachable: held messages wait, the intake pauses, /readyz says not ready"
        );
        ctx.metrics
            .dagster_outages
            .get_or_create(&[("cause", cause.name())])
            .inc();
    }
    refresh_gauges(ctx);
}

/// Records that the instance answered.
pub(super) fn answered(ctx: &Context, instance_ref: &Value) {
    if let Some(outage) = ctx.health.dagster_answered(instance_ref) {
        let lasted = chrono::Utc::now() - outage.since;
        tracing::info!(
            cause = outage.cause.name(),
            seconds = lasted.num_milliseconds() as f64 / 1000.0,
            "Dagster answers again"
        );
        refresh_gauges(ctx);
    }
}

/// Probes every unreachable instance once; those that answer are no longer unreachable.
pub(super) async fn probe_unreachable(ctx: &Context) {
    for outage in ctx.health.dagster_outages() {
        match ctx.bridge.probe(Some(&outage.instance_ref), None).await {
            Ok(()) => answered(ctx, &outage.instance_ref),
            Err(e) => {
                let cause = if e.is_sidecar_down() {
                    OutageCause::Sidecar
                } else if matches!(e, BridgeError::Internal(_)) {
                    OutageCause::Storage
                } else {
                    outage.cause
                };
                unreachable(ctx, &outage.instance_ref, cause, e.to_string());
            }
        }
    }
}

fn refresh_gauges(ctx: &Context) {
    let outages = ctx.health.dagster_outages();
    for cause in OutageCause::ALL {
        let down = outages.iter().any(|o| o.cause == cause);
        ctx.metrics
            .dagster_unreachable
            .get_or_create(&[("cause", cause.name())])
            .set(i64::from(down));
    }
}
