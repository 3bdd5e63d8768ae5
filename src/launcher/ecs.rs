//! Each step as its own ECS task (docs/ecs.md).
//!
//! - **Idempotent**: every task of a step attempt carries `startedBy` derived from the
//!   message's task id; RunTask's `clientToken` is derived from (task id, delivery), so a
//!   retried call of one delivery never starts a second task. A redelivered message first
//!   looks for its tasks (ListTasks by `startedBy`, running and stopped) and **adopts** a live
//!   one, or the stopped one whose outcome is still to be concluded; it relaunches only when
//!   the last task never got to start its container.
//! - **Tracked together**: one [`tracker::Tracker`] describes all running tasks, 100 per call.
//! - **Throttling-safe**: RunTask goes through its own token bucket and is retried with
//!   backoff on throttling (`ThrottlingException` or "Rate exceeded") and 5xx, always with the
//!   same `clientToken`.
//! - **Small overrides**: when the compressed step args would push the overrides over ECS's
//!   8192 characters, they are put in S3 and the task gets a pointer that the Python shim
//!   `dagster_taskiq_controller.ecs_entrypoint` resolves.
//! - **Survives the controller**: on shutdown the task keeps running and its message is
//!   handed back for another replica to adopt.

pub(crate) mod api;
mod args;
pub(crate) mod outcome;
pub(crate) mod request;
pub(crate) mod task_definitions;
pub(crate) mod tracker;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use self::api::{ApiError, BlobStore, Desired, EcsApi, ErrorClass};
pub(crate) use self::args::EcsArgs;
pub use self::outcome::EcsStopCause;
use self::outcome::TaskView;
use self::request::{
    BaseRequest, CapacityProviderItem, NetworkConfiguration, OverridePolicy, RunEcs,
    RunTaskRequest, StepArgs, StepSettings, OVERRIDES_LIMIT,
};
use self::task_definitions::{BaseDefinition, TaskDefinitions};
use self::tracker::{Tracked, Tracker};
use super::{LaunchError, Launcher, RunningStep, StepExit};
use crate::envelope::{LauncherKind, StepRequest};
use crate::metrics::Metrics;
use crate::retry::{retry, Backoff, RetryBudget};

/// RunTask calls per launch before giving the message back with backoff.
const RUN_TASK_TRIES: u32 = 5;
/// Backoff between those calls.
const RUN_TASK_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(250),
    cap: Duration::from_secs(5),
};
/// StopTask calls before giving up (the task is then stopped by its own end or a later call).
const STOP_TASK_TRIES: u32 = 3;

/// Where offloaded step args go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffloadConfig {
    pub bucket: String,
    /// Key prefix; the object key is `<prefix><task_id>`.
    pub prefix: String,
}

#[derive(Debug, Clone)]
pub struct EcsLauncherConfig {
    pub cluster: String,
    /// Family, family:revision or ARN.
    pub task_definition: String,
    /// The container that runs the step; `None`: the task definition's only container.
    pub container: Option<String>,
    pub launch_type: Option<String>,
    pub capacity_provider_strategy: Vec<CapacityProviderItem>,
    pub network_configuration: Option<NetworkConfiguration>,
    /// How often the tracker describes running tasks.
    pub poll_interval: Duration,
    /// RunTask calls per second (token bucket) and burst.
    pub run_task_rate: NonZeroU32,
    pub run_task_burst: NonZeroU32,
    pub offload: Option<OffloadConfig>,
    pub controller_id: String,
    /// What a step's op tags may change in its task.
    pub(crate) override_policy: OverridePolicy,
    /// The task definition as read at start (`connect`): what a run's image replaces.
    pub(crate) base: Option<BaseDefinition>,
}

/// Why the launcher cannot start.
#[derive(Debug, thiserror::Error)]
pub enum EcsSetupError {
    #[error("cannot read task definition {task_definition}: {source}")]
    TaskDefinition {
        task_definition: String,
        source: ApiError,
    },
    #[error("task definition {task_definition} has containers {names:?}: name the step's with --ecs-container")]
    AmbiguousContainer {
        task_definition: String,
        names: Vec<String>,
    },
    #[error(
        "task definition {task_definition} has no container named {container:?} (it has {names:?})"
    )]
    NoSuchContainer {
        task_definition: String,
        container: String,
        names: Vec<String>,
    },
}

