//! What a step's `ecs/*` op tags may change in its task, decided by the operator: which roles
//! and task definitions a tag may pick and how large a task may be (flags, built once), and
//! what no tag may touch at all (the network, ECS Exec, loader and interpreter variables).
//!
//! The op tags arrive in the message (the `dagster_tags` label), so whoever can send to the
//! queue chooses them; a tag that asks for more than this allows is refused with a verdict,
//! never dropped (docs/security.md, "ECS overrides").

use std::collections::BTreeSet;

use super::op_tags::{refused, InvalidTag, StepSettings};
use super::run_task::{ContainerSettings, KeyValue};

/// Fargate's largest task: 16 vCPU, 120 GiB, 200 GiB of ephemeral storage. The default caps,
/// so that only an operator's lower cap refuses a size Fargate would run.
pub(crate) const FARGATE_MAX_CPU: u32 = 16 * 1024;
pub(crate) const FARGATE_MAX_MEMORY_MIB: u32 = 120 * 1024;
pub(crate) const FARGATE_MAX_EPHEMERAL_GIB: u32 = 200;

/// The operator's limits on op tag overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OverridePolicy {
    /// ARNs a tag may give as `taskRoleArn` or `executionRoleArn` (`--ecs-allow-role`).
    pub roles: BTreeSet<String>,
    /// Task definition families a tag may pick: `--ecs-allow-task-definition` and the
    /// family of `--ecs-task-definition`.
    pub task_definition_families: BTreeSet<String>,
    /// CPU units, of the task and of any one container (`--ecs-max-cpu`).
    pub max_cpu: u32,
    /// MiB, of the task and of any one container's memory or reservation (`--ecs-max-memory`).
    pub max_memory_mib: u32,
    /// GiB of ephemeral storage (`--ecs-max-ephemeral-storage`).
    pub max_ephemeral_gib: u32,
    /// Images a run's steps may run in besides the task definition's own
    /// (`--ecs-allow-image-prefix`, see [`image_allowed`]).
    pub image_prefixes: Vec<String>,
}

impl OverridePolicy {
    /// The policy that allows no role and no task definition but the default one, with
    /// Fargate's maxima as caps.
    pub(crate) fn new(default_task_definition: &str) -> Self {
        OverridePolicy {
            roles: BTreeSet::new(),
            task_definition_families: BTreeSet::from([task_definition_family(
                default_task_definition,
            )
            .to_owned()]),
            max_cpu: FARGATE_MAX_CPU,
            max_memory_mib: FARGATE_MAX_MEMORY_MIB,
            max_ephemeral_gib: FARGATE_MAX_EPHEMERAL_GIB,
            image_prefixes: Vec::new(),
        }
    }

    /// Refuses a run's image that is neither the task definition's (`base_image`) nor
    /// allowed by `--ecs-allow-image-prefix`: the image is the code that runs.
    pub(crate) fn check_image(&self, image: &str, base_image: &str) -> Result<(), InvalidTag> {
        if image == base_image || self.image_prefixes.iter().any(|p| image_allowed(p, image)) {
            return Ok(());
        }
        Err(refused(
            "container_image",
            format!(
                "the run's code location image {image:?} is not the task definition's \
                 ({base_image:?}) and matches no --ecs-allow-image-prefix"
            ),
        ))
    }

