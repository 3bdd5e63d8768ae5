//! The ECS and S3 calls the launcher makes, behind traits so the launch logic (adoption,
//! retries, offload, batching) is tested with fakes; [`AwsEcs`] and [`AwsBlobStore`] are the
//! aws-sdk implementations.

use async_trait::async_trait;
use aws_sdk_ecs::config::http::HttpResponse;
use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ecs::types as ecs;

use super::outcome::{ContainerView, TaskView};
use super::request::{RunTaskRequest, Secret};
use crate::aws;
pub(crate) use crate::aws::ErrorClass;
use crate::retry::Transient;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{operation} failed ({}): {message}", class.name())]
pub struct ApiError {
    pub operation: &'static str,
    pub class: ErrorClass,
    pub code: Option<String>,
    pub message: String,
}

impl ApiError {
    pub(crate) fn retryable(&self) -> bool {
        self.class.retryable()
    }
}

impl Transient for ApiError {
    fn is_transient(&self) -> bool {
        self.retryable()
    }
}

fn api_error<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> ApiError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let failure = aws::classify(&err);
    ApiError {
        operation,
        class: failure.class,
        code: failure.code,
        message: failure.text,
    }
}

/// A RunTask answer: the started task, or ECS's reasons for not starting one.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunTaskOutput {
    pub tasks: Vec<TaskView>,
    /// `(arn, reason, detail)`: e.g. `RESOURCE:MEMORY`, `AGENT`, `MISSING`.
    pub failures: Vec<(String, String, String)>,
}

/// A DescribeTasks answer.
#[derive(Debug, Clone, Default)]
pub(crate) struct DescribeOutput {
    pub tasks: Vec<TaskView>,
    /// ARNs ECS reported as failures (normally `MISSING`).
    pub missing: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Desired {
    Running,
    Stopped,
}

/// The ECS calls of the launcher.
#[async_trait]
pub(crate) trait EcsApi: Send + Sync + 'static {
    async fn run_task(&self, request: &RunTaskRequest) -> Result<RunTaskOutput, ApiError>;
    /// Every task ARN with this `startedBy` and desired status (all pages).
    async fn list_tasks(
        &self,
        cluster: &str,
        started_by: &str,
        desired: Desired,
    ) -> Result<Vec<String>, ApiError>;
    /// At most 100 ARNs per call (the ECS limit).
    async fn describe_tasks(
        &self,
        cluster: &str,
        arns: &[String],
    ) -> Result<DescribeOutput, ApiError>;
    async fn stop_task(&self, cluster: &str, arn: &str, reason: &str) -> Result<(), ApiError>;
    /// A task definition (family: its newest ACTIVE revision); `None` when ECS knows none.
    async fn describe_task_definition(
        &self,
        task_definition: &str,
    ) -> Result<Option<TaskDefinitionView>, ApiError>;
    /// Registers a copy of `base` (same roles, sizes, network mode, volumes, log
    /// configuration, other containers) as a revision of `family`, with the container
    /// `container`'s image replaced and `secrets` added to it.
    async fn register_task_definition(
        &self,
        base: &str,
        family: &str,
        container: &str,
        image: &str,
        secrets: &[Secret],
    ) -> Result<TaskDefinitionView, ApiError>;
}

/// What the launcher reads of a task definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TaskDefinitionView {
    /// With its revision.
    pub arn: String,
    pub containers: Vec<ContainerDefinitionView>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContainerDefinitionView {
    pub name: String,
    pub image: String,
    /// Sorted by name.
    pub secrets: Vec<Secret>,
    /// Its `awslogs` log configuration, if it has one.
    pub logs: Option<crate::links::AwsLogs>,
}

impl TaskDefinitionView {
    pub(crate) fn container(&self, name: &str) -> Option<&ContainerDefinitionView> {
        self.containers.iter().find(|c| c.name == name)
    }
}

/// Where offloaded step args go.
#[async_trait]
pub(crate) trait BlobStore: Send + Sync + 'static {
    async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) -> Result<(), ApiError>;
}

// ---- aws-sdk implementations ----------------------------------------------------------------

pub(crate) struct AwsEcs {
    client: aws_sdk_ecs::Client,
}

impl AwsEcs {
    pub(crate) fn new(client: aws_sdk_ecs::Client) -> Self {
        Self { client }
    }
}

