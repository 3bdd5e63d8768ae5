//! The bridge sidecar: one Python process in its own process group, spoken to in JSON lines.
//!
//! Requests are pipelined: each carries an id and its answer may come in any order. Between
//! answers the sidecar pushes notices about the runs it watches (a run canceling, a
//! `terminate_step` request), so those do not wait for the next run-status poll.
//!
//! A request that outlives its deadline means the sidecar is wedged: its whole process group
//! is killed, every request still waiting on it fails as unavailable, and the next request
//! starts a new sidecar. At most `queue_limit` requests wait for an answer at once; more fail
//! at once as [`BridgeError::Busy`].

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    BridgeError, BridgeInfo, BridgePush, ClaimAnswer, ClaimBid, DagsterBridge, HeldClaim,
    RunStatus, StepState, Verdict, VerdictAck, PUSH_BUFFER,
};
use crate::bounded_lines::{BoundedLines, Line as OutputLine, MAX_LINE_BYTES};
use crate::envelope::{AttemptId, StepRequest};
use crate::metrics::Metrics;
use crate::step_env::StepEnvironment;

/// The product's bridge module, run as `<python> -m dagster_taskiq_controller.bridge`.
pub(crate) const BRIDGE_MODULE: &str = "dagster_taskiq_controller.bridge";

/// The one controller variable the bridge reads (bridge.py).
const BRIDGE_LOG_LEVEL_ENV: &str = "DAGSTER_TASKIQ_BRIDGE_LOG_LEVEL";
/// Bound of one line on the sidecar's stdout, its reply channel. The largest replies are
/// `run_status` for every watched run (about 60 bytes a run) and errors that quote Dagster's
/// exception; a reply over this fails its request ([`REPLY_TOO_LARGE`]) instead of being
/// buffered whole.
pub(crate) const MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;
/// The error kind of a request whose reply was over [`MAX_REPLY_BYTES`].
pub(crate) const REPLY_TOO_LARGE: &str = "reply_too_large";

/// How long a new sidecar may take to answer its first request.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);

/// How to start the sidecar.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// The program, e.g. the Python interpreter.
    pub program: PathBuf,
    /// Its arguments, e.g. `["-m", "dagster_taskiq_controller.bridge"]`.
    pub args: Vec<String>,
    /// Per-request deadline; a request past it gets the sidecar killed.
    pub request_timeout: Duration,
    /// Deadline of the requests to a sidecar that has not answered yet: importing Dagster
    /// can take long on a busy host.
    pub startup_timeout: Duration,
    /// Most requests waiting for an answer at once.
    pub queue_limit: usize,
    /// Its whole environment. A same-uid step can read the bridge's, so it holds no more
    /// than a step's ([`crate::step_env`]).
    pub environment: StepEnvironment,
}

impl SidecarConfig {
    /// `<python> -m <module>` in the step environment, plus the bridge's log level.
    pub fn python(
        python: &Path,
        module: &str,
        request_timeout: Duration,
        queue_limit: usize,
        environment: &StepEnvironment,
    ) -> Self {
        Self {
            program: python.to_owned(),
            args: vec!["-m".into(), module.into()],
            request_timeout,
            startup_timeout: STARTUP_TIMEOUT,
            queue_limit,
            environment: environment.with_inherited(BRIDGE_LOG_LEVEL_ENV),
        }
    }
}

/// Where the sidecar process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SidecarState {
    /// Nothing asked yet.
    NotStarted,
    /// Started; it has not answered yet (Python is importing Dagster).
    Starting,
    /// It has answered since it started.
    Running,
    /// Killed or exited; the next request starts a new one.
    Down,
    /// Stopped on purpose (shutdown).
    Stopped,
}

/// Why a sidecar was started, or why the last one ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartCause {
    /// The first start.
    Start,
    /// The sidecar exited by itself (crashed, was killed by someone else).
    Exited,
    /// A request passed the deadline and the controller killed the sidecar.
    Timeout,
}

impl RestartCause {
    /// The `cause` label of `bridge_restarts_total`.
    pub fn name(self) -> &'static str {
        match self {
            RestartCause::Start => "start",
            RestartCause::Exited => "exited",
            RestartCause::Timeout => "timeout",
        }
    }
}

