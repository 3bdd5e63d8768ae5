//! Route tests with `warp::test`: auth, filters, error bodies, probes.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde_json::Value;

use async_trait::async_trait;

use super::*;
use crate::admission::{Admission, AdmissionConfig};
use crate::dagster::{RestartCause, SidecarState};
use crate::envelope;
use crate::fakes::step_body;
use crate::health::OutageCause;
use crate::queue::{QueueError, RedriveError, RedriveFilter, RedriveReport};
use crate::state::{StepState, StopReason};

const TOKEN: &str = "test-token-0123456789";
const READ_TOKEN: &str = "read-token-0123456789;,x";

#[derive(Default)]
struct FakeQueues {
    fail: AtomicBool,
    counts_calls: AtomicUsize,
    redrives: Mutex<Vec<(usize, RedriveFilter)>>,
}

#[async_trait]
impl QueueAdmin for FakeQueues {
    async fn counts(&self) -> Result<(QueueCounts, QueueCounts), QueueError> {
        self.counts_calls.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(QueueError::Unavailable {
                operation: "GetQueueAttributes",
                message: "connection refused".into(),
            });
        }
        Ok((
            QueueCounts {
                visible: 4,
                in_flight: 2,
                delayed: 0,
            },
            QueueCounts {
                visible: 1,
                in_flight: 0,
                delayed: 0,
            },
        ))
    }

    async fn redrive(
        &self,
        max: usize,
        filter: &RedriveFilter,
    ) -> Result<RedriveReport, RedriveError> {
        self.redrives.lock().push((max, filter.clone()));
        Ok(RedriveReport {
            moved: 1,
            examined: 1,
            message_ids: vec!["m-1".into()],
        })
    }
}

struct FakeBridge(Mutex<SidecarStatus>);

impl FakeBridge {
    fn set(&self, state: SidecarState, cause: RestartCause) {
        *self.0.lock() = SidecarStatus {
            state,
            cause,
            pid: Some(42),
        };
    }
}

impl BridgeProbe for FakeBridge {
    fn status(&self) -> SidecarStatus {
        *self.0.lock()
    }
}

struct Bed {
    state: DashboardState,
    queues: Arc<FakeQueues>,
    bridge: Arc<FakeBridge>,
}

fn bed(token: Option<&str>) -> Bed {
    bed_with(token, None)
}

/// A bed with an admin token and a read token.
fn bed_with(token: Option<&str>, read_token: Option<&str>) -> Bed {
    let metrics = Arc::new(Metrics::new());
    let queues = Arc::new(FakeQueues::default());
    let bridge = Arc::new(FakeBridge(Mutex::new(SidecarStatus {
        state: SidecarState::Running,
        cause: RestartCause::Start,
        pid: Some(42),
    })));
    let admission = Admission::new(AdmissionConfig {
        launch_rate: std::num::NonZeroU32::new(2),
        ..AdmissionConfig::capped(4)
    });
    let health = Arc::new(Health::new(Duration::from_secs(1), Duration::from_secs(1)));
    health.queue_contact("GetQueueAttributes", None);
    let state = DashboardState {
        info: Arc::new(ControllerInfo {
            controller_id: "test-1".into(),
            version: "0.0.0",
            queue_url: "http://q/work".into(),
            dlq_url: "http://q/dlq".into(),
            started_at: Utc::now(),
            dagster_url: None,
        }),
        metrics: metrics.clone(),
        steps: Arc::new(StepTable::default()),
        leases: Arc::new(LeaseTable::new(
            Duration::from_secs(30),
            Duration::from_secs(43200),
            metrics,
        )),
        admission: admission.view(),
        health,
        queues: queues.clone(),
        bridge: bridge.clone(),
        admin_token: token.map(Arc::from),
        read_token: read_token.map(Arc::from),
        draining: CancellationToken::new(),
        queue_cache: Arc::new(QueueCache::new(Duration::from_secs(60))),
        dagster_ui: None,
    };
    Bed {
        state,
        queues,
        bridge,
    }
}

