//! The scaling and alarm signals as CloudWatch metrics (`--cloudwatch-namespace`): one
//! PutMetricData per minute with every metric below, dimensioned by the work queue's name
//! only. The template's scaling policy sums `HeldMessages` over the replicas and counts its
//! samples (one per replica and minute) to get a backlog per task; a replica dimension would
//! make that impossible without SEARCH, which target tracking does not take, and would mint
//! a billed custom metric per task that ever ran. Per-replica views are Prometheus's.
//!
//! The refresh loop ([`run`]) also keeps the `ready` and `oldest_message_age_seconds`
//! gauges current with or without CloudWatch.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit, StatisticSet as CwStats};
use chrono::{DateTime, Timelike, Utc};
use tokio_util::sync::CancellationToken;

use crate::flags::{invalid, ConfigError};
use crate::metrics::Metrics;
use crate::scale::StatisticSet;

/// The metric names this controller publishes (the template's policy and alarms use them).
pub mod names {
    /// Messages this replica holds (admitted, launching or running): `steps_in_flight`.
    pub const HELD_MESSAGES: &str = "HeldMessages";
    /// The work queue's ApproximateNumberOfMessages as this replica read it.
    pub const VISIBLE_MESSAGES: &str = "VisibleMessages";
    /// `--max-concurrent` + `--prefetch`.
    pub const HOLD_CAPACITY: &str = "HoldCapacity";
    /// `oldest_message_age_seconds`.
    pub const OLDEST_MESSAGE_AGE: &str = "OldestMessageAge";
    /// Sent → started, as statistic sets (count, sum, min, max) of the minute.
    pub const SCHEDULE_TO_START_LATENCY: &str = "ScheduleToStartLatency";
    /// Executions that ended this minute, and those of them that failed (`failed`,
    /// `verdict`, `timed_out`).
    pub const STEPS_FINISHED: &str = "StepsFinished";
    pub const STEPS_FAILED: &str = "StepsFailed";
    /// Leases that could not be extended in time (`lease_extensions_total{result="lost"}`).
    pub const LEASE_LOSSES: &str = "LeaseLosses";
    /// Throttled RunTask calls (`ecs_api_calls_total{operation="RunTask",result="throttled"}`).
    pub const RUN_TASK_THROTTLES: &str = "RunTaskThrottles";
    /// Messages sent to the DLQ this minute.
    pub const DEAD_LETTERED: &str = "DeadLettered";
    /// 1 when the replica is not ready (`/readyz`) for a reason other than draining.
    pub const NOT_READY: &str = "NotReady";

    /// Every name above: each is published every minute (zero when nothing happened), so
    /// alarms see data rather than gaps.
    pub const ALL: &[&str] = &[
        HELD_MESSAGES,
        VISIBLE_MESSAGES,
        HOLD_CAPACITY,
        OLDEST_MESSAGE_AGE,
        SCHEDULE_TO_START_LATENCY,
        STEPS_FINISHED,
        STEPS_FAILED,
        LEASE_LOSSES,
        RUN_TASK_THROTTLES,
        DEAD_LETTERED,
        NOT_READY,
    ];
}

/// The dimension every metric carries: the work queue's name.
pub const QUEUE_DIMENSION: &str = "Queue";
/// PutMetricData takes at most 1000 metrics per call.
const MAX_DATA_PER_CALL: usize = 1000;
/// How often the loop looks at the clock: a publish lands in every minute even with drift.
const TICK: Duration = Duration::from_secs(15);
/// A PutMetricData or GetQueueAttributes call that takes longer is abandoned for the minute.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Outcomes of `steps_finished_total` that count as failed.
const FAILED_OUTCOMES: &[&str] = &["failed", "verdict", "timed_out"];

#[derive(Debug, Clone, Default, clap::Args)]
pub struct CloudWatchArgs {
    /// Publish the scaling and alarm metrics to this CloudWatch namespace once a minute
    /// (PutMetricData, dimension Queue = the work queue's name). Unset: none.
    #[arg(long, env = "DAGSTER_TASKIQ_CLOUDWATCH_NAMESPACE")]
    pub cloudwatch_namespace: Option<String>,
}

