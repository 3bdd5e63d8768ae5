//! Each step as a local child process: `<python> -m dagster_taskiq_controller.stop_guard`
//! (Dagster's `execute_step` with SIGTERM kept from Dagster's interrupt unless Dagster asked for
//! the stop), no shell, in its own process group, its output streamed into the step's span.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;

use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::die_with_controller;

use super::events::EventLines;
use super::output::StepOutput;
use crate::envelope::{LauncherKind, StepRequest};
use crate::launcher::{LaunchError, Launcher, RunningStep, StepExit};
use crate::step_env::StepEnvironment;

/// Runs `dagster api execute_step` in-process; a SIGTERM that Dagster did not ask for ends the
/// step with [`crate::launcher::STOPPED_FROM_OUTSIDE_EXIT`] and no Dagster failure, so the
/// verdict lets the op's RetryPolicy decide (docs/guarantees.md).
pub(crate) const STEP_MODULE: &str = "dagster_taskiq_controller.stop_guard";

#[derive(Debug, Clone)]
pub struct ProcessLauncherConfig {
    /// The interpreter whose `dagster` runs the step.
    pub python: PathBuf,
    /// What the step inherits: not the controller's own variables (its secrets).
    pub environment: StepEnvironment,
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
        command.args(["-m", STEP_MODULE]);
        // The step environment (the controller's minus its secrets); the message sets only
        // these.
        self.config.environment.apply(&mut command);
        command
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
        die_with_controller(&mut command);
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

fn classify_spawn_error(config: &ProcessLauncherConfig, e: std::io::Error) -> LaunchError {
    let message = format!("cannot start {}: {e}", config.python.display());
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::ENOMEM) | Some(libc::EMFILE) | Some(libc::ENFILE) => {
            LaunchError::Transient(message)
        }
        _ => LaunchError::Permanent(message),
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
