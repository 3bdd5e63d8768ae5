use std::collections::BTreeMap;

use super::build::{
    ENV_COMPRESSED_ARGS, ENV_JOB_NAME, ENV_STEP_KEY, ENV_STEP_TIMEOUT, SHIM_COMMAND,
};
use super::identity::tag_keys;
use super::op_tags::InvalidTag;
use super::run_task::OVERRIDES_MARGIN;
use super::*;
use crate::envelope::StepRequest;
use crate::fakes::step_body;

fn step_with_tags(tags: &[(&str, &str)]) -> StepRequest {
    let mut step = crate::envelope::decode(&step_body(
        "0123456789abcdef0123456789abcdef",
        "run-1",
        "fan.op[key-1]",
        2,
    ))
    .unwrap();
    step.job_name = Some("diamond".into());
    step.tags = tags
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    step
}

fn base() -> BaseRequest {
    BaseRequest {
        cluster: "dagster".into(),
        task_definition: "dagster-step:3".into(),
        container: "dagster".into(),
        launch_type: Some("FARGATE".into()),
        capacity_provider_strategy: Vec::new(),
        network_configuration: Some(NetworkConfiguration {
            awsvpc_configuration: AwsVpcConfiguration {
                subnets: vec!["subnet-1".into()],
                security_groups: vec!["sg-1".into()],
                assign_public_ip: Some("DISABLED".into()),
            },
        }),
        controller_id: "ctl-1".into(),
    }
}

fn build(tags: &[(&str, &str)]) -> Result<RunTaskRequest, InvalidTag> {
    let step = step_with_tags(tags);
    let settings = StepSettings::from_tags(&step.tags, "dagster")?;
    let args = StepArgs::Inline(step.compressed_step_args());
    Ok(settings.build(&base(), &step, 1, &args))
}

fn env_of(request: &RunTaskRequest) -> BTreeMap<String, String> {
    request.overrides.container_overrides[0]
        .environment
        .iter()
        .map(|kv| (kv.name.clone(), kv.value.clone()))
        .collect()
}

