//! Building the RunTask request of a step: the controller's settings, the step's `ecs/*` op
//! tags (validated here, so a bad tag dead-letters the message instead of failing at AWS),
//! the idempotency identity (`clientToken`, `startedBy`, tags) and the overrides size.
//!
//! The request is plain data (serde, camelCase like the ECS API) so it can be measured and
//! tested without AWS; `api.rs` turns it into an SDK call.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::envelope::StepRequest;

/// ECS refuses a RunTask whose `overrides` JSON is longer than this many characters.
pub const OVERRIDES_LIMIT: usize = 8192;
/// Headroom under the limit: AWS counts its own serialization, which may escape differently.
pub const OVERRIDES_MARGIN: usize = 192;

/// The step's command when its args travel inline.
pub const STEP_COMMAND: [&str; 3] = ["dagster", "api", "execute_step"];
/// The step's command when its args were offloaded or it has a timeout: the shim
/// (`dagster_taskiq_controller.ecs_entrypoint`) fetches the args, then runs
/// `python -m dagster api execute_step` itself, and SIGKILLs it at the timeout.
pub const SHIM_COMMAND: [&str; 3] = ["python", "-m", "dagster_taskiq_controller.ecs_entrypoint"];
/// Exit code of the shim when it killed the step at its timeout (as coreutils' `timeout`).
pub const SHIM_TIMED_OUT_EXIT: i32 = 124;

pub const ENV_COMPRESSED_ARGS: &str = "DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS";
pub const ENV_JOB_NAME: &str = "DAGSTER_RUN_JOB_NAME";
pub const ENV_STEP_KEY: &str = "DAGSTER_RUN_STEP_KEY";
/// `s3://bucket/key` of the offloaded compressed args.
pub const ENV_ARGS_URI: &str = "DAGSTER_TASKIQ_STEP_ARGS_S3_URI";
/// sha256 (hex) of the offloaded object, checked by the shim.
pub const ENV_ARGS_SHA256: &str = "DAGSTER_TASKIQ_STEP_ARGS_SHA256";
/// The step's timeout in seconds, enforced by the shim inside the task.
pub const ENV_STEP_TIMEOUT: &str = "DAGSTER_TASKIQ_STEP_TIMEOUT_SECONDS";
/// Names a tag may not set: the controller owns them.
const RESERVED_ENV: [&str; 7] = [
    ENV_COMPRESSED_ARGS,
    ENV_JOB_NAME,
    ENV_STEP_KEY,
    ENV_ARGS_URI,
    ENV_ARGS_SHA256,
    ENV_STEP_TIMEOUT,
    "DAGSTER_EXECUTE_STEP_ARGS",
];

/// Task tag keys the controller sets (they win over tags from `ecs/run_task_kwargs`).
pub mod tag_keys {
    pub const RUN_ID: &str = "dagster/run-id";
    pub const STEP_KEY: &str = "dagster/step-key";
    pub const ATTEMPT: &str = "dagster/attempt";
    pub const JOB_NAME: &str = "dagster/job-name";
    pub const TASK_ID: &str = "dagster-taskiq/task-id";
    pub const CONTROLLER: &str = "dagster-taskiq/controller";
    pub const DELIVERY: &str = "dagster-taskiq/delivery";
}

/// A launch setting that can never work. The message is dead-lettered with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{tag}: {message}")]
pub struct InvalidTag {
    pub tag: &'static str,
    pub message: String,
}

fn invalid(tag: &'static str, message: impl Into<String>) -> InvalidTag {
    InvalidTag {
        tag,
        message: message.into(),
    }
}

