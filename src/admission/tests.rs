use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::*;

fn config(max_concurrent: usize) -> AdmissionConfig {
    AdmissionConfig::capped(max_concurrent)
}

fn ticket(run: &str, priority: i32) -> Ticket {
    Ticket {
        run_id: run.to_owned(),
        priority,
        tags: BTreeMap::new(),
    }
}

/// Queues `tickets` behind a full controller, then frees the slot: the order they start in.
async fn start_order(admission: Arc<Admission>, tickets: Vec<(String, Ticket)>) -> Vec<String> {
    let blocker = admission.admit(ticket("blocker", i32::MAX)).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (name, t) in tickets {
        let (admission, order) = (admission.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let slot = admission.admit(t).await;
            order.lock().push(name);
            // Hold the slot a moment so the next grant is a fresh decision.
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(slot);
        }));
        // Queue in a known arrival order.
        tokio::task::yield_now().await;
    }
    drop(blocker);
    for task in tasks {
        task.await.unwrap();
    }
    Arc::try_unwrap(order).unwrap().into_inner()
}

#[tokio::test(start_paused = true)]
async fn higher_priority_starts_first_then_arrival_order() {
    let admission = Arc::new(Admission::new(config(1)));
    let tickets = vec![
        ("low".to_owned(), ticket("r", -5)),
        ("high".to_owned(), ticket("r", 10)),
        ("mid-1".to_owned(), ticket("r", 0)),
        ("mid-2".to_owned(), ticket("r", 0)),
    ];
    let order = start_order(admission, tickets).await;
    assert_eq!(order, ["high", "mid-1", "mid-2", "low"]);
}

#[tokio::test(start_paused = true)]
async fn a_small_run_is_not_starved_by_a_large_one() {
    let admission = Arc::new(Admission::new(config(2)));
    let mut tickets: Vec<(String, Ticket)> = (0..500)
        .map(|i| (format!("big-{i}"), ticket("big", 0)))
        .collect();
    tickets.extend((0..5).map(|i| (format!("small-{i}"), ticket("small", 0))));
    let order = start_order(admission, tickets).await;
    let last_small = order.iter().rposition(|n| n.starts_with("small")).unwrap();
    // Fair share alternates the two runs: the small run is done within its first ~10 grants.
    assert!(last_small < 12, "small run finished at grant {last_small}");
    assert_eq!(order.len(), 505);
}

#[tokio::test(start_paused = true)]
async fn priority_wins_over_fair_share() {
    let admission = Arc::new(Admission::new(config(1)));
    let mut tickets: Vec<(String, Ticket)> = (0..3)
        .map(|i| (format!("urgent-{i}"), ticket("urgent", 5)))
        .collect();
    tickets.push(("other".to_owned(), ticket("other", 0)));
    let order = start_order(admission, tickets).await;
    assert_eq!(order, ["urgent-0", "urgent-1", "urgent-2", "other"]);
}

/// Counts running steps per key and remembers the highest count seen.
#[derive(Default)]
struct Peaks {
    now: Mutex<HashMap<String, usize>>,
    peak: Mutex<HashMap<String, usize>>,
}

impl Peaks {
    fn enter(&self, keys: &[String]) {
        let mut now = self.now.lock();
        let mut peak = self.peak.lock();
        for key in keys {
            let n = now.entry(key.clone()).or_default();
            *n += 1;
            let p = peak.entry(key.clone()).or_default();
            *p = (*p).max(*n);
        }
    }

    fn leave(&self, keys: &[String]) {
        let mut now = self.now.lock();
        for key in keys {
            *now.get_mut(key).unwrap() -= 1;
        }
    }

    fn peak(&self, key: &str) -> usize {
        self.peak.lock().get(key).copied().unwrap_or(0)
    }
}