pub struct EcsLauncher {
    base: BaseRequest,
    policy: OverridePolicy,
    api: Arc<dyn EcsApi>,
    blobs: Arc<dyn BlobStore>,
    offload: Option<OffloadConfig>,
    tracker: Arc<Tracker>,
    task_definitions: TaskDefinitions,
    limiter: DefaultDirectRateLimiter,
    metrics: Arc<Metrics>,
    /// Stops the tracker when the launcher goes.
    _tracker_guard: DropGuard,
}

impl EcsLauncher {
    /// Connects to ECS and S3 with the standard AWS configuration and checks the task
    /// definition (finding the step container when none is named).
    pub async fn connect(
        config: EcsLauncherConfig,
        aws: &aws_config::SdkConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, EcsSetupError> {
        let api: Arc<dyn EcsApi> = Arc::new(api::AwsEcs::new(crate::aws::ecs_client(aws)));
        let s3 = crate::aws::s3_client(aws, None);
        let view = api
            .describe_task_definition(&config.task_definition)
            .await
            .and_then(|view| {
                view.ok_or_else(|| ApiError {
                    operation: "DescribeTaskDefinition",
                    class: ErrorClass::Permanent,
                    code: None,
                    message: "no such task definition".into(),
                })
            })
            .map_err(|source| EcsSetupError::TaskDefinition {
                task_definition: config.task_definition.clone(),
                source,
            })?;
        let names: Vec<String> = view.containers.iter().map(|c| c.name.clone()).collect();
        let container = match (&config.container, names.as_slice()) {
            (Some(name), _) if names.contains(name) => name.clone(),
            (Some(name), _) => {
                return Err(EcsSetupError::NoSuchContainer {
                    task_definition: config.task_definition.clone(),
                    container: name.clone(),
                    names,
                })
            }
            (None, [only]) => only.clone(),
            (None, _) => {
                return Err(EcsSetupError::AmbiguousContainer {
                    task_definition: config.task_definition.clone(),
                    names,
                })
            }
        };
        let config = EcsLauncherConfig {
            base: BaseDefinition::from_view(&view, &container),
            container: Some(container),
            ..config
        };
        Ok(Self::new(
            config,
            api,
            Arc::new(api::AwsBlobStore::new(s3)),
            metrics,
        ))
    }

    /// A launcher on the given API implementations. Spawns the tracker (needs a runtime).
    pub(crate) fn new(
        config: EcsLauncherConfig,
        api: Arc<dyn EcsApi>,
        blobs: Arc<dyn BlobStore>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let base = BaseRequest {
            cluster: config.cluster.clone(),
            task_definition: config.task_definition.clone(),
            container: config.container.clone().unwrap_or_default(),
            launch_type: config.launch_type.clone(),
            capacity_provider_strategy: config.capacity_provider_strategy.clone(),
            network_configuration: config.network_configuration.clone(),
            controller_id: config.controller_id.clone(),
        };
        let tracker = Arc::new(Tracker::new(
            config.cluster.clone(),
            config.poll_interval,
            api.clone(),
            metrics.clone(),
        ));
        let stop = CancellationToken::new();
        tokio::spawn(tracker.clone().run(stop.clone()));
        let base_definition = config.base.unwrap_or_else(|| BaseDefinition {
            arn: config.task_definition.clone(),
            container: base.container.clone(),
            image: String::new(),
            logs: None,
        });
        let task_definitions = TaskDefinitions::new(base_definition, api.clone(), metrics.clone());
        Self {
            base,
            policy: config.override_policy,
            api,
            blobs,
            offload: config.offload,
            tracker,
            task_definitions,
            limiter: RateLimiter::direct(
                Quota::per_second(config.run_task_rate).allow_burst(config.run_task_burst),
            ),
            metrics,
            _tracker_guard: stop.drop_guard(),
        }
    }

    fn count(&self, operation: &'static str, result: &Result<impl Sized, ApiError>) {
        api::count_call(&self.metrics, operation, result);
    }

    /// The step's task from an earlier delivery, if one should be adopted rather than a new
    /// one launched.
    async fn find_existing(&self, step: &StepRequest) -> Result<Option<TaskView>, ApiError> {
        let started_by = request::started_by(&step.task_id);
        let cluster = &self.base.cluster;
        let mut arns = Vec::new();
        for desired in [Desired::Running, Desired::Stopped] {
            let result = self.api.list_tasks(cluster, &started_by, desired).await;
            self.count("ListTasks", &result);
            for arn in result? {
                if !arns.contains(&arn) {
                    arns.push(arn);
                }
            }
        }
        if arns.is_empty() {
            return Ok(None);
        }
        let mut views = Vec::new();
        for batch in arns.chunks(tracker::DESCRIBE_BATCH) {
            let result = self.api.describe_tasks(cluster, batch).await;
            self.count("DescribeTasks", &result);
            views.extend(result?.tasks);
        }
        // Newest first.
        views.sort_by(|a, b| {
            b.created_at
                .unwrap_or_default()
                .total_cmp(&a.created_at.unwrap_or_default())
        });
        let (live, stopped): (Vec<_>, Vec<_>) = views.into_iter().partition(|v| !v.is_stopped());
        if let Some((newest, extra)) = live.split_first() {
            for duplicate in extra {
                // Two live tasks for one attempt should never happen; keep one.
                tracing::warn!(task = %duplicate.task_arn, "stopping a duplicate ECS task of the attempt");
                self.stop(
                    &duplicate.task_arn,
                    "dagster-taskiq-controller: duplicate execution of the step attempt",
                );
            }
            return Ok(Some(newest.clone()));
        }
        let Some(last) = stopped.into_iter().next() else {
            return Ok(None);
        };
        let (cause, _) = last.stop_cause(&self.base.container);
        if cause.never_started() {
            tracing::info!(task = %last.task_arn, cause = cause.name(), "the attempt's last ECS task never started: launching again");
            return Ok(None);
        }
        Ok(Some(last))
    }

    /// What the run stored (its image, executor env_vars and secrets) into the settings:
    /// checked, and the task definition for the image registered or found.
    async fn apply_run(
        &self,
        step: &StepRequest,
        settings: &mut StepSettings,
    ) -> Result<(), LaunchError> {
        let Some(stored) = &step.stored_ecs else {
            return Ok(());
        };
        let run = RunEcs::from_stored(stored, &self.policy, &self.task_definitions.base().image)
            .map_err(|e| LaunchError::Invalid {
                reason: e.reason(),
                detail: e.to_string(),
            })?;
        settings.run_environment = run.environment.clone();
        if !run.needs_task_definition() {
            return Ok(());
        }
        if settings.chooses_task_definition() {
            if !run.secrets.is_empty() {
                return Err(LaunchError::Invalid {
                    reason: "invalid_executor_config",
                    detail: "execution config secrets: op tag ecs/run_task_kwargs picks the \
                             taskDefinition, and secrets can only be added to the controller's \
                             own (RunTask overrides cannot carry secrets)"
                        .into(),
                });
            }
            tracing::info!("op tag ecs/run_task_kwargs picks the task definition: the run's image is not applied");
            return Ok(());
        }
        let arn = self
            .task_definitions
            .for_run(run.image.as_deref(), &run.secrets)
            .await
            .map_err(|e| {
                let text = format!("cannot get the task definition of the run's image: {e}");
                if e.retryable() {
                    LaunchError::Transient(text)
                } else {
                    LaunchError::Permanent(text)
                }
            })?;
        settings.run_task_definition = Some(arn);
        Ok(())
    }

    /// The request for this delivery, with the args inline or offloaded to S3.
    async fn request(
        &self,
        step: &StepRequest,
        settings: &StepSettings,
        delivery: u32,
    ) -> Result<RunTaskRequest, LaunchError> {
        let compressed = step.compressed_step_args();
        let inline = settings.build(
            &self.base,
            step,
            delivery,
            &StepArgs::Inline(compressed.clone()),
        );
        if inline.overrides_fit() {
            return Ok(inline);
        }
        let inline_chars = inline.overrides_chars();
        let Some(offload) = &self.offload else {
            return Err(LaunchError::Invalid {
                reason: "overrides_too_large",
                detail: format!(
                    "the RunTask overrides would be {inline_chars} characters (ECS allows \
                     {OVERRIDES_LIMIT}) and no --offload-bucket is configured for the step args"
                ),
            });
        };
        // Keyed by content: a message cannot overwrite another step's args by choosing a
        // task id, and the same args written twice are the same object.
        let sha256 = hex::encode(Sha256::digest(compressed.as_bytes()));
        let key = format!("{}{sha256}", offload.prefix);
        let result = self
            .blobs
            .put(&offload.bucket, &key, compressed.into_bytes())
            .await;
        self.count("PutObject", &result);
        result.map_err(|e| match e.class {
            ErrorClass::Permanent => LaunchError::Permanent(e.to_string()),
            _ => LaunchError::Transient(e.to_string()),
        })?;
        let uri = format!("s3://{}/{key}", offload.bucket);
        tracing::info!(%uri, inline_chars, "step args offloaded: the overrides would not fit");
        let offloaded = settings.build(
            &self.base,
            step,
            delivery,
            &StepArgs::Offloaded { uri, sha256 },
        );
        if !offloaded.overrides_fit() {
            return Err(LaunchError::Invalid {
                reason: "overrides_too_large",
                detail: format!(
                    "even with the step args in S3 the RunTask overrides are {} characters \
                     (ECS allows {OVERRIDES_LIMIT}): shrink ecs/container_overrides or \
                     ecs/task_overrides",
                    offloaded.overrides_chars()
                ),
            });
        }
        Ok(offloaded)
    }

    /// RunTask under the rate limit, retried on throttling and transient failures with the
    /// same clientToken (so a call that did start a task is never doubled).
    async fn run_task(&self, request: &RunTaskRequest) -> Result<TaskView, LaunchError> {
        let started = retry(
            RetryBudget::tries(RUN_TASK_BACKOFF, RUN_TASK_TRIES),
            || self.run_task_once(request),
            |error, attempt, pause| {
                tracing::warn!(%error, attempt, ?pause, "RunTask failed; retrying with the same clientToken");
            },
        )
        .await;
        started.map_err(|error| {
            if error.retryable() {
                LaunchError::Transient(error.to_string())
            } else {
                LaunchError::Permanent(error.to_string())
            }
        })
    }

    /// One RunTask call under the rate limit; an answer without a task is an error, transient
    /// when ECS had no capacity right then.
    async fn run_task_once(&self, request: &RunTaskRequest) -> Result<TaskView, ApiError> {
        self.limiter.until_ready().await;
        let result = self.api.run_task(request).await;
        self.count("RunTask", &result);
        let out = result?;
        if let Some(task) = out.tasks.into_iter().next() {
            return Ok(task);
        }
        let reasons: Vec<String> = out
            .failures
            .iter()
            .map(|(arn, reason, detail)| format!("{reason} {detail} {arn}"))
            .collect();
        // No capacity now (RESOURCE:CPU, RESOURCE:MEMORY, AGENT ...) may pass.
        let capacity = out.failures.iter().all(|(_, reason, _)| {
            reason.starts_with("RESOURCE") || reason.contains("AGENT") || reason.contains("apacity")
        });
        Err(ApiError {
            operation: "RunTask",
            class: if capacity {
                ErrorClass::Transient
            } else {
                ErrorClass::Permanent
            },
            code: None,
            message: format!("no task started: {}", reasons.join("; ").trim()),
        })
    }

    fn running(&self, view: TaskView, step: &StepRequest, adopted: bool) -> Box<dyn RunningStep> {
        let arn = view.task_arn.clone();
        let rx = self.tracker.track(&arn, Some(view));
        let links = crate::links::ecs_links(
            &arn,
            &self.base.container,
            self.task_definitions.base().logs.as_ref(),
        );
        Box::new(EcsStep {
            arn,
            links,
            container: self.base.container.clone(),
            stopper: Stopper {
                api: self.api.clone(),
                cluster: self.base.cluster.clone(),
            },
            rx,
            exit: None,
            stop_sent: false,
            // The request put the shim with the timeout in the task (request/build.rs).
            enforces_timeout: step.timeout.is_some(),
            adopted,
        })
    }

    fn stop(&self, arn: &str, reason: &str) {
        Stopper {
            api: self.api.clone(),
            cluster: self.base.cluster.clone(),
        }
        .stop(arn, reason);
    }
}

#[async_trait]
impl Launcher for EcsLauncher {
    fn kind(&self) -> LauncherKind {
        LauncherKind::Ecs
    }

