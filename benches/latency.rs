//! `make bench` (b) and (d): against a real SQS API (moto on 127.0.0.1) with a trivial step
//! command (`/bin/true` in place of Python, so the step itself costs nothing):
//! - latency from message received to child spawned, and from child exit to message
//!   deleted, p50 / p99 over every step;
//! - SQS API calls per step by operation, showing the batching of receives and heartbeats.
//!
//! The Dagster bridge is the in-memory fake: a step that exits without a terminal event gets
//! a verdict (one fake call) before its message is deleted, as a real crash would.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dagster_taskiq_controller::admission::{Admission, AdmissionConfig};
use dagster_taskiq_controller::claims::ClaimTable;
use dagster_taskiq_controller::controller::{self, Context, Settings};
use dagster_taskiq_controller::fakes::{step_body, FakeBridge};
use dagster_taskiq_controller::health::Health;
use dagster_taskiq_controller::launcher::{
    ProcessLauncher, ProcessLauncherConfig, PythonMap, StepLimiter,
};
use dagster_taskiq_controller::lease::LeaseTable;
use dagster_taskiq_controller::metrics::Metrics;
use dagster_taskiq_controller::queue::{SqsQueue, SqsQueueConfig};
use dagster_taskiq_controller::retry::Backoff;
use dagster_taskiq_controller::state::{StepState, StepTable};
use dagster_taskiq_controller::step_env::StepEnvironment;
use dagster_taskiq_controller::taskiq::TaskiqCompat;
use tokio_util::sync::CancellationToken;

const STEPS: usize = 300;
const ROUNDS: usize = 3;

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

/// Seconds between two states in a step's history.
fn between(
    history: &[(StepState, chrono::DateTime<chrono::Utc>)],
    a: StepState,
    b: StepState,
) -> Option<f64> {
    let at = |s| {
        history
            .iter()
            .find(|(state, _)| *state == s)
            .map(|(_, t)| *t)
    };
    Some((at(b)? - at(a)?).as_seconds_f64())
}

/// Counters of `dagster_taskiq_sqs_requests_total` by operation.
fn sqs_calls(metrics: &Metrics) -> BTreeMap<String, f64> {
    let mut calls = BTreeMap::new();
    for line in metrics.render().lines() {
        let Some(rest) = line.strip_prefix("dagster_taskiq_sqs_requests_total{operation=\"") else {
            continue;
        };
        let Some((operation, value)) = rest.split_once("\"} ") else {
            continue;
        };
        calls.insert(operation.to_owned(), value.trim().parse().unwrap_or(0.0));
    }
    calls
}

struct Round {
    to_spawn: Vec<f64>,
    to_delete: Vec<f64>,
    calls: BTreeMap<String, f64>,
    wall: Duration,
}

