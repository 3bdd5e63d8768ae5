//! The Dagster boundary: run status, step outcomes and verdicts, read and written with
//! Dagster's own APIs by a long-lived Python sidecar (`python -m
//! dagster_taskiq_controller.bridge`) that speaks JSON lines (docs/protocol.md, section 2).
//!
//! The sidecar is started lazily, restarted on the next request if it dies, and its requests
//! are pipelined: each carries an id and its answer may come in any order. Between answers it
//! pushes notices about the runs it watches (a run canceling, a `terminate_step` request), so
//! those do not wait for the next run-status poll.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::envelope::{AttemptId, StepRequest};
use crate::metrics::Metrics;

use crate::flags::parse_seconds;

/// Dagster's run statuses (`DagsterRunStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
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
}

impl RunStatus {
    /// True when no new step of the run should start.
    pub(crate) fn stops_new_steps(self) -> bool {
        matches!(
            self,
            RunStatus::Success | RunStatus::Failure | RunStatus::Canceling | RunStatus::Canceled
        )
    }

    /// Dagster's own spelling, e.g. `CANCELING`.
    pub(crate) fn name(self) -> &'static str {
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
        }
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
}

impl Verdict {
    /// The verdict of an attempt the controller did not run at all.
    pub(crate) fn not_run(verdict: String) -> Self {
        Self {
            verdict,
            exit: "not run".into(),
            stderr_tail: String::new(),
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
}

impl BridgeError {
    /// Whether trying again later may succeed.
    pub(crate) fn is_transient(&self) -> bool {
        !matches!(self, BridgeError::Rejected { .. })
    }
}

impl crate::retry::Transient for BridgeError {
    fn is_transient(&self) -> bool {
        BridgeError::is_transient(self)
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

    /// Writes the verdict engine event that the executor's health check turns into a
    /// failure or a retry. Idempotent per task id. Takes the attempt alone: a message that
    /// failed validation may still name it ([`crate::envelope::Identity`]).
    async fn report_verdict(
        &self,
        attempt: &AttemptId,
        verdict: &Verdict,
    ) -> Result<VerdictAck, BridgeError>;

    /// Writes an informational engine event for the step.
    async fn report_event(
        &self,
        step: &StepRequest,
        message: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), BridgeError>;

    /// Notices about watched runs, as they happen.
    fn subscribe(&self) -> broadcast::Receiver<BridgePush>;
}

/// How to start the sidecar.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub python: PathBuf,
    /// Per-request deadline.
    pub request_timeout: Duration,
}

/// [`DagsterBridge`] backed by the Python sidecar.
pub struct SidecarBridge {
    config: SidecarConfig,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    connection: tokio::sync::Mutex<Option<Connection>>,
    pushes: broadcast::Sender<BridgePush>,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

struct Connection {
    requests: mpsc::UnboundedSender<String>,
    pending: Pending,
    /// Cancelled when the sidecar has exited.
    exited: CancellationToken,
    /// Cancel to stop the sidecar.
    stop: CancellationToken,
}

/// One line from the sidecar: a push, or the answer to a request.
#[derive(Deserialize)]
#[serde(untagged)]
enum Line {
    Push(BridgePush),
    Response(Response),
}

#[derive(Deserialize)]
struct Response {
    id: u64,
    ok: bool,
    #[serde(default)]
    result: Value,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct ErrorBody {
    kind: String,
    message: String,
}

impl SidecarBridge {
    pub fn new(config: SidecarConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            config,
            metrics,
            next_id: AtomicU64::new(1),
            connection: tokio::sync::Mutex::new(None),
            pushes: broadcast::channel(PUSH_BUFFER).0,
        }
    }

    /// Starts the sidecar now and checks that it imports Dagster; returns Dagster's version.
    /// Importing Dagster can take long on a busy host, so this waits up to `startup`.
    pub async fn ping(&self, startup: Duration) -> Result<String, BridgeError> {
        let result = self.call_within("ping", json!({}), startup).await?;
        Ok(result
            .get("dagster_version")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }

    /// True while a sidecar process is running.
    pub(crate) async fn is_alive(&self) -> bool {
        let guard = self.connection.lock().await;
        guard.as_ref().is_some_and(|c| !c.exited.is_cancelled())
    }

    /// Stops the sidecar (closing its stdin first so it exits by itself).
    pub async fn close(&self) {
        if let Some(connection) = self.connection.lock().await.take() {
            drop(connection.requests);
            connection.stop.cancel();
            connection.exited.cancelled().await;
        }
    }

    async fn call(&self, method: &'static str, params: Value) -> Result<Value, BridgeError> {
        self.call_within(method, params, self.config.request_timeout)
            .await
    }

    async fn call_within(
        &self,
        method: &'static str,
        params: Value,
        deadline: Duration,
    ) -> Result<Value, BridgeError> {
        self.metrics
            .bridge_requests
            .get_or_create(&[("method", method)])
            .inc();
        let started = Instant::now();
        let result = self.call_inner(method, params, deadline).await;
        self.metrics
            .bridge_latency_seconds
            .get_or_create(&[("method", method)])
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics
                .bridge_errors
                .get_or_create(&[("method", method)])
                .inc();
        }
        result
    }

    async fn call_inner(
        &self,
        method: &'static str,
        params: Value,
        deadline: Duration,
    ) -> Result<Value, BridgeError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let line = json!({"id": id, "method": method, "params": params}).to_string();
        let (tx, rx) = oneshot::channel();
        let pending = {
            let mut guard = self.connection.lock().await;
            let connection = match guard.as_ref() {
                Some(c) if !c.exited.is_cancelled() => c,
                _ => {
                    self.metrics.bridge_restarts.inc();
                    guard.insert(self.spawn()?)
                }
            };
            connection.pending.lock().insert(id, tx);
            if connection.requests.send(line).is_err() {
                connection.pending.lock().remove(&id);
                return Err(BridgeError::Unavailable("sidecar stdin closed".into()));
            }
            connection.pending.clone()
        };
        match tokio::time::timeout(deadline, rx).await {
            Err(_) => {
                pending.lock().remove(&id);
                Err(BridgeError::Timeout(deadline))
            }
            Ok(Err(_)) => Err(BridgeError::Unavailable(
                "sidecar exited before answering".into(),
            )),
            Ok(Ok(response)) if response.ok => Ok(response.result),
            Ok(Ok(response)) => {
                let error = response.error.unwrap_or(ErrorBody {
                    kind: "internal".into(),
                    message: "error without details".into(),
                });
                Err(match error.kind.as_str() {
                    "internal" => BridgeError::Internal(error.message),
                    _ => BridgeError::Rejected {
                        kind: error.kind,
                        message: error.message,
                    },
                })
            }
        }
    }

    fn spawn(&self) -> Result<Connection, BridgeError> {
        let mut child = Command::new(&self.config.python)
            .args(["-m", "dagster_taskiq_controller.bridge"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                BridgeError::Unavailable(format!(
                    "cannot start {} -m dagster_taskiq_controller.bridge: {e}",
                    self.config.python.display()
                ))
            })?;
        let pid = child.id().unwrap_or_default();
        tracing::info!(pid, "Dagster bridge started");
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (requests, mut request_rx) = mpsc::unbounded_channel::<String>();
        let pending: Pending = Arc::default();
        let exited = CancellationToken::new();
        let stop = CancellationToken::new();

        tokio::spawn(async move {
            while let Some(mut line) = request_rx.recv().await {
                line.push('\n');
                if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
                    break;
                }
            }
            // Dropping stdin tells the sidecar to exit.
        });
        let reader_pending = pending.clone();
        let pushes = self.pushes.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Line>(&line) {
                    Ok(Line::Response(response)) => {
                        let waiter = reader_pending.lock().remove(&response.id);
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(response);
                        }
                    }
                    Ok(Line::Push(push)) => {
                        metrics
                            .bridge_pushes
                            .get_or_create(&[("kind", push.kind())])
                            .inc();
                        tracing::debug!(?push, "pushed by the Dagster bridge");
                        // No subscriber (yet) is fine: the poll catches up.
                        let _ = pushes.send(push);
                    }
                    Err(e) => tracing::warn!(%e, line, "unparseable line from Dagster bridge"),
                }
            }
        });
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(target: "dagster_bridge", "{line}");
            }
        });
        let waiter_exited = exited.clone();
        let waiter_stop = stop.clone();
        let waiter_pending = pending.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                _ = waiter_stop.cancelled() => {
                    // Give it a moment to exit on stdin EOF, then make sure.
                    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                        Ok(status) => status,
                        Err(_) => {
                            let _ = child.start_kill();
                            child.wait().await
                        }
                    }
                }
            };
            if waiter_stop.is_cancelled() {
                tracing::info!(pid, ?status, "Dagster bridge stopped");
            } else {
                tracing::warn!(
                    pid,
                    ?status,
                    "Dagster bridge exited; restarting on next request"
                );
            }
            // Dropping the senders wakes every waiter with an error.
            waiter_pending.lock().clear();
            waiter_exited.cancel();
        });
        Ok(Connection {
            requests,
            pending,
            exited,
            stop,
        })
    }
}

