//! What a stopped ECS task says about its step: `stopCode`, `stoppedReason` and the step
//! container's exit code and reason become one named [`EcsStopCause`] (docs/ecs.md).

use serde::Deserialize;

/// The part of a DescribeTasks task the controller reads. Deserializes from the AWS JSON
/// (recorded responses in tests) and is built from the SDK's `Task` in production.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskView {
    pub task_arn: String,
    #[serde(default)]
    pub last_status: String,
    #[serde(default)]
    pub desired_status: String,
    #[serde(default)]
    pub stop_code: Option<String>,
    #[serde(default)]
    pub stopped_reason: Option<String>,
    #[serde(default)]
    pub started_by: Option<String>,
    #[serde(default)]
    pub containers: Vec<ContainerView>,
    /// Seconds since the epoch.
    #[serde(default)]
    pub created_at: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub last_status: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub reason: Option<String>,
}

impl TaskView {
    pub(crate) fn is_stopped(&self) -> bool {
        self.last_status == "STOPPED"
    }

    /// The step container: the one named `container`, else the first.
    fn step_container(&self, container: &str) -> Option<&ContainerView> {
        self.containers
            .iter()
            .find(|c| c.name == container)
            .or(self.containers.first())
    }

    /// Why the task stopped, and the step container's exit code if it ran.
    pub(crate) fn stop_cause(&self, container: &str) -> (EcsStopCause, Option<i32>) {
        let step = self.step_container(container);
        let exit_code = step.and_then(|c| c.exit_code);
        // Every reason ECS gave, task and containers, for the pattern checks below.
        let mut text = self.stopped_reason.clone().unwrap_or_default();
        for c in &self.containers {
            if let Some(reason) = &c.reason {
                text.push('\n');
                text.push_str(reason);
            }
        }
        let cause = match self.stop_code.as_deref() {
            Some("UserInitiated") => EcsStopCause::StoppedByUser,
            Some("SpotInterruption") => EcsStopCause::SpotInterruption,
            Some("TerminationNotice" | "InfrastructureHealth") => EcsStopCause::TerminationNotice,
            Some("ServiceSchedulerInitiated") => EcsStopCause::ServiceScheduler,
            Some("TaskFailedToStart") => {
                failed_to_start(&text).unwrap_or(EcsStopCause::TaskFailedToStart)
            }
            // EssentialContainerExited, or an older response without a stop code.
            _ => {
                if text.contains("OutOfMemoryError") || exit_code == Some(137) {
                    EcsStopCause::OutOfMemory
                } else if exit_code.is_some() {
                    EcsStopCause::Exited
                } else if let Some(cause) = failed_to_start(&text) {
                    cause
                } else if self.stop_code.as_deref() == Some("EssentialContainerExited") {
                    EcsStopCause::Exited
                } else {
                    EcsStopCause::Unknown
                }
            }
        };
        (cause, exit_code)
    }

    /// Lines for the verdict's `stderr_tail`: the ECS side of the story.
    pub(crate) fn report_lines(&self) -> Vec<String> {
        let mut lines = vec![format!("ECS task {}", self.task_arn)];
        if let Some(code) = &self.stop_code {
            lines.push(format!("stopCode: {code}"));
        }
        if let Some(reason) = self.stopped_reason.as_deref().filter(|r| !r.is_empty()) {
            lines.push(format!("stoppedReason: {reason}"));
        }
        for c in &self.containers {
            let exit = c.exit_code.map_or_else(
                || "no exit code".to_owned(),
                |code| format!("exit code {code}"),
            );
            match c.reason.as_deref().filter(|r| !r.is_empty()) {
                Some(reason) => {
                    lines.push(format!("container {}: {exit}, reason: {reason}", c.name))
                }
                None => lines.push(format!("container {}: {exit}", c.name)),
            }
        }
        lines
    }
}