impl CloudWatchArgs {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let Some(namespace) = &self.cloudwatch_namespace else {
            return Ok(());
        };
        let allowed = |c: char| c.is_ascii_alphanumeric() || "._-/#: ".contains(c);
        if namespace.trim().is_empty() || namespace.len() > 255 || !namespace.chars().all(allowed) {
            return Err(invalid(
                "cloudwatch-namespace",
                format!(
                    "{namespace:?} is not a CloudWatch namespace (1 to 255 characters of \
                     letters, digits, . _ - / # : and space)"
                ),
            ));
        }
        if namespace.starts_with("AWS/") {
            return Err(invalid(
                "cloudwatch-namespace",
                "namespaces starting with AWS/ are reserved for AWS services",
            ));
        }
        Ok(())
    }
}

/// The queue's name: the last segment of its URL.
pub fn queue_name(queue_url: &str) -> &str {
    queue_url
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(queue_url)
}

#[derive(Debug, thiserror::Error)]
#[error("PutMetricData failed: {0}")]
pub struct CloudWatchError(String);

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unit {
    Count,
    Seconds,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Single(f64),
    Stats(StatisticSet),
}

/// One metric's value for one minute.
#[derive(Debug, Clone, PartialEq)]
pub struct Datum {
    pub name: &'static str,
    pub unit: Unit,
    pub value: Value,
}

