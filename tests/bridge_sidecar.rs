//! The bridge sidecar's process handling with a real child process: a stand-in sidecar (a
//! shell script speaking the same JSON lines) that hangs on demand, so these run in about a
//! second without Python or Dagster. The real bridge runs in python/tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dagster_taskiq_controller::dagster::{
    BridgeError, DagsterBridge, RestartCause, SidecarBridge, SidecarConfig, SidecarState,
};
use dagster_taskiq_controller::metrics::Metrics;
use dagster_taskiq_controller::step_env::StepEnvironment;

/// Answers every request as `ping` does, unless the file `hang` exists in its directory:
/// then it starts a child that sleeps (to show the whole process group dies) and waits on it.
/// While the file `huge` exists, its replies carry 17 MB of padding.
const SIDECAR: &str = r#"
dir=$1
while IFS= read -r line; do
  if [ -e "$dir/hang" ]; then
    sleep 1000 &
    echo $! > "$dir/child.tmp" && mv "$dir/child.tmp" "$dir/child"
    wait
  fi
  id=$(printf '%s' "$line" | sed 's/^{"id":\([0-9]*\),.*/\1/')
  if [ -e "$dir/huge" ]; then
    printf '{"id": %s, "ok": true, "result": {"pad": "' "$id"
    head -c 17000000 /dev/zero | tr '\0' x
    printf '"}}\n'
    continue
  fi
  printf '{"id":%s,"ok":true,"result":{"dagster_version":"stand-in","pid":%s}}\n' "$id" "$$"
done
"#;

struct Bed {
    dir: tempfile::TempDir,
    bridge: SidecarBridge,
    metrics: Arc<Metrics>,
}

fn bed(timeout: Duration, queue_limit: usize) -> Bed {
    let dir = tempfile::tempdir().expect("temp dir");
    let metrics = Arc::new(Metrics::new());
    let config = SidecarConfig {
        program: PathBuf::from("/bin/sh"),
        args: vec![
            "-c".into(),
            SIDECAR.into(),
            "stand-in-sidecar".into(),
            dir.path().display().to_string(),
        ],
        request_timeout: timeout,
        startup_timeout: Duration::from_secs(10),
        queue_limit,
        environment: StepEnvironment::from_process(&Default::default()),
    };
    let bridge = SidecarBridge::new(config, metrics.clone());
    Bed {
        dir,
        bridge,
        metrics,
    }
}

impl Bed {
    fn hang(&self, on: bool) {
        let path = self.dir.path().join("hang");
        if on {
            std::fs::write(path, b"").expect("hang file");
        } else {
            std::fs::remove_file(path).expect("hang file");
        }
    }

    fn restarts(&self, cause: RestartCause) -> u64 {
        self.metrics
            .bridge_restarts
            .get_or_create(&[("cause", cause.name())])
            .get()
    }

