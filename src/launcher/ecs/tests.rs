//! The launcher's logic on a fake ECS: launch, adoption, retries, offload, tracking, stop.

use std::io::Read;

use base64::Engine as _;

use super::request::{client_token, started_by, ENV_ARGS_SHA256, ENV_ARGS_URI};
use super::*;
use crate::fakes::ecs::{throttled, FakeEcs};
use crate::fakes::step_body;

const TASK_ID: &str = "0123456789abcdef0123456789abcdef";
const BASE_ARN: &str = "arn:aws:ecs:eu-west-1:123456789012:task-definition/dagster-step:3";
const BASE_IMAGE: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/team-a:1";

fn config(offload: Option<&str>) -> EcsLauncherConfig {
    EcsLauncherConfig {
        cluster: "c".into(),
        task_definition: "dagster-step".into(),
        container: Some("dagster".into()),
        launch_type: Some("FARGATE".into()),
        capacity_provider_strategy: Vec::new(),
        network_configuration: None,
        poll_interval: Duration::from_millis(20),
        run_task_rate: NonZeroU32::new(1000).unwrap(),
        run_task_burst: NonZeroU32::new(1000).unwrap(),
        offload: offload.map(|bucket| OffloadConfig {
            bucket: bucket.into(),
            prefix: "step-args/".into(),
        }),
        controller_id: "ctl-test".into(),
        override_policy: OverridePolicy::new("dagster-step"),
        base: Some(BaseDefinition {
            arn: BASE_ARN.into(),
            container: "dagster".into(),
            image: BASE_IMAGE.into(),
            logs: Some(crate::links::AwsLogs {
                group: "/ecs/steps".into(),
                stream_prefix: Some("steps".into()),
                region: None,
            }),
        }),
    }
}

fn launcher(fake: &FakeEcs, offload: Option<&str>) -> EcsLauncher {
    EcsLauncher::new(
        config(offload),
        Arc::new(fake.clone()),
        Arc::new(fake.clone()),
        Arc::new(Metrics::new()),
    )
}

fn step(delivery: u32) -> StepRequest {
    let mut step =
        crate::envelope::decode(&step_body(TASK_ID, "run-1", "op_a", 0)).expect("valid body");
    step.receive_count = delivery;
    step
}

fn invalid_reason(result: Result<Box<dyn RunningStep>, LaunchError>) -> &'static str {
    match result {
        Err(LaunchError::Invalid { reason, .. }) => reason,
        Err(other) => panic!("expected an invalid launch, got {other}"),
        Ok(_) => panic!("expected an invalid launch, got a task"),
    }
}

#[tokio::test]
async fn first_delivery_launches_one_task_without_looking_for_others() {
    let fake = FakeEcs::default();
    let ecs = launcher(&fake, None);
    let running = ecs.launch(&step(1)).await.unwrap();
    assert!(running.survives_controller());
    assert!(running.locator().starts_with("arn:aws:ecs:"));
    // The task and its log stream (awslogs-stream-prefix/container/task id) are linked.
    let task_id = running.locator().rsplit('/').next().unwrap().to_owned();
    let links = running.links();
    assert_eq!(
        links.iter().map(|l| l.kind).collect::<Vec<_>>(),
        ["ecs_task", "cloudwatch_logs"]
    );
    assert!(
        links[0]
            .url
            .ends_with(&format!("/tasks/{task_id}?region=us-east-1")),
        "{links:?}"
    );
    assert!(
        links[1]
            .url
            .ends_with(&format!("/log-events/steps$252Fdagster$252F{task_id}")),
        "{links:?}"
    );
    let calls = fake.run_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].client_token, client_token(TASK_ID, 1));
    assert_eq!(calls[0].started_by, started_by(TASK_ID));
    assert_eq!(fake.lock().list_calls, 0);
}

#[tokio::test]
async fn redelivery_adopts_the_running_task_instead_of_launching() {
    let fake = FakeEcs::default();
    let arn = fake.add_task(&started_by(TASK_ID), "RUNNING");
    let ecs = launcher(&fake, None);
    let running = ecs.launch(&step(2)).await.unwrap();
    assert_eq!(running.locator(), arn);
    assert!(fake.run_calls().is_empty(), "adopted, not launched");
    assert_eq!(
        fake.lock().list_calls,
        2,
        "running and stopped tasks are both looked up"
    );
}

