//! Wiring: builds the controller's parts from the command line and runs them side by side
//! (the controller loop, the dashboard, the signal watcher); the `doctor` and `dlq`
//! subcommands.

pub(crate) mod dlq;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use dagster_taskiq_controller::admission::Admission;
use dagster_taskiq_controller::aws;
use dagster_taskiq_controller::claims::ClaimTable;
use dagster_taskiq_controller::cloudwatch;
use dagster_taskiq_controller::config::RunArgs;
use dagster_taskiq_controller::controller::{self, Context, Settings};
use dagster_taskiq_controller::dagster::{BridgeInfo, SidecarBridge};
use dagster_taskiq_controller::dashboard::{self, ControllerInfo, DashboardState, QueueCache};
use dagster_taskiq_controller::doctor;
use dagster_taskiq_controller::health::Health;
use dagster_taskiq_controller::launcher::{
    EcsLauncher, Launcher, LauncherRouter, ProcessLauncher, ProcessLauncherConfig, StepLimiter,
    WarmLauncher, WarmLauncherConfig,
};
use dagster_taskiq_controller::lease::LeaseTable;
use dagster_taskiq_controller::metrics::Metrics;
use dagster_taskiq_controller::queue::{SqsQueue, SqsQueueConfig};
use dagster_taskiq_controller::state::StepTable;
use dagster_taskiq_controller::step_env::StepEnvironment;
use dagster_taskiq_controller::taskiq::TaskiqCompat;

/// How old the dashboard's queue depths may get before GetQueueAttributes is called again.
const QUEUE_COUNTS_MAX_AGE: Duration = Duration::from_secs(3);

pub(crate) async fn doctor(args: RunArgs) -> anyhow::Result<()> {
    let aws = aws::load(Duration::from_secs(20)).await;
    let report = doctor::diagnose(&args, &aws).await;
    println!("{report}");
    if !report.passed() {
        std::process::exit(1);
    }
    Ok(())
}

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<()> {
    forbid_same_uid_reads();
    args.validate()?;
    let admin_token = args.dashboard.admin_token()?;
    let environment = args.step_env.environment()?;
    environment.log_summary();
    // Before any child starts: in `auto` mode this moves the controller into a leaf cgroup.
    let limits = Arc::new(
        StepLimiter::detect(&args.limits).map_err(|e| anyhow::anyhow!("--step-cgroup: {e}"))?,
    );
    let controller_id = args.controller.controller_id();
    let metrics = Arc::new(Metrics::new());
    let aws = aws::load(args.controller.receive_wait + Duration::from_secs(10)).await;
    let (queue, dlq_url) = connect_queue(&args, &aws, &metrics).await?;
    let leases = Arc::new(LeaseTable::new(
        args.lease.visibility_timeout,
        args.lease.visibility_cap,
        metrics.clone(),
    ));
    let health = Arc::new(Health::new(
        args.controller.receive_wait,
        leases.heartbeat_interval(),
    ));
    // SQS just answered: ready before the first long poll returns.
    health.queue_contact("GetQueueAttributes", None);
    let (bridge, bridge_info) = start_bridge(&args, &environment, &metrics).await?;
    let launcher =
        build_launcher(&args, &environment, limits, &controller_id, &aws, &metrics).await?;
    let taskiq = TaskiqCompat::connect(&args.taskiq, &aws)
        .await
        .context("cannot set up taskiq results")?
        .with_retry_budget(args.lease.visibility_timeout / 2);
    let admission = Admission::new(args.admission.config());
    metrics
        .admission_capacity
        .set(i64::try_from(args.admission.max_concurrent).unwrap_or(i64::MAX));
    metrics.hold_capacity.set(
        i64::try_from(args.admission.max_concurrent + args.admission.prefetch).unwrap_or(i64::MAX),
    );

    let ctx = Arc::new(Context {
        settings: settings(&args, &controller_id, bridge_info.clone()),
        queue: queue.clone(),
        launcher: Arc::new(launcher),
        bridge: bridge.clone(),
        admission,
        leases,
        claims: Arc::new(ClaimTable::new(
            args.controller.claim_stale_after,
            metrics.clone(),
        )),
        steps: Arc::new(StepTable::default()),
        metrics,
        health,
        taskiq,
        draining: CancellationToken::new(),
        abort: CancellationToken::new(),
    });
    let info = ControllerInfo {
        controller_id: controller_id.clone(),
        version: env!("CARGO_PKG_VERSION"),
        queue_url: args.queue_url.clone(),
        dlq_url: dlq_url.clone(),
        started_at: chrono::Utc::now(),
        dagster_url: args.dashboard.dagster_url.clone(),
    };
    let dashboard_stop = CancellationToken::new();
    let admin_api = admin_token.is_some();
    let dashboard = start_dashboard(
        &args,
        admin_token,
        info,
        &ctx,
        queue.clone(),
        &bridge,
        &dashboard_stop,
    )
    .await?;

    tokio::spawn(watch_signals(ctx.draining.clone(), ctx.abort.clone()));
    let signals_stop = CancellationToken::new();
    let signals = tokio::spawn(cloudwatch::run(
        scale_sources(&ctx, &bridge, &queue, &args.queue_url),
        args.cloudwatch
            .cloudwatch_namespace
            .clone()
            .map(|namespace| {
                cloudwatch::Publisher::new(
                    namespace,
                    cloudwatch::queue_name(&args.queue_url),
                    Arc::new(cloudwatch::CloudWatchSink::new(&aws)),
                )
            }),
        signals_stop.clone(),
    ));
    tracing::info!(
        controller_id,
        queue_url = %args.queue_url,
        dlq_url,
        dagster_version = %bridge_info.dagster_version,
        dagster_home = bridge_info.root_directory.as_deref().unwrap_or("?"),
        dashboard = %args.dashboard.dashboard_addr,
        max_concurrent = args.admission.max_concurrent,
        admin_api,
        read_token = args.dashboard.read_token.is_some() || args.dashboard.read_token_file.is_some(),
        warm_pool = args.warm.warm_pool,
        result_bucket = ?args.taskiq.result_bucket,
        "controller started"
    );
    controller::run(ctx).await;
    signals_stop.cancel();
    let _ = signals.await;
    bridge.close().await;
    dashboard_stop.cancel();
    // Keep-alive connections must not hold the exit.
    if tokio::time::timeout(Duration::from_secs(2), dashboard)
        .await
        .is_err()
    {
        tracing::debug!("dashboard did not close in time");
    }
    tracing::info!("controller stopped");
    Ok(())
}

