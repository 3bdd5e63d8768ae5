use std::collections::BTreeMap;

use super::build::{
    ENV_COMPRESSED_ARGS, ENV_JOB_NAME, ENV_STEP_KEY, ENV_STEP_TIMEOUT, SHIM_COMMAND,
};
use super::identity::tag_keys;
use super::op_tags::{InvalidTag, TagProblem};
use super::policy::refused_variable;
use super::run_task::{KeyValue, OVERRIDES_MARGIN};
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

const ALLOWED_ROLE: &str = "arn:aws:iam::1:role/step";

/// What the operator of these tests allows: one role, one more family, Fargate's maxima.
fn policy() -> OverridePolicy {
    let mut policy = OverridePolicy::new(&base().task_definition);
    policy.roles.insert(ALLOWED_ROLE.into());
    policy.task_definition_families.insert("gpu-step".into());
    policy
}

fn build(tags: &[(&str, &str)]) -> Result<RunTaskRequest, InvalidTag> {
    build_under(&policy(), tags)
}

fn build_under(
    policy: &OverridePolicy,
    tags: &[(&str, &str)],
) -> Result<RunTaskRequest, InvalidTag> {
    let step = step_with_tags(tags);
    let settings = StepSettings::from_tags(&step.tags, "dagster", policy)?;
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
            "ecs/container_overrides",
            r#"{"environment": [{"name": "TEAM=x\u0000LD_PRELOAD", "value": "1"}]}"#,
            "contains = or NUL",
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
        assert_eq!(err.kind, TagProblem::Invalid, "{tag}={value}: {err}");
        assert_eq!(err.reason(), "invalid_launch_tags");
    }
}

#[test]
fn size_accounting_matches_the_serialized_overrides() {
    let request = build(&[]).unwrap();
    let json = serde_json::to_string(&request.overrides).unwrap();
    assert_eq!(request.overrides_chars(), json.len());
    // Args of about 20 KB of incompressible text do not fit inline...
    let step = step_with_tags(&[]);
    let settings = StepSettings::from_tags(&step.tags, "dagster", &policy()).unwrap();
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
    let settings = StepSettings::from_tags(&step.tags, "dagster", &policy()).unwrap();
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
        "dagster",
        &policy()
    )
    .is_err());
}

fn refusal(policy: &OverridePolicy, tag: &str, value: &str) -> InvalidTag {
    let err = build_under(policy, &[(tag, value)])
        .expect_err(&format!("{tag}={value} should be refused"));
    assert_eq!(err.kind, TagProblem::Refused, "{tag}={value}: {err}");
    assert_eq!(err.reason(), "launch_override_refused");
    err
}

#[test]
fn roles_network_exec_and_other_task_definitions_are_refused() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "ecs/task_overrides",
            r#"{"taskRoleArn": "arn:aws:iam::1:role/admin"}"#,
            "ecs/task_overrides: taskRoleArn arn:aws:iam::1:role/admin is not in --ecs-allow-role",
        ),
        (
            "ecs/task_overrides",
            r#"{"executionRoleArn": "arn:aws:iam::1:role/admin"}"#,
            "ecs/task_overrides: executionRoleArn arn:aws:iam::1:role/admin is not in --ecs-allow-role",
        ),
        (
            "ecs/run_task_kwargs",
            r#"{"networkConfiguration": {"awsvpcConfiguration": {"subnets": ["subnet-open"], "assignPublicIp": "ENABLED"}}}"#,
            "ecs/run_task_kwargs: networkConfiguration is the controller's (--ecs-subnets",
        ),
        (
            "ecs/run_task_kwargs",
            // Refused whatever its shape: no tag gets to argue about the network.
            r#"{"networkConfiguration": "anything"}"#,
            "networkConfiguration is the controller's",
        ),
        (
            "ecs/run_task_kwargs",
            r#"{"enableExecuteCommand": true}"#,
            "ecs/run_task_kwargs: enableExecuteCommand may not be turned on",
        ),
        (
            "ecs/run_task_kwargs",
            r#"{"taskDefinition": "attacker-image:1"}"#,
            r#"taskDefinition "attacker-image:1" (family "attacker-image") is not in --ecs-allow-task-definition"#,
        ),
        (
            "ecs/run_task_kwargs",
            r#"{"taskDefinition": "arn:aws:ecs:us-east-1:1:task-definition/attacker-image:4"}"#,
            r#"(family "attacker-image") is not in --ecs-allow-task-definition"#,
        ),
        (
            "ecs/run_task_kwargs",
            // A family that only starts like an allowed one.
            r#"{"taskDefinition": "dagster-step-evil"}"#,
            "is not in --ecs-allow-task-definition",
        ),
    ];
    for (tag, value, expected) in cases {
        let err = refusal(&policy(), tag, value);
        assert_eq!(err.tag, *tag);
        assert!(err.to_string().contains(expected), "{tag}={value}: {err}");
    }
    // With no --ecs-allow-role (the default) no role at all may be overridden, and only the
    // default task definition's family may be picked.
    let default = OverridePolicy::new("dagster-step:3");
    refusal(
        &default,
        "ecs/task_overrides",
        &format!(r#"{{"taskRoleArn": "{ALLOWED_ROLE}"}}"#),
    );
    refusal(
        &default,
        "ecs/run_task_kwargs",
        r#"{"taskDefinition": "gpu-step"}"#,
    );
}

