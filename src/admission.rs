//! Admission control between intake and launch.
//!
//! Two limits keep a fan-out storm from overwhelming the launcher, AWS or the host:
//! - **held messages** (a semaphore): running steps plus a bounded prefetch. Intake receives
//!   only when there is room, so the controller never holds work it cannot start soon;
//! - **run slots** (the [`Scheduler`]): a global cap, an optional cap per run and
//!   Dagster-style tag caps. Waiting steps are granted a slot by priority (op tag
//!   `dagster/priority`, higher first), then fair share (the run with fewer running steps
//!   first, so one run with 500 ready steps cannot starve a run with 5), then arrival order.
//!
//! Launches then pass a governor token bucket. All limits are per controller replica.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::flags::{invalid, parse_seconds, ConfigError};

/// Which steps a tag limit counts, as in Dagster's `tag_concurrency_limits`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagMatch {
    /// Steps with the key, whatever the value, share one limit (`key:N`).
    AnyValue,
    /// Steps with exactly this value share the limit (`key=value:N`).
    Value(String),
    /// Each distinct value has a limit of its own (`key=*:N`).
    PerUniqueValue,
}

/// `--tag-limit`: at most `limit` running steps whose op tags match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagLimit {
    pub key: String,
    pub matches: TagMatch,
    pub limit: usize,
}

impl TagLimit {
    /// The counter a step with these tags uses under this limit, if it is counted.
    fn bucket(&self, index: usize, tags: &BTreeMap<String, String>) -> Option<TagBucket> {
        let value = tags.get(&self.key)?;
        let counted = match &self.matches {
            TagMatch::AnyValue => String::new(),
            TagMatch::Value(v) if v == value => String::new(),
            TagMatch::Value(_) => return None,
            TagMatch::PerUniqueValue => value.clone(),
        };
        Some((index, counted))
    }
}

impl FromStr for TagLimit {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (selector, limit) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?}: expected key=value:N, key=*:N or key:N"))?;
        let limit: usize = limit
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: the limit {limit:?} is not a whole number"))?;
        let (key, matches) = match selector.split_once('=') {
            None => (selector, TagMatch::AnyValue),
            Some((key, "*")) => (key, TagMatch::PerUniqueValue),
            Some((key, value)) => (key, TagMatch::Value(value.to_owned())),
        };
        if key.is_empty() {
            return Err(format!("{text:?}: the tag key is empty"));
        }
        Ok(Self {
            key: key.to_owned(),
            matches,
            limit,
        })
    }
}

impl fmt::Display for TagLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.matches {
            TagMatch::AnyValue => write!(f, "{}:{}", self.key, self.limit),
            TagMatch::Value(v) => write!(f, "{}={v}:{}", self.key, self.limit),
            TagMatch::PerUniqueValue => write!(f, "{}=*:{}", self.key, self.limit),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// Steps running at once.
    pub max_concurrent: usize,
    /// Messages held beyond the running steps, waiting for a slot.
    pub prefetch: usize,
    /// Steps of one run running at once; `None`: no per-run cap.
    pub max_per_run: Option<usize>,
    pub tag_limits: Vec<TagLimit>,
    /// Launches per second; `None`: unlimited.
    pub launch_rate: Option<NonZeroU32>,
    /// Launches allowed back to back before the rate applies.
    pub launch_burst: NonZeroU32,
}

impl AdmissionConfig {
    /// Only a global cap: no prefetch, per-run or tag caps, no launch rate.
    pub fn capped(max_concurrent: usize) -> Self {
        Self {
            max_concurrent,
            prefetch: 0,
            max_per_run: None,
            tag_limits: Vec::new(),
            launch_rate: None,
            launch_burst: NonZeroU32::MIN,
        }
    }
}

/// What admission needs to know about a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub run_id: String,
    /// Higher first.
    pub priority: i32,
    pub tags: BTreeMap<String, String>,
}

/// (index of the tag limit, counted value: empty unless the limit is per unique value).
type TagBucket = (usize, String);

struct Waiter {
    id: u64,
    ticket: Ticket,
    /// The tag counters this step uses, worked out once.
    buckets: Vec<TagBucket>,
    grant: oneshot::Sender<()>,
}

/// The run-slot bookkeeping. Plain data behind a mutex: every decision is a short scan.
struct Scheduler {
    max_concurrent: usize,
    max_per_run: Option<usize>,
    tag_limits: Vec<TagLimit>,
    running: usize,
    running_per_run: HashMap<String, usize>,
    running_per_tag: HashMap<TagBucket, usize>,
    /// In arrival order (ids increase).
    waiting: Vec<Waiter>,
    next_id: u64,
    decisions: u64,
}

impl Scheduler {
    fn buckets(&self, ticket: &Ticket) -> Vec<TagBucket> {
        self.tag_limits
            .iter()
            .enumerate()
            .filter_map(|(i, limit)| limit.bucket(i, &ticket.tags))
            .collect()
    }

