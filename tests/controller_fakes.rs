//! The controller's state machine with fakes behind the three boundaries and paused time.
//! (The same behaviours run against moto, real processes and real Dagster in python/tests.)

use std::sync::Arc;
use std::time::Duration;

use dagster_taskiq_controller::admission::{Admission, AdmissionConfig};
use dagster_taskiq_controller::claims::ClaimTable;
use dagster_taskiq_controller::controller::{self, Context, Settings};
use dagster_taskiq_controller::dagster::{Claim, RunStatus};
use dagster_taskiq_controller::envelope;
use dagster_taskiq_controller::fakes::{
    fake_event_line, step_body, FakeBridge, FakeLauncher, FakeObjectStore, FakeOutcome, FakeQueue,
    QueueEvent,
};
use dagster_taskiq_controller::health::Health;
use dagster_taskiq_controller::launcher::{EcsStopCause, StepExit};
use dagster_taskiq_controller::lease::LeaseTable;
use dagster_taskiq_controller::metrics::Metrics;
use dagster_taskiq_controller::retry::Backoff;
use dagster_taskiq_controller::state::StepTable;
use dagster_taskiq_controller::taskiq::TaskiqCompat;
use tokio_util::sync::CancellationToken;

struct Bed {
    queue: FakeQueue,
    bridge: FakeBridge,
    launcher: FakeLauncher,
    controller: Arc<Context>,
}

fn bed(step_duration: Duration) -> Bed {
    bed_with_cap(step_duration, Duration::from_secs(12 * 3600))
}

fn bed_with_cap(step_duration: Duration, visibility_cap: Duration) -> Bed {
    bed_with(step_duration, visibility_cap, TaskiqCompat::default())
}

fn bed_with(step_duration: Duration, visibility_cap: Duration, taskiq: TaskiqCompat) -> Bed {
    bed_full(
        step_duration,
        visibility_cap,
        AdmissionConfig::capped(4),
        None,
        taskiq,
    )
}

fn bed_with_admission(
    step_duration: Duration,
    visibility_cap: Duration,
    admission: AdmissionConfig,
    waiting_limit: Option<Duration>,
) -> Bed {
    bed_full(
        step_duration,
        visibility_cap,
        admission,
        waiting_limit,
        TaskiqCompat::default(),
    )
}

fn bed_full(
    step_duration: Duration,
    visibility_cap: Duration,
    admission: AdmissionConfig,
    waiting_limit: Option<Duration>,
    taskiq: TaskiqCompat,
) -> Bed {
    let queue = FakeQueue::default();
    let bridge = FakeBridge::default();
    let launcher = FakeLauncher::new(bridge.clone(), step_duration);
    let settings = Settings {
        controller_id: "test".into(),
        receive_wait: Duration::from_secs(1),
        max_attempts: 3,
        backoff: Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(30),
        },
        shutdown_grace: Duration::from_secs(10),
        call_retry_budget: Duration::from_secs(5),
        default_step_timeout: None,
        stop_grace: Duration::from_secs(3),
        run_status_interval: Duration::from_secs(1),
        adoption_window: Duration::from_secs(60),
        waiting_limit,
        instance: Default::default(),
    };
    let controller = context(
        settings,
        (&queue, &bridge, &launcher),
        admission,
        visibility_cap,
        taskiq,
    );
    Bed {
        queue,
        bridge,
        launcher,
        controller,
    }
}

/// A controller on these fakes, with tables of its own (a 3 s visibility timeout).
fn context(
    settings: Settings,
    (queue, bridge, launcher): (&FakeQueue, &FakeBridge, &FakeLauncher),
    admission: AdmissionConfig,
    visibility_cap: Duration,
    taskiq: TaskiqCompat,
) -> Arc<Context> {
    let metrics = Arc::new(Metrics::new());
    Arc::new(Context {
        settings,
        queue: Arc::new(queue.clone()),
        launcher: Arc::new(launcher.clone()),
        bridge: Arc::new(bridge.clone()),
        admission: Admission::new(admission),
        leases: Arc::new(LeaseTable::new(
            Duration::from_secs(3),
            visibility_cap,
            metrics.clone(),
        )),
        claims: Arc::new(ClaimTable::new(Duration::from_secs(600), metrics.clone())),
        steps: Arc::new(StepTable::default()),
        metrics,
        health: Arc::new(Health::new(Duration::from_secs(1), Duration::from_secs(10))),
        taskiq,
        draining: CancellationToken::new(),
        abort: CancellationToken::new(),
    })
}

fn task_id(n: u32) -> String {
    format!("{n:032x}")
}

impl Bed {
    fn start(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(controller::run(self.controller.clone()))
    }

    async fn stop(&self, handle: tokio::task::JoinHandle<()>) {
        self.controller.draining.cancel();
        handle.await.unwrap();
    }
}

fn acked(id: &str) -> impl Fn(&[QueueEvent]) -> bool + '_ {
    move |events| events.contains(&QueueEvent::Acked(id.to_owned()))
}

fn dead_lettered<'a>(id: &'a str, reason: &'a str) -> impl Fn(&[QueueEvent]) -> bool + 'a {
    move |events| events.contains(&QueueEvent::DeadLettered(id.to_owned(), reason.to_owned()))
}