// ---- the request, in the ECS API's shape ----------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunTaskRequest {
    pub cluster: String,
    pub task_definition: String,
    pub client_token: String,
    pub started_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launch_type: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub capacity_provider_strategy: Vec<CapacityProviderItem>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_configuration: Option<NetworkConfiguration>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub placement_constraints: Vec<PlacementConstraint>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub placement_strategy: Vec<PlacementStrategy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub propagate_tags: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_execute_command: Option<bool>,
    #[serde(
        rename = "enableECSManagedTags",
        skip_serializing_if = "Option::is_none"
    )]
    pub enable_ecs_managed_tags: Option<bool>,
    pub tags: Vec<Tag>,
    pub overrides: TaskOverride,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CapacityProviderItem {
    pub capacity_provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkConfiguration {
    pub awsvpc_configuration: AwsVpcConfiguration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AwsVpcConfiguration {
    pub subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assign_public_ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementConstraint {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementStrategy {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskOverride {
    pub container_overrides: Vec<ContainerOverride>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ephemeral_storage: Option<EphemeralStorage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_role_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution_role_arn: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EphemeralStorage {
    #[serde(rename = "sizeInGiB")]
    pub size_in_gib: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerOverride {
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub environment: Vec<KeyValue>,
    #[serde(flatten)]
    pub settings: ContainerSettings,
}

/// What a tag may change in a container: never its command (nothing in a message chooses
/// an executable).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_reservation: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environment_files: Vec<EnvironmentFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource_requirements: Vec<ResourceRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentFile {
    pub value: String,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceRequirement {
    pub value: String,
    #[serde(rename = "type")]
    pub kind: String,
}

// ---- what the op tags may say ---------------------------------------------------------------

/// `ecs/container_overrides`: settings of the step container plus extra environment.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ContainerOverridesTag {
    #[serde(default)]
    environment: Vec<KeyValue>,
    #[serde(flatten)]
    settings: ContainerSettings,
}

/// A sidecar's override inside `ecs/task_overrides`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SidecarOverride {
    name: String,
    #[serde(default)]
    environment: Vec<KeyValue>,
    #[serde(flatten)]
    settings: ContainerSettings,
}

/// `ecs/task_overrides`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TaskOverridesTag {
    #[serde(default, deserialize_with = "string_or_integer")]
    cpu: Option<String>,
    #[serde(default, deserialize_with = "string_or_integer")]
    memory: Option<String>,
    #[serde(default)]
    ephemeral_storage: Option<EphemeralStorage>,
    #[serde(default)]
    task_role_arn: Option<String>,
    #[serde(default)]
    execution_role_arn: Option<String>,
    #[serde(default)]
    container_overrides: Vec<SidecarOverride>,
}

/// `ecs/run_task_kwargs`: the RunTask parameters a step may choose. `cluster`, `count`,
/// `overrides`, `startedBy` and `clientToken` belong to the controller.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RunTaskKwargsTag {
    task_definition: Option<String>,
    launch_type: Option<String>,
    capacity_provider_strategy: Option<Vec<CapacityProviderItem>>,
    platform_version: Option<String>,
    network_configuration: Option<NetworkConfiguration>,
    #[serde(default)]
    placement_constraints: Vec<PlacementConstraint>,
    #[serde(default)]
    placement_strategy: Vec<PlacementStrategy>,
    group: Option<String>,
    propagate_tags: Option<String>,
    enable_execute_command: Option<bool>,
    #[serde(rename = "enableECSManagedTags")]
    enable_ecs_managed_tags: Option<bool>,
    #[serde(default)]
    tags: Vec<Tag>,
}

fn string_or_integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        S(String),
        N(u64),
    }
    Ok(Option::<Either>::deserialize(d)?.map(|v| match v {
        Either::S(s) => s,
        Either::N(n) => n.to_string(),
    }))
}

// ---- the controller's side ------------------------------------------------------------------

/// The controller's RunTask settings (flags), the base every step's request starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRequest {
    pub cluster: String,
    pub task_definition: String,
    /// The container whose command and environment run the step.
    pub container: String,
    pub launch_type: Option<String>,
    pub capacity_provider_strategy: Vec<CapacityProviderItem>,
    pub network_configuration: Option<NetworkConfiguration>,
    pub controller_id: String,
}

/// How the step's args reach the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepArgs {
    /// `DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS` in the overrides.
    Inline(String),
    /// A pointer to the object holding that value, resolved by the shim.
    Offloaded { uri: String, sha256: String },
}

/// Everything the step's op tags decide, validated once per launch.
#[derive(Debug, Default)]
pub struct StepSettings {
    task: TaskOverridesTag,
    container: ContainerOverridesTag,
    kwargs: RunTaskKwargsTag,
}

const LAUNCH_TYPES: [&str; 3] = ["FARGATE", "EC2", "EXTERNAL"];

