//! The launcher boundary: how a step attempt becomes a running execution.
//! [`ProcessLauncher`] runs `dagster api execute_step` as a local child process,
//! [`WarmLauncher`] forks it from a zygote that has already imported Dagster,
//! [`EcsLauncher`] runs it as its own ECS task; [`LauncherRouter`] picks one per step.

pub(crate) mod child;
pub(crate) mod ecs;
mod router;

use async_trait::async_trait;

pub(crate) use child::{EventLines, WarmArgs};
pub use child::{
    LimitArgs, ProcessLauncher, ProcessLauncherConfig, PythonMap, PythonMapArgs, StepLimiter,
    Unmapped, WarmLauncher, WarmLauncherConfig,
};
pub use ecs::{EcsLauncher, EcsLauncherConfig, EcsStopCause};
pub use router::LauncherRouter;

use crate::envelope::{LauncherKind, StepRequest};

/// How an execution ended, as far as the launcher can tell. The step's real outcome is in
/// Dagster's event log; this is what goes into a verdict when the log has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepExit {
    /// Exited by itself with this code.
    Code(i32),
    /// Ended by this signal.
    Signal(i32),
    /// An ECS task stopped; `cause` names why (docs/ecs.md), `exit_code` is the step
    /// container's exit code when it ran.
    Ecs {
        cause: EcsStopCause,
        exit_code: Option<i32>,
    },
    /// Ended, but nobody could read its status (a warm step whose zygote died first).
    Unknown,
}

impl StepExit {
    /// Short form for verdict metadata: `exit code 3`, `signal 9`.
    pub(crate) fn short(&self) -> String {
        match self {
            StepExit::Code(code) => format!("exit code {code}"),
            StepExit::Signal(signal) => format!("signal {signal}"),
            StepExit::Ecs {
                cause,
                exit_code: Some(code),
            } => format!("ecs {} exit code {code}", cause.name()),
            StepExit::Ecs {
                cause,
                exit_code: None,
            } => format!("ecs {}", cause.name()),
            StepExit::Unknown => "exit status unknown".into(),
        }
    }

    /// True when the execution failed before the step could start (the infrastructure failed,
    /// not the op): the same attempt is relaunched with backoff instead of getting a verdict.
    pub(crate) fn relaunch(&self) -> bool {
        match self {
            StepExit::Ecs { cause, .. } => cause.never_started(),
            _ => false,
        }
    }