/// What the scaling signals read: readiness as `/readyz` sees it, the work queue's depth.
fn scale_sources(
    ctx: &Arc<Context>,
    bridge: &Arc<SidecarBridge>,
    queue: &Arc<SqsQueue>,
    queue_url: &str,
) -> cloudwatch::Sources {
    let (health, draining, bridge) = (ctx.health.clone(), ctx.draining.clone(), bridge.clone());
    let (queue, queue_url) = (queue.clone(), queue_url.to_owned());
    cloudwatch::Sources {
        metrics: ctx.metrics.clone(),
        not_ready: Box::new(move || {
            dashboard::not_ready_reasons(
                draining.is_cancelled(),
                &health,
                bridge.status().is_running(),
            )
        }),
        visible: Box::new(move || {
            let (queue, url) = (queue.clone(), queue_url.clone());
            Box::pin(async move { queue.depth(&url).await.map_err(|e| e.to_string()) })
                as futures::future::BoxFuture<'static, Result<u64, String>>
        }),
    }
}

/// Makes this process non-dumpable, so that a step running as the same uid cannot read its
/// memory or `/proc/<pid>/environ` (the admin token, AWS credentials). Children are dumpable
/// again after their execve: only the controller is protected, which is the point.
fn forbid_same_uid_reads() {
    #[cfg(target_os = "linux")]
    match nix::sys::prctl::set_dumpable(false) {
        Ok(()) => tracing::info!(
            "controller is not dumpable: same-uid processes cannot read its memory or environment"
        ),
        Err(e) => tracing::warn!(
            %e,
            "cannot make the controller non-dumpable: a same-uid step could read its environment"
        ),
    }
}

/// The work queue and its dead-letter queue (given, or the RedrivePolicy's target), checked
/// to answer before anything else starts.
async fn connect_queue(
    args: &RunArgs,
    aws: &aws_config::SdkConfig,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Arc<SqsQueue>, String)> {
    let sqs = aws::sqs_client(aws);
    let dlq_url = match &args.dlq_url {
        Some(url) => url.clone(),
        None => match SqsQueue::discover_dlq(&sqs, &args.queue_url)
            .await
            .with_context(|| format!("cannot read the work queue {}", args.queue_url))?
        {
            Some(url) => url,
            None => bail!(
                "the work queue {} has no RedrivePolicy and no --dlq-url was given: \
                 poison messages need a dead-letter queue",
                args.queue_url
            ),
        },
    };
    let queue = Arc::new(
        SqsQueue::new(
            sqs,
            SqsQueueConfig {
                queue_url: args.queue_url.clone(),
                dlq_url: dlq_url.clone(),
            },
        )
        .with_metrics(metrics.clone()),
    );
    queue
        .depth(&args.queue_url)
        .await
        .with_context(|| format!("cannot read the work queue {}", args.queue_url))?;
    Ok((queue, dlq_url))
}

/// The Dagster bridge sidecar, answering (it reports Dagster's version).
async fn start_bridge(
    args: &RunArgs,
    environment: &StepEnvironment,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Arc<SidecarBridge>, BridgeInfo)> {
    let bridge = Arc::new(SidecarBridge::new(
        args.bridge.sidecar_config(&args.python, environment),
        metrics.clone(),
    ));
    let info = bridge.ping().await.with_context(|| {
        format!(
            "the Dagster bridge does not start with {}: is dagster-taskiq-controller (the Python package) installed there, and --dagster-home (or DAGSTER_HOME) the instance your runs use?",
            args.python.display()
        )
    })?;
    Ok((bridge, info))
}

