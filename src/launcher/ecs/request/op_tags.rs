//! What a step's `ecs/*` op tags may say, read and checked once per launch so that a bad tag
//! dead-letters the message (naming the tag) instead of failing at AWS, and a tag that asks
//! for more than the operator allows (`policy.rs`) is refused the same way.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::build::{
    ENV_ARGS_SHA256, ENV_ARGS_URI, ENV_COMPRESSED_ARGS, ENV_JOB_NAME, ENV_STEP_KEY,
    ENV_STEP_TIMEOUT,
};
use super::policy::OverridePolicy;
use super::run_task::{
    CapacityProviderItem, ContainerSettings, EphemeralStorage, KeyValue, PlacementConstraint,
    PlacementStrategy, Tag,
};

/// A launch setting that can never work, or that the operator does not allow. The message
/// is dead-lettered with this text, after a verdict with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{tag}: {message}")]
pub(crate) struct InvalidTag {
    pub tag: &'static str,
    pub message: String,
    pub kind: TagProblem,
}

/// Why a tag cannot be used: it is malformed, or it asks for more than the policy allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TagProblem {
    Invalid,
    Refused,
    /// The run's executor config (`env_vars`, `secrets`) cannot be used.
    Config,
}

impl InvalidTag {
    /// The dead-letter reason: a refused override is told apart from a typo, since it may be
    /// someone trying to widen a task's privileges.
    pub(crate) fn reason(&self) -> &'static str {
        match self.kind {
            TagProblem::Invalid => "invalid_launch_tags",
            TagProblem::Refused => "launch_override_refused",
            TagProblem::Config => "invalid_executor_config",
        }
    }
}

fn invalid(tag: &'static str, message: impl Into<String>) -> InvalidTag {
    InvalidTag {
        tag,
        message: message.into(),
        kind: TagProblem::Invalid,
    }
}

pub(super) fn refused(tag: &'static str, message: impl Into<String>) -> InvalidTag {
    InvalidTag {
        tag,
        message: message.into(),
        kind: TagProblem::Refused,
    }
}

/// Names a tag may not set: the controller owns them.
pub(super) const RESERVED_ENV: [&str; 7] = [
    ENV_COMPRESSED_ARGS,
    ENV_JOB_NAME,
    ENV_STEP_KEY,
    ENV_ARGS_URI,
    ENV_ARGS_SHA256,
    ENV_STEP_TIMEOUT,
    "DAGSTER_EXECUTE_STEP_ARGS",
];

/// `ecs/container_overrides`: settings of the step container plus extra environment.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct ContainerOverridesTag {
    #[serde(default)]
    pub(super) environment: Vec<KeyValue>,
    #[serde(flatten)]
    pub(super) settings: ContainerSettings,
}

/// A sidecar's override inside `ecs/task_overrides`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct SidecarOverride {
    pub(super) name: String,
    #[serde(default)]
    pub(super) environment: Vec<KeyValue>,
    #[serde(flatten)]
    pub(super) settings: ContainerSettings,
}

/// `ecs/task_overrides`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct TaskOverridesTag {
    #[serde(default, deserialize_with = "string_or_integer")]
    pub(super) cpu: Option<String>,
    #[serde(default, deserialize_with = "string_or_integer")]
    pub(super) memory: Option<String>,
    #[serde(default)]
    pub(super) ephemeral_storage: Option<EphemeralStorage>,
    #[serde(default)]
    pub(super) task_role_arn: Option<String>,
    #[serde(default)]
    pub(super) execution_role_arn: Option<String>,
    #[serde(default)]
    pub(super) container_overrides: Vec<SidecarOverride>,
}

/// `ecs/run_task_kwargs`: the RunTask parameters a step may choose. `cluster`, `count`,
/// `overrides`, `startedBy` and `clientToken` belong to the controller; `taskDefinition`,
/// `networkConfiguration` and `enableExecuteCommand` are read only to be checked against
/// the policy.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RunTaskKwargsTag {
    pub(super) task_definition: Option<String>,
    pub(super) launch_type: Option<String>,
    pub(super) capacity_provider_strategy: Option<Vec<CapacityProviderItem>>,
    pub(super) platform_version: Option<String>,
    /// Any value is refused: the network is the controller's.
    pub(super) network_configuration: Option<serde_json::Value>,
    #[serde(default)]
    pub(super) placement_constraints: Vec<PlacementConstraint>,
    #[serde(default)]
    pub(super) placement_strategy: Vec<PlacementStrategy>,
    pub(super) group: Option<String>,
    pub(super) propagate_tags: Option<String>,
    pub(super) enable_execute_command: Option<bool>,
    #[serde(rename = "enableECSManagedTags")]
    pub(super) enable_ecs_managed_tags: Option<bool>,
    #[serde(default)]
    pub(super) tags: Vec<Tag>,
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

/// Everything the step's op tags decide, validated once per launch.
#[derive(Debug, Default)]
pub(crate) struct StepSettings {
    pub(super) task: TaskOverridesTag,
    pub(super) container: ContainerOverridesTag,
    pub(super) kwargs: RunTaskKwargsTag,
    /// The run's `env_vars`, checked (`run_ecs.rs`); the op tags' environment wins by name.
    pub(crate) run_environment: Vec<KeyValue>,
    /// The task definition for the run's image and secrets, when not the controller's.
    pub(crate) run_task_definition: Option<String>,
}

const LAUNCH_TYPES: [&str; 3] = ["FARGATE", "EC2", "EXTERNAL"];

impl StepSettings {
    /// Reads and checks the `ecs/*` op tags of a step, then holds them to the operator's
    /// policy.
    pub(crate) fn from_tags(
        tags: &BTreeMap<String, String>,
        container: &str,
        policy: &OverridePolicy,
    ) -> Result<Self, InvalidTag> {
        let mut settings = StepSettings {
            task: json_tag(tags, "ecs/task_overrides")?.unwrap_or_default(),
            container: json_tag(tags, "ecs/container_overrides")?.unwrap_or_default(),
            kwargs: json_tag(tags, "ecs/run_task_kwargs")?.unwrap_or_default(),
            ..StepSettings::default()
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
        policy.check(&settings)?;
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
        // `NAME=VALUE` is how the container gets it: a name with `=` would set another.
        if var.name.contains(['=', '\0']) {
            return Err(invalid(
                tag,
                format!("environment variable name {:?} contains = or NUL", var.name),
            ));
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

/// Checks a capacity provider strategy (flag or tag).
pub(crate) fn check_strategy(
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
