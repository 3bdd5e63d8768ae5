//! What a run stored about its ECS tasks, checked: the image of its code location and its
//! executor config's `env_vars` and `secrets` (read from the run by the bridge, never from
//! the message). The same rules as the op tags' environment apply to every variable, since
//! whoever writes a run's config would otherwise pick what the loader or interpreter runs.

use super::op_tags::{refused, InvalidTag, TagProblem, RESERVED_ENV};
use super::policy::{check_image_name, refused_variable, OverridePolicy};
use super::run_task::{KeyValue, Secret};
use crate::dagster::StoredEcs;

/// Entries of `env_vars`, and of `secrets`, a run may have (ECS allows far more; more than
/// this in one step is a mistake, and every variable costs overrides characters).
pub(crate) const MAX_RUN_VARIABLES: usize = 100;
/// Characters of one `valueFrom` ARN (SSM parameter ARNs reach about 1600).
const MAX_VALUE_FROM: usize = 2048;

/// A run's checked ECS settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RunEcs {
    /// The run's image, when it is not the task definition's own.
    pub image: Option<String>,
    pub environment: Vec<KeyValue>,
    /// Sorted by name: equal sets make equal task definitions.
    pub secrets: Vec<Secret>,
}

impl RunEcs {
    /// Checks the stored settings: the image against `--ecs-allow-image-prefix`, every
    /// variable against the reserved and refused names.
    pub(crate) fn from_stored(
        stored: &StoredEcs,
        policy: &OverridePolicy,
        base_image: &str,
    ) -> Result<Self, InvalidTag> {
        let image = match stored.image.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(image) => {
                check_image_name(image)
                    .map_err(|why| config(IMAGE, format!("{image:?}: {why}")))?;
                policy.check_image(image, base_image)?;
                (image != base_image).then(|| image.to_owned())
            }
        };
        if stored.env_vars.len() > MAX_RUN_VARIABLES || stored.secrets.len() > MAX_RUN_VARIABLES {
            return Err(config(
                ENV_VARS,
                format!("at most {MAX_RUN_VARIABLES} env_vars and {MAX_RUN_VARIABLES} secrets"),
            ));
        }
        let mut environment = Vec::with_capacity(stored.env_vars.len());
        for entry in &stored.env_vars {
            let Some((name, value)) = entry.split_once('=') else {
                // dagster-aws reads a bare KEY from the launching process; here that would be
                // the controller, whose environment steps must never see.
                return Err(config(
                    ENV_VARS,
                    format!(
                        "{entry:?} has no value: the controller does not pass its own \
                         environment to steps; write KEY=VALUE, set it in the task definition, \
                         or name a secret"
                    ),
                ));
            };
            check_name(ENV_VARS, name)?;
            environment.push(KeyValue {
                name: name.to_owned(),
                value: value.to_owned(),
            });
        }
        let mut secrets = Vec::with_capacity(stored.secrets.len());
        for secret in &stored.secrets {
            check_name(SECRETS, &secret.name)?;
            check_value_from(&secret.name, &secret.value_from)?;
            if environment.iter().any(|kv| kv.name == secret.name) {
                return Err(config(
                    SECRETS,
                    format!("{} is also in env_vars: name it once", secret.name),
                ));
            }
            secrets.push(Secret {
                name: secret.name.clone(),
                value_from: secret.value_from.clone(),
            });
        }
        secrets.sort();
        if let Some(pair) = secrets.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(config(SECRETS, format!("{} is named twice", pair[0].name)));
        }
        Ok(RunEcs {
            image,
            environment,
            secrets,
        })
    }

    /// Whether the step needs a task definition other than the controller's.
    pub(crate) fn needs_task_definition(&self) -> bool {
        self.image.is_some() || !self.secrets.is_empty()
    }
}

/// What an error names: the run's image, or a field of its executor config.
const IMAGE: &str = "container_image";
const ENV_VARS: &str = "execution config env_vars";
const SECRETS: &str = "execution config secrets";

fn config(tag: &'static str, message: impl Into<String>) -> InvalidTag {
    InvalidTag {
        tag,
        message: message.into(),
        kind: TagProblem::Config,
    }
}

fn check_name(tag: &'static str, name: &str) -> Result<(), InvalidTag> {
    if name.is_empty() || name.contains(['=', '\0']) || name.trim() != name {
        return Err(config(
            tag,
            format!("{name:?} is not an environment variable name"),
        ));
    }
    if RESERVED_ENV.contains(&name) {
        return Err(config(
            tag,
            format!("environment variable {name} is set by the controller"),
        ));
    }
    if let Some(why) = refused_variable(name) {
        return Err(refused(
            tag,
            format!("environment variable {name} may not be set by a run: it {why}"),
        ));
    }
    Ok(())
}

/// A Secrets Manager secret or SSM parameter ARN (optionally with a JSON key, version
/// stage and version id after the secret's ARN, as ECS takes them).
fn check_value_from(name: &str, value_from: &str) -> Result<(), InvalidTag> {
    let service = value_from.split(':').nth(2).unwrap_or_default();
    if !value_from.starts_with("arn:")
        || !["secretsmanager", "ssm"].contains(&service)
        || value_from.len() > MAX_VALUE_FROM
        || value_from.chars().any(char::is_whitespace)
    {
        return Err(config(
            SECRETS,
            format!(
                "{name}: valueFrom {value_from:?} is not a Secrets Manager secret or SSM \
                 parameter ARN (arn:aws:secretsmanager:... or arn:aws:ssm:...)"
            ),
        ));
    }
    Ok(())
}
