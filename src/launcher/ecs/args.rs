//! The ECS launcher's flags, and the checked [`EcsLauncherConfig`] built from them.

use std::num::NonZeroU32;
use std::time::Duration;

use clap::Args;

use super::request::{
    check_image_name, check_strategy, task_definition_family, AwsVpcConfiguration,
    CapacityProviderItem, NetworkConfiguration, OverridePolicy, FARGATE_MAX_CPU,
    FARGATE_MAX_EPHEMERAL_GIB, FARGATE_MAX_MEMORY_MIB,
};
use super::{EcsLauncherConfig, OffloadConfig};
use crate::flags::{invalid, parse_seconds, ConfigError};

/// The ECS launcher (docs/ecs.md). Enabled by `--launcher ecs` or `--ecs-task-definition`.
#[derive(Debug, Clone, Args)]
pub struct EcsArgs {
    /// ECS cluster the step tasks run in.
    #[arg(long, env = "DAGSTER_TASKIQ_ECS_CLUSTER", default_value = "default")]
    pub ecs_cluster: String,

    /// Task definition of the step tasks (family, family:revision or ARN); a step may pick
    /// another revision of its family, or one of --ecs-allow-task-definition, with op tag
    /// ecs/run_task_kwargs {"taskDefinition": ...}.
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

    /// An IAM role ARN that op tag ecs/task_overrides may give as taskRoleArn or
    /// executionRoleArn; repeatable (comma-separated in the environment). None by default:
    /// the task definition's roles are the only ones.
    #[arg(long, env = "DAGSTER_TASKIQ_ECS_ALLOW_ROLE", value_delimiter = ',')]
    pub ecs_allow_role: Vec<String>,

    /// A task definition family that op tag ecs/run_task_kwargs may pick as taskDefinition
    /// (any revision); repeatable (comma-separated in the environment). The family of
    /// --ecs-task-definition is always allowed.
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_ECS_ALLOW_TASK_DEFINITION",
        value_delimiter = ','
    )]
    pub ecs_allow_task_definition: Vec<String>,

    /// Most CPU units op tags may ask for, for the task and for any one container
    /// (default: Fargate's maximum, 16 vCPU).
    #[arg(long, env = "DAGSTER_TASKIQ_ECS_MAX_CPU", default_value_t = FARGATE_MAX_CPU)]
    pub ecs_max_cpu: u32,

    /// Most memory in MiB op tags may ask for, for the task and for any one container's
    /// memory or memoryReservation (default: Fargate's maximum, 120 GiB).
    #[arg(long, env = "DAGSTER_TASKIQ_ECS_MAX_MEMORY", default_value_t = FARGATE_MAX_MEMORY_MIB)]
    pub ecs_max_memory: u32,

    /// Most ephemeral storage in GiB op tags may ask for (default: Fargate's maximum, 200).
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_ECS_MAX_EPHEMERAL_STORAGE",
        default_value_t = FARGATE_MAX_EPHEMERAL_GIB
    )]
    pub ecs_max_ephemeral_storage: u32,
    /// An image (`registry/repository`, `registry/repository:tag`, or a namespace ending in
    /// `/`) whose runs' steps may run in it: the run's code location image
    /// (`container_image`) is followed when it is the task definition's own image or matches
    /// one of these; repeatable (comma-separated in the environment). None by default: a run
    /// in any other image gets a verdict and is dead-lettered.
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_ECS_ALLOW_IMAGE_PREFIX",
        value_delimiter = ','
    )]
    pub ecs_allow_image_prefix: Vec<String>,
}

impl EcsArgs {
    /// The ECS launcher's settings, checked.
    pub fn config(&self, controller_id: &str) -> Result<EcsLauncherConfig, ConfigError> {
        let e = self;
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
        let override_policy = e.override_policy(&task_definition)?;
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
            override_policy,
            base: None,
        })
    }

    /// What op tags may change, from the `--ecs-allow-*` and `--ecs-max-*` flags.
    fn override_policy(&self, task_definition: &str) -> Result<OverridePolicy, ConfigError> {
        let mut policy = OverridePolicy::new(task_definition);
        for role in self.ecs_allow_role.iter().filter(|r| !r.is_empty()) {
            if !role.starts_with("arn:") || !role.contains(":role/") {
                return Err(invalid(
                    "ecs-allow-role",
                    format!("{role:?} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)"),
                ));
            }
            policy.roles.insert(role.clone());
        }
        for family in self
            .ecs_allow_task_definition
            .iter()
            .filter(|f| !f.is_empty())
        {
            if task_definition_family(family) != family || family.contains('/') {
                return Err(invalid(
                    "ecs-allow-task-definition",
                    format!("{family:?} is not a task definition family (no revision, no ARN)"),
                ));
            }
            policy.task_definition_families.insert(family.clone());
        }
        if self.ecs_max_cpu == 0 {
            return Err(invalid("ecs-max-cpu", "must be at least 1"));
        }
        if self.ecs_max_memory == 0 {
            return Err(invalid("ecs-max-memory", "must be at least 1"));
        }
        if !(21..=FARGATE_MAX_EPHEMERAL_GIB).contains(&self.ecs_max_ephemeral_storage) {
            return Err(invalid(
                "ecs-max-ephemeral-storage",
                "must be 21 to 200 GiB (what ECS accepts)",
            ));
        }
        for prefix in self.ecs_allow_image_prefix.iter().filter(|p| !p.is_empty()) {
            if let Err(why) = check_image_name(prefix) {
                return Err(invalid(
                    "ecs-allow-image-prefix",
                    format!("{prefix:?}: {why}"),
                ));
            }
            // A bare registry would allow every repository on it by accident.
            if !prefix.contains('/') {
                return Err(invalid(
                    "ecs-allow-image-prefix",
                    format!("{prefix:?} names no repository: give registry/repository or a namespace ending in /"),
                ));
            }
            policy.image_prefixes.push(prefix.clone());
        }
        policy.max_cpu = self.ecs_max_cpu;
        policy.max_memory_mib = self.ecs_max_memory;
        policy.max_ephemeral_gib = self.ecs_max_ephemeral_storage;
        Ok(policy)
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