impl Bed {
    /// Claims a step attempt; `n` makes the task id.
    fn claim(&self, n: u32, run: &str, step: &str) -> String {
        let task_id = format!("{n:032x}");
        let request = envelope::decode(&step_body(&task_id, run, step, 0)).expect("valid body");
        assert!(self.state.steps.claim(&request, &format!("msg-{n}"), 1));
        task_id
    }

    async fn call(&self, method: &str, path: &str) -> (StatusCode, Value) {
        self.call_with(method, path, None, "").await
    }

    async fn call_with(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (StatusCode, Value) {
        let mut request = warp::test::request().method(method).path(path).body(body);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = request.reply(&routes(self.state.clone())).await;
        let status = response.status();
        let body = serde_json::from_slice(response.body()).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(response.body())
            )
        });
        (status, body)
    }
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let bed = bed(None);
    let (status, body) = bed.call("GET", "/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not found");
    let (status, body) = bed.call("GET", "/api/v1/steps/ffff").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].as_str().unwrap().contains("ffff"), "{body}");
    let (status, body) = bed.call("DELETE", "/api/v1/steps").await;
    assert!(status.is_client_error(), "{status}");
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn steps_are_listed_with_filters() {
    let bed = bed(None);
    let a = bed.claim(1, "run-a", "emit");
    let b = bed.claim(2, "run-a", "join");
    bed.claim(3, "run-b", "emit");
    bed.state.steps.transition(&b, StepState::Running);
    bed.state
        .steps
        .update(&a, |r| r.launcher = Some("ecs".into()));

    let (status, body) = bed.call("GET", "/api/v1/steps").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_array().unwrap().len(), 3);

    let (_, body) = bed.call("GET", "/api/v1/steps?run=run-a").await;
    let keys: Vec<&str> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["step_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["emit", "join"]);

    let (_, body) = bed.call("GET", "/api/v1/steps?state=running").await;
    assert_eq!(body.as_array().unwrap().len(), 1);
    assert_eq!(body[0]["task_id"], b.as_str());
    assert_eq!(body[0]["history"][1]["state"], "running");
    assert!(body[0]["history"][1]["at"].is_string());

    let (_, body) = bed
        .call("GET", "/api/v1/steps?launcher=ecs&run=run-a")
        .await;
    assert_eq!(body.as_array().unwrap().len(), 1);
    assert_eq!(body[0]["task_id"], a.as_str());

    let (_, body) = bed.call("GET", "/api/v1/steps?limit=1").await;
    assert_eq!(body.as_array().unwrap().len(), 1);

    let (status, body) = bed.call("GET", "/api/v1/steps?state=bogus").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("dead_lettered"));
    let (status, _) = bed.call("GET", "/api/v1/steps?colour=red").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = bed.call("GET", "/api/v1/steps?limit=-1").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_step_list_has_a_default_limit_and_a_maximum() {
    let bed = bed(None);
    for n in 0..520 {
        bed.claim(n, "run-a", "emit");
    }
    let (status, body) = bed.call("GET", "/api/v1/steps").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_array().unwrap().len(), 500, "the default limit");
    let (_, body) = bed.call("GET", "/api/v1/steps?limit=5000").await;
    assert_eq!(body.as_array().unwrap().len(), 520);
    let (status, body) = bed.call("GET", "/api/v1/steps?limit=5001").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("from 0 to 5000"),
        "{body}"
    );
}