fn task_view(task: &ecs::Task) -> TaskView {
    TaskView {
        task_arn: task.task_arn().unwrap_or_default().to_owned(),
        last_status: task.last_status().unwrap_or_default().to_owned(),
        desired_status: task.desired_status().unwrap_or_default().to_owned(),
        stop_code: task.stop_code().map(|c| c.as_str().to_owned()),
        stopped_reason: task.stopped_reason().map(str::to_owned),
        started_by: task.started_by().map(str::to_owned),
        containers: task
            .containers()
            .iter()
            .map(|c| ContainerView {
                name: c.name().unwrap_or_default().to_owned(),
                last_status: c.last_status().map(str::to_owned),
                exit_code: c.exit_code(),
                reason: c.reason().map(str::to_owned),
            })
            .collect(),
        created_at: task.created_at().map(|t| t.as_secs_f64()),
    }
}

fn build_error(operation: &'static str, e: impl std::fmt::Display) -> ApiError {
    ApiError {
        operation,
        class: ErrorClass::Permanent,
        code: None,
        message: e.to_string(),
    }
}

/// The SDK's TaskOverride from ours.
fn sdk_overrides(request: &RunTaskRequest) -> Result<ecs::TaskOverride, ApiError> {
    let o = &request.overrides;
    let mut containers = Vec::with_capacity(o.container_overrides.len());
    for c in &o.container_overrides {
        let mut b = ecs::ContainerOverride::builder().name(&c.name);
        if !c.command.is_empty() {
            b = b.set_command(Some(c.command.clone()));
        }
        for kv in &c.environment {
            b = b.environment(
                ecs::KeyValuePair::builder()
                    .name(&kv.name)
                    .value(&kv.value)
                    .build(),
            );
        }
        for file in &c.settings.environment_files {
            b = b.environment_files(
                ecs::EnvironmentFile::builder()
                    .value(&file.value)
                    .r#type(ecs::EnvironmentFileType::from(file.kind.as_str()))
                    .build()
                    .map_err(|e| build_error("RunTask", e))?,
            );
        }
        for rr in &c.settings.resource_requirements {
            b = b.resource_requirements(
                ecs::ResourceRequirement::builder()
                    .value(&rr.value)
                    .r#type(ecs::ResourceType::from(rr.kind.as_str()))
                    .build()
                    .map_err(|e| build_error("RunTask", e))?,
            );
        }
        b = b
            .set_cpu(c.settings.cpu)
            .set_memory(c.settings.memory)
            .set_memory_reservation(c.settings.memory_reservation);
        containers.push(b.build());
    }
    Ok(ecs::TaskOverride::builder()
        .set_container_overrides(Some(containers))
        .set_cpu(o.cpu.clone())
        .set_memory(o.memory.clone())
        .set_ephemeral_storage(o.ephemeral_storage.map(|s| {
            ecs::EphemeralStorage::builder()
                .size_in_gib(s.size_in_gib)
                .build()
        }))
        .set_task_role_arn(o.task_role_arn.clone())
        .set_execution_role_arn(o.execution_role_arn.clone())
        .build())
}