    /// The pid of the child the hanging sidecar started, once it has.
    fn hung_child(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.path().join("child"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Gone, or a zombie nobody reaped yet (its parent is dead too).
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `future` once, so that its request is sent before the test goes on.
async fn send<F: std::future::Future + Unpin>(future: &mut F) {
    tokio::select! {
        biased;
        _ = future => panic!("answered although the sidecar hangs"),
        _ = std::future::ready(()) => {}
    }
}

#[tokio::test]
async fn a_sidecar_past_the_deadline_is_killed_with_its_group_and_the_next_request_replaces_it() {
    let timeout = Duration::from_millis(500);
    let bed = bed(timeout, 16);
    assert_eq!(bed.bridge.ping().await.unwrap().dagster_version, "stand-in");
    let first = bed.bridge.status();
    assert_eq!(first.state, SidecarState::Running);
    let first_pid = first.pid.expect("a pid") as i32;

    bed.hang(true);
    let started = Instant::now();
    // Two requests in flight: the one it hangs on, and one queued behind it.
    let (hung, queued) = tokio::join!(bed.bridge.probe(None, None), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        bed.bridge.probe(None, None).await
    });
    let failed_after = started.elapsed();
    assert!(matches!(hung, Err(BridgeError::Timeout(_))), "{hung:?}");
    // The queued one fails as soon as the sidecar is killed, not a deadline later.
    assert!(
        matches!(
            queued,
            Err(BridgeError::Unavailable(_) | BridgeError::Timeout(_))
        ),
        "{queued:?}"
    );
    assert!(failed_after < timeout * 2, "{failed_after:?}");
    let down = bed.bridge.status();
    assert_eq!(
        (down.state, down.cause),
        (SidecarState::Down, RestartCause::Timeout)
    );
    let child = bed
        .hung_child()
        .expect("the hanging sidecar started a child");
    wait_until(Duration::from_secs(5), "the sidecar's group to die", || {
        dead(first_pid) && dead(child)
    })
    .await;

    bed.hang(false);
    bed.bridge
        .probe(None, None)
        .await
        .expect("a new sidecar answers");
    let now = bed.bridge.status();
    assert_eq!(
        (now.state, now.cause),
        (SidecarState::Running, RestartCause::Timeout)
    );
    assert_ne!(now.pid, first.pid);
    assert_eq!(bed.restarts(RestartCause::Start), 1);
    assert_eq!(bed.restarts(RestartCause::Timeout), 1);
    bed.bridge.close().await;
    assert_eq!(bed.bridge.status().state, SidecarState::Stopped);
}

#[tokio::test]
async fn requests_beyond_the_queue_limit_fail_at_once_as_busy() {
    let bed = bed(Duration::from_secs(1), 2);
    bed.bridge.ping().await.unwrap();
    bed.hang(true);
    let mut a = Box::pin(bed.bridge.probe(None, None));
    let mut b = Box::pin(bed.bridge.probe(None, None));
    send(&mut a).await;
    send(&mut b).await;
    let asked = Instant::now();
    let third = bed.bridge.probe(None, None).await;
    assert!(matches!(third, Err(BridgeError::Busy(2))), "{third:?}");
    assert!(asked.elapsed() < Duration::from_millis(200), "not queued");
    // The two waiting ones end with the sidecar (killed at the deadline) ...
    assert!(a.await.is_err());
    assert!(b.await.is_err());
    bed.hang(false);
    // ... and a new one takes requests again.
    bed.bridge
        .probe(None, None)
        .await
        .expect("a new sidecar answers");
    bed.bridge.close().await;
}

#[tokio::test]
async fn a_reply_over_the_limit_fails_its_request_at_once_and_the_sidecar_stays() {
    let bed = bed(Duration::from_secs(60), 4);
    bed.bridge.ping().await.unwrap();
    std::fs::write(bed.dir.path().join("huge"), b"").expect("huge file");
    let asked = Instant::now();
    let err = bed
        .bridge
        .ping()
        .await
        .expect_err("a 17 MB reply is refused");
    match &err {
        BridgeError::Rejected { kind, message } => {
            assert_eq!(kind, "reply_too_large");
            assert!(
                message.contains("over the 16777216-byte limit"),
                "{message}"
            );
        }
        other => panic!("expected reply_too_large, got {other:?}"),
    }
    // At once, not at the request's deadline.
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "{:?}",
        asked.elapsed()
    );
    std::fs::remove_file(bed.dir.path().join("huge")).expect("huge file");
    bed.bridge
        .ping()
        .await
        .expect("the same sidecar answers again");
    assert_eq!(bed.restarts(RestartCause::Timeout), 0);
    assert_eq!(bed.restarts(RestartCause::Exited), 0);
    bed.bridge.close().await;
}

/// A bridge of an older package: `step_states` is an unknown method to it, `step_state`
/// answers an unfinished attempt.
const OLD_SIDECAR: &str = r#"
while IFS= read -r line; do
  id=$(printf '%s' "$line" | sed 's/^{"id":\([0-9]*\),.*/\1/')
  case "$line" in
    *'"method":"step_states"'*)
      printf '{"id":%s,"ok":false,"error":{"kind":"bad_request","message":"unknown method %s"}}\n' "$id" "'step_states'" ;;
    *)
      printf '{"id":%s,"ok":true,"result":{"run_status":"STARTED","terminal_events":0,"attempt_finished":false,"last_terminal":null}}\n' "$id" ;;
  esac
done
"#;

#[tokio::test]
async fn an_older_bridge_without_step_states_is_asked_one_step_at_a_time() {
    let metrics = Arc::new(Metrics::new());
    let config = SidecarConfig {
        program: PathBuf::from("/bin/sh"),
        args: vec!["-c".into(), OLD_SIDECAR.into(), "old-sidecar".into()],
        request_timeout: Duration::from_secs(10),
        startup_timeout: Duration::from_secs(10),
        queue_limit: 16,
        environment: StepEnvironment::from_process(&Default::default()),
    };
    let bridge = SidecarBridge::new(config, metrics.clone());
    let steps: Vec<_> = ["a", "b"]
        .iter()
        .map(|key| {
            let body = dagster_taskiq_controller::fakes::step_body(
                &format!("task-{key}"),
                "run-1",
                key,
                0,
            );
            dagster_taskiq_controller::envelope::decode(&body).expect("valid body")
        })
        .collect();
    let requests = |method: &'static str| {
        metrics
            .bridge_requests
            .get_or_create(&[("method", method)])
            .get()
    };
    for _ in 0..2 {
        let states = bridge.step_states(&steps).await.expect("answered");
        assert_eq!(states.len(), 2);
        assert!(states.iter().all(|s| !s.as_ref().unwrap().attempt_finished));
    }
    // Asked once; after its refusal, one step at a time.
    assert_eq!(requests("step_states"), 1);
    assert_eq!(requests("step_state"), 4);
    bridge.close().await;
}