/// The sidecar as `/readyz` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SidecarStatus {
    pub state: SidecarState,
    /// Starting or running: why this sidecar was started; down: why the last one ended.
    pub cause: RestartCause,
    pub pid: Option<u32>,
}

impl SidecarStatus {
    /// Whether requests are being answered now.
    pub fn is_running(&self) -> bool {
        self.state == SidecarState::Running
    }
}

/// The status, written by the tasks of one sidecar generation: a late write from the tasks
/// of a sidecar that was already replaced is ignored.
#[derive(Clone)]
struct StatusCell(Arc<Mutex<(u64, SidecarStatus)>>);

impl StatusCell {
    fn new() -> Self {
        Self(Arc::new(Mutex::new((
            0,
            SidecarStatus {
                state: SidecarState::NotStarted,
                cause: RestartCause::Start,
                pid: None,
            },
        ))))
    }

    fn get(&self) -> SidecarStatus {
        self.0.lock().1
    }

    /// A new sidecar generation starts.
    fn start(&self, generation: u64, cause: RestartCause, pid: u32) {
        *self.0.lock() = (
            generation,
            SidecarStatus {
                state: SidecarState::Starting,
                cause,
                pid: Some(pid),
            },
        );
    }

    /// Changes the status if `generation` is still the current sidecar.
    fn update(&self, generation: u64, change: impl FnOnce(&mut SidecarStatus)) {
        let mut current = self.0.lock();
        if current.0 == generation {
            change(&mut current.1);
        }
    }
}

/// [`DagsterBridge`] backed by the Python sidecar.
pub struct SidecarBridge {
    config: SidecarConfig,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    generations: AtomicU64,
    connection: tokio::sync::Mutex<Option<Connection>>,
    pushes: broadcast::Sender<BridgePush>,
    status: StatusCell,
    /// The bridge answered `step_states` as an unknown method: ask one step at a time.
    one_by_one: AtomicBool,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

struct Connection {
    generation: u64,
    pid: u32,
    requests: mpsc::Sender<String>,
    pending: Pending,
    /// Cancelled when the sidecar has exited.
    exited: CancellationToken,
    /// Cancel to stop the sidecar.
    stop: CancellationToken,
    /// Killed because a request passed its deadline; it may not have exited yet.
    wedged: Arc<AtomicBool>,
    /// It has answered a request.
    answered: Arc<AtomicBool>,
}

impl Connection {
    fn usable(&self) -> bool {
        !self.is_wedged() && !self.exited.is_cancelled()
    }

    fn is_wedged(&self) -> bool {
        self.wedged.load(Ordering::Relaxed)
    }
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
    #[serde(flatten)]
    answer: Answer,
}

/// An answer: to a request, or to one entry of a `step_states` batch.
#[derive(Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    result: Value,
    #[serde(default)]
    error: Option<ErrorBody>,
}

