//! One zygote process and the conversation with it over its control socket: start and the
//! ready handshake, spawn requests with the step's pipes passed by SCM_RIGHTS, the event
//! reader that reports each child's exit, retirement.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncRead, Interest};
use tokio::net::unix::{pipe, OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::launcher::child::die_with_controller;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use super::step::WarmStep;
use super::{PythonEnv, WarmError, WarmLauncherConfig};
use crate::bounded_lines::{BoundedLines, MAX_LINE_BYTES};
use crate::envelope::StepRequest;
use crate::launcher::child::limits::Placement;
use crate::launcher::child::output::StepOutput;
use crate::launcher::StepExit;

/// Bound of a line on the zygote's socket: its events are small JSON objects, but a `failed`
/// one carries a traceback.
const MAX_EVENT_LINE_BYTES: usize = 64 * 1024;

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
pub(super) struct Zygote {
    pub(super) pid: u32,
    /// Resident memory when it became ready; growth past the limit recycles it.
    pub(super) base_rss: u64,
    /// `None` once closed: the zygote reads EOF and exits.
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    next_id: AtomicU64,
    table: Mutex<Table>,
    /// Cancelled when its control socket reached EOF (it exited or was killed).
    dead: tokio_util::sync::CancellationToken,
    /// No new spawns; closed once its last child exits.
    retiring: AtomicBool,
    /// Recycle due: still serving until its replacement is ready.
    pub(super) recycle_wanted: AtomicBool,
}

#[derive(Default)]
struct Table {
    pending: HashMap<u64, oneshot::Sender<SpawnReply>>,
    children: HashMap<u32, watch::Sender<Option<StepExit>>>,
}

impl Zygote {
    pub(super) async fn start(
        env: &PythonEnv,
        config: &WarmLauncherConfig,
        wake: mpsc::UnboundedSender<()>,
        deaths: Counter,
    ) -> Result<Arc<Zygote>, WarmError> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let ours = UnixStream::from_std(ours)?;
        let mut command = Command::new(&env.python);
        command.args(["-m", "dagster_taskiq_controller.zygote"]);
        for module in &env.preload {
            command.arg("--preload").arg(module);
        }
        // The step environment: whatever the zygote holds, every fork inherits.
        config.environment.apply(&mut command);
        command
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a Ctrl-C meant for the controller does not reach it.
            .process_group(0)
            .kill_on_drop(true);
        die_with_controller(&mut command);
        let mut child = command
            .spawn()
            .map_err(|e| WarmError::Start(format!("cannot run {}: {e}", env.python.display())))?;
        let os_pid = child.id().unwrap_or_default();
        let span = tracing::info_span!("zygote", pid = os_pid, environment = env.label);
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
        let mut lines = BoundedLines::new(read, MAX_EVENT_LINE_BYTES);
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
        let parsed = (first.truncated == 0).then(|| serde_json::from_str::<Event>(&first.text));
        let (pid, base_rss) = match parsed {
            Some(Ok(Event::Ready {
                pid,
                dagster_version,
                rss_bytes,
                load_seconds,
            })) => {
                span.in_scope(|| {
                    tracing::info!(
                        dagster_version,
                        load_seconds,
                        rss_bytes,
                        python = %env.python.display(),
                        preload = ?env.preload,
                        "zygote ready"
                    )
                });
                (pid, rss_bytes)
            }
            Some(Ok(Event::Failed { error })) => return Err(WarmError::Start(error)),
            _ => {
                return Err(WarmError::Start(format!(
                    "zygote said {:?} instead of ready",
                    first.cut_to(MAX_LINE_BYTES).marked()
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
        tokio::spawn(read_events(zygote.clone(), lines, child, wake, deaths).instrument(span));
        Ok(zygote)
    }

    pub(super) fn usable(&self) -> bool {
        !self.dead.is_cancelled() && !self.retiring.load(Ordering::SeqCst)
    }

    /// Stops new spawns; the zygote exits once its running children have.
    pub(super) async fn retire(&self) {
        self.retiring.store(true, Ordering::SeqCst);
        self.close_if_idle().await;
    }

    async fn close_if_idle(&self) {
        if !self.retiring.load(Ordering::SeqCst) {
            return;
        }
        let idle = {
            let table = self.table.lock();
            table.pending.is_empty() && table.children.is_empty()
        };
        if idle {
            // Dropping our end of the socket is the zygote's signal to exit.
            self.writer.lock().await.take();
        }
    }

    /// Forks a child for the step and lets it run; returns it with the zygote's fork count and
    /// resident memory.
    pub(super) async fn spawn(
        self: &Arc<Self>,
        step: &StepRequest,
        timeout: Duration,
        placement: Option<Placement>,
    ) -> Result<(WarmStep, u64, u64), WarmError> {
        let (out_r, out_w) = cloexec_pipe()?;
        let (err_r, err_w) = cloexec_pipe()?;
        let (control_r, control_w) = cloexec_pipe()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        self.table.lock().pending.insert(id, reply_tx);
        let forget = || {
            self.table.lock().pending.remove(&id);
        };
        if self.dead.is_cancelled() {
            forget();
            return Err(WarmError::Died);
        }
        let request = json!({
            "op": "spawn",
            "id": id,
            // The same three variables as the cold launcher; the zygote's environment (the
            // step environment) supplies the rest.
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
                // Before its go byte: no step code runs outside its limits. On failure the
                // control pipe closes unused and the child kills its group.
                if let Some(placement) = &placement {
                    if let Err(e) = placement.adopt(pid) {
                        output.abort();
                        return Err(WarmError::Limits(e));
                    }
                }
                let running = WarmStep::start(pid, exit, control_w, output, placement);
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
        let mut table = self.table.lock();
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
    mut lines: BoundedLines<OwnedReadHalf>,
    mut child: Child,
    wake: mpsc::UnboundedSender<()>,
    deaths: Counter,
) {
    loop {
        match lines.next_line().await {
            Ok(Some(line)) if line.truncated > 0 => {
                let line = line.cut_to(MAX_LINE_BYTES).marked();
                tracing::warn!(line, "over-long line from the zygote ignored");
            }
            Ok(Some(line)) => {
                zygote.on_event(&line.text);
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
        let mut table = zygote.table.lock();
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
        deaths.inc();
        let _ = wake.send(());
    }
}

async fn forward_zygote_output(pipe: impl AsyncRead + Unpin) {
    let mut lines = BoundedLines::new(pipe, MAX_LINE_BYTES);
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "zygote", "{}", line.marked());
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

#[cfg(test)]
mod tests {
    use super::*;

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
