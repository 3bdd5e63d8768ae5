//! Warm starts: each step is forked from a long-lived Python zygote
//! (`python -m dagster_taskiq_controller.zygote`) that has imported Dagster and the configured
//! preload modules once, instead of paying a fresh interpreter and `import dagster` per step.
//! docs/protocol.md, section 3, is the controller ↔ zygote protocol.
//!
//! The guarantees are those of [`ProcessLauncher`]: the step is its own process leading its own
//! process group (kill, terminate, timeouts and fencing use `killpg`), its stdout/stderr go into
//! the step's tracing span (the controller makes the pipes and passes their write ends with
//! SCM_RIGHTS), it gets the same three variables over the zygote's environment (the same step
//! environment the cold launcher uses, [`crate::step_env`]), and it runs
//! Dagster's own `execute_step` command with the same arguments. Liveness:
//! - the zygote gets PR_SET_PDEATHSIG and exits on EOF of its control socket;
//! - every step holds the read end of a control pipe whose write end only the controller holds:
//!   it waits for the controller's go byte before running, and kills its own group on EOF. So a
//!   step dies with the controller however the controller dies, and a child forked by a zygote
//!   that died before reporting it never runs;
//! - a step survives its zygote: its exit status then cannot be read, and a pidfd tells the
//!   controller when it ended ([`crate::launcher::StepExit::Unknown`]; the outcome is in
//!   Dagster's event log).
//!
//! Each Python environment a code location maps to (`--python-for`, [`super::PythonMap`])
//! has its own zygote, started with its first step (`--python`'s right away), and the step
//! forks from the one of its run's location. Each zygote is supervised (restarted with
//! backoff when it dies), recycled after
//! `recycle_after` forks or when its memory grows past `max_rss_growth`, and whenever no
//! usable zygote is at hand the step is launched cold, with a warning and
//! `warm_pool_fallbacks_total`.

mod args;
mod step;
mod zygote;

pub(crate) use args::WarmArgs;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch};

use self::step::WarmStep;
use self::zygote::Zygote;
use super::limits::Placement;
use super::ProcessLauncher;
use crate::envelope::{LauncherKind, StepRequest};
use crate::launcher::{LaunchError, Launcher, RunningStep};
use crate::metrics::Metrics;
use crate::step_env::StepEnvironment;

/// Longest pause between restart attempts of a zygote that fails to start.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(60);
/// How long a launch waits for a zygote that is (re)starting before it goes cold.
const READY_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct WarmLauncherConfig {
    /// Modules (or `.py` files) the zygote of `--python`'s environment imports before
    /// forking, e.g. the user's code. The zygotes of the other environments (`--python-for`)
    /// import Dagster only: these modules need not be importable there.
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
    /// The zygote's environment, so its forks': not the controller's own variables.
    pub environment: StepEnvironment,
}

/// One Python environment's zygotes: what they run, and the `environment` metric label.
#[derive(Debug)]
pub(super) struct PythonEnv {
    pub(super) python: PathBuf,
    pub(super) preload: Vec<String>,
    /// `default` for `--python`, else the code locations mapped to it; bounded by the map.
    pub(super) label: &'static str,
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
    /// The forked step could not be put under its limits; it never ran.
    #[error("cannot apply the step's limits: {0}")]
    Limits(std::io::Error),
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
            WarmError::Limits(_) => "limits",
        }
    }
}

/// [`crate::launcher::Launcher`] that forks steps from a warm zygote of their code location's
/// Python environment, falling back to the cold [`ProcessLauncher`].
pub struct WarmLauncher {
    /// One pool per interpreter of the cold launcher's map.
    pools: BTreeMap<PathBuf, Arc<Pool>>,
    cold: ProcessLauncher,
    metrics: Arc<Metrics>,
}

/// The zygotes of one Python environment, supervised and recycled on their own.
struct Pool {
    env: PythonEnv,
    config: WarmLauncherConfig,
    metrics: Arc<Metrics>,
    /// The zygote new steps fork from; only the supervisor replaces it.
    current: watch::Sender<Option<Arc<Zygote>>>,
    /// Wakes the supervisor: a zygote died, wants recycling, or a launch found none.
    wake: mpsc::UnboundedSender<()>,
}