impl StepSettings {
    /// Reads and checks the `ecs/*` op tags of a step.
    pub fn from_tags(tags: &BTreeMap<String, String>, container: &str) -> Result<Self, InvalidTag> {
        let mut settings = StepSettings {
            task: json_tag(tags, "ecs/task_overrides")?.unwrap_or_default(),
            container: json_tag(tags, "ecs/container_overrides")?.unwrap_or_default(),
            kwargs: json_tag(tags, "ecs/run_task_kwargs")?.unwrap_or_default(),
        };
        // The simple tags fill in what ecs/task_overrides leaves unset (it wins, as in
        // dagster-aws).
        if let Some(cpu) = tags.get("ecs/cpu") {
            settings.task.cpu.get_or_insert_with(|| cpu.clone());
        }
        if let Some(memory) = tags.get("ecs/memory") {
            settings.task.memory.get_or_insert_with(|| memory.clone());
        }
        if let Some(storage) = tags.get("ecs/ephemeral_storage") {
            let size = storage.trim().parse::<i32>().map_err(|_| {
                invalid(
                    "ecs/ephemeral_storage",
                    format!("{storage:?} is not a whole number of GiB"),
                )
            })?;
            settings
                .task
                .ephemeral_storage
                .get_or_insert(EphemeralStorage { size_in_gib: size });
        }
        settings.check(container)?;
        Ok(settings)
    }

    fn check(&self, container: &str) -> Result<(), InvalidTag> {
        let t = &self.task;
        if let Some(cpu) = &t.cpu {
            positive_units("ecs/cpu", cpu, "CPU units")?;
        }
        if let Some(memory) = &t.memory {
            positive_units("ecs/memory", memory, "MiB")?;
        }
        if let Some(storage) = t.ephemeral_storage {
            if !(21..=200).contains(&storage.size_in_gib) {
                return Err(invalid(
                    "ecs/ephemeral_storage",
                    format!(
                        "{} GiB is outside Fargate's 21 to 200 GiB",
                        storage.size_in_gib
                    ),
                ));
            }
        }
        for sidecar in &t.container_overrides {
            if sidecar.name == container {
                return Err(invalid(
                    "ecs/task_overrides",
                    format!(
                        "containerOverrides may not name the step container {container:?}; use ecs/container_overrides"
                    ),
                ));
            }
            check_environment("ecs/task_overrides", &sidecar.environment)?;
            check_container_settings("ecs/task_overrides", &sidecar.settings)?;
        }
        check_environment("ecs/container_overrides", &self.container.environment)?;
        check_container_settings("ecs/container_overrides", &self.container.settings)?;

        let k = &self.kwargs;
        if let Some(launch_type) = &k.launch_type {
            if !LAUNCH_TYPES.contains(&launch_type.as_str()) {
                return Err(invalid(
                    "ecs/run_task_kwargs",
                    format!("launchType {launch_type:?} is not one of FARGATE, EC2, EXTERNAL"),
                ));
            }
            if k.capacity_provider_strategy.is_some() {
                return Err(invalid(
                    "ecs/run_task_kwargs",
                    "launchType and capacityProviderStrategy exclude each other",
                ));
            }
        }
        if let Some(strategy) = &k.capacity_provider_strategy {
            check_strategy("ecs/run_task_kwargs", strategy)?;
        }
        if let Some(td) = &k.task_definition {
            if td.trim().is_empty() {
                return Err(invalid("ecs/run_task_kwargs", "taskDefinition is empty"));
            }
        }
        if let Some(network) = &k.network_configuration {
            check_network("ecs/run_task_kwargs", network)?;
        }
        if let Some(propagate) = &k.propagate_tags {
            if !["TASK_DEFINITION", "SERVICE", "NONE"].contains(&propagate.as_str()) {
                return Err(invalid(
                    "ecs/run_task_kwargs",
                    format!("propagateTags {propagate:?} is not TASK_DEFINITION, SERVICE or NONE"),
                ));
            }
        }
        for tag in &k.tags {
            if tag.key.is_empty() || tag.key.len() > 128 || tag.value.len() > 256 {
                return Err(invalid(
                    "ecs/run_task_kwargs",
                    format!(
                        "tag {:?}: keys are 1 to 128 characters, values at most 256",
                        tag.key
                    ),
                ));
            }
            if tag.key.to_ascii_lowercase().starts_with("aws:") {
                return Err(invalid(
                    "ecs/run_task_kwargs",
                    format!("tag {:?}: the aws: prefix is reserved", tag.key),
                ));
            }
        }
        if k.tags.len() > 40 {
            return Err(invalid(
                "ecs/run_task_kwargs",
                "at most 40 tags (ECS allows 50 and the controller sets its own)",
            ));
        }
        Ok(())
    }

