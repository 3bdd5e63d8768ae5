//! Prometheus metrics (prometheus-client). Names follow Prometheus conventions: a
//! `dagster_taskiq_` prefix, `_total` on counters, base units (seconds).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::scale::ScaleSignals;

/// One label whose value is known at compile time.
pub(crate) type Label = [(&'static str, &'static str); 1];
/// Two such labels.
pub(crate) type Labels2 = [(&'static str, &'static str); 2];
/// Histograms by one label, each with the seconds buckets.
pub(crate) type HistogramFamily = Family<Label, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 1 ms .. ~9 h
    Histogram::new(exponential_buckets(0.001, 2.5, 18))
}

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    pub messages_received: Counter,
    /// `outcome`: succeeded, failed, skipped, verdict, relaunch_exhausted ...
    pub messages_acked: Family<Label, Counter>,
    /// `reason`: backoff, shutdown, duplicate ...
    pub messages_released: Family<Label, Counter>,
    /// `reason`: the poison name or `attempts_exhausted`.
    pub messages_dead_lettered: Family<Label, Counter>,
    /// `launcher`.
    pub steps_launched: Family<Label, Counter>,
    /// `launcher`, `outcome`: succeeded, failed, verdict, fenced, timed_out, killed.
    pub steps_finished: Family<Labels2, Counter>,
    /// `launcher`: attempts launched again because an earlier delivery left no outcome.
    pub steps_relaunched: Family<Label, Counter>,
    /// Process and warm steps that ended for their memory limit (docs/operations.md, "Step
    /// resource limits").
    pub steps_out_of_memory: Counter,
    pub steps_in_flight: Gauge,
    pub leases_held: Gauge,
    /// Durable attempt claims held (docs/guarantees.md, "Claims").
    pub claims_held: Gauge,
    /// Messages whose `instance_ref` named storages other than the controller's instance
    /// (ignored: steps run against the controller's instance).
    pub foreign_instance_refs: Counter,
    /// `result`: ok, error, lost.
    pub claim_renewals: Family<Label, Counter>,
    /// `result`: won, took_over, duplicate, ended, unsupported: how claim attempts ended.
    pub claims: Family<Label, Counter>,
    /// `result`: extended, lost, failed.
    pub lease_extensions: Family<Label, Counter>,
    /// `operation`, `kind`: failures the controller saw through the queue boundary.
    pub queue_errors: Family<Labels2, Counter>,
    /// `operation`: every SQS API call made.
    pub sqs_requests: Family<Label, Counter>,
    /// `operation`, `kind`: SQS API calls that failed.
    pub sqs_request_errors: Family<Labels2, Counter>,
    /// `operation`: SQS API call latency.
    pub sqs_request_duration_seconds: HistogramFamily,
    /// `queue` (work, dlq), `state` (visible, in_flight, delayed): from GetQueueAttributes.
    pub queue_messages: Family<Labels2, Gauge>,
    /// Messages this controller may hold at once (`--max-concurrent`).
    pub admission_capacity: Gauge,
    /// Messages this controller holds at most: `--max-concurrent` + `--prefetch`, the
    /// capacity a backlog per replica is measured against.
    pub hold_capacity: Gauge,
    /// Age (now − sent) of the oldest message received in the last one to two minutes.
    pub oldest_message_age_seconds: Gauge<f64, AtomicU64>,
    /// Message sent (the executor's stamp, else SQS's) → step started.
    pub schedule_to_start_seconds: Histogram,
    /// 1 while this replica is ready (`/readyz`), refreshed every few seconds.
    pub ready: Gauge,
    /// `result` (ok, error): PutMetricData calls (`--cloudwatch-namespace`).
    pub cloudwatch_publishes: Family<Label, Counter>,
    /// The windowed state behind the scaling signals.
    pub scale: ScaleSignals,
    /// `method`.
    pub bridge_requests: Family<Label, Counter>,
    pub bridge_errors: Family<Label, Counter>,
    /// `cause` (start, exited, timeout): bridge sidecars started.
    pub bridge_restarts: Family<Label, Counter>,
    /// `cause` (sidecar, storage): 1 while Dagster is unreachable for that cause.
    pub dagster_unreachable: Family<Label, Gauge>,
    /// `cause` (sidecar, storage): times Dagster became unreachable.
    pub dagster_outages: Family<Label, Counter>,
    /// Bridge calls of held messages waiting for Dagster to answer again.
    pub bridge_calls_held: Gauge,
    /// 1 while the intake receives nothing because Dagster is unreachable.
    pub intake_paused: Gauge,
    /// `kind` (run_ended, terminate_step): notices the bridge pushed about watched runs.
    pub bridge_pushes: Family<Label, Counter>,
    /// ECS and S3 API calls of the ECS launcher: `operation`, `result` (ok, throttled,
    /// transient, permanent).
    pub ecs_api_calls: Family<Labels2, Counter>,
    /// ECS tasks whose status the shared tracker polls.
    pub ecs_tasks_tracked: Gauge,
    /// Step admitted → launch allowed by the launch rate limit.
    pub admission_wait_seconds: Histogram,
    /// Message received → child spawned.
    pub launch_latency_seconds: Histogram,
    /// Child spawned → child exited.
    pub step_duration_seconds: Histogram,
    /// Queue call that settles a message (delete, release or dead-letter).
    pub settle_latency_seconds: Histogram,
    /// Step exited → its message deleted (outcome read or verdict written, then deleted).
    pub exit_to_delete_seconds: Histogram,
    /// `method`: Dagster bridge round trips.
    pub bridge_latency_seconds: HistogramFamily,
    /// `environment` (`default`, or the code locations of a `--python-for` interpreter):
    /// steps forked from a warm zygote.
    pub warm_pool_forks: Family<Label, Counter>,
    /// `reason`, `environment`: why a step was launched cold although the warm pool is on.
    pub warm_pool_fallbacks: Family<Labels2, Counter>,
    /// `result` (ok, failed), `environment`.
    pub warm_pool_zygote_starts: Family<Labels2, Counter>,
    /// `environment`: zygotes that died without being asked to.
    pub warm_pool_zygote_deaths: Family<Label, Counter>,
    /// `reason` (forks, rss), `environment`.
    pub warm_pool_recycles: Family<Labels2, Counter>,
    /// `environment`: pid of the zygote new steps fork from (0: none).
    pub warm_pool_zygote_pid: Family<Label, Gauge>,
    /// `environment`.
    pub warm_pool_zygote_rss_bytes: Family<Label, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dagster_taskiq");
        let metrics = Metrics {
            messages_received: Counter::default(),
            messages_acked: Family::default(),
            messages_released: Family::default(),
            messages_dead_lettered: Family::default(),
            steps_launched: Family::default(),
            steps_finished: Family::default(),
            steps_relaunched: Family::default(),
            steps_out_of_memory: Counter::default(),
            steps_in_flight: Gauge::default(),
            leases_held: Gauge::default(),
            claims_held: Gauge::default(),
            foreign_instance_refs: Counter::default(),
            claim_renewals: Family::default(),
            claims: Family::default(),
            lease_extensions: Family::default(),
            queue_errors: Family::default(),
            sqs_requests: Family::default(),
            sqs_request_errors: Family::default(),
            sqs_request_duration_seconds: Family::new_with_constructor(seconds_histogram),
            queue_messages: Family::default(),
            admission_capacity: Gauge::default(),
            hold_capacity: Gauge::default(),
            oldest_message_age_seconds: Gauge::default(),
            schedule_to_start_seconds: seconds_histogram(),
            ready: Gauge::default(),
            cloudwatch_publishes: Family::default(),
            scale: ScaleSignals::default(),
            bridge_requests: Family::default(),
            bridge_errors: Family::default(),
            bridge_restarts: Family::default(),
            dagster_unreachable: Family::default(),
            dagster_outages: Family::default(),
            bridge_calls_held: Gauge::default(),
            intake_paused: Gauge::default(),
            bridge_pushes: Family::default(),
            ecs_api_calls: Family::default(),
            ecs_tasks_tracked: Gauge::default(),
            admission_wait_seconds: seconds_histogram(),
            launch_latency_seconds: seconds_histogram(),
            step_duration_seconds: seconds_histogram(),
            settle_latency_seconds: seconds_histogram(),
            exit_to_delete_seconds: seconds_histogram(),
            bridge_latency_seconds: Family::new_with_constructor(seconds_histogram),
            warm_pool_forks: Family::default(),
            warm_pool_fallbacks: Family::default(),
            warm_pool_zygote_starts: Family::default(),
            warm_pool_zygote_deaths: Family::default(),
            warm_pool_recycles: Family::default(),
            warm_pool_zygote_pid: Family::default(),
            warm_pool_zygote_rss_bytes: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "build",
            "Controller build information",
            Info::new([
                ("version", env!("CARGO_PKG_VERSION")),
                (
                    "profile",
                    if cfg!(debug_assertions) {
                        "debug"
                    } else {
                        "release"
                    },
                ),
            ]),
        );
        r.register(
            "messages_received",
            "Step messages received from the work queue",
            metrics.messages_received.clone(),
        );
        r.register(
            "messages_acked",
            "Messages deleted after a durable outcome, by outcome",
            metrics.messages_acked.clone(),
        );
        r.register(
            "messages_released",
            "Messages made visible again, by reason",
            metrics.messages_released.clone(),
        );
        r.register(
            "messages_dead_lettered",
            "Messages sent to the dead-letter queue, by reason",
            metrics.messages_dead_lettered.clone(),
        );
        r.register(
            "steps_launched",
            "Step executions started, by launcher",
            metrics.steps_launched.clone(),
        );
        r.register(
            "steps_finished",
            "Step executions ended, by launcher and outcome",
            metrics.steps_finished.clone(),
        );
        r.register(
            "steps_relaunched",
            "Step attempts launched again after a delivery without an outcome, by launcher",
            metrics.steps_relaunched.clone(),
        );
        r.register(
            "steps_out_of_memory",
            "Process and warm steps that ended for their memory limit",
            metrics.steps_out_of_memory.clone(),
        );
        r.register(
            "steps_in_flight",
            "Messages held by this controller (admitted, launching or running)",
            metrics.steps_in_flight.clone(),
        );
        r.register(
            "leases_held",
            "Visibility leases held",
            metrics.leases_held.clone(),
        );
        r.register(
            "foreign_instance_refs",
            "Messages naming another Dagster instance than the controller's (ignored)",
            metrics.foreign_instance_refs.clone(),
        );
        r.register(
            "claims_held",
            "Durable attempt claims held",
            metrics.claims_held.clone(),
        );
        r.register(
            "claim_renewals",
            "Renewals of durable attempt claims, by result",
            metrics.claim_renewals.clone(),
        );
        r.register(
            "claims",
            "Claims of step attempts before launch, by result",
            metrics.claims.clone(),
        );
        r.register(
            "lease_extensions",
            "Visibility extensions, by result",
            metrics.lease_extensions.clone(),
        );
        r.register(
            "ecs_api_calls",
            "ECS and S3 calls of the ECS launcher, by operation and result",
            metrics.ecs_api_calls.clone(),
        );
        r.register(
            "ecs_tasks_tracked",
            "ECS tasks whose status is polled",
            metrics.ecs_tasks_tracked.clone(),
        );
        r.register(
            "queue_errors",
            "SQS API errors, by operation and kind",
            metrics.queue_errors.clone(),
        );
        r.register(
            "sqs_requests",
            "SQS API calls, by operation",
            metrics.sqs_requests.clone(),
        );
        r.register(
            "sqs_request_errors",
            "SQS API calls that failed, by operation and kind",
            metrics.sqs_request_errors.clone(),
        );
        r.register(
            "sqs_request_duration_seconds",
            "SQS API call latency, by operation",
            metrics.sqs_request_duration_seconds.clone(),
        );
        r.register(
            "queue_messages",
            "Approximate messages in the work queue and the DLQ, by state (GetQueueAttributes)",
            metrics.queue_messages.clone(),
        );
        r.register(
            "admission_capacity",
            "Messages this controller may hold at once",
            metrics.admission_capacity.clone(),
        );
        r.register(
            "hold_capacity",
            "Messages this controller holds at most (max concurrent + prefetch)",
            metrics.hold_capacity.clone(),
        );
        r.register(
            "oldest_message_age_seconds",
            "Age of the oldest message received in the last one to two minutes",
            metrics.oldest_message_age_seconds.clone(),
        );
        r.register(
            "schedule_to_start_seconds",
            "Time from message sent (the executor's stamp, else SQS's) to step started",
            metrics.schedule_to_start_seconds.clone(),
        );
        r.register(
            "ready",
            "1 while this replica is ready to work (/readyz)",
            metrics.ready.clone(),
        );
        r.register(
            "cloudwatch_publishes",
            "CloudWatch PutMetricData calls, by result",
            metrics.cloudwatch_publishes.clone(),
        );
        r.register(
            "admission_wait_seconds",
            "Time a step waited for the launch rate limit",
            metrics.admission_wait_seconds.clone(),
        );
        r.register(
            "bridge_requests",
            "Dagster bridge requests, by method",
            metrics.bridge_requests.clone(),
        );
        r.register(
            "bridge_errors",
            "Dagster bridge errors, by method",
            metrics.bridge_errors.clone(),
        );
        r.register(
            "bridge_restarts",
            "Times the Dagster bridge sidecar was started, by cause (start, exited, timeout)",
            metrics.bridge_restarts.clone(),
        );
        r.register(
            "dagster_unreachable",
            "1 while Dagster cannot be asked, by cause (sidecar, storage)",
            metrics.dagster_unreachable.clone(),
        );
        r.register(
            "dagster_outages",
            "Times Dagster became unreachable, by cause (sidecar, storage)",
            metrics.dagster_outages.clone(),
        );
        r.register(
            "bridge_calls_held",
            "Bridge calls of held messages waiting for Dagster to answer again",
            metrics.bridge_calls_held.clone(),
        );
        r.register(
            "intake_paused",
            "1 while the intake receives nothing because Dagster is unreachable",
            metrics.intake_paused.clone(),
        );
        r.register(
            "bridge_pushes",
            "Notices the Dagster bridge pushed about watched runs, by kind",
            metrics.bridge_pushes.clone(),
        );
        r.register(
            "launch_latency_seconds",
            "Time from message received to step started",
            metrics.launch_latency_seconds.clone(),
        );
        r.register(
            "step_duration_seconds",
            "Time from step started to step exited",
            metrics.step_duration_seconds.clone(),
        );
        r.register(
            "settle_latency_seconds",
            "Time of the queue call that settles a message",
            metrics.settle_latency_seconds.clone(),
        );
        r.register(
            "exit_to_delete_seconds",
            "Time from step exited to its message deleted",
            metrics.exit_to_delete_seconds.clone(),
        );
        r.register(
            "bridge_latency_seconds",
            "Dagster bridge round-trip time, by method",
            metrics.bridge_latency_seconds.clone(),
        );
        r.register(
            "warm_pool_forks",
            "Steps forked from a warm zygote, by Python environment",
            metrics.warm_pool_forks.clone(),
        );
        r.register(
            "warm_pool_fallbacks",
            "Steps launched cold although the warm pool is on, by reason and Python environment",
            metrics.warm_pool_fallbacks.clone(),
        );
        r.register(
            "warm_pool_zygote_starts",
            "Warm zygote starts, by result and Python environment",
            metrics.warm_pool_zygote_starts.clone(),
        );
        r.register(
            "warm_pool_zygote_deaths",
            "Warm zygotes that died without being asked to, by Python environment",
            metrics.warm_pool_zygote_deaths.clone(),
        );
        r.register(
            "warm_pool_recycles",
            "Warm zygotes retired, by reason (forks, rss) and Python environment",
            metrics.warm_pool_recycles.clone(),
        );
        r.register(
            "warm_pool_zygote_pid",
            "Pid of the zygote new steps of a Python environment fork from (0: none)",
            metrics.warm_pool_zygote_pid.clone(),
        );
        r.register(
            "warm_pool_zygote_rss_bytes",
            "Resident memory of the current zygote of a Python environment",
            metrics.warm_pool_zygote_rss_bytes.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// A message was received; `sent_ms` is SQS's SentTimestamp (the copy's own for a
    /// message the controller re-sent, so a long step's continuation does not look old).
    pub(crate) fn message_seen(&self, sent_ms: Option<i64>) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        if let Some(age) = sent_ms.and_then(|sent| crate::scale::age_since(sent, now_ms)) {
            self.scale.message_seen(age, std::time::Instant::now());
            self.refresh_oldest_message_age();
        }
    }

    /// A step started: schedule-to-start from the executor's `dagster_sent_at` label, else
    /// from SQS's SentTimestamp.
    pub(crate) fn step_started(&self, sent_at_label: Option<&str>, sqs_sent_ms: Option<i64>) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        if let Some(latency) = crate::scale::schedule_to_start(sent_at_label, sqs_sent_ms, now_ms) {
            self.schedule_to_start_seconds
                .observe(latency.as_secs_f64());
            self.scale.schedule_to_start_observed(latency);
        }
    }

    /// Lets the oldest-message gauge fall back to 0 once nothing old was received lately.
    pub(crate) fn refresh_oldest_message_age(&self) {
        self.oldest_message_age_seconds
            .set(self.scale.oldest_message_age(std::time::Instant::now()));
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new();
        m.messages_dead_lettered
            .get_or_create(&[("reason", "invalid_json")])
            .inc();
        let text = m.render();
        assert!(
            text.contains("dagster_taskiq_messages_dead_lettered_total{reason=\"invalid_json\"} 1")
        );
        assert!(text.contains("dagster_taskiq_build_info"));
        m.bridge_latency_seconds
            .get_or_create(&[("method", "ping")])
            .observe(0.01);
        m.queue_messages
            .get_or_create(&[("queue", "dlq"), ("state", "visible")])
            .set(3);
        let text = m.render();
        assert!(text.contains("dagster_taskiq_bridge_latency_seconds_count{method=\"ping\"} 1"));
        assert!(text.contains("dagster_taskiq_queue_messages{queue=\"dlq\",state=\"visible\"} 3"));
    }
}
