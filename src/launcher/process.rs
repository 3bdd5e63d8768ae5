//! Each step as a local child process: `<python> -m dagster api execute_step`, no shell, in
//! its own process group, its output streamed into the step's tracing span.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::{LaunchError, Launcher, RunningStep, StepExit};
use crate::envelope::{LauncherKind, StepRequest};
use crate::results::{self, EventLines, EventSink};

/// How many stderr lines a verdict quotes.
pub(super) const STDERR_TAIL_LINES: usize = 20;
/// How long to wait for output pipes to close after the process exited (a grandchild may
/// still hold them).
pub(super) const PIPE_DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct ProcessLauncherConfig {
    /// The interpreter whose `dagster` runs the step.
    pub python: PathBuf,
}

pub struct ProcessLauncher {
    config: ProcessLauncherConfig,
}

impl ProcessLauncher {
    pub fn new(config: ProcessLauncherConfig) -> Self {
        Self { config }
    }
}

#[async_trait]
impl Launcher for ProcessLauncher {
    fn kind(&self) -> LauncherKind {
        LauncherKind::Process
    }

    async fn launch(&self, step: &StepRequest) -> Result<Box<dyn RunningStep>, LaunchError> {
        let mut command = Command::new(&self.config.python);
        command
            .args(["-m", "dagster", "api", "execute_step"])
            // The child inherits the controller's environment (user code paths, credentials,
            // DAGSTER_HOME); the message sets only these.
            .env(
                "DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS",
                step.compressed_step_args(),
            )
            .env(
                "DAGSTER_RUN_JOB_NAME",
                step.job_name.as_deref().unwrap_or(""),
            )
            .env("DAGSTER_RUN_STEP_KEY", &step.step_key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group, so cancel and kill reach whatever the step starts.
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL the child
        // when the controller's thread dies, so a crashed controller leaves no step behind.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| classify_spawn_error(&self.config, e))?;
        let pid = child.id().expect("a just-spawned child has a pid");
        let output = StepOutput::forward(
            child.stdout.take().expect("piped"),
            child.stderr.take().expect("piped"),
            step,
        );
        Ok(Box::new(ChildStep {
            child,
            pid,
            output,
            exit: None,
        }))
    }
}

/// The shared buffer of a step's last stderr lines.
pub(super) type Tail = Arc<Mutex<VecDeque<String>>>;

pub(super) fn new_tail() -> Tail {
    Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)))
}

pub(super) fn tail_lines(tail: &Tail) -> Vec<String> {
    tail.lock().expect("lock").iter().cloned().collect()
}

fn classify_spawn_error(config: &ProcessLauncherConfig, e: std::io::Error) -> LaunchError {
    let message = format!("cannot start {}: {e}", config.python.display());
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::ENOMEM) | Some(libc::EMFILE) | Some(libc::ENFILE) => {
            LaunchError::Transient(message)
        }
        _ => LaunchError::Permanent(message),
    }
}

#[derive(Clone, Copy)]
pub(super) enum Stream {
    Stdout,
    Stderr,
}

/// Where a step's serialized event lines go: the sink, when the step prints them
/// (`print_serialized_events`) and they are collected.
pub(super) fn event_lines_of(step: &StepRequest, sink: &Option<EventSink>) -> Option<EventSink> {
    sink.clone().filter(|_| step.print_serialized_events)
}

/// Streams a pipe's lines into the step's span. With `events`, stdout lines that are
/// serialized Dagster events go there instead (bounded: see `results::MAX_EVENT_BYTES`).
pub(super) async fn forward_lines(
    pipe: impl AsyncRead + Unpin,
    stream: Stream,
    tail: Option<Tail>,
    events: Option<EventSink>,
) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(events) = events
            .as_ref()
            .filter(|_| results::is_serialized_event(&line))
        {
            let kept = events.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            if !kept {
                tracing::warn!(
                    target: "step::stdout",
                    limit = results::MAX_EVENT_BYTES,
                    "event line dropped: the step's events are over the limit"
                );
            }
            continue;
        }
        match stream {
            // With print_serialized_events the step prints one serialized event per line.
            Stream::Stdout => tracing::debug!(target: "step::stdout", "{line}"),
            Stream::Stderr => tracing::info!(target: "step::stderr", "{line}"),
        }
        if let Some(tail) = &tail {
            let mut tail = tail.lock().expect("lock");
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}

/// A step process's two pipes as they are read: stdout lines to the step's span (or, when
/// collected, to its serialized events), stderr lines to the span and a bounded tail.
pub(super) struct StepOutput {
    readers: Vec<JoinHandle<()>>,
    stderr_tail: Tail,
    events: Option<EventSink>,
}

impl StepOutput {
    /// Starts reading at once, so a chatty child never blocks on a full pipe.
    pub(super) fn forward(
        stdout: impl AsyncRead + Unpin + Send + 'static,
        stderr: impl AsyncRead + Unpin + Send + 'static,
        step: &StepRequest,
    ) -> Self {
        let stderr_tail = new_tail();
        let events = EventLines::sink_for(step);
        let span = tracing::Span::current();
        let readers = vec![
            tokio::spawn(
                forward_lines(stdout, Stream::Stdout, None, event_lines_of(step, &events))
                    .instrument(span.clone()),
            ),
            tokio::spawn(
                forward_lines(stderr, Stream::Stderr, Some(stderr_tail.clone()), None)
                    .instrument(span),
            ),
        ];
        Self {
            readers,
            stderr_tail,
            events,
        }
    }

    /// After the exit: lets the readers finish so the stderr tail is complete.
    pub(super) async fn drain(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(PIPE_DRAIN, reader).await;
        }
    }

    /// Stops reading (the step never started).
    pub(super) fn abort(&self) {
        self.readers.iter().for_each(JoinHandle::abort);
    }

    pub(super) fn stderr_tail(&self) -> Vec<String> {
        tail_lines(&self.stderr_tail)
    }

    pub(super) fn take_events(&self) -> Option<EventLines> {
        self.events.as_ref().map(EventLines::take)
    }
}

struct ChildStep {
    child: Child,
    pid: u32,
    output: StepOutput,
    exit: Option<StepExit>,
}

impl ChildStep {
    fn signal_group(&self, signal: Signal) {
        if self.exit.is_some() {
            return;
        }
        // The child leads its own group, so its pid is the group id.
        if let Err(e) = killpg(Pid::from_raw(self.pid as i32), signal) {
            tracing::debug!(pid = self.pid, %e, ?signal, "signal to step process group failed");
        }
    }
}

#[async_trait]
impl RunningStep for ChildStep {
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
        let exit = match self.child.wait().await {
            Ok(status) => match (status.code(), status.signal()) {
                (Some(code), _) => StepExit::Code(code),
                (None, Some(signal)) => StepExit::Signal(signal),
                (None, None) => StepExit::Code(-1),
            },
            Err(e) => {
                tracing::error!(%e, "waiting for step process failed");
                StepExit::Code(-1)
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
