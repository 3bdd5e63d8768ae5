//! # dagster-taskiq-controller
//!
//! Runs Dagster steps published to SQS, one TaskIQ message per step attempt, each in
//! isolation, with leases, retries, dead letters and verdicts so that a step is never lost
//! and never runs twice at once. `docs/architecture.md` follows one message through the
//! code; `docs/protocol.md` is the wire contract, `docs/guarantees.md` what is promised.
//!
//! ## Layout
//! Boundaries (a trait each, with the real implementation beside it):
//! - [`queue`]: the [`queue::WorkQueue`] boundary and its SQS implementation.
//! - [`launcher`]: the [`launcher::Launcher`] boundary; child processes (cold, or forked from
//!   a warm zygote), ECS tasks ([`launcher::ecs`]) and the per-step router.
//! - [`dagster`]: the [`dagster::DagsterBridge`] boundary and its Python sidecar client.
//! - [`taskiq`]: the dagster-taskiq compatibility layer: extended (S3) payloads and taskiq
//!   result objects, behind the [`taskiq::ObjectStore`] boundary.
//! - [`aws`]: the one layer under the SQS, S3 and ECS implementations: the clients (one S3
//!   addressing rule), what an SDK error means (throttled, transient, permanent), the
//!   SendMessage call every send goes through.
//!
//! The loop, in the order a message meets it:
//! - [`envelope`]: the wire contract: SQS body → [`envelope::StepRequest`] or [`envelope::Poison`].
//! - [`controller`]: intake, reconcile against Dagster, admit, launch, supervise, settle;
//!   a [`controller::Context`] holds the clients, tables and metrics.
//! - [`outcome`]: how one delivery of a step attempt ended, as a type, and what settling it
//!   does to the message.
//! - [`admission`]: concurrency caps and the launch rate limit.
//! - [`lease`]: batched visibility heartbeats and lease-loss detection.
//! - [`retry`]: the backoff policy and the one retry-with-budget helper, used by every call
//!   that is retried (queue settles, bridge calls, taskiq result writes, ECS RunTask and
//!   StopTask).
//!
//! Around it:
//! - [`state`]: step states and the table the API reads.
//! - [`step_env`]: the environment of the processes started on this host (steps, the warm
//!   zygote, the bridge): the controller's minus its own variables and the denied ones.
//! - [`config`]: the command line, gathered from each component's own `...Args`;
//!   [`flags`]: the value parsers and the error they share.
//! - [`dashboard`]: HTML dashboard, probes, metrics and JSON API (warp).
//! - [`doctor`]: the `doctor` subcommand's checks of a configuration.
//! - [`health`]: loop heartbeats and SQS reachability, read by the probes.
//! - [`history`]: the last hour at one-minute resolution (launches, outcomes, queue depth,
//!   start latency), a bounded ring the dashboard charts.
//! - [`links`]: links to a step's run in the Dagster UI and to its ECS task and log stream,
//!   built safely from message and ECS values.
//! - [`metrics`]: the Prometheus registry; [`scale`]: the windowed scaling signals behind
//!   some of it; [`cloudwatch`]: the same signals as CloudWatch metrics, once a minute.
//! - `fakes` (feature `testing`): every in-memory boundary (and the ECS API), for the
//!   state-machine tests and the overhead benchmarks; never the only test of a feature.
//!
//! The binary (`src/main.rs`, `src/app/`) parses the command line and wires these together.

pub mod admission;
pub mod aws;
pub(crate) mod bounded_lines;
pub mod claims;
pub mod cloudwatch;
pub mod config;
pub mod controller;
pub mod dagster;
pub mod dashboard;
pub mod doctor;
pub mod envelope;
#[cfg(any(test, feature = "testing"))]
pub mod fakes;
pub(crate) mod flags;
pub mod health;
pub mod history;
pub mod launcher;
pub mod lease;
pub mod links;
pub mod metrics;
pub(crate) mod outcome;
pub mod queue;
pub mod retry;
pub mod scale;
pub mod state;
pub mod step_env;
pub mod taskiq;
