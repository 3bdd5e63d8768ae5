//! The Dagster boundary: run status, step outcomes and verdicts, read and written with
//! Dagster's own APIs by a long-lived Python sidecar (`python -m
//! dagster_taskiq_controller.bridge`) that speaks JSON lines (docs/protocol.md, section 2).
//!
//! This module holds the boundary's types and trait; [`sidecar`] runs the sidecar process:
//! started lazily, killed when a request outlives its deadline, restarted by the next
//! request, with a bounded number of requests waiting for it.

mod sidecar;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::envelope::{AttemptId, StepRequest};
pub use crate::envelope::{StoredEcs, StoredSecret};

use crate::flags::parse_seconds;
use crate::links::Link;
use crate::step_env::StepEnvironment;

pub use sidecar::{RestartCause, SidecarBridge, SidecarConfig, SidecarState, SidecarStatus};

/// Dagster's run statuses (`DagsterRunStatus`), and any status this build does not know
/// (Dagster 1.13 added `SUSPENDED`), which stops nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunStatus {
    Queued,
    NotStarted,
    Managed,
    Starting,
    Started,
    Success,
    Failure,
    Canceling,
    Canceled,
    /// A status newer than this build, kept as Dagster spells it.
    Other(String),
}

/// The unknown statuses already logged: each is worth one warning, not one per poll.
static UNKNOWN_STATUSES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

impl RunStatus {
    /// True when no new step of the run should start.
    pub(crate) fn stops_new_steps(&self) -> bool {
        matches!(
            self,
            RunStatus::Success | RunStatus::Failure | RunStatus::Canceling | RunStatus::Canceled
        )
    }

    /// Dagster's own spelling, e.g. `CANCELING`.
    pub(crate) fn name(&self) -> &str {
        match self {
            RunStatus::Queued => "QUEUED",
            RunStatus::NotStarted => "NOT_STARTED",
            RunStatus::Managed => "MANAGED",
            RunStatus::Starting => "STARTING",
            RunStatus::Started => "STARTED",
            RunStatus::Success => "SUCCESS",
            RunStatus::Failure => "FAILURE",
            RunStatus::Canceling => "CANCELING",
            RunStatus::Canceled => "CANCELED",
            RunStatus::Other(name) => name,
        }
    }

    /// The status Dagster spells `name`; an unknown one becomes [`RunStatus::Other`] (and is
    /// logged the first time it is seen).
    pub fn from_name(name: &str) -> RunStatus {
        match name {
            "QUEUED" => RunStatus::Queued,
            "NOT_STARTED" => RunStatus::NotStarted,
            "MANAGED" => RunStatus::Managed,
            "STARTING" => RunStatus::Starting,
            "STARTED" => RunStatus::Started,
            "SUCCESS" => RunStatus::Success,
            "FAILURE" => RunStatus::Failure,
            "CANCELING" => RunStatus::Canceling,
            "CANCELED" => RunStatus::Canceled,
            other => {
                if UNKNOWN_STATUSES.lock().insert(other.to_owned()) {
                    tracing::warn!(
                        status = other,
                        "Dagster reports a run status this controller does not know; it stops no steps"
                    );
                }
                RunStatus::Other(other.to_owned())
            }
        }
    }
}

impl Serialize for RunStatus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for RunStatus {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(RunStatus::from_name(&name))
    }
}

/// What the event log says about one step attempt.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StepState {
    /// `None`: the run does not exist in that instance.
    pub run_status: Option<RunStatus>,
    /// STEP_SUCCESS / STEP_FAILURE / STEP_UP_FOR_RETRY events of the step, all attempts.
    pub terminal_events: u32,
    /// The asked attempt already ended (it has its terminal event).
    pub attempt_finished: bool,
    /// Type of the newest terminal event, e.g. `STEP_SUCCESS`.
    pub last_terminal: Option<String>,
    /// The step as its run stored it (`None`: the run is unknown, or stored no execution
    /// plan): what the message's launch settings must match.
    #[serde(default)]
    pub stored_step: Option<StoredStep>,
    /// For an attempt that ended in failure: the class names of its error chain, outermost
    /// first (`step_state` only; empty otherwise).
    #[serde(default)]
    pub failure_classes: Vec<String>,
}

impl StepState {
    /// Whether the attempt's failure was a failed allocation (Python's `MemoryError`, as an
    /// address-space rlimit raises it).
    pub(crate) fn failed_allocation(&self) -> bool {
        self.failure_classes.iter().any(|c| c == "MemoryError")
    }
}

