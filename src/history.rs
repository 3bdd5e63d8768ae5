//! The last hour of this controller's activity at one-minute resolution, for the dashboard's
//! charts (`/api/v1/history`): launches and outcomes per minute, the queue depth and the steps
//! in flight, and the step start latency (message received → step running) as p50/p99.
//! A ring of at most [`MINUTES`] minutes, each of fixed size (the latencies go into a fixed
//! histogram, outcomes are counted by their static names): memory stays bounded however many
//! steps run. Every method takes the time, so tests drive it with a virtual clock.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, TimeZone, Utc};
use parking_lot::Mutex;
use serde::Serialize;

/// Minutes kept (the newest one is the current, partial minute).
pub const MINUTES: usize = 60;

/// Upper bounds (seconds) of the start latency histogram's buckets: from 5 ms, each half as
/// large again as the one before, to about 20 minutes; slower starts fall in the last.
const LATENCY_BUCKETS: usize = 32;

fn latency_bound(bucket: usize) -> f64 {
    0.005 * 1.5f64.powi(bucket as i32)
}

fn latency_bucket(seconds: f64) -> usize {
    (0..LATENCY_BUCKETS - 1)
        .find(|&b| seconds <= latency_bound(b))
        .unwrap_or(LATENCY_BUCKETS - 1)
}

/// Distinct outcome names counted in one minute; there are fewer (src/outcome.rs), this
/// only keeps a bug from growing a minute without bound.
const MAX_OUTCOME_NAMES: usize = 64;

#[derive(Debug, Clone)]
struct Minute {
    /// Minutes since the epoch.
    index: i64,
    launches: u32,
    outcomes: BTreeMap<&'static str, u32>,
    queue_depth: Option<u64>,
    in_flight: Option<u32>,
    latency: [u32; LATENCY_BUCKETS],
}

impl Minute {
    fn new(index: i64) -> Self {
        Self {
            index,
            launches: 0,
            outcomes: BTreeMap::new(),
            queue_depth: None,
            in_flight: None,
            latency: [0; LATENCY_BUCKETS],
        }
    }

    /// The bound of the bucket holding the `q` quantile of the latencies, if any.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().map(|&n| u64::from(n)).sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, &n) in self.latency.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                return Some(latency_bound(bucket));
            }
        }
        None
    }
}

/// One minute as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MinuteView {
    pub start: DateTime<Utc>,
    /// Steps started (running) in the minute.
    pub launches: u32,
    /// Attempts settled in the minute, by outcome name.
    pub outcomes: BTreeMap<&'static str, u32>,
    /// Largest visible backlog of the work queue seen in the minute (`None`: not read).
    pub queue_depth: Option<u64>,
    /// Most messages held at once in the minute (`None`: nothing sampled).
    pub in_flight: Option<u32>,
    /// Start latency quantiles in seconds: the upper bound of the histogram bucket that
    /// holds them (buckets grow by half: a value is at most 50% above the true one).
    pub start_latency_p50: Option<f64>,
    pub start_latency_p99: Option<f64>,
}

/// The whole hour, oldest minute first, one entry per minute (empty minutes included).
#[derive(Debug, Clone, Serialize)]
pub struct HistoryView {
    pub minutes: Vec<MinuteView>,
}

/// The ring of minutes.
#[derive(Default)]
pub struct History {
    minutes: Mutex<VecDeque<Minute>>,
}

fn minute_index(at: DateTime<Utc>) -> i64 {
    at.timestamp().div_euclid(60)
}

impl History {
    /// The minute `at` falls in, created (and the ring rolled over) when it is new; `None`
    /// for a time older than the ring (a late record, or the clock stepped back).
    fn with_minute(&self, at: DateTime<Utc>, change: impl FnOnce(&mut Minute)) {
        let index = minute_index(at);
        let mut minutes = self.minutes.lock();
        let newest = minutes.back().map(|m| m.index);
        if newest.is_none_or(|newest| index > newest) {
            minutes.push_back(Minute::new(index));
            while minutes
                .front()
                .is_some_and(|m| m.index <= index - MINUTES as i64)
            {
                minutes.pop_front();
            }
        }
        if let Some(minute) = minutes.iter_mut().rev().find(|m| m.index == index) {
            change(minute);
        }
    }

    /// A step started running `latency_seconds` after its message was received.
    pub fn record_launch(&self, at: DateTime<Utc>, latency_seconds: f64) {
        let bucket = latency_bucket(latency_seconds.max(0.0));
        self.with_minute(at, |m| {
            m.launches = m.launches.saturating_add(1);
            m.latency[bucket] = m.latency[bucket].saturating_add(1);
        });
    }

    /// An attempt settled with this outcome.
    pub fn record_outcome(&self, at: DateTime<Utc>, outcome: &'static str) {
        self.with_minute(at, |m| {
            if m.outcomes.len() < MAX_OUTCOME_NAMES || m.outcomes.contains_key(outcome) {
                let count = m.outcomes.entry(outcome).or_insert(0);
                *count = count.saturating_add(1);
            }
        });
    }

    /// Messages held now; the minute keeps the largest.
    pub fn record_in_flight(&self, at: DateTime<Utc>, held: usize) {
        let held = u32::try_from(held).unwrap_or(u32::MAX);
        self.with_minute(at, |m| {
            m.in_flight = Some(m.in_flight.unwrap_or(0).max(held))
        });
    }

    /// The work queue's visible messages now; the minute keeps the largest.
    pub fn record_queue_depth(&self, at: DateTime<Utc>, visible: u64) {
        self.with_minute(at, |m| {
            m.queue_depth = Some(m.queue_depth.unwrap_or(0).max(visible))
        });
    }

    /// The hour ending with the minute of `now`.
    pub fn view(&self, now: DateTime<Utc>) -> HistoryView {
        let last = minute_index(now);
        let first = last - MINUTES as i64 + 1;
        let minutes = self.minutes.lock();
        let view = (first..=last)
            .map(|index| {
                let start = Utc
                    .timestamp_opt(index * 60, 0)
                    .single()
                    .unwrap_or(DateTime::UNIX_EPOCH);
                match minutes.iter().find(|m| m.index == index) {
                    Some(m) => MinuteView {
                        start,
                        launches: m.launches,
                        outcomes: m.outcomes.clone(),
                        queue_depth: m.queue_depth,
                        in_flight: m.in_flight,
                        start_latency_p50: m.quantile(0.5),
                        start_latency_p99: m.quantile(0.99),
                    },
                    None => MinuteView {
                        start,
                        launches: 0,
                        outcomes: BTreeMap::new(),
                        queue_depth: None,
                        in_flight: None,
                        start_latency_p50: None,
                        start_latency_p99: None,
                    },
                }
            })
            .collect();
        HistoryView { minutes: view }
    }

    /// Minutes held in memory (at most [`MINUTES`]).
    pub fn len(&self) -> usize {
        self.minutes.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