#[test]
fn identity_is_deterministic_and_within_aws_limits() {
    let id = "0123456789abcdef0123456789abcdef";
    assert_eq!(started_by(id), started_by(id));
    assert_eq!(started_by(id).len(), 36);
    assert!(started_by(id)
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-'));
    assert_eq!(client_token(id, 1).len(), 64);
    assert_eq!(
        client_token(id, 1),
        client_token(id, 0),
        "unknown delivery is the first"
    );
    assert_ne!(client_token(id, 1), client_token(id, 2));
    assert_ne!(started_by(id), started_by("another"));
}

#[test]
fn default_request_runs_the_step_with_its_args_tags_and_identity() {
    let request = build(&[]).unwrap();
    let step = step_with_tags(&[]);
    assert_eq!(request.cluster, "dagster");
    assert_eq!(request.task_definition, "dagster-step:3");
    assert_eq!(request.launch_type.as_deref(), Some("FARGATE"));
    assert_eq!(request.started_by, started_by(&step.task_id));
    assert_eq!(request.client_token, client_token(&step.task_id, 1));
    let container = &request.overrides.container_overrides[0];
    assert_eq!(container.name, "dagster");
    // Always the shim, which runs the step with SIGTERM guarded (stop_guard.py).
    assert_eq!(container.command, SHIM_COMMAND);
    let env = env_of(&request);
    assert_eq!(env[ENV_COMPRESSED_ARGS], step.compressed_step_args());
    assert_eq!(env[ENV_JOB_NAME], "diamond");
    assert_eq!(env[ENV_STEP_KEY], "fan.op[key-1]");
    let tags: BTreeMap<_, _> = request
        .tags
        .iter()
        .map(|t| (t.key.as_str(), t.value.as_str()))
        .collect();
    assert_eq!(tags[tag_keys::RUN_ID], "run-1");
    // Brackets are not allowed in tag values.
    assert_eq!(tags[tag_keys::STEP_KEY], "fan.op_key-1_");
    assert_eq!(tags[tag_keys::ATTEMPT], "2");
    assert_eq!(tags[tag_keys::TASK_ID], step.task_id);
    assert_eq!(tags[tag_keys::CONTROLLER], "ctl-1");
    assert_eq!(tags[tag_keys::DELIVERY], "1");
    assert!(request.overrides_fit());
}

#[test]
fn op_tags_set_resources_overrides_and_kwargs() {
    let request = build(&[
        ("ecs/cpu", "1024"),
        ("ecs/memory", "4096"),
        ("ecs/ephemeral_storage", "50"),
        (
            "ecs/task_overrides",
            r#"{"memory": 8192, "taskRoleArn": "arn:aws:iam::1:role/step",
                "containerOverrides": [{"name": "sidecar", "environment": [{"name": "A", "value": "1"}]}]}"#,
        ),
        (
            "ecs/container_overrides",
            r#"{"environment": [{"name": "TEAM", "value": "data"}], "memoryReservation": 512,
                "resourceRequirements": [{"type": "GPU", "value": "1"}]}"#,
        ),
        (
            "ecs/run_task_kwargs",
            r#"{"taskDefinition": "gpu-step:1",
                "capacityProviderStrategy": [{"capacityProvider": "FARGATE_SPOT", "weight": 1}],
                "tags": [{"key": "team", "value": "data"}, {"key": "dagster/run-id", "value": "spoofed"}],
                "propagateTags": "TASK_DEFINITION"}"#,
        ),
    ])
    .unwrap();
    assert_eq!(request.task_definition, "gpu-step:1");
    assert_eq!(
        request.launch_type, None,
        "the strategy replaces the launch type"
    );
    assert_eq!(
        request.capacity_provider_strategy[0].capacity_provider,
        "FARGATE_SPOT"
    );
    assert_eq!(request.overrides.cpu.as_deref(), Some("1024"));
    assert_eq!(
        request.overrides.memory.as_deref(),
        Some("8192"),
        "task_overrides win"
    );
    assert_eq!(request.overrides.ephemeral_storage.unwrap().size_in_gib, 50);
    assert_eq!(
        request.overrides.task_role_arn.as_deref(),
        Some("arn:aws:iam::1:role/step")
    );
    let step = &request.overrides.container_overrides[0];
    assert_eq!(step.settings.memory_reservation, Some(512));
    assert_eq!(env_of(&request)["TEAM"], "data");
    assert_eq!(request.overrides.container_overrides[1].name, "sidecar");
    assert!(request.overrides.container_overrides[1].command.is_empty());
    let run_ids: Vec<_> = request
        .tags
        .iter()
        .filter(|t| t.key == "dagster/run-id")
        .collect();
    assert_eq!(run_ids.len(), 1);
    assert_eq!(run_ids[0].value, "run-1", "the controller's tags win");
    assert!(request.tags.iter().any(|t| t.key == "team"));

    let json = serde_json::to_value(&request).unwrap();
    assert_eq!(json["overrides"]["ephemeralStorage"]["sizeInGiB"], 50);
    assert_eq!(json["propagateTags"], "TASK_DEFINITION");
    assert_eq!(
        json["overrides"]["containerOverrides"][0]["resourceRequirements"][0]["type"],
        "GPU"
    );
}

#[test]
fn invalid_tags_name_the_tag_and_the_problem() {
    let cases: &[(&str, &str, &str)] = &[
        ("ecs/cpu", "lots", "positive whole number"),
        ("ecs/memory", "0", "positive whole number"),
        ("ecs/ephemeral_storage", "500", "21 to 200"),
        ("ecs/task_overrides", "{not json", "key must be a string"),
        (
            "ecs/task_overrides",
            r#"{"cpuu": "1"}"#,
            "unknown field `cpuu`",
        ),
        (
            "ecs/task_overrides",
            r#"{"containerOverrides": [{"name": "dagster"}]}"#,
            "use ecs/container_overrides",
        ),
        (
            "ecs/container_overrides",
            r#"{"command": ["sh", "-c", "x"]}"#,
            "unknown field `command`",
        ),
        (
            "ecs/container_overrides",
            r#"{"environment": [{"name": "DAGSTER_RUN_STEP_KEY", "value": "x"}]}"#,
            "set by the controller",
        ),
        (
            "ecs/run_task_kwargs",
            r#"{"cluster": "other"}"#,
            "unknown field `cluster`",
        ),
        (
            "ecs/run_task_kwargs",
            r#"{"count": 3}"#,
            "unknown field `count`",
        ),
        (
            "ecs/run_task_kwargs",
            r#"{"launchType": "LAMBDA"}"#,
            "not one of FARGATE",
        ),
        (
            "ecs/run_task_kwargs",
            r#"{"launchType": "EC2", "capacityProviderStrategy": [{"capacityProvider": "x"}]}"#,
            "exclude each other",
        ),
        (
            "ecs/run_task_kwargs",
            r#"{"networkConfiguration": {"awsvpcConfiguration": {"subnets": []}}}"#,
            "1 to 16 subnets",
        ),
        (
            "ecs/run_task_kwargs",
            r#"{"tags": [{"key": "aws:x", "value": "1"}]}"#,
            "reserved",
        ),
    ];
    for (tag, value, expected) in cases {
        let err = build(&[(tag, value)]).unwrap_err();
        assert_eq!(err.tag, *tag, "{tag}={value}: {err}");
        assert!(err.to_string().contains(expected), "{tag}={value}: {err}");
    }
}