impl Answer {
    fn into_result(self) -> Result<Value, BridgeError> {
        if self.ok {
            Ok(self.result)
        } else {
            Err(error_of(self.error))
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    kind: String,
    message: String,
}

/// An error answer, to the request or to one entry of a batch.
fn error_of(error: Option<ErrorBody>) -> BridgeError {
    let error = error.unwrap_or(ErrorBody {
        kind: "internal".into(),
        message: "error without details".into(),
    });
    match error.kind.as_str() {
        "internal" => BridgeError::Internal(error.message),
        _ => BridgeError::Rejected {
            kind: error.kind,
            message: error.message,
        },
    }
}

/// The result of `step_states`.
#[derive(Deserialize)]
struct States {
    states: Vec<Answer>,
}

/// The answers of a `step_states` request of `asked` steps.
fn entries_of(
    result: Value,
    asked: usize,
) -> Result<Vec<Result<StepState, BridgeError>>, BridgeError> {
    let states = parse::<States>("step_states", result)?.states;
    if states.len() != asked {
        return Err(BridgeError::Internal(format!(
            "step_states answered {} entries for {asked} steps",
            states.len()
        )));
    }
    Ok(states
        .into_iter()
        .map(|entry| entry.into_result().and_then(|v| parse("step_states", v)))
        .collect())
}

/// Whether the bridge refused a request for not knowing its method (an older bridge: its
/// protocol has no such method).
fn is_unknown_method(error: &BridgeError) -> bool {
    matches!(error, BridgeError::Rejected { kind, message }
        if kind == "bad_request" && message.starts_with("unknown method"))
}

/// The result of `run_status`.
#[derive(Deserialize)]
struct Statuses {
    statuses: HashMap<String, Option<RunStatus>>,
}

/// SIGKILL to the sidecar's process group (it leads its own group): nothing it started
/// survives it.
fn kill_group(pid: u32) {
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    if let Err(e) = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    ) {
        tracing::debug!(pid, %e, "killing the Dagster bridge's process group failed");
    }
}

impl SidecarBridge {
    pub fn new(config: SidecarConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            config,
            metrics,
            next_id: AtomicU64::new(1),
            generations: AtomicU64::new(0),
            connection: tokio::sync::Mutex::new(None),
            pushes: broadcast::channel(PUSH_BUFFER).0,
            status: StatusCell::new(),
            one_by_one: AtomicBool::new(false),
        }
    }

    /// Starts the sidecar now, opens the controller's Dagster instance and describes it.
    /// Importing Dagster can take long on a busy host: this waits up to the startup timeout.
    pub async fn ping(&self) -> Result<BridgeInfo, BridgeError> {
        let result = self.call("ping", json!({"describe": true})).await?;
        parse("ping", result)
    }

    /// The sidecar's state, for `/readyz`.
    pub fn status(&self) -> SidecarStatus {
        self.status.get()
    }

