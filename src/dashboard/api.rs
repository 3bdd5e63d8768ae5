//! The JSON API under `/api/v1`: step records, the summary the dashboard polls, and the two
//! admin actions (cancel a step, redrive dead letters) behind the bearer token.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Buf, Filter, Rejection, Reply};

use super::access::{bearer, require_read};
use super::{with_state, DashboardState};
use crate::admission::AdmissionState;
use crate::queue::RedriveFilter;
use crate::state::{StepRecord, StepState, StopReason};

/// Largest request body accepted (the admin endpoints take small JSON objects).
const MAX_BODY: usize = 64 * 1024;
/// Most dead letters one redrive request may move.
const MAX_REDRIVE: usize = 1000;
/// Window of the rates in the summary.
const RATE_WINDOW_SECS: i64 = 60;

/// Why an API request failed; every variant answers `{"error": message}`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("request body larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("disabled: start the controller with --admin-token or --admin-token-file to enable admin endpoints")]
    Disabled,
    #[error("missing or wrong bearer token (Authorization: Bearer <admin token>)")]
    Unauthorized,
    #[error("this controller needs its read token (--read-token): send Authorization: Bearer <read token> (the admin token works too)")]
    ReadUnauthorized,
    #[error("{0}")]
    Conflict(String),
    /// SQS failed while serving the request.
    #[error("{0}")]
    Upstream(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Disabled => StatusCode::FORBIDDEN,
            ApiError::Unauthorized | ApiError::ReadUnauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let mut response = warp::reply::with_status(
            warp::reply::json(&ErrorBody { error: &message }),
            self.status(),
        )
        .into_response();
        if matches!(self, ApiError::Unauthorized | ApiError::ReadUnauthorized) {
            response.headers_mut().insert(
                "www-authenticate",
                warp::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl warp::reject::Reject for ApiError {}

fn json_reply<T: Serialize>(value: &T, status: StatusCode) -> Response {
    let reply = warp::reply::with_status(warp::reply::json(value), status);
    warp::reply::with_header(reply, "cache-control", "no-store").into_response()
}

fn respond<T: Serialize>(result: Result<(StatusCode, T), ApiError>) -> Response {
    match result {
        Ok((status, value)) => json_reply(&value, status),
        Err(e) => e.into_response(),
    }
}

/// The request body, at most [`MAX_BODY`] bytes, with or without a Content-Length.
fn limited_body() -> impl Filter<Extract = (Vec<u8>,), Error = Rejection> + Clone {
    warp::body::stream().and_then(collect_body)
}

async fn collect_body<S, B>(stream: S) -> Result<Vec<u8>, Rejection>
where
    S: futures::Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut stream = Box::pin(stream);
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk =
            chunk.map_err(|e| warp::reject::custom(ApiError::BadRequest(e.to_string())))?;
        if body.len() + chunk.remaining() > MAX_BODY {
            return Err(warp::reject::custom(ApiError::TooLarge));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            body.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(body)
}

pub(super) fn routes(
    state: DashboardState,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let list = warp::path!("api" / "v1" / "steps")
        .and(warp::get())
        .and(require_read(state.clone()))
        .and(warp::query::<HashMap<String, String>>())
        .and(with_state(state.clone()))
        .map(|query: HashMap<String, String>, state: DashboardState| {
            respond(list_steps(&state, &query).map(|v| (StatusCode::OK, v)))
        });
    let one = warp::path!("api" / "v1" / "steps" / String)
        .and(warp::get())
        .and(require_read(state.clone()))
        .and(with_state(state.clone()))
        .map(|task_id: String, state: DashboardState| {
            respond(get_step(&state, &task_id).map(|v| (StatusCode::OK, v)))
        });
    let history = warp::path!("api" / "v1" / "history")
        .and(warp::get())
        .and(require_read(state.clone()))
        .and(with_state(state.clone()))
        .map(|state: DashboardState| {
            json_reply(&state.steps.history().view(Utc::now()), StatusCode::OK)
        });
    let summary =
        warp::path!("api" / "v1" / "summary")
            .and(warp::get())
            .and(require_read(state.clone()))
            .and(with_state(state.clone()))
            .then(|state: DashboardState| async move {
                json_reply(&summary(&state).await, StatusCode::OK)
            });
    let cancel = warp::path!("api" / "v1" / "steps" / String / "cancel")
        .and(warp::post())
        .and(warp::header::optional::<String>("authorization"))
        .and(limited_body())
        .and(with_state(state.clone()))
        .map(
            |task_id: String, auth: Option<String>, body: Vec<u8>, state: DashboardState| {
                respond(
                    authorize(&state, auth.as_deref())
                        .and_then(|()| cancel_step(&state, &task_id, &body)),
                )
            },
        );
    let redrive = warp::path!("api" / "v1" / "dlq" / "redrive")
        .and(warp::post())
        .and(warp::header::optional::<String>("authorization"))
        .and(limited_body())
        .and(with_state(state))
        .then(
            |auth: Option<String>, body: Vec<u8>, state: DashboardState| async move {
                let result = match authorize(&state, auth.as_deref()) {
                    Ok(()) => redrive(&state, &body).await,
                    Err(e) => Err(e),
                };
                respond(result)
            },
        );
    list.or(one)
        .unify()
        .or(history)
        .unify()
        .or(summary)
        .unify()
        .or(cancel)
        .unify()
        .or(redrive)
        .unify()
}

/// Checks the bearer token: 403 when none is configured, 401 when missing or wrong.
fn authorize(state: &DashboardState, header: Option<&str>) -> Result<(), ApiError> {
    let Some(expected) = &state.admin_token else {
        return Err(ApiError::Disabled);
    };
    match bearer(header) {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

/// Compares without an early exit, so the time taken does not reveal how much matched.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// A step record as the API shows it: the record plus what lives elsewhere.
#[derive(Serialize)]
struct StepView {
    #[serde(flatten)]
    record: StepRecord,
    /// When the message becomes visible again unless extended (held messages only).
    lease_deadline: Option<DateTime<Utc>>,
    received_at: Option<DateTime<Utc>>,
    updated_at: Option<DateTime<Utc>>,
    /// Received → now (active) or → settled (finished).
    age_seconds: f64,
    active: bool,
}

fn view(state: &DashboardState, mut record: StepRecord) -> StepView {
    if let Some(ui) = &state.dagster_ui {
        let ecs = std::mem::take(&mut record.links);
        record.links = ui.links(&record.run_id, &record.step_key).into();
        record.links.extend(ecs);
    }
    let received_at = record.history.first().map(|(_, at)| *at);
    let updated_at = record.history.last().map(|(_, at)| *at);
    let active = !record.state.is_final();
    let end = if active { Some(Utc::now()) } else { updated_at };
    let age_seconds = match (received_at, end) {
        (Some(start), Some(end)) => (end - start).num_milliseconds().max(0) as f64 / 1000.0,
        _ => 0.0,
    };
    StepView {
        lease_deadline: if active {
            state.leases.deadline(&record.task_id)
        } else {
            None
        },
        record,
        received_at,
        updated_at,
        age_seconds,
        active,
    }
}

/// Records `/api/v1/steps` lists without a `limit`, and the largest `limit` it takes: the
/// table keeps every active attempt and 1000 finished ones, each with its stderr tail.
const DEFAULT_STEPS_LIMIT: usize = 500;
const MAX_STEPS_LIMIT: usize = 5000;

fn list_steps(
    state: &DashboardState,
    query: &HashMap<String, String>,
) -> Result<Vec<StepView>, ApiError> {
    const KNOWN: [&str; 4] = ["run", "state", "launcher", "limit"];
    if let Some(unknown) = query.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::BadRequest(format!(
            "unknown query parameter {unknown:?} (known: {})",
            KNOWN.join(", ")
        )));
    }
    let wanted_state = match query.get("state") {
        Some(name) => Some(StepState::parse(name).ok_or_else(|| {
            let names: Vec<&str> = StepState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::BadRequest(format!(
                "unknown state {name:?} (one of: {})",
                names.join(", ")
            ))
        })?),
        None => None,
    };
    let limit = match query.get("limit") {
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if limit <= MAX_STEPS_LIMIT => limit,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "limit {:?} is not an integer from 0 to {MAX_STEPS_LIMIT}",
                    crate::envelope::excerpt(text)
                )))
            }
        },
        None => DEFAULT_STEPS_LIMIT,
    };
    let run = query.get("run");
    let launcher = query.get("launcher");
    let mut records = state.steps.snapshot();
    // Active records first (oldest first), then finished ones (newest first).
    let split = records.iter().take_while(|r| !r.state.is_final()).count();
    records[..split].sort_by_key(|r| r.history.first().map(|(_, at)| *at));
    Ok(records
        .into_iter()
        .filter(|r| run.is_none_or(|run| &r.run_id == run))
        .filter(|r| wanted_state.is_none_or(|s| r.state == s))
        .filter(|r| launcher.is_none_or(|l| r.launcher.as_ref() == Some(l)))
        .take(limit)
        .map(|r| view(state, r))
        .collect())
}

