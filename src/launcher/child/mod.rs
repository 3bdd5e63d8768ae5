//! The local launchers: each step is a child process of this host, started cold
//! ([`ProcessLauncher`]) or forked from a warm zygote ([`WarmLauncher`]). Both read the step's
//! pipes the same way ([`output`]): stderr into the step's span and a tail for verdicts,
//! stdout's serialized Dagster events into [`EventLines`] for the taskiq result.

mod events;
pub mod limits;
mod output;
mod process;
mod python_map;
mod warm;

pub(crate) use events::{EventLines, MAX_EVENT_BYTES};
pub use limits::{LimitArgs, StepLimiter};
pub use process::{ProcessLauncher, ProcessLauncherConfig};
pub use python_map::{PythonMap, PythonMapArgs, Unmapped};
pub(crate) use warm::WarmArgs;
pub use warm::{WarmLauncher, WarmLauncherConfig};

/// Makes the kernel SIGKILL the child when the controller's thread that spawned it dies, so a
/// crashed controller leaves no step (or zygote) behind.
fn die_with_controller(command: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe; it only sets the child's parent-death signal.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
