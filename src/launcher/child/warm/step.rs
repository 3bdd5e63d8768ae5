//! A step forked from a zygote, as the controller follows it: by the zygote's exit report,
//! or by its pidfd once the zygote is gone.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;

use crate::launcher::child::events::EventLines;
use crate::launcher::child::limits::Placement;
use crate::launcher::child::output::StepOutput;
use crate::launcher::{RunningStep, StepExit};

/// How often a step whose zygote died is checked for exit where pidfds are unavailable.
const ORPHAN_POLL: Duration = Duration::from_millis(100);

/// A step forked from a zygote.
pub(super) struct WarmStep {
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
    /// Its limits; its cgroup goes when the step is dropped.
    placement: Option<Placement>,
}

impl WarmStep {
    /// Lets a just-forked child run: it waits for the go byte on its control pipe.
    pub(super) fn start(
        pid: u32,
        exit_rx: watch::Receiver<Option<StepExit>>,
        control: OwnedFd,
        output: StepOutput,
        placement: Option<Placement>,
    ) -> Self {
        // Opened before the go byte, so it names this child even if the zygote dies and the
        // pid is reused later.
        let pidfd = pidfd_open(pid)
            // SAFETY: the AsyncFd owns the pidfd, which stays open until it is dropped.
            .and_then(|fd| {
                unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                    .map_err(std::io::Error::from)
            })
            .map_err(|e| tracing::debug!(pid, %e, "no pidfd for the step"))
            .ok();
        let mut control = std::fs::File::from(control);
        if let Err(e) = control.write_all(b"g") {
            // It died already; its exit arrives as usual.
            tracing::debug!(pid, %e, "could not start the step");
        }
        WarmStep {
            pid,
            exit_rx,
            pidfd,
            _control: control,
            output,
            exit: None,
            placement,
        }
    }

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

    fn out_of_memory(&self, failed_allocation: bool) -> Option<String> {
        let exit = self.exit?;
        self.placement
            .as_ref()?
            .out_of_memory(exit, failed_allocation || self.output.allocation_failed())
    }
}

impl Drop for WarmStep {
    fn drop(&mut self) {
        self.output.abort();
    }
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