#[test]
fn sizes_over_the_caps_are_refused_at_task_and_container_level() {
    let fargate = policy();
    let cases: &[(&str, &str, &str)] = &[
        (
            "ecs/cpu",
            "16385",
            "task cpu 16385 CPU units is over --ecs-max-cpu 16384",
        ),
        (
            "ecs/memory",
            "122881",
            "task memory 122881 MiB is over --ecs-max-memory 122880",
        ),
        (
            "ecs/task_overrides",
            r#"{"cpu": 32768}"#,
            "is over --ecs-max-cpu 16384",
        ),
        (
            "ecs/container_overrides",
            r#"{"cpu": 20000}"#,
            "ecs/container_overrides: container cpu 20000 is over --ecs-max-cpu 16384",
        ),
        (
            "ecs/container_overrides",
            r#"{"memory": 200000}"#,
            "container memory 200000 is over --ecs-max-memory 122880",
        ),
        (
            "ecs/container_overrides",
            r#"{"memoryReservation": 200000}"#,
            "container memoryReservation 200000 is over --ecs-max-memory",
        ),
        (
            "ecs/task_overrides",
            r#"{"containerOverrides": [{"name": "sidecar", "memory": 200000}]}"#,
            "ecs/task_overrides: container memory 200000 is over --ecs-max-memory",
        ),
    ];
    for (tag, value, expected) in cases {
        let err = refusal(&fargate, tag, value);
        assert!(err.to_string().contains(expected), "{tag}={value}: {err}");
    }

    // An operator's lower caps.
    let small = OverridePolicy {
        max_cpu: 2048,
        max_memory_mib: 8192,
        max_ephemeral_gib: 50,
        ..policy()
    };
    for (tag, value) in [
        ("ecs/cpu", "4096"),
        ("ecs/memory", "16384"),
        ("ecs/ephemeral_storage", "51"),
        (
            "ecs/task_overrides",
            r#"{"ephemeralStorage": {"sizeInGiB": 100}}"#,
        ),
        ("ecs/container_overrides", r#"{"cpu": 2049}"#),
    ] {
        refusal(&small, tag, value);
    }
    // At the caps exactly is fine.
    let request = build_under(
        &small,
        &[
            ("ecs/cpu", "2048"),
            ("ecs/memory", "8192"),
            ("ecs/ephemeral_storage", "50"),
            (
                "ecs/container_overrides",
                r#"{"cpu": 2048, "memory": 8192, "memoryReservation": 8192}"#,
            ),
        ],
    )
    .unwrap();
    assert_eq!(request.overrides.cpu.as_deref(), Some("2048"));
    assert_eq!(request.overrides.ephemeral_storage.unwrap().size_in_gib, 50);
}

#[test]
fn loader_and_interpreter_variables_are_refused_in_every_container() {
    let names = [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "LD_ANYTHING_NEW",
        "ld_preload",
        "GCONV_PATH",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "PYTHONHOME",
        "PYTHONINSPECT",
        "PYTHONUSERBASE",
        "PYTHONEXECUTABLE",
        "PYTHONWARNINGS",
        "PYTHONBREAKPOINT",
        "PYTHONPLATLIBDIR",
        "PATH",
        "DAGSTER_HOME",
        "DAGSTER_TASKIQ_BRIDGE_LOG_LEVEL",
        "BASH_ENV",
        "ENV",
        "BASH_FUNC_ls%%",
        "PERL5OPT",
        "NODE_OPTIONS",
        "JAVA_TOOL_OPTIONS",
        "OPENSSL_CONF",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONFIG_FILE",
        "AWS_ACCESS_KEY_ID",
    ];
    for name in names {
        let env = format!(r#"[{{"name": "{name}", "value": "/tmp/x"}}]"#);
        let step = format!(r#"{{"environment": {env}}}"#);
        let err = refusal(&policy(), "ecs/container_overrides", &step);
        assert!(
            err.message.starts_with(&format!(
                "environment variable {name} may not be set by a tag: it "
            )),
            "{err}"
        );
        let sidecar =
            format!(r#"{{"containerOverrides": [{{"name": "sidecar", "environment": {env}}}]}}"#);
        refusal(&policy(), "ecs/task_overrides", &sidecar);
    }
    assert_eq!(
        refused_variable("LD_PRELOAD"),
        Some("makes the dynamic loader load code")
    );
    assert_eq!(
        refused_variable("PYTHONPATH"),
        Some("changes what the Python interpreter loads or runs")
    );
    // An environment file could carry any of them.
    let err = refusal(
        &policy(),
        "ecs/container_overrides",
        r#"{"environmentFiles": [{"type": "s3", "value": "arn:aws:s3:::bucket/step.env"}]}"#,
    );
    assert!(
        err.message.contains("environmentFiles may not be set"),
        "{err}"
    );
}

#[test]
fn what_the_operator_allows_passes_into_the_request() {
    let request = build(&[
        (
            "ecs/task_overrides",
            &format!(
                r#"{{"taskRoleArn": "{ALLOWED_ROLE}", "executionRoleArn": "{ALLOWED_ROLE}",
                    "cpu": "16384", "memory": 122880, "ephemeralStorage": {{"sizeInGiB": 200}}}}"#
            ),
        ),
        (
            "ecs/container_overrides",
            r#"{"environment": [
                {"name": "TEAM", "value": "data"},
                {"name": "PYTHONUNBUFFERED", "value": "1"},
                {"name": "PYTHONHASHSEED", "value": "0"},
                {"name": "PYTHONFAULTHANDLER", "value": "1"},
                {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
                {"name": "PYTHONIOENCODING", "value": "utf-8"},
                {"name": "PYTHONUTF8", "value": "1"},
                {"name": "AWS_REGION", "value": "eu-west-1"},
                {"name": "HOME", "value": "/home/step"}]}"#,
        ),
        (
            "ecs/run_task_kwargs",
            r#"{"taskDefinition": "arn:aws:ecs:us-east-1:1:task-definition/dagster-step:7",
                "enableExecuteCommand": false, "group": "etl", "propagateTags": "TASK_DEFINITION",
                "placementConstraints": [{"type": "memberOf", "expression": "attribute:ecs.instance-type =~ g5.*"}],
                "tags": [{"key": "team", "value": "data"}]}"#,
        ),
    ])
    .unwrap();
    assert_eq!(
        request.overrides.task_role_arn.as_deref(),
        Some(ALLOWED_ROLE)
    );
    assert_eq!(
        request.overrides.execution_role_arn.as_deref(),
        Some(ALLOWED_ROLE)
    );
    assert_eq!(request.overrides.cpu.as_deref(), Some("16384"));
    assert_eq!(request.overrides.memory.as_deref(), Some("122880"));
    // Another revision of the default family, in ARN form.
    assert_eq!(
        request.task_definition,
        "arn:aws:ecs:us-east-1:1:task-definition/dagster-step:7"
    );
    assert_eq!(request.enable_execute_command, Some(false));
    assert_eq!(request.group.as_deref(), Some("etl"));
    assert_eq!(request.placement_constraints.len(), 1);
    let env = env_of(&request);
    assert_eq!(env["PYTHONUNBUFFERED"], "1");
    assert_eq!(env["HOME"], "/home/step");
    // The network is always the controller's.
    assert_eq!(request.network_configuration, base().network_configuration);
    // An allowed family by name.
    let gpu = build(&[("ecs/run_task_kwargs", r#"{"taskDefinition": "gpu-step:2"}"#)]).unwrap();
    assert_eq!(gpu.task_definition, "gpu-step:2");
}

#[test]
fn task_definition_families_are_read_from_every_form() {
    assert_eq!(task_definition_family("dagster-step"), "dagster-step");
    assert_eq!(task_definition_family("dagster-step:12"), "dagster-step");
    assert_eq!(
        task_definition_family(
            "arn:aws:ecs:eu-west-1:123456789012:task-definition/dagster-step:12"
        ),
        "dagster-step"
    );
    // Not a task definition ARN: never equal to a family name (those have no colon).
    assert_eq!(task_definition_family("arn:aws:iam::1:role/x"), "arn");
}

// ---- the run's image, env_vars and secrets (run_ecs.rs) ---------------------------------------

const BASE_IMAGE: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/team-a:1";

fn stored(
    image: Option<&str>,
    env_vars: &[&str],
    secrets: &[(&str, &str)],
) -> crate::dagster::StoredEcs {
    crate::dagster::StoredEcs {
        image: image.map(str::to_owned),
        env_vars: env_vars.iter().map(|v| v.to_string()).collect(),
        secrets: secrets
            .iter()
            .map(|(name, from)| crate::dagster::StoredSecret {
                name: name.to_string(),
                value_from: from.to_string(),
            })
            .collect(),
    }
}

fn image_policy(prefixes: &[&str]) -> OverridePolicy {
    let mut policy = OverridePolicy::new("dagster-step");
    policy.image_prefixes = prefixes.iter().map(|p| p.to_string()).collect();
    policy
}

#[test]
fn an_image_is_allowed_as_the_base_image_or_under_an_allowed_prefix_only() {
    let policy = image_policy(&["registry.example/team-b", "registry.example/shared/"]);
    for (image, allowed) in [
        (BASE_IMAGE, true),
        ("registry.example/team-b", true),
        ("registry.example/team-b:2", true),
        ("registry.example/team-b@sha256:abc", true),
        ("registry.example/shared/anything:1", true),
        // A plain string prefix would allow these.
        ("registry.example/team-b-evil:1", false),
        ("registry.example/team-bb", false),
        ("registry.example/sharedx/a:1", false),
        (
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/team-a:2",
            false,
        ),
        ("evil.example/team-b:1", false),
    ] {
        let result = RunEcs::from_stored(&stored(Some(image), &[], &[]), &policy, BASE_IMAGE);
        match (allowed, result) {
            (true, Ok(run)) => {
                assert_eq!(run.image.is_none(), image == BASE_IMAGE, "{image}");
            }
            (false, Err(e)) => {
                assert_eq!(e.reason(), "launch_override_refused", "{image}");
                assert!(e.to_string().contains("--ecs-allow-image-prefix"), "{e}");
                assert!(e.to_string().starts_with("container_image: "), "{e}");
            }
            (allowed, result) => panic!("{image}: allowed {allowed}, got {result:?}"),
        }
    }
    // Without the flag only the task definition's own image runs.
    let none = image_policy(&[]);
    assert!(RunEcs::from_stored(&stored(Some(BASE_IMAGE), &[], &[]), &none, BASE_IMAGE).is_ok());
    assert!(RunEcs::from_stored(&stored(None, &[], &[]), &none, BASE_IMAGE).is_ok());
    let err = RunEcs::from_stored(
        &stored(Some("registry.example/team-b:1"), &[], &[]),
        &none,
        BASE_IMAGE,
    )
    .unwrap_err();
    assert_eq!(err.kind, TagProblem::Refused);
    // A malformed name is a config error, whatever the prefixes.
    let err = RunEcs::from_stored(
        &stored(Some("registry.example/team-b:1 --x"), &[], &[]),
        &policy,
        BASE_IMAGE,
    )
    .unwrap_err();
    assert_eq!(err.reason(), "invalid_executor_config");
}

#[test]
fn env_vars_and_secrets_of_the_run_are_mapped_and_checked_like_op_tags() {
    let policy = image_policy(&[]);
    let run = RunEcs::from_stored(
        &stored(
            None,
            &["GREETING=hello=world", "EMPTY="],
            &[
                (
                    "TOKEN",
                    "arn:aws:secretsmanager:eu-west-1:123456789012:secret:token-AbCd",
                ),
                (
                    "DB_URL",
                    "arn:aws:ssm:eu-west-1:123456789012:parameter/db/url",
                ),
            ],
        ),
        &policy,
        BASE_IMAGE,
    )
    .unwrap();
    assert_eq!(
        run.environment,
        vec![
            KeyValue {
                name: "GREETING".into(),
                value: "hello=world".into()
            },
            KeyValue {
                name: "EMPTY".into(),
                value: String::new()
            },
        ]
    );
    // Sorted: the same secrets in another order make the same task definition.
    let names: Vec<&str> = run.secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["DB_URL", "TOKEN"]);
    assert!(run.needs_task_definition());

    for (env_vars, secrets, reason, says) in [
        (
            &["HOME_DIR"][..],
            &[][..],
            "invalid_executor_config",
            "has no value",
        ),
        (
            &["LD_PRELOAD=/tmp/x.so"][..],
            &[][..],
            "launch_override_refused",
            "dynamic loader",
        ),
        (
            &["PYTHONPATH=/tmp"][..],
            &[][..],
            "launch_override_refused",
            "Python interpreter",
        ),
        (
            &["DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS=x"][..],
            &[][..],
            "invalid_executor_config",
            "set by the controller",
        ),
        (
            &["=x"][..],
            &[][..],
            "invalid_executor_config",
            "not an environment variable name",
        ),
        (
            &[][..],
            &[("LD_PRELOAD", "arn:aws:ssm:eu-west-1:1:parameter/x")][..],
            "launch_override_refused",
            "dynamic loader",
        ),
        (
            &[][..],
            &[("TOKEN", "plain-text")][..],
            "invalid_executor_config",
            "not a Secrets Manager",
        ),
        (
            &[][..],
            &[("TOKEN", "arn:aws:s3:::bucket/key")][..],
            "invalid_executor_config",
            "not a Secrets Manager",
        ),
        (
            &["TOKEN=x"][..],
            &[("TOKEN", "arn:aws:ssm:eu-west-1:1:parameter/x")][..],
            "invalid_executor_config",
            "also in env_vars",
        ),
        (
            &[][..],
            &[
                ("T", "arn:aws:ssm:eu-west-1:1:parameter/x"),
                ("T", "arn:aws:ssm:eu-west-1:1:parameter/y"),
            ][..],
            "invalid_executor_config",
            "named twice",
        ),
    ] {
        let err =
            RunEcs::from_stored(&stored(None, env_vars, secrets), &policy, BASE_IMAGE).unwrap_err();
        assert_eq!(err.reason(), reason, "{env_vars:?} {secrets:?}: {err}");
        assert!(err.to_string().contains(says), "{err}");
        assert!(err.to_string().starts_with("execution config "), "{err}");
    }
    let many: Vec<String> = (0..=100).map(|i| format!("V{i}=1")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert!(RunEcs::from_stored(&stored(None, &many, &[]), &policy, BASE_IMAGE).is_err());
}

#[test]
fn the_runs_env_vars_reach_the_step_container_and_an_op_tag_wins_by_name() {
    let step = step_with_tags(&[(
        "ecs/container_overrides",
        r#"{"environment": [{"name": "MODE", "value": "from-tag"}]}"#,
    )]);
    let mut settings = StepSettings::from_tags(&step.tags, "dagster", &policy()).unwrap();
    settings.run_environment = vec![
        KeyValue {
            name: "MODE".into(),
            value: "from-run".into(),
        },
        KeyValue {
            name: "GREETING".into(),
            value: "hello".into(),
        },
    ];
    settings.run_task_definition =
        Some("arn:aws:ecs:r:1:task-definition/dagster-step-abc:1".into());
    let request = settings.build(&base(), &step, 1, &StepArgs::Inline("x".into()));
    let env = &request.overrides.container_overrides[0].environment;
    let named = |n: &str| {
        env.iter()
            .filter(|kv| kv.name == n)
            .map(|kv| kv.value.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(named("MODE"), ["from-tag"]);
    assert_eq!(named("GREETING"), ["hello"]);
    assert_eq!(
        request.task_definition,
        "arn:aws:ecs:r:1:task-definition/dagster-step-abc:1"
    );
    // An op tag's task definition wins over the run's.
    let step = step_with_tags(&[(
        "ecs/run_task_kwargs",
        r#"{"taskDefinition": "dagster-step:7"}"#,
    )]);
    let mut settings = StepSettings::from_tags(&step.tags, "dagster", &policy()).unwrap();
    settings.run_task_definition =
        Some("arn:aws:ecs:r:1:task-definition/dagster-step-abc:1".into());
    assert!(settings.chooses_task_definition());
    let request = settings.build(&base(), &step, 1, &StepArgs::Inline("x".into()));
    assert_eq!(request.task_definition, "dagster-step:7");
}