/// A step as its run stored it in Dagster: the settings that decide how it is launched.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StoredStep {
    /// Whether the run's execution plan has the step at all.
    pub found: bool,
    /// Its op tags, as the executor writes them into the `dagster_tags` label.
    pub tags: BTreeMap<String, String>,
    /// The run's job.
    pub job_name: String,
    /// The run's code location (`remote_job_origin.location_name`); `None` for a run
    /// launched without a workspace (`execute_job`).
    #[serde(default)]
    pub location: Option<String>,
    /// What the run says about its ECS tasks (`bridge.py` `_stored_ecs`).
    #[serde(default)]
    pub ecs: StoredEcs,
}

/// A notice the bridge sends unasked, about a run of the latest `run_statuses` call.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "push", rename_all = "snake_case")]
pub enum BridgePush {
    /// The run's event log says it is canceling, canceled or failed.
    RunEnded { run_id: String, status: RunStatus },
    /// The executor's `terminate_step` asked for this attempt to stop.
    TerminateStep {
        run_id: String,
        step_key: String,
        attempt: u32,
        task_id: String,
    },
}

impl BridgePush {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            BridgePush::RunEnded { .. } => "run_ended",
            BridgePush::TerminateStep { .. } => "terminate_step",
        }
    }
}

/// How many pushes may wait for the controller before the oldest are dropped; the
/// run-status poll recovers anything dropped.
const PUSH_BUFFER: usize = 1024;

/// Engine event metadata keys shared with the executor (`contract.META_*` in Python): the
/// attempt and task id an event of the controller is about.
pub(crate) const META_ATTEMPT: &str = "dagster_taskiq_controller/attempt";
pub(crate) const META_TASK_ID: &str = "dagster_taskiq_controller/task_id";

/// The controller's account of an attempt that ended without a terminal event.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Why the attempt failed, e.g. "process killed by signal 9 (SIGKILL)".
    pub verdict: String,
    /// How the process ended, e.g. "signal 9".
    pub exit: String,
    /// Last lines the step wrote to stderr.
    pub stderr_tail: String,
    /// The execution's pages (its ECS task, its log stream): url metadata of the event.
    pub links: Vec<Link>,
}

impl Verdict {
    /// The verdict of an attempt the controller did not run at all.
    pub(crate) fn not_run(verdict: String) -> Self {
        Self {
            verdict,
            exit: "not run".into(),
            stderr_tail: String::new(),
            links: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VerdictAck {
    /// False when the attempt had already finished or the verdict was already there.
    pub written: bool,
    pub attempt_finished: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BridgeError {
    #[error("Dagster bridge unavailable: {0}")]
    Unavailable(String),
    #[error("Dagster bridge did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Dagster bridge rejected the request ({kind}): {message}")]
    Rejected { kind: String, message: String },
    #[error("Dagster raised in the bridge: {0}")]
    Internal(String),
    /// The sidecar has this many requests waiting already; the request was not sent.
    #[error("Dagster bridge busy: {0} requests are waiting for it already")]
    Busy(usize),
}

impl BridgeError {
    /// Whether trying again later may succeed.
    pub(crate) fn is_transient(&self) -> bool {
        !matches!(self, BridgeError::Rejected { .. })
    }

    /// The sidecar itself could not answer (down, hung and killed, restarting): says
    /// nothing about the request.
    pub(crate) fn is_sidecar_down(&self) -> bool {
        matches!(self, BridgeError::Unavailable(_) | BridgeError::Timeout(_))
    }
}

impl crate::retry::Transient for BridgeError {
    fn is_transient(&self) -> bool {
        BridgeError::is_transient(self)
    }
}

/// A durable claim on one step attempt, as stored in the Dagster instance
/// (docs/guarantees.md, "Claims").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Claim {
    /// The controller id of the holder.
    pub holder: String,
    /// Fresh per claim: tells a restarted holder with the same id from the one before it.
    pub token: String,
    /// The message the holder runs the attempt for.
    pub message_id: String,
    /// Bumped by the holder while it holds a live lease on that message.
    #[serde(default)]
    pub beat: u64,
    /// Set when the attempt ended with a controller verdict: it is not run again.
    #[serde(default)]
    pub ended: Option<String>,
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ClaimAnswer {
    pub claimed: bool,
    /// The claim as it stands now (`None`: released in between, ask again).
    pub current: Option<Claim>,
    /// With `claimed`: the attempt's state, read after the claim was taken.
    #[serde(default)]
    pub state: Option<StepState>,
}

/// What a controller asks for when it claims an attempt.
#[derive(Debug, Clone, Copy)]
pub struct ClaimBid<'a> {
    pub holder: &'a str,
    pub token: &'a str,
    pub message_id: &'a str,
    /// Take over the claim that holds this token (and no other).
    pub replace_token: Option<&'a str>,
}

/// A claim this controller holds, as renewed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeldClaim {
    pub run_id: String,
    pub step_key: String,
    pub attempt: u32,
    pub token: String,
    pub message_id: String,
}

/// What the sidecar says about itself and the controller's (pinned) Dagster instance.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct BridgeInfo {
    pub dagster_version: String,
    /// The packed `InstanceRef` of the controller's instance: every step runs against it.
    #[serde(default)]
    pub instance_ref: Value,
    /// `module.Class` of each of its storages and of its instance class, by `InstanceRef`
    /// field (`""` for one the instance does not set).
    #[serde(default)]
    pub storages: BTreeMap<String, String>,
    /// The instance's root directory (`DAGSTER_HOME`).
    #[serde(default)]
    pub root_directory: Option<String>,
    /// The instance's most recently created run, if it has any.
    #[serde(default)]
    pub latest_run: Option<LatestRun>,
    /// Versions of the packages a PostgreSQL instance depends on (`None`: not installed).
    #[serde(default)]
    pub packages: BTreeMap<String, Option<String>>,
}

/// A run, as `doctor` shows that the controller's instance is the one the runs live in.
#[derive(Debug, Clone, Deserialize)]
pub struct LatestRun {
    pub run_id: String,
    pub status: String,
    /// When the run was created, in seconds since the epoch.
    pub created: f64,
}

impl BridgeInfo {
    /// Whether a run storage of the instance keeps its data in SQLite files on this host.
    pub(crate) fn stores_in_sqlite(&self) -> bool {
        self.storages.values().any(|class| class.contains("Sqlite"))
    }