    async fn has_execution_to_adopt(&self, step: &StepRequest) -> bool {
        // On an ECS error, say no: the caller then treats the delivery as a failed one.
        matches!(self.find_existing(step).await, Ok(Some(_)))
    }

    async fn launch(&self, step: &StepRequest) -> Result<Box<dyn RunningStep>, LaunchError> {
        let span = tracing::info_span!("ecs_launch", delivery = step.receive_count);
        async {
            // A first delivery has no task yet (an SQS duplicate of it gets the same
            // clientToken); any other may have one to adopt. That one was launched under the
            // policy of its time, so it is adopted even if the tags are refused now.
            if step.receive_count != 1 {
                let existing = self.find_existing(step).await.map_err(|e| {
                    LaunchError::Transient(format!("cannot look for the attempt's task: {e}"))
                })?;
                if let Some(view) = existing {
                    let state = if view.is_stopped() { "stopped" } else { "running" };
                    tracing::info!(task = %view.task_arn, status = %view.last_status, "adopting the {state} ECS task of the attempt");
                    return Ok(self.running(view, step, true));
                }
            }
            let mut settings =
                StepSettings::from_tags(&step.tags, &self.base.container, &self.policy)
                    .map_err(|e| LaunchError::Invalid {
                        reason: e.reason(),
                        detail: e.to_string(),
                    })?;
            self.apply_run(step, &mut settings).await?;
            let request = self
                .request(step, &settings, step.receive_count.max(1))
                .await?;
            let view = self.run_task(&request).await?;
            tracing::info!(task = %view.task_arn, "ECS task started");
            Ok(self.running(view, step, false))
        }
        .instrument(span)
        .await
    }
}

/// Sends StopTask in the background (RunningStep's stop methods are not async).
#[derive(Clone)]
struct Stopper {
    api: Arc<dyn EcsApi>,
    cluster: String,
}

impl Stopper {
    fn stop(&self, arn: &str, reason: &str) {
        let this = self.clone();
        let arn = arn.to_owned();
        let reason = reason.to_owned();
        tokio::spawn(
            async move {
                let stopped = retry(
                    RetryBudget::tries(RUN_TASK_BACKOFF, STOP_TASK_TRIES),
                    || this.api.stop_task(&this.cluster, &arn, &reason),
                    |_, _, _| {},
                )
                .await;
                match stopped {
                    Ok(()) => tracing::info!(task = %arn, %reason, "StopTask sent"),
                    Err(e) => tracing::warn!(task = %arn, %e, "StopTask failed"),
                }
            }
            .in_current_span(),
        );
    }
}

/// A step running as an ECS task; its status comes from the shared tracker.
struct EcsStep {
    arn: String,
    /// The task and its log stream in the AWS console.
    links: Vec<crate::links::Link>,
    container: String,
    stopper: Stopper,
    rx: watch::Receiver<Tracked>,
    exit: Option<StepExit>,
    stop_sent: bool,
    enforces_timeout: bool,
    /// Found running from an earlier delivery, not launched by this one.
    adopted: bool,
}

impl EcsStep {
    fn stop(&mut self, reason: &str) {
        if self.exit.is_some() || self.stop_sent {
            return;
        }
        self.stop_sent = true;
        self.stopper.stop(&self.arn, reason);
    }
}

#[async_trait]
impl RunningStep for EcsStep {
    fn locator(&self) -> String {
        self.arn.clone()
    }

