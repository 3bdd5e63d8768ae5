//! Warm starts: each step is forked from a long-lived Python zygote
//! (`python -m dagster_taskiq_controller.zygote`) that has imported Dagster and the configured
//! preload modules once, instead of paying a fresh interpreter and `import dagster` per step.
//! docs/protocol.md, section 3, is the controller ↔ zygote protocol.
//!
//! The guarantees are those of [`ProcessLauncher`]: the step is its own process leading its own
//! process group (kill, terminate, timeouts and fencing use `killpg`), its stdout/stderr go into
//! the step's tracing span (the controller makes the pipes and passes their write ends with
//! SCM_RIGHTS), it gets the same three variables over the zygote's environment, and it runs
//! Dagster's own `execute_step` command with the same arguments. Liveness:
//! - the zygote gets PR_SET_PDEATHSIG and exits on EOF of its control socket;
//! - every step holds the read end of a control pipe whose write end only the controller holds:
//!   it waits for the controller's go byte before running, and kills its own group on EOF. So a
//!   step dies with the controller however the controller dies, and a child forked by a zygote
//!   that died before reporting it never runs;
//! - a step survives its zygote: its exit status then cannot be read, and a pidfd tells the
//!   controller when it ended ([`StepExit::Unknown`]; the outcome is in Dagster's event log).
//!
//! The zygote is supervised (restarted with backoff when it dies), recycled after
//! `recycle_after` forks or when its memory grows past `max_rss_growth`, and whenever no
//! usable zygote is at hand the step is launched cold, with a warning and
//! `warm_pool_fallbacks_total`.

use std::collections::HashMap;
use std::io::{IoSlice, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::json;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, Interest, Lines};
use tokio::net::unix::{pipe, OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use super::process::StepOutput;
use super::{LaunchError, Launcher, ProcessLauncher, RunningStep, StepExit};
use crate::envelope::{LauncherKind, StepRequest};
use crate::metrics::Metrics;
use crate::results::EventLines;

/// Longest pause between restart attempts of a zygote that fails to start.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(60);
/// How often a step whose zygote died is checked for exit where pidfds are unavailable.
const ORPHAN_POLL: Duration = Duration::from_millis(100);
/// How long a launch waits for a zygote that is (re)starting before it goes cold.
const READY_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct WarmLauncherConfig {
    /// The interpreter that runs the zygote (the same one the cold launcher uses).
    pub python: PathBuf,
    /// Modules (or `.py` files) the zygote imports before forking, e.g. the user's code.
    pub preload: Vec<String>,
    /// Retire a zygote after this many forks; 0 means never.
    pub recycle_after: u64,
    /// Retire a zygote whose resident memory grew by more than this many bytes since it was
    /// ready; 0 means never.
    pub max_rss_growth: u64,
    /// How long a zygote may take to import everything and report ready.
    pub start_timeout: Duration,
    /// How long a zygote may take to answer one spawn request.
    pub spawn_timeout: Duration,
}

/// Why the warm path could not launch a step.
#[derive(Debug, thiserror::Error)]
enum WarmError {
    #[error("cannot start the zygote: {0}")]
    Start(String),
    #[error("zygote did not become ready within {0:?}")]
    StartTimeout(Duration),
    #[error("no zygote ready within {0:?}")]
    NotReady(Duration),
    #[error("zygote died before answering")]
    Died,
    #[error("zygote did not answer a spawn within {0:?}")]
    SpawnTimeout(Duration),
    #[error("cannot talk to the zygote: {0}")]
    Io(#[from] std::io::Error),
    #[error("fork failed in the zygote: {message}")]
    ForkFailed { message: String },
}

impl WarmError {
    /// Metric label of a fallback to the cold launcher.
    fn reason(&self) -> &'static str {
        match self {
            WarmError::Start(_) | WarmError::StartTimeout(_) => "start_failed",
            WarmError::NotReady(_) => "not_ready",
            WarmError::Died => "zygote_died",
            WarmError::SpawnTimeout(_) => "spawn_timeout",
            WarmError::Io(_) => "io",
            WarmError::ForkFailed { .. } => "fork_failed",
        }
    }
}

/// [`super::Launcher`] that forks steps from a warm zygote, falling back to the cold
/// [`ProcessLauncher`].
pub struct WarmLauncher {
    inner: Arc<Inner>,
}

struct Inner {
    config: WarmLauncherConfig,
    cold: ProcessLauncher,
    metrics: Arc<Metrics>,
    /// The zygote new steps fork from; only the supervisor replaces it.
    current: watch::Sender<Option<Arc<Zygote>>>,
    /// Wakes the supervisor: a zygote died, wants recycling, or a launch found none.
    wake: mpsc::UnboundedSender<()>,
}

impl WarmLauncher {
    /// Starts the supervisor, which brings up the first zygote right away. Needs a runtime.
    pub fn new(config: WarmLauncherConfig, cold: ProcessLauncher, metrics: Arc<Metrics>) -> Self {
        let (wake, wakes) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            config,
            cold,
            metrics,
            current: watch::Sender::new(None),
            wake,
        });
        tokio::spawn(supervise(Arc::downgrade(&inner), wakes));
        Self { inner }
    }

    /// Pid of the zygote new steps fork from, once it is ready.
    pub fn zygote_pid(&self) -> Option<u32> {
        self.inner
            .current
            .borrow()
            .as_ref()
            .filter(|z| z.usable())
            .map(|z| z.pid)
    }
}

