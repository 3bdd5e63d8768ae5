//! Each step as a local child process: `<python> -m dagster_taskiq_controller.stop_guard`
//! (Dagster's `execute_step` with SIGTERM kept from Dagster's interrupt unless Dagster asked for
//! the stop), no shell, in its own process group, its output streamed into the step's span.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;

use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::die_with_controller;
use super::limits::{Placement, StepLimiter};

use super::events::EventLines;
use super::output::StepOutput;
use super::python_map::PythonMap;
use crate::envelope::{LauncherKind, StepRequest};
use crate::launcher::{LaunchError, Launcher, RunningStep, StepExit};
use crate::step_env::StepEnvironment;

/// Runs `dagster api execute_step` in-process; a SIGTERM that Dagster did not ask for ends the
/// step with [`crate::launcher::STOPPED_FROM_OUTSIDE_EXIT`] and no Dagster failure, so the
/// verdict lets the op's RetryPolicy decide (docs/guarantees.md).
pub(crate) const STEP_MODULE: &str = "dagster_taskiq_controller.stop_guard";

#[derive(Debug, Clone)]
pub struct ProcessLauncherConfig {
    /// The interpreter whose `dagster` runs the step: the one of its run's code location.
    pub pythons: PythonMap,
    /// What the step inherits: not the controller's own variables (its secrets).
    pub environment: StepEnvironment,
    /// Each step's memory and CPU limits, and how they are enforced.
    pub limits: std::sync::Arc<StepLimiter>,
}

pub struct ProcessLauncher {
    config: ProcessLauncherConfig,
}

impl ProcessLauncher {
    pub fn new(config: ProcessLauncherConfig) -> Self {
        Self { config }
    }

    pub(crate) fn pythons(&self) -> &PythonMap {
        &self.config.pythons
    }

    pub(crate) fn limiter(&self) -> &StepLimiter {
        &self.config.limits
    }
}

#[async_trait]
impl Launcher for ProcessLauncher {
    fn kind(&self) -> LauncherKind {
        LauncherKind::Process
    }

    async fn launch(&self, step: &StepRequest) -> Result<Box<dyn RunningStep>, LaunchError> {
        let python = self.config.pythons.choose(step.location.as_deref())?;
        let placement = self.config.limits.prepare(&step.tags, &step.task_id)?;
        tracing::debug!(location = ?step.location, python = %python.display(), "cold start");
        let mut command = Command::new(python);
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
        if let Some(placement) = &placement {
            placement
                .before_exec(&mut command)
                .map_err(|e| LaunchError::Transient(format!("step limits: {e}")))?;
        }
        let mut child = command
            .spawn()
            .map_err(|e| classify_spawn_error(python, e))?;
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
            placement,
        }))
    }
}

fn classify_spawn_error(python: &Path, e: std::io::Error) -> LaunchError {
    let message = format!("cannot start {}: {e}", python.display());
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
    /// Its limits; its cgroup goes when the step is dropped.
    placement: Option<Placement>,
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

    fn out_of_memory(&self, failed_allocation: bool) -> Option<String> {
        let exit = self.exit?;
        self.placement
            .as_ref()?
            .out_of_memory(exit, failed_allocation || self.output.allocation_failed())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::launcher::child::python_map::{PythonMapArgs, Unmapped};

    /// An "interpreter" that says which one it is on stderr.
    fn interpreter(dir: &Path, name: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\necho 'ran {name}' >&2\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    async fn ran_on(launcher: &ProcessLauncher, location: Option<&str>) -> Result<String, String> {
        let mut step =
            crate::envelope::decode(&crate::fakes::step_body("t1", "run-1", "op_a", 0)).unwrap();
        step.location = location.map(str::to_owned);
        let mut running = launcher.launch(&step).await.map_err(|e| e.to_string())?;
        assert_eq!(running.wait().await, StepExit::Code(0));
        Ok(running.stderr_tail().join("\n"))
    }

    #[tokio::test]
    async fn a_step_runs_on_its_locations_interpreter_or_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let default = interpreter(dir.path(), "default");
        let etl = interpreter(dir.path(), "etl");
        let launcher = |unmapped| {
            let pythons = PythonMapArgs {
                python_for: vec![format!("etl={etl}")],
                python_for_unmapped: unmapped,
            }
            .map(Path::new(&default))
            .unwrap();
            ProcessLauncher::new(ProcessLauncherConfig {
                pythons,
                environment: StepEnvironment::from_process(&Default::default()),
                limits: std::sync::Arc::new(StepLimiter::unlimited()),
            })
        };
        let lenient = launcher(Unmapped::Default);
        assert_eq!(ran_on(&lenient, Some("etl")).await.unwrap(), "ran etl");
        assert_eq!(ran_on(&lenient, Some("bi")).await.unwrap(), "ran default");
        assert_eq!(ran_on(&lenient, None).await.unwrap(), "ran default");
        let strict = launcher(Unmapped::Refuse);
        assert_eq!(ran_on(&strict, Some("etl")).await.unwrap(), "ran etl");
        let refused = ran_on(&strict, Some("bi")).await.unwrap_err();
        assert!(
            refused.contains("unmapped_location") && refused.contains("\"bi\""),
            "{refused}"
        );
        assert!(ran_on(&strict, None).await.is_err());
    }
}