#[async_trait]
impl EcsApi for AwsEcs {
    async fn run_task(&self, r: &RunTaskRequest) -> Result<RunTaskOutput, ApiError> {
        let mut call = self
            .client
            .run_task()
            .cluster(&r.cluster)
            .task_definition(&r.task_definition)
            .count(1)
            .client_token(&r.client_token)
            .started_by(&r.started_by)
            .overrides(sdk_overrides(r)?)
            .set_launch_type(r.launch_type.as_deref().map(ecs::LaunchType::from))
            .set_platform_version(r.platform_version.clone())
            .set_group(r.group.clone())
            .set_propagate_tags(r.propagate_tags.as_deref().map(ecs::PropagateTags::from))
            .set_enable_execute_command(r.enable_execute_command)
            .set_enable_ecs_managed_tags(r.enable_ecs_managed_tags);
        for item in &r.capacity_provider_strategy {
            call = call.capacity_provider_strategy(
                ecs::CapacityProviderStrategyItem::builder()
                    .capacity_provider(&item.capacity_provider)
                    .set_weight(item.weight)
                    .set_base(item.base)
                    .build()
                    .map_err(|e| build_error("RunTask", e))?,
            );
        }
        if let Some(network) = &r.network_configuration {
            let vpc = &network.awsvpc_configuration;
            call = call.network_configuration(
                ecs::NetworkConfiguration::builder()
                    .awsvpc_configuration(
                        ecs::AwsVpcConfiguration::builder()
                            .set_subnets(Some(vpc.subnets.clone()))
                            .set_security_groups(
                                (!vpc.security_groups.is_empty())
                                    .then(|| vpc.security_groups.clone()),
                            )
                            .set_assign_public_ip(
                                vpc.assign_public_ip
                                    .as_deref()
                                    .map(ecs::AssignPublicIp::from),
                            )
                            .build()
                            .map_err(|e| build_error("RunTask", e))?,
                    )
                    .build(),
            );
        }
        for c in &r.placement_constraints {
            call = call.placement_constraints(
                ecs::PlacementConstraint::builder()
                    .r#type(ecs::PlacementConstraintType::from(c.kind.as_str()))
                    .set_expression(c.expression.clone())
                    .build(),
            );
        }
        for s in &r.placement_strategy {
            call = call.placement_strategy(
                ecs::PlacementStrategy::builder()
                    .r#type(ecs::PlacementStrategyType::from(s.kind.as_str()))
                    .set_field(s.field.clone())
                    .build(),
            );
        }
        for tag in &r.tags {
            call = call.tags(ecs::Tag::builder().key(&tag.key).value(&tag.value).build());
        }
        let out = call.send().await.map_err(|e| api_error("RunTask", e))?;
        Ok(RunTaskOutput {
            tasks: out.tasks().iter().map(task_view).collect(),
            failures: out
                .failures()
                .iter()
                .map(|f| {
                    (
                        f.arn().unwrap_or_default().to_owned(),
                        f.reason().unwrap_or_default().to_owned(),
                        f.detail().unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
        })
    }

    async fn list_tasks(
        &self,
        cluster: &str,
        started_by: &str,
        desired: Desired,
    ) -> Result<Vec<String>, ApiError> {
        let status = match desired {
            Desired::Running => ecs::DesiredStatus::Running,
            Desired::Stopped => ecs::DesiredStatus::Stopped,
        };
        let mut arns = Vec::new();
        let mut next_token = None;
        loop {
            let out = self
                .client
                .list_tasks()
                .cluster(cluster)
                .started_by(started_by)
                .desired_status(status.clone())
                .set_next_token(next_token)
                .send()
                .await
                .map_err(|e| api_error("ListTasks", e))?;
            arns.extend(out.task_arns().iter().cloned());
            next_token = out.next_token().map(str::to_owned);
            if next_token.is_none() {
                return Ok(arns);
            }
        }
    }

    async fn describe_tasks(
        &self,
        cluster: &str,
        arns: &[String],
    ) -> Result<DescribeOutput, ApiError> {
        let out = self
            .client
            .describe_tasks()
            .cluster(cluster)
            .set_tasks(Some(arns.to_vec()))
            .send()
            .await
            .map_err(|e| api_error("DescribeTasks", e))?;
        Ok(DescribeOutput {
            tasks: out.tasks().iter().map(task_view).collect(),
            missing: out
                .failures()
                .iter()
                .filter_map(|f| f.arn().map(str::to_owned))
                .collect(),
        })
    }

    async fn stop_task(&self, cluster: &str, arn: &str, reason: &str) -> Result<(), ApiError> {
        self.client
            .stop_task()
            .cluster(cluster)
            .task(arn)
            .reason(reason)
            .send()
            .await
            .map_err(|e| api_error("StopTask", e))?;
        Ok(())
    }

    async fn describe_task_definition(
        &self,
        task_definition: &str,
    ) -> Result<Option<TaskDefinitionView>, ApiError> {
        Ok(self
            .describe_sdk(task_definition)
            .await?
            .as_ref()
            .map(definition_view))
    }

    async fn register_task_definition(
        &self,
        base: &str,
        family: &str,
        container: &str,
        image: &str,
        secrets: &[Secret],
    ) -> Result<TaskDefinitionView, ApiError> {
        let Some(td) = self.describe_sdk(base).await? else {
            return Err(build_error(
                "DescribeTaskDefinition",
                format!("task definition {base} no longer exists"),
            ));
        };
        let mut containers = td.container_definitions().to_vec();
        let Some(step) = containers.iter_mut().find(|c| c.name() == Some(container)) else {
            return Err(build_error(
                "RegisterTaskDefinition",
                format!("task definition {base} has no container {container:?}"),
            ));
        };
        step.image = Some(image.to_owned());
        let mut all_secrets = step.secrets.take().unwrap_or_default();
        all_secrets.retain(|s| !secrets.iter().any(|n| n.name == s.name()));
        for secret in secrets {
            all_secrets.push(
                ecs::Secret::builder()
                    .name(&secret.name)
                    .value_from(&secret.value_from)
                    .build()
                    .map_err(|e| build_error("RegisterTaskDefinition", e))?,
            );
        }
        step.secrets = (!all_secrets.is_empty()).then_some(all_secrets);
        let out = self
            .client
            .register_task_definition()
            .family(family)
            .set_task_role_arn(td.task_role_arn().map(str::to_owned))
            .set_execution_role_arn(td.execution_role_arn().map(str::to_owned))
            .set_network_mode(td.network_mode().cloned())
            .set_container_definitions(Some(containers))
            .set_volumes(Some(td.volumes().to_vec()))
            .set_placement_constraints(Some(td.placement_constraints().to_vec()))
            .set_requires_compatibilities(Some(td.requires_compatibilities().to_vec()))
            .set_cpu(td.cpu().map(str::to_owned))
            .set_memory(td.memory().map(str::to_owned))
            .set_pid_mode(td.pid_mode().cloned())
            .set_ipc_mode(td.ipc_mode().cloned())
            .set_proxy_configuration(td.proxy_configuration().cloned())
            .set_ephemeral_storage(td.ephemeral_storage().cloned())
            .set_runtime_platform(td.runtime_platform().cloned())
            .set_enable_fault_injection(td.enable_fault_injection())
            .send()
            .await
            .map_err(|e| api_error("RegisterTaskDefinition", e))?;
        out.task_definition().map(definition_view).ok_or_else(|| {
            build_error(
                "RegisterTaskDefinition",
                "the answer has no task definition",
            )
        })
    }
}

impl AwsEcs {
    async fn describe_sdk(
        &self,
        task_definition: &str,
    ) -> Result<Option<ecs::TaskDefinition>, ApiError> {
        let result = self
            .client
            .describe_task_definition()
            .task_definition(task_definition)
            .send()
            .await;
        match result {
            Ok(out) => Ok(out.task_definition),
            Err(e) => {
                let error = api_error("DescribeTaskDefinition", e);
                // What ECS (and moto) answer for a family or revision it does not have.
                if error.code.as_deref() == Some("ClientException")
                    && error.message.contains("Unable to describe task definition")
                {
                    return Ok(None);
                }
                Err(error)
            }
        }
    }
}

fn definition_view(td: &ecs::TaskDefinition) -> TaskDefinitionView {
    TaskDefinitionView {
        arn: td.task_definition_arn().unwrap_or_default().to_owned(),
        containers: td
            .container_definitions()
            .iter()
            .map(|c| {
                let mut secrets: Vec<Secret> = c
                    .secrets()
                    .iter()
                    .map(|s| Secret {
                        name: s.name().to_owned(),
                        value_from: s.value_from().to_owned(),
                    })
                    .collect();
                secrets.sort();
                ContainerDefinitionView {
                    name: c.name().unwrap_or_default().to_owned(),
                    image: c.image().unwrap_or_default().to_owned(),
                    secrets,
                    logs: c.log_configuration().and_then(awslogs),
                }
            })
            .collect(),
    }
}

/// The `awslogs` options of a log configuration (other drivers: none).
fn awslogs(config: &ecs::LogConfiguration) -> Option<crate::links::AwsLogs> {
    if config.log_driver().as_str() != "awslogs" {
        return None;
    }
    let options = config.options()?;
    Some(crate::links::AwsLogs {
        group: options.get("awslogs-group")?.clone(),
        stream_prefix: options.get("awslogs-stream-prefix").cloned(),
        region: options.get("awslogs-region").cloned(),
    })
}

pub(crate) struct AwsBlobStore {
    client: aws_sdk_s3::Client,
}

impl AwsBlobStore {
    pub(crate) fn new(client: aws_sdk_s3::Client) -> Self {
        Self { client }
    }
}

#[async_trait]
impl BlobStore for AwsBlobStore {
    async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) -> Result<(), ApiError> {
        self.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type("text/plain")
            .body(body.into())
            .send()
            .await
            .map_err(|e| api_error("PutObject", e))?;
        Ok(())
    }
}

/// Counts one ECS API call in `dagster_taskiq_ecs_api_calls_total` by operation and result.
pub(crate) fn count_call(
    metrics: &crate::metrics::Metrics,
    operation: &'static str,
    result: &Result<impl Sized, ApiError>,
) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(e) => e.class.name(),
    };
    metrics
        .ecs_api_calls
        .get_or_create(&[("operation", operation), ("result", outcome)])
        .inc();
}