    fn fits(&self, ticket: &Ticket, buckets: &[TagBucket]) -> bool {
        if self.running >= self.max_concurrent {
            return false;
        }
        let run = self
            .running_per_run
            .get(&ticket.run_id)
            .copied()
            .unwrap_or(0);
        if self.max_per_run.is_some_and(|cap| run >= cap) {
            return false;
        }
        buckets.iter().all(|bucket| {
            self.running_per_tag.get(bucket).copied().unwrap_or(0) < self.tag_limits[bucket.0].limit
        })
    }

    fn take(&mut self, ticket: &Ticket, buckets: &[TagBucket]) {
        self.running += 1;
        *self
            .running_per_run
            .entry(ticket.run_id.clone())
            .or_default() += 1;
        for bucket in buckets {
            *self.running_per_tag.entry(bucket.clone()).or_default() += 1;
        }
    }

    fn give_back(&mut self, ticket: &Ticket, buckets: &[TagBucket]) {
        self.running -= 1;
        decrement(&mut self.running_per_run, &ticket.run_id);
        for bucket in buckets {
            decrement(&mut self.running_per_tag, bucket);
        }
    }

    /// Grants slots to waiters while any fits: highest priority, then the run with the
    /// fewest running steps, then the earliest arrival.
    fn dispatch(&mut self) {
        while self.running < self.max_concurrent {
            let best = self
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, w)| self.fits(&w.ticket, &w.buckets))
                .min_by_key(|(_, w)| {
                    let run_running = self
                        .running_per_run
                        .get(&w.ticket.run_id)
                        .copied()
                        .unwrap_or(0);
                    (std::cmp::Reverse(w.ticket.priority), run_running, w.id)
                })
                .map(|(index, _)| index);
            let Some(index) = best else { return };
            let waiter = self.waiting.remove(index);
            self.decisions += 1;
            self.take(&waiter.ticket, &waiter.buckets);
            if waiter.grant.send(()).is_err() {
                // Its admit() was dropped between our lock and now.
                self.give_back(&waiter.ticket, &waiter.buckets);
            }
        }
    }
}

fn decrement<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(count) = counts.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(key);
        }
    }
}

pub struct Admission {
    held: Arc<Semaphore>,
    max_held: usize,
    scheduler: Arc<Mutex<Scheduler>>,
    config: AdmissionConfig,
    launches: Option<DefaultDirectRateLimiter>,
}

/// A run slot; dropping it frees the slot and wakes the next waiter that fits.
pub struct Slot {
    scheduler: Arc<Mutex<Scheduler>>,
    ticket: Ticket,
    buckets: Vec<TagBucket>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut scheduler = self.scheduler.lock();
        scheduler.give_back(&self.ticket, &self.buckets);
        scheduler.dispatch();
    }
}

/// Removes a waiter whose admit() was dropped, or gives back a slot granted meanwhile.
struct WaitGuard {
    scheduler: Arc<Mutex<Scheduler>>,
    id: u64,
    /// Taken once the slot is ours.
    ticket: Option<(Ticket, Vec<TagBucket>)>,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let Some((ticket, buckets)) = self.ticket.take() else {
            return;
        };
        let mut scheduler = self.scheduler.lock();
        if let Some(index) = scheduler.waiting.iter().position(|w| w.id == self.id) {
            scheduler.waiting.remove(index);
        } else {
            // Granted after we stopped waiting: the slot is ours to give back.
            scheduler.give_back(&ticket, &buckets);
            scheduler.dispatch();
        }
    }
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        let max_held = config.max_concurrent + config.prefetch;
        Self {
            held: Arc::new(Semaphore::new(max_held)),
            max_held,
            scheduler: Arc::new(Mutex::new(Scheduler {
                max_concurrent: config.max_concurrent,
                max_per_run: config.max_per_run,
                tag_limits: config.tag_limits.clone(),
                running: 0,
                running_per_run: HashMap::new(),
                running_per_tag: HashMap::new(),
                waiting: Vec::new(),
                next_id: 0,
                decisions: 0,
            })),
            launches: config.launch_rate.map(|rate| {
                RateLimiter::direct(Quota::per_second(rate).allow_burst(config.launch_burst))
            }),
            config,
        }
    }

    /// Waits for room to hold one more message.
    pub(crate) async fn reserve(&self) -> OwnedSemaphorePermit {
        self.held
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Room to hold another message right now, if any.
    pub(crate) fn try_reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.held.clone().try_acquire_owned().ok()
    }

    /// Waits for a run slot under every cap, in priority and fair-share order.
    pub async fn admit(&self, ticket: Ticket) -> Slot {
        let (grant, granted) = oneshot::channel();
        let mut guard = {
            let mut scheduler = self.scheduler.lock();
            let id = scheduler.next_id;
            scheduler.next_id += 1;
            let buckets = scheduler.buckets(&ticket);
            scheduler.waiting.push(Waiter {
                id,
                ticket: ticket.clone(),
                buckets: buckets.clone(),
                grant,
            });
            scheduler.dispatch();
            WaitGuard {
                scheduler: self.scheduler.clone(),
                id,
                ticket: Some((ticket, buckets)),
            }
        };
        granted
            .await
            .expect("a waiter's sender is only dropped after it was granted");
        let (ticket, buckets) = guard.ticket.take().expect("set until granted");
        Slot {
            scheduler: self.scheduler.clone(),
            ticket,
            buckets,
        }
    }

    /// Waits until the launch rate allows one more launch.
    pub(crate) async fn until_launch_allowed(&self) {
        if let Some(limiter) = &self.launches {
            limiter.until_ready().await;
        }
    }

    pub fn view(&self) -> AdmissionView {
        AdmissionView {
            held: self.held.clone(),
            max_held: self.max_held,
            scheduler: self.scheduler.clone(),
            config: self.config.clone(),
        }
    }
}