    fn links(&self) -> Vec<crate::links::Link> {
        self.links.clone()
    }

    fn pid(&self) -> Option<u32> {
        None
    }

    async fn wait(&mut self) -> StepExit {
        if let Some(exit) = self.exit {
            return exit;
        }
        // An error means the tracker dropped the channel; its last value still counts.
        let _ = self.rx.wait_for(Tracked::is_final).await;
        let exit = match &*self.rx.borrow() {
            Tracked::Seen(view) if view.is_stopped() => {
                let (cause, exit_code) = view.stop_cause(&self.container);
                StepExit::Ecs { cause, exit_code }
            }
            _ => StepExit::Ecs {
                cause: EcsStopCause::Vanished,
                exit_code: None,
            },
        };
        self.exit = Some(exit);
        exit
    }

    fn terminate(&mut self) {
        // ECS sends SIGTERM, then SIGKILL after the container's stopTimeout.
        self.stop("dagster-taskiq-controller: step terminated (run canceled or timed out)");
    }

    fn kill(&mut self) {
        self.stop("dagster-taskiq-controller: step killed");
    }

    fn stderr_tail(&self) -> Vec<String> {
        match &*self.rx.borrow() {
            Tracked::Seen(view) => view.report_lines(),
            Tracked::Pending => vec![format!("ECS task {} (not described yet)", self.arn)],
            Tracked::Vanished => vec![format!("ECS task {} (no longer known to ECS)", self.arn)],
        }
    }

    fn survives_controller(&self) -> bool {
        true
    }

    fn adopted(&self) -> bool {
        self.adopted
    }

    fn enforces_timeout(&self) -> bool {
        self.enforces_timeout
    }
}

#[cfg(test)]
mod tests;