    /// The complete request for delivery `delivery` (1-based) of the step.
    pub fn build(
        &self,
        base: &BaseRequest,
        step: &StepRequest,
        delivery: u32,
        args: &StepArgs,
    ) -> RunTaskRequest {
        let k = &self.kwargs;
        // A step that picks one way of choosing capacity replaces the controller's.
        let (launch_type, capacity_provider_strategy) =
            match (&k.launch_type, &k.capacity_provider_strategy) {
                (Some(lt), _) => (Some(lt.clone()), Vec::new()),
                (None, Some(cps)) => (None, cps.clone()),
                (None, None) => (
                    base.launch_type.clone(),
                    base.capacity_provider_strategy.clone(),
                ),
            };

        let (mut command, mut environment) = match args {
            StepArgs::Inline(compressed) => (
                STEP_COMMAND.map(String::from).to_vec(),
                vec![kv(ENV_COMPRESSED_ARGS, compressed)],
            ),
            StepArgs::Offloaded { uri, sha256 } => (
                SHIM_COMMAND.map(String::from).to_vec(),
                vec![kv(ENV_ARGS_URI, uri), kv(ENV_ARGS_SHA256, sha256)],
            ),
        };
        if let Some(timeout) = step.timeout {
            // StopTask would send SIGTERM, which Dagster turns into an interrupt failure that
            // skips the RetryPolicy: the shim SIGKILLs the step at its deadline instead.
            command = SHIM_COMMAND.map(String::from).to_vec();
            environment.push(kv(ENV_STEP_TIMEOUT, &format!("{}", timeout.as_secs_f64())));
        }
        environment.push(kv(ENV_JOB_NAME, step.job_name.as_deref().unwrap_or("")));
        environment.push(kv(ENV_STEP_KEY, &step.step_key));
        environment.extend(self.container.environment.iter().cloned());
        let mut container_overrides = vec![ContainerOverride {
            name: base.container.clone(),
            command,
            environment,
            settings: self.container.settings.clone(),
        }];
        container_overrides.extend(self.task.container_overrides.iter().map(|s| {
            ContainerOverride {
                name: s.name.clone(),
                command: Vec::new(),
                environment: s.environment.clone(),
                settings: s.settings.clone(),
            }
        }));

        RunTaskRequest {
            cluster: base.cluster.clone(),
            task_definition: k
                .task_definition
                .clone()
                .unwrap_or_else(|| base.task_definition.clone()),
            client_token: client_token(&step.task_id, delivery),
            started_by: started_by(&step.task_id),
            launch_type,
            capacity_provider_strategy,
            platform_version: k.platform_version.clone(),
            network_configuration: k
                .network_configuration
                .clone()
                .or_else(|| base.network_configuration.clone()),
            placement_constraints: k.placement_constraints.clone(),
            placement_strategy: k.placement_strategy.clone(),
            group: k.group.clone(),
            propagate_tags: k.propagate_tags.clone(),
            enable_execute_command: k.enable_execute_command,
            enable_ecs_managed_tags: k.enable_ecs_managed_tags,
            tags: task_tags(step, &base.controller_id, delivery, &k.tags),
            overrides: TaskOverride {
                container_overrides,
                cpu: self.task.cpu.clone(),
                memory: self.task.memory.clone(),
                ephemeral_storage: self.task.ephemeral_storage,
                task_role_arn: self.task.task_role_arn.clone(),
                execution_role_arn: self.task.execution_role_arn.clone(),
            },
        }
    }
}

impl RunTaskRequest {
    /// Characters of the `overrides` JSON, the quantity ECS limits to 8192.
    pub fn overrides_chars(&self) -> usize {
        serde_json::to_string(&self.overrides)
            .expect("overrides serialize")
            .chars()
            .count()
    }

    /// True when the overrides fit under the limit with headroom.
    pub fn overrides_fit(&self) -> bool {
        self.overrides_chars() <= OVERRIDES_LIMIT - OVERRIDES_MARGIN
    }
}

fn kv(name: &str, value: &str) -> KeyValue {
    KeyValue {
        name: name.to_owned(),
        value: value.to_owned(),
    }
}

