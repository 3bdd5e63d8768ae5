//! In-memory ECS and S3 for the ECS launcher's tests: idempotent clientTokens like ECS,
//! injectable throttling, and a record of every call.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::{Mutex, MutexGuard};

use crate::launcher::ecs::api::{
    ApiError, BlobStore, ContainerDefinitionView, DescribeOutput, Desired, EcsApi, ErrorClass,
    RunTaskOutput, TaskDefinitionView,
};
use crate::launcher::ecs::outcome::{ContainerView, TaskView};
use crate::launcher::ecs::request::{RunTaskRequest, Secret};

#[derive(Default)]
pub struct Inner {
    pub tasks: HashMap<String, TaskView>,
    pub tokens: HashMap<String, String>,
    pub run_calls: Vec<RunTaskRequest>,
    pub describe_batches: Vec<usize>,
    pub list_calls: usize,
    pub stops: Vec<(String, String)>,
    /// The next RunTask calls fail with these errors, in order.
    pub run_errors: Vec<ApiError>,
    /// The next RunTask calls answer with a `failures` entry of this reason.
    pub run_failures: Vec<String>,
    pub puts: Vec<(String, String, Vec<u8>)>,
    /// Registered task definitions by family, newest revision last.
    pub(crate) task_definitions: HashMap<String, Vec<TaskDefinitionView>>,
    pub describe_definition_calls: usize,
    /// (base, family) of each RegisterTaskDefinition.
    pub registrations: Vec<(String, String)>,
    /// The next RegisterTaskDefinition calls fail with these errors, in order.
    pub register_errors: Vec<ApiError>,
    next_id: u64,
}

#[derive(Clone, Default)]
pub struct FakeEcs {
    pub inner: Arc<Mutex<Inner>>,
}

pub fn throttled(message: &str) -> ApiError {
    let code = if message.contains("Rate exceeded") {
        "InvalidParameterException"
    } else {
        "ThrottlingException"
    };
    ApiError {
        operation: "RunTask",
        class: crate::aws::class_of(Some(code), message, Some(400)),
        code: Some(code.into()),
        message: message.into(),
    }
}

impl FakeEcs {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// A task as if started earlier (by another controller).
    pub fn add_task(&self, started_by: &str, last_status: &str) -> String {
        let mut inner = self.lock();
        inner.next_id += 1;
        let arn = format!(
            "arn:aws:ecs:us-east-1:123456789012:task/c/{:032}",
            inner.next_id
        );
        let view = TaskView {
            task_arn: arn.clone(),
            last_status: last_status.into(),
            desired_status: if last_status == "STOPPED" {
                "STOPPED"
            } else {
                "RUNNING"
            }
            .into(),
            started_by: Some(started_by.into()),
            containers: vec![ContainerView {
                name: "dagster".into(),
                ..Default::default()
            }],
            created_at: Some(inner.next_id as f64),
            ..Default::default()
        };
        inner.tasks.insert(arn.clone(), view);
        arn
    }

    /// Stops a task the way ECS reports it.
    pub fn finish(&self, arn: &str, stop_code: &str, exit_code: Option<i32>, reason: Option<&str>) {
        let mut inner = self.lock();
        let task = inner.tasks.get_mut(arn).expect("known task");
        task.last_status = "STOPPED".into();
        task.desired_status = "STOPPED".into();
        task.stop_code = Some(stop_code.into());
        task.stopped_reason = reason.map(str::to_owned);
        task.containers[0].exit_code = exit_code;
        task.containers[0].reason = reason.map(str::to_owned);
    }

    pub fn run_calls(&self) -> Vec<RunTaskRequest> {
        self.lock().run_calls.clone()
    }
}