/// The named ways a task fails before its step container runs, from ECS's reason text.
fn failed_to_start(text: &str) -> Option<EcsStopCause> {
    if text.contains("CannotPullContainerError") {
        Some(EcsStopCause::CannotPullContainer)
    } else if text.contains("network interface") || text.contains("ENI") {
        // "Timeout waiting for network interface provisioning to complete.",
        // "ResourceInitializationError: failed to configure ENI ..."
        Some(EcsStopCause::EniTimeout)
    } else if text.contains("ResourceInitializationError") {
        Some(EcsStopCause::ResourceInitialization)
    } else {
        None
    }
}

/// Why an ECS task stopped, as far as its step is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcsStopCause {
    /// The step container exited by itself (`EssentialContainerExited`) with its exit code.
    Exited,
    /// `OutOfMemoryError` in the container reason, or exit code 137 (SIGKILL) without a stop
    /// request: the kernel killed the step for its memory.
    OutOfMemory,
    /// Fargate Spot took the capacity back (`SpotInterruption`).
    SpotInterruption,
    /// The host is being retired, drained or is unhealthy (`TerminationNotice`,
    /// `InfrastructureHealth`).
    TerminationNotice,
    /// The image could not be pulled (`CannotPullContainerError`).
    CannotPullContainer,
    /// Secrets, log driver or volumes could not be set up (`ResourceInitializationError`).
    ResourceInitialization,
    /// The awsvpc network interface was not ready in time (ENI provisioning or attachment).
    EniTimeout,
    /// Any other `TaskFailedToStart`.
    TaskFailedToStart,
    /// StopTask was called (`UserInitiated`): by this controller or by someone else.
    StoppedByUser,
    /// The ECS scheduler stopped it (`ServiceSchedulerInitiated`).
    ServiceScheduler,
    /// DescribeTasks no longer knows the task (`MISSING`).
    Vanished,
    /// Stopped without a stop code, exit code or reason the controller recognizes.
    Unknown,
}

