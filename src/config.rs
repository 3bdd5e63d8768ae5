//! The command line (clap): subcommands, and the `run` flags gathered from the components
//! that own them (each component's `...Args`), validated with errors that name the flag.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::admission::AdmissionArgs;
use crate::controller::ControllerArgs;
use crate::dagster::BridgeArgs;
use crate::dashboard::DashboardArgs;
use crate::envelope::LauncherKind;
use crate::flags::{invalid, ConfigError};
use crate::launcher::ecs::EcsArgs;
use crate::launcher::LimitArgs;
use crate::launcher::{PythonMapArgs, WarmArgs};
use crate::lease::LeaseArgs;
use crate::step_env::StepEnvArgs;
use crate::taskiq::TaskiqArgs;

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

/// The `run` (and `doctor`) flags: the queues, the interpreter, and each component's own
/// flags, flattened into one command line.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// URL of the SQS work queue.
    #[arg(long, env = "DAGSTER_TASKIQ_SQS_QUEUE_URL")]
    pub queue_url: String,

    /// URL of the dead-letter queue. Default: the work queue's RedrivePolicy target.
    #[arg(long, env = "DAGSTER_TASKIQ_SQS_DLQ_URL")]
    pub dlq_url: Option<String>,

    /// Python interpreter whose `dagster` runs the bridge, and the process steps of code
    /// locations without a --python-for.
    #[arg(long, env = "DAGSTER_TASKIQ_PYTHON", default_value = "python3")]
    pub python: PathBuf,

    #[command(flatten)]
    pub python_map: PythonMapArgs,

    /// Where steps run unless their op tag dagster-taskiq/launcher says otherwise.
    #[arg(long, env = "DAGSTER_TASKIQ_LAUNCHER", value_enum, default_value_t = LauncherChoice::Process)]
    pub launcher: LauncherChoice,

    #[command(flatten)]
    pub controller: ControllerArgs,

    #[command(flatten)]
    pub admission: AdmissionArgs,

    #[command(flatten)]
    pub lease: LeaseArgs,

    #[command(flatten)]
    pub bridge: BridgeArgs,

    #[command(flatten)]
    pub dashboard: DashboardArgs,

    #[command(flatten)]
    pub warm: WarmArgs,

    #[command(flatten)]
    pub step_env: StepEnvArgs,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub ecs: EcsArgs,

    #[command(flatten)]
    pub taskiq: TaskiqArgs,

    #[command(flatten)]
    pub cloudwatch: crate::cloudwatch::CloudWatchArgs,
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

