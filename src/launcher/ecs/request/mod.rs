//! Building the RunTask request of a step: the controller's settings, the step's `ecs/*` op
//! tags (validated here, so a bad tag dead-letters the message instead of failing at AWS),
//! the idempotency identity (`clientToken`, `startedBy`, tags) and the overrides size.
//!
//! - `run_task.rs`: the request in the ECS API's shape, and its overrides size;
//! - `op_tags.rs`: what the `ecs/*` op tags may say, checked;
//! - `policy.rs`: what the operator lets them change (roles, task definitions, sizes) and
//!   what no tag may touch (network, ECS Exec, loader and interpreter variables);
//! - `build.rs`: the controller's settings and the request they and the tags make;
//! - `run_ecs.rs`: what the run stored (its image, executor env_vars and secrets), checked;
//! - `identity.rs`: `clientToken`, `startedBy` and the task tags.

mod build;
mod identity;
mod op_tags;
mod policy;
mod run_ecs;
mod run_task;
#[cfg(test)]
mod tests;

pub(crate) use build::{BaseRequest, StepArgs, SHIM_TIMED_OUT_EXIT};
pub(crate) use identity::started_by;
pub(crate) use op_tags::{check_strategy, StepSettings};
pub(crate) use policy::{
    check_image_name, task_definition_family, OverridePolicy, FARGATE_MAX_CPU,
    FARGATE_MAX_EPHEMERAL_GIB, FARGATE_MAX_MEMORY_MIB,
};
pub(crate) use run_ecs::RunEcs;
pub(crate) use run_task::{
    AwsVpcConfiguration, CapacityProviderItem, NetworkConfiguration, RunTaskRequest, Secret,
    OVERRIDES_LIMIT,
};

// What the launcher's tests check in a request.
#[cfg(test)]
pub(crate) use build::{ENV_ARGS_SHA256, ENV_ARGS_URI};
#[cfg(test)]
pub(crate) use identity::client_token;
