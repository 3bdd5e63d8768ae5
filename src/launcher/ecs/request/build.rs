//! The controller's side of a request: its own settings, how the step's args reach the
//! container, and the complete request a step's checked settings build.

use super::identity::{client_token, started_by, task_tags};
use super::op_tags::StepSettings;
use super::run_task::{
    CapacityProviderItem, ContainerOverride, KeyValue, NetworkConfiguration, RunTaskRequest,
    TaskOverride,
};
use crate::envelope::StepRequest;

/// Every step's command: the shim (`dagster_taskiq_controller.ecs_entrypoint`) fetches
/// offloaded args, SIGKILLs the step at its timeout, and runs it guarded
/// (`dagster_taskiq_controller.stop_guard`): a SIGTERM that Dagster did not ask for (Spot
/// interruption, scale-in, someone's StopTask) ends the step without Dagster's interrupt
/// failure, so the verdict naming the stop lets the op's RetryPolicy decide.
pub(crate) const SHIM_COMMAND: [&str; 3] =
    ["python", "-m", "dagster_taskiq_controller.ecs_entrypoint"];
/// Exit code of the shim when it killed the step at its timeout (as coreutils' `timeout`).
pub(crate) const SHIM_TIMED_OUT_EXIT: i32 = 124;

pub(crate) const ENV_COMPRESSED_ARGS: &str = "DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS";
pub(crate) const ENV_JOB_NAME: &str = "DAGSTER_RUN_JOB_NAME";
pub(crate) const ENV_STEP_KEY: &str = "DAGSTER_RUN_STEP_KEY";
/// `s3://bucket/key` of the offloaded compressed args.
pub(crate) const ENV_ARGS_URI: &str = "DAGSTER_TASKIQ_STEP_ARGS_S3_URI";
/// sha256 (hex) of the offloaded object, checked by the shim.
pub(crate) const ENV_ARGS_SHA256: &str = "DAGSTER_TASKIQ_STEP_ARGS_SHA256";
/// The step's timeout in seconds, enforced by the shim inside the task.
pub(crate) const ENV_STEP_TIMEOUT: &str = "DAGSTER_TASKIQ_STEP_TIMEOUT_SECONDS";

/// The controller's RunTask settings (flags), the base every step's request starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BaseRequest {
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
pub(crate) enum StepArgs {
    /// `DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS` in the overrides.
    Inline(String),
    /// A pointer to the object holding that value, resolved by the shim.
    Offloaded { uri: String, sha256: String },
}

impl StepSettings {
    /// Whether the op tags pick the task definition (ecs/run_task_kwargs): it is then used
    /// as it is.
    pub(crate) fn chooses_task_definition(&self) -> bool {
        self.kwargs.task_definition.is_some()
    }

    /// The complete request for delivery `delivery` (1-based) of the step.
    pub(crate) fn build(
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

        let command = SHIM_COMMAND.map(String::from).to_vec();
        let mut environment = match args {
            StepArgs::Inline(compressed) => vec![kv(ENV_COMPRESSED_ARGS, compressed)],
            StepArgs::Offloaded { uri, sha256 } => {
                vec![kv(ENV_ARGS_URI, uri), kv(ENV_ARGS_SHA256, sha256)]
            }
        };
        if let Some(timeout) = step.timeout {
            // The shim SIGKILLs the step at its deadline, counted from the container's start
            // (an image pull does not count), and says so by its exit code.
            environment.push(kv(ENV_STEP_TIMEOUT, &format!("{}", timeout.as_secs_f64())));
        }
        environment.push(kv(ENV_JOB_NAME, step.job_name.as_deref().unwrap_or("")));
        environment.push(kv(ENV_STEP_KEY, &step.step_key));
        // The run's env_vars, then the op tags' (which win: a name is set once).
        environment.extend(
            self.run_environment
                .iter()
                .filter(|v| !self.container.environment.iter().any(|t| t.name == v.name))
                .cloned(),
        );
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
                .or_else(|| self.run_task_definition.clone())
                .unwrap_or_else(|| base.task_definition.clone()),
            client_token: client_token(&step.task_id, delivery),
            started_by: started_by(&step.task_id),
            launch_type,
            capacity_provider_strategy,
            platform_version: k.platform_version.clone(),
            // Only the controller's: the policy refuses a tag's.
            network_configuration: base.network_configuration.clone(),
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

fn kv(name: &str, value: &str) -> KeyValue {
    KeyValue {
        name: name.to_owned(),
        value: value.to_owned(),
    }
}