#[async_trait]
impl EcsApi for FakeEcs {
    async fn run_task(&self, request: &RunTaskRequest) -> Result<RunTaskOutput, ApiError> {
        let mut inner = self.lock();
        inner.run_calls.push(request.clone());
        if !inner.run_errors.is_empty() {
            return Err(inner.run_errors.remove(0));
        }
        if !inner.run_failures.is_empty() {
            let reason = inner.run_failures.remove(0);
            return Ok(RunTaskOutput {
                tasks: Vec::new(),
                failures: vec![(String::new(), reason, String::new())],
            });
        }
        if let Some(arn) = inner.tokens.get(&request.client_token).cloned() {
            return Ok(RunTaskOutput {
                tasks: vec![inner.tasks[&arn].clone()],
                failures: Vec::new(),
            });
        }
        drop(inner);
        let arn = self.add_task(&request.started_by, "PROVISIONING");
        let mut inner = self.lock();
        inner
            .tokens
            .insert(request.client_token.clone(), arn.clone());
        Ok(RunTaskOutput {
            tasks: vec![inner.tasks[&arn].clone()],
            failures: Vec::new(),
        })
    }

    async fn list_tasks(
        &self,
        _cluster: &str,
        started_by: &str,
        desired: Desired,
    ) -> Result<Vec<String>, ApiError> {
        let mut inner = self.lock();
        inner.list_calls += 1;
        let want = match desired {
            Desired::Running => "RUNNING",
            Desired::Stopped => "STOPPED",
        };
        Ok(inner
            .tasks
            .values()
            .filter(|t| t.started_by.as_deref() == Some(started_by) && t.desired_status == want)
            .map(|t| t.task_arn.clone())
            .collect())
    }

    async fn describe_tasks(
        &self,
        _cluster: &str,
        arns: &[String],
    ) -> Result<DescribeOutput, ApiError> {
        assert!(arns.len() <= 100, "DescribeTasks takes at most 100 tasks");
        let mut inner = self.lock();
        inner.describe_batches.push(arns.len());
        let mut out = DescribeOutput::default();
        for arn in arns {
            match inner.tasks.get(arn) {
                Some(task) => out.tasks.push(task.clone()),
                None => out.missing.push(arn.clone()),
            }
        }
        Ok(out)
    }

    async fn stop_task(&self, _cluster: &str, arn: &str, reason: &str) -> Result<(), ApiError> {
        let mut inner = self.lock();
        inner.stops.push((arn.into(), reason.into()));
        if let Some(task) = inner.tasks.get_mut(arn) {
            task.desired_status = "STOPPED".into();
        }
        Ok(())
    }

    async fn describe_task_definition(
        &self,
        task_definition: &str,
    ) -> Result<Option<TaskDefinitionView>, ApiError> {
        let mut inner = self.lock();
        inner.describe_definition_calls += 1;
        let family = task_definition
            .rsplit('/')
            .next()
            .unwrap_or(task_definition);
        let family = family.split(':').next().unwrap_or(family);
        Ok(inner
            .task_definitions
            .get(family)
            .and_then(|revisions| revisions.last().cloned()))
    }

    async fn register_task_definition(
        &self,
        base: &str,
        family: &str,
        container: &str,
        image: &str,
        secrets: &[Secret],
    ) -> Result<TaskDefinitionView, ApiError> {
        let mut inner = self.lock();
        inner.registrations.push((base.into(), family.into()));
        if !inner.register_errors.is_empty() {
            return Err(inner.register_errors.remove(0));
        }
        let revisions = inner.task_definitions.entry(family.into()).or_default();
        let view = TaskDefinitionView {
            arn: format!(
                "arn:aws:ecs:eu-west-1:123456789012:task-definition/{family}:{}",
                revisions.len() + 1
            ),
            containers: vec![ContainerDefinitionView {
                name: container.into(),
                image: image.into(),
                secrets: secrets.to_vec(),
                logs: None,
            }],
        };
        revisions.push(view.clone());
        Ok(view)
    }
}

#[async_trait]
impl BlobStore for FakeEcs {
    async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) -> Result<(), ApiError> {
        self.lock().puts.push((bucket.into(), key.into(), body));
        Ok(())
    }
}

/// An error of the given class, for tests that need a plain one.
pub fn error(class: ErrorClass) -> ApiError {
    ApiError {
        operation: "RunTask",
        class,
        code: None,
        message: "injected".into(),
    }
}
