"""Checks of the deployment files against the code: the Dockerfile, the CloudFormation template
(cfn-lint, environment names, IAM coverage of every AWS call the controller makes) and the
Kubernetes manifest.

Nothing here builds an image or talks to AWS: the files are parsed and compared with the crate
(Cargo.toml, src/config.rs, the SDK calls under src/) so that a renamed flag, a new AWS call
without its policy line or a moved path fails here instead of in a deployment.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore
import botocore.session
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
DOCKERFILE = REPO / "Dockerfile"
TEMPLATE = REPO / "manifests" / "cloudformation.yaml"
K8S_DEPLOYMENT = REPO / "manifests" / "kubernetes" / "deployment.yaml"
K8S_NETWORK_POLICY = REPO / "manifests" / "kubernetes" / "networkpolicy.yaml"
K8S_AUTOSCALING = REPO / "manifests" / "kubernetes" / "autoscaling.yaml"
GRAFANA = REPO / "deploy" / "grafana" / "dagster-taskiq-controller.json"
SECURITY = REPO / "docs" / "security.md"
# How the deployment files hand the controller its read token (src/dashboard/mod.rs).
READ_TOKEN_ENV = "DAGSTER_TASKIQ_READ_TOKEN"
READ_TOKEN_FILE_ENV = "DAGSTER_TASKIQ_READ_TOKEN_FILE"

# Variables the deployment files may set that the controller's CLI does not read, and why.
NON_CLI_ENV = {
    "AWS_REGION": "the AWS SDKs' region (Rust controller, boto3 in the bridge and steps)",
    "RUST_LOG": "the controller's log level (tracing EnvFilter in src/main.rs)",
    "DAGSTER_PG_PASSWORD": "read by a dagster.yaml that takes the Postgres password from env",
}

# The SDKs whose calls the controller's IAM role must allow, by the crate that calls them.
SDK_CRATES = {
    "aws_sdk_sqs": "sqs",
    "aws_sdk_ecs": "ecs",
    "aws_sdk_s3": "s3",
    "aws_sdk_cloudwatch": "cloudwatch",
}

# SDK operations whose IAM action is not `<service>:<OperationName>`.
IAM_ACTION_OF = {
    "sqs:SendMessageBatch": {"sqs:SendMessage"},
    "sqs:DeleteMessageBatch": {"sqs:DeleteMessage"},
    "sqs:ChangeMessageVisibilityBatch": {"sqs:ChangeMessageVisibility"},
    "s3:HeadBucket": {"s3:ListBucket"},
    "s3:HeadObject": {"s3:GetObject"},
    "s3:ListObjectsV2": {"s3:ListBucket"},
    "s3:ListObjects": {"s3:ListBucket"},
    "s3:DeleteObjects": {"s3:DeleteObject"},
    "s3:CopyObject": {"s3:GetObject", "s3:PutObject"},
    # The controller tags its tasks and RunTask hands the task definition's roles to ECS.
    "ecs:RunTask": {"ecs:RunTask", "ecs:TagResource", "iam:PassRole"},
}

# Actions AWS authorizes only on Resource "*" (no resource-level permissions, or checked
# against another resource type), and the condition key that must narrow them if any.
STAR_RESOURCE_ACTIONS: dict[str, str | None] = {
    "ecs:DescribeTaskDefinition": None,
    "ecs:ListTasks": "ecs:cluster",
    # The copies of the step task definition per code location image (docs/ecs.md).
    "ecs:RegisterTaskDefinition": None,
    # The scaling and alarm metrics (src/cloudwatch.rs), narrowed to the stack's namespace.
    "cloudwatch:PutMetricData": "cloudwatch:namespace",
}


# --- the crate --------------------------------------------------------------------------------


def cargo_bin_name() -> str:
    """The binary built from src/main.rs: its [[bin]] name, else the package name.

    (A regex rather than tomllib, which Python 3.10, still supported, lacks.)
    """
    cargo = (REPO / "Cargo.toml").read_text()
    for section in re.split(r"^\[", cargo, flags=re.M):
        if section.startswith("[bin]]"):
            name = re.search(r'^name\s*=\s*"([^"]+)"', section, re.M)
            path = re.search(r'^path\s*=\s*"([^"]+)"', section, re.M)
            if name and (path is None or path.group(1) == "src/main.rs"):
                return name.group(1)
    package = re.search(r'^\[package\][^\[]*?^name\s*=\s*"([^"]+)"', cargo, re.M | re.S)
    assert package, "no package name in Cargo.toml"
    return package.group(1)


def cli_definitions() -> str:
    """The bodies of every clap `Args`/`Parser`/`Subcommand` type under src/: each component
    owns its flags (e.g. `AdmissionArgs` in src/admission.rs) and src/config.rs gathers them."""
    derive = re.compile(
        r"#\[derive\([^)]*\b(?:Args|Parser|Subcommand)\b[^)]*\)\][^{}]*?"
        r"pub(?:\(crate\))? (?:struct|enum) \w+ \{(.*?)\n\}",
        re.S,
    )
    bodies = [m.group(1) for f in sorted(SRC.rglob("*.rs")) for m in derive.finditer(f.read_text())]
    assert len(bodies) >= 5, "no clap argument types found under src/: the scan is broken"
    return "\n".join(bodies)


def cli_env_names() -> set[str]:
    """Every environment variable the CLI reads (`env = "..."` in the clap types)."""
    names = set(re.findall(r'\benv\s*=\s*"([A-Z0-9_]+)"', cli_definitions()))
    assert "DAGSTER_TASKIQ_SQS_QUEUE_URL" in names, "src/ no longer parses as expected"
    assert "DAGSTER_TASKIQ_MAX_CONCURRENT" in names, "the component flags were not found"
    return names


def cli_subcommands() -> set[str]:
    """Subcommands of the binary: the variants of `enum Command` in src/config.rs."""
    text = (SRC / "config.rs").read_text()
    body = re.search(r"pub enum Command \{(.*?)\n\}", text, re.S)
    assert body, "no `pub enum Command` in src/config.rs"
    variants = re.findall(r"^\s{4}([A-Z][A-Za-z0-9]*)\s*[({,]", body.group(1), re.M)
    # clap's derive names a subcommand by the kebab-case of its variant.
    return {re.sub(r"(?<!^)([A-Z])", r"-\1", v).lower() for v in variants}


def _strip_comments(rust: str) -> str:
    return re.sub(r"^[ \t]*//.*$", "", rust, flags=re.M)


@dataclass(frozen=True)
class SdkCall:
    service: str
    operation: str
    where: str


@functools.cache
def sdk_operations() -> dict[str, set[str]]:
    """`service -> {OperationName}` for every API operation of the SDK clients we use."""
    session = botocore.session.get_session()
    return {
        service: set(session.get_service_model(service).operation_names)
        for service in SDK_CRATES.values()
    }


def sdk_calls() -> list[SdkCall]:
    """Every AWS SDK operation the Rust code calls.

    The SDK's fluent calls are `client.<operation_in_snake_case>()` (no arguments; the request
    is built by the setters that follow). Any such call in a file that uses the service's crate
    and whose name is an operation of that service (per botocore's service models) counts.
    """
    calls: list[SdkCall] = []
    for path in sorted(SRC.rglob("*.rs")):
        calls.extend(sdk_calls_in(path.read_text(), str(path.relative_to(REPO))))
    return calls


def sdk_calls_in(rust: str, filename: str) -> list[SdkCall]:
    snake = {
        service: {botocore.xform_name(op): op for op in ops}
        for service, ops in sdk_operations().items()
    }
    text = _strip_comments(rust)
    services = {svc for crate, svc in SDK_CRATES.items() if crate in text}
    calls: list[SdkCall] = []
    for match in re.finditer(r"\.\s*([a-z][a-z0-9_]*)\(\)", text):
        name = match.group(1)
        line = text.count("\n", 0, match.start()) + 1
        for service in sorted(services):
            if name in snake[service]:
                calls.append(SdkCall(service, snake[service][name], f"{filename}:{line}"))
    return calls


def required_actions(call: SdkCall) -> set[str]:
    action = f"{call.service}:{call.operation}"
    return IAM_ACTION_OF.get(action, {action})


# --- CloudFormation ----------------------------------------------------------------------------


def load_template() -> dict[str, Any]:
    from cfnlint.decode import decode

    template, matches = decode(str(TEMPLATE))
    assert not matches, [str(m) for m in matches]
    assert template is not None
    return template


def without_novalue(items: list[Any]) -> Iterator[Any]:
    """List items with `Fn::If` branches expanded (both: every optional feature on and off)."""
    for item in items:
        if isinstance(item, dict) and set(item) == {"Fn::If"}:
            _, yes, no = item["Fn::If"]
            yield from without_novalue([yes, no])
        elif item != {"Ref": "AWS::NoValue"}:
            yield item


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def container(template: dict[str, Any], task_definition: str, name: str) -> dict[str, Any]:
    props = template["Resources"][task_definition]["Properties"]
    matches = [c for c in props["ContainerDefinitions"] if c["Name"] == name]
    assert len(matches) == 1, f"{task_definition} has no container {name!r}"
    return matches[0]


def container_env(c: dict[str, Any]) -> dict[str, Any]:
    env = {e["Name"]: e.get("Value") for e in without_novalue(c.get("Environment", []))}
    env.update({s["Name"]: s["ValueFrom"] for s in without_novalue(c.get("Secrets", []))})
    return env


@dataclass
class Statement:
    sid: str
    actions: list[str]
    resources: list[Any]
    condition: dict[str, Any] = field(default_factory=dict)


def role_statements(template: dict[str, Any], role: str) -> list[Statement]:
    statements: list[Statement] = []
    for policy in without_novalue(template["Resources"][role]["Properties"].get("Policies", [])):
        for s in without_novalue(as_list(policy["PolicyDocument"]["Statement"])):
            assert s["Effect"] == "Allow", s
            assert "NotAction" not in s and "NotResource" not in s, s
            statements.append(
                Statement(
                    sid=s.get("Sid", "?"),
                    actions=as_list(s["Action"]),
                    resources=as_list(s["Resource"]),
                    condition=dict(s.get("Condition", {})),
                )
            )
    return statements


def allowed(statements: list[Statement], action: str) -> bool:
    return any(fnmatch.fnmatchcase(action, pattern) for s in statements for pattern in s.actions)


def parameter_default(template: dict[str, Any], name: str) -> int:
    return int(template["Parameters"][name]["Default"])


def test_cfn_lint_passes() -> None:
    from cfnlint.api import lint_file

    matches = lint_file(TEMPLATE)
    assert not matches, "\n".join(str(m) for m in matches)


def test_controller_env_names_are_read_by_the_cli() -> None:
    template = load_template()
    env = container_env(container(template, "ControllerTaskDefinition", "controller"))
    cli = cli_env_names()
    unknown = {n for n in env if n not in cli and n not in NON_CLI_ENV}
    assert not unknown, f"not read by the controller (src/config.rs): {sorted(unknown)}"
    for required in (
        "DAGSTER_TASKIQ_SQS_QUEUE_URL",
        "DAGSTER_TASKIQ_SQS_DLQ_URL",
        "DAGSTER_TASKIQ_DASHBOARD_ADDR",
        "DAGSTER_TASKIQ_ECS_TASK_DEFINITION",
        "DAGSTER_TASKIQ_SHUTDOWN_GRACE",
    ):
        assert required in env, required
    # Replicas must not share an id: continuations are matched by it.
    assert "DAGSTER_TASKIQ_CONTROLLER_ID" not in env
    assert env["DAGSTER_TASKIQ_DASHBOARD_ADDR"] == "0.0.0.0:8080"


def test_step_env_names_are_known() -> None:
    template = load_template()
    env = container_env(container(template, "StepTaskDefinition", "step"))
    assert set(env) <= set(NON_CLI_ENV), sorted(set(env) - set(NON_CLI_ENV))


def test_template_settings_agree_with_the_controller() -> None:
    template = load_template()
    resources = template["Resources"]
    controller = container(template, "ControllerTaskDefinition", "controller")
    env = container_env(controller)
    queue = resources["WorkQueue"]["Properties"]

    # The queue and the controller use one visibility timeout parameter.
    assert queue["VisibilityTimeout"] == {"Ref": "VisibilityTimeout"}
    assert env["DAGSTER_TASKIQ_VISIBILITY_TIMEOUT"] == {"Ref": "VisibilityTimeout"}
    assert parameter_default(template, "VisibilityTimeout") == 60

    # The controller dead-letters (with a reason and a verdict) before SQS's redrive does,
    # also for continuations, which may be delivered up to 10 x --max-attempts times.
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {
        "Fn::GetAtt": ["DeadLetterQueue", "Arn"]
    }
    assert queue["RedrivePolicy"]["maxReceiveCount"] == {"Ref": "MaxReceiveCount"}
    assert env["DAGSTER_TASKIQ_MAX_ATTEMPTS"] == {"Ref": "MaxAttempts"}
    max_attempts = parameter_default(template, "MaxAttempts")
    assert parameter_default(template, "MaxReceiveCount") > 10 * max_attempts >= 5 * 10
    # Dead letters outlive the work queue's messages (SQS keeps the original enqueue time).
    dlq = resources["DeadLetterQueue"]["Properties"]
    assert dlq["MessageRetentionPeriod"] > queue["MessageRetentionPeriod"]

    # Shutdown: the drain ends before ECS's SIGKILL.
    assert int(env["DAGSTER_TASKIQ_SHUTDOWN_GRACE"]) < controller["StopTimeout"] == 120
    health = controller["HealthCheck"]["Command"]
    assert any("/healthz" in part for part in health), health
    assert controller["LogConfiguration"]["LogDriver"] == "awslogs"

    # The step container the controller overrides is the step task definition's.
    step_props = resources["StepTaskDefinition"]["Properties"]
    step_names = [c["Name"] for c in step_props["ContainerDefinitions"]]
    assert env["DAGSTER_TASKIQ_ECS_CONTAINER"] in step_names
    assert env["DAGSTER_TASKIQ_ECS_TASK_DEFINITION"] == {"Ref": "StepTaskDefinition"}
    # RunTask is granted on that family only.
    assert step_props["Family"] == {"Fn::Sub": "${AWS::StackName}-step"}


def test_sdk_call_discovery_finds_the_known_calls() -> None:
    found = {(c.service, c.operation) for c in sdk_calls()}
    for known in [
        ("sqs", "ReceiveMessage"),
        ("sqs", "ChangeMessageVisibilityBatch"),
        ("sqs", "DeleteMessage"),
        ("sqs", "SendMessage"),
        ("sqs", "GetQueueAttributes"),
        ("ecs", "RunTask"),
        ("ecs", "DescribeTasks"),
        ("ecs", "StopTask"),
        ("ecs", "ListTasks"),
        ("s3", "PutObject"),
    ]:
        assert known in found, f"{known} not found in src/: the discovery regex is broken"


def test_sdk_call_discovery_catches_a_new_call_without_a_policy_line() -> None:
    rust = """
use aws_sdk_sqs::Client;
// client.delete_queue() in a comment does not count
async fn purge(client: &Client, url: &str) {
    client
        .purge_queue()
        .queue_url(url)
        .send()
        .await
        .unwrap();
    let _ = url.to_string();
}
"""
    calls = sdk_calls_in(rust, "example.rs")
    assert calls == [SdkCall("sqs", "PurgeQueue", "example.rs:6")]
    statements = role_statements(load_template(), "ControllerTaskRole")
    assert not allowed(statements, "sqs:PurgeQueue")
    batch = sdk_calls_in("use aws_sdk_sqs::Client;\nc.delete_message_batch()", "x.rs")
    assert required_actions(batch[0]) == {"sqs:DeleteMessage"}


def test_controller_role_allows_every_aws_call_in_the_code() -> None:
    statements = role_statements(load_template(), "ControllerTaskRole")
    missing = {
        (action, call.where)
        for call in sdk_calls()
        for action in required_actions(call)
        if not allowed(statements, action)
    }
    assert not missing, "the controller role lacks: " + ", ".join(
        f"{a} (called at {w})" for a, w in sorted(missing)
    )
    # Announced for the `doctor` subcommand (ECS checks).
    for action in ("ecs:DescribeClusters", "ecs:DescribeTaskDefinition"):
        assert allowed(statements, action), action


def test_controller_role_is_least_privilege() -> None:
    template = load_template()
    statements = role_statements(template, "ControllerTaskRole")
    for s in statements:
        for action in s.actions:
            assert "*" not in action, f"{s.sid}: wildcard action {action}"
        if "*" in s.resources:
            assert s.resources == ["*"], s
            for action in s.actions:
                assert action in STAR_RESOURCE_ACTIONS, f"{s.sid}: {action} on Resource *"
                key = STAR_RESOURCE_ACTIONS[action]
                if key is not None:
                    conditions = json.dumps(s.condition)
                    assert key in conditions, f"{s.sid}: {action} on * needs a {key} condition"

    def statements_with(prefix: str) -> list[Statement]:
        return [s for s in statements if any(a.startswith(prefix) for a in s.actions)]

    queues = [{"Fn::GetAtt": ["WorkQueue", "Arn"]}, {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}]
    for s in statements_with("sqs:"):
        assert all(r in queues for r in s.resources), f"{s.sid}: SQS beyond the two queues"
    for s in statements_with("iam:"):
        assert s.actions == ["iam:PassRole"], s
        assert s.resources == [
            {"Fn::GetAtt": ["StepTaskRole", "Arn"]},
            {"Fn::GetAtt": ["StepExecutionRole", "Arn"]},
        ], s
        assert "ecs-tasks.amazonaws.com" in json.dumps(s.condition), s
    s3_buckets = ("OffloadBucket", "TaskiqResultBucket", "TaskiqPayloadBucket")
    for s in statements_with("s3:"):
        assert all(any(b in json.dumps(r) for b in s3_buckets) for r in s.resources), s
    for s in statements_with("ecs:"):
        if s.resources == ["*"]:
            continue
        for r in s.resources:
            text = json.dumps(r)
            assert any(
                scope in text
                for scope in ("cluster/${Name}", "task/${Name}/*", "task-definition/${AWS::")
            ), f"{s.sid}: ECS resource not scoped to the cluster or step family: {text}"
    run_task = [s for s in statements if "ecs:RunTask" in s.actions]
    assert run_task and all("ecs:cluster" in json.dumps(s.condition) for s in run_task)
    tag = [s for s in statements if "ecs:TagResource" in s.actions]
    assert tag and all("RunTask" in json.dumps(s.condition) for s in tag)


def statements_granting(statements: list[Statement], action: str) -> list[Statement]:
    return [s for s in statements if any(fnmatch.fnmatchcase(action, pat) for pat in s.actions)]


def cluster_arn_condition(s: Statement) -> Any:
    return s.condition.get("ArnEquals", {}).get("ecs:cluster")


def test_task_control_and_pass_role_are_never_granted_on_every_resource() -> None:
    template = load_template()
    statements = role_statements(template, "ControllerTaskRole")
    for action in ("ecs:RunTask", "ecs:StopTask", "ecs:DescribeTasks", "iam:PassRole"):
        granting = statements_granting(statements, action)
        assert granting, f"{action} is not granted at all"
        for s in granting:
            assert "*" not in s.resources, f"{s.sid}: {action} on Resource *"
            if action.startswith("ecs:"):
                # The cluster the controller launches in, and nothing else.
                arn = json.dumps(cluster_arn_condition(s))
                assert "cluster/${Name}" in arn and "ExistingClusterName" in arn, (s.sid, arn)
    (run_task,) = statements_granting(statements, "ecs:RunTask")
    # The step family, and its copies per code location image (`<family>-<hash>`).
    base, images = (json.dumps(r) for r in run_task.resources)
    assert "task-definition/${AWS::StackName}-step:*" in base, base
    assert "task-definition/${AWS::StackName}-step-*:*" in images, images


def test_the_work_queue_accepts_messages_only_from_producers_and_controllers() -> None:
    template = load_template()
    resources = template["Resources"]
    parameter = template["Parameters"]["ProducerRoleArns"]
    assert parameter["Type"] == "CommaDelimitedList"
    assert "Default" not in parameter, "an empty producer list would let nobody send"
    policies = [
        r["Properties"]
        for r in resources.values()
        if r["Type"] == "AWS::SQS::QueuePolicy"
        and {"Ref": "WorkQueue"} in r["Properties"]["Queues"]
    ]
    assert len(policies) == 1, "no (or more than one) AWS::SQS::QueuePolicy on the work queue"
    statements = as_list(policies[0]["PolicyDocument"]["Statement"])
    denies = [s for s in statements if s["Effect"] == "Deny"]
    assert denies, statements
    for s in denies:
        # Only sending is restricted: the account keeps managing and reading the queue.
        assert as_list(s["Action"]) == ["sqs:SendMessage"], s
        assert s["Principal"] == "*", s
        assert s["Resource"] == {"Fn::GetAtt": ["WorkQueue", "Arn"]}, s
    (deny,) = denies
    allowed_senders = json.dumps(deny["Condition"]["ArnNotLike"]["aws:PrincipalArn"])
    assert '{"Ref": "ProducerRoleArns"}' in allowed_senders, allowed_senders
    assert '{"Fn::GetAtt": ["ControllerTaskRole", "Arn"]}' in allowed_senders, allowed_senders
    # The controller itself sends (continuations, requeues, dead letters) and may.
    controller = role_statements(template, "ControllerTaskRole")
    assert allowed(controller, "sqs:SendMessage")


def test_steps_run_with_their_own_roles() -> None:
    template = load_template()
    resources = template["Resources"]
    step = resources["StepTaskDefinition"]["Properties"]
    controller = resources["ControllerTaskDefinition"]["Properties"]
    step_roles = [step["TaskRoleArn"], step["ExecutionRoleArn"]]
    controller_roles = [controller["TaskRoleArn"], controller["ExecutionRoleArn"]]
    names = {json.dumps(r) for r in step_roles + controller_roles}
    assert len(names) == 4, f"the steps share a role with the controller: {sorted(names)}"
    # The controller may pass exactly the step roles to ECS.
    statements = role_statements(template, "ControllerTaskRole")
    (pass_role,) = statements_granting(statements, "iam:PassRole")
    assert pass_role.resources == step_roles, pass_role
    assert pass_role.condition == {
        "StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}
    }
    # The steps' execution role reads no controller secret.
    step_execution = step["ExecutionRoleArn"]["Fn::GetAtt"][0]
    readable = json.dumps([s.resources for s in role_statements(template, step_execution)])
    for secret in ("ReadToken", "AdminToken"):
        assert secret not in readable, f"{step_execution} can read the {secret} secret"
    step_env = container_env(container(template, "StepTaskDefinition", "step"))
    assert READ_TOKEN_ENV not in step_env and "DAGSTER_TASKIQ_ADMIN_TOKEN" not in step_env


def test_taskiq_results_are_scoped_to_the_base_path() -> None:
    template = load_template()
    env = container_env(container(template, "ControllerTaskDefinition", "controller"))
    assert env["DAGSTER_TASKIQ_S3_BASE_PATH"] == {"Ref": "TaskiqResultBasePath"}
    statements = role_statements(template, "ControllerTaskRole")
    objects = [
        s
        for s in statements
        if "s3:PutObject" in s.actions and "TaskiqResult" in json.dumps(s.resources)
    ]
    assert len(objects) == 1, objects
    resource = objects[0].resources[0]
    condition, with_base, without_base = resource["Fn::If"]
    assert condition == "HasResultBasePath"
    assert with_base["Fn::Sub"].endswith("${TaskiqResultBucket}/${TaskiqResultBasePath}/*")
    assert without_base["Fn::Sub"].endswith("${TaskiqResultBucket}/*")
    # A trailing slash would make the granted prefix differ from the keys written.
    pattern = template["Parameters"]["TaskiqResultBasePath"]["AllowedPattern"]
    for ok in ("", "results", "a/b"):
        assert re.fullmatch(pattern, ok), ok
    for bad in ("results/", "/results", "a//b"):
        assert not re.fullmatch(pattern, bad), bad


# --- the read token wherever the dashboard leaves loopback --------------------------------------


def binds_all_interfaces(addr: Any) -> bool:
    host = str(addr).rpartition(":")[0]
    return host in ("0.0.0.0", "[::]", "::")


def test_the_image_requires_a_read_token() -> None:
    _, stages = dockerfile_stages()
    chain = final_stage_chain(stages)
    env = " ".join(i.args for s in chain for i in s.all("ENV"))
    addr = re.search(r"DAGSTER_TASKIQ_DASHBOARD_ADDR=(\S+)", env)
    assert addr and binds_all_interfaces(addr.group(1))
    cmd = exec_form(chain[0].all("CMD")[-1].args)
    in_env = re.search(rf"\b{READ_TOKEN_FILE_ENV}=\S+", env)
    assert "--read-token-file" in cmd or in_env, f"the image binds {addr.group(1)} openly"
    if "--read-token-file" in cmd:
        path = cmd[cmd.index("--read-token-file") + 1]
        assert path.startswith("/run/secrets/"), path
    assert "--read-token-file" in cli_flags()


def test_cloudformation_passes_the_read_token_from_secrets_manager() -> None:
    template = load_template()
    controller = container(template, "ControllerTaskDefinition", "controller")
    env = container_env(controller)
    assert binds_all_interfaces(env["DAGSTER_TASKIQ_DASHBOARD_ADDR"])
    plain = {e["Name"] for e in without_novalue(controller.get("Environment", []))}
    assert READ_TOKEN_ENV not in plain, "the read token must come from a secret, not plain env"
    secrets = {s["Name"]: s for s in controller["Secrets"] if "Name" in s}
    assert READ_TOKEN_ENV in secrets, "the controller binds 0.0.0.0 without a read token"
    source = secrets[READ_TOKEN_ENV]["ValueFrom"]
    assert json.dumps(source) == json.dumps(
        {"Fn::If": ["CreateReadToken", {"Ref": "ReadTokenSecret"}, {"Ref": "ReadTokenSecretArn"}]}
    )
    generated = template["Resources"]["ReadTokenSecret"]["Properties"]["GenerateSecretString"]
    assert generated["PasswordLength"] >= 16 and generated["ExcludePunctuation"] is True
    # The controller's execution role (which ECS uses to fetch it) may read it.
    role = controller_execution_role(template)
    readable = json.dumps([s.resources for s in role_statements(template, role)])
    assert json.dumps(source) in readable, readable


def controller_execution_role(template: dict[str, Any]) -> str:
    props = template["Resources"]["ControllerTaskDefinition"]["Properties"]
    return str(props["ExecutionRoleArn"]["Fn::GetAtt"][0])


# --- scaling and alarms ------------------------------------------------------------------------

CLOUDWATCH_RS = SRC / "cloudwatch.rs"
OUR_NAMESPACE = {"Ref": "CloudWatchNamespace"}
# Metrics AWS itself publishes that the template reads (every other one must be the
# controller's, in OUR_NAMESPACE).
AWS_METRICS = {
    ("AWS/SQS", "ApproximateNumberOfMessagesVisible"),
    ("ECS/ContainerInsights", "RunningTaskCount"),
    ("ECS/ContainerInsights", "DesiredTaskCount"),
}
# The alarms of docs/operations.md ("Alarms") that the template creates.
TEMPLATE_ALARMS = {
    "DeadLettersAlarm",
    "OldestMessageAgeAlarm",
    "ControllerNotReadyAlarm",
    "ControllerTasksBelowDesiredAlarm",
    "StepFailureRatioAlarm",
    "LeaseLossesAlarm",
    "RunTaskThrottlingAlarm",
}


def cloudwatch_metric_names() -> set[str]:
    """The CloudWatch metrics the controller publishes: the constants of `mod names` in
    src/cloudwatch.rs (each is sent every minute, see its unit test)."""
    body = re.search(r"pub mod names \{(.*?)\n\}", CLOUDWATCH_RS.read_text(), re.S)
    assert body, "no `pub mod names` in src/cloudwatch.rs"
    names = set(re.findall(r'pub const [A-Z_]+: &str = "([A-Za-z]+)";', body.group(1)))
    assert "HeldMessages" in names, "src/cloudwatch.rs no longer parses as expected"
    return names


def cloudwatch_dimensions() -> list[dict[str, Any]]:
    """The dimensions every published metric carries, as the template must name them."""
    found = re.search(r'pub const QUEUE_DIMENSION: &str = "(\w+)";', CLOUDWATCH_RS.read_text())
    assert found, "no QUEUE_DIMENSION in src/cloudwatch.rs"
    return [{"Name": found.group(1), "Value": {"Fn::GetAtt": ["WorkQueue", "QueueName"]}}]


@dataclass(frozen=True)
class MetricRef:
    resource: str
    namespace: Any
    name: str
    dimensions: Any


def metric_queries(resource: dict[str, Any]) -> list[dict[str, Any]]:
    props = resource.get("Properties", {})
    if resource["Type"] == "AWS::ApplicationAutoScaling::ScalingPolicy":
        props = props["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"]
    elif resource["Type"] != "AWS::CloudWatch::Alarm":
        return []
    if "MetricName" in props:
        stat = {"Metric": {k: props.get(k) for k in ("Namespace", "MetricName", "Dimensions")}}
        return [{"Id": "m", "MetricStat": stat, "ReturnData": True}]
    return list(props.get("Metrics", []))


def metric_references(template: dict[str, Any]) -> list[MetricRef]:
    """Every metric an alarm or scaling policy of the template reads."""
    refs = []
    for name, resource in template["Resources"].items():
        for query in metric_queries(resource):
            if "MetricStat" in query:
                m = query["MetricStat"]["Metric"]
                refs.append(MetricRef(name, m["Namespace"], m["MetricName"], m.get("Dimensions")))
    return refs


def metric_reference_problems(template: dict[str, Any]) -> list[str]:
    published, dimensions = cloudwatch_metric_names(), cloudwatch_dimensions()
    problems = []
    for ref in metric_references(template):
        if ref.namespace == OUR_NAMESPACE:
            if ref.name not in published:
                problems.append(f"{ref.resource}: the controller publishes no {ref.name}")
            elif ref.dimensions != dimensions:
                problems.append(f"{ref.resource}: {ref.name} by {ref.dimensions}, not {dimensions}")
        elif (ref.namespace, ref.name) not in AWS_METRICS:
            problems.append(f"{ref.resource}: {ref.namespace} {ref.name} is nobody's metric")
    return problems


def test_every_alarm_and_scaling_policy_reads_a_metric_the_controller_publishes() -> None:
    import copy

    template = load_template()
    resources = template["Resources"]
    alarms = {n for n, r in resources.items() if r["Type"] == "AWS::CloudWatch::Alarm"}
    assert alarms == TEMPLATE_ALARMS
    policies = [
        n for n, r in resources.items() if r["Type"] == "AWS::ApplicationAutoScaling::ScalingPolicy"
    ]
    assert policies == ["ControllerBacklogScaling"]
    assert not metric_reference_problems(template), metric_reference_problems(template)
    readers = {ref.resource for ref in metric_references(template)}
    assert readers == TEMPLATE_ALARMS | set(policies), readers
    for name in TEMPLATE_ALARMS | set(policies):
        queries = metric_queries(resources[name])
        # Metric math: one result, and it only names the queries beside it.
        returned = [q for q in queries if q.get("ReturnData", True)]
        assert len(returned) == 1, name
        ids = {q["Id"] for q in queries}
        for q in queries:
            if "Expression" in q:
                words = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", q["Expression"]))
                assert words <= ids, f"{name}: {q['Expression']} names {words - ids}"
    # The check itself catches a renamed metric and a missing dimension.
    broken = copy.deepcopy(template)
    stat = broken["Resources"]["ControllerBacklogScaling"]["Properties"][
        "TargetTrackingScalingPolicyConfiguration"
    ]["CustomizedMetricSpecification"]["Metrics"][1]["MetricStat"]["Metric"]
    stat["MetricName"] = "HeldMessagez"
    broken["Resources"]["LeaseLossesAlarm"]["Properties"]["Dimensions"] = []
    assert len(metric_reference_problems(broken)) == 2, metric_reference_problems(broken)


def test_the_controller_publishes_where_the_alarms_read() -> None:
    template = load_template()
    env = container_env(container(template, "ControllerTaskDefinition", "controller"))
    assert env["DAGSTER_TASKIQ_CLOUDWATCH_NAMESPACE"] == OUR_NAMESPACE
    statements = role_statements(template, "ControllerTaskRole")
    (publish,) = statements_granting(statements, "cloudwatch:PutMetricData")
    assert publish.condition == {"StringEquals": {"cloudwatch:namespace": OUR_NAMESPACE}}
    # The parameter takes what the controller's --cloudwatch-namespace takes.
    pattern = template["Parameters"]["CloudWatchNamespace"]["AllowedPattern"]
    assert re.fullmatch(pattern, template["Parameters"]["CloudWatchNamespace"]["Default"])
    for bad in ("AWS/SQS", "", "a{b}"):
        assert not re.fullmatch(pattern, bad), bad


def test_the_service_scales_on_backlog_per_replica() -> None:
    template = load_template()
    resources = template["Resources"]
    target = resources["ControllerScalableTarget"]["Properties"]
    assert (target["ServiceNamespace"], target["ScalableDimension"]) == (
        "ecs",
        "ecs:service:DesiredCount",
    )
    assert "ControllerService" in json.dumps(target["ResourceId"])
    assert target["MinCapacity"] == {"Ref": "MinReplicas"}
    assert target["MaxCapacity"] == {"Ref": "MaxReplicas"}
    # At least one replica: with none, nobody publishes the metric that would scale out.
    assert template["Parameters"]["MinReplicas"]["MinValue"] >= 1
    policy = resources["ControllerBacklogScaling"]["Properties"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert policy["ScalingTargetId"] == {"Ref": "ControllerScalableTarget"}
    config = policy["TargetTrackingScalingPolicyConfiguration"]
    assert config["TargetValue"] == {"Ref": "TargetBacklogPerReplica"}
    queries = {q["Id"]: q for q in metric_queries(resources["ControllerBacklogScaling"])}
    stats = {
        i: (q["MetricStat"]["Metric"]["MetricName"], q["MetricStat"]["Stat"])
        for i, q in queries.items()
        if "MetricStat" in q
    }
    # Held messages summed over the replicas, replicas counted by their samples (one per
    # replica and minute, src/cloudwatch.rs), the queue's visible messages as any one saw it.
    assert stats == {
        "visible": ("VisibleMessages", "Maximum"),
        "held": ("HeldMessages", "Sum"),
        "replicas": ("HeldMessages", "SampleCount"),
    }
    (result,) = [q for q in queries.values() if q.get("ReturnData", True)]
    assert result["Expression"].replace(" ", "") == "(visible+held)/replicas"
    default_target = parameter_default(template, "TargetBacklogPerReplica")
    assert default_target == parameter_default(template, "MaxConcurrent")


def test_alarms_notify_the_optional_topic() -> None:
    template = load_template()
    assert template["Parameters"]["AlarmTopicArn"]["Default"] == ""
    assert template["Conditions"]["HasAlarmTopic"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "AlarmTopicArn"}, ""]}]
    }
    actions = {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
    for name in TEMPLATE_ALARMS:
        props = template["Resources"][name]["Properties"]
        assert props["AlarmActions"] == actions, name
        assert props["OKActions"] == actions, name
        # A quiet fleet (no steps, no dead letters) is no alarm.
        assert props["TreatMissingData"] == "notBreaching", name


# --- docs/operations.md --------------------------------------------------------------------------

OPERATIONS = REPO / "docs" / "operations.md"
# Flags of the `dlq` subcommand, checked once src/config.rs has it.
DLQ_FLAGS = {"--max", "--json", "--reason", "--run-id", "--task-id", "--all"}


def registered_metrics() -> set[str]:
    text = (SRC / "metrics.rs").read_text()
    names = set(re.findall(r'\.register\(\s*"([a-z_]+)"', text))
    assert "messages_received" in names, "src/metrics.rs no longer parses as expected"
    return names


def cli_flags() -> set[str]:
    """Long flags clap derives from the clap types: field names in kebab-case, `long = "..."`."""
    text = cli_definitions()
    fields = re.findall(r"^\s*(?:pub\s+)?([a-z_][a-z0-9_]*)\s*:", text, re.M)
    explicit = re.findall(r'\blong\s*=\s*"([a-z0-9-]+)"', text)
    return {"--" + f.replace("_", "-") for f in fields} | {"--" + f for f in explicit}


def test_operations_guide_names_real_metrics() -> None:
    text = OPERATIONS.read_text()
    registered = registered_metrics()
    undocumented = {m for m in registered if f"`{m}" not in text and f" {m}" not in text}
    assert not undocumented, f"metrics missing from docs/operations.md: {sorted(undocumented)}"
    # Message attributes (src/queue/) and the Python package share the prefix.
    not_metrics = {"controller"} | {
        attribute
        for path in (SRC / "queue").rglob("*.rs")
        for attribute in re.findall(r'"dagster_taskiq_([a-z_]+)"', path.read_text())
    }
    mentioned = set(re.findall(r"dagster_taskiq_([a-z_]+)", text)) - not_metrics
    suffixes = ("_total", "_bucket", "_sum", "_count", "_info")
    unknown = set()
    for name in mentioned:
        base = next((name.removesuffix(x) for x in suffixes if name.endswith(x)), name)
        if name not in registered and base not in registered:
            unknown.add(name)
    assert not unknown, f"docs/operations.md names metrics src/metrics.rs lacks: {unknown}"


def test_operations_guide_names_real_flags() -> None:
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", OPERATIONS.read_text()))
    flags -= {"--target", "--build-arg"}  # docker build's
    if "dlq" not in cli_subcommands():
        flags -= DLQ_FLAGS
    unknown = flags - cli_flags()
    assert not unknown, f"docs/operations.md names flags src/config.rs lacks: {sorted(unknown)}"


# --- Kubernetes --------------------------------------------------------------------------------


def k8s_documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(K8S_DEPLOYMENT.read_text()) if d]


def test_kubernetes_env_names_are_read_by_the_cli() -> None:
    deployment = next(d for d in k8s_documents() if d["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (controller,) = spec["containers"]
    names = {e["name"] for e in controller["env"]}
    unknown = {n for n in names if n not in cli_env_names() and n not in NON_CLI_ENV}
    assert not unknown, f"not read by the controller (src/config.rs): {sorted(unknown)}"
    assert "DAGSTER_TASKIQ_CONTROLLER_ID" not in names
    env = {e["name"]: e.get("value") for e in controller["env"]}
    assert int(env["DAGSTER_TASKIQ_SHUTDOWN_GRACE"]) < spec["terminationGracePeriodSeconds"]
    assert controller["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert controller["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert controller["args"][0] in cli_subcommands()
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_kubernetes_reads_the_read_token_from_a_secret() -> None:
    deployment = next(d for d in k8s_documents() if d["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (controller,) = spec["containers"]
    env = {e["name"]: e for e in controller["env"]}
    assert binds_all_interfaces(env["DAGSTER_TASKIQ_DASHBOARD_ADDR"]["value"])
    assert READ_TOKEN_ENV not in env or "valueFrom" in env[READ_TOKEN_ENV]
    path = Path(env[READ_TOKEN_FILE_ENV]["value"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in controller["volumeMounts"] if path.parent == Path(m["mountPath"])]
    assert mount["readOnly"] is True
    secret = volumes[mount["name"]]["secret"]
    # Not optional: a missing Secret must stop the pod, not open the dashboard.
    assert not secret.get("optional", False)
    assert {"key": "read-token", "path": path.name} in secret["items"]
    # The file is readable by the controller's user (group) only.
    assert secret["defaultMode"] & 0o007 == 0
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
    # The probes need no token (they are open on the dashboard address).
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert controller[probe]["httpGet"]["path"] in ("/healthz", "/readyz"), probe


def test_the_network_policy_admits_only_monitoring_to_the_dashboard_port() -> None:
    deployment = next(d for d in k8s_documents() if d["kind"] == "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (controller,) = deployment["spec"]["template"]["spec"]["containers"]
    dashboard_port = next(p["containerPort"] for p in controller["ports"] if p["name"] == "http")
    policies = [d for d in yaml.safe_load_all(K8S_NETWORK_POLICY.read_text()) if d]
    (policy,) = [d for d in policies if d["kind"] == "NetworkPolicy"]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    selector = spec["podSelector"]["matchLabels"]
    assert selector and selector.items() <= pod_labels.items(), "it selects no controller pod"
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    for rule in spec["ingress"]:
        assert [p["port"] for p in rule["ports"]] == [dashboard_port], rule
        assert rule["from"], "an ingress rule without `from` admits everyone"
        for peer in rule["from"]:
            assert "ipBlock" not in peer, peer
            selectors = [peer.get("podSelector"), peer.get("namespaceSelector")]
            # Every peer is picked by a label, never by an empty (match-all) selector.
            assert any(s and s.get("matchLabels") for s in selectors), peer
            for s in selectors:
                assert s is None or s.get("matchLabels"), peer
    egress_ports = {
        (p.get("protocol", "TCP"), p["port"]) for r in spec["egress"] for p in r["ports"]
    }
    assert egress_ports == {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 5432)}


def autoscaling_documents() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(K8S_AUTOSCALING.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one object of each kind expected"
    return by_kind


def test_keda_scales_the_deployment_on_its_queue() -> None:
    deployment = next(d for d in k8s_documents() if d["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (controller,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in controller["env"]}
    objects = autoscaling_documents()
    scaled = objects["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")) == (
        deployment["apiVersion"],
        deployment["kind"],
    )
    assert target["name"] == deployment["metadata"]["name"]
    low, high = scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]
    assert 1 <= low <= deployment["spec"]["replicas"] <= high
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "aws-sqs-queue"
    meta = trigger["metadata"]
    # The queue the controller consumes, read from the Deployment's own environment.
    assert meta["queueURLFromEnv"] == "DAGSTER_TASKIQ_SQS_QUEUE_URL"
    assert meta["queueURLFromEnv"] in env and meta["queueURLFromEnv"] in cli_env_names()
    assert "queueURL" not in meta
    assert meta["awsRegion"] == env["AWS_REGION"]
    # Target per replica: the replica's concurrency; held (in-flight) messages count.
    assert int(meta["queueLength"]) == int(env["DAGSTER_TASKIQ_MAX_CONCURRENT"])
    assert meta["scaleOnInFlight"] == "true"
    # Authenticated as the controller itself (its IRSA role reads the queue's attributes).
    auth = objects["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["podIdentity"] == {"provider": "aws", "identityOwner": "workload"}
    account = next(d for d in k8s_documents() if d["kind"] == "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    # Scale-in one drain at a time.
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]


def test_a_disruption_budget_covers_the_controller_pods() -> None:
    documents = k8s_documents()
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (budget,) = [d for d in documents if d["kind"] == "PodDisruptionBudget"]
    assert budget["apiVersion"] == "policy/v1"
    selector = budget["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= pod_labels.items()
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    # One eviction at a time, and never none (a budget of 0 blocks node drains).
    assert budget["spec"] == {"maxUnavailable": 1, "selector": budget["spec"]["selector"]}


# --- Grafana -----------------------------------------------------------------------------------

# Labels Prometheus adds to every scraped series, and the histogram bucket label.
SCRAPE_LABELS = {"instance", "job", "le"}


@functools.cache
def exported_metric_samples() -> frozenset[str]:
    """Every sample name /metrics can carry, from the registrations in src/metrics.rs and
    the type of each registered field (counters get `_total`, histograms `_bucket`, `_sum`
    and `_count`, the info `_info`)."""
    text = (SRC / "metrics.rs").read_text()
    struct = re.search(r"pub struct Metrics \{(.*?)\n\}", text, re.S)
    assert struct, "no `pub struct Metrics` in src/metrics.rs"
    field_types = dict(re.findall(r"^\s*pub (\w+): ([^\n]+),$", struct.group(1), re.M))
    registrations = re.findall(
        r'\.register\(\s*"([a-z_]+)",\s*"[^"]*",\s*(?:metrics\.(\w+)\.clone\(\)|(Info)::new)',
        text,
    )
    assert {name for name, *_ in registrations} == registered_metrics()
    samples = set()
    for name, member, info in registrations:
        full = f"dagster_taskiq_{name}"
        kind = "Info" if info else field_types[member]
        if "Histogram" in kind:
            samples |= {f"{full}_bucket", f"{full}_sum", f"{full}_count"}
        elif "Counter" in kind:
            samples.add(f"{full}_total")
        elif "Gauge" in kind:
            samples.add(full)
        elif kind == "Info":
            samples.add(f"{full}_info")
        else:
            raise AssertionError(f"{name}: unknown metric type {kind}")
    return frozenset(samples)


@functools.cache
def exported_label_names() -> frozenset[str]:
    """Label names the code gives its series (`get_or_create(&[("name", ...)])`)."""
    names = set()
    for path in SRC.rglob("*.rs"):
        for labels in re.findall(r"get_or_create\(\s*&\[(.*?)\]\s*\)", path.read_text(), re.S):
            names |= set(re.findall(r'\(\s*"([a-z_]+)",', labels))
    assert {"outcome", "queue", "state", "launcher"} <= names, names
    return frozenset(names | {"version", "profile"})  # build_info's


def promql_problems(expr: str) -> list[str]:
    samples, labels = exported_metric_samples(), exported_label_names() | SCRAPE_LABELS
    problems = [
        f"{name} is not exported"
        for name in re.findall(r"\bdagster_taskiq_[a-z_]+", expr)
        if name not in samples
    ]
    used = set()
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        used |= {label.strip() for label in grouping.split(",") if label.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        used |= set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", matchers))
    problems += [f"no series has a label {label!r}" for label in sorted(used - labels)]
    return problems


def grafana_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(GRAFANA.read_text())
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads(GRAFANA.read_text())
    assert dashboard["uid"] == "dagster-taskiq-controller"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = grafana_panels()
    exprs = []
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            problems = promql_problems(target["expr"])
            assert not problems, (panel["title"], target["expr"], problems)
            exprs.append(target["expr"])
    # The built-in page's panels: queue depths, held steps, launches and outcomes, start
    # latency p50/p99, failures; and the scaling signals.
    text = "\n".join(exprs)
    for needed in (
        'dagster_taskiq_queue_messages{queue="work"}',
        'dagster_taskiq_queue_messages{queue="dlq",state="visible"}',
        "dagster_taskiq_steps_in_flight",
        "dagster_taskiq_steps_launched_total",
        "dagster_taskiq_steps_finished_total",
        "histogram_quantile(0.5, sum by (le) (rate(dagster_taskiq_launch_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(dagster_taskiq_launch_latency_seconds_bucket",
        "dagster_taskiq_schedule_to_start_seconds_bucket",
        "dagster_taskiq_oldest_message_age_seconds",
        "dagster_taskiq_hold_capacity",
    ):
        assert needed in text, needed
    per_replica = [p for p in panels if any("by (instance" in t["expr"] for t in p["targets"])]
    assert len(per_replica) >= 6, [p["title"] for p in per_replica]
    # Panels do not overlap on the grid.
    cells = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        area = {(x, y) for x in xs for y in ys}
        assert g["x"] + g["w"] <= 24 and not cells & area, panel["title"]
        cells |= area
    # The check itself catches a metric, a suffix and a label the code does not export.
    assert len(promql_problems('sum by (pod) (dagster_taskiq_steps_in_flight_total{x="1"})')) == 3


# --- Dockerfile --------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def dockerfile_instructions() -> list[Instruction]:
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(DOCKERFILE.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def dockerfile_stages() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for i in dockerfile_instructions():
        if i.keyword == "FROM":
            words = i.args.split()
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert i.keyword == "ARG", f"line {i.line}: {i.keyword} before the first FROM"
            key, _, value = i.args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append(i)
    return global_args, stages


def expand(text: str, variables: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name, default = match.group(1) or match.group(3), match.group(2)
        value = variables.get(name, "")
        return value if value else (default or "")

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", one, text)


def stage_args(stage: Stage) -> dict[str, str]:
    args: dict[str, str] = {}
    for i in stage.all("ARG"):
        key, _, value = i.args.partition("=")
        args[key] = value
    return args


def final_stage_chain(stages: list[Stage]) -> list[Stage]:
    """The last stage and the stages it is built FROM, nearest first."""
    by_name = {s.name: s for s in stages if s.name}
    chain = [stages[-1]]
    while chain[-1].base in by_name:
        chain.append(by_name[chain[-1].base])
    return chain


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_dockerfile_copy_sources_exist_and_are_not_ignored() -> None:
    global_args, stages = dockerfile_stages()
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = 0
    for stage in stages:
        variables = {**global_args, **stage_args(stage)}
        for i in stage.all("COPY") + stage.all("ADD"):
            words = shlex.split(i.args)
            if any(w.startswith("--from=") for w in words):
                continue
            sources = [expand(w, variables) for w in words[:-1] if not w.startswith("--")]
            for source in sources:
                copies += 1
                path = REPO / source
                assert path.exists(), f"Dockerfile line {i.line}: COPY source {source} is missing"
                for pattern in ignored:
                    pattern = pattern.removeprefix("**/")
                    parts = Path(source).parts
                    hit = any(
                        fnmatch.fnmatchcase("/".join(parts[: n + 1]), pattern)
                        or fnmatch.fnmatchcase(parts[n], pattern)
                        for n in range(len(parts))
                    )
                    assert not hit, f"COPY source {source} is excluded by .dockerignore {pattern}"
    assert copies >= 4


def test_dockerfile_builds_the_crate_binary_and_the_python_package() -> None:
    _, stages = dockerfile_stages()
    binary = cargo_bin_name()
    text = DOCKERFILE.read_text()
    assert f"target/release/{binary}" in text, f"the builder does not produce {binary}"
    copies = [i.args for s in stages for i in s.all("COPY")]
    assert any(c.startswith("Cargo.toml Cargo.lock") for c in copies), copies
    # The dependency layer is built before the sources are copied.
    builder = next(s for s in stages if "cargo build" in json.dumps([i.args for i in s.all("RUN")]))
    kinds = [(i.keyword, i.args) for i in builder.instructions if i.keyword in ("COPY", "RUN")]
    first_build = next(n for n, (k, a) in enumerate(kinds) if k == "RUN" and "cargo build" in a)
    src_copy = next(n for n, (k, a) in enumerate(kinds) if k == "COPY" and a.startswith("src"))
    assert first_build < src_copy, "no cached dependency layer before COPY src"
    # The Python package of the bridge.
    package = REPO / "python" / "dagster_taskiq_controller"
    assert (package / "bridge.py").exists()
    assert any("python/dagster_taskiq_controller" in c for c in copies), copies
    assert any("python/pyproject.toml" in c for c in copies), copies


# Test beds live in python/testing and examples/; the image's package must not need them.
TEST_ONLY_MODULES = {"moto", "pytest", "dagster_taskiq_controller_testing"}


def test_the_image_holds_no_test_code() -> None:
    package = REPO / "python" / "dagster_taskiq_controller"
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in TEST_ONLY_MODULES, f"{path.name} imports {name}"
    _, stages = dockerfile_stages()
    for stage in stages:
        for i in stage.all("COPY") + stage.all("ADD"):
            for test_dir in ("python/testing", "python/tests", "examples"):
                assert test_dir not in i.args, f"Dockerfile line {i.line} copies {test_dir}"


def test_dockerfile_runtime_entrypoint_healthcheck_and_user() -> None:
    global_args, stages = dockerfile_stages()
    chain = final_stage_chain(stages)
    final = chain[0]
    runtime_base = expand(chain[-1].base, global_args)
    assert runtime_base.startswith("python:3.11-slim"), runtime_base
    entrypoint = exec_form(final.all("ENTRYPOINT")[-1].args)
    assert entrypoint[:2] == ["tini", "--"], entrypoint
    assert entrypoint[2] == cargo_bin_name(), entrypoint
    cmd = exec_form(final.all("CMD")[-1].args)
    assert cmd[0] in cli_subcommands(), cmd
    health = final.all("HEALTHCHECK")
    assert health and "/healthz" in health[-1].args
    # ...on the port the image's dashboard address listens on.
    env = " ".join(i.args for s in chain for i in s.all("ENV"))
    addr = re.search(r"DAGSTER_TASKIQ_DASHBOARD_ADDR=(\S+)", env)
    assert addr and addr.group(1) == "0.0.0.0:8080", env
    assert ":8080/healthz" in health[-1].args
    for name in re.findall(r"\b(DAGSTER_TASKIQ_[A-Z0-9_]+)=", env):
        assert name in cli_env_names(), name
    # Non-root: the last USER of the chain (nearest stage first).
    users = [expand(i.args, stage_args(s)) for s in chain for i in reversed(s.all("USER"))]
    assert users, "no USER: the image runs as root"
    user = users[0].split(":")[0]
    assert user not in ("root", "0", ""), user
    # tini is installed in the runtime.
    runs = " ".join(i.args for s in chain for i in s.all("RUN"))
    assert re.search(r"apt-get install[^;&]*\btini\b", runs), "tini is not installed"


@pytest.mark.parametrize(
    "path",
    [
        DOCKERFILE,
        REPO / ".dockerignore",
        TEMPLATE,
        K8S_DEPLOYMENT,
        K8S_NETWORK_POLICY,
        K8S_AUTOSCALING,
        GRAFANA,
        OPERATIONS,
        SECURITY,
    ],
)
def test_deployment_files_exist(path: Path) -> None:
    assert path.is_file(), path
