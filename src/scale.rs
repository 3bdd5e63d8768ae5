//! The signals a scaler needs, beside the Prometheus registry: the age of the oldest message
//! this replica has seen lately, and schedule-to-start latency (the executor's send to the
//! step's start). Both start from a time the message carries, which is untrusted input: the
//! executor's `dagster_sent_at` label (any producer can write any label) or SQS's
//! `SentTimestamp` (the queue's clock, trusted, but reset on every copy the controller sends).
//! Values are bounded here: an unparsable, absurd or future stamp beyond the clock-skew
//! allowance is ignored, one within it counts as zero.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The executor's label: when it sent the message, seconds since the Unix epoch (decimal).
pub(crate) const SENT_AT_LABEL: &str = "dagster_sent_at";
/// A stamp at most this far ahead of our clock is clock skew (counts as now); further
/// ahead it is not believed.
pub(crate) const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Older than this is not a queueing delay: SQS keeps a message 14 days at most.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);
/// Longest label value read (a float with milliseconds needs ~14 characters).
const MAX_LABEL_CHARS: usize = 32;
/// The oldest-message gauge covers the messages received in the last one to two windows.
const AGE_WINDOW: Duration = Duration::from_secs(60);

/// How long ago `sent_ms` was at `now_ms`, if it is believable.
pub(crate) fn age_since(sent_ms: i64, now_ms: i64) -> Option<Duration> {
    let ahead = sent_ms.saturating_sub(now_ms);
    if ahead > MAX_CLOCK_SKEW.as_millis() as i64 {
        return None;
    }
    let age = Duration::from_millis(now_ms.saturating_sub(sent_ms).max(0) as u64);
    (age <= MAX_AGE).then_some(age)
}

/// The executor's `dagster_sent_at` label as milliseconds since the epoch, if well formed.
pub(crate) fn parse_sent_at(label: &str) -> Option<i64> {
    let label = label.trim();
    if label.is_empty() || label.len() > MAX_LABEL_CHARS {
        return None;
    }
    let seconds: f64 = label.parse().ok()?;
    (seconds.is_finite() && seconds > 0.0 && seconds < 1e11).then_some((seconds * 1000.0) as i64)
}

/// Schedule-to-start: from the executor's stamp when it is believable, else from SQS's
/// SentTimestamp (a plain dagster-taskiq message has no stamp).
pub(crate) fn schedule_to_start(
    label: Option<&str>,
    sqs_sent_ms: Option<i64>,
    now_ms: i64,
) -> Option<Duration> {
    label
        .and_then(parse_sent_at)
        .and_then(|sent| age_since(sent, now_ms))
        .or_else(|| sqs_sent_ms.and_then(|sent| age_since(sent, now_ms)))
}

/// Count, sum, minimum and maximum of the observations since the last [`ScaleSignals::take_schedule_to_start`]:
/// what CloudWatch's `StatisticValues` takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatisticSet {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl StatisticSet {
    fn add(set: &mut Option<StatisticSet>, value: f64) {
        match set {
            None => {
                *set = Some(StatisticSet {
                    count: 1,
                    sum: value,
                    min: value,
                    max: value,
                })
            }
            Some(s) => {
                s.count += 1;
                s.sum += value;
                s.min = s.min.min(value);
                s.max = s.max.max(value);
            }
        }
    }
}

#[derive(Debug)]
struct Window {
    started: Instant,
    max: f64,
    previous: f64,
}

#[derive(Debug)]
struct Inner {
    ages: Window,
    schedule_to_start: Option<StatisticSet>,
}

/// Windowed state behind the scaling metrics (the gauges and histograms are in
/// [`crate::metrics::Metrics`]).
#[derive(Debug)]
pub struct ScaleSignals {
    inner: Mutex<Inner>,
}

impl Default for ScaleSignals {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                ages: Window {
                    started: Instant::now(),
                    max: 0.0,
                    previous: 0.0,
                },
                schedule_to_start: None,
            }),
        }
    }
}

impl ScaleSignals {
    /// A message was received, `age` after it was sent.
    pub(crate) fn message_seen(&self, age: Duration, now: Instant) {
        let mut inner = self.inner.lock();
        roll(&mut inner.ages, now);
        inner.ages.max = inner.ages.max.max(age.as_secs_f64());
    }