    /// Refuses settings that ask for more than the operator allows, naming the tag and why.
    pub(crate) fn check(&self, settings: &StepSettings) -> Result<(), InvalidTag> {
        let t = &settings.task;
        for (field, role) in [
            ("taskRoleArn", &t.task_role_arn),
            ("executionRoleArn", &t.execution_role_arn),
        ] {
            if let Some(role) = role {
                if !self.roles.contains(role) {
                    return Err(refused(
                        "ecs/task_overrides",
                        format!("{field} {role} is not in --ecs-allow-role"),
                    ));
                }
            }
        }
        if let Some(cpu) = &t.cpu {
            self.at_most(
                "ecs/cpu",
                "cpu",
                cpu,
                self.max_cpu,
                "CPU units",
                "--ecs-max-cpu",
            )?;
        }
        if let Some(memory) = &t.memory {
            self.at_most(
                "ecs/memory",
                "memory",
                memory,
                self.max_memory_mib,
                "MiB",
                "--ecs-max-memory",
            )?;
        }
        if let Some(storage) = t.ephemeral_storage {
            if i64::from(storage.size_in_gib) > i64::from(self.max_ephemeral_gib) {
                return Err(refused(
                    "ecs/ephemeral_storage",
                    format!(
                        "{} GiB is over --ecs-max-ephemeral-storage {} GiB",
                        storage.size_in_gib, self.max_ephemeral_gib
                    ),
                ));
            }
        }
        for sidecar in &t.container_overrides {
            self.check_container("ecs/task_overrides", &sidecar.settings)?;
            check_environment("ecs/task_overrides", &sidecar.environment)?;
        }
        self.check_container("ecs/container_overrides", &settings.container.settings)?;
        check_environment("ecs/container_overrides", &settings.container.environment)?;

        let k = &settings.kwargs;
        if let Some(td) = &k.task_definition {
            let family = task_definition_family(td);
            if !self.task_definition_families.contains(family) {
                return Err(refused(
                    "ecs/run_task_kwargs",
                    format!(
                        "taskDefinition {td:?} (family {family:?}) is not in \
                         --ecs-allow-task-definition: the task definition chooses the image, \
                         the code that runs"
                    ),
                ));
            }
        }
        if k.network_configuration.is_some() {
            return Err(refused(
                "ecs/run_task_kwargs",
                "networkConfiguration is the controller's (--ecs-subnets, \
                 --ecs-security-groups, --ecs-assign-public-ip); a tag may not set it",
            ));
        }
        if k.enable_execute_command == Some(true) {
            return Err(refused(
                "ecs/run_task_kwargs",
                "enableExecuteCommand may not be turned on by a tag: ECS Exec opens a shell \
                 into the task",
            ));
        }
        Ok(())
    }

    fn at_most(
        &self,
        tag: &'static str,
        field: &str,
        value: &str,
        max: u32,
        unit: &str,
        flag: &str,
    ) -> Result<(), InvalidTag> {
        // Validity (a positive whole number) was checked before the policy.
        match value.trim().parse::<u64>() {
            Ok(n) if n <= u64::from(max) => Ok(()),
            _ => Err(refused(
                tag,
                format!("task {field} {value} {unit} is over {flag} {max}"),
            )),
        }
    }

    fn check_container(&self, tag: &'static str, s: &ContainerSettings) -> Result<(), InvalidTag> {
        for (field, value, max, flag) in [
            ("cpu", s.cpu, self.max_cpu, "--ecs-max-cpu"),
            ("memory", s.memory, self.max_memory_mib, "--ecs-max-memory"),
            (
                "memoryReservation",
                s.memory_reservation,
                self.max_memory_mib,
                "--ecs-max-memory",
            ),
        ] {
            if let Some(v) = value {
                if i64::from(v) > i64::from(max) {
                    return Err(refused(
                        tag,
                        format!("container {field} {v} is over {flag} {max}"),
                    ));
                }
            }
        }
        if !s.environment_files.is_empty() {
            // An environment file could set anything the variables below may not.
            return Err(refused(
                tag,
                "environmentFiles may not be set by a tag: the variables in a file escape the \
                 checks of `environment`",
            ));
        }
        Ok(())
    }
}

/// Whether `--ecs-allow-image-prefix` entry `prefix` allows `image`: the same image, the
/// same repository with a tag or digest (`prefix:` or `prefix@`), or anything under a
/// namespace given with a trailing `/`. A plain string prefix would let `repo` allow
/// `repo-evil`.
pub(crate) fn image_allowed(prefix: &str, image: &str) -> bool {
    match image.strip_prefix(prefix) {
        None => false,
        Some("") => true,
        Some(rest) => prefix.ends_with('/') || rest.starts_with(':') || rest.starts_with('@'),
    }
}

/// Checks an image reference as ECS takes it: 1 to 255 characters of letters, digits and
/// `-_:./@#` (ECS's own rule, plus `@` of a digest).
pub(crate) fn check_image_name(image: &str) -> Result<(), String> {
    if image.is_empty() || image.len() > 255 {
        return Err("an image is 1 to 255 characters".into());
    }
    match image
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_:./@#".contains(*c)))
    {
        Some(c) => Err(format!("{c:?} is not allowed in an image name")),
        None => Ok(()),
    }
}

/// The family of a task definition given as `family`, `family:revision` or ARN.
pub(crate) fn task_definition_family(task_definition: &str) -> &str {
    let name = match task_definition.split_once(":task-definition/") {
        Some((_, tail)) => tail,
        None => task_definition,
    };
    name.split(':').next().unwrap_or(name)
}

