//! The launcher boundary: how a step attempt becomes a running execution.
//! [`ProcessLauncher`] runs `dagster api execute_step` as a local child process;
//! [`WarmLauncher`] forks it from a zygote that has already imported Dagster.

mod process;
mod warm;

use async_trait::async_trait;

pub use process::{ProcessLauncher, ProcessLauncherConfig};
pub use warm::{WarmLauncher, WarmLauncherConfig};

use crate::envelope::{LauncherKind, StepRequest};

/// How an execution ended, as far as the launcher can tell. The step's real outcome is in
/// Dagster's event log; this is what goes into a verdict when the log has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepExit {
    /// Exited by itself with this code.
    Code(i32),
    /// Ended by this signal.
    Signal(i32),
    /// Ended, but nobody could read its status (a warm step whose zygote died first).
    Unknown,
}

impl StepExit {
    /// Short form for verdict metadata: `exit code 3`, `signal 9`.
    pub fn short(&self) -> String {
        match self {
            StepExit::Code(code) => format!("exit code {code}"),
            StepExit::Signal(signal) => format!("signal {signal}"),
            StepExit::Unknown => "exit status unknown".into(),
        }
    }

    /// Sentence for a verdict.
    pub fn describe(&self) -> String {
        match self {
            StepExit::Code(0) => {
                "process exited with code 0 but Dagster recorded no outcome for the attempt".into()
            }
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
}

/// Starts step executions.
#[async_trait]
pub trait Launcher: Send + Sync + 'static {
    fn kind(&self) -> LauncherKind;
    async fn launch(&self, step: &StepRequest) -> Result<Box<dyn RunningStep>, LaunchError>;
}

/// One running execution of a step attempt.
#[async_trait]
pub trait RunningStep: Send + Sync {
    /// Where it runs, for logs and the API: `pid 1234`, a task ARN.
    fn locator(&self) -> String;
    /// OS process id, for the local launchers.
    fn pid(&self) -> Option<u32>;
    /// Waits for the end. Cancel-safe: may be polled again after being dropped mid-way.
    async fn wait(&mut self) -> StepExit;
    /// Asks the step to stop (SIGTERM: Dagster writes an interrupt failure).
    fn terminate(&mut self);
    /// Stops the step at once (SIGKILL to its whole process group: nothing is written).
    fn kill(&mut self);
    /// The last lines the step wrote to stderr.
    fn stderr_tail(&self) -> Vec<String>;
}
