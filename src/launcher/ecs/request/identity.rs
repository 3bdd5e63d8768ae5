//! The idempotency identity of a step's task: `startedBy` (how ListTasks finds it),
//! `clientToken` (one task per delivery) and the task tags.

use sha2::{Digest, Sha256};

use super::run_task::Tag;
use crate::envelope::StepRequest;

/// Task tag keys the controller sets (they win over tags from `ecs/run_task_kwargs`).
pub(crate) mod tag_keys {
    pub(crate) const RUN_ID: &str = "dagster/run-id";
    pub(crate) const STEP_KEY: &str = "dagster/step-key";
    pub(crate) const ATTEMPT: &str = "dagster/attempt";
    pub(crate) const JOB_NAME: &str = "dagster/job-name";
    pub(crate) const TASK_ID: &str = "dagster-taskiq/task-id";
    pub(crate) const CONTROLLER: &str = "dagster-taskiq/controller";
    pub(crate) const DELIVERY: &str = "dagster-taskiq/delivery";
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// `startedBy` of every task of a step attempt (≤ 36 characters): ListTasks finds them by it.
pub(crate) fn started_by(task_id: &str) -> String {
    format!("dtq-{}", &sha256_hex(task_id)[..32])
}

/// RunTask's `clientToken` (64 characters) for one delivery of a step attempt: a retried
/// call of the same delivery gets the same task back; a relaunch after a failed start (a
/// later delivery) gets a new one.
pub(crate) fn client_token(task_id: &str, delivery: u32) -> String {
    sha256_hex(&format!("{task_id}/{}", delivery.max(1)))
}

/// ECS tag values take letters, digits, spaces and `_ . : / = + - @`, up to 256 characters.
pub(crate) fn tag_value(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " _.:/=+-@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(256)
        .collect()
}

pub(super) fn task_tags(
    step: &StepRequest,
    controller_id: &str,
    delivery: u32,
    extra: &[Tag],
) -> Vec<Tag> {
    let ours = [
        (tag_keys::RUN_ID, step.run_id.clone()),
        (tag_keys::STEP_KEY, step.step_key.clone()),
        (tag_keys::ATTEMPT, step.attempt.to_string()),
        (
            tag_keys::JOB_NAME,
            step.job_name.clone().unwrap_or_default(),
        ),
        (tag_keys::TASK_ID, step.task_id.clone()),
        (tag_keys::CONTROLLER, controller_id.to_owned()),
        (tag_keys::DELIVERY, delivery.max(1).to_string()),
    ];
    let mut tags: Vec<Tag> = ours
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(key, value)| Tag {
            key: key.to_owned(),
            value: tag_value(&value),
        })
        .collect();
    let extra: Vec<Tag> = extra
        .iter()
        .filter(|t| !tags.iter().any(|o| o.key == t.key))
        .cloned()
        .collect();
    tags.extend(extra);
    tags
}