/// The launchers this replica runs (cold or warm child processes, ECS tasks when enabled)
/// behind the per-step router.
async fn build_launcher(
    args: &RunArgs,
    environment: &StepEnvironment,
    limits: Arc<StepLimiter>,
    controller_id: &str,
    aws: &aws_config::SdkConfig,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<LauncherRouter> {
    let pythons = args.python_map.map(&args.python)?;
    for (location, python) in pythons.locations() {
        anyhow::ensure!(
            python.is_file(),
            "--python-for: the interpreter of code location {location:?}, {}, is not a file",
            python.display()
        );
        tracing::info!(location, python = %python.display(), "code location's Python environment");
    }
    let cold = ProcessLauncher::new(ProcessLauncherConfig {
        pythons,
        environment: environment.clone(),
        limits,
    });
    let process_launcher: Arc<dyn Launcher> = if args.warm.warm_pool {
        Arc::new(WarmLauncher::new(
            WarmLauncherConfig {
                preload: args.warm.warm_preload.clone(),
                recycle_after: args.warm.warm_recycle_after,
                max_rss_growth: args.warm.warm_max_rss_growth_mb * 1024 * 1024,
                start_timeout: args.warm.warm_start_timeout,
                spawn_timeout: std::time::Duration::from_secs(30),
                environment: environment.clone(),
            },
            cold,
            metrics.clone(),
        ))
    } else {
        Arc::new(cold)
    };
    let mut launchers: Vec<Arc<dyn Launcher>> = vec![process_launcher];
    if args.ecs_enabled() {
        let config = args.ecs.config(controller_id)?;
        tracing::info!(
            cluster = %config.cluster,
            task_definition = %config.task_definition,
            offload_bucket = ?config.offload.as_ref().map(|o| &o.bucket),
            "ECS launcher enabled"
        );
        let ecs = EcsLauncher::connect(config, aws, metrics.clone())
            .await
            .context("cannot set up the ECS launcher")?;
        launchers.push(Arc::new(ecs));
    }
    LauncherRouter::new(args.launcher.into(), launchers)
        .map_err(|e| anyhow::anyhow!("--launcher: {e}"))
}

/// The loop's settings, from the flags.
fn settings(args: &RunArgs, controller_id: &str, instance: BridgeInfo) -> Settings {
    Settings {
        controller_id: controller_id.to_owned(),
        receive_wait: args.controller.receive_wait,
        max_attempts: args.controller.max_attempts,
        backoff: args.controller.backoff(),
        shutdown_grace: args.controller.shutdown_grace,
        call_retry_budget: args.lease.visibility_timeout / 2,
        default_step_timeout: args.controller.step_timeout(),
        stop_grace: args.controller.stop_grace,
        run_status_interval: args.controller.run_status_interval,
        adoption_window: (args.lease.visibility_timeout * 3).max(Duration::from_secs(60)),
        waiting_limit: args.admission.waiting_limit(),
        instance,
    }
}

/// Binds the dashboard's address (failing start-up when it is taken) and serves it until
/// `stop` is cancelled.
async fn start_dashboard(
    args: &RunArgs,
    admin_token: Option<String>,
    info: ControllerInfo,
    ctx: &Context,
    queues: Arc<SqsQueue>,
    bridge: &Arc<SidecarBridge>,
    stop: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let addr = args.dashboard.dashboard_addr;
    let read_token = args.dashboard.read_token()?;
    if dashboard::read_api_exposed(addr, read_token.is_some()) {
        tracing::warn!(
            dashboard = %addr,
            "the dashboard listens beyond loopback without --read-token: the page and the read \
             API (step records with their stderr tails, which can hold secrets) are open to \
             anyone who reaches this address; set --read-token or --read-token-file"
        );
    }
    let listener = dashboard::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --dashboard-addr {addr}"))?;
    let state = DashboardState {
        info: Arc::new(info),
        metrics: ctx.metrics.clone(),
        steps: ctx.steps.clone(),
        leases: ctx.leases.clone(),
        admission: ctx.admission.view(),
        health: ctx.health.clone(),
        queues,
        bridge: bridge.clone(),
        admin_token: admin_token.map(Arc::from),
        read_token: read_token.as_deref().map(Arc::from),
        draining: ctx.draining.clone(),
        queue_cache: Arc::new(QueueCache::new(QUEUE_COUNTS_MAX_AGE)),
        dagster_ui: args.dashboard.dagster_ui()?.map(Arc::new),
    };
    Ok(tokio::spawn(dashboard::serve(
        listener,
        state,
        stop.clone(),
    )))
}

/// First SIGTERM/SIGINT: drain. Second: stop running steps now (their messages are released).
async fn watch_signals(draining: CancellationToken, abort: CancellationToken) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    for round in 0.. {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        if round == 0 {
            tracing::info!(
                signal = name,
                "draining: no new messages; running steps may finish"
            );
            draining.cancel();
        } else {
            tracing::warn!(signal = name, "second signal: stopping running steps now");
            abort.cancel();
            return;
        }
    }
}