#[tokio::test]
async fn redelivery_concludes_a_task_that_stopped_after_running() {
    let fake = FakeEcs::default();
    let arn = fake.add_task(&started_by(TASK_ID), "RUNNING");
    fake.finish(
        &arn,
        "EssentialContainerExited",
        Some(137),
        Some("OutOfMemoryError: Container killed due to memory usage"),
    );
    let ecs = launcher(&fake, None);
    let mut running = ecs.launch(&step(3)).await.unwrap();
    assert!(fake.run_calls().is_empty());
    let exit = running.wait().await;
    assert_eq!(
        exit,
        StepExit::Ecs {
            cause: EcsStopCause::OutOfMemory,
            exit_code: Some(137)
        }
    );
    assert!(!exit.relaunch());
    assert!(running
        .stderr_tail()
        .iter()
        .any(|l| l.contains("OutOfMemoryError")));
}

#[tokio::test]
async fn redelivery_after_a_failed_start_launches_a_new_task_with_a_new_token() {
    let fake = FakeEcs::default();
    let arn = fake.add_task(&started_by(TASK_ID), "RUNNING");
    fake.finish(
        &arn,
        "TaskFailedToStart",
        None,
        Some("CannotPullContainerError: pull image manifest has been retried 5 time(s)"),
    );
    let ecs = launcher(&fake, None);
    let running = ecs.launch(&step(2)).await.unwrap();
    assert_ne!(running.locator(), arn);
    let calls = fake.run_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].client_token, client_token(TASK_ID, 2));
}

