// The dashboard: polls the JSON API and redraws. Every value from the API is put into the
// page as text nodes (textContent), never parsed as markup, so step keys, verdicts and stderr
// cannot inject anything. Links come built and URL-encoded from the API and are used only
// when they are http(s) URLs; the charts are SVG elements whose attributes are numbers.
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

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Only absolute http(s) URLs become links: nothing else (javascript:, data:) reaches an href.
function safeUrl(url) {
  return typeof url === "string" && /^https?:\/\//i.test(url) ? url : null;
}

function extLink(url, text, label) {
  const href = safeUrl(url);
  if (!href) return el("span", null, text);
  const attrs = { href, rel: "noopener noreferrer", target: "_blank" };
  if (label) attrs["aria-label"] = label;
  return el("a", attrs, text);
}

function linkOf(record, kind) {
  const found = (record.links || []).find((l) => l && l.kind === kind);
  return found ? safeUrl(found.url) : null;
}

// The per-run view of this page: the run id only ever goes into the fragment, encoded.
function runHref(runId) {
  return "#run=" + encodeURIComponent(runId || "");
}

function runLink(runId, text) {
  return el("a", { href: runHref(runId), class: "mono", title: "steps of run " + runId }, text);
}

function stepCell(record) {
  const url = linkOf(record, "dagster_step");
  return url ? extLink(url, record.step_key, "step " + record.step_key + " in Dagster") : record.step_key;
}

function executionLinks(record) {
  const parts = [];
  const task = linkOf(record, "ecs_task");
  const logs = linkOf(record, "cloudwatch_logs");
  if (task) parts.push(extLink(task, "task", "ECS task of " + record.step_key));
  if (logs) {
    if (parts.length) parts.push(" · ");
    parts.push(extLink(logs, "logs", "CloudWatch logs of " + record.step_key));
  }
  return parts.length ? el("span", { class: "links" }, ...parts) : null;
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
    const dagster = linkOf(runSteps[0], "dagster_run");
    rows.push(el("tr", { class: "run-row" },
      el("td", { colspan: "7" }, "run ", el("b", null, runLink(runId, runId)),
        dagster ? el("span", null, " · ", extLink(dagster, "open in Dagster", "open in Dagster: run " + runId)) : null,
        "  ·  " + runSteps.length + (runSteps.length === 1 ? " step" : " steps") + " (" + tally + ")")));
    for (const s of runSteps) {
      rows.push(el("tr", { "data-task-id": s.task_id },
        el("td", { class: "step" }, stepCell(s)),
        el("td", { class: "num" }, s.attempt),
        el("td", null, statePill(s.state), s.stop_reason ? el("span", { class: "muted" }, " stopping") : null),
        el("td", { class: "num" }, duration(s.age_seconds)),
        el("td", { class: "mono" }, s.locator || "–", executionLinks(s) ? " " : null, executionLinks(s)),
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
    el("td", { class: "step" }, stepCell(s)),
    el("td", null, runLink(s.run_id, shortRun(s.run_id))),
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
        el("span", { class: "step" }, stepCell(s)),
        el("span", { class: "muted" }, "attempt " + s.attempt),
        outcomePill(s),
        el("span", { class: "muted" }, "run ", runLink(s.run_id, shortRun(s.run_id))),
        el("span", { class: "muted" }, clock(s.updated_at)),
        executionLinks(s)));
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
  const home = document.getElementById("dagster-home");
  if (safeUrl(c.dagster_url) && !home.firstChild) {
    home.append(extLink(c.dagster_url, "Dagster"), " · ");
  }

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

// --- the last hour: small SVG charts -----------------------------------------------------

const CHART = { w: 440, h: 130, left: 40, right: 8, top: 10, bottom: 20 };

function niceMax(value) {
  if (!(value > 0)) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 5, 10]) if (value <= m * step) return m * step;
  return 10 * step;
}

function axisLabel(value, unit) {
  if (unit === "s") return value < 1 ? (value * 1000).toFixed(0) + "ms" : duration(value);
  return String(Math.round(value * 100) / 100);
}

