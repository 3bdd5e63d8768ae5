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
use crate::dagster::{SidecarBridge, SidecarConfig};
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
        if failed == 0 {
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
    let outcome = match bridge.ping().await {
        Ok(info) => Outcome::Passed(format!(
            "{} runs the bridge with dagster {} on the instance of DAGSTER_HOME ({})",
            args.python.display(),
            info.dagster_version,
            info.storages
                .values()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Err(e) => Outcome::Failed(format!(
            "the bridge does not start with {}: {e}. Point --python (DAGSTER_TASKIQ_PYTHON) at \
             an interpreter with dagster and the dagster-taskiq-controller package installed, \
             and set DAGSTER_HOME to the instance your runs use",
            args.python.display()
        )),
    };
    bridge.close().await;
    report.push(NAME, outcome);
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
}
