//! Settings from flags and environment variables (clap), validated with clear errors.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::admission::{AdmissionConfig, TagLimit};
use crate::envelope::LauncherKind;
use crate::launcher::ecs::request::{
    check_strategy, AwsVpcConfiguration, CapacityProviderItem, NetworkConfiguration,
};
use crate::launcher::ecs::{EcsLauncherConfig, OffloadConfig};

/// SQS caps a visibility timeout at 12 hours.
const MAX_VISIBILITY_SECS: f64 = 43_200.0;

#[derive(Debug, Parser)]
#[command(
    name = "dagster-taskiq-controller",
    version,
    args_override_self = true,
    about = "Runs Dagster steps published to SQS (TaskIQ format) as isolated processes or ECS tasks"
)]
pub struct Cli {
    /// Log output format.
    #[arg(long, env = "DAGSTER_TASKIQ_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Receive step messages and run them until SIGTERM/SIGINT.
    Run(RunArgs),
    /// Check the configuration `run` would use and what it reaches; exits 1 on any failure.
    Doctor(RunArgs),
    /// List dead letters, or move selected ones back to the work queue.
    Dlq(DlqArgs),
}

#[derive(Debug, Clone, Args)]
pub struct DlqArgs {
    /// URL of the SQS work queue.
    #[arg(long, env = "DAGSTER_TASKIQ_SQS_QUEUE_URL")]
    pub queue_url: String,

    /// URL of the dead-letter queue. Default: the work queue's RedrivePolicy target.
    #[arg(long, env = "DAGSTER_TASKIQ_SQS_DLQ_URL")]
    pub dlq_url: Option<String>,