// series: [{ name, cls, values: [number|null], kind: "bar" | "line" }]; bars stack.
function drawChart(id, title, series, unit) {
  const n = series[0].values.length;
  const plotW = CHART.w - CHART.left - CHART.right;
  const plotH = CHART.h - CHART.top - CHART.bottom;
  const slot = plotW / n;
  let max = 0;
  const stacked = new Array(n).fill(0);
  for (const s of series) {
    s.values.forEach((v, i) => {
      const x = Number(v) || 0;
      if (s.kind === "bar") { stacked[i] += x; max = Math.max(max, stacked[i]); }
      else max = Math.max(max, x);
    });
  }
  max = niceMax(max);
  const y = (v) => CHART.top + plotH - (Math.min(v, max) / max) * plotH;
  const nodes = [];
  for (const v of [0, max / 2, max]) {
    nodes.push(svg("line", { class: "grid", x1: CHART.left, x2: CHART.w - CHART.right, y1: y(v), y2: y(v) }));
    nodes.push(svg("text", { class: "tick", x: CHART.left - 4, y: y(v) + 3, "text-anchor": "end" }, axisLabel(v, unit)));
  }
  const base = new Array(n).fill(0);
  for (const s of series.filter((s) => s.kind === "bar")) {
    s.values.forEach((v, i) => {
      const x = Number(v) || 0;
      if (x <= 0) return;
      const top = y(base[i] + x), bottom = y(base[i]);
      base[i] += x;
      nodes.push(svg("rect", { class: "bar " + s.cls, x: (CHART.left + i * slot + 0.5).toFixed(1),
        y: top.toFixed(1), width: Math.max(1, slot - 1).toFixed(1), height: Math.max(0.5, bottom - top).toFixed(1) },
        svg("title", null, s.name + ": " + x)));
    });
  }
  for (const s of series.filter((s) => s.kind === "line")) {
    let d = "";
    s.values.forEach((v, i) => {
      if (v === null || v === undefined || !isFinite(v)) return;
      const px = (CHART.left + (i + 0.5) * slot).toFixed(1), py = y(Number(v)).toFixed(1);
      const prev = i > 0 ? s.values[i - 1] : null;
      d += (prev === null || prev === undefined || !isFinite(prev) ? "M" : "L") + px + " " + py + " ";
    });
    if (d) nodes.push(svg("path", { class: "line " + s.cls, d: d.trim() }));
  }
  nodes.push(svg("text", { class: "tick", x: CHART.left, y: CHART.h - 5 }, "−60 min"));
  nodes.push(svg("text", { class: "tick", x: CHART.w - CHART.right, y: CHART.h - 5, "text-anchor": "end" }, "now"));
  const latest = series.map((s) => {
    const last = [...s.values].reverse().find((v) => v !== null && v !== undefined);
    return s.name + " " + (last === undefined ? "none" : axisLabel(Number(last), unit));
  }).join(", ");
  const chart = svg("svg", { id, class: "chart", viewBox: "0 0 " + CHART.w + " " + CHART.h,
    role: "img", "aria-label": title + " over the last hour; latest minute: " + latest }, ...nodes);
  const legend = el("ul", { class: "legend" }, ...series.map((s) =>
    el("li", null, el("span", { class: "swatch " + s.cls, "aria-hidden": "true" }), s.name)));
  return el("figure", { class: "chart-box" }, el("figcaption", null, title), chart, legend);
}

function outcomeClassOf(name) {
  if (GOOD.has(name)) return "good";
  if (WARN.has(name)) return "warn";
  return "bad";
}

function renderHistory(history) {
  const minutes = history.minutes || [];
  if (minutes.length === 0) return;
  const byClass = { good: [], warn: [], bad: [] };
  for (const m of minutes) {
    const sums = { good: 0, warn: 0, bad: 0 };
    for (const [name, count] of Object.entries(m.outcomes || {})) sums[outcomeClassOf(name)] += Number(count) || 0;
    for (const k of Object.keys(byClass)) byClass[k].push(sums[k]);
  }
  const pick = (key) => minutes.map((m) => (m[key] === null || m[key] === undefined ? null : Number(m[key])));
  document.getElementById("charts").replaceChildren(
    drawChart("chart-throughput", "Launches and outcomes per minute", [
      { name: "succeeded", cls: "s-good", values: byClass.good, kind: "bar" },
      { name: "retried or handed back", cls: "s-warn", values: byClass.warn, kind: "bar" },
      { name: "failed", cls: "s-bad", values: byClass.bad, kind: "bar" },
      { name: "launches", cls: "s-accent", values: pick("launches"), kind: "line" },
    ]),
    drawChart("chart-depth", "Queue depth and in-flight steps", [
      { name: "queue depth (visible)", cls: "s-info", values: pick("queue_depth"), kind: "line" },
      { name: "in flight (held)", cls: "s-accent", values: pick("in_flight"), kind: "line" },
    ]),
    drawChart("chart-latency", "Step start latency (received → running)", [
      { name: "p50", cls: "s-info", values: pick("start_latency_p50"), kind: "line" },
      { name: "p99", cls: "s-warn", values: pick("start_latency_p99"), kind: "line" },
    ], "s"));
}