#[async_trait]
impl Launcher for WarmLauncher {
    fn kind(&self) -> LauncherKind {
        LauncherKind::Process
    }

    async fn launch(&self, step: &StepRequest) -> Result<Box<dyn RunningStep>, LaunchError> {
        match self.inner.launch_warm(step).await {
            Ok(running) => Ok(Box::new(running)),
            Err(e @ WarmError::ForkFailed { .. }) => Err(LaunchError::Transient(e.to_string())),
            Err(e) => {
                tracing::warn!(error = %e, "warm pool unavailable: launching the step cold");
                self.inner
                    .metrics
                    .warm_pool_fallbacks
                    .get_or_create(&[("reason", e.reason())])
                    .inc();
                self.inner.cold.launch(step).await
            }
        }
    }
}

impl Inner {
    async fn launch_warm(&self, step: &StepRequest) -> Result<WarmStep, WarmError> {
        let zygote = self.ready_zygote().await?;
        let (running, forks, rss) = match zygote.spawn(step, self.config.spawn_timeout).await {
            Ok(spawned) => spawned,
            Err(e) => {
                if let WarmError::SpawnTimeout(_) = e {
                    // Hung: kill it; its death brings the replacement.
                    tracing::warn!(pid = zygote.pid, "zygote hung on a spawn: killing it");
                    let _ = kill(Pid::from_raw(zygote.pid as i32), Signal::SIGKILL);
                }
                return Err(e);
            }
        };
        self.metrics.warm_pool_forks.inc();
        self.metrics.warm_pool_zygote_rss_bytes.set(rss as i64);
        let growth = rss.saturating_sub(zygote.base_rss);
        let reason = if self.config.recycle_after > 0 && forks >= self.config.recycle_after {
            Some("forks")
        } else if self.config.max_rss_growth > 0 && growth > self.config.max_rss_growth {
            Some("rss")
        } else {
            None
        };
        if let Some(reason) = reason {
            if !zygote.recycle_wanted.swap(true, Ordering::SeqCst) {
                tracing::info!(
                    pid = zygote.pid,
                    forks,
                    rss_growth = growth,
                    reason,
                    "recycling the zygote once its replacement is ready"
                );
                self.metrics
                    .warm_pool_recycles
                    .get_or_create(&[("reason", reason)])
                    .inc();
                let _ = self.wake.send(());
            }
        }
        Ok(running)
    }

    /// The current zygote; when there is none (starting, restarting, failing), waits a little
    /// for one rather than paying a cold start at once.
    async fn ready_zygote(&self) -> Result<Arc<Zygote>, WarmError> {
        let mut current = self.current.subscribe();
        if let Some(zygote) = current.borrow().as_ref().filter(|z| z.usable()) {
            return Ok(zygote.clone());
        }
        let _ = self.wake.send(());
        let ready = tokio::time::timeout(
            READY_WAIT,
            current.wait_for(|z| z.as_ref().is_some_and(|z| z.usable())),
        )
        .await;
        match ready {
            Ok(Ok(zygote)) => Ok(zygote.clone().expect("waited for Some")),
            _ => Err(WarmError::NotReady(READY_WAIT)),
        }
    }

    /// True when the current zygote cannot serve (none, dead) or should be replaced.
    fn needs_zygote(&self) -> bool {
        match self.current.borrow().as_ref() {
            None => true,
            Some(z) => !z.usable() || z.recycle_wanted.load(Ordering::SeqCst),
        }
    }