async fn round(moto: &common::Moto, n: usize) -> Round {
    let (queue_url, dlq_url) = moto.queues(&format!("bench-{n}"), 30).await;
    let sqs = moto.sqs();
    let metrics = Arc::new(Metrics::new());
    let queue = SqsQueue::new(
        sqs.clone(),
        SqsQueueConfig {
            queue_url: queue_url.clone(),
            dlq_url,
        },
    )
    .with_metrics(metrics.clone());
    let steps = Arc::new(StepTable::default());
    let controller = Arc::new(Context {
        settings: Settings {
            controller_id: "bench".into(),
            receive_wait: Duration::from_secs(1),
            max_attempts: 5,
            backoff: Backoff {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(30),
            },
            shutdown_grace: Duration::from_secs(5),
            call_retry_budget: Duration::from_secs(10),
            default_step_timeout: None,
            stop_grace: Duration::from_secs(1),
            run_status_interval: Duration::from_secs(1),
            adoption_window: Duration::from_secs(90),
            waiting_limit: None,
            instance: Default::default(),
        },
        queue: Arc::new(queue),
        launcher: Arc::new(ProcessLauncher::new(ProcessLauncherConfig {
            pythons: PythonMap::single("/bin/true".into()),
            environment: StepEnvironment::from_process(&Default::default()),
            limits: Arc::new(StepLimiter::unlimited()),
        })),
        bridge: Arc::new(FakeBridge::default()),
        admission: Admission::new(AdmissionConfig {
            prefetch: 10,
            ..AdmissionConfig::capped(16)
        }),
        leases: Arc::new(LeaseTable::new(
            Duration::from_secs(30),
            Duration::from_secs(43_200),
            metrics.clone(),
        )),
        claims: Arc::new(ClaimTable::new(Duration::from_secs(600), metrics.clone())),
        steps: steps.clone(),
        metrics: metrics.clone(),
        health: Arc::new(Health::new(Duration::from_secs(1), Duration::from_secs(10))),
        taskiq: TaskiqCompat::default(),
        draining: CancellationToken::new(),
        abort: CancellationToken::new(),
    });
    // Enqueue everything first (SendMessageBatch), then start: a fan-out burst.
    for chunk in (0..STEPS).collect::<Vec<_>>().chunks(10) {
        let entries = chunk
            .iter()
            .map(|i| {
                aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(step_body(
                        &format!("{n:08x}{i:024x}"),
                        &format!("run-{n}"),
                        &format!("op_{i}"),
                        0,
                    ))
                    .build()
                    .unwrap()
            })
            .collect();
        sqs.send_message_batch()
            .queue_url(&queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
    }
    let started = Instant::now();
    let run = tokio::spawn(controller::run(controller.clone()));
    loop {
        let records = steps.snapshot();
        if records.len() == STEPS && records.iter().all(|r| r.state == StepState::Acked) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "steps did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wall = started.elapsed();
    controller.draining.cancel();
    run.await.unwrap();
    let records = steps.snapshot();
    let mut to_spawn: Vec<f64> = records
        .iter()
        .filter_map(|r| between(&r.history, StepState::Received, StepState::Running))
        .collect();
    let mut to_delete: Vec<f64> = records
        .iter()
        .filter_map(|r| between(&r.history, StepState::Exited, StepState::Acked))
        .collect();
    to_spawn.sort_by(f64::total_cmp);
    to_delete.sort_by(f64::total_cmp);
    Round {
        to_spawn,
        to_delete,
        calls: sqs_calls(&metrics),
        wall,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let moto = common::Moto::start();
    let mut rounds = Vec::new();
    for n in 0..ROUNDS {
        rounds.push(round(&moto, n).await);
    }
    let ms = |v: f64| v * 1000.0;
    let mut table = format!(
        "## Latency against moto ({STEPS} trivial steps per round, 16 slots, {ROUNDS} rounds)\n\n\
         | measure | round 1 | round 2 | round 3 |\n|---|---|---|---|\n"
    );
    let row = |name: &str, f: &dyn Fn(&Round) -> String| {
        format!(
            "| {name} | {} |\n",
            rounds.iter().map(f).collect::<Vec<_>>().join(" | ")
        )
    };
    table += &row("received → spawned p50 (ms)", &|r| {
        format!("{:.1}", ms(percentile(&r.to_spawn, 0.5)))
    });
    table += &row("received → spawned p99 (ms)", &|r| {
        format!("{:.1}", ms(percentile(&r.to_spawn, 0.99)))
    });
    table += &row("exited → deleted p50 (ms)", &|r| {
        format!("{:.1}", ms(percentile(&r.to_delete, 0.5)))
    });
    table += &row("exited → deleted p99 (ms)", &|r| {
        format!("{:.1}", ms(percentile(&r.to_delete, 0.99)))
    });
    table += &row("steps / s end to end", &|r| {
        format!("{:.0}", STEPS as f64 / r.wall.as_secs_f64())
    });
    let operations: Vec<String> = rounds[0].calls.keys().cloned().collect();
    for op in operations {
        table += &row(&format!("{op} calls per step"), &|r| {
            format!(
                "{:.2}",
                r.calls.get(&op).copied().unwrap_or(0.0) / STEPS as f64
            )
        });
    }
    println!("{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(dir.join("latency.md"), &table).expect("write the report");
}
