//! `make bench` (a): the controller's own overhead, with in-memory fakes behind the queue,
//! the launcher and the Dagster bridge, so only our code is measured.
//!
//! - admission: slot grants per second of the scheduler alone (caps, priority, fair share);
//! - pipeline: messages per second from the queue to a launched step (decode, bridge check,
//!   admission, launch, lease) with 10 000 steps in flight, and the resident memory each
//!   in-flight step costs.
//!
//! Each measurement is repeated; the table shows min / median / max.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dagster_taskiq_controller::admission::{Admission, AdmissionConfig, Ticket};
use dagster_taskiq_controller::claims::ClaimTable;
use dagster_taskiq_controller::controller::{self, Context, Settings};
use dagster_taskiq_controller::fakes::{step_body, FakeBridge, FakeLauncher, FakeQueue};
use dagster_taskiq_controller::health::Health;
use dagster_taskiq_controller::lease::LeaseTable;
use dagster_taskiq_controller::metrics::Metrics;
use dagster_taskiq_controller::retry::Backoff;
use dagster_taskiq_controller::state::StepTable;
use dagster_taskiq_controller::taskiq::TaskiqCompat;
use tokio_util::sync::CancellationToken;

const IN_FLIGHT: usize = 10_000;
const REPEATS: usize = 5;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm has a resident field");
    pages * 4096
}

/// (min, median, max)
fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[0],
        values[values.len() / 2],
        values[values.len() - 1],
    )
}

/// Grants per second: 200 000 steps of 50 runs with tags and priorities through 64 slots.
async fn admission_grants_per_second() -> f64 {
    const STEPS: usize = 200_000;
    let admission = Arc::new(Admission::new(AdmissionConfig {
        max_per_run: Some(8),
        tag_limits: vec!["db=warehouse:16".parse().unwrap()],
        ..AdmissionConfig::capped(64)
    }));
    let tickets: Vec<Ticket> = (0..STEPS)
        .map(|i| Ticket {
            run_id: format!("run-{}", i % 50),
            priority: (i % 3) as i32,
            tags: if i % 4 == 0 {
                BTreeMap::from([("db".to_owned(), "warehouse".to_owned())])
            } else {
                BTreeMap::new()
            },
        })
        .collect();
    let started = Instant::now();
    // 256 workers each admit, hold for no time, release: the waiting list stays ~200 long.
    let per_worker = STEPS / 256;
    let tickets = Arc::new(tickets);
    let mut workers = Vec::new();
    for w in 0..256 {
        let (admission, tickets) = (admission.clone(), tickets.clone());
        workers.push(tokio::spawn(async move {
            for i in 0..per_worker {
                let slot = admission.admit(tickets[w * per_worker + i].clone()).await;
                tokio::task::yield_now().await;
                drop(slot);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    (per_worker * 256) as f64 / started.elapsed().as_secs_f64()
}

struct PipelineResult {
    messages_per_second: f64,
    rss_per_step: f64,
}

async fn pipeline() -> PipelineResult {
    let queue = FakeQueue::default();
    let bridge = FakeBridge::default();
    // Steps that outlast the measurement.
    let launcher = FakeLauncher::new(bridge.clone(), Duration::from_secs(3600));
    let metrics = Arc::new(Metrics::new());
    let controller = Arc::new(Context {
        settings: Settings {
            controller_id: "bench".into(),
            receive_wait: Duration::from_millis(10),
            max_attempts: 5,
            backoff: Backoff {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(30),
            },
            shutdown_grace: Duration::ZERO,
            call_retry_budget: Duration::from_secs(5),
            default_step_timeout: None,
            stop_grace: Duration::from_secs(1),
            run_status_interval: Duration::from_secs(1),
            adoption_window: Duration::from_secs(180),
            waiting_limit: None,
            instance: Default::default(),
        },
        queue: Arc::new(queue.clone()),
        launcher: Arc::new(launcher.clone()),
        bridge: Arc::new(bridge),
        admission: Admission::new(AdmissionConfig::capped(IN_FLIGHT)),
        leases: Arc::new(LeaseTable::new(
            Duration::from_secs(60),
            Duration::from_secs(43_200),
            metrics.clone(),
        )),
        claims: Arc::new(ClaimTable::new(Duration::from_secs(600), metrics.clone())),
        steps: Arc::new(StepTable::default()),
        metrics,
        health: Arc::new(Health::new(Duration::from_secs(1), Duration::from_secs(20))),
        taskiq: TaskiqCompat::default(),
        draining: CancellationToken::new(),
        abort: CancellationToken::new(),
    });
    for i in 0..IN_FLIGHT {
        let task_id = format!("{i:032x}");
        queue.push(
            &format!("m{i}"),
            &step_body(&task_id, &format!("run-{}", i % 100), &format!("op_{i}"), 0),
        );
    }
    let before = rss_bytes();
    let started = Instant::now();
    let run = tokio::spawn(controller::run(controller.clone()));
    while launcher.launch_count() < IN_FLIGHT {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let after = rss_bytes();
    controller.abort.cancel();
    controller.draining.cancel();
    run.abort();
    PipelineResult {
        messages_per_second: IN_FLIGHT as f64 / elapsed.as_secs_f64(),
        rss_per_step: after.saturating_sub(before) as f64 / IN_FLIGHT as f64,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut grants = Vec::new();
    for _ in 0..REPEATS {
        grants.push(admission_grants_per_second().await);
    }
    let mut throughput = Vec::new();
    let mut memory = Vec::new();
    for _ in 0..REPEATS {
        let result = pipeline().await;
        throughput.push(result.messages_per_second);
        memory.push(result.rss_per_step);
        // Let the aborted controller's tasks go before the next round.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut table = String::from(
        "## Controller overhead (fakes for queue, launcher, bridge)\n\n\
         | measure | min | median | max |\n|---|---|---|---|\n",
    );
    let (lo, mid, hi) = spread(grants);
    table += &format!(
        "| admission: slot grants / s (64 slots, per-run and tag caps, 50 runs) | {lo:.0} | {mid:.0} | {hi:.0} |\n"
    );
    let (lo, mid, hi) = spread(throughput);
    table += &format!(
        "| pipeline: messages / s from queue to launched, up to {IN_FLIGHT} in flight | {lo:.0} | {mid:.0} | {hi:.0} |\n"
    );
    // The first round pays for the allocator's growth; later rounds reuse freed memory.
    let first = memory[0];
    let (lo, mid, hi) = spread(memory);
    table += &format!(
        "| RSS per in-flight step, KiB (first round {:.1}) | {:.1} | {:.1} | {:.1} |\n",
        first / 1024.0,
        lo / 1024.0,
        mid / 1024.0,
        hi / 1024.0
    );
    println!("{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(dir.join("overhead.md"), &table).expect("write the report");
}