    /// Starts a zygote and makes it current; the one it replaces is retired (it exits once
    /// its last child has).
    async fn replace(&self) -> Result<(), WarmError> {
        if self.current.borrow().as_ref().is_none_or(|z| !z.usable()) {
            self.metrics.warm_pool_zygote_pid.set(0);
        }
        let zygote = Zygote::start(&self.config, self.wake.clone(), self.metrics.clone()).await?;
        self.metrics
            .warm_pool_zygote_starts
            .get_or_create(&[("result", "ok")])
            .inc();
        self.metrics.warm_pool_zygote_pid.set(zygote.pid as i64);
        self.metrics
            .warm_pool_zygote_rss_bytes
            .set(zygote.base_rss as i64);
        if let Some(old) = self.current.send_replace(Some(zygote)) {
            old.retire().await;
        }
        Ok(())
    }
}

fn restart_backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(6);
    Duration::from_secs(secs).min(MAX_RESTART_BACKOFF)
}

/// Keeps a usable zygote up: at start, after a death, for a recycle; retries failed starts
/// with backoff. Ends when the launcher is dropped.
async fn supervise(inner: Weak<Inner>, mut wakes: mpsc::UnboundedReceiver<()>) {
    let mut failures = 0u32;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let mut retry = None;
        if strong.needs_zygote() {
            match strong.replace().await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    let pause = restart_backoff(failures);
                    strong
                        .metrics
                        .warm_pool_zygote_starts
                        .get_or_create(&[("result", "failed")])
                        .inc();
                    tracing::warn!(error = %e, failures, retry_in = ?pause, "zygote failed to start; launching cold meanwhile");
                    retry = Some(pause);
                }
            }
        }
        drop(strong);
        match retry {
            // Wakes during the backoff do not shorten it.
            Some(pause) => {
                tokio::time::sleep(pause).await;
                while wakes.try_recv().is_ok() {}
            }
            None => {
                if wakes.recv().await.is_none() {
                    return;
                }
            }
        }
    }
}

/// What the zygote writes on its socket, one JSON object per line.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Event {
    Ready {
        pid: u32,
        dagster_version: String,
        #[serde(default)]
        rss_bytes: u64,
        #[serde(default)]
        load_seconds: f64,
    },
    Failed {
        error: String,
    },
    Spawned {
        id: u64,
        pid: u32,
        forks: u64,
        #[serde(default)]
        rss_bytes: u64,
    },
    SpawnFailed {
        id: u64,
        error: String,
    },
    Exited {
        pid: u32,
        exit_code: Option<i32>,
        signal: Option<i32>,
    },
    #[serde(other)]
    Other,
}

enum SpawnReply {
    Spawned {
        pid: u32,
        forks: u64,
        rss: u64,
        exit: watch::Receiver<Option<StepExit>>,
    },
    Failed(String),
}

/// One zygote process and the conversation with it.
struct Zygote {
    pid: u32,
    /// Resident memory when it became ready; growth past the limit recycles it.
    base_rss: u64,
    /// `None` once closed: the zygote reads EOF and exits.
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    next_id: AtomicU64,
    table: Mutex<Table>,
    /// Cancelled when its control socket reached EOF (it exited or was killed).
    dead: tokio_util::sync::CancellationToken,
    /// No new spawns; closed once its last child exits.
    retiring: AtomicBool,
    /// Recycle due: still serving until its replacement is ready.
    recycle_wanted: AtomicBool,
}

#[derive(Default)]
struct Table {
    pending: HashMap<u64, oneshot::Sender<SpawnReply>>,
    children: HashMap<u32, watch::Sender<Option<StepExit>>>,
}

