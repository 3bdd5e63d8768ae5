//! `dagster-taskiq-controller doctor`: checks a configuration and what it reaches, the same
//! settings `run` takes, and says for each failure what to change.
//!
//! Checks are independent where they can be (a missing DLQ does not hide a broken Python
//! path), and each one is read-only except the dry receive, which may bump one message's
//! receive count by one (it gives the message back at once).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::QueueAttributeName;

use crate::config::RunArgs;
use crate::dagster::{BridgeInfo, SidecarBridge, SidecarConfig};
use crate::metrics::Metrics;

/// How long the bridge may take to import Dagster before the check fails.
const BRIDGE_STARTUP: Duration = Duration::from_secs(120);

/// One check: what it looked at and how that went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Fine; what was found.
    Passed(String),
    /// Works, but not as a production deployment should; what to change.
    Warned(String),
    /// Broken; what is wrong and what to do about it.
    Failed(String),
    /// Not applicable, or not possible because an earlier check failed.
    Skipped(String),
}

/// Every check of one `doctor` invocation.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self
            .checks
            .iter()
            .any(|c| matches!(c.outcome, Outcome::Failed(_)))
    }

    fn push(&mut self, name: &'static str, outcome: Outcome) {
        self.checks.push(Check { name, outcome });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            let (mark, text) = match &check.outcome {
                Outcome::Passed(text) => ("ok  ", text),
                Outcome::Warned(text) => ("warn", text),
                Outcome::Failed(text) => ("FAIL", text),
                Outcome::Skipped(text) => ("skip", text),
            };
            writeln!(f, "[{mark}] {}: {text}", check.name)?;
        }
        let failed = self
            .checks
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Failed(_)))
            .count();
        let warned = self
            .checks
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Warned(_)))
            .count();
        if failed == 0 && warned > 0 {
            write!(f, "all checks passed, {warned} warning(s)")
        } else if failed == 0 {
            write!(f, "all checks passed")
        } else {
            write!(f, "{failed} check(s) failed")
        }
    }
}

/// Runs every check against the settings `run` would use.
pub async fn diagnose(args: &RunArgs, aws: &aws_config::SdkConfig) -> Report {
    let mut report = Report::default();
    match args.validate() {
        Ok(()) => report.push("configuration", Outcome::Passed("flags are valid".into())),
        Err(e) => report.push("configuration", Outcome::Failed(e.to_string())),
    }
    let sqs = crate::aws::sqs_client(aws);
    let queue = check_work_queue(&sqs, args, &mut report).await;
    if let Some(redrive_target) = queue {
        check_dead_letter_queue(&sqs, args, redrive_target, &mut report).await;
        check_receive(&sqs, args, &mut report).await;
    } else {
        let why = Outcome::Skipped("the work queue cannot be read".into());
        report.push("dead-letter queue", why.clone());
        report.push("receive permission", why);
    }
    check_bridge(args, &mut report).await;
    check_code_locations(args, &mut report).await;
    check_ecs(args, aws, &mut report).await;
    check_offload_bucket(args, aws, &mut report).await;
    check_dashboard_addr(args, &mut report).await;
    report
}

/// What the work queue's RedrivePolicy says: the DLQ ARN and maxReceiveCount, if set.
struct RedriveTarget {
    dlq_arn: Option<String>,
    max_receive_count: Option<u32>,
}