fn step_params(step: &StepRequest) -> serde_json::Map<String, Value> {
    attempt_params(&step.id())
}

fn attempt_params(attempt: &AttemptId) -> serde_json::Map<String, Value> {
    let mut params = serde_json::Map::new();
    params.insert("instance_ref".into(), attempt.instance_ref.clone());
    params.insert("run_id".into(), attempt.run_id.clone().into());
    params.insert("step_key".into(), attempt.step_key.clone().into());
    params.insert("attempt".into(), attempt.attempt.into());
    params.insert("task_id".into(), attempt.task_id.clone().into());
    params
}

fn parse<T: serde::de::DeserializeOwned>(method: &str, value: Value) -> Result<T, BridgeError> {
    serde_json::from_value(value)
        .map_err(|e| BridgeError::Internal(format!("unexpected {method} result: {e}")))
}

#[async_trait]
impl DagsterBridge for SidecarBridge {
    async fn run_statuses(
        &self,
        instance_ref: &Value,
        run_ids: &[String],
    ) -> Result<HashMap<String, Option<RunStatus>>, BridgeError> {
        #[derive(Deserialize)]
        struct Statuses {
            statuses: HashMap<String, Option<RunStatus>>,
        }
        let result = self
            .call(
                "run_status",
                json!({"instance_ref": instance_ref, "run_ids": run_ids, "watch": true}),
            )
            .await?;
        Ok(parse::<Statuses>("run_status", result)?.statuses)
    }