impl Zygote {
    async fn start(
        config: &WarmLauncherConfig,
        wake: mpsc::UnboundedSender<()>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Zygote>, WarmError> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let ours = UnixStream::from_std(ours)?;
        let mut command = Command::new(&config.python);
        command.args(["-m", "dagster_taskiq_controller.zygote"]);
        for module in &config.preload {
            command.arg("--preload").arg(module);
        }
        command
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a Ctrl-C meant for the controller does not reach it.
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; the zygote dies with the controller's thread.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            WarmError::Start(format!("cannot run {}: {e}", config.python.display()))
        })?;
        let os_pid = child.id().unwrap_or_default();
        let span = tracing::info_span!("zygote", pid = os_pid);
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            tokio::spawn(forward_zygote_output(pipe).instrument(span.clone()));
        }
        let (read, write) = ours.into_split();
        let mut lines = BufReader::new(read).lines();
        let first = match tokio::time::timeout(config.start_timeout, lines.next_line()).await {
            Err(_) => return Err(WarmError::StartTimeout(config.start_timeout)),
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                let how = match status {
                    Ok(Ok(status)) => match (status.code(), status.signal()) {
                        (Some(code), _) => format!("exited with code {code}"),
                        (None, Some(signal)) => format!("killed by signal {signal}"),
                        _ => "ended".into(),
                    },
                    _ => "closed its socket".into(),
                };
                return Err(WarmError::Start(format!(
                    "zygote {how} before it was ready"
                )));
            }
        };
        let (pid, base_rss) = match serde_json::from_str::<Event>(&first) {
            Ok(Event::Ready {
                pid,
                dagster_version,
                rss_bytes,
                load_seconds,
            }) => {
                span.in_scope(|| {
                    tracing::info!(
                        dagster_version,
                        load_seconds,
                        rss_bytes,
                        preload = ?config.preload,
                        "zygote ready"
                    )
                });
                (pid, rss_bytes)
            }
            Ok(Event::Failed { error }) => return Err(WarmError::Start(error)),
            _ => {
                return Err(WarmError::Start(format!(
                    "zygote said {first:?} instead of ready"
                )))
            }
        };
        let zygote = Arc::new(Zygote {
            pid,
            base_rss,
            writer: tokio::sync::Mutex::new(Some(write)),
            next_id: AtomicU64::new(1),
            table: Mutex::new(Table::default()),
            dead: Default::default(),
            retiring: AtomicBool::new(false),
            recycle_wanted: AtomicBool::new(false),
        });
        tokio::spawn(read_events(zygote.clone(), lines, child, wake, metrics).instrument(span));
        Ok(zygote)
    }

    fn usable(&self) -> bool {
        !self.dead.is_cancelled() && !self.retiring.load(Ordering::SeqCst)
    }

    /// Stops new spawns; the zygote exits once its running children have.
    async fn retire(&self) {
        self.retiring.store(true, Ordering::SeqCst);
        self.close_if_idle().await;
    }

    async fn close_if_idle(&self) {
        if !self.retiring.load(Ordering::SeqCst) {
            return;
        }
        let idle = {
            let table = self.table.lock().expect("lock");
            table.pending.is_empty() && table.children.is_empty()
        };
        if idle {
            // Dropping our end of the socket is the zygote's signal to exit.
            self.writer.lock().await.take();
        }
    }

    /// Forks a child for the step and lets it run; returns it with the zygote's fork count and
    /// resident memory.
    async fn spawn(
        self: &Arc<Self>,
        step: &StepRequest,
        timeout: Duration,
    ) -> Result<(WarmStep, u64, u64), WarmError> {
        let (out_r, out_w) = cloexec_pipe()?;
        let (err_r, err_w) = cloexec_pipe()?;
        let (control_r, control_w) = cloexec_pipe()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        self.table
            .lock()
            .expect("lock")
            .pending
            .insert(id, reply_tx);
        let forget = || {
            self.table.lock().expect("lock").pending.remove(&id);
        };
        if self.dead.is_cancelled() {
            forget();
            return Err(WarmError::Died);
        }
        let request = json!({
            "op": "spawn",
            "id": id,
            // The same three variables as the cold launcher; the zygote's environment (the
            // controller's) supplies the rest.
            "env": {
                "DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS": step.compressed_step_args(),
                "DAGSTER_RUN_JOB_NAME": step.job_name.as_deref().unwrap_or(""),
                "DAGSTER_RUN_STEP_KEY": step.step_key,
            },
        });
        let mut line = serde_json::to_vec(&request).expect("a JSON value serializes");
        line.push(b'\n');
        let fds = [out_w.as_raw_fd(), err_w.as_raw_fd(), control_r.as_raw_fd()];
        let sent = self.send_with_fds(&line, &fds).await;
        // The child has its copies now (or never will).
        drop((out_w, err_w, control_r));
        if let Err(e) = sent {
            forget();
            return Err(e);
        }
        let output = StepOutput::forward(
            pipe::Receiver::from_owned_fd(out_r)?,
            pipe::Receiver::from_owned_fd(err_r)?,
            step,
        );
        let reply = tokio::select! {
            reply = reply_rx => reply,
            _ = tokio::time::sleep(timeout) => {
                forget();
                output.abort();
                return Err(WarmError::SpawnTimeout(timeout));
            }
        };
        match reply {
            Ok(SpawnReply::Spawned {
                pid,
                forks,
                rss,
                exit,
            }) => {
                // Opened before the go byte, so it names this child even if the zygote dies
                // and the pid is reused later.
                let pidfd = pidfd_open(pid)
                    // SAFETY: the AsyncFd owns the pidfd, which stays open until it is dropped.
                    .and_then(|fd| {
                        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                            .map_err(std::io::Error::from)
                    })
                    .map_err(|e| tracing::debug!(pid, %e, "no pidfd for the step"))
                    .ok();
                let mut control = std::fs::File::from(control_w);
                if let Err(e) = control.write_all(b"g") {
                    // It died already; its exit arrives as usual.
                    tracing::debug!(pid, %e, "could not start the step");
                }
                let running = WarmStep {
                    pid,
                    exit_rx: exit,
                    pidfd,
                    _control: control,
                    output,
                    exit: None,
                };
                Ok((running, forks, rss))
            }
            Ok(SpawnReply::Failed(message)) => {
                output.abort();
                Err(WarmError::ForkFailed { message })
            }
            Err(_) => {
                output.abort();
                Err(WarmError::Died)
            }
        }
    }

    /// Writes one request line with `fds` attached to its first byte.
    async fn send_with_fds(&self, data: &[u8], fds: &[RawFd]) -> Result<(), WarmError> {
        let guard = self.writer.lock().await;
        let writer = guard.as_ref().ok_or(WarmError::Died)?;
        let stream: &UnixStream = writer.as_ref();
        let mut sent = 0;
        while sent < data.len() {
            stream.writable().await?;
            let rights = [ControlMessage::ScmRights(fds)];
            // The descriptors travel once, with the first chunk; the zygote queues them in
            // order, one triple per spawn line.
            let cmsgs: &[ControlMessage] = if sent == 0 { &rights } else { &[] };
            let result = stream.try_io(Interest::WRITABLE, || {
                let iov = [IoSlice::new(&data[sent..])];
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &iov,
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match result {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn on_event(&self, line: &str) {
        let event = match serde_json::from_str::<Event>(line) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(%e, line, "unreadable line from the zygote");
                return;
            }
        };
        let mut table = self.table.lock().expect("lock");
        match event {
            Event::Spawned {
                id,
                pid,
                forks,
                rss_bytes,
            } => {
                // Registered here, before any later `exited` line is read.
                let (exit_tx, exit_rx) = watch::channel(None);
                table.children.insert(pid, exit_tx);
                match table.pending.remove(&id) {
                    Some(reply) => {
                        let _ = reply.send(SpawnReply::Spawned {
                            pid,
                            forks,
                            rss: rss_bytes,
                            exit: exit_rx,
                        });
                    }
                    // Its launch gave up (timeout): the child gets no go byte and exits.
                    None => tracing::debug!(pid, "spawn answered after its launch gave up"),
                }
            }
            Event::SpawnFailed { id, error } => {
                if let Some(reply) = table.pending.remove(&id) {
                    let _ = reply.send(SpawnReply::Failed(error));
                }
            }
            Event::Exited {
                pid,
                exit_code,
                signal,
            } => {
                let exit = match (exit_code, signal) {
                    (_, Some(signal)) => StepExit::Signal(signal),
                    (Some(code), None) => StepExit::Code(code),
                    (None, None) => StepExit::Unknown,
                };
                if let Some(tx) = table.children.remove(&pid) {
                    let _ = tx.send(Some(exit));
                }
            }
            Event::Ready { .. } | Event::Failed { .. } | Event::Other => {
                tracing::debug!(line, "ignored zygote line");
            }
        }
    }
}

/// Reads the zygote's events until its socket closes, then reaps it and, unless it was
/// retired, asks for a replacement.
async fn read_events(
    zygote: Arc<Zygote>,
    mut lines: Lines<BufReader<OwnedReadHalf>>,
    mut child: Child,
    wake: mpsc::UnboundedSender<()>,
    metrics: Arc<Metrics>,
) {
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => {
                zygote.on_event(&line);
                zygote.close_if_idle().await;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(%e, "reading from the zygote failed");
                break;
            }
        }
    }
    {
        // Pending spawns fail (their children never get the go byte); running children are
        // now orphans whose steps fall back to their pidfds.
        let mut table = zygote.table.lock().expect("lock");
        table.pending.clear();
        table.children.clear();
    }
    zygote.dead.cancel();
    zygote.writer.lock().await.take();
    let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(status)) => format!("{status}"),
        _ => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            "killed after closing its socket".into()
        }
    };
    if zygote.retiring.load(Ordering::SeqCst) {
        tracing::info!(%status, "retired zygote exited");
    } else {
        tracing::warn!(%status, "zygote died; starting a new one");
        metrics.warm_pool_zygote_deaths.inc();
        let _ = wake.send(());
    }
}

