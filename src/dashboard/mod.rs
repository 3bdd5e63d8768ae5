//! The operator HTTP surface (warp): the HTML dashboard, health probes, Prometheus metrics and
//! the JSON API (`api`). Probes and reads never call out except for the cached queue depths;
//! the two mutating endpoints need the admin bearer token.

mod access;
mod api;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::{Filter, Reply};

use self::access::PageAccess;
use crate::admission::AdmissionView;
use crate::dagster::{SidecarBridge, SidecarStatus};
use crate::health::Health;
use crate::lease::LeaseTable;
use crate::links::DagsterUi;
use crate::metrics::Metrics;
use crate::queue::{QueueAdmin, QueueCounts};
use crate::state::StepTable;

use crate::flags::{invalid, ConfigError};

const INDEX_HTML: &str = include_str!("index.html");
const DASHBOARD_CSS: &str = include_str!("dashboard.css");
const DASHBOARD_JS: &str = include_str!("dashboard.js");
/// The page loads only its own script and style and talks only to this origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The Dagster bridge sidecar's state, for `/readyz`.
pub trait BridgeProbe: Send + Sync + 'static {
    fn status(&self) -> SidecarStatus;
}

impl BridgeProbe for SidecarBridge {
    fn status(&self) -> SidecarStatus {
        SidecarBridge::status(self)
    }
}

/// Static facts about this controller shown by the API.
#[derive(Debug, Clone, Serialize)]
pub struct ControllerInfo {
    pub controller_id: String,
    pub version: &'static str,
    pub queue_url: String,
    pub dlq_url: String,
    pub started_at: DateTime<Utc>,
    /// The Dagster webserver (`--dagster-url`), for the page's links.
    pub dagster_url: Option<String>,
}

/// What the routes read (and the two things they may change: stop requests, dead letters).
#[derive(Clone)]
pub struct DashboardState {
    pub info: Arc<ControllerInfo>,
    pub metrics: Arc<Metrics>,
    pub steps: Arc<StepTable>,
    pub leases: Arc<LeaseTable>,
    pub admission: AdmissionView,
    pub health: Arc<Health>,
    pub queues: Arc<dyn QueueAdmin>,
    pub bridge: Arc<dyn BridgeProbe>,
    /// Bearer token of the mutating endpoints; `None`: they answer 403.
    pub admin_token: Option<Arc<str>>,
    /// Token the page and the `/api/v1` reads need (the admin token also grants them);
    /// `None`: reads are open.
    pub read_token: Option<Arc<str>>,
    /// Cancelled when draining starts: `/readyz` turns not-ready.
    pub draining: CancellationToken,
    pub queue_cache: Arc<QueueCache>,
    /// `--dagster-url`: step records link to their run in the Dagster UI.
    pub dagster_ui: Option<Arc<DagsterUi>>,
}

/// Queue depths from GetQueueAttributes, refreshed at most every `max_age` however many
/// dashboards poll, so the API never drives SQS traffic.
pub struct QueueCache {
    max_age: Duration,
    current: tokio::sync::Mutex<Option<(Instant, QueueSnapshot)>>,
}

/// The queue part of `/api/v1/summary`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct QueueSnapshot {
    pub work: Option<QueueCounts>,
    pub dlq: Option<QueueCounts>,
    /// When the counts were read.
    pub updated_at: Option<DateTime<Utc>>,
    /// The last refresh failed with this; the counts (if any) are older.
    pub error: Option<String>,
}

/// A refresh that takes longer than this is abandoned; the old counts are served.
const QUEUE_REFRESH_TIMEOUT: Duration = Duration::from_secs(3);

impl QueueCache {
    pub fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// The cached counts, refreshed first if older than `max_age`.
    pub(crate) async fn get(&self, state: &DashboardState) -> QueueSnapshot {
        // Holding the lock across the refresh makes concurrent callers share one refresh.
        let mut current = self.current.lock().await;
        if let Some((at, snapshot)) = current.as_ref() {
            if at.elapsed() < self.max_age {
                return snapshot.clone();
            }
        }
        let previous = current.as_ref().map(|(_, s)| s.clone());
        let result = tokio::time::timeout(QUEUE_REFRESH_TIMEOUT, state.queues.counts()).await;
        let snapshot = match result {
            Ok(Ok((work, dlq))) => {
                state.health.queue_contact("GetQueueAttributes", None);
                state
                    .steps
                    .history()
                    .record_queue_depth(Utc::now(), work.visible);
                for (queue, counts) in [("work", work), ("dlq", dlq)] {
                    for (name, value) in [
                        ("visible", counts.visible),
                        ("in_flight", counts.in_flight),
                        ("delayed", counts.delayed),
                    ] {
                        state
                            .metrics
                            .queue_messages
                            .get_or_create(&[("queue", queue), ("state", name)])
                            .set(i64::try_from(value).unwrap_or(i64::MAX));
                    }
                }
                QueueSnapshot {
                    work: Some(work),
                    dlq: Some(dlq),
                    updated_at: Some(Utc::now()),
                    error: None,
                }
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!(
                        "GetQueueAttributes did not answer within {QUEUE_REFRESH_TIMEOUT:?}"
                    ),
                };
                state
                    .health
                    .queue_contact("GetQueueAttributes", Some(error.clone()));
                QueueSnapshot {
                    error: Some(error),
                    ..previous.unwrap_or(QueueSnapshot {
                        work: None,
                        dlq: None,
                        updated_at: None,
                        error: None,
                    })
                }
            }
        };
        *current = Some((Instant::now(), snapshot.clone()));
        snapshot
    }
}

