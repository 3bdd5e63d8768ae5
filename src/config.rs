//! Settings from flags and environment variables (clap), validated with clear errors.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// SQS caps a visibility timeout at 12 hours.
const MAX_VISIBILITY_SECS: f64 = 43_200.0;

#[derive(Debug, Parser)]
#[command(
    name = "dagster-taskiq-controller",
    version,
    about = "Runs Dagster steps published to SQS (TaskIQ format) as isolated processes"
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
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// URL of the SQS work queue.
    #[arg(long, env = "DAGSTER_TASKIQ_SQS_QUEUE_URL")]
    pub queue_url: String,

    /// URL of the dead-letter queue. Default: the work queue's RedrivePolicy target.
    #[arg(long, env = "DAGSTER_TASKIQ_SQS_DLQ_URL")]
    pub dlq_url: Option<String>,

    /// Messages held (and steps run) at once by this controller.
    #[arg(long, env = "DAGSTER_TASKIQ_MAX_CONCURRENT", default_value_t = 16)]
    pub max_concurrent: usize,

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

    /// How often the status of runs with running steps is read from Dagster, in seconds.
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

    pub fn launch_rate(&self) -> Option<NonZeroU32> {
        NonZeroU32::new(self.launch_rate)
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
    }
}