/// Python variables that change no code path worth guarding; every other `PYTHON*` variable
/// is refused (PYTHONPATH, PYTHONHOME, PYTHONUSERBASE, PYTHONSTARTUP, PYTHONINSPECT,
/// PYTHONWARNINGS and PYTHONBREAKPOINT import modules, and new ones keep appearing).
const HARMLESS_PYTHON: [&str; 6] = [
    "PYTHONUNBUFFERED",
    "PYTHONHASHSEED",
    "PYTHONFAULTHANDLER",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONIOENCODING",
    "PYTHONUTF8",
];

/// Variables a tag may never set, by exact name, and why.
const REFUSED_NAMES: &[(&str, &str)] = &[
    ("PATH", "chooses the executable of the step's command"),
    ("DAGSTER_HOME", "chooses the Dagster instance"),
    ("GCONV_PATH", "makes the C library load code"),
    ("BASH_ENV", "makes a shell run code"),
    ("ENV", "makes a shell run code"),
    ("SHELLOPTS", "makes a shell run code"),
    ("BASHOPTS", "makes a shell run code"),
    ("PS4", "makes a shell run code"),
    ("PERL5OPT", "makes an interpreter load code"),
    ("PERL5LIB", "makes an interpreter load code"),
    ("PERLLIB", "makes an interpreter load code"),
    ("RUBYOPT", "makes an interpreter load code"),
    ("RUBYLIB", "makes an interpreter load code"),
    ("NODE_OPTIONS", "makes an interpreter load code"),
    ("NODE_PATH", "makes an interpreter load code"),
    ("JAVA_TOOL_OPTIONS", "makes an interpreter load code"),
    ("_JAVA_OPTIONS", "makes an interpreter load code"),
    ("JDK_JAVA_OPTIONS", "makes an interpreter load code"),
    ("OPENSSL_CONF", "makes OpenSSL load code"),
    ("OPENSSL_ENGINES", "makes OpenSSL load code"),
    ("OPENSSL_MODULES", "makes OpenSSL load code"),
    ("AWS_CONFIG_FILE", AWS_IDENTITY),
    ("AWS_SHARED_CREDENTIALS_FILE", AWS_IDENTITY),
    ("AWS_PROFILE", AWS_IDENTITY),
    ("AWS_DEFAULT_PROFILE", AWS_IDENTITY),
    ("AWS_ROLE_ARN", AWS_IDENTITY),
    ("AWS_WEB_IDENTITY_TOKEN_FILE", AWS_IDENTITY),
    ("AWS_ACCESS_KEY_ID", AWS_IDENTITY),
    ("AWS_SECRET_ACCESS_KEY", AWS_IDENTITY),
    ("AWS_SESSION_TOKEN", AWS_IDENTITY),
];

/// Variables a tag may never set, by prefix, and why.
const REFUSED_PREFIXES: &[(&str, &str)] = &[
    ("LD_", "makes the dynamic loader load code"),
    ("BASH_FUNC_", "makes a shell run code"),
    ("DAGSTER_TASKIQ_", "belongs to the controller"),
    ("AWS_CONTAINER_", AWS_IDENTITY),
    ("AWS_EC2_METADATA_", AWS_IDENTITY),
];

const AWS_IDENTITY: &str =
    "chooses the AWS identity of the step (credentials or where they come from)";

/// Why a tag may not set the variable `name`, if it may not. Names are compared ignoring
/// case: stricter than the loaders, which read them exactly.
pub(crate) fn refused_variable(name: &str) -> Option<&'static str> {
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("PYTHON") && !HARMLESS_PYTHON.contains(&upper.as_str()) {
        return Some("changes what the Python interpreter loads or runs");
    }
    REFUSED_NAMES
        .iter()
        .find(|(refused, _)| upper == *refused)
        .or_else(|| {
            REFUSED_PREFIXES
                .iter()
                .find(|(prefix, _)| upper.starts_with(prefix))
        })
        .map(|(_, why)| *why)
}

fn check_environment(tag: &'static str, environment: &[KeyValue]) -> Result<(), InvalidTag> {
    for var in environment {
        if let Some(why) = refused_variable(&var.name) {
            return Err(refused(
                tag,
                format!(
                    "environment variable {} may not be set by a tag: it {why}",
                    var.name
                ),
            ));
        }
    }
    Ok(())
}
