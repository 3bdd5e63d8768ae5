//! # dagster-taskiq-controller
//!
//! Runs Dagster steps published to SQS, one TaskIQ message per step attempt, each in
//! isolation, with leases, retries, dead letters and verdicts so that a step is never lost
//! and never runs twice at once. `docs/protocol.md` is the wire contract;
//! `../shared/DESIGN.md` (in the steering repo) the architecture.
//!
//! ## Layout
//! - [`config`]: flags and environment, validated.
//! - [`envelope`]: the wire contract: SQS body → [`envelope::StepRequest`] or [`envelope::Poison`].
//! - [`queue`]: the [`queue::WorkQueue`] boundary and its SQS implementation.
//! - [`lease`]: batched visibility heartbeats and lease-loss detection.
//! - [`launcher`]: the [`launcher::Launcher`] boundary; child processes (cold, or forked from
//!   a warm zygote), ECS tasks ([`launcher::ecs`]) and the per-step router.
//! - [`admission`]: concurrency cap and launch rate limit.
//! - [`reconciler`]: the loop and the step state machine.
//! - [`results`]: dagster-taskiq compatibility: taskiq result objects in S3, extended (S3)
//!   payloads, the step's serialized event lines.
//! - [`state`]: step states and the table the API reads.
//! - [`retry`]: failure classes and backoff.
//! - [`dagster`]: the [`dagster::DagsterBridge`] boundary and its Python sidecar client.
//! - [`dashboard`]: HTML dashboard, probes, metrics and JSON API (warp).
//! - [`doctor`]: the `doctor` subcommand's checks of a configuration.
//! - [`health`]: loop heartbeats and SQS reachability, read by the probes.
//! - [`metrics`]: the Prometheus registry.
//! - [`fakes`]: in-memory boundaries for unit tests and benchmarks.

pub mod admission;
pub mod config;
pub mod controller;
pub mod dagster;
pub mod dashboard;
pub mod doctor;
pub mod envelope;
pub mod fakes;
pub mod health;
pub mod launcher;
pub mod lease;
pub mod metrics;
pub mod outcome;
pub mod queue;
pub mod results;
pub mod retry;
pub mod state;

/// Errors a library caller can get, one variant per boundary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Queue(#[from] queue::QueueError),
    #[error(transparent)]
    Bridge(#[from] dagster::BridgeError),
    #[error(transparent)]
    Launch(#[from] launcher::LaunchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
