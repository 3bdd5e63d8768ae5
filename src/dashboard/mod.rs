//! The operator HTTP surface (warp): health probes, Prometheus metrics and the JSON API.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::Filter;

use crate::metrics::Metrics;
use crate::state::StepTable;

/// What the routes read.
#[derive(Clone)]
pub struct DashboardState {
    pub metrics: Arc<Metrics>,
    pub steps: Arc<StepTable>,
    /// Cancelled when draining starts: `/readyz` turns not-ready.
    pub draining: CancellationToken,
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

/// Binds the dashboard; fails clearly if the address is taken.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: DashboardState, stop: CancellationToken) {
    warp::serve(routes(state))
        .incoming(listener)
        .graceful(async move { stop.cancelled().await })
        .run()
        .await;
}

fn with_state(
    state: DashboardState,
) -> impl Filter<Extract = (DashboardState,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

pub fn routes(
    state: DashboardState,
) -> impl Filter<Extract = (impl warp::Reply,), Error = Infallible> + Clone {
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&serde_json::json!({"status": "ok"})));
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_state(state.clone()))
        .map(|state: DashboardState| {
            if state.draining.is_cancelled() {
                warp::reply::with_status(
                    warp::reply::json(&serde_json::json!({"status": "draining"})),
                    StatusCode::SERVICE_UNAVAILABLE,
                )
            } else {
                warp::reply::with_status(
                    warp::reply::json(&serde_json::json!({"status": "ready"})),
                    StatusCode::OK,
                )
            }
        });
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_state(state.clone()))
        .map(|state: DashboardState| {
            warp::reply::with_header(
                state.metrics.render(),
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        });
    let steps = warp::path!("api" / "v1" / "steps")
        .and(warp::get())
        .and(with_state(state.clone()))
        .map(|state: DashboardState| warp::reply::json(&state.steps.snapshot()));
    let step = warp::path!("api" / "v1" / "steps" / String)
        .and(warp::get())
        .and(with_state(state))
        .map(
            |task_id: String, state: DashboardState| match state.steps.get(&task_id) {
                Some(record) => {
                    warp::reply::with_status(warp::reply::json(&record), StatusCode::OK)
                }
                None => warp::reply::with_status(
                    warp::reply::json(&ErrorBody {
                        error: format!("no step attempt with task_id {task_id:?} is known here"),
                    }),
                    StatusCode::NOT_FOUND,
                ),
            },
        );
    healthz
        .or(readyz)
        .or(metrics)
        .or(steps)
        .or(step)
        .recover(handle_rejection)
}

async fn handle_rejection(rejection: warp::Rejection) -> Result<impl warp::Reply, Infallible> {
    let (status, message) = if rejection.is_not_found() {
        (StatusCode::NOT_FOUND, "not found".to_owned())
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed".to_owned(),
        )
    } else {
        (StatusCode::BAD_REQUEST, format!("{rejection:?}"))
    };
    Ok(warp::reply::with_status(
        warp::reply::json(&ErrorBody { error: message }),
        status,
    ))
}