async fn forward_zygote_output(pipe: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "zygote", "{line}");
    }
}

fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two new descriptors into the array, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A step forked from a zygote.
struct WarmStep {
    pid: u32,
    /// Set by the zygote's `exited` report; the sender is dropped if the zygote dies first.
    exit_rx: watch::Receiver<Option<StepExit>>,
    /// Readable once the process ended: how an orphaned step's end is seen.
    pidfd: Option<AsyncFd<OwnedFd>>,
    /// Write end of the step's control pipe: the step kills its group when it closes, so
    /// dropping this (or the controller dying) stops the step, like `kill_on_drop`.
    _control: std::fs::File,
    output: StepOutput,
    exit: Option<StepExit>,
}

impl WarmStep {
    fn signal_group(&self, signal: Signal) {
        if self.exit.is_some() {
            return;
        }
        // The child leads its own group (the zygote set it before reporting the pid).
        if let Err(e) = killpg(Pid::from_raw(self.pid as i32), signal) {
            tracing::debug!(pid = self.pid, %e, ?signal, "signal to step process group failed");
        }
    }

    /// The end of a step whose zygote died: its status is lost, only the end is visible.
    async fn wait_orphan(&mut self) -> StepExit {
        tracing::warn!(
            pid = self.pid,
            "the step's zygote died; following the step by its pidfd"
        );
        match &self.pidfd {
            Some(pidfd) => {
                let _ = pidfd.readable().await;
            }
            None => {
                while kill(Pid::from_raw(self.pid as i32), None).is_ok() {
                    tokio::time::sleep(ORPHAN_POLL).await;
                }
            }
        }
        StepExit::Unknown
    }
}