/// A read-only handle on the admission state, for the dashboard and benchmarks.
#[derive(Clone)]
pub struct AdmissionView {
    held: Arc<Semaphore>,
    max_held: usize,
    scheduler: Arc<Mutex<Scheduler>>,
    config: AdmissionConfig,
}

/// What the dashboard shows about admission.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct AdmissionState {
    /// Messages held now: running steps and steps waiting for a slot.
    pub in_use: usize,
    /// Steps holding a run slot.
    pub running: usize,
    /// Steps waiting for a slot (held messages).
    pub waiting: usize,
    pub max_concurrent: usize,
    pub prefetch: usize,
    pub max_per_run: Option<usize>,
    /// `--tag-limit` values as given.
    pub tag_limits: Vec<String>,
    /// Slots granted since start.
    pub decisions: u64,
    /// Launches per second; `None`: unlimited.
    pub launch_rate: Option<u32>,
    pub launch_burst: u32,
}

impl AdmissionView {
    pub(crate) fn state(&self) -> AdmissionState {
        let scheduler = self.scheduler.lock();
        AdmissionState {
            in_use: self.max_held - self.held.available_permits(),
            running: scheduler.running,
            waiting: scheduler.waiting.len(),
            max_concurrent: self.config.max_concurrent,
            prefetch: self.config.prefetch,
            max_per_run: self.config.max_per_run,
            tag_limits: self
                .config
                .tag_limits
                .iter()
                .map(ToString::to_string)
                .collect(),
            decisions: scheduler.decisions,
            launch_rate: self.config.launch_rate.map(NonZeroU32::get),
            launch_burst: self.config.launch_burst.get(),
        }
    }
}

/// The admission flags: how many steps run at once, and how fast they launch.
#[derive(Debug, Clone, clap::Args)]
pub struct AdmissionArgs {
    /// Steps run at once by this controller.
    #[arg(long, env = "DAGSTER_TASKIQ_MAX_CONCURRENT", default_value_t = 16)]
    pub max_concurrent: usize,

    /// Steps of one Dagster run run at once by this controller (0: no cap).
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_MAX_CONCURRENT_PER_RUN",
        default_value_t = 0
    )]
    pub max_concurrent_per_run: usize,

    /// Cap on running steps by op tag, as Dagster's tag_concurrency_limits: `key=value:N`
    /// (that value), `key:N` (any value, shared) or `key=*:N` (each value its own cap).
    /// Repeatable; comma-separated in the environment.
    #[arg(
        long = "tag-limit",
        env = "DAGSTER_TASKIQ_TAG_LIMITS",
        value_delimiter = ','
    )]
    pub tag_limits: Vec<TagLimit>,

    /// Messages held beyond the running steps, ready to start when a slot frees.
    #[arg(long, env = "DAGSTER_TASKIQ_PREFETCH", default_value_t = 10)]
    pub prefetch: usize,

    /// Seconds a held message may wait for a run slot before it goes back to the queue for
    /// other replicas (0: wait here).
    #[arg(long, env = "DAGSTER_TASKIQ_WAITING_LIMIT", default_value = "30", value_parser = parse_seconds)]
    pub waiting_limit: Duration,

    /// Launches per second (token bucket); 0 means unlimited.
    #[arg(long, env = "DAGSTER_TASKIQ_LAUNCH_RATE", default_value_t = 0)]
    pub launch_rate: u32,

    /// Launches allowed back to back before the rate applies.
    #[arg(long, env = "DAGSTER_TASKIQ_LAUNCH_BURST", default_value_t = 10)]
    pub launch_burst: u32,
}

impl AdmissionArgs {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrent == 0 {
            return Err(invalid("max-concurrent", "must be at least 1"));
        }
        if self.launch_burst == 0 {
            return Err(invalid("launch-burst", "must be at least 1"));
        }
        Ok(())
    }

    pub fn config(&self) -> AdmissionConfig {
        AdmissionConfig {
            max_concurrent: self.max_concurrent,
            prefetch: self.prefetch,
            max_per_run: (self.max_concurrent_per_run > 0).then_some(self.max_concurrent_per_run),
            tag_limits: self.tag_limits.clone(),
            launch_rate: NonZeroU32::new(self.launch_rate),
            launch_burst: NonZeroU32::new(self.launch_burst).unwrap_or(NonZeroU32::MIN),
        }
    }

    /// `None`: held messages wait for a slot however long it takes.
    pub fn waiting_limit(&self) -> Option<Duration> {
        (!self.waiting_limit.is_zero()).then_some(self.waiting_limit)
    }
}

#[cfg(test)]
mod tests;