    async fn step_state(&self, step: &StepRequest) -> Result<StepState, BridgeError> {
        let result = self
            .call("step_state", Value::Object(step_params(step)))
            .await?;
        parse("step_state", result)
    }

    async fn report_verdict(
        &self,
        attempt: &AttemptId,
        verdict: &Verdict,
    ) -> Result<VerdictAck, BridgeError> {
        let mut params = attempt_params(attempt);
        params.insert("verdict".into(), verdict.verdict.clone().into());
        params.insert("exit".into(), verdict.exit.clone().into());
        params.insert("stderr_tail".into(), verdict.stderr_tail.clone().into());
        let result = self.call("report_verdict", Value::Object(params)).await?;
        parse("report_verdict", result)
    }

    async fn report_event(
        &self,
        step: &StepRequest,
        message: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), BridgeError> {
        let mut params = step_params(step);
        params.insert("message".into(), message.into());
        params.insert("metadata".into(), json!(metadata));
        self.call("report_event", Value::Object(params)).await?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<BridgePush> {
        self.pushes.subscribe()
    }
}

/// The bridge's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BridgeArgs {
    /// Deadline of one Dagster bridge request, in seconds.
    #[arg(long, env = "DAGSTER_TASKIQ_BRIDGE_TIMEOUT", default_value = "30", value_parser = parse_seconds)]
    pub bridge_timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_lines_are_told_apart_by_their_push_key() {
        let push = r#"{"push": "terminate_step", "run_id": "r1", "step_key": "a.b[1]", "attempt": 2, "task_id": "t9"}"#;
        match serde_json::from_str::<Line>(push).unwrap() {
            Line::Push(p) => assert_eq!(
                p,
                BridgePush::TerminateStep {
                    run_id: "r1".into(),
                    step_key: "a.b[1]".into(),
                    attempt: 2,
                    task_id: "t9".into()
                }
            ),
            Line::Response(_) => panic!("a push read as a response"),
        }
        let ended = r#"{"push": "run_ended", "run_id": "r1", "status": "CANCELING"}"#;
        assert!(matches!(
            serde_json::from_str::<Line>(ended).unwrap(),
            Line::Push(BridgePush::RunEnded {
                status: RunStatus::Canceling,
                ..
            })
        ));
        let response = r#"{"id": 4, "ok": true, "result": {"statuses": {}}}"#;
        assert!(matches!(
            serde_json::from_str::<Line>(response).unwrap(),
            Line::Response(Response {
                id: 4,
                ok: true,
                ..
            })
        ));
        // An unknown push kind is neither: logged and skipped by the reader.
        assert!(serde_json::from_str::<Line>(r#"{"push": "other"}"#).is_err());
    }
}