fn json_tag<T: serde::de::DeserializeOwned>(
    tags: &BTreeMap<String, String>,
    name: &'static str,
) -> Result<Option<T>, InvalidTag> {
    tags.get(name)
        .filter(|v| !v.trim().is_empty())
        .map(|text| serde_json::from_str(text).map_err(|e| invalid(name, e.to_string())))
        .transpose()
}

fn positive_units(tag: &'static str, value: &str, unit: &str) -> Result<(), InvalidTag> {
    match value.trim().parse::<u32>() {
        Ok(n) if n > 0 => Ok(()),
        _ => Err(invalid(
            tag,
            format!("{value:?} is not a positive whole number of {unit}"),
        )),
    }
}

fn check_environment(tag: &'static str, environment: &[KeyValue]) -> Result<(), InvalidTag> {
    for var in environment {
        if RESERVED_ENV.contains(&var.name.as_str()) {
            return Err(invalid(
                tag,
                format!("environment variable {} is set by the controller", var.name),
            ));
        }
        if var.name.is_empty() {
            return Err(invalid(tag, "an environment variable has an empty name"));
        }
    }
    Ok(())
}

fn check_container_settings(tag: &'static str, s: &ContainerSettings) -> Result<(), InvalidTag> {
    for (name, value) in [
        ("cpu", s.cpu),
        ("memory", s.memory),
        ("memoryReservation", s.memory_reservation),
    ] {
        if value.is_some_and(|v| v < 0 || (v == 0 && name != "cpu")) {
            return Err(invalid(tag, format!("{name} must be positive")));
        }
    }
    Ok(())
}

fn check_network(tag: &'static str, network: &NetworkConfiguration) -> Result<(), InvalidTag> {
    let vpc = &network.awsvpc_configuration;
    if vpc.subnets.is_empty() || vpc.subnets.len() > 16 {
        return Err(invalid(tag, "awsvpcConfiguration needs 1 to 16 subnets"));
    }
    if vpc.security_groups.len() > 5 {
        return Err(invalid(
            tag,
            "awsvpcConfiguration takes at most 5 security groups",
        ));
    }
    if let Some(ip) = &vpc.assign_public_ip {
        if ip != "ENABLED" && ip != "DISABLED" {
            return Err(invalid(
                tag,
                format!("assignPublicIp {ip:?} is not ENABLED or DISABLED"),
            ));
        }
    }
    Ok(())
}

/// Checks a capacity provider strategy (flag or tag).
pub fn check_strategy(
    tag: &'static str,
    strategy: &[CapacityProviderItem],
) -> Result<(), InvalidTag> {
    if strategy.is_empty() || strategy.len() > 20 {
        return Err(invalid(
            tag,
            "capacityProviderStrategy needs 1 to 20 providers",
        ));
    }
    for item in strategy {
        if item.capacity_provider.is_empty() {
            return Err(invalid(tag, "a capacity provider has an empty name"));
        }
        if item.weight.is_some_and(|w| !(0..=1000).contains(&w))
            || item.base.is_some_and(|b| !(0..=100_000).contains(&b))
        {
            return Err(invalid(
                tag,
                format!(
                    "capacity provider {}: weight is 0 to 1000, base 0 to 100000",
                    item.capacity_provider
                ),
            ));
        }
    }
    Ok(())
}

// ---- identity -------------------------------------------------------------------------------

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// `startedBy` of every task of a step attempt (≤ 36 characters): ListTasks finds them by it.
pub fn started_by(task_id: &str) -> String {
    format!("dtq-{}", &sha256_hex(task_id)[..32])
}

/// RunTask's `clientToken` (64 characters) for one delivery of a step attempt: a retried
/// call of the same delivery gets the same task back; a relaunch after a failed start (a
/// later delivery) gets a new one.
pub fn client_token(task_id: &str, delivery: u32) -> String {
    sha256_hex(&format!("{task_id}/{}", delivery.max(1)))
}

/// ECS tag values take letters, digits, spaces and `_ . : / = + - @`, up to 256 characters.
pub fn tag_value(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " _.:/=+-@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(256)
        .collect()
}

