//! Building the RunTask request of a step: the controller's settings, the step's `ecs/*` op
//! tags (validated here, so a bad tag dead-letters the message instead of failing at AWS),
//! the idempotency identity (`clientToken`, `startedBy`, tags) and the overrides size.
//!
//! - `run_task.rs`: the request in the ECS API's shape, and its overrides size;
//! - `op_tags.rs`: what the `ecs/*` op tags may say, checked;
//! - `build.rs`: the controller's settings and the request they and the tags make;
//! - `identity.rs`: `clientToken`, `startedBy` and the task tags.

mod build;
mod identity;
mod op_tags;
mod run_task;
#[cfg(test)]
mod tests;

pub use build::{
    BaseRequest, StepArgs, ENV_ARGS_SHA256, ENV_ARGS_URI, ENV_COMPRESSED_ARGS, ENV_JOB_NAME,
    ENV_STEP_KEY, ENV_STEP_TIMEOUT, SHIM_COMMAND, SHIM_TIMED_OUT_EXIT, STEP_COMMAND,
};
pub use identity::{client_token, started_by, tag_keys, tag_value};
pub use op_tags::{check_strategy, InvalidTag, StepSettings};
pub use run_task::{
    AwsVpcConfiguration, CapacityProviderItem, ContainerOverride, ContainerSettings,
    EnvironmentFile, EphemeralStorage, KeyValue, NetworkConfiguration, PlacementConstraint,
    PlacementStrategy, ResourceRequirement, RunTaskRequest, Tag, TaskOverride, OVERRIDES_LIMIT,
    OVERRIDES_MARGIN,
};
