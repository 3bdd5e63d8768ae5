"""The operator surface of a running controller binary on a moto server, with real Dagster
jobs: metrics, the JSON API and its admin endpoints, probes, JSON logs, shutdown with a
keep-alive connection open, and the HTML dashboard in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import jobs
import pytest
from conftest import REPO_ROOT, wait_for
from dagster import execute_job
from test_e2e_process import Stack

pytestmark = pytest.mark.controller

TOKEN = "dashboard-test-token-4f9c2a"
READ_TOKEN = "dashboard-read-token-7d41e0"
SCREENSHOT = REPO_ROOT / "target" / "dashboard.png"
RUN_SCREENSHOT = REPO_ROOT / "target" / "dashboard-run.png"
DAGSTER_URL = "http://dagster.test:3000/ui"
A11Y_NODE_MODULES = REPO_ROOT / ".venv-a11y" / "node_modules"
AXE_CHECK = Path(__file__).parent / "a11y" / "axe_check.mjs"


def request(
    stack: Stack,
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = None,
) -> tuple[int, Any]:
    """One HTTP request to the dashboard; returns the status and the decoded JSON body."""
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        f"{stack.controller.dashboard_url}{path}", data=body, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text format to {series with labels: value}."""
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        series, _, value = line.rpartition(" ")
        values[series] = float(value)
    return values


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    """A controller without an admin token."""
    return make_stack()


@pytest.fixture
def published_stack(make_stack: Callable[..., Stack]) -> Stack:
    """A controller that also publishes to (moto's) CloudWatch, in a namespace of its own."""
    return make_stack("--cloudwatch-namespace", f"DagsterTaskiqTest/{uuid.uuid4().hex[:12]}")


@pytest.fixture
def admin_stack(make_stack: Callable[..., Stack]) -> Stack:
    return make_stack("--admin-token", TOKEN, "--stop-grace", "5", "--log-format", "json")


class JobThread(threading.Thread):
    """Runs a job in the background; `result_success` once it ends."""

    def __init__(self, stack: Stack, name: str, run_config: dict[str, Any] | None = None) -> None:
        super().__init__(daemon=True)
        self.stack, self.job_name, self.run_config = stack, name, run_config or {}
        self.result_success: bool | None = None
        self.run_id: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with execute_job(
                jobs.recon(self.job_name), self.stack.instance, run_config=self.run_config
            ) as result:
                self.run_id = result.run_id
                self.result_success = result.success
        except BaseException as e:
            self.error = e


def running_step(stack: Stack, step_key: str, token: str | None = None) -> Any:
    status, records = request(stack, "GET", "/api/v1/steps?state=running", token=token)
    assert status == 200, records
    for record in records:
        if record["step_key"] == step_key:
            return record
    return None


