//! A task definition per code location image: a run whose image (or secrets) is not the
//! controller's task definition's gets a copy of that task definition with the step
//! container's image replaced and the secrets added, in a family named after the base family
//! and a hash of what differs. It is registered once: looked up in memory, then with
//! DescribeTaskDefinition (another replica, or an earlier process, may have registered it),
//! and registered only when neither has it.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::api::{self, ApiError, EcsApi, TaskDefinitionView};
use super::request::{task_definition_family, Secret};
use crate::metrics::Metrics;

/// ECS's longest family name.
const MAX_FAMILY: usize = 255;
/// Hex characters of the hash in a derived family: 48 bits, no collision among the images
/// of one deployment.
const HASH_CHARS: usize = 12;
/// Derived task definitions remembered; past this the memory starts over (ECS still has
/// them: each is found again with one DescribeTaskDefinition).
const CACHE_SIZE: usize = 1024;

/// The task definition every derived one copies, as read at start.
#[derive(Debug, Clone)]
pub(crate) struct BaseDefinition {
    /// The revision read at start: what derived definitions copy.
    pub arn: String,
    pub container: String,
    pub image: String,
    /// The step container's `awslogs` settings: a copy for another image keeps them.
    pub logs: Option<crate::links::AwsLogs>,
}

impl BaseDefinition {
    pub(crate) fn from_view(view: &TaskDefinitionView, container: &str) -> Option<Self> {
        let step = view.container(container)?;
        Some(BaseDefinition {
            arn: view.arn.clone(),
            container: container.to_owned(),
            image: step.image.clone(),
            logs: step.logs.clone(),
        })
    }
}

/// The family of the copy of `base` for `image` and `secrets`: the base family, `-`, and a
/// hash of the base revision, the image and the secrets. A new base revision makes new
/// families, so a copy never outlives what it copied.
pub(crate) fn derived_family(base: &BaseDefinition, image: &str, secrets: &[Secret]) -> String {
    let mut hash = Sha256::new();
    for part in [base.arn.as_str(), base.container.as_str(), image] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    for secret in secrets {
        hash.update(secret.name.as_bytes());
        hash.update([0]);
        hash.update(secret.value_from.as_bytes());
        hash.update([0]);
    }
    let digest = hex::encode(hash.finalize());
    let family = task_definition_family(&base.arn);
    let keep = family.len().min(MAX_FAMILY - HASH_CHARS - 1);
    format!("{}-{}", &family[..keep], &digest[..HASH_CHARS])
}

/// The derived task definitions of one launcher.
pub(crate) struct TaskDefinitions {
    base: BaseDefinition,
    api: Arc<dyn EcsApi>,
    metrics: Arc<Metrics>,
    /// Family -> ARN, set once per family; concurrent launches of one image wait for the
    /// first one's lookup instead of registering twice.
    cache: Mutex<HashMap<String, Arc<OnceCell<String>>>>,
}

impl TaskDefinitions {
    pub(crate) fn new(base: BaseDefinition, api: Arc<dyn EcsApi>, metrics: Arc<Metrics>) -> Self {
        Self {
            base,
            api,
            metrics,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn base(&self) -> &BaseDefinition {
        &self.base
    }

    /// The ARN of the task definition for `image` (`None`: the base's) with `secrets`
    /// (sorted by name) added.
    pub(crate) async fn for_run(
        &self,
        image: Option<&str>,
        secrets: &[Secret],
    ) -> Result<String, ApiError> {
        let image = image.unwrap_or(&self.base.image);
        let family = derived_family(&self.base, image, secrets);
        let cell = {
            let mut cache = self.cache.lock();
            if cache.len() >= CACHE_SIZE && !cache.contains_key(&family) {
                cache.clear();
            }
            cache.entry(family.clone()).or_default().clone()
        };
        let arn = cell
            .get_or_try_init(|| self.find_or_register(&family, image, secrets))
            .await?;
        Ok(arn.clone())
    }

    async fn find_or_register(
        &self,
        family: &str,
        image: &str,
        secrets: &[Secret],
    ) -> Result<String, ApiError> {
        let found = self.api.describe_task_definition(family).await;
        self.count("DescribeTaskDefinition", &found);
        if let Some(view) = found? {
            // The family is named by a hash of what it holds; checked anyway, since anyone
            // with RegisterTaskDefinition can add a revision to it.
            if matches(&view, &self.base.container, image, secrets) {
                tracing::info!(task_definition = %view.arn, "reusing the task definition of the image");
                return Ok(view.arn);
            }
            tracing::warn!(task_definition = %view.arn, "the newest revision of the image's family differs: registering a new one");
        }
        let registered = self
            .api
            .register_task_definition(&self.base.arn, family, &self.base.container, image, secrets)
            .await;
        self.count("RegisterTaskDefinition", &registered);
        let view = registered?;
        tracing::info!(task_definition = %view.arn, %image, secrets = secrets.len(), "registered a task definition for the image");
        Ok(view.arn)
    }

    fn count(&self, operation: &'static str, result: &Result<impl Sized, ApiError>) {
        api::count_call(&self.metrics, operation, result);
    }
}

/// Whether a registered definition runs `image` with exactly `secrets` in the step container
/// (secrets the base already had count too: the copy keeps them).
fn matches(view: &TaskDefinitionView, container: &str, image: &str, secrets: &[Secret]) -> bool {
    view.container(container)
        .is_some_and(|c| c.image == image && secrets.iter().all(|s| c.secrets.contains(s)))
}