#[tokio::test]
async fn two_live_tasks_for_one_attempt_keep_the_newest() {
    let fake = FakeEcs::default();
    let older = fake.add_task(&started_by(TASK_ID), "RUNNING");
    let newer = fake.add_task(&started_by(TASK_ID), "RUNNING");
    let ecs = launcher(&fake, None);
    let running = ecs.launch(&step(2)).await.unwrap();
    assert_eq!(running.locator(), newer);
    tokio::time::timeout(Duration::from_secs(5), async {
        while fake.lock().stops.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the duplicate is stopped");
    assert_eq!(fake.lock().stops[0].0, older);
}

#[tokio::test(start_paused = true)]
async fn throttling_in_both_shapes_is_retried_with_the_same_token() {
    let fake = FakeEcs::default();
    fake.lock().run_errors = vec![
        throttled("Rate exceeded"),
        throttled("Rate exceeded (InvalidParameterException)"),
    ];
    assert_eq!(fake.lock().run_errors[1].class, ErrorClass::Throttled);
    let ecs = launcher(&fake, None);
    ecs.launch(&step(1)).await.unwrap();
    let calls = fake.run_calls();
    assert_eq!(calls.len(), 3);
    assert!(calls
        .iter()
        .all(|c| c.client_token == calls[0].client_token));
}

#[tokio::test(start_paused = true)]
async fn persistent_throttling_gives_the_message_back_as_transient() {
    let fake = FakeEcs::default();
    fake.lock().run_errors = (0..RUN_TASK_TRIES)
        .map(|_| throttled("Rate exceeded"))
        .collect();
    let ecs = launcher(&fake, None);
    match ecs.launch(&step(1)).await {
        Err(LaunchError::Transient(message)) => assert!(message.contains("Rate exceeded")),
        Err(other) => panic!("expected transient, got {other}"),
        Ok(_) => panic!("expected transient, got a task"),
    }
    assert_eq!(fake.run_calls().len(), RUN_TASK_TRIES as usize);
}

#[tokio::test(start_paused = true)]
async fn no_capacity_is_retried_and_a_rejected_request_is_permanent() {
    let fake = FakeEcs::default();
    fake.lock().run_failures = vec!["RESOURCE:MEMORY".into()];
    let ecs = launcher(&fake, None);
    ecs.launch(&step(1)).await.unwrap();
    assert_eq!(fake.run_calls().len(), 2);

    fake.lock().run_errors = vec![crate::fakes::ecs::error(ErrorClass::Permanent)];
    match ecs.launch(&step(1)).await {
        Err(LaunchError::Permanent(_)) => {}
        Err(other) => panic!("expected permanent, got {other}"),
        Ok(_) => panic!("expected permanent, got a task"),
    }
}

#[tokio::test]
async fn invalid_tags_are_refused_before_any_call() {
    let fake = FakeEcs::default();
    let ecs = launcher(&fake, None);
    let mut bad = step(1);
    bad.tags.insert("ecs/memory".into(), "a lot".into());
    assert_eq!(
        invalid_reason(ecs.launch(&bad).await),
        "invalid_launch_tags"
    );
    assert!(fake.run_calls().is_empty());
    assert_eq!(fake.lock().list_calls, 0);
}

#[tokio::test]
async fn refused_overrides_are_refused_before_any_call_with_their_own_reason() {
    let fake = FakeEcs::default();
    let ecs = launcher(&fake, None);
    for (tag, value) in [
        (
            "ecs/task_overrides",
            r#"{"taskRoleArn": "arn:aws:iam::1:role/admin"}"#,
        ),
        (
            "ecs/run_task_kwargs",
            r#"{"networkConfiguration": {"awsvpcConfiguration": {"subnets": ["subnet-x"]}}}"#,
        ),
        ("ecs/run_task_kwargs", r#"{"enableExecuteCommand": true}"#),
    ] {
        let mut hostile = step(1);
        hostile.tags.insert(tag.into(), value.into());
        let Err(LaunchError::Invalid { reason, detail }) = ecs.launch(&hostile).await else {
            panic!("{tag}={value} was not refused");
        };
        assert_eq!(reason, "launch_override_refused", "{detail}");
        assert!(detail.starts_with(&format!("{tag}: ")), "{detail}");
    }
    assert!(fake.run_calls().is_empty());
    assert_eq!(fake.lock().list_calls, 0);
}

#[tokio::test]
async fn a_redelivery_adopts_its_task_even_when_the_policy_now_refuses_its_tags() {
    // Launched under a policy that allowed the role; the operator has since removed it.
    let fake = FakeEcs::default();
    let arn = fake.add_task(&started_by(TASK_ID), "RUNNING");
    let ecs = launcher(&fake, None);
    let mut redelivered = step(2);
    redelivered.tags.insert(
        "ecs/task_overrides".into(),
        r#"{"taskRoleArn": "arn:aws:iam::1:role/was-allowed"}"#.into(),
    );
    let running = ecs.launch(&redelivered).await.unwrap();
    assert_eq!(running.locator(), arn);
    // Without a task to adopt, the same redelivery is refused and nothing is launched.
    let fake = FakeEcs::default();
    let ecs = launcher(&fake, None);
    assert_eq!(
        invalid_reason(ecs.launch(&redelivered).await),
        "launch_override_refused"
    );
    assert!(fake.run_calls().is_empty());
}

fn big_step() -> StepRequest {
    // ~20 KB of incompressible op config inside the packed args.
    let noise: String = (0..20_000u32)
        .map(|i| {
            let x = i.wrapping_mul(2_654_435_761).rotate_left(7) ^ 0x9e37_79b9;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    let mut body: serde_json::Value =
        serde_json::from_str(&step_body(TASK_ID, "run-1", "op_a", 0)).unwrap();
    body["kwargs"]["execute_step_args_packed"]["noise"] = noise.into();
    let mut step = crate::envelope::decode(&body.to_string()).unwrap();
    step.receive_count = 1;
    step
}

#[tokio::test]
async fn step_args_that_do_not_fit_are_offloaded_behind_a_pointer() {
    let fake = FakeEcs::default();
    let ecs = launcher(&fake, Some("bucket-1"));
    let step = big_step();
    ecs.launch(&step).await.unwrap();
    let (bucket, key, body) = fake.lock().puts[0].clone();
    // Keyed by the content's hash, not by the message's task id.
    let sha256 = hex::encode(Sha256::digest(&body));
    assert_eq!(
        (bucket.as_str(), key.as_str()),
        ("bucket-1", format!("step-args/{sha256}").as_str())
    );
    // The object is exactly DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS.
    assert_eq!(body, step.compressed_step_args().into_bytes());
    let compressed = base64::engine::general_purpose::STANDARD
        .decode(&body)
        .unwrap();
    let mut json = String::new();
    flate2::read::ZlibDecoder::new(&compressed[..])
        .read_to_string(&mut json)
        .unwrap();
    assert_eq!(json, step.step_args_json.get());

    let request = &fake.run_calls()[0];
    assert!(request.overrides_fit());
    let env: std::collections::BTreeMap<_, _> = request.overrides.container_overrides[0]
        .environment
        .iter()
        .map(|kv| (kv.name.as_str(), kv.value.as_str()))
        .collect();
    assert_eq!(
        env[ENV_ARGS_URI],
        format!("s3://bucket-1/step-args/{sha256}")
    );
    assert_eq!(env[ENV_ARGS_SHA256], sha256);
}

#[tokio::test]
async fn step_args_that_do_not_fit_without_a_bucket_are_refused() {
    let fake = FakeEcs::default();
    let ecs = launcher(&fake, None);
    assert_eq!(
        invalid_reason(ecs.launch(&big_step()).await),
        "overrides_too_large"
    );
    assert!(fake.run_calls().is_empty());
}

#[tokio::test]
async fn one_describe_call_per_hundred_tracked_tasks() {
    let fake = FakeEcs::default();
    let tracker = Tracker::new(
        "c".into(),
        Duration::from_secs(3600),
        Arc::new(fake.clone()),
        Arc::new(Metrics::new()),
    );
    let mut receivers = Vec::new();
    for _ in 0..250 {
        let arn = fake.add_task("someone", "RUNNING");
        receivers.push((arn.clone(), tracker.track(&arn, None)));
    }
    tracker.poll().await;
    assert_eq!(fake.lock().describe_batches, vec![100, 100, 50]);

    // Stopped tasks resolve and leave the poll; dropped waiters are no longer polled.
    let (first, _) = receivers.remove(0);
    fake.finish(&first, "EssentialContainerExited", Some(0), None);
    receivers.truncate(99);
    let mut first_rx = tracker.track(&first, None);
    tracker.poll().await;
    assert!(first_rx.wait_for(Tracked::is_final).await.is_ok());
    tracker.poll().await;
    // 99 waiters plus the stopped task in the first poll, then only the 99.
    assert_eq!(fake.lock().describe_batches[3..], [100, 99]);
}

#[tokio::test]
async fn a_task_that_ecs_forgets_ends_as_vanished() {
    let fake = FakeEcs::default();
    let tracker = Tracker::new(
        "c".into(),
        Duration::from_secs(3600),
        Arc::new(fake.clone()),
        Arc::new(Metrics::new()),
    );
    let rx = tracker.track("arn:aws:ecs:us-east-1:1:task/c/gone", None);
    for _ in 0..3 {
        tracker.poll().await;
    }
    assert_eq!(*rx.borrow(), Tracked::Vanished);
    assert_eq!(tracker.tracked(), 0);
}

#[tokio::test]
async fn wait_resolves_from_the_tracker_and_terminate_sends_stop_task() {
    let fake = FakeEcs::default();
    let ecs = launcher(&fake, None);
    let mut running = ecs.launch(&step(1)).await.unwrap();
    let arn = running.locator();
    running.terminate();
    tokio::time::timeout(Duration::from_secs(5), async {
        while fake.lock().stops.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("StopTask sent");
    let (stopped, reason) = fake.lock().stops[0].clone();
    assert_eq!(stopped, arn);
    assert!(
        reason.starts_with("dagster-taskiq-controller: "),
        "{reason}"
    );
    fake.finish(
        &arn,
        "UserInitiated",
        Some(143),
        Some("dagster-taskiq-controller: step terminated"),
    );
    let exit = tokio::time::timeout(Duration::from_secs(5), running.wait())
        .await
        .expect("the tracker reports the stop");
    assert_eq!(
        exit,
        StepExit::Ecs {
            cause: EcsStopCause::StoppedByUser,
            exit_code: Some(143)
        }
    );
    assert_eq!(exit.short(), "ecs UserInitiated exit code 143");
}

// ---- a task definition per image (task_definitions.rs) ----------------------------------------

const TEAM_B: &str = "registry.example/team-b:1";
const TEAM_C: &str = "registry.example/team-c:1";
const TOKEN_ARN: &str = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:token-AbCd";

fn image_launcher(fake: &FakeEcs) -> EcsLauncher {
    let mut config = config(None);
    config.override_policy.image_prefixes = vec![
        "registry.example/team-b".into(),
        "registry.example/team-c".into(),
    ];
    EcsLauncher::new(
        config,
        Arc::new(fake.clone()),
        Arc::new(fake.clone()),
        Arc::new(Metrics::new()),
    )
}

fn run_step(task_id: &str, image: Option<&str>, secrets: &[(&str, &str)]) -> StepRequest {
    let mut step =
        crate::envelope::decode(&step_body(task_id, "run-1", "op_a", 0)).expect("valid body");
    step.receive_count = 1;
    step.stored_ecs = Some(crate::dagster::StoredEcs {
        image: image.map(str::to_owned),
        env_vars: vec!["GREETING=hello".into()],
        secrets: secrets
            .iter()
            .map(|(name, from)| crate::dagster::StoredSecret {
                name: name.to_string(),
                value_from: from.to_string(),
            })
            .collect(),
    });
    step
}

fn task_id(n: u8) -> String {
    format!("{n:032x}")
}

#[test]
fn a_derived_family_is_the_base_family_and_a_hash_of_what_differs() {
    let base = BaseDefinition {
        arn: BASE_ARN.into(),
        container: "dagster".into(),
        image: BASE_IMAGE.into(),
        logs: None,
    };
    let b = task_definitions::derived_family(&base, TEAM_B, &[]);
    assert!(
        b.starts_with("dagster-step-") && b.len() == "dagster-step-".len() + 12,
        "{b}"
    );
    assert_eq!(b, task_definitions::derived_family(&base, TEAM_B, &[]));
    assert_ne!(b, task_definitions::derived_family(&base, TEAM_C, &[]));
    let secret = request::Secret {
        name: "TOKEN".into(),
        value_from: TOKEN_ARN.into(),
    };
    assert_ne!(
        b,
        task_definitions::derived_family(&base, TEAM_B, &[secret])
    );
    // A new revision of the base makes new families: a copy never outlives its original.
    let newer = BaseDefinition {
        arn: BASE_ARN.replace(":3", ":4"),
        ..base.clone()
    };
    assert_ne!(b, task_definitions::derived_family(&newer, TEAM_B, &[]));
    // ECS's 255-character limit holds for the longest base family.
    let long = BaseDefinition {
        arn: format!("{}:1", "f".repeat(255)),
        ..base
    };
    assert_eq!(
        task_definitions::derived_family(&long, TEAM_B, &[]).len(),
        255
    );
}

#[tokio::test]
async fn each_image_gets_its_own_task_definition_registered_once_and_cached() {
    let fake = FakeEcs::default();
    let ecs = image_launcher(&fake);
    // The base image and no secrets: the controller's task definition, nothing registered.
    ecs.launch(&run_step(&task_id(1), Some(BASE_IMAGE), &[]))
        .await
        .unwrap();
    ecs.launch(&run_step(&task_id(2), None, &[])).await.unwrap();
    for image in [TEAM_B, TEAM_C, TEAM_B, TEAM_C] {
        let n = fake.run_calls().len() as u8 + 1;
        ecs.launch(&run_step(&task_id(n), Some(image), &[]))
            .await
            .unwrap();
    }
    let calls = fake.run_calls();
    assert_eq!(calls[0].task_definition, "dagster-step");
    assert_eq!(calls[1].task_definition, "dagster-step");
    let inner = fake.lock();
    // Two registrations, both copies of the revision read at start.
    assert_eq!(inner.registrations.len(), 2, "{:?}", inner.registrations);
    assert!(inner.registrations.iter().all(|(base, _)| base == BASE_ARN));
    // Looked up once per image (then remembered).
    assert_eq!(inner.describe_definition_calls, 2);
    let image_of = |arn: &str| {
        let family = arn.rsplit('/').next().unwrap().split(':').next().unwrap();
        inner.task_definitions[family][0].containers[0]
            .image
            .clone()
    };
    assert_eq!(image_of(&calls[2].task_definition), TEAM_B);
    assert_eq!(image_of(&calls[3].task_definition), TEAM_C);
    assert_eq!(calls[4].task_definition, calls[2].task_definition);
    assert_eq!(calls[5].task_definition, calls[3].task_definition);
    // The run's env_vars are in the step container's overrides.
    let env = &calls[2].overrides.container_overrides[0].environment;
    assert!(env
        .iter()
        .any(|kv| kv.name == "GREETING" && kv.value == "hello"));
}

#[tokio::test]
async fn a_task_definition_another_replica_registered_is_reused() {
    let fake = FakeEcs::default();
    let first = image_launcher(&fake);
    first
        .launch(&run_step(&task_id(1), Some(TEAM_B), &[]))
        .await
        .unwrap();
    // A second replica (fresh memory) finds it with DescribeTaskDefinition.
    let second = image_launcher(&fake);
    second
        .launch(&run_step(&task_id(2), Some(TEAM_B), &[]))
        .await
        .unwrap();
    let calls = fake.run_calls();
    assert_eq!(calls[0].task_definition, calls[1].task_definition);
    assert_eq!(fake.lock().registrations.len(), 1);
    assert_eq!(fake.lock().describe_definition_calls, 2);
}

#[tokio::test]
async fn a_revision_that_does_not_match_its_family_is_not_reused() {
    let fake = FakeEcs::default();
    let ecs = image_launcher(&fake);
    ecs.launch(&run_step(&task_id(1), Some(TEAM_B), &[]))
        .await
        .unwrap();
    let family = {
        let arn = &fake.run_calls()[0].task_definition;
        arn.rsplit('/')
            .next()
            .unwrap()
            .split(':')
            .next()
            .unwrap()
            .to_owned()
    };
    // Someone registers another image into the family.
    fake.lock()
        .task_definitions
        .get_mut(&family)
        .unwrap()
        .last_mut()
        .unwrap()
        .containers[0]
        .image = "evil.example/x:1".into();
    let other = image_launcher(&fake);
    other
        .launch(&run_step(&task_id(2), Some(TEAM_B), &[]))
        .await
        .unwrap();
    let calls = fake.run_calls();
    assert!(
        calls[1].task_definition.ends_with(&format!("{family}:2")),
        "{}",
        calls[1].task_definition
    );
    assert_eq!(fake.lock().registrations.len(), 2);
}

#[tokio::test]
async fn secrets_make_a_task_definition_even_for_the_base_image() {
    let fake = FakeEcs::default();
    let ecs = image_launcher(&fake);
    ecs.launch(&run_step(&task_id(1), None, &[("TOKEN", TOKEN_ARN)]))
        .await
        .unwrap();
    let call = &fake.run_calls()[0];
    assert_ne!(call.task_definition, "dagster-step");
    let inner = fake.lock();
    let (_, family) = &inner.registrations[0];
    let container = &inner.task_definitions[family][0].containers[0];
    assert_eq!(container.image, BASE_IMAGE);
    assert_eq!(container.secrets.len(), 1);
    assert_eq!(container.secrets[0].value_from, TOKEN_ARN);
}

#[tokio::test]
async fn a_refused_image_or_secret_with_an_op_task_definition_launches_nothing() {
    let fake = FakeEcs::default();
    let ecs = image_launcher(&fake);
    let refused = ecs
        .launch(&run_step(&task_id(1), Some("evil.example/x:1"), &[]))
        .await;
    assert_eq!(invalid_reason(refused), "launch_override_refused");
    let mut step = run_step(&task_id(2), Some(TEAM_B), &[("TOKEN", TOKEN_ARN)]);
    step.tags.insert(
        "ecs/run_task_kwargs".into(),
        r#"{"taskDefinition": "dagster-step:2"}"#.into(),
    );
    assert_eq!(
        invalid_reason(ecs.launch(&step).await),
        "invalid_executor_config"
    );
    // The op tag's task definition wins over the run's image (no secrets).
    let mut step = run_step(&task_id(3), Some(TEAM_B), &[]);
    step.tags.insert(
        "ecs/run_task_kwargs".into(),
        r#"{"taskDefinition": "dagster-step:2"}"#.into(),
    );
    ecs.launch(&step).await.unwrap();
    let calls = fake.run_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].task_definition, "dagster-step:2");
    assert!(fake.lock().registrations.is_empty());
}

#[tokio::test]
async fn a_failed_registration_is_retried_by_the_next_launch() {
    let fake = FakeEcs::default();
    fake.lock()
        .register_errors
        .push(crate::fakes::ecs::error(ErrorClass::Transient));
    let ecs = image_launcher(&fake);
    match ecs.launch(&run_step(&task_id(1), Some(TEAM_B), &[])).await {
        Err(LaunchError::Transient(text)) => assert!(text.contains("task definition"), "{text}"),
        Err(other) => panic!("expected a transient error, got {other}"),
        Ok(_) => panic!("expected a transient error, got a task"),
    }
    assert!(fake.run_calls().is_empty());
    ecs.launch(&run_step(&task_id(1), Some(TEAM_B), &[]))
        .await
        .unwrap();
    assert_eq!(fake.lock().registrations.len(), 2);
}