#[tokio::test(start_paused = true)]
async fn a_successful_step_is_launched_once_and_acked() {
    let bed = bed(Duration::from_secs(5));
    bed.queue
        .push("m1", &step_body(&task_id(1), "run1", "op_a", 0));
    let handle = bed.start();
    bed.queue.wait_for(acked("m1")).await;
    assert_eq!(bed.launcher.launches(), vec![task_id(1)]);
    assert!(bed.bridge.verdicts().is_empty());
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn the_checks_of_one_receive_go_to_the_bridge_in_one_request() {
    let bed = bed(Duration::from_secs(1));
    for n in 1..=3 {
        let body = step_body(&task_id(n), "run1", &format!("op_{n}"), 0);
        bed.queue.push(&format!("m{n}"), &body);
    }
    // Received with them, and ended before its check: it does not hold the batch.
    bed.queue.push("bad", "{not json");
    let handle = bed.start();
    for n in 1..=3 {
        bed.queue.wait_for(acked(&format!("m{n}"))).await;
    }
    assert_eq!(bed.launcher.launches().len(), 3);
    assert_eq!(bed.bridge.step_state_batches(), vec![3]);
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn poison_is_dead_lettered_with_its_reason_and_never_launched() {
    let bed = bed(Duration::from_secs(1));
    bed.queue.push("bad", "{not json");
    bed.queue
        .push("good", &step_body(&task_id(2), "run1", "op_a", 0));
    let handle = bed.start();
    bed.queue.wait_for(acked("good")).await;
    assert!(bed.queue.events().contains(&QueueEvent::DeadLettered(
        "bad".into(),
        "invalid_json".into()
    )));
    assert_eq!(bed.launcher.launches(), vec![task_id(2)]);
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_crash_without_terminal_event_gets_a_verdict_before_the_ack() {
    let bed = bed(Duration::from_secs(1));
    bed.launcher
        .outcome("op_a", FakeOutcome::Crash(StepExit::Signal(9)));
    bed.queue
        .push("m1", &step_body(&task_id(3), "run1", "op_a", 0));
    let handle = bed.start();
    bed.queue.wait_for(acked("m1")).await;
    let verdicts = bed.bridge.verdicts();
    assert_eq!(verdicts.len(), 1);
    assert!(verdicts[0].1.contains("signal 9 (SIGKILL)"), "{verdicts:?}");
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn exit_zero_without_terminal_event_is_not_success() {
    let bed = bed(Duration::from_secs(1));
    bed.launcher
        .outcome("op_a", FakeOutcome::Crash(StepExit::Code(0)));
    bed.queue
        .push("m1", &step_body(&task_id(4), "run1", "op_a", 0));
    let handle = bed.start();
    bed.queue.wait_for(acked("m1")).await;
    assert_eq!(bed.bridge.verdicts().len(), 1);
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn finished_attempts_and_ended_runs_are_acked_without_running() {
    let bed = bed(Duration::from_secs(1));
    let done = envelope::decode(&step_body(&task_id(5), "run1", "op_a", 0)).unwrap();
    bed.bridge.finish(&done, "STEP_SUCCESS");
    bed.bridge.set_run_status("run2", RunStatus::Canceled);
    bed.queue
        .push("done", &step_body(&task_id(5), "run1", "op_a", 0));
    bed.queue
        .push("canceled", &step_body(&task_id(6), "run2", "op_b", 0));
    let handle = bed.start();
    bed.queue.wait_for(acked("done")).await;
    bed.queue.wait_for(acked("canceled")).await;
    assert!(bed.launcher.launches().is_empty());
    let verdicts = bed.bridge.verdicts();
    assert_eq!(verdicts.len(), 1, "{verdicts:?}");
    assert!(
        verdicts[0].1.contains("the run is CANCELED"),
        "{verdicts:?}"
    );
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_fences_the_step_and_reports_nothing() {
    let bed = bed(Duration::from_secs(1));
    bed.launcher.outcome("op_a", FakeOutcome::Hang);
    bed.queue
        .push("m1", &step_body(&task_id(7), "run1", "op_a", 0));
    let handle = bed.start();
    // Wait until it runs, then make SQS reject its receipt handle.
    while bed.launcher.launches().is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bed.queue.lose_lease("m1");
    while bed.controller.steps.is_active(&task_id(7)) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(bed.queue.events().is_empty(), "{:?}", bed.queue.events());
    assert!(bed.bridge.verdicts().is_empty());
    let record = bed.controller.steps.get(&task_id(7)).unwrap();
    assert_eq!(
        serde_json::to_value(record.state).unwrap(),
        serde_json::json!("fenced")
    );
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn too_many_deliveries_dead_letter_with_a_verdict() {
    let body = step_body(&task_id(8), "run1", "op_a", 0);
    // Deliveries past max_attempts (3) are given up on.
    let bed = bed_with_receive_count(&body, 4);
    let handle = bed.start();
    bed.queue
        .wait_for(dead_lettered("m1", "attempts_exhausted"))
        .await;
    assert!(bed.launcher.launches().is_empty());
    assert_eq!(bed.bridge.verdicts().len(), 1);
    assert!(bed.bridge.verdicts()[0].1.contains("gave up"));
    bed.stop(handle).await;
}

/// A bed whose message has already been delivered `count - 1` times.
fn bed_with_receive_count(body: &str, count: u32) -> Bed {
    let bed = bed(Duration::from_secs(1));
    bed.queue.push("m1", body);
    let queue = bed.queue.clone();
    futures::executor::block_on(async move {
        use dagster_taskiq_controller::queue::WorkQueue;
        for _ in 1..count {
            let got = queue
                .receive(1, Duration::ZERO, Duration::from_secs(1))
                .await
                .unwrap();
            queue
                .release(&got[0].receipt_handle, Duration::ZERO)
                .await
                .unwrap();
        }
    });
    bed
}

#[tokio::test(start_paused = true)]
async fn shutdown_kills_steps_past_the_grace_and_releases_their_messages() {
    let bed = bed(Duration::from_secs(1));
    bed.launcher.outcome("op_a", FakeOutcome::Hang);
    bed.queue
        .push("m1", &step_body(&task_id(9), "run1", "op_a", 0));
    let handle = bed.start();
    while bed.launcher.launches().is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let began = tokio::time::Instant::now();
    bed.stop(handle).await;
    assert!(began.elapsed() >= Duration::from_secs(10), "grace honoured");
    assert!(bed
        .queue
        .events()
        .contains(&QueueEvent::Released("m1".into(), Duration::ZERO)));
    assert!(bed.bridge.verdicts().is_empty());
}

fn body_with_labels(id: u32, run_id: &str, step_key: &str, extra: &[(&str, &str)]) -> String {
    let mut body: serde_json::Value =
        serde_json::from_str(&step_body(&task_id(id), run_id, step_key, 0)).unwrap();
    for (k, v) in extra {
        body["labels"][*k] = serde_json::Value::from(*v);
    }
    body.to_string()
}

#[tokio::test(start_paused = true)]
async fn a_step_past_its_timeout_is_killed_and_gets_a_timeout_verdict() {
    let bed = bed(Duration::from_secs(1));
    bed.launcher.outcome("op_a", FakeOutcome::HangIgnoringTerm);
    bed.queue.push(
        "m1",
        &body_with_labels(10, "run1", "op_a", &[("dagster_timeout", "3")]),
    );
    let began = tokio::time::Instant::now();
    let handle = bed.start();
    bed.queue.wait_for(acked("m1")).await;
    let elapsed = began.elapsed();
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    let verdicts = bed.bridge.verdicts();
    assert_eq!(verdicts.len(), 1);
    assert!(
        verdicts[0].1.contains("timed out after 3.0s"),
        "{verdicts:?}"
    );
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_canceled_run_stops_its_running_steps_and_skips_later_ones() {
    let bed = bed(Duration::from_secs(1));
    bed.launcher.outcome("op_a", FakeOutcome::Hang);
    bed.launcher.outcome("op_b", FakeOutcome::HangIgnoringTerm);
    bed.queue
        .push("a", &step_body(&task_id(11), "run1", "op_a", 0));
    bed.queue
        .push("b", &step_body(&task_id(12), "run1", "op_b", 0));
    let handle = bed.start();
    while bed.launcher.launches().len() < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let canceled_at = tokio::time::Instant::now();
    bed.bridge.set_run_status("run1", RunStatus::Canceling);
    bed.queue.wait_for(acked("a")).await;
    // SIGTERM is honoured at once; within the poll interval.
    assert!(canceled_at.elapsed() <= Duration::from_secs(2));
    // The other ignores SIGTERM: SIGKILL after the stop grace (3 s).
    bed.queue.wait_for(acked("b")).await;
    assert!(canceled_at.elapsed() <= Duration::from_secs(5));
    // Dagster wrote the interrupt failure for a; nothing from us for either.
    assert!(
        bed.bridge.verdicts().is_empty(),
        "{:?}",
        bed.bridge.verdicts()
    );

    bed.queue
        .push("late", &step_body(&task_id(13), "run1", "op_c", 0));
    bed.queue.wait_for(acked("late")).await;
    assert_eq!(
        bed.launcher.launches().len(),
        2,
        "a later step of the run never launched"
    );
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn an_operator_stop_of_a_step_in_a_live_run_reports_why() {
    use dagster_taskiq_controller::state::StopReason;
    let bed = bed(Duration::from_secs(1));
    bed.launcher.outcome("op_a", FakeOutcome::HangIgnoringTerm);
    bed.queue
        .push("m1", &step_body(&task_id(14), "run1", "op_a", 0));
    let handle = bed.start();
    while bed.launcher.launches().is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(bed.controller.steps.request_stop(
        &task_id(14),
        StopReason::Operator {
            reason: "stuck".into()
        }
    ));
    bed.queue.wait_for(acked("m1")).await;
    let verdicts = bed.bridge.verdicts();
    assert_eq!(verdicts.len(), 1);
    assert!(
        verdicts[0].1.contains("stopped by an operator: stuck"),
        "{verdicts:?}"
    );
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn pushed_terminate_requests_and_run_ends_stop_steps_without_a_poll() {
    use dagster_taskiq_controller::dagster::BridgePush;
    // The fake's poll answers STARTED for every run: only the pushes can stop these steps.
    let bed = bed(Duration::from_secs(1));
    bed.launcher.outcome("op_a", FakeOutcome::Hang);
    bed.launcher.outcome("op_b", FakeOutcome::HangIgnoringTerm);
    bed.launcher.outcome("op_c", FakeOutcome::Hang);
    bed.queue
        .push("a", &step_body(&task_id(15), "run1", "op_a", 0));
    bed.queue
        .push("b", &step_body(&task_id(16), "run1", "op_b", 0));
    bed.queue
        .push("c", &step_body(&task_id(17), "run2", "op_c", 0));
    let handle = bed.start();
    while bed.launcher.launches().len() < 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let terminate = |n: u32, step_key: &str| BridgePush::TerminateStep {
        run_id: "run1".into(),
        step_key: step_key.into(),
        attempt: 0,
        task_id: task_id(n),
    };
    let asked_at = tokio::time::Instant::now();
    bed.bridge.push(terminate(15, "op_a"));
    bed.queue.wait_for(acked("a")).await;
    assert!(asked_at.elapsed() < Duration::from_millis(100));
    // Only the named attempt stopped; Dagster wrote its interrupt failure, so no verdict.
    assert!(!bed.queue.events().contains(&QueueEvent::Acked("b".into())));
    assert!(bed.bridge.verdicts().is_empty());

    // One that ignores SIGTERM is killed after the stop grace (3 s) and gets a verdict.
    let asked_at = tokio::time::Instant::now();
    bed.bridge.push(terminate(16, "op_b"));
    bed.queue.wait_for(acked("b")).await;
    assert!(asked_at.elapsed() <= Duration::from_millis(3100));
    let verdicts = bed.bridge.verdicts();
    assert_eq!(verdicts.len(), 1, "{verdicts:?}");
    assert!(
        verdicts[0]
            .1
            .contains("terminated at the executor's request"),
        "{verdicts:?}"
    );

    let asked_at = tokio::time::Instant::now();
    bed.bridge.push(BridgePush::RunEnded {
        run_id: "run2".into(),
        status: RunStatus::Canceling,
    });
    bed.queue.wait_for(acked("c")).await;
    assert!(asked_at.elapsed() < Duration::from_millis(100));
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_step_longer_than_the_visibility_cap_is_handed_off_and_adopted_back() {
    // Cap 20 s, visibility 3 s: hand-off 5 s before the cap, every 15 s.
    let bed = bed_with_cap(Duration::from_secs(40), Duration::from_secs(20));
    bed.queue
        .push("m1", &step_body(&task_id(20), "run1", "op_a", 0));
    let handle = bed.start();
    bed.queue
        .wait_for(|events| {
            events
                .iter()
                .any(|e| matches!(e, QueueEvent::Acked(id) if id.starts_with("sent")))
        })
        .await;
    let events = bed.queue.events();
    let sent: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, QueueEvent::Sent(_)))
        .collect();
    assert_eq!(sent.len(), 2, "two hand-offs in 40 s: {events:?}");
    assert!(
        events.contains(&QueueEvent::Acked("m1".into())),
        "old message deleted"
    );
    assert_eq!(
        bed.launcher.launches().len(),
        1,
        "adopted, never relaunched"
    );
    assert!(bed.bridge.verdicts().is_empty());
    bed.stop(handle).await;
}

fn continuation_of(body: &str, owner: &str, handoff_at: std::time::SystemTime) -> FakeQueue {
    use dagster_taskiq_controller::queue::continuation;
    let queue = FakeQueue::default();
    let ms = handoff_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    queue.push_with_attributes(
        "continuation",
        body,
        &[
            (continuation::MARKER, "true"),
            (continuation::OWNER, owner),
            (continuation::HANDOFF_AT_MS, &ms),
        ],
    );
    queue
}

#[tokio::test(start_paused = true)]
async fn another_owners_fresh_continuation_is_passed_on_and_a_stale_one_relaunched() {
    let body = step_body(&task_id(21), "run1", "op_a", 0);
    let mut bed = bed(Duration::from_secs(1));
    bed.queue = continuation_of(&body, "other-controller", std::time::SystemTime::now());
    let bed = rebuild(bed);
    let handle = bed.start();
    bed.queue
        .wait_for(|events| {
            events
                .iter()
                .any(|e| matches!(e, QueueEvent::Released(_, _)))
        })
        .await;
    assert!(
        bed.launcher.launches().is_empty(),
        "the owner may still adopt it"
    );
    bed.stop(handle).await;

    let stale = std::time::SystemTime::now() - Duration::from_secs(3600);
    let mut bed = self::bed(Duration::from_secs(1));
    bed.queue = continuation_of(&body, "other-controller", stale);
    let bed = rebuild(bed);
    let handle = bed.start();
    bed.queue
        .wait_for(|events| events.iter().any(|e| matches!(e, QueueEvent::Acked(_))))
        .await;
    assert_eq!(bed.launcher.launches(), vec![task_id(21)]);
    bed.stop(handle).await;
}

/// The same bed with its controller reading from `bed.queue`.
fn rebuild(bed: Bed) -> Bed {
    let c = &bed.controller;
    let controller = Arc::new(Context {
        settings: c.settings.clone(),
        queue: Arc::new(bed.queue.clone()),
        launcher: Arc::new(bed.launcher.clone()),
        bridge: Arc::new(bed.bridge.clone()),
        admission: Admission::new(AdmissionConfig::capped(4)),
        leases: c.leases.clone(),
        claims: c.claims.clone(),
        steps: c.steps.clone(),
        metrics: c.metrics.clone(),
        health: c.health.clone(),
        taskiq: TaskiqCompat::default(),
        draining: CancellationToken::new(),
        abort: CancellationToken::new(),
    });
    Bed { controller, ..bed }
}

#[tokio::test(start_paused = true)]
async fn a_bridge_outage_holds_messages_without_spending_attempts() {
    let bed = bed(Duration::from_secs(1));
    bed.bridge.set_down(true);
    bed.queue
        .push("m1", &step_body(&task_id(30), "run1", "op_a", 0));
    let handle = bed.start();
    // Ten minutes of outage: the message stays held, its lease extended, nothing settled.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(bed.queue.events().is_empty(), "{:?}", bed.queue.events());
    assert!(bed.controller.steps.is_active(&task_id(30)));
    assert!(bed.queue.extend_calls() > 100);
    assert_eq!(unreachable(&bed, "sidecar"), 1);
    bed.bridge.set_down(false);
    bed.queue.wait_for(acked("m1")).await;
    assert_eq!(bed.launcher.launches(), vec![task_id(30)]);
    assert_eq!(unreachable(&bed, "sidecar"), 0);
    bed.stop(handle).await;
}

/// The `dagster_unreachable{cause}` gauge.
fn unreachable(bed: &Bed, cause: &'static str) -> i64 {
    bed.controller
        .metrics
        .dagster_unreachable
        .get_or_create(&[("cause", cause)])
        .get()
}

/// Waits (in paused time) until `condition` holds, for at most `limit`.
async fn until(limit: Duration, what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_dagster_storage_outage_holds_messages_pauses_intake_and_spends_no_attempts() {
    let bed = bed(Duration::from_secs(1));
    bed.bridge.set_storage_down(true);
    bed.queue
        .push("m1", &step_body(&task_id(31), "run1", "op_a", 0));
    let handle = bed.start();
    until(Duration::from_secs(60), "the outage to be noticed", || {
        unreachable(&bed, "storage") == 1
    })
    .await;
    assert!(bed.bridge.probes() > 0, "the storage was probed");
    let metrics = &bed.controller.metrics;
    until(Duration::from_secs(60), "the intake to pause", || {
        metrics.intake_paused.get() == 1
    })
    .await;
    // Arrives during the outage: the intake leaves it in the queue.
    bed.queue
        .push("m2", &step_body(&task_id(32), "run1", "op_b", 0));
    // Ten minutes of outage (far beyond --max-attempts backoffs): nothing settled, nothing
    // received again, the held message's lease extended all along.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(bed.queue.events().is_empty(), "{:?}", bed.queue.events());
    assert_eq!(bed.queue.receive_count("m1"), 1);
    assert_eq!(bed.queue.receive_count("m2"), 0, "intake paused");
    assert!(bed.controller.steps.is_active(&task_id(31)));
    assert!(bed.queue.extend_calls() > 100);
    assert_eq!(metrics.bridge_calls_held.get(), 1);
    assert!(bed.launcher.launches().is_empty());

    bed.bridge.set_storage_down(false);
    bed.queue.wait_for(acked("m1")).await;
    bed.queue.wait_for(acked("m2")).await;
    assert_eq!(bed.launcher.launches().len(), 2);
    assert_eq!(unreachable(&bed, "storage"), 0);
    assert_eq!(metrics.intake_paused.get(), 0);
    assert_eq!(metrics.bridge_calls_held.get(), 0);
    assert_eq!(
        metrics
            .dagster_outages
            .get_or_create(&[("cause", "storage")])
            .get(),
        1
    );
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn an_error_of_one_request_while_dagster_answers_follows_the_error_policy() {
    let bed = bed(Duration::from_secs(1));
    bed.bridge.fail_step_state("op_a");
    bed.queue
        .push("m1", &step_body(&task_id(33), "run1", "op_a", 0));
    bed.queue
        .push("m2", &step_body(&task_id(34), "run1", "op_b", 0));
    let handle = bed.start();
    // The probe answers, so it is this request's error: retried, released with backoff and
    // dead-lettered at --max-attempts (3), while the other step runs.
    bed.queue
        .wait_for(dead_lettered("m1", "attempts_exhausted"))
        .await;
    bed.queue.wait_for(acked("m2")).await;
    assert_eq!(bed.queue.receive_count("m1"), 3);
    assert!(bed.bridge.probes() > 0);
    assert_eq!(unreachable(&bed, "storage"), 0);
    assert_eq!(bed.launcher.launches(), vec![task_id(34)]);
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn draining_while_dagster_is_unreachable_requeues_without_charging_the_delivery() {
    let bed = bed(Duration::from_secs(1));
    bed.bridge.set_storage_down(true);
    bed.queue
        .push("m1", &step_body(&task_id(35), "run1", "op_a", 0));
    let handle = bed.start();
    let metrics = &bed.controller.metrics;
    until(
        Duration::from_secs(60),
        "the message held, the intake paused",
        || metrics.bridge_calls_held.get() == 1 && metrics.intake_paused.get() == 1,
    )
    .await;
    bed.stop(handle).await;
    let events = bed.queue.events();
    assert!(
        matches!(&events[..], [QueueEvent::Sent(_), QueueEvent::Acked(m)] if m == "m1"),
        "a copy carrying its deliveries so far, then the original deleted: {events:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lease_lost_while_waiting_for_dagster_leaves_the_message_alone() {
    let bed = bed(Duration::from_secs(1));
    bed.bridge.set_storage_down(true);
    bed.queue
        .push("m1", &step_body(&task_id(36), "run1", "op_a", 0));
    let handle = bed.start();
    until(Duration::from_secs(60), "the message to be held", || {
        bed.controller.metrics.bridge_calls_held.get() == 1
    })
    .await;
    bed.queue.lose_lease("m1");
    until(Duration::from_secs(60), "the step to let go", || {
        !bed.controller.steps.is_active(&task_id(36))
    })
    .await;
    assert!(bed.queue.events().is_empty(), "{:?}", bed.queue.events());
    assert!(bed.launcher.launches().is_empty());
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_step_that_survives_the_controller_is_handed_over_at_once_on_shutdown() {
    let bed = bed(Duration::from_secs(1));
    bed.launcher.survive_controller(true);
    bed.launcher.outcome("op_a", FakeOutcome::Hang);
    bed.queue
        .push("m1", &step_body(&task_id(10), "run1", "op_a", 0));
    let handle = bed.start();
    while bed.launcher.launches().is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let began = tokio::time::Instant::now();
    bed.stop(handle).await;
    assert!(began.elapsed() < Duration::from_secs(10), "no grace wait");
    assert!(
        bed.launcher.kills().is_empty(),
        "the execution keeps running"
    );
    assert!(bed
        .queue
        .events()
        .contains(&QueueEvent::Released("m1".into(), Duration::ZERO)));
    assert!(bed.bridge.verdicts().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_leaves_a_surviving_step_to_the_new_holder() {
    let bed = bed(Duration::from_secs(1));
    bed.launcher.survive_controller(true);
    bed.launcher.outcome("op_a", FakeOutcome::Hang);
    bed.queue
        .push("m1", &step_body(&task_id(11), "run1", "op_a", 0));
    let handle = bed.start();
    while bed.launcher.launches().is_empty() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bed.queue.lose_lease("m1");
    while bed.controller.steps.is_active(&task_id(11)) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(bed.launcher.kills().is_empty());
    assert!(bed.queue.events().is_empty(), "{:?}", bed.queue.events());
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn invalid_launch_settings_dead_letter_with_a_verdict() {
    let bed = bed(Duration::from_secs(1));
    bed.launcher.refuse(
        "op_a",
        "invalid_launch_tags",
        "ecs/memory: \"lots\" is not a positive whole number of MiB",
    );
    bed.queue
        .push("m1", &step_body(&task_id(12), "run1", "op_a", 0));
    let handle = bed.start();
    bed.queue
        .wait_for(dead_lettered("m1", "invalid_launch_tags"))
        .await;
    let verdicts = bed.bridge.verdicts();
    assert_eq!(verdicts.len(), 1);
    assert!(verdicts[0].1.contains("ecs/memory"), "{verdicts:?}");
    assert!(detail_of(&bed, "m1").ends_with("; verdict recorded in Dagster"));
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn an_execution_that_never_started_is_relaunched_without_a_verdict() {
    let bed = bed(Duration::from_secs(1));
    bed.launcher.outcome(
        "op_a",
        FakeOutcome::Crash(StepExit::Ecs {
            cause: EcsStopCause::CannotPullContainer,
            exit_code: None,
        }),
    );
    bed.queue
        .push("m1", &step_body(&task_id(13), "run1", "op_a", 0));
    let handle = bed.start();
    // Released with backoff, received again and relaunched.
    while bed.launcher.launches().len() < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        bed.queue.events()[0],
        QueueEvent::Released(ref id, delay) if id == "m1" && delay <= Duration::from_secs(1)
    ));
    assert!(bed.bridge.verdicts().is_empty());
    bed.stop(handle).await;
}

// ---- dagster-taskiq compatibility: taskiq results and extended payloads ------------------

fn taskiq_bed(store: &FakeObjectStore) -> Bed {
    let taskiq = TaskiqCompat::new(Arc::new(store.clone()), Some("results".into()), "")
        .with_payloads(vec!["payloads".into()], 8 << 20)
        .with_retry_budget(Duration::from_secs(1));
    bed_with(
        Duration::from_secs(1),
        Duration::from_secs(12 * 3600),
        taskiq,
    )
}

/// A body as dagster-taskiq sends it: no labels, `print_serialized_events` in the args.
fn taskiq_body(id: u32, step_key: &str) -> String {
    let mut body: serde_json::Value =
        serde_json::from_str(&step_body(&task_id(id), "run1", step_key, 0)).unwrap();
    body["labels"] = serde_json::json!({});
    body["kwargs"]["execute_step_args_packed"]["print_serialized_events"] = true.into();
    body.to_string()
}

fn result_of(store: &FakeObjectStore, id: u32) -> serde_json::Value {
    serde_json::from_slice(&store.object("results", &task_id(id)).expect("a result")).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_finished_step_gets_a_taskiq_result_with_its_events_and_a_crash_an_error() {
    let store = FakeObjectStore::default();
    let bed = taskiq_bed(&store);
    bed.launcher
        .outcome("op_b", FakeOutcome::Crash(StepExit::Code(3)));
    bed.queue.push("m1", &taskiq_body(1, "op_a"));
    bed.queue.push("m2", &taskiq_body(2, "op_b"));
    let handle = bed.start();
    bed.queue.wait_for(acked("m1")).await;
    bed.queue.wait_for(acked("m2")).await;
    let ok = result_of(&store, 1);
    assert_eq!(ok["is_err"], false);
    assert_eq!(
        ok["return_value"],
        serde_json::json!([fake_event_line("op_a", "STEP_SUCCESS")])
    );
    assert!(ok["execution_time"].as_f64().unwrap() >= 1.0);
    let crash = result_of(&store, 2);
    assert_eq!(crash["is_err"], true);
    let message = crash["error"]["exc_message"][0].as_str().unwrap();
    assert!(message.contains("exited with code 3"), "{message}");
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn the_message_stays_until_its_result_is_written() {
    let store = FakeObjectStore::default();
    let bed = taskiq_bed(&store);
    bed.queue.push("m1", &taskiq_body(1, "op_a"));
    store.fail_next(1_000);
    let handle = bed.start();
    bed.queue
        .wait_for(|events| {
            events
                .iter()
                .any(|e| matches!(e, QueueEvent::Released(id, _) if id == "m1"))
        })
        .await;
    assert!(!bed.queue.events().contains(&QueueEvent::Acked("m1".into())));
    // S3 is back: the redelivery finds the attempt finished and writes the kept events.
    store.fail_next(0);
    bed.queue.wait_for(acked("m1")).await;
    assert_eq!(bed.launcher.launches(), vec![task_id(1)]);
    assert_eq!(result_of(&store, 1)["is_err"], false);
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn an_extended_message_is_resolved_from_s3_and_run() {
    let store = FakeObjectStore::default();
    let bed = taskiq_bed(&store);
    let mut body: serde_json::Value = serde_json::from_str(&taskiq_body(5, "op_a")).unwrap();
    body["kwargs"]["executable_dict"] =
        serde_json::json!({"padding": "x".repeat(envelope::MAX_BODY_BYTES)});
    store.insert("payloads", "t5.json", body.to_string().into_bytes());
    bed.queue.push_with_attributes(
        "m5",
        r#"{"s3_bucket": "payloads", "s3_key": "t5.json"}"#,
        &[("s3_extended_message", "True")],
    );
    let handle = bed.start();
    bed.queue.wait_for(acked("m5")).await;
    assert_eq!(bed.launcher.launches(), vec![task_id(5)]);
    assert_eq!(result_of(&store, 5)["is_err"], false);
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_skipped_step_of_a_canceled_run_gets_an_error_result() {
    let store = FakeObjectStore::default();
    let bed = taskiq_bed(&store);
    bed.bridge.set_run_status("run1", RunStatus::Canceled);
    bed.queue.push("m6", &taskiq_body(6, "op_a"));
    let handle = bed.start();
    bed.queue.wait_for(acked("m6")).await;
    assert!(bed.launcher.launches().is_empty());
    assert_eq!(result_of(&store, 6)["is_err"], true);
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_message_that_waits_too_long_for_a_slot_is_requeued_with_its_deliveries() {
    let bed = bed_with_admission(
        Duration::from_secs(60),
        Duration::from_secs(12 * 3600),
        AdmissionConfig {
            prefetch: 1,
            ..AdmissionConfig::capped(1)
        },
        Some(Duration::from_secs(10)),
    );
    bed.queue
        .push("long", &step_body(&task_id(20), "run1", "op_a", 0));
    let handle = bed.start();
    launched(&bed, &task_id(20)).await;
    bed.queue
        .push("waits", &step_body(&task_id(21), "run1", "op_b", 0));
    // Held, not startable (the one slot is busy): after 10 s it goes back as a copy.
    bed.queue.wait_for(acked("waits")).await;
    let events = bed.queue.events();
    assert!(
        events.iter().any(|e| matches!(e, QueueEvent::Sent(_))),
        "{events:?}"
    );
    assert_eq!(bed.launcher.launches(), vec![task_id(20)]);
    // The copy (and its own requeues) run once the slot frees; never dead-lettered.
    bed.queue.wait_for(acked("long")).await;
    launched(&bed, &task_id(21)).await;
    assert!(!bed
        .queue
        .events()
        .iter()
        .any(|e| matches!(e, QueueEvent::DeadLettered(..))));
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn an_exited_steps_slot_goes_to_the_next_step_before_its_outcome_is_read() {
    let bed = bed_with_admission(
        Duration::from_secs(1),
        Duration::from_secs(12 * 3600),
        AdmissionConfig {
            prefetch: 1,
            ..AdmissionConfig::capped(1)
        },
        None,
    );
    bed.queue
        .push("first", &step_body(&task_id(23), "run1", "op_a", 0));
    let handle = bed.start();
    launched(&bed, &task_id(23)).await;
    let first_launched = tokio::time::Instant::now();
    // Once it has exited (after 1 s), its outcome cannot be read for the call budget (5 s).
    bed.bridge.fail_step_state("op_a");
    bed.queue
        .push("next", &step_body(&task_id(24), "run1", "op_b", 0));
    launched(&bed, &task_id(24)).await;
    let waited = first_launched.elapsed();
    assert!(
        waited < Duration::from_secs(4),
        "the one slot came free {waited:?} after the first step started"
    );
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_requeued_copy_keeps_counting_the_deliveries_before_it() {
    let bed = bed(Duration::from_secs(1));
    bed.queue.push_with_attributes(
        "copy",
        &step_body(&task_id(22), "run1", "op_a", 0),
        &[(
            dagster_taskiq_controller::queue::continuation::PRIOR_DELIVERIES,
            "3",
        )],
    );
    let handle = bed.start();
    // First delivery of the copy + 3 before it: past max_attempts (3).
    bed.queue
        .wait_for(dead_lettered("copy", "attempts_exhausted"))
        .await;
    assert!(bed.launcher.launches().is_empty());
    bed.stop(handle).await;
}

/// Waits (in paused time) until the launcher has started this task.
async fn launched(bed: &Bed, task_id: &str) {
    for _ in 0..10_000 {
        if bed.launcher.launches().iter().any(|t| t == task_id) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{task_id} was never launched");
}

#[tokio::test(start_paused = true)]
async fn a_surviving_execution_is_adopted_even_past_max_attempts() {
    use dagster_taskiq_controller::launcher::Launcher;
    let body = step_body(&task_id(30), "run1", "op_a", 0);
    let bed = bed_with_receive_count(&body, 4);
    bed.launcher.survive_controller(true);
    // An earlier controller started it (an ECS task that outlived it).
    let step = envelope::decode(&body).unwrap();
    let earlier = bed.launcher.launch(&step).await.unwrap();
    let handle = bed.start();
    bed.queue.wait_for(acked("m1")).await;
    assert!(!bed
        .queue
        .events()
        .iter()
        .any(|e| matches!(e, QueueEvent::DeadLettered(..))));
    assert!(
        bed.bridge.verdicts().is_empty(),
        "{:?}",
        bed.bridge.verdicts()
    );
    drop(earlier);
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_queue_that_returns_more_than_asked_gets_the_extra_back_unharmed() {
    // Four slots, six messages in one receive: the two without a slot go back at once and
    // run later; nothing panics, nothing runs twice.
    let bed = bed(Duration::from_secs(2));
    bed.queue.overdeliver(10);
    for n in 1..=6 {
        bed.queue.push(
            &format!("m{n}"),
            &step_body(&task_id(n), "run1", &format!("op_{n}"), 0),
        );
    }
    let handle = bed.start();
    for n in 1..=6 {
        bed.queue.wait_for(acked(&format!("m{n}"))).await;
    }
    let mut launches = bed.launcher.launches();
    launches.sort();
    assert_eq!(launches, (1..=6).map(task_id).collect::<Vec<_>>());
    let given_back = bed
        .queue
        .events()
        .into_iter()
        .filter(|e| matches!(e, QueueEvent::Released(_, delay) if delay.is_zero()))
        .count();
    assert!(given_back >= 2, "{:?}", bed.queue.events());
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_requeued_copy_received_while_its_original_settles_is_not_adopted() {
    // Room to receive the copy at once: it arrives while the original's task is still
    // deleting the original. It is another message, not a redelivery of the held one, so it
    // must not take over the original's lease (which is dropped a moment later, leaving the
    // copy in flight with nobody holding it): it is given back and runs once the slot frees.
    let bed = bed_with_admission(
        Duration::from_secs(30),
        Duration::from_secs(12 * 3600),
        AdmissionConfig {
            prefetch: 4,
            ..AdmissionConfig::capped(1)
        },
        Some(Duration::from_secs(1)),
    );
    bed.queue
        .push("long", &step_body(&task_id(40), "run1", "op_a", 0));
    let handle = bed.start();
    launched(&bed, &task_id(40)).await;
    bed.queue
        .push("waits", &step_body(&task_id(41), "run1", "op_b", 0));
    bed.queue.wait_for(acked("long")).await;
    tokio::time::timeout(Duration::from_secs(120), launched(&bed, &task_id(41)))
        .await
        .unwrap_or_else(|_| panic!("the requeued step never ran: {:?}", bed.queue.events()));
    bed.stop(handle).await;
}

// --- durable claims: several replicas, one execution per attempt ------------------------------

/// Another replica on the same queue, Dagster and launcher, with tables of its own.
fn replica(bed: &Bed, controller_id: &str) -> Arc<Context> {
    let settings = Settings {
        controller_id: controller_id.into(),
        ..bed.controller.settings.clone()
    };
    context(
        settings,
        (&bed.queue, &bed.bridge, &bed.launcher),
        AdmissionConfig::capped(1),
        Duration::from_secs(12 * 3600),
        TaskiqCompat::default(),
    )
}

fn claims_counted(ctx: &Context, result: &'static str) -> u64 {
    ctx.metrics
        .claims
        .get_or_create(&[("result", result)])
        .get()
}

fn one_at_a_time(step_duration: Duration) -> Bed {
    bed_with_admission(
        step_duration,
        Duration::from_secs(12 * 3600),
        AdmissionConfig::capped(1),
        None,
    )
}

#[tokio::test(start_paused = true)]
async fn two_copies_on_two_replicas_run_the_attempt_once() {
    let bed = one_at_a_time(Duration::from_secs(20));
    let body = step_body(&task_id(50), "run1", "op_a", 0);
    bed.queue.push("copy1", &body);
    bed.queue.push("copy2", &body);
    let first = bed.start();
    let other = replica(&bed, "other");
    let second = tokio::spawn(controller::run(other.clone()));
    bed.queue
        .wait_for(|events| acked("copy1")(events) && acked("copy2")(events))
        .await;
    assert_eq!(bed.launcher.launches(), vec![task_id(50)]);
    let duplicates =
        claims_counted(&bed.controller, "duplicate") + claims_counted(&other, "duplicate");
    assert_eq!(duplicates, 1, "{:?}", bed.queue.events());
    assert!(bed.bridge.verdicts().is_empty());
    assert_eq!(
        bed.bridge.claim("run1", "op_a", 0),
        None,
        "let go of at the end"
    );
    other.draining.cancel();
    second.await.unwrap();
    bed.stop(first).await;
}

fn foreign_claim(holder: &str, message_id: &str) -> Claim {
    Claim {
        holder: holder.into(),
        token: format!("{holder}-token"),
        message_id: message_id.into(),
        beat: 3,
        ended: None,
    }
}

#[tokio::test(start_paused = true)]
async fn the_claim_of_a_holder_that_lost_this_very_message_is_taken_over_after_the_fence_grace() {
    let bed = one_at_a_time(Duration::from_secs(1));
    bed.bridge
        .put_claim("run1", "op_a", 0, foreign_claim("dead", "m1"));
    bed.queue
        .push("m1", &step_body(&task_id(51), "run1", "op_a", 0));
    let started = tokio::time::Instant::now();
    let handle = bed.start();
    bed.queue.wait_for(acked("m1")).await;
    assert_eq!(bed.launcher.launches(), vec![task_id(51)]);
    assert_eq!(claims_counted(&bed.controller, "took_over"), 1);
    // Two renewal rounds (1 s each at a 3 s visibility) and the 5 s margin.
    assert!(
        started.elapsed() >= Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn the_claim_of_a_dead_holder_whose_execution_survives_is_taken_over_at_once_and_adopted() {
    use dagster_taskiq_controller::launcher::Launcher;
    let bed = one_at_a_time(Duration::from_secs(1));
    bed.launcher.survive_controller(true);
    let body = step_body(&task_id(56), "run1", "op_a", 0);
    // A controller that died left its claim and its execution (an ECS task) behind.
    let step = envelope::decode(&body).unwrap();
    let earlier = bed.launcher.launch(&step).await.unwrap();
    bed.bridge
        .put_claim("run1", "op_a", 0, foreign_claim("dead", "m1"));
    bed.queue.push("m1", &body);
    let started = tokio::time::Instant::now();
    let handle = bed.start();
    bed.queue.wait_for(acked("m1")).await;
    assert_eq!(claims_counted(&bed.controller, "took_over"), 1);
    // No fence grace: adopting starts no second execution.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(bed.bridge.verdicts().is_empty());
    drop(earlier);
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_copy_whose_holder_never_beats_again_waits_for_the_stale_time_then_runs() {
    let bed = one_at_a_time(Duration::from_secs(1));
    bed.bridge
        .put_claim("run1", "op_a", 0, foreign_claim("silent", "elsewhere"));
    bed.queue
        .push("copy", &step_body(&task_id(52), "run1", "op_a", 0));
    let started = tokio::time::Instant::now();
    let handle = bed.start();
    bed.queue.wait_for(acked("copy")).await;
    assert!(
        started.elapsed() >= Duration::from_secs(600),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(bed.launcher.launches(), vec![task_id(52)]);
    assert_eq!(claims_counted(&bed.controller, "took_over"), 1);
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_claim_taken_over_while_running_fences_the_step_and_reports_nothing() {
    let bed = one_at_a_time(Duration::from_secs(3600));
    bed.queue
        .push("m1", &step_body(&task_id(53), "run1", "op_a", 0));
    let handle = bed.start();
    launched(&bed, &task_id(53)).await;
    bed.bridge
        .put_claim("run1", "op_a", 0, foreign_claim("usurper", "m2"));
    tokio::time::timeout(Duration::from_secs(10), async {
        while bed.launcher.kills().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the step is fenced within a renewal round");
    assert!(bed.bridge.verdicts().is_empty());
    assert_eq!(
        bed.bridge.claim("run1", "op_a", 0),
        Some(foreign_claim("usurper", "m2")),
        "the new holder's claim is left alone"
    );
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_cannot_renew_for_half_the_stale_time_fences_its_step() {
    let bed = one_at_a_time(Duration::from_secs(3600));
    bed.queue
        .push("m1", &step_body(&task_id(54), "run1", "op_a", 0));
    let handle = bed.start();
    launched(&bed, &task_id(54)).await;
    let cut = tokio::time::Instant::now();
    bed.bridge.set_down(true);
    tokio::time::timeout(Duration::from_secs(400), async {
        while bed.launcher.kills().is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await
    .expect("fenced before another replica may take the claim over");
    assert!(
        cut.elapsed() >= Duration::from_secs(300),
        "{:?}",
        cut.elapsed()
    );
    bed.bridge.set_down(false);
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_copy_of_an_attempt_that_ended_with_a_verdict_is_acked_without_running() {
    let bed = one_at_a_time(Duration::from_secs(1));
    bed.launcher
        .outcome("op_a", FakeOutcome::Crash(StepExit::Signal(9)));
    let body = step_body(&task_id(55), "run1", "op_a", 0);
    bed.queue.push("m1", &body);
    let handle = bed.start();
    bed.queue.wait_for(acked("m1")).await;
    assert_eq!(bed.bridge.verdicts().len(), 1);
    let kept = bed
        .bridge
        .claim("run1", "op_a", 0)
        .expect("kept as the verdict's record");
    assert!(kept.ended.is_some_and(|v| v.contains("SIGKILL")));
    bed.queue.push("late", &body);
    bed.queue.wait_for(acked("late")).await;
    assert_eq!(
        bed.launcher.launches(),
        vec![task_id(55)],
        "the late copy did not run"
    );
    bed.stop(handle).await;
}

// ---- no dead ends: every message of a nameable attempt leaves a verdict first ------------

/// Dead-lettered for any reason.
fn dead_lettered_at_all(id: &str) -> impl Fn(&[QueueEvent]) -> bool + '_ {
    move |events| {
        events
            .iter()
            .any(|e| matches!(e, QueueEvent::DeadLettered(m, _) if m == id))
    }
}

fn detail_of(bed: &Bed, id: &str) -> String {
    bed.queue
        .dead_letter_details()
        .into_iter()
        .find(|(m, _)| m == id)
        .map(|(_, detail)| detail)
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn a_poison_message_that_names_its_attempt_gets_a_verdict_before_its_dead_letter() {
    let bed = bed(Duration::from_secs(1));
    // Dagster unreachable at first: the message must not be dead-lettered without the verdict.
    bed.bridge.set_down(true);
    bed.queue.push(
        "bad",
        &body_with_labels(70, "run1", "op_a", &[("dagster_priority", "high")]),
    );
    bed.queue.push("nameless", "{not json");
    let handle = bed.start();
    bed.queue.wait_for(dead_lettered_at_all("nameless")).await;
    let settled = |events: &[QueueEvent]| {
        events.iter().any(|e| {
            matches!(e, QueueEvent::Released(m, _) | QueueEvent::DeadLettered(m, _) if m == "bad")
        })
    };
    tokio::time::timeout(Duration::from_secs(60), bed.queue.wait_for(settled))
        .await
        .expect("the message settled");
    assert!(
        !dead_lettered_at_all("bad")(&bed.queue.events()),
        "dead-lettered without its verdict: {:?}",
        bed.queue.events()
    );
    assert!(bed.bridge.verdicts().is_empty());
    bed.bridge.set_down(false);
    bed.queue.wait_for(dead_lettered_at_all("bad")).await;
    assert!(bed.queue.events().contains(&QueueEvent::DeadLettered(
        "bad".into(),
        "invalid_label".into()
    )));
    let verdicts = bed.bridge.verdicts();
    assert_eq!(verdicts.len(), 1, "{verdicts:?}");
    assert_eq!(verdicts[0].0, task_id(70));
    assert!(
        verdicts[0].1.contains("dagster_priority") && verdicts[0].1.contains("dead-letter queue"),
        "{verdicts:?}"
    );
    assert!(detail_of(&bed, "bad").ends_with("; verdict recorded in Dagster"));
    assert!(
        detail_of(&bed, "nameless").contains("no verdict possible"),
        "{}",
        detail_of(&bed, "nameless")
    );
    assert!(bed.launcher.launches().is_empty());
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn what_dagster_was_told_survives_the_dead_letters_detail_limit() {
    let bed = bed(Duration::from_secs(1));
    bed.bridge.store_step("run1", "op_a", "job", &[]);
    // Eight op tags the run did not store, each with a long name: the detail names them all,
    // which is longer than the 1000 characters a dead letter keeps.
    let tags: serde_json::Map<String, serde_json::Value> = (0..8)
        .map(|i| (format!("{i}{}", "k".repeat(300)), "v".into()))
        .collect();
    let tags = serde_json::Value::Object(tags).to_string();
    bed.queue.push(
        "long",
        &body_with_labels(73, "run1", "op_a", &[("dagster_tags", &tags)]),
    );
    let handle = bed.start();
    bed.queue.wait_for(dead_lettered_at_all("long")).await;
    let detail = detail_of(&bed, "long");
    assert!(detail.chars().count() <= 1000, "{}", detail.len());
    assert!(
        detail.ends_with("…; verdict recorded in Dagster"),
        "{detail}"
    );
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn an_unknown_run_is_dead_lettered_saying_no_verdict_is_possible() {
    let bed = bed(Duration::from_secs(1));
    bed.bridge.forget_run("gone");
    bed.queue
        .push("m1", &step_body(&task_id(71), "gone", "op_a", 0));
    let handle = bed.start();
    bed.queue.wait_for(dead_lettered_at_all("m1")).await;
    assert!(bed
        .queue
        .events()
        .contains(&QueueEvent::DeadLettered("m1".into(), "unknown_run".into())));
    let detail = detail_of(&bed, "m1");
    assert!(
        detail.contains("does not exist") && detail.contains("no verdict possible"),
        "{detail}"
    );
    assert!(bed.bridge.verdicts().is_empty());
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_bridge_that_rejects_the_attempt_dead_letters_it_saying_no_verdict_was_taken() {
    let bed = bed(Duration::from_secs(1));
    bed.bridge.set_rejecting(true);
    bed.queue
        .push("m1", &step_body(&task_id(72), "run1", "op_a", 0));
    let handle = bed.start();
    bed.queue.wait_for(dead_lettered_at_all("m1")).await;
    assert!(bed.queue.events().contains(&QueueEvent::DeadLettered(
        "m1".into(),
        "bridge_rejected".into()
    )));
    let detail = detail_of(&bed, "m1");
    assert!(
        detail.contains("no verdict possible: Dagster refused it"),
        "{detail}"
    );
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_lost_continuation_stops_the_step_and_leaves_a_verdict() {
    // Cap 20 s: the hand-off comes at 15 s; its continuation never arrives (purged).
    let bed = bed_with_cap(Duration::from_secs(3600), Duration::from_secs(20));
    bed.launcher.outcome("op_a", FakeOutcome::Hang);
    bed.queue.lose_sends(true);
    bed.queue
        .push("m1", &step_body(&task_id(74), "run1", "op_a", 0));
    let began = tokio::time::Instant::now();
    let handle = bed.start();
    tokio::time::timeout(Duration::from_secs(600), async {
        while bed.bridge.verdicts().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a verdict for the attempt whose continuation was lost");
    // The adoption window (60 s) after the hand-off.
    let elapsed = began.elapsed();
    assert!(
        elapsed >= Duration::from_secs(75) && elapsed < Duration::from_secs(80),
        "{elapsed:?}"
    );
    assert_eq!(bed.launcher.kills(), vec![task_id(74)]);
    let verdicts = bed.bridge.verdicts();
    assert!(verdicts[0].1.contains("continuation"), "{verdicts:?}");
    while bed.controller.steps.is_active(&task_id(74)) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let record = bed.controller.steps.get(&task_id(74)).unwrap();
    assert_eq!(record.outcome, Some("continuation_lost"));
    // The claim stays as the verdict's record: a continuation that comes back late is not run.
    let claim = bed
        .bridge
        .claim("run1", "op_a", 0)
        .expect("the claim is kept");
    assert!(
        claim
            .ended
            .as_deref()
            .is_some_and(|v| v.contains("continuation")),
        "{claim:?}"
    );
    assert_eq!(
        serde_json::to_value(record.state).unwrap(),
        serde_json::json!("fenced")
    );
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_message_whose_op_tags_are_not_its_runs_is_refused_with_a_verdict_and_never_launched() {
    let bed = bed(Duration::from_secs(1));
    let role = r#"{"taskRoleArn": "arn:aws:iam::1:role/admin"}"#;
    bed.bridge
        .store_step("run1", "op_a", "job", &[("team", "data")]);
    bed.bridge
        .store_step("run1", "op_b", "job", &[("team", "data")]);
    let forged = serde_json::json!({"team": "data", "ecs/task_overrides": role}).to_string();
    let honest = serde_json::json!({"team": "data"}).to_string();
    bed.queue.push(
        "forged",
        &body_with_labels(81, "run1", "op_a", &[("dagster_tags", &forged)]),
    );
    bed.queue.push(
        "honest",
        &body_with_labels(82, "run1", "op_b", &[("dagster_tags", &honest)]),
    );
    let handle = bed.start();
    bed.queue
        .wait_for(dead_lettered("forged", "tags_mismatch"))
        .await;
    bed.queue.wait_for(acked("honest")).await;
    assert_eq!(bed.launcher.launches(), [task_id(82)]);
    let detail = detail_of(&bed, "forged");
    assert!(
        detail.contains("ecs/task_overrides differ") && detail.contains("verdict recorded"),
        "{detail}"
    );
    assert_eq!(
        bed.bridge.verdicts().len(),
        1,
        "{:?}",
        bed.bridge.verdicts()
    );
    bed.stop(handle).await;
}

#[tokio::test(start_paused = true)]
async fn a_step_launches_with_the_code_location_its_run_stored_and_no_other() {
    let bed = bed(Duration::from_secs(1));
    bed.bridge.store_step("run1", "op_a", "job", &[]);
    bed.bridge.set_location("run1", "op_a", "etl");
    bed.bridge.store_step("run1", "op_b", "job", &[]);
    // A message has no say: whatever it carries, the location is the stored run's.
    let claims = [("dagster_location", "admin"), ("location_name", "admin")];
    bed.queue
        .push("a", &body_with_labels(91, "run1", "op_a", &claims));
    bed.queue
        .push("b", &body_with_labels(92, "run1", "op_b", &claims));
    let handle = bed.start();
    bed.queue.wait_for(acked("a")).await;
    bed.queue.wait_for(acked("b")).await;
    let mut locations = bed.launcher.locations();
    locations.sort();
    assert_eq!(
        locations,
        [(task_id(91), Some("etl".to_owned())), (task_id(92), None)]
    );
    bed.stop(handle).await;
}