    /// Sentence for a verdict.
    pub(crate) fn describe(&self) -> String {
        match self {
            StepExit::Code(0) => {
                "process exited with code 0 but Dagster recorded no outcome for the attempt".into()
            }
            StepExit::Code(STOPPED_FROM_OUTSIDE_EXIT) => format!(
                "process was stopped by a SIGTERM that neither Dagster nor the controller asked \
                 for (host shutdown, or a kill from outside): an infrastructure stop, not a \
                 failure of the op (exit code {STOPPED_FROM_OUTSIDE_EXIT})"
            ),
            StepExit::Code(code) => format!("process exited with code {code}"),
            StepExit::Signal(signal) => {
                let name = nix::sys::signal::Signal::try_from(*signal)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown");
                let hint = if *signal == libc::SIGKILL {
                    " (out of memory, or killed from outside)"
                } else {
                    ""
                };
                format!("process killed by signal {signal} ({name}){hint}")
            }
            StepExit::Ecs { cause, exit_code } => cause.describe(*exit_code),
            StepExit::Unknown => {
                "process ended after its zygote died, exit status unknown, and Dagster recorded no outcome for the attempt".into()
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// May succeed later (EAGAIN, ENOMEM, throttling): the message is released with backoff.
    #[error("launch failed, will retry: {0}")]
    Transient(String),
    /// The launcher cannot run this step as configured.
    #[error("launch failed: {0}")]
    Permanent(String),
    /// The step's launch settings are invalid (bad `ecs/*` op tags, no launcher of the asked
    /// kind): it can never launch, so the message is dead-lettered with `reason`.
    #[error("invalid launch settings ({reason}): {detail}")]
    Invalid {
        reason: &'static str,
        detail: String,
    },
}

/// Starts step executions.
#[async_trait]
pub trait Launcher: Send + Sync + 'static {
    fn kind(&self) -> LauncherKind;
    /// The kind that will run this step (a router answers per step).
    fn kind_for(&self, _step: &StepRequest) -> LauncherKind {
        self.kind()
    }
    async fn launch(&self, step: &StepRequest) -> Result<Box<dyn RunningStep>, LaunchError>;
    /// Whether an execution of this attempt from an earlier delivery is there to adopt (an
    /// ECS task outlives the controller that started it). Such a redelivery costs no
    /// attempt: the step is still running, nothing failed. Local launchers have none.
    async fn has_execution_to_adopt(&self, _step: &StepRequest) -> bool {
        false
    }
}

/// One running execution of a step attempt.
#[async_trait]
pub trait RunningStep: Send + Sync {
    /// Where it runs, for logs and the API: `pid 1234`, a task ARN.
    fn locator(&self) -> String;
    /// Pages about the execution outside the controller (an ECS task and its log stream).
    fn links(&self) -> Vec<crate::links::Link> {
        Vec::new()
    }
    /// OS process id, for the local launchers.
    fn pid(&self) -> Option<u32>;
    /// Waits for the end. Cancel-safe: may be polled again after being dropped mid-way.
    async fn wait(&mut self) -> StepExit;
    /// Asks the step to stop (SIGTERM: Dagster writes an interrupt failure).
    fn terminate(&mut self);
    /// Stops the step at once (SIGKILL to its whole process group: nothing is written).
    fn kill(&mut self);
    /// The last lines the step wrote to stderr (for ECS: why the task stopped).
    fn stderr_tail(&self) -> Vec<String>;
    /// The serialized event lines the step printed, once it ended, when the step asked for
    /// them (`StepRequest::collect_events`); `None` from launchers that do not capture the
    /// step's output (ECS).
    fn take_events(&mut self) -> Option<EventLines> {
        None
    }

    /// Once it ended: the verdict's sentence when it ended for its memory limit
    /// (`out of memory: 512 MiB limit (...)`); local launchers with a limit only.
    /// `failed_allocation`: Dagster recorded the attempt's failure as a failed allocation.
    fn out_of_memory(&self, _failed_allocation: bool) -> Option<String> {
        None
    }
    /// True when this execution was adopted (an ECS task an earlier delivery launched): its
    /// launch was reported then.
    fn adopted(&self) -> bool {
        false
    }
    /// True when the execution keeps running without this controller (an ECS task): on
    /// shutdown or lease loss its message is handed back for another replica to adopt the
    /// execution, instead of killing it.
    fn survives_controller(&self) -> bool {
        false
    }

    /// True when the execution kills itself at the step's timeout (the ECS shim does, with
    /// SIGKILL, from when its container starts): the controller's own deadline is then only
    /// a backstop, and an exit with [`TIMED_OUT_EXIT`] means the step timed out.
    fn enforces_timeout(&self) -> bool {
        false
    }
}

/// Exit code of an execution that killed its step at the timeout (the ECS shim's).
pub(crate) const TIMED_OUT_EXIT: i32 = ecs::request::SHIM_TIMED_OUT_EXIT;

/// Exit code of a step that got a SIGTERM Dagster did not ask for and stopped without writing
/// a failure (`EXIT_STOPPED_FROM_OUTSIDE` in python/dagster_taskiq_controller/stop_guard.py):
/// 128 + SIGTERM.
pub(crate) const STOPPED_FROM_OUTSIDE_EXIT: i32 = 128 + libc::SIGTERM;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_stopped_from_outside_is_named_as_an_infrastructure_stop() {
        let outside = StepExit::Code(STOPPED_FROM_OUTSIDE_EXIT).describe();
        assert!(
            outside.contains("SIGTERM that neither Dagster nor the controller"),
            "{outside}"
        );
        assert!(outside.contains("exit code 143"), "{outside}");
        assert_eq!(StepExit::Code(3).describe(), "process exited with code 3");
    }
}