    /// Stops the sidecar (closing its stdin first so it exits by itself).
    pub async fn close(&self) {
        if let Some(connection) = self.connection.lock().await.take() {
            self.status.update(connection.generation, |s| {
                s.state = SidecarState::Stopped;
            });
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
        let (pending, generation, deadline) = {
            let mut guard = self.connection.lock().await;
            if !guard.as_ref().is_some_and(Connection::usable) {
                let cause = match guard.as_ref() {
                    None => RestartCause::Start,
                    Some(old) if old.is_wedged() => RestartCause::Timeout,
                    Some(_) => RestartCause::Exited,
                };
                let connection = self.spawn(cause)?;
                self.metrics
                    .bridge_restarts
                    .get_or_create(&[("cause", cause.name())])
                    .inc();
                *guard = Some(connection);
            }
            let connection = guard
                .as_ref()
                .expect("a usable connection was just ensured");
            {
                let mut pending = connection.pending.lock();
                if pending.len() >= self.config.queue_limit {
                    return Err(BridgeError::Busy(pending.len()));
                }
                pending.insert(id, tx);
            }
            if let Err(e) = connection.requests.try_send(line) {
                connection.pending.lock().remove(&id);
                return Err(match e {
                    mpsc::error::TrySendError::Full(_) => {
                        BridgeError::Busy(self.config.queue_limit)
                    }
                    mpsc::error::TrySendError::Closed(_) => {
                        BridgeError::Unavailable("sidecar stdin closed".into())
                    }
                });
            }
            // A new sidecar is still importing Dagster: that is not a hang.
            let deadline = if connection.answered.load(Ordering::Relaxed) {
                deadline
            } else {
                deadline.max(self.config.startup_timeout)
            };
            (connection.pending.clone(), connection.generation, deadline)
        };
        match tokio::time::timeout(deadline, rx).await {
            Err(_) => {
                pending.lock().remove(&id);
                self.kill_wedged(generation, method, deadline).await;
                Err(BridgeError::Timeout(deadline))
            }
            Ok(Err(_)) => Err(BridgeError::Unavailable(
                "sidecar exited before answering".into(),
            )),
            Ok(Ok(response)) => response.answer.into_result(),
        }
    }

    /// `step_state` of each step, one request each: for a bridge without `step_states`.
    async fn step_states_one_by_one(
        &self,
        steps: &[StepRequest],
    ) -> Vec<Result<StepState, BridgeError>> {
        let mut states = Vec::with_capacity(steps.len());
        for step in steps {
            states.push(self.step_state(step).await);
        }
        states
    }

    /// A request to sidecar `generation` passed its deadline: the sidecar is wedged (a
    /// storage call that never returns, a deadlock), and every request behind it would wait
    /// as long. Kill its process group; the requests still waiting fail when it exits, and
    /// the next request starts a new sidecar.
    async fn kill_wedged(&self, generation: u64, method: &'static str, deadline: Duration) {
        let mut guard = self.connection.lock().await;
        let Some(connection) = guard.as_mut() else {
            return;
        };
        if connection.generation != generation || !connection.usable() {
            return; // already replaced or condemned
        }
        connection.wedged.store(true, Ordering::Relaxed);
        tracing::warn!(
            pid = connection.pid,
            method,
            ?deadline,
            waiting = connection.pending.lock().len(),
            "Dagster bridge did not answer in time: killing it; the next request starts a new one"
        );
        self.status.update(generation, |s| {
            s.state = SidecarState::Down;
            s.cause = RestartCause::Timeout;
        });
        kill_group(connection.pid);
    }

    fn spawn(&self, cause: RestartCause) -> Result<Connection, BridgeError> {
        let mut command = Command::new(&self.config.program);
        self.config.environment.apply(&mut command);
        let mut child = command
            .args(&self.config.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that killing it reaches whatever it started.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                BridgeError::Unavailable(format!(
                    "cannot start {} {}: {e}",
                    self.config.program.display(),
                    self.config.args.join(" ")
                ))
            })?;
        let pid = child.id().unwrap_or_default();
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        self.status.start(generation, cause, pid);
        tracing::info!(pid, cause = cause.name(), "Dagster bridge started");
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (requests, mut request_rx) = mpsc::channel::<String>(self.config.queue_limit);
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
        let reader_status = self.status.clone();
        let answered = Arc::new(AtomicBool::new(false));
        let reader_answered = answered.clone();
        tokio::spawn(async move {
            let mut lines = BoundedLines::new(stdout, MAX_REPLY_BYTES);
            while let Ok(Some(line)) = lines.next_line().await {
                if line.truncated > 0 {
                    fail_over_long_reply(line, &reader_pending);
                    continue;
                }
                let line = line.text;
                match serde_json::from_str::<Line>(&line) {
                    Ok(Line::Response(response)) => {
                        reader_answered.store(true, Ordering::Relaxed);
                        reader_status.update(generation, |s| {
                            if s.state == SidecarState::Starting {
                                s.state = SidecarState::Running;
                            }
                        });
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
                    Err(e) => {
                        let line = OutputLine {
                            text: line,
                            truncated: 0,
                        }
                        .cut_to(MAX_LINE_BYTES)
                        .marked();
                        tracing::warn!(%e, line, "unparseable line from Dagster bridge")
                    }
                }
            }
        });
        tokio::spawn(async move {
            let mut lines = BoundedLines::new(stderr, MAX_LINE_BYTES);
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(target: "dagster_bridge", "{}", line.marked());
            }
        });
        let waiter_exited = exited.clone();
        let waiter_stop = stop.clone();
        let waiter_pending = pending.clone();
        let waiter_status = self.status.clone();
        let wedged = Arc::new(AtomicBool::new(false));
        let waiter_wedged = wedged.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                _ = waiter_stop.cancelled() => {
                    // Give it a moment to exit on stdin EOF, then make sure.
                    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                        Ok(status) => status,
                        Err(_) => {
                            kill_group(pid);
                            child.wait().await
                        }
                    }
                }
            };
            if waiter_stop.is_cancelled() {
                tracing::info!(pid, ?status, "Dagster bridge stopped");
            } else if waiter_wedged.load(Ordering::Relaxed) {
                tracing::info!(pid, ?status, "hung Dagster bridge killed");
            } else {
                tracing::warn!(
                    pid,
                    ?status,
                    "Dagster bridge exited; restarting on next request"
                );
            }
            waiter_status.update(generation, |s| {
                if matches!(s.state, SidecarState::Starting | SidecarState::Running) {
                    s.state = SidecarState::Down;
                    s.cause = RestartCause::Exited;
                }
            });
            // Dropping the senders wakes every waiter with an error.
            waiter_pending.lock().clear();
            waiter_exited.cancel();
        });
        Ok(Connection {
            generation,
            pid,
            requests,
            pending,
            exited,
            stop,
            wedged,
            answered,
        })
    }
}