fn get_step(state: &DashboardState, task_id: &str) -> Result<StepView, ApiError> {
    state
        .steps
        .get(task_id)
        .map(|record| view(state, record))
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no step attempt with task_id {task_id:?} is known here"
            ))
        })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelRequest {
    reason: Option<String>,
}

#[derive(Serialize)]
struct CancelResponse {
    task_id: String,
    status: &'static str,
    reason: String,
}

/// Parses an optional JSON object body: empty means the defaults.
fn parse_body<T: Default + serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "request body is not valid JSON for this endpoint: {e}"
        ))
    })
}

fn cancel_step(
    state: &DashboardState,
    task_id: &str,
    body: &[u8],
) -> Result<(StatusCode, CancelResponse), ApiError> {
    let request: CancelRequest = parse_body(body)?;
    let reason = request
        .reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "canceled from the dashboard API".to_owned());
    // Bound what goes into Dagster's event log.
    let reason: String = reason.chars().take(500).collect();
    let Some(record) = state.steps.get(task_id) else {
        return Err(ApiError::NotFound(format!(
            "no step attempt with task_id {task_id:?} is known here"
        )));
    };
    if record.state.is_final() {
        return Err(ApiError::Conflict(format!(
            "step attempt {task_id} already ended here ({})",
            record.state.as_str()
        )));
    }
    if !state.steps.request_stop(
        task_id,
        StopReason::Operator {
            reason: reason.clone(),
        },
    ) {
        return Err(ApiError::Conflict(format!(
            "step attempt {task_id} is already stopping or has just ended"
        )));
    }
    tracing::warn!(task_id, run_id = %record.run_id, step_key = %record.step_key, reason, "operator asked to stop the step");
    Ok((
        StatusCode::ACCEPTED,
        CancelResponse {
            task_id: task_id.to_owned(),
            status: "stopping",
            reason,
        },
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveRequest {
    #[serde(default = "default_redrive_max")]
    max: usize,
    #[serde(default)]
    filter: RedriveFilter,
}

impl Default for RedriveRequest {
    fn default() -> Self {
        Self {
            max: default_redrive_max(),
            filter: RedriveFilter::default(),
        }
    }
}

fn default_redrive_max() -> usize {
    10
}

async fn redrive(
    state: &DashboardState,
    body: &[u8],
) -> Result<(StatusCode, crate::queue::RedriveReport), ApiError> {
    let request: RedriveRequest = parse_body(body)?;
    if request.max == 0 || request.max > MAX_REDRIVE {
        return Err(ApiError::BadRequest(format!(
            "max must be from 1 to {MAX_REDRIVE}"
        )));
    }
    tracing::warn!(max = request.max, filter = ?request.filter, "operator redrive of dead letters");
    match state.queues.redrive(request.max, &request.filter).await {
        Ok(report) => {
            tracing::info!(
                moved = report.moved,
                examined = report.examined,
                "redrive done"
            );
            Ok((StatusCode::OK, report))
        }
        Err(e) => {
            tracing::error!(%e, "redrive failed");
            Err(ApiError::Upstream(e.to_string()))
        }
    }
}

#[derive(Serialize)]
struct Summary {
    controller: super::ControllerInfo,
    uptime_seconds: i64,
    draining: bool,
    steps: StepCounts,
    rates: Rates,
    queue: super::QueueSnapshot,
    admission: AdmissionSummary,
}

#[derive(Serialize)]
struct StepCounts {
    /// Messages held now.
    active: usize,
    /// Known attempts (active and recent) by current state.
    by_state: BTreeMap<&'static str, usize>,
    /// Recent settled attempts by outcome.
    outcomes: BTreeMap<String, usize>,
}

#[derive(Serialize)]
struct Rates {
    window_seconds: i64,
    received_per_minute: f64,
    launched_per_minute: f64,
    settled_per_minute: f64,
}

#[derive(Serialize)]
struct AdmissionSummary {
    /// `in_use` counts permits, including those the intake reserved for a receive in progress.
    #[serde(flatten)]
    state: AdmissionState,
    /// Messages actually held (received and not yet settled).
    held: usize,
    /// Admitted steps waiting for the launch rate limit.
    waiting_for_launch: usize,
    /// Launches in the last second (compare with the rate).
    launched_last_second: usize,
}

async fn summary(state: &DashboardState) -> Summary {
    let records = state.steps.snapshot();
    let now = Utc::now();
    let window_start = now - chrono::Duration::seconds(RATE_WINDOW_SECS);
    let second_ago = now - chrono::Duration::seconds(1);
    let mut by_state = BTreeMap::new();
    let mut outcomes = BTreeMap::new();
    let (mut received, mut launched, mut settled, mut launched_last_second) = (0, 0, 0, 0);
    let mut active = 0;
    let mut waiting_for_launch = 0;
    for record in &records {
        *by_state.entry(record.state.as_str()).or_insert(0) += 1;
        if record.state.is_final() {
            if let Some(outcome) = &record.outcome {
                *outcomes.entry((*outcome).to_owned()).or_insert(0) += 1;
            }
            if record
                .history
                .last()
                .is_some_and(|(_, at)| *at >= window_start)
            {
                settled += 1;
            }
        } else {
            active += 1;
        }
        if record.state == StepState::Admitted {
            waiting_for_launch += 1;
        }
        for (step_state, at) in &record.history {
            match step_state {
                StepState::Received if *at >= window_start => received += 1,
                StepState::Running if *at >= window_start => {
                    launched += 1;
                    if *at >= second_ago {
                        launched_last_second += 1;
                    }
                }
                _ => {}
            }
        }
    }
    let per_minute = |n: usize| n as f64 * 60.0 / RATE_WINDOW_SECS as f64;
    Summary {
        controller: (*state.info).clone(),
        uptime_seconds: (now - state.info.started_at).num_seconds(),
        draining: state.draining.is_cancelled(),
        steps: StepCounts {
            active,
            by_state,
            outcomes,
        },
        rates: Rates {
            window_seconds: RATE_WINDOW_SECS,
            received_per_minute: per_minute(received),
            launched_per_minute: per_minute(launched),
            settled_per_minute: per_minute(settled),
        },
        queue: state.queue_cache.get(state).await,
        admission: AdmissionSummary {
            state: state.admission.state(),
            held: active,
            waiting_for_launch,
            launched_last_second,
        },
    }
}

/// Turns every rejection into a JSON error with a fitting status.
pub(super) async fn handle_rejection(rejection: Rejection) -> Result<Response, Infallible> {
    if let Some(e) = rejection.find::<ApiError>() {
        let error = match e {
            ApiError::TooLarge => ApiError::TooLarge,
            ApiError::ReadUnauthorized => ApiError::ReadUnauthorized,
            other => ApiError::BadRequest(other.to_string()),
        };
        return Ok(error.into_response());
    }
    let (status, message) = if rejection.is_not_found() {
        (StatusCode::NOT_FOUND, "not found".to_owned())
    } else if let Some(e) = rejection.find::<warp::reject::InvalidQuery>() {
        (
            StatusCode::BAD_REQUEST,
            format!("invalid query string: {e}"),
        )
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed".to_owned(),
        )
    } else if let Some(e) = rejection.find::<warp::reject::InvalidHeader>() {
        (StatusCode::BAD_REQUEST, e.to_string())
    } else {
        (
            StatusCode::BAD_REQUEST,
            format!("bad request: {rejection:?}"),
        )
    };
    Ok(json_reply(&ErrorBody { error: &message }, status))
}