impl RunArgs {
    /// Checks values clap cannot check alone; the error names the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.queue_url.starts_with("http://") && !self.queue_url.starts_with("https://") {
            return Err(invalid(
                "queue-url",
                format!("{:?} is not a queue URL (expected https://sqs.<region>.amazonaws.com/<account>/<name>)", self.queue_url),
            ));
        }
        self.controller.validate()?;
        self.admission.validate()?;
        self.lease.validate()?;
        self.dashboard.validate()?;
        self.warm.validate()?;
        self.python_map.map(&self.python)?;
        self.step_env.policy()?;
        self.taskiq.validate()?;
        self.cloudwatch.validate()?;
        if self.ecs_enabled() {
            self.ecs.config("validation")?;
        }
        Ok(())
    }

    /// True when this controller runs ECS tasks.
    pub fn ecs_enabled(&self) -> bool {
        self.launcher == LauncherChoice::Ecs || self.ecs.ecs_task_definition.is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
        assert_eq!(a.dashboard.dashboard_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(a.lease.visibility_timeout, Duration::from_secs(60));
        assert!(!a.warm.warm_pool);
        assert!(a.warm.warm_preload.is_empty());
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
        assert!(a.warm.warm_pool);
        assert_eq!(a.warm.warm_preload, ["my_code", "jobs.py"]);
        assert_eq!(a.warm.warm_recycle_after, 5);
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
        let err = args(&["--claim-stale-after", "4"]).validate().unwrap_err();
        assert!(err.to_string().starts_with("--claim-stale-after"), "{err}");
        assert!(
            Cli::try_parse_from(["x", "run", "--queue-url", "u", "--backoff-cap", "soon"]).is_err()
        );
        let err = args(&["--max-payload-bytes", "1000"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().starts_with("--max-payload-bytes"), "{err}");
        let err = args(&["--payload-bucket", "s3://bucket"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().starts_with("--payload-bucket"), "{err}");
        let a = args(&["--payload-bucket", "a-1", "--payload-bucket", "b.2"]);
        a.validate().unwrap();
        assert_eq!(a.taskiq.payload_buckets, ["a-1", "b.2"]);
        assert_eq!(a.taskiq.max_payload_bytes, 8 * 1024 * 1024);
        let err = args(&["--admin-token", "short"]).validate().unwrap_err();
        assert!(err.to_string().starts_with("--admin-token"), "{err}");
        args(&["--admin-token", "0123456789abcdef"])
            .validate()
            .unwrap();
    }

    #[test]
    fn ecs_override_policy_from_flags() {
        let ecs = |extra: &[&str]| {
            let mut flags = vec!["--ecs-task-definition", "step:3", "--ecs-subnets", "s-1"];
            flags.extend_from_slice(extra);
            args(&flags)
        };
        // Nothing allowed but the default family; Fargate's maxima as caps.
        let p = ecs(&[]).ecs.config("ctl").unwrap().override_policy;
        assert!(p.roles.is_empty());
        assert_eq!(
            p.task_definition_families.iter().collect::<Vec<_>>(),
            ["step"]
        );
        assert_eq!(
            (p.max_cpu, p.max_memory_mib, p.max_ephemeral_gib),
            (16384, 122880, 200)
        );

        let p = ecs(&[
            "--ecs-allow-role",
            "arn:aws:iam::1:role/a",
            "--ecs-allow-role",
            "arn:aws:iam::1:role/b",
            "--ecs-allow-task-definition",
            "gpu-step",
            "--ecs-max-cpu",
            "4096",
            "--ecs-max-memory",
            "8192",
            "--ecs-max-ephemeral-storage",
            "50",
        ])
        .ecs
        .config("ctl")
        .unwrap()
        .override_policy;
        assert_eq!(p.roles.len(), 2);
        assert!(p.task_definition_families.contains("gpu-step"));
        assert!(p.task_definition_families.contains("step"));
        assert_eq!(
            (p.max_cpu, p.max_memory_mib, p.max_ephemeral_gib),
            (4096, 8192, 50)
        );

        for (flags, flag) in [
            (&["--ecs-allow-role", "admin"][..], "--ecs-allow-role"),
            (
                &["--ecs-allow-task-definition", "gpu-step:3"],
                "--ecs-allow-task-definition",
            ),
            (&["--ecs-max-cpu", "0"], "--ecs-max-cpu"),
            (&["--ecs-max-memory", "0"], "--ecs-max-memory"),
            (
                &["--ecs-max-ephemeral-storage", "500"],
                "--ecs-max-ephemeral-storage",
            ),
        ] {
            let err = ecs(flags).validate().unwrap_err();
            assert!(err.to_string().starts_with(flag), "{err}");
        }
    }

    #[test]
    fn admin_token_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef\n").unwrap();
        let file = path.to_str().unwrap();
        let a = args(&["--admin-token-file", file]);
        a.validate().unwrap();
        assert_eq!(
            a.dashboard.admin_token().unwrap().as_deref(),
            Some("0123456789abcdef")
        );
        assert!(Cli::try_parse_from([
            "x",
            "run",
            "--queue-url",
            "u",
            "--admin-token",
            "0123456789abcdef",
            "--admin-token-file",
            file,
        ])
        .is_err());
        std::fs::write(&path, "short\n").unwrap();
        let err = args(&["--admin-token-file", file]).validate().unwrap_err();
        assert!(err.to_string().starts_with("--admin-token-file"), "{err}");
        let missing = dir.path().join("absent");
        let err = args(&["--admin-token-file", missing.to_str().unwrap()])
            .validate()
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--admin-token-file: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn step_environment_flags() {
        let a = args(&[
            "--step-env-deny",
            "AWS_SECRET_*",
            "--step-env-deny",
            "DB_PASSWORD",
            "--step-env",
            "ADDED=1",
            "--step-env",
            "URL=http://x/?a=b",
        ]);
        a.validate().unwrap();
        assert_eq!(
            format!("{:?}", a.step_env.step_env_deny),
            "[AWS_SECRET_*, DB_PASSWORD]"
        );
        let policy = a.step_env.policy().unwrap();
        assert!(policy.allow.is_none());
        assert_eq!(policy.additions[1].value, "http://x/?a=b");
        let a = args(&["--step-env-allow", "AWS_*,MY_APP_*"]);
        assert_eq!(a.step_env.policy().unwrap().allow.unwrap().len(), 2);
        for bad in [
            ["--step-env-deny", "A*B"],
            ["--step-env", "NOVALUE"],
            ["--step-env", "1X=y"],
        ] {
            let argv = ["x", "run", "--queue-url", "u", bad[0], bad[1]];
            let err = Cli::try_parse_from(argv).unwrap_err().to_string();
            assert!(err.contains(bad[0]), "{err}");
        }
        let err = args(&["--step-env", "DAGSTER_RUN_STEP_KEY=x"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().starts_with("--step-env:"), "{err}");
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
        let c = a.ecs.config("ctl").unwrap();
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
        let c = a.ecs.config("ctl").unwrap();
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
