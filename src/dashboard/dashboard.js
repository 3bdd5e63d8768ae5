// The dashboard: polls the JSON API and redraws. Every value from the API is put into the
// page as text nodes (textContent), never parsed as markup, so step keys, verdicts and stderr
// cannot inject anything.
"use strict";

const POLL_MS = 1500;
const RECENT_ROWS = 15;
const FAILURE_ROWS = 10;

const GOOD = new Set(["succeeded", "already_finished"]);
// Outcome names (src/outcome.rs): the message went back to the queue, or the run moved on.
const WARN = new Set(["up_for_retry", "run_ended", "shutdown", "backoff", "bridge_unavailable",
  "launch_transient", "duplicate", "overflow", "requeued", "handed_off", "killed",
  "continuation_not_ours", "stopped_while_waiting", "waited_too_long", "never_started",
  "result_unwritten", "payload_unavailable", "launch_failed"]);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function setText(id, value) {
  const node = document.getElementById(id);
  if (node) node.textContent = value;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  if (seconds < 60) return seconds.toFixed(1) + "s";
  const s = Math.floor(seconds % 60).toString().padStart(2, "0");
  const m = Math.floor(seconds / 60);
  if (m < 60) return m + "m " + s + "s";
  return Math.floor(m / 60) + "h " + (m % 60).toString().padStart(2, "0") + "m";
}

function clock(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return isNaN(d) ? "–" : d.toLocaleTimeString([], { hour12: false });
}

function shortRun(runId) {
  return runId && runId.length > 8 ? runId.slice(0, 8) : runId || "–";
}

function statePill(state) {
  const cls = {
    running: "pill-info", launching: "pill-info", exited: "pill-info", reported: "pill-info",
    received: "", admitted: "pill-warn", acked: "pill-good", skipped: "pill-good",
    backoff: "pill-warn", released: "pill-warn", dead_lettered: "pill-bad", fenced: "pill-bad",
  }[state] || "";
  return el("span", { class: "pill " + cls }, (state || "?").replace(/_/g, " "));
}

function outcomeClass(record) {
  const outcome = record.outcome || record.state;
  if (GOOD.has(outcome)) return "good";
  if (WARN.has(outcome)) return "warn";
  return "bad";
}

function outcomePill(record) {
  const outcome = record.outcome || record.state || "?";
  return el("span", { class: "pill pill-" + outcomeClass(record) }, outcome.replace(/_/g, " "));
}

function table(headers, rows) {
  const head = el("tr", null, ...headers.map((h) => el("th", null, h)));
  return el("table", null, el("thead", null, head), el("tbody", null, ...rows));
}

function empty(text) {
  return el("div", { class: "empty" }, text);
}

function leaseLeft(record) {
  if (!record.lease_deadline) return "–";
  const left = (new Date(record.lease_deadline) - Date.now()) / 1000;
  return left >= 0 ? "in " + duration(left) : "overdue";
}

function renderInflight(steps) {
  const active = steps.filter((s) => s.active);
  setText("inflight-count", active.length);
  const target = document.getElementById("inflight");
  if (active.length === 0) {
    target.replaceChildren(empty("No steps in flight."));
    return;
  }
  const runs = new Map();
  for (const step of active) {
    if (!runs.has(step.run_id)) runs.set(step.run_id, []);
    runs.get(step.run_id).push(step);
  }
  const rows = [];
  for (const [runId, runSteps] of runs) {
    const states = {};
    for (const s of runSteps) states[s.state] = (states[s.state] || 0) + 1;
    const tally = Object.entries(states).map(([k, v]) => v + " " + k.replace(/_/g, " ")).join(", ");
    rows.push(el("tr", { class: "run-row" },
      el("td", { colspan: "7" }, "run ", el("b", { class: "mono" }, runId), "  ·  " +
        runSteps.length + (runSteps.length === 1 ? " step" : " steps") + " (" + tally + ")")));
    for (const s of runSteps) {
      rows.push(el("tr", { "data-task-id": s.task_id },
        el("td", { class: "step" }, s.step_key),
        el("td", { class: "num" }, s.attempt),
        el("td", null, statePill(s.state), s.stop_reason ? el("span", { class: "muted" }, " stopping") : null),
        el("td", { class: "num" }, duration(s.age_seconds)),
        el("td", { class: "mono" }, s.locator || "–"),
        el("td", { class: "num" }, s.receive_count),
        el("td", { class: "num" }, leaseLeft(s))));
    }
  }
  target.replaceChildren(table(["Step", "Attempt", "State", "Age", "Process", "Delivery", "Lease"], rows));
}

function renderRecent(steps) {
  const done = steps.filter((s) => !s.active);
  setText("recent-count", done.length);
  const target = document.getElementById("recent");
  if (done.length === 0) {
    target.replaceChildren(empty("Nothing settled yet."));
    return;
  }
  const rows = done.slice(0, RECENT_ROWS).map((s) => el("tr", null,
    el("td", { class: "num muted" }, clock(s.updated_at)),
    el("td", { class: "step" }, s.step_key),
    el("td", { class: "mono muted" }, shortRun(s.run_id)),
    el("td", { class: "num" }, s.attempt),
    el("td", null, outcomePill(s)),
    el("td", { class: "num" }, duration(s.age_seconds))));
  target.replaceChildren(table(["Time", "Step", "Run", "Attempt", "Outcome", "Took"], rows));
}