/// Binds the dashboard; fails clearly if the address is taken.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `stop` is cancelled. The caller bounds how long it waits after that, so an
/// idle keep-alive connection cannot hold the exit.
pub async fn serve(listener: TcpListener, state: DashboardState, stop: CancellationToken) {
    tokio::spawn(sample_history(state.clone(), stop.clone()));
    warp::serve(routes(state))
        .incoming(listener)
        .graceful(async move { stop.cancelled().await })
        .run()
        .await;
}

/// How often the history samples the queue depth and the messages held when nothing else
/// does (a dashboard or Prometheus reading the queue depth records it too): two
/// GetQueueAttributes calls (work queue and DLQ) per sample, through the cache.
const HISTORY_SAMPLE_INTERVAL: Duration = Duration::from_secs(30);

/// Keeps the history's gauges filled in minutes without transitions or readers.
async fn sample_history(state: DashboardState, stop: CancellationToken) {
    let mut tick = tokio::time::interval(HISTORY_SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        state
            .steps
            .history()
            .record_in_flight(Utc::now(), state.steps.active_count());
        state.queue_cache.get(&state).await;
    }
}

fn with_state(
    state: DashboardState,
) -> impl Filter<Extract = (DashboardState,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

fn asset(body: &'static str, content_type: &'static str) -> impl warp::Reply + 'static {
    let reply = warp::reply::with_header(body, "content-type", content_type);
    let reply = warp::reply::with_header(reply, "content-security-policy", CSP);
    let reply = warp::reply::with_header(reply, "x-content-type-options", "nosniff");
    warp::reply::with_header(reply, "cache-control", "no-cache")
}

pub(crate) fn routes(
    state: DashboardState,
) -> impl Filter<Extract = (impl warp::Reply,), Error = Infallible> + Clone {
    let page = warp::path::end()
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::header::optional::<String>("cookie"))
        .and(with_state(state.clone()))
        .map(
            |query: HashMap<String, String>,
             authorization: Option<String>,
             cookie: Option<String>,
             state: DashboardState| {
                let access = access::page_access(
                    &state,
                    query.get("token").map(String::as_str),
                    authorization.as_deref(),
                    cookie.as_deref(),
                );
                match access {
                    PageAccess::Page => {
                        asset(INDEX_HTML, "text/html; charset=utf-8").into_response()
                    }
                    PageAccess::AskForToken { wrong } => access::ask_for_token(wrong),
                    PageAccess::SetCookieAndRedirect => access::set_cookie_and_redirect(&state),
                }
            },
        );
    let css = warp::path!("static" / "dashboard.css")
        .and(warp::get())
        .map(|| asset(DASHBOARD_CSS, "text/css; charset=utf-8"));
    let js = warp::path!("static" / "dashboard.js")
        .and(warp::get())
        .map(|| asset(DASHBOARD_JS, "text/javascript; charset=utf-8"));
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .and(with_state(state.clone()))
        .map(|state: DashboardState| {
            let loops = state.health.loops();
            let healthy = loops.iter().all(|l| l.status != "stale");
            let body = serde_json::json!({
                "status": if healthy { "ok" } else { "unhealthy" },
                "loops": loops,
            });
            warp::reply::with_status(
                warp::reply::json(&body),
                if healthy {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                },
            )
        });
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(readiness);
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(|state: DashboardState| async move {
            // Refresh the queue depth gauges (cached; at most one SQS call per max age).
            state.queue_cache.get(&state).await;
            warp::reply::with_header(
                state.metrics.render(),
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        });
    page.or(css)
        .or(js)
        .or(healthz)
        .or(readyz)
        .or(metrics)
        .or(api::routes(state))
        .recover(api::handle_rejection)
}

/// Why this replica is not ready (empty: ready); `/readyz` and the `ready` metric.
pub fn not_ready_reasons(
    draining: bool,
    health: &Health,
    bridge_running: bool,
) -> Vec<&'static str> {
    let sqs_ok = health.last_queue_contact().is_some_and(|c| c.ok);
    [
        (draining, "draining"),
        (!sqs_ok, "sqs_unreachable"),
        (!bridge_running, "bridge_restarting"),
        (!health.dagster_outages().is_empty(), "dagster_unreachable"),
    ]
    .into_iter()
    .filter_map(|(failing, reason)| failing.then_some(reason))
    .collect()
}