def get_page(stack: Stack, path: str) -> tuple[int, str]:
    """A GET that follows no redirect; the status and the body as text."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(f"{stack.controller.dashboard_url}{path}", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metrics_when(stack: Stack, name: str, value: float) -> dict[str, float] | None:
    """All metric values once ``name`` has reached ``value``, else None."""
    values = metric_values(stack.metrics())
    return values if values.get(name) == value else None


def test_counters_and_the_api_follow_a_real_job(published_stack: Stack) -> None:
    stack = published_stack
    before = metric_values(stack.metrics())
    assert before.get("dagster_taskiq_messages_received_total", 0) == 0
    with execute_job(jobs.recon("diamond"), stack.instance) as result:
        assert result.success
        run_id = result.run_id
    wait_for(stack.queue_empty, 10, "every message to be deleted")
    # The counters move a moment after the deletions.
    acked = 'dagster_taskiq_messages_acked_total{outcome="succeeded"}'
    after = wait_for(lambda: metrics_when(stack, acked, 6), 10, "six acknowledgements counted")
    assert after["dagster_taskiq_messages_received_total"] == 6
    assert after['dagster_taskiq_steps_launched_total{launcher="process"}'] == 6
    assert after['dagster_taskiq_steps_finished_total{launcher="process",outcome="succeeded"}'] == 6
    assert after['dagster_taskiq_sqs_requests_total{operation="ReceiveMessage"}'] >= 1
    assert after['dagster_taskiq_sqs_requests_total{operation="DeleteMessage"}'] == 6
    assert after['dagster_taskiq_bridge_latency_seconds_count{method="step_state"}'] >= 12
    assert after["dagster_taskiq_step_duration_seconds_count"] == 6
    assert after["dagster_taskiq_admission_wait_seconds_count"] == 6
    assert after["dagster_taskiq_admission_capacity"] == 16
    # The scaling signals: every step's start measured from the executor's send stamp (a
    # bounded, clamped latency), the capacity a backlog is measured against, readiness.
    assert after["dagster_taskiq_schedule_to_start_seconds_count"] == 6
    assert 0 < after["dagster_taskiq_schedule_to_start_seconds_sum"] < 6 * 60
    assert after["dagster_taskiq_hold_capacity"] == 16 + 10
    assert after["dagster_taskiq_ready"] == 1
    assert 0 <= after["dagster_taskiq_oldest_message_age_seconds"] < 60
    assert any(k.startswith("dagster_taskiq_build_info{") for k in after)

    status, records = request(stack, "GET", f"/api/v1/steps?run={run_id}&state=acked")
    assert status == 200
    assert sorted(r["step_key"] for r in records) == [
        "add_one",
        "double",
        "emit",
        "join",
        "report",
        "square",
    ]
    record = records[0]
    assert record["outcome"] == "succeeded"
    assert record["launcher"] == "process"
    assert record["locator"].startswith("pid ")
    states = [h["state"] for h in record["history"]]
    assert states[0] == "received" and states[-1] == "acked" and "running" in states
    status, one = request(stack, "GET", f"/api/v1/steps/{record['task_id']}")
    assert status == 200 and one["task_id"] == record["task_id"]
    assert one["lease_deadline"] is None  # settled: no lease held

    status, summary = request(stack, "GET", "/api/v1/summary")
    assert status == 200
    assert summary["steps"]["by_state"]["acked"] == 6
    assert summary["steps"]["outcomes"]["succeeded"] == 6
    # Launches in the last minute (the whole job may take longer on a busy machine).
    assert 1 <= summary["rates"]["launched_per_minute"] <= 6
    # The page's queue counts are SQS's approximate ones, cached for 3 s: the last deletion shows
    # within a few seconds.
    empty = {"visible": 0, "in_flight": 0, "delayed": 0}
    wait_for(
        lambda: request(stack, "GET", "/api/v1/summary")[1]["queue"]["work"] == empty,
        15,
        "the summary's work queue to read empty",
    )
    assert summary["queue"]["dlq"]["visible"] == 0
    assert summary["admission"]["max_concurrent"] == 16
    assert summary["admission"]["held"] == 0
    # Reading the summary refreshed the queue gauges.
    assert 'dagster_taskiq_queue_messages{queue="dlq",state="visible"} 0' in stack.metrics()

    status, health = request(stack, "GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    assert {loop["name"]: loop["status"] for loop in health["loops"]} == {
        "intake": "ok",
        "lease_keeper": "ok",
    }
    status, ready = request(stack, "GET", "/readyz")
    assert status == 200 and ready["checks"]["bridge_alive"] is True
    check_cloudwatch_metrics(stack)


def check_cloudwatch_metrics(stack: Stack) -> None:
    """What the controller published through the real SDK to moto's CloudWatch: every metric
    the template's scaling policy and alarms read, with the dimension they read it by, and
    real values."""
    from test_deploy import OUR_NAMESPACE, cloudwatch_metric_names, load_template, metric_references

    namespace = stack.controller.args[stack.controller.args.index("--cloudwatch-namespace") + 1]
    queue = stack.queues.queue_url.rstrip("/").rsplit("/", 1)[1]
    cloudwatch = boto3.client("cloudwatch")

    def listed() -> dict[str, Any] | None:
        metrics = cloudwatch.list_metrics(Namespace=namespace)["Metrics"]
        names = {m["MetricName"]: m["Dimensions"] for m in metrics}
        return names if "HeldMessages" in names else None

    published = wait_for(listed, 30, "the controller's first PutMetricData")
    read = {r.name for r in metric_references(load_template()) if r.namespace == OUR_NAMESPACE}
    assert read <= set(published) <= cloudwatch_metric_names(), (read, published)
    for dimensions in published.values():
        assert dimensions == [{"Name": "Queue", "Value": queue}]
    now = time.time()
    stats = cloudwatch.get_metric_statistics(
        Namespace=namespace,
        MetricName="HoldCapacity",
        Dimensions=[{"Name": "Queue", "Value": queue}],
        StartTime=now - 600,
        EndTime=now + 60,
        Period=60,
        Statistics=["Maximum", "SampleCount"],
    )["Datapoints"]
    # One sample per minute from the one replica, of --max-concurrent + --prefetch.
    assert stats and all(p["Maximum"] == 26 and p["SampleCount"] == 1 for p in stats), stats
    assert stack.metric("cloudwatch_publishes_total") >= 1


def test_bad_paths_and_bodies_get_json_errors(admin_stack: Stack) -> None:
    for method, path, body, expected in [
        ("GET", "/api/v1/nope", None, 404),
        ("GET", "/api/v1/steps/0123", None, 404),
        ("GET", "/api/v1/steps?state=bogus", None, 400),
        ("POST", "/api/v1/summary", b"{}", 405),
        ("POST", "/api/v1/steps/0123/cancel", b"{not json", 400),
        ("POST", "/api/v1/dlq/redrive", b'{"max": "ten"}', 400),
        ("POST", "/api/v1/dlq/redrive", b'{"max": 5000}', 400),
        ("POST", "/api/v1/steps/0123/cancel", b"{}", 404),
    ]:
        status, reply = request(admin_stack, method, path, body, token=TOKEN)
        assert status == expected, (method, path, reply)
        assert isinstance(reply["error"], str) and reply["error"], reply


def test_admin_endpoints_are_disabled_without_a_configured_token(stack: Stack) -> None:
    for path in ["/api/v1/steps/0123/cancel", "/api/v1/dlq/redrive"]:
        status, reply = request(stack, "POST", path, b"{}", token=TOKEN)
        assert status == 403, reply
        assert reply["error"].startswith("disabled")


def test_redrive_needs_the_token_and_moves_dead_letters_back(admin_stack: Stack) -> None:
    sqs = boto3.client("sqs")
    sqs.send_message(QueueUrl=admin_stack.queues.queue_url, MessageBody="not json at all")

    def dlq_visible() -> int:
        _, summary = request(admin_stack, "GET", "/api/v1/summary")
        return int(summary["queue"]["dlq"]["visible"]) if summary["queue"]["dlq"] else 0

    wait_for(dlq_visible, 30, "the poison message in the DLQ", interval=0.5)
    for token in (None, "wrong-token-wrong-token"):
        status, reply = request(admin_stack, "POST", "/api/v1/dlq/redrive", b"{}", token=token)
        assert status == 401, reply
    status, report = request(
        admin_stack,
        "POST",
        "/api/v1/dlq/redrive",
        json.dumps({"max": 5, "filter": {"reason": "no_such_reason"}}).encode(),
        token=TOKEN,
    )
    assert status == 200 and report["moved"] == 0, report
    status, report = request(
        admin_stack,
        "POST",
        "/api/v1/dlq/redrive",
        json.dumps({"max": 5, "filter": {"reason": "invalid_json"}}).encode(),
        token=TOKEN,
    )
    assert status == 200 and report["moved"] == 1, report
    # Back in the work queue it is received again, and dead-lettered again.
    wait_for(
        lambda: (
            'dagster_taskiq_messages_dead_lettered_total{reason="invalid_json"} 2'
            in admin_stack.metrics()
        ),
        30,
        "the redriven message to be dead-lettered again",
        interval=0.5,
    )


def test_cancel_stops_a_running_step_and_the_run_ends(admin_stack: Stack) -> None:
    job = JobThread(admin_stack, "slow", {"ops": {"sleep_op": {"config": {"seconds": 30.0}}}})
    started = time.monotonic()
    job.start()
    record = wait_for(lambda: running_step(admin_stack, "sleep_op"), 60, "sleep_op to run", 0.2)
    path = f"/api/v1/steps/{record['task_id']}/cancel"
    status, reply = request(admin_stack, "POST", path, b"")
    assert status == 401, reply
    assert running_step(admin_stack, "sleep_op") is not None
    status, reply = request(
        admin_stack, "POST", path, json.dumps({"reason": "test cancel"}).encode(), token=TOKEN
    )
    assert status == 202, reply
    job.join(45)
    assert not job.is_alive(), "the run did not end after the cancel"
    assert job.error is None, job.error
    assert job.result_success is False
    assert time.monotonic() - started < 30, "the step ran to its end instead of stopping"
    status, after = request(admin_stack, "GET", f"/api/v1/steps/{record['task_id']}")
    assert status == 200
    assert after["active"] is False
    assert after["stop_reason"] == {"kind": "operator", "reason": "test cancel"}
    wait_for(admin_stack.queue_empty, 15, "the message to be deleted")


def test_a_read_token_guards_the_page_and_the_api_but_not_probes_or_metrics(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack("--read-token", READ_TOKEN, "--admin-token", TOKEN)
    with execute_job(jobs.recon("self_kill"), stack.instance) as result:
        assert result.success
    wait_for(stack.queue_empty, 15, "the message to be deleted")
    for path in ["/api/v1/steps", "/api/v1/summary", "/api/v1/steps?state=acked"]:
        status, reply = request(stack, "GET", path)
        assert status == 401, reply
        assert "--read-token" in reply["error"], reply
        status, reply = request(stack, "GET", path, token="dashboard-read-token-wrong")
        assert status == 401, reply
    # With the read token (or the admin token) the records, stderr tails included, are there.
    for token in (READ_TOKEN, TOKEN):
        status, records = request(stack, "GET", "/api/v1/steps", token=token)
        assert status == 200, records
        killed = [r for r in records if r["step_key"] == "kill_self"]
        assert killed and "stderr_tail" in killed[0], records
    # The page without the token: the token page, no data, no script.
    status, page = get_page(stack, "/")
    assert status == 401 and 'name="token"' in page and "dashboard.js" not in page, page
    status, page = get_page(stack, "/?token=dashboard-read-token-wrong")
    assert status == 401 and "not valid" in page, page
    status, _ = get_page(stack, f"/?token={READ_TOKEN}")
    assert status == 303
    # Probes and metrics need nothing (the kubelet and Prometheus carry no token).
    for path in ("/healthz", "/readyz"):
        status, reply = request(stack, "GET", path)
        assert status == 200, (path, reply)
    assert metric_values(stack.metrics())["dagster_taskiq_messages_received_total"] >= 1


def test_json_logs_carry_the_step_span(admin_stack: Stack, tmp_path: Path) -> None:
    with execute_job(jobs.recon("tagged"), admin_stack.instance) as result:
        assert result.success
        run_id = result.run_id
    wait_for(admin_stack.queue_empty, 10, "the message to be deleted")
    events = []
    for line in (tmp_path / "controller.log").read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a step's own output
    started = [e for e in events if e.get("message") == "step started"]
    assert len(started) == 1, started
    span = started[0]["span"]
    assert span["name"] == "step"
    assert span["run_id"] == run_id
    assert span["step_key"] == "tagged_op"
    assert span["attempt"] == 0
    assert re.fullmatch(r"[0-9a-f]{32}", span["task_id"])
    assert started[0]["level"] == "INFO"


def test_shutdown_does_not_wait_for_an_idle_keep_alive_connection(stack: Stack) -> None:
    sock = socket.create_connection(("127.0.0.1", stack.controller.dashboard_port), timeout=5)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert stack.controller.stop(timeout=20) == 0
        took = time.monotonic() - started
        assert took < 8, f"shutdown took {took:.1f}s with a keep-alive connection open"
    finally:
        sock.close()


# --- the HTML dashboard in headless Chromium ---------------------------------------------------


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def run_chromium(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    binary = chromium()
    assert binary is not None
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--window-size=1400,900",
                "--virtual-time-budget=4000",
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def test_the_dashboard_shows_running_steps_in_a_browser(
    make_stack: Callable[..., Stack],
) -> None:
    if chromium() is None:
        if os.environ.get("DAGSTER_TASKIQ_REQUIRE_BROWSER"):
            pytest.fail("chromium not installed (make browser)")
        pytest.skip("chromium not installed (make browser)")
    stack = make_stack("--read-token", READ_TOKEN, "--dagster-url", DAGSTER_URL)
    # Something settled and something failed with a verdict; then a step that keeps running.
    # (One job at a time: two concurrent execute_job calls on one instance stalled here.)
    with execute_job(jobs.recon("self_kill"), stack.instance) as result:
        assert result.success
        killed_run = result.run_id
    slow = JobThread(stack, "slow", {"ops": {"sleep_op": {"config": {"seconds": 25.0}}}})
    slow.start()
    sleeping = wait_for(
        lambda: running_step(stack, "sleep_op", READ_TOKEN), 60, "sleep_op to run", 0.2
    )

    # Without the token the browser gets the token page and nothing of the steps.
    dom = run_chromium(f"{stack.controller.dashboard_url}/", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="token-message"' in dom.stdout and "sleep_op" not in dom.stdout, dom.stdout

    # The token once in the URL: a cookie, a redirect to /, and the page's API calls carry it.
    url = f"{stack.controller.dashboard_url}/?token={READ_TOKEN}"
    dom = run_chromium(url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    inflight = html[html.index('id="inflight"') : html.index('id="recent"')]
    assert "sleep_op" in inflight, html
    assert "running" in inflight
    failures = html[html.index('id="failures"') :]
    assert "kill_self" in failures and "signal 9" in failures, failures
    assert 'id="status-pill" class="pill pill-good">ready<' in html
    # The run and its step lead into the Dagster UI; the run id also to this page's run view.
    run_id = sleeping["run_id"]
    assert f'href="{DAGSTER_URL}/runs/{run_id}"' in inflight, inflight
    assert (
        f'href="{DAGSTER_URL}/runs/{run_id}?selection=sleep_op&amp;logs=step%3Asleep_op"'
        in inflight
    ), inflight
    assert f'href="#run={run_id}"' in inflight
    assert 'rel="noopener noreferrer"' in inflight
    # The last hour: three charts, with the launches and the outcomes of the jobs above.
    charts = html[html.index('id="charts"') : html.index('id="inflight"')]
    for chart in ("chart-throughput", "chart-depth", "chart-latency"):
        assert f'<svg id="{chart}"' in charts, charts
    throughput = charts[charts.index('id="chart-throughput"') : charts.index('id="chart-depth"')]
    assert 'class="bar s-good"' in throughput and 'class="line s-accent"' in throughput
    assert 'class="bar s-bad"' in throughput  # the SIGKILLed attempt's verdict
    latency = charts[charts.index('id="chart-latency"') :]
    assert 'class="line s-info"' in latency and 'class="line s-warn"' in latency

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    shot = run_chromium(url, f"--screenshot={SCREENSHOT}")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert SCREENSHOT.stat().st_size > 10_000

    # The per-run view of the self_kill run: both attempts, a timeline bar each.
    run_url = f"{url}#run={killed_run}"
    dom = run_chromium(run_url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    view = dom.stdout[dom.stdout.index('id="run-view"') : dom.stdout.index('id="overview"')]
    assert "hidden" not in view[: view.index(">")], view[:200]
    assert view.count('<svg class="gantt"') == 2, view
    assert view.count('class="seg seg-run"') == 2, view
    assert f'href="{DAGSTER_URL}/runs/{killed_run}"' in view
    RUN_SCREENSHOT.unlink(missing_ok=True)
    shot = run_chromium(run_url, f"--screenshot={RUN_SCREENSHOT}")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert RUN_SCREENSHOT.stat().st_size > 10_000

    # Accessibility (labels, names, contrast, ...) of both views, by axe-core.
    report = axe_check(url, "#chart-latency", run_url, "svg.gantt")
    for page in report["pages"]:
        assert page["violations"] == [], json.dumps(page, indent=1)
        assert page["rules_passed"] > 20, page
    slow.join(60)
    assert slow.result_success is True, slow.error


def axe_check(*urls_and_selectors: str) -> Any:
    """axe-core's report on each page (`make a11y` installs it with playwright-core)."""
    node = shutil.which("node")
    if node is None or not (A11Y_NODE_MODULES / "axe-core").is_dir():
        pytest.fail(
            "the accessibility check needs node and `make a11y` (axe-core, playwright-core)"
        )
    env = {**os.environ, "NODE_PATH": str(A11Y_NODE_MODULES), "CHROMIUM": chromium() or ""}
    done = subprocess.run(
        [node, str(AXE_CHECK), *urls_and_selectors],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=A11Y_NODE_MODULES.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)