    /// Whether the instance's storage is PostgreSQL (dagster-postgres).
    pub(crate) fn stores_in_postgres(&self) -> bool {
        self.storages
            .values()
            .any(|class| class.contains("Postgres"))
    }

    /// The installed version of a Python package, if installed.
    pub(crate) fn package(&self, name: &str) -> Option<&str> {
        self.packages.get(name).and_then(|v| v.as_deref())
    }

    /// Whether a message's `instance_ref` names storages or an instance class other than the
    /// pinned instance's (it is ignored either way; paths differ legitimately between hosts).
    pub(crate) fn is_foreign(&self, instance_ref: &Value) -> bool {
        if instance_ref.is_null() {
            return false;
        }
        self.storages.iter().any(|(field, class)| {
            let data = &instance_ref[field.as_str()];
            let named = if data.is_object() {
                format!(
                    "{}.{}",
                    data["module_name"].as_str().unwrap_or("None"),
                    data["class_name"].as_str().unwrap_or("None")
                )
            } else {
                String::new()
            };
            &named != class
        })
    }
}

/// Reads and writes Dagster state for the controller.
#[async_trait]
pub trait DagsterBridge: Send + Sync + 'static {
    /// Status of each run (`None` for an unknown run), in one round trip. The bridge then
    /// watches exactly these runs of that instance and reports changes through
    /// [`DagsterBridge::subscribe`].
    async fn run_statuses(
        &self,
        instance_ref: &Value,
        run_ids: &[String],
    ) -> Result<HashMap<String, Option<RunStatus>>, BridgeError>;

    /// What the event log says about the request's step attempt.
    async fn step_state(&self, step: &StepRequest) -> Result<StepState, BridgeError>;

    /// [`DagsterBridge::step_state`] of several attempts (the messages of one receive) in one
    /// round trip: one answer per step, in order, an entry's error its own; `Err` when the
    /// request as a whole failed. By default, asked one step at a time.
    async fn step_states(
        &self,
        steps: &[StepRequest],
    ) -> Result<Vec<Result<StepState, BridgeError>>, BridgeError> {
        let mut states = Vec::with_capacity(steps.len());
        for step in steps {
            states.push(self.step_state(step).await);
        }
        Ok(states)
    }

    /// Writes the verdict engine event that the executor's health check turns into a
    /// failure or a retry. Idempotent per task id. Takes the attempt alone: a message that
    /// failed validation may still name it ([`crate::envelope::Identity`]).
    async fn report_verdict(
        &self,
        attempt: &AttemptId,
        verdict: &Verdict,
    ) -> Result<VerdictAck, BridgeError>;

    /// Writes an informational engine event for the step; `links` become url metadata.
    async fn report_event(
        &self,
        step: &StepRequest,
        message: &str,
        metadata: &BTreeMap<String, String>,
        links: &[Link],
    ) -> Result<(), BridgeError>;

    /// Whether Dagster answers at all (starting the sidecar if it is not running). With an
    /// instance, also a small read of that instance's storage: its latest run and, with
    /// `run_id`, that run's latest event. Tells a Dagster outage from an error of one request.
    async fn probe(
        &self,
        instance_ref: Option<&Value>,
        run_id: Option<&str>,
    ) -> Result<(), BridgeError>;

    /// Starts the sidecar again if it was killed or died and nothing asked since, so that an
    /// idle controller does not stay unready.
    async fn revive(&self) {}