impl WarmLauncher {
    /// A pool per Python environment of `cold`'s map; starts the supervisors. The default
    /// environment's zygote comes up right away (when unmapped locations run there), the
    /// others' with their first step. Needs a runtime.
    pub fn new(config: WarmLauncherConfig, cold: ProcessLauncher, metrics: Arc<Metrics>) -> Self {
        let map = cold.pythons();
        let default = map.default_python().to_owned();
        let mut pools = BTreeMap::new();
        for python in map.interpreters() {
            let is_default = python == default;
            let label = if is_default {
                "default".to_owned()
            } else {
                map.locations()
                    .filter(|(_, p)| *p == python)
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let env = PythonEnv {
                python: python.to_owned(),
                preload: if is_default {
                    config.preload.clone()
                } else {
                    Vec::new()
                },
                // Leaked once per interpreter of the map, for the metrics' static labels.
                label: Box::leak(label.into_boxed_str()),
            };
            let (wake, wakes) = mpsc::unbounded_channel();
            let pool = Arc::new(Pool {
                env,
                config: config.clone(),
                metrics: metrics.clone(),
                current: watch::Sender::new(None),
                wake,
            });
            let eager = is_default && map.runs_unmapped();
            tokio::spawn(supervise(Arc::downgrade(&pool), wakes, eager));
            pools.insert(python.to_owned(), pool);
        }
        Self {
            pools,
            cold,
            metrics,
        }
    }
}

#[async_trait]
impl Launcher for WarmLauncher {
    fn kind(&self) -> LauncherKind {
        LauncherKind::Process
    }

    async fn launch(&self, step: &StepRequest) -> Result<Box<dyn RunningStep>, LaunchError> {
        let python = self.cold.pythons().choose(step.location.as_deref())?;
        let pool = self
            .pools
            .get(python)
            .expect("a pool for every interpreter of the map");
        let placement = self.cold.limiter().prepare(&step.tags, &step.task_id)?;
        match pool.launch_warm(step, placement).await {
            Ok(running) => Ok(Box::new(running)),
            Err(e @ (WarmError::ForkFailed { .. } | WarmError::Limits(_))) => {
                Err(LaunchError::Transient(e.to_string()))
            }
            Err(e) => {
                tracing::warn!(error = %e, environment = pool.env.label, "warm pool unavailable: launching the step cold");
                self.metrics
                    .warm_pool_fallbacks
                    .get_or_create(&[("reason", e.reason()), ("environment", pool.env.label)])
                    .inc();
                self.cold.launch(step).await
            }
        }
    }
}

impl Pool {
    fn label(&self) -> [(&'static str, &'static str); 1] {
        [("environment", self.env.label)]
    }

    async fn launch_warm(
        &self,
        step: &StepRequest,
        placement: Option<Placement>,
    ) -> Result<WarmStep, WarmError> {
        let zygote = self.ready_zygote().await?;
        let spawned = zygote
            .spawn(step, self.config.spawn_timeout, placement)
            .await;
        let (running, forks, rss) = match spawned {
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
        self.metrics
            .warm_pool_forks
            .get_or_create(&self.label())
            .inc();
        self.metrics
            .warm_pool_zygote_rss_bytes
            .get_or_create(&self.label())
            .set(rss as i64);
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
                    environment = self.env.label,
                    forks,
                    rss_growth = growth,
                    reason,
                    "recycling the zygote once its replacement is ready"
                );
                self.metrics
                    .warm_pool_recycles
                    .get_or_create(&[("reason", reason), ("environment", self.env.label)])
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
        // A clone: the family's guard must not be held across the start.
        let pid = self
            .metrics
            .warm_pool_zygote_pid
            .get_or_create(&self.label())
            .clone();
        if self.current.borrow().as_ref().is_none_or(|z| !z.usable()) {
            pid.set(0);
        }
        let deaths = self
            .metrics
            .warm_pool_zygote_deaths
            .get_or_create(&self.label())
            .clone();
        let zygote = Zygote::start(&self.env, &self.config, self.wake.clone(), deaths).await?;
        self.metrics
            .warm_pool_zygote_starts
            .get_or_create(&[("result", "ok"), ("environment", self.env.label)])
            .inc();
        pid.set(zygote.pid as i64);
        self.metrics
            .warm_pool_zygote_rss_bytes
            .get_or_create(&self.label())
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

/// Keeps a usable zygote up in one pool: at start (`eager`) or on the first launch, after a
/// death, for a recycle; retries failed starts with backoff. Ends when the launcher is
/// dropped.
async fn supervise(pool: Weak<Pool>, mut wakes: mpsc::UnboundedReceiver<()>, eager: bool) {
    if !eager && wakes.recv().await.is_none() {
        return;
    }
    let mut failures = 0u32;
    loop {
        let Some(strong) = pool.upgrade() else {
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
                        .get_or_create(&[("result", "failed"), ("environment", strong.env.label)])
                        .inc();
                    tracing::warn!(error = %e, environment = strong.env.label, failures, retry_in = ?pause, "zygote failed to start; launching cold meanwhile");
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
}
