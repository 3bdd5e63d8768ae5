//! One shared poller for every ECS task this controller waits on: each interval it calls
//! DescribeTasks once per 100 tracked tasks (the ECS limit), never once per step, and
//! publishes each task's latest view on a watch channel its [`RunningStep`] waits on.
//!
//! [`RunningStep`]: crate::launcher::RunningStep

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::api::EcsApi;
use super::outcome::TaskView;
use crate::metrics::Metrics;

/// ECS takes at most this many tasks per DescribeTasks.
pub(crate) const DESCRIBE_BATCH: usize = 100;
/// Polls in a row that report a task MISSING before it counts as gone (a just-started task
/// can lag in DescribeTasks).
const MISSING_POLLS: u32 = 3;

/// What the tracker knows about a task.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tracked {
    /// Not described yet.
    Pending,
    /// Latest view; final once `last_status` is STOPPED.
    Seen(TaskView),
    /// DescribeTasks no longer knows it.
    Vanished,
}

impl Tracked {
    pub(crate) fn is_final(&self) -> bool {
        match self {
            Tracked::Pending => false,
            Tracked::Seen(view) => view.is_stopped(),
            Tracked::Vanished => true,
        }
    }
}

struct Entry {
    tx: watch::Sender<Tracked>,
    missing: u32,
}

pub(crate) struct Tracker {
    cluster: String,
    interval: Duration,
    api: Arc<dyn EcsApi>,
    metrics: Arc<Metrics>,
    tasks: Mutex<HashMap<String, Entry>>,
}

impl Tracker {
    pub(crate) fn new(
        cluster: String,
        interval: Duration,
        api: Arc<dyn EcsApi>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            cluster,
            interval,
            api,
            metrics,
            tasks: Mutex::new(HashMap::new()),
        }
    }

    /// Starts following a task; `known` is a view already in hand (from RunTask or adoption).
    pub(crate) fn track(&self, arn: &str, known: Option<TaskView>) -> watch::Receiver<Tracked> {
        let mut tasks = self.tasks.lock();
        if let Some(entry) = tasks.get(arn) {
            return entry.tx.subscribe();
        }
        let initial = known.map_or(Tracked::Pending, Tracked::Seen);
        let (tx, rx) = watch::channel(initial.clone());
        if !initial.is_final() {
            tasks.insert(arn.to_owned(), Entry { tx, missing: 0 });
            self.metrics.ecs_tasks_tracked.set(tasks.len() as i64);
        }
        rx
    }

    pub(crate) fn tracked(&self) -> usize {
        self.tasks.lock().len()
    }

    /// Polls until `stop` is cancelled.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => self.poll().await,
            }
        }
    }

    /// One round: a DescribeTasks per batch of tracked tasks.
    pub(crate) async fn poll(&self) {
        let arns: Vec<String> = {
            let mut tasks = self.tasks.lock();
            // Nobody waits any more (the step was settled or dropped): stop polling it.
            tasks.retain(|_, entry| entry.tx.receiver_count() > 0);
            tasks.keys().cloned().collect()
        };
        for batch in arns.chunks(DESCRIBE_BATCH) {
            let result = self.api.describe_tasks(&self.cluster, batch).await;
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) => e.class.name(),
            };
            self.metrics
                .ecs_api_calls
                .get_or_create(&[("operation", "DescribeTasks"), ("result", outcome)])
                .inc();
            let described = match result {
                Ok(described) => described,
                Err(e) => {
                    // The next round tries again; the steps just wait a little longer.
                    tracing::warn!(%e, tasks = batch.len(), "DescribeTasks failed");
                    continue;
                }
            };
            let mut tasks = self.tasks.lock();
            for view in described.tasks {
                let arn = view.task_arn.clone();
                let stopped = view.is_stopped();
                if let Some(entry) = tasks.get_mut(&arn) {
                    entry.missing = 0;
                    entry.tx.send_if_modified(|current| {
                        let next = Tracked::Seen(view);
                        let changed = *current != next;
                        *current = next;
                        changed
                    });
                }
                if stopped {
                    tasks.remove(&arn);
                }
            }
            for arn in described.missing {
                let gone = tasks.get_mut(&arn).is_some_and(|entry| {
                    entry.missing += 1;
                    entry.missing >= MISSING_POLLS
                });
                if gone {
                    tracing::warn!(task = %arn, "ECS no longer knows the task");
                    if let Some(entry) = tasks.remove(&arn) {
                        entry.tx.send_replace(Tracked::Vanished);
                    }
                }
            }
        }
        self.metrics.ecs_tasks_tracked.set(self.tracked() as i64);
    }
}
