//! Links from a step attempt to where an operator looks next: its run in the Dagster UI
//! (`--dagster-url`), and for an ECS step its task in the AWS console and its CloudWatch log
//! stream (from the task definition's `awslogs` options). Run ids, step keys and task ARNs
//! come from queue messages and from ECS: every link is built with URL encoding from checked
//! parts, and a part that does not look like what ECS makes gives no link at all.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Serialize;
use url::Url;

/// One link as the API and the engine events carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link {
    /// `dagster_run`, `dagster_step`, `ecs_task` or `cloudwatch_logs`.
    pub kind: &'static str,
    pub url: String,
}

/// The Dagster webserver's base URL, checked: http(s), with a host, no query or fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DagsterUi {
    base: Url,
}

impl DagsterUi {
    /// Parses `--dagster-url`; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut base =
            Url::parse(text.trim()).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(format!("{text:?} is not an http or https URL"));
        }
        if base.host_str().is_none_or(str::is_empty) {
            return Err(format!("{text:?} has no host"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(format!(
                "{text:?} has a query or fragment: give the webserver's base URL"
            ));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(format!(
                "{text:?} carries credentials: they would be shown on every link"
            ));
        }
        // A base under a path prefix (`--path-prefix` of the webserver) keeps it.
        if let Ok(mut segments) = base.path_segments_mut() {
            segments.pop_if_empty();
        }
        Ok(Self { base })
    }

    /// `<base>/runs/<run_id>`.
    pub fn run(&self, run_id: &str) -> String {
        self.run_url(run_id).into()
    }

    /// The run page with the step selected and its logs filtered to it
    /// (`?selection=<step>&logs=step:<step>`).
    pub fn step(&self, run_id: &str, step_key: &str) -> String {
        let mut url = self.run_url(run_id);
        url.query_pairs_mut()
            .append_pair("selection", step_key)
            .append_pair("logs", &format!("step:{step_key}"));
        url.into()
    }

    fn run_url(&self, run_id: &str) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked: http(s) with a host")
            .push("runs")
            .push(run_id);
        url
    }

    /// The links of a step attempt into the Dagster UI.
    pub fn links(&self, run_id: &str, step_key: &str) -> [Link; 2] {
        [
            Link {
                kind: "dagster_run",
                url: self.run(run_id),
            },
            Link {
                kind: "dagster_step",
                url: self.step(run_id, step_key),
            },
        ]
    }
}

/// The `awslogs` options of the step container's log configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AwsLogs {
    pub group: String,
    /// `awslogs-stream-prefix`: without one the stream is named after the Docker container
    /// id, which ECS does not report, so only the group is linked.
    pub stream_prefix: Option<String>,
    /// `awslogs-region`; `None`: the task's region.
    pub region: Option<String>,
}

/// The parts of a task ARN
/// (`arn:<partition>:ecs:<region>:<account>:task/<cluster>/<task id>`) a link needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TaskArn<'a> {
    partition: &'a str,
    region: &'a str,
    cluster: &'a str,
    task_id: &'a str,
}

fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 255
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn is_region(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 32
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl<'a> TaskArn<'a> {
    fn parse(arn: &'a str) -> Option<Self> {
        let mut parts = arn.splitn(6, ':');
        let (Some("arn"), Some(partition), Some("ecs"), Some(region), Some(_account), Some(rest)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        // Only the new ARN format names the cluster; the console needs it.
        let mut path = rest.split('/');
        let (Some("task"), Some(cluster), Some(task_id), None) =
            (path.next(), path.next(), path.next(), path.next())
        else {
            return None;
        };
        (console_host(partition, region).is_some() && is_name(cluster) && is_name(task_id))
            .then_some(TaskArn {
                partition,
                region,
                cluster,
                task_id,
            })
    }
}

/// The AWS console's origin for a partition and region.
fn console_host(partition: &str, region: &str) -> Option<String> {
    if !is_region(region) {
        return None;
    }
    match partition {
        "aws" => Some(format!("https://{region}.console.aws.amazon.com")),
        "aws-cn" => Some("https://console.amazonaws.cn".to_owned()),
        "aws-us-gov" => Some("https://console.amazonaws-us-gov.com".to_owned()),
        _ => None,
    }
}

/// What the CloudWatch console's `#logsV2:` fragment takes: each name URL-encoded, then
/// its `%` written as `$25`.
const LOGS_FRAGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn console_fragment_part(name: &str) -> String {
    utf8_percent_encode(name, LOGS_FRAGMENT)
        .to_string()
        .replace('%', "$25")
}

/// The links of an ECS step: its task in the console and its log stream (or log group).
/// None for an ARN that is not an ECS task ARN of a known partition.
pub fn ecs_links(task_arn: &str, container: &str, logs: Option<&AwsLogs>) -> Vec<Link> {
    let Some(arn) = TaskArn::parse(task_arn) else {
        return Vec::new();
    };
    let host = console_host(arn.partition, arn.region).expect("checked by parse");
    let mut task = Url::parse(&host).expect("a fixed https origin");
    task.path_segments_mut().expect("https").extend([
        "ecs",
        "v2",
        "clusters",
        arn.cluster,
        "tasks",
        arn.task_id,
    ]);
    task.query_pairs_mut().append_pair("region", arn.region);
    let mut links = vec![Link {
        kind: "ecs_task",
        url: task.into(),
    }];
    if let Some(logs) = logs.filter(|l| !l.group.is_empty()) {
        let region = logs.region.as_deref().unwrap_or(arn.region);
        if let Some(host) = console_host(arn.partition, region) {
            let mut fragment = format!(
                "logsV2:log-groups/log-group/{}",
                console_fragment_part(&logs.group)
            );
            // awslogs names the stream <prefix>/<container>/<task id>.
            if let Some(prefix) = &logs.stream_prefix {
                let stream = format!("{prefix}/{container}/{}", arn.task_id);
                fragment.push_str("/log-events/");
                fragment.push_str(&console_fragment_part(&stream));
            }
            let mut url = Url::parse(&host).expect("a fixed https origin");
            url.path_segments_mut()
                .expect("https")
                .extend(["cloudwatch", "home"]);
            url.query_pairs_mut().append_pair("region", region);
            url.set_fragment(Some(&fragment));
            links.push(Link {
                kind: "cloudwatch_logs",
                url: url.into(),
            });
        }
    }
    links
}

#[cfg(test)]
mod tests;