    /// Claims the attempt durably, or tells who holds it.
    async fn claim_attempt(
        &self,
        step: &StepRequest,
        bid: &ClaimBid<'_>,
    ) -> Result<ClaimAnswer, BridgeError>;

    /// Renews claims of one instance; `false` where the claim is no longer held.
    async fn renew_claims(
        &self,
        instance_ref: &Value,
        claims: &[HeldClaim],
    ) -> Result<Vec<bool>, BridgeError>;

    /// Lets go of a claim: removed, or kept as the record of the verdict `ended`.
    async fn release_claim(
        &self,
        step: &StepRequest,
        token: &str,
        ended: Option<&str>,
    ) -> Result<bool, BridgeError>;

    /// Notices about watched runs, as they happen.
    fn subscribe(&self) -> broadcast::Receiver<BridgePush>;
}

/// The bridge's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BridgeArgs {
    /// Deadline of one Dagster bridge request, in seconds.
    #[arg(long, env = "DAGSTER_TASKIQ_BRIDGE_TIMEOUT", default_value = "30", value_parser = parse_seconds)]
    pub bridge_timeout: Duration,

    /// Most Dagster bridge requests waiting for an answer at once; more fail at once as
    /// transient (the caller waits and asks again) instead of queueing without bound.
    #[arg(long, env = "DAGSTER_TASKIQ_BRIDGE_QUEUE_LIMIT", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub bridge_queue_limit: u32,

    /// Python module the bridge sidecar runs (`<python> -m <module>`). Tests run a bridge
    /// with injected faults this way.
    #[arg(long, default_value = sidecar::BRIDGE_MODULE, hide = true)]
    pub bridge_module: String,
}

impl BridgeArgs {
    /// How to start the sidecar with `python` in the step environment.
    pub fn sidecar_config(
        &self,
        python: &std::path::Path,
        environment: &StepEnvironment,
    ) -> SidecarConfig {
        SidecarConfig::python(
            python,
            &self.bridge_module,
            self.bridge_timeout,
            self.bridge_queue_limit as usize,
            environment,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_run_status_is_kept_and_stops_nothing() {
        let statuses: HashMap<String, Option<RunStatus>> = serde_json::from_str(
            r#"{"a": "SUSPENDED", "b": "CANCELING", "c": null, "d": "SOMETHING_LATER"}"#,
        )
        .expect("a batch with unknown statuses still parses");
        assert_eq!(statuses["a"], Some(RunStatus::Other("SUSPENDED".into())));
        assert_eq!(statuses["b"], Some(RunStatus::Canceling));
        assert_eq!(statuses["c"], None);
        let suspended = statuses["a"].clone().unwrap();
        assert!(!suspended.stops_new_steps());
        assert_eq!(suspended.name(), "SUSPENDED");
        assert!(statuses["b"].clone().unwrap().stops_new_steps());
        for known in [
            "QUEUED",
            "NOT_STARTED",
            "MANAGED",
            "STARTING",
            "STARTED",
            "SUCCESS",
        ] {
            let status = RunStatus::from_name(known);
            assert!(!matches!(status, RunStatus::Other(_)), "{known}");
            assert_eq!(status.name(), known);
        }
        let json = serde_json::to_string(&RunStatus::Other("SUSPENDED".into())).unwrap();
        assert_eq!(json, r#""SUSPENDED""#);
    }

    #[test]
    fn a_ref_is_foreign_when_a_storage_or_the_instance_class_differs_not_a_path() {
        let sqlite = |dir: &str| {
            serde_json::json!({
                "module_name": "dagster._core.storage.runs",
                "class_name": "SqliteRunStorage",
                "config_yaml": format!("base_dir: {dir}\n"),
            })
        };
        let pinned = BridgeInfo {
            storages: BTreeMap::from([
                (
                    "run_storage_data".to_string(),
                    "dagster._core.storage.runs.SqliteRunStorage".to_string(),
                ),
                ("custom_instance_class_data".to_string(), String::new()),
            ]),
            ..BridgeInfo::default()
        };
        let ours_elsewhere = serde_json::json!({"run_storage_data": sqlite("/other/host")});
        assert!(
            !pinned.is_foreign(&ours_elsewhere),
            "paths differ between hosts"
        );
        assert!(!pinned.is_foreign(&Value::Null));

        let mut custom_class = ours_elsewhere.clone();
        custom_class["custom_instance_class_data"] =
            serde_json::json!({"module_name": "evil", "class_name": "Instance", "config_yaml": ""});
        assert!(pinned.is_foreign(&custom_class));

        let mut other_storage = ours_elsewhere;
        other_storage["run_storage_data"]["class_name"] = "PostgresRunStorage".into();
        assert!(pinned.is_foreign(&other_storage));
    }
}