/// A reply line over [`MAX_REPLY_BYTES`]: its request (the bridge writes `{"id": N, ...`)
/// fails at once with [`REPLY_TOO_LARGE`] rather than waiting out its deadline.
fn fail_over_long_reply(line: OutputLine, pending: &Pending) {
    let size = line.text.len() + line.truncated;
    let id = reply_id(&line.text);
    tracing::error!(
        size,
        limit = MAX_REPLY_BYTES,
        id,
        "Dagster bridge reply over the limit: dropped"
    );
    let Some(waiter) = id.and_then(|id| pending.lock().remove(&id)) else {
        return;
    };
    let _ = waiter.send(Response {
        id: id.unwrap_or_default(),
        answer: Answer {
            ok: false,
            result: Value::Null,
            error: Some(ErrorBody {
                kind: REPLY_TOO_LARGE.into(),
                message: format!(
                "the reply is {size} bytes, over the {MAX_REPLY_BYTES}-byte limit of the bridge's \
                 reply channel"
            ),
            }),
        },
    });
}

/// The request id at the start of a reply line, `{"id": 12, ...`.
fn reply_id(start: &str) -> Option<u64> {
    let rest = start.strip_prefix('{')?.trim_start();
    let rest = rest.strip_prefix("\"id\"")?.trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    rest[..digits].parse().ok()
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

    async fn step_states(
        &self,
        steps: &[StepRequest],
    ) -> Result<Vec<Result<StepState, BridgeError>>, BridgeError> {
        if steps.len() < 2 || self.one_by_one.load(Ordering::Relaxed) {
            return Ok(self.step_states_one_by_one(steps).await);
        }
        let entries: Vec<Value> = steps
            .iter()
            .map(|s| Value::Object(step_params(s)))
            .collect();
        let params = json!({"instance_ref": steps[0].instance_ref, "steps": entries});
        match self.call("step_states", params).await {
            Ok(result) => entries_of(result, steps.len()),
            Err(e) if is_unknown_method(&e) => {
                tracing::warn!(
                    "the Dagster bridge does not know step_states (bridge protocol 1, an older \
                     dagster-taskiq-controller package): asking one step at a time"
                );
                self.one_by_one.store(true, Ordering::Relaxed);
                Ok(self.step_states_one_by_one(steps).await)
            }
            Err(e) => Err(e),
        }
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
        params.insert("links".into(), link_params(&verdict.links));
        let result = self.call("report_verdict", Value::Object(params)).await?;
        parse("report_verdict", result)
    }

    async fn report_event(
        &self,
        step: &StepRequest,
        message: &str,
        metadata: &std::collections::BTreeMap<String, String>,
        links: &[crate::links::Link],
    ) -> Result<(), BridgeError> {
        let mut params = step_params(step);
        params.insert("message".into(), message.into());
        params.insert("metadata".into(), json!(metadata));
        params.insert("links".into(), link_params(links));
        self.call("report_event", Value::Object(params)).await?;
        Ok(())
    }

    async fn claim_attempt(
        &self,
        step: &StepRequest,
        bid: &ClaimBid<'_>,
    ) -> Result<ClaimAnswer, BridgeError> {
        let mut params = step_params(step);
        params.insert("holder".into(), bid.holder.into());
        params.insert("token".into(), bid.token.into());
        params.insert("message_id".into(), bid.message_id.into());
        params.insert("replace_token".into(), bid.replace_token.into());
        let result = self.call("claim_attempt", Value::Object(params)).await?;
        parse("claim_attempt", result)
    }

    async fn renew_claims(
        &self,
        instance_ref: &Value,
        claims: &[HeldClaim],
    ) -> Result<Vec<bool>, BridgeError> {
        #[derive(Deserialize)]
        struct Renewed {
            alive: Vec<bool>,
        }
        let result = self
            .call(
                "renew_claims",
                json!({"instance_ref": instance_ref, "claims": claims}),
            )
            .await?;
        Ok(parse::<Renewed>("renew_claims", result)?.alive)
    }

    async fn release_claim(
        &self,
        step: &StepRequest,
        token: &str,
        ended: Option<&str>,
    ) -> Result<bool, BridgeError> {
        #[derive(Deserialize)]
        struct Released {
            released: bool,
        }
        let mut params = step_params(step);
        params.insert("token".into(), token.into());
        params.insert("ended".into(), ended.into());
        let result = self.call("release_claim", Value::Object(params)).await?;
        Ok(parse::<Released>("release_claim", result)?.released)
    }

    async fn probe(
        &self,
        instance_ref: Option<&Value>,
        run_id: Option<&str>,
    ) -> Result<(), BridgeError> {
        let mut params = serde_json::Map::new();
        if let Some(instance_ref) = instance_ref {
            params.insert("instance_ref".into(), instance_ref.clone());
        }
        if let Some(run_id) = run_id {
            params.insert("run_id".into(), run_id.into());
        }
        self.call("ping", Value::Object(params)).await.map(|_| ())
    }

    async fn revive(&self) {
        let condemned = {
            let guard = self.connection.lock().await;
            // Never started, or closed: nothing to revive.
            guard.as_ref().is_some_and(|c| !c.usable())
        };
        if condemned {
            if let Err(e) = self.probe(None, None).await {
                tracing::debug!(%e, "restarting the Dagster bridge failed; trying again later");
            }
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<BridgePush> {
        self.pushes.subscribe()
    }
}

/// Links as the bridge takes them: `{kind: url}`, written as url metadata.
fn link_params(links: &[crate::links::Link]) -> Value {
    Value::Object(
        links
            .iter()
            .map(|l| (l.kind.to_owned(), Value::String(l.url.clone())))
            .collect(),
    )
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
                answer: Answer { ok: true, .. },
            })
        ));
        // An unknown push kind is neither: logged and skipped by the reader.
        assert!(serde_json::from_str::<Line>(r#"{"push": "other"}"#).is_err());
    }

    #[test]
    fn a_step_states_answer_gives_each_entry_its_own_result() {
        let state = serde_json::json!({
            "run_status": "STARTED", "terminal_events": 1, "attempt_finished": true,
            "last_terminal": "STEP_SUCCESS", "stored_step": null,
        });
        let result = serde_json::json!({"states": [
            {"ok": true, "result": state},
            {"ok": false, "error": {"kind": "bad_request", "message": "param attempt must be >= 0"}},
            {"ok": false, "error": {"kind": "internal", "message": "OperationalError"}},
        ]});
        let entries = entries_of(result.clone(), 3).unwrap();
        assert!(entries[0].as_ref().unwrap().attempt_finished);
        assert!(
            matches!(&entries[1], Err(BridgeError::Rejected { kind, .. }) if kind == "bad_request")
        );
        assert!(matches!(&entries[2], Err(BridgeError::Internal(_))));
        // An answer that does not match the request is an error of the whole request.
        assert!(matches!(
            entries_of(result, 2),
            Err(BridgeError::Internal(_))
        ));
        let unknown = BridgeError::Rejected {
            kind: "bad_request".into(),
            message: "unknown method 'step_states'".into(),
        };
        assert!(is_unknown_method(&unknown));
        assert!(!is_unknown_method(&BridgeError::Rejected {
            kind: "bad_request".into(),
            message: "missing param steps".into(),
        }));
    }

    #[test]
    fn a_run_status_batch_with_an_unknown_status_still_parses() {
        let result =
            serde_json::json!({"statuses": {"r1": "SUSPENDED", "r2": "CANCELED", "r3": null}});
        let statuses = parse::<Statuses>("run_status", result)
            .expect("one unknown status must not fail the whole poll")
            .statuses;
        assert_eq!(statuses["r1"], Some(RunStatus::Other("SUSPENDED".into())));
        assert_eq!(statuses["r2"], Some(RunStatus::Canceled));
        assert_eq!(statuses["r3"], None);
    }
}