/// Where the data goes: CloudWatch, or a fake in the tests.
#[async_trait]
pub trait MetricSink: Send + Sync {
    async fn put(
        &self,
        namespace: &str,
        dimensions: &[(&'static str, String)],
        at: DateTime<Utc>,
        data: &[Datum],
    ) -> Result<(), CloudWatchError>;
}

pub struct CloudWatchSink {
    client: aws_sdk_cloudwatch::Client,
}

impl CloudWatchSink {
    pub fn new(aws: &aws_config::SdkConfig) -> Self {
        Self {
            client: aws_sdk_cloudwatch::Client::new(aws),
        }
    }
}

#[async_trait]
impl MetricSink for CloudWatchSink {
    async fn put(
        &self,
        namespace: &str,
        dimensions: &[(&'static str, String)],
        at: DateTime<Utc>,
        data: &[Datum],
    ) -> Result<(), CloudWatchError> {
        let dimensions: Vec<Dimension> = dimensions
            .iter()
            .map(|(name, value)| Dimension::builder().name(*name).value(value).build())
            .collect();
        let timestamp =
            aws_sdk_cloudwatch::primitives::DateTime::from_millis(at.timestamp_millis());
        for chunk in data.chunks(MAX_DATA_PER_CALL) {
            let metric_data: Vec<MetricDatum> = chunk
                .iter()
                .map(|d| {
                    let datum = MetricDatum::builder()
                        .metric_name(d.name)
                        .set_dimensions(Some(dimensions.clone()))
                        .timestamp(timestamp)
                        .unit(match d.unit {
                            Unit::Count => StandardUnit::Count,
                            Unit::Seconds => StandardUnit::Seconds,
                        });
                    match d.value {
                        Value::Single(v) => datum.value(v),
                        Value::Stats(s) => datum.statistic_values(
                            CwStats::builder()
                                .sample_count(s.count as f64)
                                .sum(s.sum)
                                .minimum(s.min)
                                .maximum(s.max)
                                .build(),
                        ),
                    }
                    .build()
                })
                .collect();
            self.client
                .put_metric_data()
                .namespace(namespace)
                .set_metric_data(Some(metric_data))
                .send()
                .await
                .map_err(|e| {
                    CloudWatchError(aws_sdk_cloudwatch::error::DisplayErrorContext(e).to_string())
                })?;
        }
        Ok(())
    }
}

/// Cumulative counters read from the Prometheus registry; the publisher sends their
/// increase since its last successful publish.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    pub steps_finished: f64,
    pub steps_failed: f64,
    pub lease_losses: f64,
    pub run_task_throttles: f64,
    pub dead_lettered: f64,
}

impl Counters {
    /// Sums the samples of the families that matter in the registry's text exposition.
    pub(crate) fn read(text: &str) -> Self {
        let mut c = Counters::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let label = |key: &str| {
                let needle = format!("{key}=\"");
                labels
                    .split(',')
                    .find_map(|pair| pair.trim_start_matches('{').strip_prefix(needle.as_str()))
                    .map(|v| v.trim_end_matches('}').trim_end_matches('"'))
            };
            match name {
                "dagster_taskiq_steps_finished_total" => {
                    c.steps_finished += value;
                    if label("outcome").is_some_and(|o| FAILED_OUTCOMES.contains(&o)) {
                        c.steps_failed += value;
                    }
                }
                "dagster_taskiq_lease_extensions_total" if label("result") == Some("lost") => {
                    c.lease_losses += value
                }
                "dagster_taskiq_ecs_api_calls_total"
                    if label("operation") == Some("RunTask")
                        && label("result") == Some("throttled") =>
                {
                    c.run_task_throttles += value
                }
                "dagster_taskiq_messages_dead_lettered_total" => c.dead_lettered += value,
                _ => {}
            }
        }
        c
    }
}

/// What one minute's publish is made of.
#[derive(Debug, Clone)]
pub struct Sample {
    pub held: u64,
    /// None when the queue did not answer: the metric is left out of this minute.
    pub visible: Option<u64>,
    pub hold_capacity: u64,
    pub oldest_message_age: f64,
    pub schedule_to_start: Option<StatisticSet>,
    pub counters: Counters,
    pub not_ready: bool,
}

/// Publishes at most once per calendar minute, timestamped at the minute's start, so that
/// each replica contributes exactly one sample per metric to each 60-second period.
pub struct Publisher {
    namespace: String,
    dimensions: Vec<(&'static str, String)>,
    sink: Arc<dyn MetricSink>,
    published_minute: Option<DateTime<Utc>>,
    sent: Counters,
    /// Schedule-to-start statistics of minutes whose publish failed, sent with the next.
    unsent: Option<StatisticSet>,
}

impl Publisher {
    pub fn new(namespace: String, queue: &str, sink: Arc<dyn MetricSink>) -> Self {
        Self {
            namespace,
            dimensions: vec![(QUEUE_DIMENSION, queue.to_owned())],
            sink,
            published_minute: None,
            sent: Counters::default(),
            unsent: None,
        }
    }

    /// Whether this minute still needs a publish.
    pub(crate) fn due(&self, now: DateTime<Utc>) -> bool {
        self.published_minute != Some(minute_of(now))
    }

    /// The minute's data points.
    fn data(&self, sample: &Sample) -> Vec<Datum> {
        let count = |name, value: f64| Datum {
            name,
            unit: Unit::Count,
            value: Value::Single(value),
        };
        let delta = |now: f64, before: f64| (now - before).max(0.0);
        let (c, s) = (&sample.counters, &self.sent);
        let mut data = vec![
            count(names::HELD_MESSAGES, sample.held as f64),
            count(names::HOLD_CAPACITY, sample.hold_capacity as f64),
            Datum {
                name: names::OLDEST_MESSAGE_AGE,
                unit: Unit::Seconds,
                value: Value::Single(sample.oldest_message_age),
            },
            count(
                names::STEPS_FINISHED,
                delta(c.steps_finished, s.steps_finished),
            ),
            count(names::STEPS_FAILED, delta(c.steps_failed, s.steps_failed)),
            count(names::LEASE_LOSSES, delta(c.lease_losses, s.lease_losses)),
            count(
                names::RUN_TASK_THROTTLES,
                delta(c.run_task_throttles, s.run_task_throttles),
            ),
            count(
                names::DEAD_LETTERED,
                delta(c.dead_lettered, s.dead_lettered),
            ),
            count(names::NOT_READY, if sample.not_ready { 1.0 } else { 0.0 }),
        ];
        if let Some(visible) = sample.visible {
            data.push(count(names::VISIBLE_MESSAGES, visible as f64));
        }
        let mut latency = self.unsent;
        if let Some(new) = sample.schedule_to_start {
            latency = Some(merge(latency, new));
        }
        // No starts, no statistic set: CloudWatch takes none with a zero sample count.
        if let Some(stats) = latency {
            data.push(Datum {
                name: names::SCHEDULE_TO_START_LATENCY,
                unit: Unit::Seconds,
                value: Value::Stats(stats),
            });
        }
        data
    }

    /// Sends this minute's sample (the caller checked [`Publisher::due`]). On failure the
    /// minute stays due, and counter increases and latencies carry over to the next try.
    pub(crate) async fn publish(
        &mut self,
        now: DateTime<Utc>,
        sample: Sample,
    ) -> Result<usize, CloudWatchError> {
        let minute = minute_of(now);
        let data = self.data(&sample);
        match self
            .sink
            .put(&self.namespace, &self.dimensions, minute, &data)
            .await
        {
            Ok(()) => {
                self.published_minute = Some(minute);
                self.sent = sample.counters;
                self.unsent = None;
                Ok(data.len())
            }
            Err(e) => {
                if let Some(new) = sample.schedule_to_start {
                    self.unsent = Some(merge(self.unsent, new));
                }
                Err(e)
            }
        }
    }
}

fn merge(a: Option<StatisticSet>, b: StatisticSet) -> StatisticSet {
    match a {
        None => b,
        Some(a) => StatisticSet {
            count: a.count + b.count,
            sum: a.sum + b.sum,
            min: a.min.min(b.min),
            max: a.max.max(b.max),
        },
    }
}

fn minute_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_second(0)
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(t)
}

/// What the refresh loop reads besides the metrics.
pub struct Sources {
    pub metrics: Arc<Metrics>,
    /// Why the replica is not ready (empty: ready), draining included.
    pub not_ready: Box<dyn Fn() -> Vec<&'static str> + Send + Sync>,
    /// The work queue's visible messages.
    pub visible:
        Box<dyn Fn() -> futures::future::BoxFuture<'static, Result<u64, String>> + Send + Sync>,
}

/// Refreshes the `ready` and oldest-age gauges every few seconds and, with a publisher,
/// publishes once a minute, until `stop`.
pub async fn run(sources: Sources, mut publisher: Option<Publisher>, stop: CancellationToken) {
    loop {
        let reasons = (sources.not_ready)();
        sources.metrics.ready.set(i64::from(reasons.is_empty()));
        sources.metrics.refresh_oldest_message_age();
        if let Some(publisher) = publisher.as_mut() {
            let now = Utc::now();
            if publisher.due(now) {
                let visible = match tokio::time::timeout(CALL_TIMEOUT, (sources.visible)()).await {
                    Ok(Ok(n)) => Some(n),
                    Ok(Err(e)) => {
                        tracing::debug!(%e, "queue depth unavailable for CloudWatch");
                        None
                    }
                    Err(_) => None,
                };
                let m = &sources.metrics;
                let sample = Sample {
                    held: u64::try_from(m.steps_in_flight.get()).unwrap_or(0),
                    visible,
                    hold_capacity: u64::try_from(m.hold_capacity.get()).unwrap_or(0),
                    oldest_message_age: m.oldest_message_age_seconds.get(),
                    schedule_to_start: m.scale.take_schedule_to_start(),
                    counters: Counters::read(&m.render()),
                    not_ready: reasons.iter().any(|r| *r != "draining"),
                };
                let result = tokio::time::timeout(CALL_TIMEOUT, publisher.publish(now, sample))
                    .await
                    .unwrap_or_else(|_| Err(CloudWatchError("timed out".into())));
                let label = match &result {
                    Ok(n) => {
                        tracing::debug!(data = n, "published metrics to CloudWatch");
                        "ok"
                    }
                    Err(e) => {
                        tracing::warn!(%e, "publishing metrics to CloudWatch failed; retrying within the minute");
                        "error"
                    }
                };
                m.cloudwatch_publishes
                    .get_or_create(&[("result", label)])
                    .inc();
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex;

    use super::*;

    #[derive(Default)]
    struct FakeSink {
        calls: Mutex<Vec<(DateTime<Utc>, Vec<Datum>)>>,
        fail: Mutex<bool>,
    }

    #[async_trait]
    impl MetricSink for FakeSink {
        async fn put(
            &self,
            namespace: &str,
            dimensions: &[(&'static str, String)],
            at: DateTime<Utc>,
            data: &[Datum],
        ) -> Result<(), CloudWatchError> {
            assert_eq!(namespace, "Dagster/Steps");
            assert_eq!(dimensions, &[("Queue", "steps".to_owned())]);
            if *self.fail.lock() {
                return Err(CloudWatchError("throttled".into()));
            }
            self.calls.lock().push((at, data.to_vec()));
            Ok(())
        }
    }

    fn sample(finished: f64, latency: Option<f64>) -> Sample {
        Sample {
            held: 3,
            visible: Some(40),
            hold_capacity: 26,
            oldest_message_age: 12.5,
            schedule_to_start: latency.map(|v| StatisticSet {
                count: 1,
                sum: v,
                min: v,
                max: v,
            }),
            counters: Counters {
                steps_finished: finished,
                steps_failed: 1.0,
                ..Counters::default()
            },
            not_ready: false,
        }
    }

    fn value(data: &[Datum], name: &str) -> Option<Value> {
        data.iter().find(|d| d.name == name).map(|d| d.value)
    }

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[tokio::test]
    async fn publishes_once_a_minute_with_counter_increases_and_carries_failures_over() {
        let sink = Arc::new(FakeSink::default());
        let mut p = Publisher::new("Dagster/Steps".into(), "steps", sink.clone());
        let t0 = at("2026-12-06T14:00:05Z");
        assert!(p.due(t0));
        p.publish(t0, sample(5.0, Some(2.0))).await.unwrap();
        // The same minute is not due again; the next one is.
        assert!(!p.due(at("2026-12-06T14:00:59Z")));
        let t1 = at("2026-12-06T14:01:00.5Z");
        assert!(p.due(t1));
        *sink.fail.lock() = true;
        assert!(p.publish(t1, sample(7.0, Some(4.0))).await.is_err());
        assert!(p.due(t1), "a failed minute stays due");
        *sink.fail.lock() = false;
        p.publish(at("2026-12-06T14:01:20Z"), sample(8.0, None))
            .await
            .unwrap();

        let calls = sink.calls.lock();
        assert_eq!(calls.len(), 2);
        let (first_at, first) = &calls[0];
        assert_eq!(*first_at, at("2026-12-06T14:00:00Z"));
        let mut names: Vec<&str> = first.iter().map(|d| d.name).collect();
        names.sort_unstable();
        let mut all = names::ALL.to_vec();
        all.sort_unstable();
        assert_eq!(names, all, "every metric is published every minute");
        assert_eq!(
            value(first, names::STEPS_FINISHED),
            Some(Value::Single(5.0))
        );
        assert_eq!(value(first, names::HELD_MESSAGES), Some(Value::Single(3.0)));
        let (second_at, second) = &calls[1];
        assert_eq!(*second_at, at("2026-12-06T14:01:00Z"));
        // The increase since the last publish that went through, and the failed minute's
        // latency merged with nothing new.
        assert_eq!(
            value(second, names::STEPS_FINISHED),
            Some(Value::Single(3.0))
        );
        assert_eq!(value(second, names::STEPS_FAILED), Some(Value::Single(0.0)));
        assert_eq!(
            value(second, names::SCHEDULE_TO_START_LATENCY),
            Some(Value::Stats(StatisticSet {
                count: 1,
                sum: 4.0,
                min: 4.0,
                max: 4.0
            }))
        );
    }

    #[test]
    fn counters_are_read_from_the_registry() {
        let m = Metrics::new();
        m.steps_finished
            .get_or_create(&[("launcher", "process"), ("outcome", "succeeded")])
            .inc_by(4);
        m.steps_finished
            .get_or_create(&[("launcher", "ecs"), ("outcome", "verdict")])
            .inc_by(2);
        m.steps_finished
            .get_or_create(&[("launcher", "process"), ("outcome", "failed")])
            .inc();
        m.lease_extensions
            .get_or_create(&[("result", "lost")])
            .inc();
        m.lease_extensions
            .get_or_create(&[("result", "extended")])
            .inc_by(9);
        m.ecs_api_calls
            .get_or_create(&[("operation", "RunTask"), ("result", "throttled")])
            .inc_by(3);
        m.ecs_api_calls
            .get_or_create(&[("operation", "DescribeTasks"), ("result", "throttled")])
            .inc();
        m.messages_dead_lettered
            .get_or_create(&[("reason", "invalid_json")])
            .inc();
        assert_eq!(
            Counters::read(&m.render()),
            Counters {
                steps_finished: 7.0,
                steps_failed: 3.0,
                lease_losses: 1.0,
                run_task_throttles: 3.0,
                dead_lettered: 1.0,
            }
        );
    }

    #[test]
    fn the_namespace_is_validated() {
        let args = |ns: &str| CloudWatchArgs {
            cloudwatch_namespace: Some(ns.into()),
        };
        assert!(args("Dagster/TaskiqController").validate().is_ok());
        assert!(CloudWatchArgs::default().validate().is_ok());
        for bad in ["", " ", "AWS/SQS", "a\u{e9}", &"x".repeat(256), "a{b}"] {
            let e = args(bad).validate().unwrap_err().to_string();
            assert!(e.starts_with("--cloudwatch-namespace:"), "{bad:?}: {e}");
        }
        assert_eq!(
            queue_name("https://sqs.eu-west-1.amazonaws.com/123/steps"),
            "steps"
        );
        assert_eq!(queue_name("http://127.0.0.1:5000/123/q.fifo/"), "q.fifo");
    }
}