#[tokio::test(start_paused = true)]
async fn global_per_run_and_tag_caps_are_never_exceeded() {
    let admission = Arc::new(Admission::new(AdmissionConfig {
        max_per_run: Some(3),
        tag_limits: vec![
            "database=redshift:2".parse().unwrap(),
            "team:4".parse().unwrap(),
            "shard=*:1".parse().unwrap(),
        ],
        ..config(6)
    }));
    let peaks = Arc::new(Peaks::default());
    let finished = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..400u64 {
        let mut tags = BTreeMap::new();
        if i % 3 == 0 {
            tags.insert("database".to_owned(), "redshift".to_owned());
        }
        if i % 4 == 0 {
            tags.insert("database".to_owned(), "postgres".to_owned());
        }
        if i % 2 == 0 {
            tags.insert("team".to_owned(), format!("t{}", i % 5));
        }
        if i % 7 == 0 {
            tags.insert("shard".to_owned(), format!("s{}", i % 3));
        }
        let run = format!("run-{}", i % 5);
        let mut keys = vec!["all".to_owned(), format!("run:{run}")];
        if tags.get("database").map(String::as_str) == Some("redshift") {
            keys.push("redshift".into());
        }
        if tags.contains_key("team") {
            keys.push("team".into());
        }
        if let Some(shard) = tags.get("shard") {
            keys.push(format!("shard:{shard}"));
        }
        let ticket = Ticket {
            run_id: run,
            priority: (i % 3) as i32,
            tags,
        };
        let (admission, peaks, finished) = (admission.clone(), peaks.clone(), finished.clone());
        tasks.push(tokio::spawn(async move {
            let slot = admission.admit(ticket).await;
            peaks.enter(&keys);
            tokio::time::sleep(Duration::from_millis(1 + (i * 37) % 50)).await;
            peaks.leave(&keys);
            drop(slot);
            finished.fetch_add(1, Ordering::Relaxed);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(finished.load(Ordering::Relaxed), 400);
    assert_eq!(
        peaks.peak("all"),
        6,
        "the global cap is used fully, never exceeded"
    );
    for run in 0..5 {
        assert!(peaks.peak(&format!("run:run-{run}")) <= 3);
    }
    assert!(peaks.peak("redshift") <= 2 && peaks.peak("redshift") >= 1);
    assert!(peaks.peak("team") <= 4);
    for shard in 0..3 {
        assert!(peaks.peak(&format!("shard:s{shard}")) <= 1);
    }
    let state = admission.view().state();
    assert_eq!((state.running, state.waiting), (0, 0));
    assert_eq!(state.decisions, 400);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_gives_up_leaves_no_trace() {
    let admission = Arc::new(Admission::new(config(1)));
    let first = admission.admit(ticket("r", 0)).await;
    let waiting =
        tokio::time::timeout(Duration::from_secs(1), admission.admit(ticket("r", 0))).await;
    assert!(waiting.is_err(), "no slot while the first holds it");
    assert_eq!(admission.view().state().waiting, 0);
    drop(first);
    // The slot is free again: a new admit succeeds at once.
    let again = tokio::time::timeout(Duration::from_millis(1), admission.admit(ticket("r", 0)));
    assert!(again.await.is_ok());
}

#[tokio::test]
async fn held_messages_are_bounded_by_the_cap_plus_prefetch() {
    let admission = Admission::new(AdmissionConfig {
        prefetch: 3,
        ..config(4)
    });
    let permits: Vec<_> = (0..7).map(|_| admission.try_reserve().unwrap()).collect();
    assert!(
        admission.try_reserve().is_none(),
        "intake stops at 4 running + 3 prefetched"
    );
    assert_eq!(admission.view().state().in_use, 7);
    drop(permits);
    assert_eq!(admission.view().state().in_use, 0);
}

#[tokio::test]
async fn the_launch_rate_is_honoured_over_a_window() {
    // governor keeps its own clock, so this one runs in real time: 1 at once, then 50/s.
    let admission = Admission::new(AdmissionConfig {
        launch_rate: NonZeroU32::new(50),
        ..config(1)
    });
    let started = Instant::now();
    for _ in 0..11 {
        admission.until_launch_allowed().await;
    }
    // Ten launches after the first need at least 10 / 50 s; faster would break the limit.
    assert!(
        started.elapsed() >= Duration::from_millis(195),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn tag_limits_parse_like_dagsters_tag_concurrency_limits() {
    let any: TagLimit = "team:4".parse().unwrap();
    assert_eq!(
        (any.key.as_str(), &any.matches, any.limit),
        ("team", &TagMatch::AnyValue, 4)
    );
    let exact: TagLimit = "database=redshift:2".parse().unwrap();
    assert_eq!(exact.matches, TagMatch::Value("redshift".into()));
    let unique: TagLimit = "dagster/backfill=*:1".parse().unwrap();
    assert_eq!(unique.key, "dagster/backfill");
    assert_eq!(unique.matches, TagMatch::PerUniqueValue);
    // A value may contain '=' and ':'; the limit is after the last ':'.
    let odd: TagLimit = "url=http://x:8080:3".parse().unwrap();
    assert_eq!(odd.matches, TagMatch::Value("http://x:8080".into()));
    assert_eq!(odd.limit, 3);
    for bad in ["team", "team:x", ":3", "=v:3", "team:-1"] {
        assert!(bad.parse::<TagLimit>().is_err(), "{bad} parsed");
    }
    for text in ["team:4", "database=redshift:2", "dagster/backfill=*:1"] {
        assert_eq!(text.parse::<TagLimit>().unwrap().to_string(), text);
    }
}