fn task_tags(step: &StepRequest, controller_id: &str, delivery: u32, extra: &[Tag]) -> Vec<Tag> {
    let ours = [
        (tag_keys::RUN_ID, step.run_id.clone()),
        (tag_keys::STEP_KEY, step.step_key.clone()),
        (tag_keys::ATTEMPT, step.attempt.to_string()),
        (
            tag_keys::JOB_NAME,
            step.job_name.clone().unwrap_or_default(),
        ),
        (tag_keys::TASK_ID, step.task_id.clone()),
        (tag_keys::CONTROLLER, controller_id.to_owned()),
        (tag_keys::DELIVERY, delivery.max(1).to_string()),
    ];
    let mut tags: Vec<Tag> = ours
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(key, value)| Tag {
            key: key.to_owned(),
            value: tag_value(&value),
        })
        .collect();
    let extra: Vec<Tag> = extra
        .iter()
        .filter(|t| !tags.iter().any(|o| o.key == t.key))
        .cloned()
        .collect();
    tags.extend(extra);
    tags
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::step_body;

    fn step_with_tags(tags: &[(&str, &str)]) -> StepRequest {
        let mut step = crate::envelope::decode(&step_body(
            "0123456789abcdef0123456789abcdef",
            "run-1",
            "fan.op[key-1]",
            2,
        ))
        .unwrap();
        step.job_name = Some("diamond".into());
        step.tags = tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        step
    }

    fn base() -> BaseRequest {
        BaseRequest {
            cluster: "dagster".into(),
            task_definition: "dagster-step:3".into(),
            container: "dagster".into(),
            launch_type: Some("FARGATE".into()),
            capacity_provider_strategy: Vec::new(),
            network_configuration: Some(NetworkConfiguration {
                awsvpc_configuration: AwsVpcConfiguration {
                    subnets: vec!["subnet-1".into()],
                    security_groups: vec!["sg-1".into()],
                    assign_public_ip: Some("DISABLED".into()),
                },
            }),
            controller_id: "ctl-1".into(),
        }
    }

    fn build(tags: &[(&str, &str)]) -> Result<RunTaskRequest, InvalidTag> {
        let step = step_with_tags(tags);
        let settings = StepSettings::from_tags(&step.tags, "dagster")?;
        let args = StepArgs::Inline(step.compressed_step_args());
        Ok(settings.build(&base(), &step, 1, &args))
    }

    fn env_of(request: &RunTaskRequest) -> BTreeMap<String, String> {
        request.overrides.container_overrides[0]
            .environment
            .iter()
            .map(|kv| (kv.name.clone(), kv.value.clone()))
            .collect()
    }

    #[test]
    fn identity_is_deterministic_and_within_aws_limits() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(started_by(id), started_by(id));
        assert_eq!(started_by(id).len(), 36);
        assert!(started_by(id)
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert_eq!(client_token(id, 1).len(), 64);
        assert_eq!(
            client_token(id, 1),
            client_token(id, 0),
            "unknown delivery is the first"
        );
        assert_ne!(client_token(id, 1), client_token(id, 2));
        assert_ne!(started_by(id), started_by("another"));
    }

    #[test]
    fn default_request_runs_the_step_with_its_args_tags_and_identity() {
        let request = build(&[]).unwrap();
        let step = step_with_tags(&[]);
        assert_eq!(request.cluster, "dagster");
        assert_eq!(request.task_definition, "dagster-step:3");
        assert_eq!(request.launch_type.as_deref(), Some("FARGATE"));
        assert_eq!(request.started_by, started_by(&step.task_id));
        assert_eq!(request.client_token, client_token(&step.task_id, 1));
        let container = &request.overrides.container_overrides[0];
        assert_eq!(container.name, "dagster");
        assert_eq!(container.command, ["dagster", "api", "execute_step"]);
        let env = env_of(&request);
        assert_eq!(env[ENV_COMPRESSED_ARGS], step.compressed_step_args());
        assert_eq!(env[ENV_JOB_NAME], "diamond");
        assert_eq!(env[ENV_STEP_KEY], "fan.op[key-1]");
        let tags: BTreeMap<_, _> = request
            .tags
            .iter()
            .map(|t| (t.key.as_str(), t.value.as_str()))
            .collect();
        assert_eq!(tags[tag_keys::RUN_ID], "run-1");
        // Brackets are not allowed in tag values.
        assert_eq!(tags[tag_keys::STEP_KEY], "fan.op_key-1_");
        assert_eq!(tags[tag_keys::ATTEMPT], "2");
        assert_eq!(tags[tag_keys::TASK_ID], step.task_id);
        assert_eq!(tags[tag_keys::CONTROLLER], "ctl-1");
        assert_eq!(tags[tag_keys::DELIVERY], "1");
        assert!(request.overrides_fit());
    }

    #[test]
    fn op_tags_set_resources_overrides_and_kwargs() {
        let request = build(&[
            ("ecs/cpu", "1024"),
            ("ecs/memory", "4096"),
            ("ecs/ephemeral_storage", "50"),
            (
                "ecs/task_overrides",
                r#"{"memory": 8192, "taskRoleArn": "arn:aws:iam::1:role/step",
                    "containerOverrides": [{"name": "sidecar", "environment": [{"name": "A", "value": "1"}]}]}"#,
            ),
            (
                "ecs/container_overrides",
                r#"{"environment": [{"name": "TEAM", "value": "data"}], "memoryReservation": 512,
                    "resourceRequirements": [{"type": "GPU", "value": "1"}]}"#,
            ),
            (
                "ecs/run_task_kwargs",
                r#"{"taskDefinition": "gpu-step:1",
                    "capacityProviderStrategy": [{"capacityProvider": "FARGATE_SPOT", "weight": 1}],
                    "tags": [{"key": "team", "value": "data"}, {"key": "dagster/run-id", "value": "spoofed"}],
                    "propagateTags": "TASK_DEFINITION"}"#,
            ),
        ])
        .unwrap();
        assert_eq!(request.task_definition, "gpu-step:1");
        assert_eq!(
            request.launch_type, None,
            "the strategy replaces the launch type"
        );
        assert_eq!(
            request.capacity_provider_strategy[0].capacity_provider,
            "FARGATE_SPOT"
        );
        assert_eq!(request.overrides.cpu.as_deref(), Some("1024"));
        assert_eq!(
            request.overrides.memory.as_deref(),
            Some("8192"),
            "task_overrides win"
        );
        assert_eq!(request.overrides.ephemeral_storage.unwrap().size_in_gib, 50);
        assert_eq!(
            request.overrides.task_role_arn.as_deref(),
            Some("arn:aws:iam::1:role/step")
        );
        let step = &request.overrides.container_overrides[0];
        assert_eq!(step.settings.memory_reservation, Some(512));
        assert_eq!(env_of(&request)["TEAM"], "data");
        assert_eq!(request.overrides.container_overrides[1].name, "sidecar");
        assert!(request.overrides.container_overrides[1].command.is_empty());
        let run_ids: Vec<_> = request
            .tags
            .iter()
            .filter(|t| t.key == "dagster/run-id")
            .collect();
        assert_eq!(run_ids.len(), 1);
        assert_eq!(run_ids[0].value, "run-1", "the controller's tags win");
        assert!(request.tags.iter().any(|t| t.key == "team"));

        let json = serde_json::to_value(&request).unwrap();
        assert_eq!(json["overrides"]["ephemeralStorage"]["sizeInGiB"], 50);
        assert_eq!(json["propagateTags"], "TASK_DEFINITION");
        assert_eq!(
            json["overrides"]["containerOverrides"][0]["resourceRequirements"][0]["type"],
            "GPU"
        );
    }

    #[test]
    fn invalid_tags_name_the_tag_and_the_problem() {
        let cases: &[(&str, &str, &str)] = &[
            ("ecs/cpu", "lots", "positive whole number"),
            ("ecs/memory", "0", "positive whole number"),
            ("ecs/ephemeral_storage", "500", "21 to 200"),
            ("ecs/task_overrides", "{not json", "key must be a string"),
            (
                "ecs/task_overrides",
                r#"{"cpuu": "1"}"#,
                "unknown field `cpuu`",
            ),
            (
                "ecs/task_overrides",
                r#"{"containerOverrides": [{"name": "dagster"}]}"#,
                "use ecs/container_overrides",
            ),
            (
                "ecs/container_overrides",
                r#"{"command": ["sh", "-c", "x"]}"#,
                "unknown field `command`",
            ),
            (
                "ecs/container_overrides",
                r#"{"environment": [{"name": "DAGSTER_RUN_STEP_KEY", "value": "x"}]}"#,
                "set by the controller",
            ),
            (
                "ecs/run_task_kwargs",
                r#"{"cluster": "other"}"#,
                "unknown field `cluster`",
            ),
            (
                "ecs/run_task_kwargs",
                r#"{"count": 3}"#,
                "unknown field `count`",
            ),
            (
                "ecs/run_task_kwargs",
                r#"{"launchType": "LAMBDA"}"#,
                "not one of FARGATE",
            ),
            (
                "ecs/run_task_kwargs",
                r#"{"launchType": "EC2", "capacityProviderStrategy": [{"capacityProvider": "x"}]}"#,
                "exclude each other",
            ),
            (
                "ecs/run_task_kwargs",
                r#"{"networkConfiguration": {"awsvpcConfiguration": {"subnets": []}}}"#,
                "1 to 16 subnets",
            ),
            (
                "ecs/run_task_kwargs",
                r#"{"tags": [{"key": "aws:x", "value": "1"}]}"#,
                "reserved",
            ),
        ];
        for (tag, value, expected) in cases {
            let err = build(&[(tag, value)]).unwrap_err();
            assert_eq!(err.tag, *tag, "{tag}={value}: {err}");
            assert!(err.to_string().contains(expected), "{tag}={value}: {err}");
        }
    }

    #[test]
    fn size_accounting_matches_the_serialized_overrides() {
        let request = build(&[]).unwrap();
        let json = serde_json::to_string(&request.overrides).unwrap();
        assert_eq!(request.overrides_chars(), json.len());
        // Args of about 20 KB of incompressible text do not fit inline...
        let step = step_with_tags(&[]);
        let settings = StepSettings::from_tags(&step.tags, "dagster").unwrap();
        let big = StepArgs::Inline("A".repeat(9000));
        let request = settings.build(&base(), &step, 1, &big);
        assert!(request.overrides_chars() > OVERRIDES_LIMIT);
        assert!(!request.overrides_fit());
        // ... and a pointer always does, with the shim as the command.
        let offloaded = StepArgs::Offloaded {
            uri: "s3://bucket/dagster-taskiq/step-args/0123".into(),
            sha256: "ab".repeat(32),
        };
        let request = settings.build(&base(), &step, 3, &offloaded);
        assert!(request.overrides_fit());
        let container = &request.overrides.container_overrides[0];
        assert_eq!(container.command, SHIM_COMMAND);
        let env = env_of(&request);
        assert!(!env.contains_key(ENV_COMPRESSED_ARGS));
        assert_eq!(
            env[ENV_ARGS_URI],
            "s3://bucket/dagster-taskiq/step-args/0123"
        );
        assert_eq!(request.client_token, client_token(&step.task_id, 3));
        // Right at the edge: the margin keeps a request that AWS might count differently out.
        let edge = OVERRIDES_LIMIT - OVERRIDES_MARGIN;
        let small = settings.build(&base(), &step, 1, &StepArgs::Inline(String::new()));
        let pad = edge - small.overrides_chars();
        let at_edge = settings.build(&base(), &step, 1, &StepArgs::Inline("A".repeat(pad)));
        assert_eq!(at_edge.overrides_chars(), edge);
        assert!(at_edge.overrides_fit());
        let over = settings.build(&base(), &step, 1, &StepArgs::Inline("A".repeat(pad + 1)));
        assert!(!over.overrides_fit());
    }

    #[test]
    fn a_step_with_a_timeout_runs_through_the_shim_which_enforces_it() {
        let mut step = step_with_tags(&[]);
        let settings = StepSettings::from_tags(&step.tags, "dagster").unwrap();
        let args = StepArgs::Inline("eJwLAAA=".into());
        let plain = settings.build(&base(), &step, 1, &args);
        assert_eq!(plain.overrides.container_overrides[0].command, STEP_COMMAND);
        assert!(!env_of(&plain).contains_key(ENV_STEP_TIMEOUT));

        step.timeout = Some(std::time::Duration::from_millis(2500));
        let timed = settings.build(&base(), &step, 1, &args);
        assert_eq!(timed.overrides.container_overrides[0].command, SHIM_COMMAND);
        let env = env_of(&timed);
        assert_eq!(env[ENV_STEP_TIMEOUT], "2.5");
        assert_eq!(env[ENV_COMPRESSED_ARGS], "eJwLAAA=");
        // A tag cannot set it.
        let tag =
            r#"{"environment": [{"name": "DAGSTER_TASKIQ_STEP_TIMEOUT_SECONDS", "value": "1"}]}"#;
        assert!(StepSettings::from_tags(
            &BTreeMap::from([("ecs/container_overrides".to_owned(), tag.to_owned())]),
            "dagster"
        )
        .is_err());
    }
}