#[test]
fn size_accounting_matches_the_serialized_overrides() {
    let request = build(&[]).unwrap();
    let json = serde_json::to_string(&request.overrides).unwrap();
    assert_eq!(request.overrides_chars(), json.len());
    // Args of about 20 KB of incompressible text do not fit inline...
    let step = step_with_tags(&[]);
    let settings = StepSettings::from_tags(&step.tags, "dagster").unwrap();
    let big = StepArgs::Inline("A".repeat(9000));
    let request = settings.build(&base(), &step, 1, &big);
    assert!(request.overrides_chars() > OVERRIDES_LIMIT);
    assert!(!request.overrides_fit());
    // ... and a pointer always does, with the shim as the command.
    let offloaded = StepArgs::Offloaded {
        uri: "s3://bucket/dagster-taskiq/step-args/0123".into(),
        sha256: "ab".repeat(32),
    };
    let request = settings.build(&base(), &step, 3, &offloaded);
    assert!(request.overrides_fit());
    let container = &request.overrides.container_overrides[0];
    assert_eq!(container.command, SHIM_COMMAND);
    let env = env_of(&request);
    assert!(!env.contains_key(ENV_COMPRESSED_ARGS));
    assert_eq!(
        env[ENV_ARGS_URI],
        "s3://bucket/dagster-taskiq/step-args/0123"
    );
    assert_eq!(request.client_token, client_token(&step.task_id, 3));
    // Right at the edge: the margin keeps a request that AWS might count differently out.
    let edge = OVERRIDES_LIMIT - OVERRIDES_MARGIN;
    let small = settings.build(&base(), &step, 1, &StepArgs::Inline(String::new()));
    let pad = edge - small.overrides_chars();
    let at_edge = settings.build(&base(), &step, 1, &StepArgs::Inline("A".repeat(pad)));
    assert_eq!(at_edge.overrides_chars(), edge);
    assert!(at_edge.overrides_fit());
    let over = settings.build(&base(), &step, 1, &StepArgs::Inline("A".repeat(pad + 1)));
    assert!(!over.overrides_fit());
}

#[test]
fn a_step_with_a_timeout_runs_through_the_shim_which_enforces_it() {
    let mut step = step_with_tags(&[]);
    let settings = StepSettings::from_tags(&step.tags, "dagster").unwrap();
    let args = StepArgs::Inline("eJwLAAA=".into());
    let plain = settings.build(&base(), &step, 1, &args);
    assert_eq!(plain.overrides.container_overrides[0].command, SHIM_COMMAND);
    assert!(!env_of(&plain).contains_key(ENV_STEP_TIMEOUT));

    step.timeout = Some(std::time::Duration::from_millis(2500));
    let timed = settings.build(&base(), &step, 1, &args);
    assert_eq!(timed.overrides.container_overrides[0].command, SHIM_COMMAND);
    let env = env_of(&timed);
    assert_eq!(env[ENV_STEP_TIMEOUT], "2.5");
    assert_eq!(env[ENV_COMPRESSED_ARGS], "eJwLAAA=");
    // A tag cannot set it.
    let tag = r#"{"environment": [{"name": "DAGSTER_TASKIQ_STEP_TIMEOUT_SECONDS", "value": "1"}]}"#;
    assert!(StepSettings::from_tags(
        &BTreeMap::from([("ecs/container_overrides".to_owned(), tag.to_owned())]),
        "dagster"
    )
    .is_err());
}