#[async_trait]
impl RunningStep for WarmStep {
    fn locator(&self) -> String {
        format!("pid {}", self.pid)
    }

    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    async fn wait(&mut self) -> StepExit {
        if let Some(exit) = self.exit {
            return exit;
        }
        let exit = loop {
            let reported = *self.exit_rx.borrow_and_update();
            if let Some(exit) = reported {
                break exit;
            }
            if self.exit_rx.changed().await.is_err() {
                let reported = *self.exit_rx.borrow();
                match reported {
                    Some(exit) => break exit,
                    None => break self.wait_orphan().await,
                }
            }
        };
        self.output.drain().await;
        self.exit = Some(exit);
        exit
    }

    fn terminate(&mut self) {
        self.signal_group(Signal::SIGTERM);
    }

    fn kill(&mut self) {
        self.signal_group(Signal::SIGKILL);
    }

    fn stderr_tail(&self) -> Vec<String> {
        self.output.stderr_tail()
    }

    fn take_events(&mut self) -> Option<EventLines> {
        self.output.take_events()
    }
}

impl Drop for WarmStep {
    fn drop(&mut self) {
        self.output.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_backoff_doubles_up_to_the_cap() {
        assert_eq!(restart_backoff(1), Duration::from_secs(1));
        assert_eq!(restart_backoff(2), Duration::from_secs(2));
        assert_eq!(restart_backoff(4), Duration::from_secs(8));
        assert_eq!(restart_backoff(50), MAX_RESTART_BACKOFF);
    }

    #[test]
    fn zygote_events_parse() {
        let spawned: Event =
            serde_json::from_str(r#"{"op":"spawned","id":3,"pid":42,"forks":7,"rss_bytes":9}"#)
                .unwrap();
        assert!(matches!(
            spawned,
            Event::Spawned {
                id: 3,
                pid: 42,
                forks: 7,
                rss_bytes: 9
            }
        ));
        let exited: Event = serde_json::from_str(r#"{"op":"exited","pid":42,"signal":9}"#).unwrap();
        assert!(matches!(
            exited,
            Event::Exited {
                pid: 42,
                exit_code: None,
                signal: Some(9)
            }
        ));
        let other: Event = serde_json::from_str(r#"{"op":"pong","id":1}"#).unwrap();
        assert!(matches!(other, Event::Other));
    }
}