    #[command(subcommand)]
    pub action: DlqAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum DlqAction {
    /// Show dead letters: reason, run, step, age. Reading does not remove them.
    List {
        /// Most dead letters to show.
        #[arg(long, default_value_t = 100)]
        max: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send matching dead letters back to the work queue (then delete them from the DLQ).
    #[command(group(
        clap::ArgGroup::new("selection").required(true).multiple(true)
            .args(["reason", "run_id", "task_id", "all"])
    ))]
    Redrive {
        /// Only dead letters with this reason (e.g. attempts_exhausted).
        #[arg(long)]
        reason: Option<String>,
        /// Only the steps of this Dagster run.
        #[arg(long = "run-id")]
        run_id: Option<String>,
        /// Only this step attempt (the message's task_id).
        #[arg(long)]
        task_id: Option<String>,
        /// Every dead letter (required when no filter is given).
        #[arg(long)]
        all: bool,
        /// Most dead letters to move.
        #[arg(long, default_value_t = 1000)]
        max: usize,
    },
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// URL of the SQS work queue.
    #[arg(long, env = "DAGSTER_TASKIQ_SQS_QUEUE_URL")]
    pub queue_url: String,

    /// URL of the dead-letter queue. Default: the work queue's RedrivePolicy target.
    #[arg(long, env = "DAGSTER_TASKIQ_SQS_DLQ_URL")]
    pub dlq_url: Option<String>,

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

    /// Visibility timeout of a held message, in seconds; extended every third of it.
    #[arg(long, env = "DAGSTER_TASKIQ_VISIBILITY_TIMEOUT", default_value = "60", value_parser = parse_seconds)]
    pub visibility_timeout: Duration,

    /// Address of the dashboard, API, metrics and probes.
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_DASHBOARD_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub dashboard_addr: SocketAddr,

    /// Python interpreter whose `dagster` runs steps and the bridge.
    #[arg(long, env = "DAGSTER_TASKIQ_PYTHON", default_value = "python3")]
    pub python: PathBuf,

    /// Deliveries of one message before it is dead-lettered with a verdict.
    #[arg(long, env = "DAGSTER_TASKIQ_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,

    /// Base of the exponential backoff, in seconds.
    #[arg(long, env = "DAGSTER_TASKIQ_BACKOFF_BASE", default_value = "1", value_parser = parse_seconds)]
    pub backoff_base: Duration,

    /// Cap of the exponential backoff, in seconds.
    #[arg(long, env = "DAGSTER_TASKIQ_BACKOFF_CAP", default_value = "300", value_parser = parse_seconds)]
    pub backoff_cap: Duration,

    /// Seconds running steps get to finish after SIGTERM before they are killed and released.
    #[arg(long, env = "DAGSTER_TASKIQ_SHUTDOWN_GRACE", default_value = "110", value_parser = parse_seconds)]
    pub shutdown_grace: Duration,

    /// Timeout of steps without a `dagster-taskiq/timeout` op tag, in seconds; 0: none.
    #[arg(long, env = "DAGSTER_TASKIQ_STEP_TIMEOUT", default_value = "0", value_parser = parse_seconds)]
    pub step_timeout: Duration,

    /// Seconds a canceled step gets between SIGTERM and SIGKILL.
    #[arg(long, env = "DAGSTER_TASKIQ_STOP_GRACE", default_value = "10", value_parser = parse_seconds)]
    pub stop_grace: Duration,

    /// How often the status of runs with running steps is read from Dagster, in seconds. The
    /// bridge also pushes cancellations and terminate requests as they are written; this poll
    /// is the fallback.
    #[arg(long, env = "DAGSTER_TASKIQ_RUN_STATUS_INTERVAL", default_value = "1", value_parser = parse_seconds)]
    pub run_status_interval: Duration,

    /// Total visibility SQS allows one delivery, in seconds; leases are handed off to a
    /// continuation message before it. Lower only for tests.
    #[arg(long, env = "DAGSTER_TASKIQ_VISIBILITY_CAP", default_value = "43200", value_parser = parse_seconds, hide = true)]
    pub visibility_cap: Duration,

    /// Launches per second (token bucket); 0 means unlimited.
    #[arg(long, env = "DAGSTER_TASKIQ_LAUNCH_RATE", default_value_t = 0)]
    pub launch_rate: u32,

    /// Launches allowed back to back before the rate applies.
    #[arg(long, env = "DAGSTER_TASKIQ_LAUNCH_BURST", default_value_t = 10)]
    pub launch_burst: u32,

    /// Long-poll wait of one receive, in seconds (at most 20).
    #[arg(long, env = "DAGSTER_TASKIQ_RECEIVE_WAIT", default_value = "20", value_parser = parse_seconds)]
    pub receive_wait: Duration,

    /// Deadline of one Dagster bridge request, in seconds.
    #[arg(long, env = "DAGSTER_TASKIQ_BRIDGE_TIMEOUT", default_value = "30", value_parser = parse_seconds)]
    pub bridge_timeout: Duration,

    /// Name of this replica in dead letters and events. Default: hostname and pid.
    #[arg(long, env = "DAGSTER_TASKIQ_CONTROLLER_ID")]
    pub controller_id: Option<String>,

    /// Bearer token for the API's mutating endpoints (cancel, DLQ redrive); without one they
    /// are disabled. At least 16 characters.
    #[arg(long, env = "DAGSTER_TASKIQ_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Where steps run unless their op tag dagster-taskiq/launcher says otherwise.
    #[arg(long, env = "DAGSTER_TASKIQ_LAUNCHER", value_enum, default_value_t = LauncherChoice::Process)]
    pub launcher: LauncherChoice,

    #[command(flatten)]
    pub ecs: EcsArgs,

    #[command(flatten)]
    pub taskiq: TaskiqArgs,

    /// Fork process steps from a warm zygote that has imported Dagster once, instead of
    /// starting a fresh interpreter per step. Falls back to cold starts while it is unhealthy.
    #[arg(long, env = "DAGSTER_TASKIQ_WARM_POOL")]
    pub warm_pool: bool,

    /// Module (or `.py` file) the zygote imports before forking, e.g. the code location's
    /// module; repeatable (env: comma-separated).
    #[arg(
        long = "warm-preload",
        env = "DAGSTER_TASKIQ_WARM_PRELOAD",
        value_name = "MODULE",
        value_delimiter = ','
    )]
    pub warm_preload: Vec<String>,

    /// Replace the zygote after this many forks (0: never).
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_WARM_RECYCLE_AFTER",
        default_value_t = 1000
    )]
    pub warm_recycle_after: u64,

    /// Replace the zygote when its resident memory grew by more than this many MiB since it
    /// was ready (0: never).
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_WARM_MAX_RSS_GROWTH_MB",
        default_value_t = 256
    )]
    pub warm_max_rss_growth_mb: u64,

    /// Seconds the zygote may take to import Dagster and the preload modules.
    #[arg(long, env = "DAGSTER_TASKIQ_WARM_START_TIMEOUT", default_value = "120", value_parser = parse_seconds)]
    pub warm_start_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LauncherChoice {
    Process,
    Ecs,
}