async fn check_work_queue(
    sqs: &aws_sdk_sqs::Client,
    args: &RunArgs,
    report: &mut Report,
) -> Option<RedriveTarget> {
    let result = sqs
        .get_queue_attributes()
        .queue_url(&args.queue_url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await;
    let out = match result {
        Ok(out) => out,
        Err(e) => {
            let message = if e.code() == Some("AWS.SimpleQueueService.NonExistentQueue")
                || e.code() == Some("QueueDoesNotExist")
            {
                format!(
                    "the work queue {} does not exist: create it (manifests/cloudformation.yaml) \
                     or fix --queue-url (DAGSTER_TASKIQ_SQS_QUEUE_URL)",
                    args.queue_url
                )
            } else {
                format!(
                    "cannot read the work queue {}: {}. Check the URL, the region \
                     (AWS_REGION) and that the role may call sqs:GetQueueAttributes",
                    args.queue_url,
                    short_error(&e)
                )
            };
            report.push("work queue", Outcome::Failed(message));
            return None;
        }
    };
    let attribute = |name: QueueAttributeName| {
        out.attributes()
            .and_then(|a| a.get(&name))
            .cloned()
            .unwrap_or_default()
    };
    report.push(
        "work queue",
        Outcome::Passed(format!(
            "{} ({} visible, {} in flight)",
            args.queue_url,
            attribute(QueueAttributeName::ApproximateNumberOfMessages),
            attribute(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        )),
    );
    let policy: Option<serde_json::Value> =
        serde_json::from_str(&attribute(QueueAttributeName::RedrivePolicy)).ok();
    let max_receive_count = policy.as_ref().and_then(|p| {
        let count = p.get("maxReceiveCount")?;
        // SQS returns it as a number; templates often write it as a string.
        count
            .as_u64()
            .or_else(|| count.as_str()?.parse().ok())
            .and_then(|n| u32::try_from(n).ok())
    });
    Some(RedriveTarget {
        dlq_arn: policy
            .as_ref()
            .and_then(|p| p.get("deadLetterTargetArn")?.as_str().map(str::to_owned)),
        max_receive_count,
    })
}

async fn check_dead_letter_queue(
    sqs: &aws_sdk_sqs::Client,
    args: &RunArgs,
    redrive: RedriveTarget,
    report: &mut Report,
) {
    const NAME: &str = "dead-letter queue";
    let url = match (&args.dlq_url, &redrive.dlq_arn) {
        (Some(url), _) => url.clone(),
        (None, Some(_)) => match crate::queue::SqsQueue::discover_dlq(sqs, &args.queue_url).await {
            Ok(Some(url)) => url,
            Ok(None) => {
                report.push(
                    NAME,
                    Outcome::Failed(
                        "the RedrivePolicy changed while checking: run doctor again".into(),
                    ),
                );
                return;
            }
            Err(e) => {
                report.push(
                    NAME,
                    Outcome::Failed(format!(
                        "the work queue's RedrivePolicy names a DLQ that cannot be found: {e}. \
                         Create that queue or pass --dlq-url (DAGSTER_TASKIQ_SQS_DLQ_URL)"
                    )),
                );
                return;
            }
        },
        (None, None) => {
            report.push(
                NAME,
                Outcome::Failed(
                    "the work queue has no RedrivePolicy and no --dlq-url \
                     (DAGSTER_TASKIQ_SQS_DLQ_URL) is set: poison messages need a dead-letter \
                     queue. Add a RedrivePolicy to the work queue (manifests/cloudformation.yaml) \
                     or pass --dlq-url"
                        .into(),
                ),
            );
            return;
        }
    };
    if let Err(e) = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .send()
        .await
    {
        report.push(
            NAME,
            Outcome::Failed(format!(
                "cannot read the dead-letter queue {url}: {}. Check that it exists and that the \
                 role may use it",
                short_error(&e)
            )),
        );
        return;
    }
    // SQS must not move a message before the controller has dead-lettered it with a reason
    // and written its verdict.
    // A continuation (steps past SQS's 12-hour cap) may be passed between replicas up to ten
    // times --max-attempts.
    let continuation_limit = args.controller.max_attempts.saturating_mul(10);
    match redrive.max_receive_count {
        Some(count) if count <= args.controller.max_attempts => report.push(
            NAME,
            Outcome::Failed(format!(
                "{url}: the work queue's maxReceiveCount ({count}) is not above --max-attempts \
                 ({}): SQS would move failing messages to the DLQ without a reason or a verdict \
                 in Dagster. Raise maxReceiveCount (to {} if steps may run past 12 hours) or \
                 lower --max-attempts",
                args.controller.max_attempts,
                continuation_limit + 10
            )),
        ),
        Some(count) if count <= continuation_limit => report.push(
            NAME,
            Outcome::Passed(format!(
                "{url} (maxReceiveCount {count}: enough unless steps run past 12 hours, whose \
                 continuations may be received up to {continuation_limit} times)"
            )),
        ),
        _ => report.push(NAME, Outcome::Passed(url)),
    }
}

/// A receive with no wait and no hold: proves the permission without taking work away.
async fn check_receive(sqs: &aws_sdk_sqs::Client, args: &RunArgs, report: &mut Report) {
    const NAME: &str = "receive permission";
    match sqs
        .receive_message()
        .queue_url(&args.queue_url)
        .max_number_of_messages(1)
        .wait_time_seconds(0)
        .visibility_timeout(0)
        .send()
        .await
    {
        Ok(_) => report.push(NAME, Outcome::Passed("sqs:ReceiveMessage allowed".into())),
        Err(e) => report.push(
            NAME,
            Outcome::Failed(format!(
                "a dry receive failed: {}. The controller's role needs sqs:ReceiveMessage, \
                 sqs:ChangeMessageVisibility, sqs:DeleteMessage and sqs:SendMessage on the work \
                 queue and the DLQ",
                short_error(&e)
            )),
        ),
    }
}

async fn check_bridge(args: &RunArgs, report: &mut Report) {
    const NAME: &str = "dagster bridge";
    let Ok(environment) = args.step_env.environment() else {
        let why = "the step environment flags are invalid (see configuration)";
        report.push(NAME, Outcome::Skipped(why.into()));
        return;
    };
    let bridge = SidecarBridge::new(
        SidecarConfig {
            startup_timeout: BRIDGE_STARTUP,
            ..args.bridge.sidecar_config(&args.python, &environment)
        },
        Arc::new(Metrics::new()),
    );
    let described = bridge.ping().await;
    bridge.close().await;
    let info = match described {
        Ok(info) => info,
        Err(e) => {
            report.push(
                NAME,
                Outcome::Failed(format!(
                    "the bridge does not start with {}: {e}. Point --python \
                     (DAGSTER_TASKIQ_PYTHON) at an interpreter with dagster and the \
                     dagster-taskiq-controller package installed, and set --dagster-home (or \
                     DAGSTER_HOME) to the instance your runs use",
                    args.python.display()
                )),
            );
            let why = Outcome::Skipped("the bridge does not start".into());
            report.push(INSTANCE, why.clone());
            report.push(STORAGE, why);
            return;
        }
    };
    report.push(
        NAME,
        Outcome::Passed(format!(
            "{} runs the bridge with dagster {} on the instance of DAGSTER_HOME ({})",
            args.python.display(),
            info.dagster_version,
            info.root_directory
                .as_deref()
                .unwrap_or("unknown directory"),
        )),
    );
    report.push(INSTANCE, instance_outcome(&info, chrono::Utc::now()));
    report.push(STORAGE, storage_outcome(&info));
}

/// How long a code location's interpreter may take to import Dagster and this package.
const LOCATION_PROBE: Duration = Duration::from_secs(60);

/// Each `--python-for` interpreter starts and has Dagster and this package (what its steps
/// and its zygote run); one line for all of them.
async fn check_code_locations(args: &RunArgs, report: &mut Report) {
    const NAME: &str = "code location environments";
    let Ok(map) = args.python_map.map(&args.python) else {
        report.push(
            NAME,
            Outcome::Skipped("--python-for is invalid (see configuration)".into()),
        );
        return;
    };
    let mut found = Vec::new();
    for (location, python) in map.locations() {
        match probe_interpreter(python).await {
            Ok(version) => found.push(format!("{location}: dagster {version}")),
            Err(why) => {
                let detail = format!(
                    "code location {location:?}: {} {why}; it needs dagster and the \
                     dagster-taskiq-controller package (--python-for)",
                    python.display()
                );
                report.push(NAME, Outcome::Failed(detail));
                return;
            }
        }
    }
    if found.is_empty() {
        report.push(
            NAME,
            Outcome::Skipped("no --python-for: every step runs on --python".into()),
        );
    } else {
        report.push(NAME, Outcome::Passed(found.join(", ")));
    }
}

/// The Dagster version of an interpreter that also has this package.
async fn probe_interpreter(python: &std::path::Path) -> Result<String, String> {
    let probe = tokio::process::Command::new(python)
        .args([
            "-c",
            "import dagster, dagster_taskiq_controller.stop_guard; print(dagster.__version__)",
        ])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(LOCATION_PROBE, probe).await {
        Err(_) => return Err(format!("did not answer within {LOCATION_PROBE:?}")),
        Ok(Err(e)) => return Err(format!("does not start: {e}")),
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or("").trim();
        return Err(format!("cannot import them ({last})"));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

const INSTANCE: &str = "dagster instance";
const STORAGE: &str = "dagster storage";

/// Whether the controller's instance is the one the runs live in: it holds runs.
fn instance_outcome(info: &BridgeInfo, now: chrono::DateTime<chrono::Utc>) -> Outcome {
    let Some(run) = &info.latest_run else {
        return Outcome::Warned(
            "the instance has no runs yet: if runs were launched, DAGSTER_HOME points at \
             another instance than the run workers' (the controller, the run workers and the \
             steps must share one dagster.yaml and database)"
                .into(),
        );
    };
    let age = chrono::DateTime::from_timestamp(run.created as i64, 0)
        .map(|created| (now - created).num_minutes())
        .map_or_else(
            || "at an unknown time".to_owned(),
            |m| format!("{m} min ago"),
        );
    Outcome::Passed(format!(
        "its latest run is {} ({}, created {age})",
        run.run_id, run.status
    ))
}

/// What the storage means for a controller on its own host, and a driver combination
/// known to break dagster-postgres.
fn storage_outcome(info: &BridgeInfo) -> Outcome {
    let classes = info
        .storages
        .values()
        .filter(|c| !c.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if info.stores_in_postgres() || info.package("dagster-postgres").is_some() {
        if let Some(sqlalchemy) = info.package("sqlalchemy") {
            if sqlalchemy_maps_postgresql_to_psycopg3(sqlalchemy) {
                let text = format!(
                    "SQLAlchemy {sqlalchemy} maps postgresql:// URLs to psycopg 3, where \
                     dagster-postgres cannot write events (`NOTIFY run_events` fails): install \
                     'sqlalchemy<2.1' (the package's `postgres` extra pins it)"
                );
                return if info.stores_in_postgres() {
                    Outcome::Failed(text)
                } else {
                    Outcome::Warned(text)
                };
            }
        }
    }
    if info.stores_in_sqlite() {
        return Outcome::Warned(format!(
            "the instance keeps its runs in SQLite files under {}: only processes on this \
             host see them. A controller, run workers and steps on separate hosts need a \
             shared database (dagster-postgres; docs/operations.md)",
            info.root_directory.as_deref().unwrap_or("DAGSTER_HOME")
        ));
    }
    Outcome::Passed(classes)
}

/// SQLAlchemy 2.1 and later default `postgresql://` to the psycopg (3) driver.
fn sqlalchemy_maps_postgresql_to_psycopg3(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .unwrap_or(0)
    });
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (2, 1)
}

async fn check_ecs(args: &RunArgs, aws: &aws_config::SdkConfig, report: &mut Report) {
    const CLUSTER: &str = "ECS cluster";
    const TASK_DEFINITION: &str = "ECS task definition";
    if !args.ecs_enabled() {
        let why = Outcome::Skipped("the ECS launcher is not enabled".into());
        report.push(CLUSTER, why.clone());
        report.push(TASK_DEFINITION, why);
        return;
    }
    let client = crate::aws::ecs_client(aws);
    let cluster = &args.ecs.ecs_cluster;
    let outcome = match client.describe_clusters().clusters(cluster).send().await {
        Ok(out) => match out.clusters().first() {
            Some(c) if c.status() == Some("ACTIVE") => Outcome::Passed(format!(
                "{cluster} is active ({} running tasks)",
                c.running_tasks_count()
            )),
            Some(c) => Outcome::Failed(format!(
                "cluster {cluster} is {}, not ACTIVE",
                c.status().unwrap_or("in an unknown state")
            )),
            None => Outcome::Failed(format!(
                "cluster {cluster} does not exist: fix --ecs-cluster (DAGSTER_TASKIQ_ECS_CLUSTER)"
            )),
        },
        Err(e) => Outcome::Failed(format!(
            "cannot describe cluster {cluster}: {}. The role needs ecs:DescribeClusters",
            short_error(&e)
        )),
    };
    report.push(CLUSTER, outcome);
    let Some(task_definition) = args.ecs.ecs_task_definition.as_deref() else {
        report.push(
            TASK_DEFINITION,
            Outcome::Failed("--launcher ecs needs --ecs-task-definition".into()),
        );
        return;
    };
    let described = client
        .describe_task_definition()
        .task_definition(task_definition)
        .send()
        .await;
    let outcome = match described {
        Ok(out) => {
            let names: Vec<String> = out
                .task_definition()
                .map(|td| {
                    td.container_definitions()
                        .iter()
                        .filter_map(|c| c.name().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            match &args.ecs.ecs_container {
                Some(name) if !names.contains(name) => Outcome::Failed(format!(
                    "{task_definition} has no container {name:?} (it has {names:?}): fix \
                     --ecs-container"
                )),
                None if names.len() != 1 => Outcome::Failed(format!(
                    "{task_definition} has containers {names:?}: name the step container with \
                     --ecs-container"
                )),
                _ => Outcome::Passed(format!("{task_definition} (containers {names:?})")),
            }
        }
        Err(e) => Outcome::Failed(format!(
            "cannot describe task definition {task_definition}: {}. Register it, or fix \
             --ecs-task-definition (DAGSTER_TASKIQ_ECS_TASK_DEFINITION); the role needs \
             ecs:DescribeTaskDefinition",
            short_error(&e)
        )),
    };
    report.push(TASK_DEFINITION, outcome);
}

async fn check_offload_bucket(args: &RunArgs, aws: &aws_config::SdkConfig, report: &mut Report) {
    const NAME: &str = "offload bucket";
    let Some(bucket) = args
        .ecs
        .offload_bucket
        .as_deref()
        .filter(|_| args.ecs_enabled())
    else {
        report.push(NAME, Outcome::Skipped("no --offload-bucket".into()));
        return;
    };
    let s3 = crate::aws::s3_client(aws, None);
    let outcome = match s3.head_bucket().bucket(bucket).send().await {
        Ok(_) => Outcome::Passed(bucket.to_owned()),
        Err(e) => Outcome::Failed(format!(
            "cannot reach bucket {bucket}: {}. Create it or fix --offload-bucket; the role \
             needs s3:ListBucket on it and s3:PutObject on its objects",
            short_error(&e)
        )),
    };
    report.push(NAME, outcome);
}

async fn check_dashboard_addr(args: &RunArgs, report: &mut Report) {
    const NAME: &str = "dashboard address";
    let outcome = match tokio::net::TcpListener::bind(args.dashboard.dashboard_addr).await {
        Ok(_) => Outcome::Passed(format!("{} is free", args.dashboard.dashboard_addr)),
        Err(e) => Outcome::Failed(format!(
            "cannot listen on {}: {e}. Pick another --dashboard-addr \
             (DAGSTER_TASKIQ_DASHBOARD_ADDR)",
            args.dashboard.dashboard_addr
        )),
    };
    report.push(NAME, outcome);
}

/// An AWS error as `Code: message` when the service said so, else the SDK's description.
fn short_error<E, R>(e: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    match (e.code(), e.message()) {
        (Some(code), Some(message)) => format!("{code}: {}", message.trim_end_matches('.')),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(e).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_location_interpreter_without_dagster_fails_the_check_naming_it() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let script = |name: &str, body: &str| {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path.display().to_string()
        };
        let good = script("good", "echo 1.12.3");
        let bad = script("bad", "echo 'ModuleNotFoundError: dagster' >&2; exit 1");
        let run = |entries: &str| {
            let argv = [
                "dagster-taskiq-controller",
                "doctor",
                "--queue-url",
                "http://127.0.0.1:1/1/q",
                "--python-for",
                entries,
            ];
            match crate::config::Cli::try_parse_from(argv).unwrap().command {
                crate::config::Command::Doctor(args) => args,
                _ => unreachable!(),
            }
        };
        let mut report = Report::default();
        check_code_locations(&run(&format!("etl={good}")), &mut report).await;
        assert_eq!(
            report.checks[0].outcome,
            Outcome::Passed("etl: dagster 1.12.3".into())
        );
        let mut report = Report::default();
        check_code_locations(&run(&format!("etl={good},ml={bad}")), &mut report).await;
        let Outcome::Failed(why) = &report.checks[0].outcome else {
            panic!("{:?}", report.checks);
        };
        assert!(
            why.contains("\"ml\"") && why.contains("ModuleNotFoundError"),
            "{why}"
        );
    }

    #[test]
    fn a_report_fails_when_any_check_fails_and_says_how_many() {
        let mut report = Report::default();
        report.push("a", Outcome::Passed("fine".into()));
        report.push("b", Outcome::Skipped("n/a".into()));
        assert!(report.passed());
        assert!(report.to_string().ends_with("all checks passed"));
        report.push("c", Outcome::Failed("broken: do this".into()));
        assert!(!report.passed());
        let text = report.to_string();
        assert!(text.contains("[FAIL] c: broken: do this"), "{text}");
        assert!(text.ends_with("1 check(s) failed"), "{text}");
    }

    #[test]
    fn warnings_pass_and_are_counted() {
        let mut report = Report::default();
        report.push("a", Outcome::Warned("works, but".into()));
        assert!(report.passed());
        let text = report.to_string();
        assert!(text.contains("[warn] a: works, but"), "{text}");
        assert!(text.ends_with("all checks passed, 1 warning(s)"), "{text}");
    }

    fn info(storage: &str, packages: &[(&str, Option<&str>)]) -> BridgeInfo {
        BridgeInfo {
            storages: [("run_storage_data".to_string(), storage.to_string())].into(),
            root_directory: Some("/srv/dagster".into()),
            packages: packages
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
                .collect(),
            ..BridgeInfo::default()
        }
    }

    #[test]
    fn a_postgres_instance_with_sqlalchemy_2_1_fails_and_says_what_to_pin() {
        let postgres = "dagster_postgres.run_storage.PostgresRunStorage";
        let broken = info(
            postgres,
            &[
                ("sqlalchemy", Some("2.1.9")),
                ("dagster-postgres", Some("0.29.27")),
            ],
        );
        let Outcome::Failed(text) = storage_outcome(&broken) else {
            panic!("{:?}", storage_outcome(&broken));
        };
        assert!(text.contains("'sqlalchemy<2.1'"), "{text}");
        let fine = info(
            postgres,
            &[
                ("sqlalchemy", Some("2.0.44")),
                ("dagster-postgres", Some("0.29.27")),
            ],
        );
        assert_eq!(storage_outcome(&fine), Outcome::Passed(postgres.into()));
        // dagster-postgres installed beside a SQLite instance: the pin is only a warning.
        let sqlite = "dagster._core.storage.runs.SqliteRunStorage";
        let installed = info(
            sqlite,
            &[
                ("sqlalchemy", Some("2.1.0")),
                ("dagster-postgres", Some("0.29.27")),
            ],
        );
        assert!(
            matches!(storage_outcome(&installed), Outcome::Warned(t) if t.contains("psycopg 3"))
        );
        let local = info(
            sqlite,
            &[("sqlalchemy", Some("2.1.0")), ("dagster-postgres", None)],
        );
        assert!(
            matches!(storage_outcome(&local), Outcome::Warned(t) if t.contains("SQLite files under /srv/dagster"))
        );
        assert!(!sqlalchemy_maps_postgresql_to_psycopg3("2.0.99"));
        assert!(sqlalchemy_maps_postgresql_to_psycopg3("2.1.0b1"));
        assert!(sqlalchemy_maps_postgresql_to_psycopg3("3.0"));
    }

    #[test]
    fn an_instance_without_runs_is_a_warning_and_one_with_runs_names_the_latest() {
        let mut i = info("x", &[]);
        assert!(
            matches!(instance_outcome(&i, chrono::Utc::now()), Outcome::Warned(t) if t.contains("no runs yet"))
        );
        let now = chrono::Utc::now();
        i.latest_run = Some(crate::dagster::LatestRun {
            run_id: "r1".into(),
            status: "SUCCESS".into(),
            created: (now.timestamp() - 600) as f64,
        });
        assert_eq!(
            instance_outcome(&i, now),
            Outcome::Passed("its latest run is r1 (SUCCESS, created 10 min ago)".into())
        );
    }
}