impl EcsStopCause {
    /// Stable name, as in ECS where it has one: metrics, verdict `exit`, docs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            EcsStopCause::Exited => "EssentialContainerExited",
            EcsStopCause::OutOfMemory => "OutOfMemoryError",
            EcsStopCause::SpotInterruption => "SpotInterruption",
            EcsStopCause::TerminationNotice => "TerminationNotice",
            EcsStopCause::CannotPullContainer => "CannotPullContainerError",
            EcsStopCause::ResourceInitialization => "ResourceInitializationError",
            EcsStopCause::EniTimeout => "EniTimeout",
            EcsStopCause::TaskFailedToStart => "TaskFailedToStart",
            EcsStopCause::StoppedByUser => "UserInitiated",
            EcsStopCause::ServiceScheduler => "ServiceSchedulerInitiated",
            EcsStopCause::Vanished => "TaskMissing",
            EcsStopCause::Unknown => "Unknown",
        }
    }

    /// The step container never ran: the infrastructure failed, not the op, so the same
    /// attempt is relaunched (with backoff) rather than given a verdict.
    pub(crate) fn never_started(self) -> bool {
        matches!(
            self,
            EcsStopCause::CannotPullContainer
                | EcsStopCause::ResourceInitialization
                | EcsStopCause::EniTimeout
                | EcsStopCause::TaskFailedToStart
        )
    }

    /// Sentence for a verdict.
    pub(crate) fn describe(self, exit_code: Option<i32>) -> String {
        let code = exit_code
            .map(|c| format!(", exit code {c}"))
            .unwrap_or_default();
        match self {
            EcsStopCause::Exited => match exit_code {
                Some(0) => "ECS task exited with code 0 but Dagster recorded no outcome for the attempt".into(),
                Some(c) => format!("ECS task's step container exited with code {c}"),
                None => "ECS task's step container exited without an exit code".into(),
            },
            EcsStopCause::OutOfMemory => format!(
                "ECS task ran out of memory (OutOfMemoryError{code}); raise op tag ecs/memory"
            ),
            EcsStopCause::SpotInterruption => {
                format!("ECS task was stopped by a Fargate Spot interruption (SpotInterruption{code})")
            }
            EcsStopCause::TerminationNotice => {
                format!("ECS task was stopped because its host is being retired (TerminationNotice{code})")
            }
            EcsStopCause::CannotPullContainer => {
                "ECS task failed to start: its image could not be pulled (CannotPullContainerError)".into()
            }
            EcsStopCause::ResourceInitialization => "ECS task failed to start: its secrets, logging or volumes could not be set up (ResourceInitializationError)".into(),
            EcsStopCause::EniTimeout => {
                "ECS task failed to start: its network interface was not ready in time (ENI timeout)".into()
            }
            EcsStopCause::TaskFailedToStart => "ECS task failed to start (TaskFailedToStart)".into(),
            EcsStopCause::StoppedByUser => format!("ECS task was stopped by StopTask (UserInitiated{code})"),
            EcsStopCause::ServiceScheduler => {
                format!("ECS task was stopped by the ECS scheduler (ServiceSchedulerInitiated{code})")
            }
            EcsStopCause::Vanished => "ECS no longer knows the task (DescribeTasks: MISSING)".into(),
            EcsStopCause::Unknown => format!("ECS task stopped for an unrecognized reason{code}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Recorded {
        tasks: Vec<TaskView>,
    }

    /// Each file is a DescribeTasks response in the AWS JSON shape for one stop reason
    /// (tests/ecs/describe_tasks/; see its README for where the shapes come from).
    fn recorded(name: &str) -> TaskView {
        let path = format!(
            "{}/tests/ecs/describe_tasks/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut recorded: Recorded = serde_json::from_str(&text).expect(&path);
        recorded.tasks.remove(0)
    }

    #[test]
    fn recorded_stop_reasons_map_to_named_causes() {
        let cases = [
            ("success", EcsStopCause::Exited, Some(0), false),
            ("exit_code_3", EcsStopCause::Exited, Some(3), false),
            ("out_of_memory", EcsStopCause::OutOfMemory, Some(137), false),
            (
                "exit_137_no_reason",
                EcsStopCause::OutOfMemory,
                Some(137),
                false,
            ),
            (
                "spot_interruption",
                EcsStopCause::SpotInterruption,
                Some(143),
                false,
            ),
            (
                "termination_notice",
                EcsStopCause::TerminationNotice,
                None,
                false,
            ),
            (
                "cannot_pull_container",
                EcsStopCause::CannotPullContainer,
                None,
                true,
            ),
            (
                "resource_initialization",
                EcsStopCause::ResourceInitialization,
                None,
                true,
            ),
            ("eni_timeout", EcsStopCause::EniTimeout, None, true),
            (
                "task_failed_to_start",
                EcsStopCause::TaskFailedToStart,
                None,
                true,
            ),
            (
                "user_initiated",
                EcsStopCause::StoppedByUser,
                Some(137),
                false,
            ),
        ];
        for (name, cause, exit_code, never_started) in cases {
            let task = recorded(name);
            assert!(task.is_stopped(), "{name}");
            assert_eq!(task.stop_cause("dagster"), (cause, exit_code), "{name}");
            assert_eq!(cause.never_started(), never_started, "{name}");
            assert!(!cause.describe(exit_code).is_empty());
        }
    }

    #[test]
    fn the_step_container_is_found_by_name_among_sidecars() {
        let task = recorded("out_of_memory");
        assert_eq!(
            task.containers.len(),
            2,
            "the recording has a log router sidecar"
        );
        assert_eq!(task.stop_cause("dagster").1, Some(137));
        let lines = task.report_lines();
        assert!(lines[0].starts_with("ECS task arn:aws:ecs:"), "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("OutOfMemoryError: Container killed")),
            "{lines:?}"
        );
    }

    #[test]
    fn a_running_task_is_not_stopped() {
        let task: TaskView = serde_json::from_value(serde_json::json!({
            "taskArn": "arn:aws:ecs:us-east-1:123456789012:task/c/1",
            "lastStatus": "RUNNING", "desiredStatus": "RUNNING",
            "containers": [{"name": "dagster", "lastStatus": "RUNNING"}],
        }))
        .unwrap();
        assert!(!task.is_stopped());
        assert_eq!(task.stop_cause("dagster"), (EcsStopCause::Unknown, None));
    }
}