/// Ready when SQS answered the last call, the bridge sidecar runs, every Dagster instance in
/// use answers and the controller is not draining; `reasons` says what is missing.
async fn readiness(state: DashboardState) -> impl warp::Reply {
    let draining = state.draining.is_cancelled();
    let sqs = state.health.last_queue_contact();
    let bridge = state.bridge.status();
    let dagster = state.health.dagster_outages();
    let reasons = not_ready_reasons(draining, &state.health, bridge.is_running());
    let ready = reasons.is_empty();
    let status = if draining {
        "draining"
    } else if ready {
        "ready"
    } else {
        "not_ready"
    };
    let body = serde_json::json!({
        "status": status,
        "reasons": reasons,
        "checks": {
            "draining": draining,
            "sqs": sqs,
            "bridge_alive": bridge.is_running(),
            "bridge": bridge,
            "dagster_unreachable": dagster,
        },
    });
    warp::reply::with_status(
        warp::reply::json(&body),
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
    )
}

/// Shortest admin token accepted: the API can stop steps and move messages.
const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// The dashboard's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DashboardArgs {
    /// Address of the dashboard, API, metrics and probes.
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_DASHBOARD_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub dashboard_addr: SocketAddr,

    /// Bearer token for the API's mutating endpoints (cancel, DLQ redrive); without one they
    /// are disabled. At least 16 characters.
    #[arg(long, env = "DAGSTER_TASKIQ_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// File holding the admin token (a mounted secret; one trailing newline is ignored),
    /// instead of --admin-token: keeps the token out of the controller's environment.
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_ADMIN_TOKEN_FILE",
        value_name = "PATH",
        conflicts_with = "admin_token"
    )]
    pub admin_token_file: Option<PathBuf>,

    /// Bearer token for reading: with it set, the dashboard page and every `/api/v1` GET need
    /// it (or the admin token); probes and `/metrics` stay open. At least 16 characters.
    #[arg(
        long,
        env = "DAGSTER_TASKIQ_READ_TOKEN",
        hide_env_values = true,
        conflicts_with = "read_token_file"
    )]
    pub read_token: Option<String>,

    /// File holding the read token (a mounted secret); one trailing newline is ignored.
    #[arg(long, env = "DAGSTER_TASKIQ_READ_TOKEN_FILE", value_name = "PATH")]
    pub read_token_file: Option<PathBuf>,

    /// Base URL of the Dagster webserver (http or https, e.g. `https://dagster.example.com`):
    /// the dashboard links run ids and step keys to their run page there.
    #[arg(long, env = "DAGSTER_TASKIQ_DAGSTER_URL", value_name = "URL")]
    pub dagster_url: Option<String>,
}

impl DashboardArgs {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.admin_token()?;
        self.read_token()?;
        self.dagster_ui()?;
        Ok(())
    }

    /// The Dagster UI of `--dagster-url`, checked; `None`: no links into Dagster.
    pub fn dagster_ui(&self) -> Result<Option<DagsterUi>, ConfigError> {
        self.dagster_url
            .as_deref()
            .map(|url| DagsterUi::parse(url).map_err(|e| invalid("dagster-url", e)))
            .transpose()
    }

    /// The admin token, from `--admin-token` or `--admin-token-file`; `None`: the mutating
    /// API is disabled.
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        token_from(
            ("admin-token", self.admin_token.as_deref()),
            ("admin-token-file", self.admin_token_file.as_deref()),
        )
    }

    /// The read token, from `--read-token` or `--read-token-file`; `None`: reads are open.
    pub fn read_token(&self) -> Result<Option<String>, ConfigError> {
        token_from(
            ("read-token", self.read_token.as_deref()),
            ("read-token-file", self.read_token_file.as_deref()),
        )
    }
}

/// A token given inline or in a file, checked: the inline value wins (clap refuses both).
fn token_from(
    inline: (&'static str, Option<&str>),
    file: (&'static str, Option<&std::path::Path>),
) -> Result<Option<String>, ConfigError> {
    let (flag, token) = match (inline, file) {
        ((flag, Some(token)), _) => (flag, token.to_owned()),
        (_, (flag, Some(path))) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid(flag, format!("cannot read {}: {e}", path.display())))?;
            // Secrets written by `echo` or an editor end with a newline.
            let text = text.strip_suffix('\n').unwrap_or(&text);
            (flag, text.strip_suffix('\r').unwrap_or(text).to_owned())
        }
        _ => return Ok(None),
    };
    check_token(flag, &token)?;
    Ok(Some(token))
}

/// The rule every bearer token follows: long enough to resist guessing, no whitespace.
fn check_token(flag: &'static str, token: &str) -> Result<(), ConfigError> {
    if token.chars().count() < MIN_ADMIN_TOKEN_LEN || token.chars().any(char::is_whitespace) {
        return Err(invalid(
            flag,
            format!("must be at least {MIN_ADMIN_TOKEN_LEN} characters without spaces"),
        ));
    }
    Ok(())
}

/// True when the dashboard would serve step stderr tails to anyone who can reach `addr`:
/// a non-loopback address without a read token.
pub fn read_api_exposed(addr: SocketAddr, read_token: bool) -> bool {
    !read_token && !addr.ip().is_loopback()
}

#[cfg(test)]
mod tests;