function renderFailures(steps) {
  const failed = steps.filter((s) => !s.active && (s.verdict || outcomeClass(s) === "bad"));
  setText("failure-count", failed.length);
  document.getElementById("failure-count").classList.toggle("nonzero", failed.length > 0);
  const target = document.getElementById("failures");
  if (failed.length === 0) {
    target.replaceChildren(empty("No failures."));
    return;
  }
  target.replaceChildren(...failed.slice(0, FAILURE_ROWS).map((s) => {
    const item = el("div", { class: "failure" },
      el("div", { class: "failure-head" },
        el("span", { class: "step" }, s.step_key),
        el("span", { class: "muted" }, "attempt " + s.attempt),
        outcomePill(s),
        el("span", { class: "mono muted" }, "run " + shortRun(s.run_id)),
        el("span", { class: "muted" }, clock(s.updated_at))));
    if (s.verdict) item.append(el("div", { class: "verdict" }, s.verdict));
    if (s.stderr_tail && s.stderr_tail.length) {
      item.append(el("details", null,
        el("summary", null, "stderr (last " + s.stderr_tail.length + " lines)"),
        el("pre", null, s.stderr_tail.join("\n"))));
    }
    return item;
  }));
}

function renderSummary(summary, ready) {
  const c = summary.controller;
  const meta = document.getElementById("controller-meta");
  meta.replaceChildren(el("b", null, c.controller_id), "  ·  v" + c.version + "  ·  up " +
    duration(summary.uptime_seconds) + "  ·  " + c.queue_url);
  meta.title = c.queue_url;

  const pill = document.getElementById("status-pill");
  let status = "ready", cls = "pill-good";
  if (summary.draining) { status = "draining"; cls = "pill-warn"; }
  else if (!ready) { status = "not ready"; cls = "pill-bad"; }
  pill.textContent = status;
  pill.className = "pill " + cls;

  const a = summary.admission;
  setText("in-use", a.running);
  setText("max-concurrent", a.max_concurrent);
  const fill = document.getElementById("in-use-bar");
  const ratio = a.max_concurrent ? a.running / a.max_concurrent : 0;
  fill.style.width = Math.min(100, ratio * 100).toFixed(1) + "%";
  fill.classList.toggle("full", ratio >= 1);
  // Intake pauses once the running steps and the prefetched ones fill what may be held.
  const paused = a.held >= a.max_concurrent + a.prefetch;
  const waiting = a.waiting ? a.waiting + " waiting for a slot" : "steps running";
  setText("in-use-note", paused ? "at capacity: intake paused" : waiting);

  setText("launch-rate", summary.rates.launched_per_minute.toFixed(0));
  const limit = a.launch_rate ? "limit " + a.launch_rate + "/s (burst " + a.launch_burst + ")" : "no rate limit";
  setText("launch-note", limit + (a.waiting_for_launch ? " · " + a.waiting_for_launch + " waiting" : ""));

  const q = summary.queue;
  setText("queue-visible", q.work ? q.work.visible : "–");
  setText("queue-note", q.error ? "stale: " + q.error.slice(0, 80)
    : q.work ? "visible · " + q.work.in_flight + " in flight · " + q.work.delayed + " delayed" : "visible messages");
  const dlq = q.dlq ? q.dlq.visible + q.dlq.in_flight : null;
  setText("dlq-visible", dlq === null ? "–" : dlq);
  document.getElementById("dlq-card").classList.toggle("alert", !!dlq);
  setText("dlq-note", dlq ? "need attention (redrive: POST /api/v1/dlq/redrive)" : "messages");

  setText("settled-rate", summary.rates.settled_per_minute.toFixed(0));
  const o = summary.steps.outcomes;
  const good = (o.succeeded || 0) + (o.already_finished || 0);
  const total = Object.values(o).reduce((x, y) => x + y, 0);
  setText("outcome-note", good + " ok · " + (total - good) + " other (recent)");
}

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store", headers: { accept: "application/json" } });
  // The read-token cookie is gone or the token changed: back to the token page.
  if (response.status === 401) {
    window.location.assign("/");
    throw new Error("read token needed");
  }
  return { ok: response.ok, body: await response.json() };
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const [summary, steps, ready] = await Promise.all([
      getJson("/api/v1/summary"), getJson("/api/v1/steps?limit=300"), getJson("/readyz"),
    ]);
    renderSummary(summary.body, ready.ok);
    renderInflight(steps.body);
    renderRecent(steps.body);
    renderFailures(steps.body);
    setText("updated", "updated " + new Date().toLocaleTimeString([], { hour12: false }));
  } catch (e) {
    const pill = document.getElementById("status-pill");
    pill.textContent = "disconnected";
    pill.className = "pill pill-bad";
  } finally {
    busy = false;
  }
}

refresh();
setInterval(refresh, POLL_MS);