impl From<LauncherChoice> for LauncherKind {
    fn from(choice: LauncherChoice) -> Self {
        match choice {
            LauncherChoice::Process => LauncherKind::Process,
            LauncherChoice::Ecs => LauncherKind::Ecs,
        }
    }
}

/// The ECS launcher (docs/ecs.md). Enabled by `--launcher ecs` or `--ecs-task-definition`.
#[derive(Debug, Clone, Args)]
pub struct EcsArgs {
    /// ECS cluster the step tasks run in.
    #[arg(long, env = "DAGSTER_TASKIQ_ECS_CLUSTER", default_value = "default")]
    pub ecs_cluster: String,

    /// Task definition of the step tasks (family, family:revision or ARN); a step may pick
    /// another with op tag ecs/run_task_kwargs {"taskDefinition": ...}.
    #[arg(long, env = "DAGSTER_TASKIQ_ECS_TASK_DEFINITION")]
    pub ecs_task_definition: Option<String>,

    /// Container that runs the step. Default: the task definition's only container.
    #[arg(long, env = "DAGSTER_TASKIQ_ECS_CONTAINER")]
    pub ecs_container: Option<String>,

    /// Subnets of the tasks (awsvpc), comma-separated.
    #[arg(long, env = "DAGSTER_TASKIQ_ECS_SUBNETS", value_delimiter = ',')]
    pub ecs_subnets: Vec<String>,

    /// Security groups of the tasks (awsvpc), comma-separated.
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_ECS_SECURITY_GROUPS",
        value_delimiter = ','
    )]
    pub ecs_security_groups: Vec<String>,

    /// Give the tasks a public IP (needed in public subnets without a NAT to pull images).
    #[arg(long, env = "DAGSTER_TASKIQ_ECS_ASSIGN_PUBLIC_IP")]
    pub ecs_assign_public_ip: bool,

    /// FARGATE, EC2 or EXTERNAL. Default: FARGATE unless a capacity provider strategy is set.
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_ECS_LAUNCH_TYPE",
        conflicts_with = "ecs_capacity_provider_strategy"
    )]
    pub ecs_launch_type: Option<String>,

    /// Capacity providers instead of a launch type: `provider[:weight[:base]]`,
    /// comma-separated, e.g. `FARGATE_SPOT:3,FARGATE:1:1`.
    #[arg(long, env = "DAGSTER_TASKIQ_ECS_CAPACITY_PROVIDER_STRATEGY")]
    pub ecs_capacity_provider_strategy: Option<String>,

    /// Seconds between status polls of the running tasks (one DescribeTasks per 100 tasks).
    #[arg(long, env = "DAGSTER_TASKIQ_ECS_POLL_INTERVAL", default_value = "3", value_parser = parse_seconds)]
    pub ecs_poll_interval: Duration,

    /// RunTask calls per second of this replica (token bucket). Fargate's account quota is
    /// about 20/s: divide it among the replicas.
    #[arg(long, env = "DAGSTER_TASKIQ_ECS_RUN_TASK_RATE", default_value_t = 20)]
    pub ecs_run_task_rate: u32,

    /// RunTask calls allowed back to back before the rate applies.
    #[arg(long, env = "DAGSTER_TASKIQ_ECS_RUN_TASK_BURST", default_value_t = 40)]
    pub ecs_run_task_burst: u32,

    /// S3 bucket for step args too large for ECS's 8192-character overrides.
    #[arg(long, env = "DAGSTER_TASKIQ_OFFLOAD_BUCKET")]
    pub offload_bucket: Option<String>,

    /// Key prefix of the offloaded step args.
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_OFFLOAD_PREFIX",
        default_value = "dagster-taskiq/step-args/"
    )]
    pub offload_prefix: String,
}

/// dagster-taskiq compatibility: taskiq results and extended payloads (`crate::results`).
#[derive(Debug, Clone, Default, Args)]
pub struct TaskiqArgs {
    /// S3 bucket for taskiq results (taskiq-aio-sqs `S3Backend(bucket_name=...)`): each
    /// settled step gets its result object at `<task_id>`. Unset: no results are written.
    #[arg(long, env = "DAGSTER_TASKIQ_S3_BUCKET_NAME")]
    pub result_bucket: Option<String>,