    /// The age of the oldest message received in the last one to two minutes (0: none).
    pub(crate) fn oldest_message_age(&self, now: Instant) -> f64 {
        let mut inner = self.inner.lock();
        roll(&mut inner.ages, now);
        inner.ages.max.max(inner.ages.previous)
    }

    pub(crate) fn schedule_to_start_observed(&self, latency: Duration) {
        StatisticSet::add(
            &mut self.inner.lock().schedule_to_start,
            latency.as_secs_f64(),
        );
    }

    /// The schedule-to-start observations since the last call, and a fresh start.
    pub(crate) fn take_schedule_to_start(&self) -> Option<StatisticSet> {
        self.inner.lock().schedule_to_start.take()
    }
}

fn roll(window: &mut Window, now: Instant) {
    let elapsed = now.saturating_duration_since(window.started);
    if elapsed < AGE_WINDOW {
        return;
    }
    // The window just ended counts for one more window; an older one not at all.
    window.previous = if elapsed < 2 * AGE_WINDOW {
        window.max
    } else {
        0.0
    };
    window.max = 0.0;
    window.started = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_765_000_000_000;

    #[test]
    fn stamps_are_bounded_and_skew_is_clamped() {
        assert_eq!(
            age_since(NOW - 1500, NOW),
            Some(Duration::from_millis(1500))
        );
        // Slightly ahead of our clock: skew, counts as zero.
        assert_eq!(age_since(NOW + 10_000, NOW), Some(Duration::ZERO));
        // Far ahead or absurdly old: not believed.
        assert_eq!(age_since(NOW + 3_600_000, NOW), None);
        assert_eq!(age_since(NOW - 15 * 24 * 3_600_000, NOW), None);
        assert_eq!(age_since(i64::MIN, NOW), None);
        assert_eq!(age_since(i64::MAX, NOW), None);
    }

    #[test]
    fn scale_signals_bound_the_send_stamp() {
        assert_eq!(parse_sent_at("1765000000.25"), Some(1_765_000_000_250));
        for bad in [
            "",
            " ",
            "nan",
            "inf",
            "-1",
            "0",
            "1e300",
            "abc",
            &"1".repeat(40),
        ] {
            assert_eq!(parse_sent_at(bad), None, "{bad:?}");
        }
        let label = format!("{}", (NOW - 2000) as f64 / 1000.0);
        assert_eq!(
            schedule_to_start(Some(&label), Some(NOW - 500), NOW),
            Some(Duration::from_secs(2))
        );
        // A stamp from the far future (a hostile producer) is ignored for SQS's own.
        assert_eq!(
            schedule_to_start(Some("99999999999"), Some(NOW - 500), NOW),
            Some(Duration::from_millis(500))
        );
        assert_eq!(schedule_to_start(Some("junk"), None, NOW), None);
        assert_eq!(schedule_to_start(None, None, NOW), None);
    }

    #[test]
    fn the_oldest_age_covers_one_to_two_windows() {
        let signals = ScaleSignals::default();
        let t0 = Instant::now();
        signals.message_seen(Duration::from_secs(40), t0);
        signals.message_seen(Duration::from_secs(5), t0 + Duration::from_secs(1));
        assert_eq!(
            signals.oldest_message_age(t0 + Duration::from_secs(2)),
            40.0
        );
        // The next window still reports it...
        assert_eq!(
            signals.oldest_message_age(t0 + Duration::from_secs(61)),
            40.0
        );
        signals.message_seen(Duration::from_secs(3), t0 + Duration::from_secs(62));
        // ...the one after only what it saw itself.
        assert_eq!(
            signals.oldest_message_age(t0 + Duration::from_secs(122)),
            3.0
        );
        assert_eq!(
            signals.oldest_message_age(t0 + Duration::from_secs(400)),
            0.0
        );
    }

    #[test]
    fn schedule_to_start_statistics_reset_when_taken() {
        let signals = ScaleSignals::default();
        assert_eq!(signals.take_schedule_to_start(), None);
        for s in [3.0, 1.0, 2.0] {
            signals.schedule_to_start_observed(Duration::from_secs_f64(s));
        }
        assert_eq!(
            signals.take_schedule_to_start(),
            Some(StatisticSet {
                count: 3,
                sum: 6.0,
                min: 1.0,
                max: 3.0
            })
        );
        assert_eq!(signals.take_schedule_to_start(), None);
    }
}