#[tokio::test]
async fn one_step_shows_its_lease_deadline_and_history() {
    let bed = bed(None);
    let task_id = bed.claim(7, "run-a", "emit");
    bed.state.leases.hold(&task_id, "handle-7");
    bed.state.steps.update(&task_id, |r| {
        r.stderr_tail = vec!["<script>alert(1)</script>".into()];
    });
    let (status, body) = bed.call("GET", &format!("/api/v1/steps/{task_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["state"], "received");
    assert_eq!(body["active"], true);
    assert_eq!(body["receive_count"], 1);
    assert!(body["lease_deadline"].is_string(), "{body}");
    assert_eq!(body["stderr_tail"][0], "<script>alert(1)</script>");
    assert!(body.get("instance_ref").is_none());
}

#[tokio::test]
async fn admin_endpoints_are_disabled_without_a_token() {
    let bed = bed(None);
    let task_id = bed.claim(1, "run-a", "emit");
    let (status, body) = bed
        .call_with(
            "POST",
            &format!("/api/v1/steps/{task_id}/cancel"),
            Some(TOKEN),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["error"].as_str().unwrap().starts_with("disabled"));
    let (status, _) = bed.call("POST", "/api/v1/dlq/redrive").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(bed.state.steps.stop_reason(&task_id).is_none());
}

#[tokio::test]
async fn admin_endpoints_need_the_right_bearer_token() {
    let bed = bed(Some(TOKEN));
    let task_id = bed.claim(1, "run-a", "emit");
    let path = format!("/api/v1/steps/{task_id}/cancel");
    let (status, _) = bed.call("POST", &path).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = bed
        .call_with("POST", &path, Some("test-token-0123456780"), "")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].as_str().unwrap().contains("bearer"));
    let response = warp::test::request()
        .method("POST")
        .path(&path)
        .header("authorization", format!("Basic {TOKEN}"))
        .reply(&routes(bed.state.clone()))
        .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert!(bed.state.steps.stop_reason(&task_id).is_none());

    let (status, body) = bed
        .call_with("POST", &path, Some(TOKEN), r#"{"reason": "stuck"}"#)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "stopping");
    assert_eq!(
        bed.state.steps.stop_reason(&task_id),
        Some(StopReason::Operator {
            reason: "stuck".into()
        })
    );
    // Asking twice is a conflict; an unknown step is a 404.
    let (status, _) = bed.call_with("POST", &path, Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = bed
        .call_with("POST", "/api/v1/steps/abc/cancel", Some(TOKEN), "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_json_bodies_are_rejected_with_400() {
    let bed = bed(Some(TOKEN));
    let task_id = bed.claim(1, "run-a", "emit");
    for body in [
        "{not json",
        r#"{"reason": 5}"#,
        r#"{"colour": "red"}"#,
        "[]",
    ] {
        let (status, reply) = bed
            .call_with(
                "POST",
                &format!("/api/v1/steps/{task_id}/cancel"),
                Some(TOKEN),
                body,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {reply}");
        assert!(reply["error"].as_str().unwrap().contains("JSON"));
    }
    let (status, _) = bed
        .call_with("POST", "/api/v1/dlq/redrive", Some(TOKEN), r#"{"max": 0}"#)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = bed
        .call_with("POST", "/api/v1/dlq/redrive", Some(TOKEN), "{\"max\":")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let big = format!(r#"{{"reason": "{}"}}"#, "x".repeat(70_000));
    let (status, _) = bed
        .call_with(
            "POST",
            &format!("/api/v1/steps/{task_id}/cancel"),
            Some(TOKEN),
            &big,
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(bed.state.steps.stop_reason(&task_id).is_none());
}

#[tokio::test]
async fn redrive_passes_max_and_filter_to_the_queue() {
    let bed = bed(Some(TOKEN));
    let (status, body) = bed
        .call_with(
            "POST",
            "/api/v1/dlq/redrive",
            Some(TOKEN),
            r#"{"max": 5, "filter": {"reason": "invalid_json"}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["moved"], 1);
    let (status, _) = bed
        .call_with("POST", "/api/v1/dlq/redrive", Some(TOKEN), "")
        .await;
    assert_eq!(status, StatusCode::OK);
    let calls = bed.queues.redrives.lock().clone();
    assert_eq!(calls[0].0, 5);
    assert_eq!(calls[0].1.reason.as_deref(), Some("invalid_json"));
    assert_eq!(calls[1], (10, RedriveFilter::default()));
}

#[tokio::test]
async fn summary_counts_states_and_caches_queue_depths() {
    let bed = bed(None);
    let a = bed.claim(1, "run-a", "emit");
    bed.claim(2, "run-a", "join");
    bed.state.steps.transition(&a, StepState::Running);
    bed.state
        .steps
        .update(&a, |r| r.outcome = Some("succeeded"));
    bed.state.steps.transition(&a, StepState::Acked);
    let (status, body) = bed.call("GET", "/api/v1/summary").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["steps"]["active"], 1);
    assert_eq!(body["steps"]["by_state"]["acked"], 1);
    assert_eq!(body["steps"]["outcomes"]["succeeded"], 1);
    assert_eq!(body["queue"]["work"]["visible"], 4);
    assert_eq!(body["queue"]["dlq"]["visible"], 1);
    assert_eq!(body["admission"]["max_concurrent"], 4);
    assert_eq!(body["admission"]["held"], 1);
    assert_eq!(body["admission"]["launch_rate"], 2);
    assert_eq!(body["controller"]["controller_id"], "test-1");
    assert_eq!(body["rates"]["received_per_minute"], 2.0);
    assert_eq!(body["rates"]["launched_per_minute"], 1.0);
    assert_eq!(body["rates"]["settled_per_minute"], 1.0);
    // Within the cache age a second summary and a scrape read no attributes.
    bed.call("GET", "/api/v1/summary").await;
    let metrics = warp::test::request()
        .path("/metrics")
        .reply(&routes(bed.state.clone()))
        .await;
    let text = String::from_utf8_lossy(metrics.body()).to_string();
    assert!(text.contains("dagster_taskiq_queue_messages{queue=\"work\",state=\"visible\"} 4"));
    assert_eq!(bed.queues.counts_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn readiness_follows_sqs_the_bridge_dagster_and_draining() {
    let bed = bed(None);
    let (status, body) = bed.call("GET", "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["reasons"], serde_json::json!([]));
    // Killed after a request outlived --bridge-timeout; then restarted but not answering yet.
    for state in [SidecarState::Down, SidecarState::Starting] {
        bed.bridge.set(state, RestartCause::Timeout);
        let (status, body) = bed.call("GET", "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["reasons"], serde_json::json!(["bridge_restarting"]));
        assert_eq!(body["checks"]["bridge_alive"], false);
        assert_eq!(body["checks"]["bridge"]["cause"], "timeout");
    }
    bed.bridge.set(SidecarState::Running, RestartCause::Timeout);
    // Dagster's storage failing: the sidecar runs, the instance does not answer.
    let instance = serde_json::json!({"__class__": "InstanceRef"});
    bed.state.health.dagster_unreachable(
        &instance,
        OutageCause::Storage,
        "database is locked".into(),
    );
    let (status, body) = bed.call("GET", "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["reasons"], serde_json::json!(["dagster_unreachable"]));
    assert_eq!(body["checks"]["dagster_unreachable"][0]["cause"], "storage");
    assert_eq!(
        body["checks"]["dagster_unreachable"][0]["error"],
        "database is locked"
    );
    bed.state.health.dagster_answered(&instance);
    let (status, _) = bed.call("GET", "/readyz").await;
    assert_eq!(status, StatusCode::OK);
    bed.state
        .health
        .queue_contact("ReceiveMessage", Some("connection refused".into()));
    let (status, body) = bed.call("GET", "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["checks"]["sqs"]["error"], "connection refused");
    bed.state.health.queue_contact("ReceiveMessage", None);
    bed.state.draining.cancel();
    let (status, body) = bed.call("GET", "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "draining");
}

#[tokio::test(start_paused = true)]
async fn liveness_fails_when_a_loop_stops_beating() {
    let bed = bed(None);
    bed.state.health.intake.beat();
    bed.state.health.lease_keeper.beat();
    let (status, body) = bed.call("GET", "/healthz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tokio::time::advance(Duration::from_secs(600)).await;
    bed.state.health.intake.beat();
    let (status, body) = bed.call("GET", "/healthz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["loops"][1]["name"], "lease_keeper");
    assert_eq!(body["loops"][1]["status"], "stale");
    // A loop that ended on purpose (draining) is not a fault.
    bed.state.health.lease_keeper.stop();
    let (status, _) = bed.call("GET", "/healthz").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_failing_queue_refresh_keeps_the_page_working() {
    let bed = bed(None);
    bed.queues.fail.store(true, Ordering::SeqCst);
    let (status, body) = bed.call("GET", "/api/v1/summary").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["queue"]["work"].is_null());
    assert!(body["queue"]["error"]
        .as_str()
        .unwrap()
        .contains("connection refused"));
    let (status, _) = bed.call("GET", "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_a_strict_policy() {
    let bed = bed(None);
    let state = bed.state.clone();
    for (path, kind) in [
        ("/", "text/html"),
        ("/static/dashboard.js", "text/javascript"),
        ("/static/dashboard.css", "text/css"),
    ] {
        let response = warp::test::request()
            .path(path)
            .reply(&routes(state.clone()))
            .await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(content_type.starts_with(kind), "{path}: {content_type}");
        let csp = response.headers()["content-security-policy"]
            .to_str()
            .unwrap();
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"));
    }
    // The script writes API text with textContent only.
    assert!(!DASHBOARD_JS.contains("innerHTML"));
    assert!(!INDEX_HTML.contains("<script>"));
}

#[test]
fn token_comparison_is_exact() {
    use api::constant_time_eq as eq;
    assert!(eq(b"abc", b"abc"));
    assert!(!eq(b"abc", b"abd"));
    assert!(!eq(b"abc", b"abcd"));
    assert!(!eq(b"", b"a"));
}

/// A GET with optional headers; the status, the headers and the body as text.
async fn get(
    bed: &Bed,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, warp::http::HeaderMap, String) {
    let mut request = warp::test::request().method("GET").path(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.reply(&routes(bed.state.clone())).await;
    (
        response.status(),
        response.headers().clone(),
        String::from_utf8_lossy(response.body()).into_owned(),
    )
}

const READS: [&str; 4] = [
    "/api/v1/steps",
    "/api/v1/steps?state=running",
    "/api/v1/steps/00000000000000000000000000000001",
    "/api/v1/summary",
];

#[tokio::test]
async fn with_a_read_token_the_page_and_the_api_need_it() {
    let bed = bed_with(Some(TOKEN), Some(READ_TOKEN));
    bed.claim(1, "run-a", "emit");
    for path in READS {
        let (status, headers, body) = get(&bed, path, &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        assert_eq!(headers["www-authenticate"], "Bearer");
        let body: Value = serde_json::from_str(&body).expect("a JSON error");
        assert!(
            body["error"].as_str().unwrap().contains("--read-token"),
            "{body}"
        );
        assert!(!body.to_string().contains("emit"));
        for wrong in [
            "Bearer read-token-0123456780;,x",
            "Basic read-token-0123456789;,x",
        ] {
            let (status, _, _) = get(&bed, path, &[("authorization", wrong)]).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} with {wrong}");
        }
        // The read token and the admin token both read.
        for token in [READ_TOKEN, TOKEN] {
            let auth = format!("Bearer {token}");
            let (status, _, body) = get(&bed, path, &[("authorization", &auth)]).await;
            assert_eq!(status, StatusCode::OK, "{path} with {token}: {body}");
        }
    }
    // The page: a token page (no data) without it, the dashboard with it.
    let (status, headers, body) = get(&bed, "/", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("name=\"token\""), "{body}");
    assert!(!body.contains("dashboard.js"));
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("form-action 'self'") && !csp.contains("script-src"));
    let auth = format!("Bearer {READ_TOKEN}");
    let (status, _, body) = get(&bed, "/", &[("authorization", &auth)]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("/static/dashboard.js"));
    // The mutating endpoints still want the admin token: the read token is not enough.
    let (status, _) = bed
        .call_with("POST", "/api/v1/dlq/redrive", Some(READ_TOKEN), "")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(bed.queues.redrives.lock().is_empty());
}

#[tokio::test]
async fn the_token_in_the_url_becomes_a_cookie_that_authorizes_reads() {
    let bed = bed_with(Some(TOKEN), Some(READ_TOKEN));
    let (status, _, body) = get(&bed, "/?token=not-the-token-at-all", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("not valid"), "{body}");
    // Logging in with the admin token sets the same read-only cookie.
    let mut cookies = Vec::new();
    for token in [READ_TOKEN, TOKEN] {
        let path = format!("/?token={}", token.replace(';', "%3B").replace(',', "%2C"));
        let (status, headers, _) = get(&bed, &path, &[]).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{token}");
        assert_eq!(headers["location"], "/");
        let set_cookie = headers["set-cookie"].to_str().unwrap().to_owned();
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(set_cookie.contains(attribute), "{set_cookie}");
        }
        assert!(
            !set_cookie.contains(TOKEN),
            "the admin token leaked into {set_cookie}"
        );
        cookies.push(set_cookie.split(';').next().unwrap().to_owned());
    }
    assert_eq!(cookies[0], cookies[1]);
    let cookie = cookies[0].as_str();
    for path in READS.into_iter().chain(["/"]) {
        let (status, _, body) = get(&bed, path, &[("cookie", cookie)]).await;
        assert!(
            status == StatusCode::OK || status == StatusCode::NOT_FOUND,
            "{path}: {status} {body}"
        );
        assert_ne!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (status, _, _) = get(
        &bed,
        "/api/v1/summary",
        &[("cookie", "dagster_taskiq_read=00ff")],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The cookie never authorizes a change.
    let response = warp::test::request()
        .method("POST")
        .path("/api/v1/dlq/redrive")
        .header("cookie", cookie)
        .reply(&routes(bed.state.clone()))
        .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(bed.queues.redrives.lock().is_empty());
}

#[tokio::test]
async fn probes_metrics_and_assets_stay_open_with_a_read_token() {
    let bed = bed_with(None, Some(READ_TOKEN));
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/static/dashboard.js",
        "/static/dashboard.css",
    ] {
        let (status, _, body) = get(&bed, path, &[]).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
}

#[tokio::test]
async fn without_a_read_token_reads_are_open_and_a_url_token_is_dropped() {
    let bed = bed(Some(TOKEN));
    for path in READS.into_iter().chain(["/"]) {
        let (status, _, body) = get(&bed, path, &[]).await;
        assert_ne!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
    }
    let (status, headers, _) = get(&bed, "/?token=whatever-it-is-here", &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(headers.get("set-cookie").is_none());
}

#[test]
fn the_read_api_counts_as_exposed_beyond_loopback_without_a_token() {
    let exposed = |addr: &str, token| read_api_exposed(addr.parse().unwrap(), token);
    assert!(exposed("0.0.0.0:8080", false));
    assert!(exposed("[::]:8080", false));
    assert!(exposed("10.1.2.3:8080", false));
    assert!(!exposed("0.0.0.0:8080", true));
    assert!(!exposed("127.0.0.1:8080", false));
    assert!(!exposed("[::1]:8080", false));
}

#[test]
fn read_token_flags_are_validated_and_files_trimmed() {
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        dashboard: DashboardArgs,
    }
    let parse = |argv: &[&str]| {
        Cli::try_parse_from(std::iter::once("x").chain(argv.iter().copied())).map(|c| c.dashboard)
    };
    let args = parse(&[]).unwrap();
    assert_eq!(args.read_token().unwrap(), None);
    let args = parse(&["--read-token", READ_TOKEN]).unwrap();
    assert_eq!(args.read_token().unwrap().as_deref(), Some(READ_TOKEN));
    let err = parse(&["--read-token", "short"])
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(err.to_string().starts_with("--read-token:"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("read-token");
    std::fs::write(&file, format!("{READ_TOKEN}\n")).unwrap();
    let path = file.to_str().unwrap();
    let args = parse(&["--read-token-file", path]).unwrap();
    args.validate().unwrap();
    assert_eq!(args.read_token().unwrap().as_deref(), Some(READ_TOKEN));
    std::fs::write(&file, "too short\n").unwrap();
    let err = parse(&["--read-token-file", path])
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(err.to_string().starts_with("--read-token-file:"), "{err}");
    let missing = dir.path().join("missing");
    let err = parse(&["--read-token-file", missing.to_str().unwrap()])
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("cannot read"), "{err}");
    // One source only.
    assert!(parse(&["--read-token", READ_TOKEN, "--read-token-file", path]).is_err());
}

#[tokio::test]
async fn the_history_counts_launches_outcomes_and_queue_depth_per_minute() {
    let bed = bed(None);
    let a = bed.claim(1, "run-a", "emit");
    let b = bed.claim(2, "run-a", "join");
    bed.state.steps.transition(&a, StepState::Running);
    bed.state.steps.transition(&b, StepState::Running);
    bed.state
        .steps
        .update(&a, |r| r.outcome = Some("succeeded"));
    bed.state.steps.transition(&a, StepState::Acked);
    // Reading the summary reads the queue depth, and the history keeps it.
    bed.call("GET", "/api/v1/summary").await;
    let (status, history) = bed.call("GET", "/api/v1/history").await;
    assert_eq!(status, StatusCode::OK, "{history}");
    let minutes = history["minutes"].as_array().unwrap();
    assert_eq!(minutes.len(), crate::history::MINUTES);
    // The newest minute; a test that crosses a minute boundary sums the last two.
    let sum = |key: &str| -> u64 {
        minutes[minutes.len() - 2..]
            .iter()
            .map(|m| m[key].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(sum("launches"), 2, "{history}");
    let outcomes: u64 = minutes[minutes.len() - 2..]
        .iter()
        .map(|m| m["outcomes"]["succeeded"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(outcomes, 1);
    let largest = |key: &str| -> f64 {
        minutes[minutes.len() - 2..]
            .iter()
            .filter_map(|m| m[key].as_f64())
            .fold(0.0, f64::max)
    };
    assert_eq!(largest("queue_depth"), 4.0, "{history}");
    assert_eq!(largest("in_flight"), 2.0, "{history}");
    assert!(largest("start_latency_p50") > 0.0, "{history}");
}

#[tokio::test]
async fn the_history_needs_the_read_token_like_the_rest_of_the_api() {
    let bed = bed_with(Some(TOKEN), Some(READ_TOKEN));
    let (status, _) = bed.call("GET", "/api/v1/history").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = bed
        .call_with("GET", "/api/v1/history", Some(READ_TOKEN), "")
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn with_a_dagster_url_records_link_to_their_run_and_step() {
    let mut bed = bed(None);
    bed.state.dagster_ui = Some(Arc::new(
        DagsterUi::parse("https://dagster.example.com/prefix/").unwrap(),
    ));
    let task = bed.claim(1, "run-a", "emit");
    // The envelope refuses such a run id; the links do not rely on it.
    bed.state.steps.update(&task, |r| {
        r.run_id = "run-\"><img src=x>".into();
        r.links = crate::links::ecs_links("arn:aws:ecs:eu-west-1:1:task/c/abc123", "step", None)
    });
    let (status, record) = bed.call("GET", &format!("/api/v1/steps/{task}")).await;
    assert_eq!(status, StatusCode::OK);
    let links: Vec<(String, String)> = record["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["kind"].as_str().unwrap().to_owned(),
                l["url"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        links,
        [
            (
                "dagster_run".to_owned(),
                "https://dagster.example.com/prefix/runs/run-%22%3E%3Cimg%20src=x%3E".to_owned()
            ),
            (
                "dagster_step".to_owned(),
                "https://dagster.example.com/prefix/runs/run-%22%3E%3Cimg%20src=x%3E\
                 ?selection=emit&logs=step%3Aemit"
                    .to_owned()
            ),
            (
                "ecs_task".to_owned(),
                "https://eu-west-1.console.aws.amazon.com/ecs/v2/clusters/c/tasks/abc123\
                 ?region=eu-west-1"
                    .to_owned()
            ),
        ]
    );
    // Without the flag only the execution's own links.
    bed.state.dagster_ui = None;
    let (_, record) = bed.call("GET", &format!("/api/v1/steps/{task}")).await;
    assert_eq!(record["links"].as_array().unwrap().len(), 1);
}

#[test]
fn the_dagster_url_flag_is_validated() {
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        dashboard: DashboardArgs,
    }
    let parse = |argv: &[&str]| {
        Cli::try_parse_from(std::iter::once("x").chain(argv.iter().copied()))
            .unwrap()
            .dashboard
    };
    assert!(parse(&[]).dagster_ui().unwrap().is_none());
    let ui = parse(&["--dagster-url", "http://dagster:3000"])
        .dagster_ui()
        .unwrap()
        .unwrap();
    assert_eq!(ui.run("r"), "http://dagster:3000/runs/r");
    for bad in ["dagster:3000", "javascript:alert(1)", "http://x/?q=1"] {
        let err = parse(&["--dagster-url", bad]).validate().unwrap_err();
        assert!(err.to_string().starts_with("--dagster-url:"), "{err}");
    }
}