    /// Key prefix of the result objects (`S3Backend(base_path=...)`).
    #[arg(long, env = "DAGSTER_TASKIQ_S3_BASE_PATH", default_value = "")]
    pub result_base_path: String,

    /// S3 endpoint for results and extended payloads. Default: the standard AWS configuration
    /// (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, else AWS itself).
    #[arg(long, env = "DAGSTER_TASKIQ_S3_ENDPOINT_URL")]
    pub s3_endpoint_url: Option<String>,
}

/// Shortest admin token accepted: the API can stop steps and move messages.
const MIN_ADMIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag}: {message}")]
    Invalid { flag: &'static str, message: String },
}

fn invalid(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        message: message.into(),
    }
}

impl RunArgs {
    /// Checks values clap cannot check alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.queue_url.starts_with("http://") && !self.queue_url.starts_with("https://") {
            return Err(invalid(
                "queue-url",
                format!("{:?} is not a queue URL (expected https://sqs.<region>.amazonaws.com/<account>/<name>)", self.queue_url),
            ));
        }
        if self.max_concurrent == 0 {
            return Err(invalid("max-concurrent", "must be at least 1"));
        }
        let visibility = self.visibility_timeout.as_secs_f64();
        if !(1.0..=MAX_VISIBILITY_SECS).contains(&visibility)
            || self.visibility_timeout.subsec_nanos() != 0
        {
            return Err(invalid(
                "visibility-timeout",
                "must be a whole number of seconds from 1 to 43200 (SQS limits)",
            ));
        }
        if self.visibility_cap < self.visibility_timeout * 2
            || self.visibility_cap.as_secs_f64() > MAX_VISIBILITY_SECS
        {
            return Err(invalid(
                "visibility-cap",
                "must be at least twice --visibility-timeout and at most 43200",
            ));
        }
        if self.max_attempts == 0 {
            return Err(invalid("max-attempts", "must be at least 1"));
        }
        if self.backoff_base > self.backoff_cap {
            return Err(invalid("backoff-base", "must not exceed --backoff-cap"));
        }
        if self.receive_wait > Duration::from_secs(20) {
            return Err(invalid("receive-wait", "SQS long polls at most 20 seconds"));
        }
        if self.run_status_interval < Duration::from_millis(100) {
            return Err(invalid(
                "run-status-interval",
                "must be at least 0.1 seconds",
            ));
        }
        if self.launch_burst == 0 {
            return Err(invalid("launch-burst", "must be at least 1"));
        }
        if self.ecs_enabled() {
            self.ecs_config("validation")?;
        }
        if let Some(token) = &self.admin_token {
            if token.chars().count() < MIN_ADMIN_TOKEN_LEN || token.chars().any(char::is_whitespace)
            {
                return Err(invalid(
                    "admin-token",
                    format!("must be at least {MIN_ADMIN_TOKEN_LEN} characters without spaces"),
                ));
            }
        }
        if self.warm_start_timeout.is_zero() {
            return Err(invalid("warm-start-timeout", "must be more than 0"));
        }
        if let Some(bad) = self.warm_preload.iter().find(|m| m.trim().is_empty()) {
            return Err(invalid(
                "warm-preload",
                format!("{bad:?} is not a module name or file"),
            ));
        }
        Ok(())
    }

    pub fn step_timeout(&self) -> Option<Duration> {
        Some(self.step_timeout).filter(|t| !t.is_zero())
    }

    /// True when this controller runs ECS tasks.
    pub fn ecs_enabled(&self) -> bool {
        self.launcher == LauncherChoice::Ecs || self.ecs.ecs_task_definition.is_some()
    }

    /// The ECS launcher's settings, checked.
    pub fn ecs_config(&self, controller_id: &str) -> Result<EcsLauncherConfig, ConfigError> {
        let e = &self.ecs;
        let Some(task_definition) = e.ecs_task_definition.clone().filter(|t| !t.is_empty()) else {
            return Err(invalid(
                "ecs-task-definition",
                "is required with --launcher ecs",
            ));
        };
        if e.ecs_cluster.is_empty() {
            return Err(invalid("ecs-cluster", "must not be empty"));
        }
        let strategy = match &e.ecs_capacity_provider_strategy {
            Some(text) => {
                parse_strategy(text).map_err(|m| invalid("ecs-capacity-provider-strategy", m))?
            }
            None => Vec::new(),
        };
        let launch_type = match (&e.ecs_launch_type, strategy.is_empty()) {
            (Some(lt), _) => {
                if !["FARGATE", "EC2", "EXTERNAL"].contains(&lt.as_str()) {
                    return Err(invalid(
                        "ecs-launch-type",
                        format!("{lt:?} is not FARGATE, EC2 or EXTERNAL"),
                    ));
                }
                Some(lt.clone())
            }
            (None, true) => Some("FARGATE".to_owned()),
            (None, false) => None,
        };
        let subnets: Vec<String> = e
            .ecs_subnets
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        let security_groups: Vec<String> = e
            .ecs_security_groups
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        if subnets.is_empty() && launch_type.as_deref() == Some("FARGATE") {
            return Err(invalid(
                "ecs-subnets",
                "Fargate tasks use awsvpc networking: give at least one subnet",
            ));
        }
        if subnets.len() > 16 || security_groups.len() > 5 {
            return Err(invalid(
                "ecs-subnets",
                "awsvpc takes at most 16 subnets and 5 security groups",
            ));
        }
        let network_configuration = (!subnets.is_empty()).then(|| NetworkConfiguration {
            awsvpc_configuration: AwsVpcConfiguration {
                subnets,
                security_groups,
                assign_public_ip: Some(
                    if e.ecs_assign_public_ip {
                        "ENABLED"
                    } else {
                        "DISABLED"
                    }
                    .to_owned(),
                ),
            },
        });
        if e.ecs_run_task_rate == 0 || e.ecs_run_task_burst == 0 {
            return Err(invalid(
                "ecs-run-task-rate",
                "rate and burst must be at least 1",
            ));
        }
        if e.ecs_poll_interval < Duration::from_millis(100) {
            return Err(invalid("ecs-poll-interval", "must be at least 0.1 seconds"));
        }
        let offload = match &e.offload_bucket {
            Some(bucket) if !bucket.is_empty() => Some(OffloadConfig {
                bucket: bucket.clone(),
                prefix: e.offload_prefix.clone(),
            }),
            _ => None,
        };
        Ok(EcsLauncherConfig {
            cluster: e.ecs_cluster.clone(),
            task_definition,
            container: e.ecs_container.clone().filter(|c| !c.is_empty()),
            launch_type,
            capacity_provider_strategy: strategy,
            network_configuration,
            poll_interval: e.ecs_poll_interval,
            run_task_rate: NonZeroU32::new(e.ecs_run_task_rate).unwrap_or(NonZeroU32::MIN),
            run_task_burst: NonZeroU32::new(e.ecs_run_task_burst).unwrap_or(NonZeroU32::MIN),
            offload,
            controller_id: controller_id.to_owned(),
        })
    }

    pub fn launch_rate(&self) -> Option<NonZeroU32> {
        NonZeroU32::new(self.launch_rate)
    }

    pub fn admission_config(&self) -> AdmissionConfig {
        AdmissionConfig {
            max_concurrent: self.max_concurrent,
            prefetch: self.prefetch,
            max_per_run: (self.max_concurrent_per_run > 0).then_some(self.max_concurrent_per_run),
            tag_limits: self.tag_limits.clone(),
            launch_rate: self.launch_rate(),
            launch_burst: self.launch_burst(),
        }
    }

    /// `None`: held messages wait for a slot however long it takes.
    pub fn waiting_limit(&self) -> Option<Duration> {
        (!self.waiting_limit.is_zero()).then_some(self.waiting_limit)
    }

    pub fn launch_burst(&self) -> NonZeroU32 {
        NonZeroU32::new(self.launch_burst).unwrap_or(NonZeroU32::MIN)
    }

    /// The configured id, or `<hostname>-<pid>`.
    pub fn controller_id(&self) -> String {
        self.controller_id.clone().unwrap_or_else(|| {
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "controller".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// Parses `provider[:weight[:base]],...`.
fn parse_strategy(text: &str) -> Result<Vec<CapacityProviderItem>, String> {
    let mut items = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut fields = part.split(':');
        let name = fields.next().unwrap_or_default().to_owned();
        let mut number = |what: &str| -> Result<Option<i32>, String> {
            fields
                .next()
                .map(|f| {
                    f.parse::<i32>()
                        .map_err(|_| format!("{part:?}: {what} {f:?} is not a whole number"))
                })
                .transpose()
        };
        let weight = number("weight")?;
        let base = number("base")?;
        if fields.next().is_some() {
            return Err(format!("{part:?}: expected provider[:weight[:base]]"));
        }
        items.push(CapacityProviderItem {
            capacity_provider: name,
            weight,
            base,
        });
    }
    check_strategy("--ecs-capacity-provider-strategy", &items).map_err(|e| e.message)?;
    Ok(items)
}

/// Parses a number of seconds, e.g. `30` or `2.5`.
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?} must be a non-negative number of seconds"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> RunArgs {
        let mut argv = vec![
            "dagster-taskiq-controller",
            "run",
            "--queue-url",
            "http://127.0.0.1:1/123/q",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let a = args(&[]);
        a.validate().unwrap();
        assert_eq!(a.dashboard_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(a.visibility_timeout, Duration::from_secs(60));
        assert!(!a.warm_pool);
        assert!(a.warm_preload.is_empty());
    }

    #[test]
    fn warm_pool_flags() {
        let a = args(&[
            "--warm-pool",
            "--warm-preload",
            "my_code",
            "--warm-preload",
            "jobs.py",
            "--warm-recycle-after",
            "5",
        ]);
        a.validate().unwrap();
        assert!(a.warm_pool);
        assert_eq!(a.warm_preload, ["my_code", "jobs.py"]);
        assert_eq!(a.warm_recycle_after, 5);
        let err = args(&["--warm-preload", " "]).validate().unwrap_err();
        assert!(err.to_string().starts_with("--warm-preload"), "{err}");
    }

    #[test]
    fn rejects_out_of_range_values_with_the_flag_name() {
        let err = args(&["--visibility-timeout", "50000"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().starts_with("--visibility-timeout"), "{err}");
        let err = args(&["--max-concurrent", "0"]).validate().unwrap_err();
        assert!(err.to_string().contains("max-concurrent"), "{err}");
        assert!(
            Cli::try_parse_from(["x", "run", "--queue-url", "u", "--backoff-cap", "soon"]).is_err()
        );
        let err = args(&["--admin-token", "short"]).validate().unwrap_err();
        assert!(err.to_string().starts_with("--admin-token"), "{err}");
        args(&["--admin-token", "0123456789abcdef"])
            .validate()
            .unwrap();
    }

    #[test]
    fn ecs_settings_from_flags() {
        let a = args(&[]);
        assert!(!a.ecs_enabled());
        let err = args(&["--launcher", "ecs"]).validate().unwrap_err();
        assert!(err.to_string().contains("--ecs-task-definition"), "{err}");
        let err = args(&["--ecs-task-definition", "step"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("--ecs-subnets"), "{err}");

        let a = args(&[
            "--launcher",
            "ecs",
            "--ecs-cluster",
            "steps",
            "--ecs-task-definition",
            "step:3",
            "--ecs-subnets",
            "subnet-1,subnet-2",
            "--ecs-security-groups",
            "sg-1",
            "--offload-bucket",
            "b",
        ]);
        a.validate().unwrap();
        let c = a.ecs_config("ctl").unwrap();
        assert_eq!(c.cluster, "steps");
        assert_eq!(c.launch_type.as_deref(), Some("FARGATE"));
        let vpc = c.network_configuration.unwrap().awsvpc_configuration;
        assert_eq!(vpc.subnets, ["subnet-1", "subnet-2"]);
        assert_eq!(vpc.assign_public_ip.as_deref(), Some("DISABLED"));
        assert_eq!(c.offload.unwrap().prefix, "dagster-taskiq/step-args/");
        assert_eq!(c.run_task_rate.get(), 20);

        let a = args(&[
            "--ecs-task-definition",
            "step",
            "--ecs-capacity-provider-strategy",
            "FARGATE_SPOT:3,FARGATE:1:1",
        ]);
        let c = a.ecs_config("ctl").unwrap();
        assert_eq!(c.launch_type, None);
        assert_eq!(c.capacity_provider_strategy.len(), 2);
        assert_eq!(c.capacity_provider_strategy[1].base, Some(1));
        let err = args(&[
            "--ecs-task-definition",
            "step",
            "--ecs-capacity-provider-strategy",
            "X:y",
        ])
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("not a whole number"), "{err}");
        assert!(Cli::try_parse_from([
            "x",
            "run",
            "--queue-url",
            "u",
            "--ecs-launch-type",
            "EC2",
            "--ecs-capacity-provider-strategy",
            "FARGATE",
        ])
        .is_err());
    }
}