// --- the per-run view: one Gantt-like bar per attempt ------------------------------------

const SEGMENT = {
  received: "seg-wait", admitted: "seg-wait", launching: "seg-wait",
  running: "seg-run", exited: "seg-report", reported: "seg-report",
};

function currentRun() {
  const match = /^#run=(.*)$/.exec(window.location.hash);
  if (!match) return null;
  try { return decodeURIComponent(match[1]); } catch (e) { return null; }
}

function renderRun(runId, records) {
  setText("run-view-id", runId);
  const body = document.getElementById("run-view-body");
  const links = document.getElementById("run-view-links");
  const dagster = records.length ? linkOf(records[0], "dagster_run") : null;
  links.replaceChildren(...(dagster ? [extLink(dagster, "open in Dagster", "open in Dagster: run " + runId)] : []));
  if (records.length === 0) {
    body.replaceChildren(empty("This controller knows no step of this run (it keeps the last 1000 attempts)."));
    return;
  }
  const now = Date.now();
  const times = (r) => (r.history || []).map((h) => new Date(h.at).getTime()).filter((t) => isFinite(t));
  let start = Infinity, end = -Infinity;
  for (const r of records) {
    const t = times(r);
    if (!t.length) continue;
    start = Math.min(start, t[0]);
    end = Math.max(end, r.active ? now : t[t.length - 1]);
  }
  const span = Math.max(1, end - start);
  const W = 600, H = 16;
  const ordered = [...records].sort((a, b) => (times(a)[0] || 0) - (times(b)[0] || 0));
  const rows = ordered.map((r) => {
    const h = r.history || [];
    const bars = [];
    for (let i = 0; i < h.length; i++) {
      const cls = SEGMENT[h[i].state];
      if (!cls) continue;
      const from = new Date(h[i].at).getTime();
      const to = i + 1 < h.length ? new Date(h[i + 1].at).getTime() : (r.active ? now : from);
      if (!isFinite(from) || !isFinite(to)) continue;
      const x = ((from - start) / span) * W;
      const w = Math.max(1.5, ((to - from) / span) * W);
      bars.push(svg("rect", { class: "seg " + cls, x: x.toFixed(1), y: 2, width: w.toFixed(1), height: H - 4 },
        svg("title", null, h[i].state.replace(/_/g, " ") + " " + duration((to - from) / 1000))));
    }
    const gantt = svg("svg", { class: "gantt", viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none",
      role: "img", "aria-label": r.step_key + " attempt " + r.attempt + ": " + duration(r.age_seconds) +
        " from received to " + (r.active ? "now" : (r.outcome || r.state)) }, ...bars);
    return el("tr", { "data-task-id": r.task_id },
      el("td", { class: "step" }, stepCell(r)),
      el("td", { class: "num" }, r.attempt),
      el("td", null, r.active ? statePill(r.state) : outcomePill(r)),
      el("td", { class: "num" }, duration(r.age_seconds)),
      el("td", { class: "gantt-cell" }, gantt),
      el("td", null, executionLinks(r) || "–"));
  });
  const legend = el("ul", { class: "legend" },
    el("li", null, el("span", { class: "swatch seg-wait", "aria-hidden": "true" }), "waiting (received, admitted, launching)"),
    el("li", null, el("span", { class: "swatch seg-run", "aria-hidden": "true" }), "running"),
    el("li", null, el("span", { class: "swatch seg-report", "aria-hidden": "true" }), "exited, reporting"),
    el("li", { class: "muted" }, new Date(start).toLocaleTimeString([], { hour12: false }) + " → " +
      new Date(end).toLocaleTimeString([], { hour12: false }) + " (" + duration(span / 1000) + ")"));
  body.replaceChildren(table(["Step", "Attempt", "Outcome", "Took", "Timeline", "Links"], rows), legend);
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const runId = currentRun();
    document.getElementById("run-view").hidden = runId === null;
    document.getElementById("overview").hidden = runId !== null;
    const stepsPath = runId === null ? "/api/v1/steps?limit=300"
      : "/api/v1/steps?limit=5000&run=" + encodeURIComponent(runId);
    const [summary, steps, ready, history] = await Promise.all([
      getJson("/api/v1/summary"), getJson(stepsPath), getJson("/readyz"),
      runId === null ? getJson("/api/v1/history") : Promise.resolve(null),
    ]);
    renderSummary(summary.body, ready.ok);
    if (runId !== null) {
      renderRun(runId, steps.body);
    } else {
      renderHistory(history.body);
      renderInflight(steps.body);
      renderRecent(steps.body);
      renderFailures(steps.body);
    }
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
window.addEventListener("hashchange", refresh);
