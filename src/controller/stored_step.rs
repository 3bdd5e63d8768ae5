//! A message's launch settings are its run's: the op tags a step message carries (and the
//! launcher, priority, timeout and job name derived from them) must be the ones the run
//! stored in Dagster for that step. Whoever can send to the queue could otherwise choose how
//! and where a step runs (an ECS role, a task definition, a timeout) for a run they do not
//! own; with this check only the run's code does (docs/security.md).

use std::collections::BTreeSet;

use crate::dagster::StoredStep;
use crate::envelope::{labels, launch_settings_of, StepRequest};

/// Why the message's launch settings are not the stored step's, if they are not. A label
/// the message leaves out is no claim (dagster-taskiq's messages carry none): the step then
/// launches with the stored settings all the same.
pub(super) fn mismatch(step: &StepRequest, stored: &StoredStep) -> Option<String> {
    if !stored.found {
        return Some(format!(
            "run {} has no step {:?} in its execution plan",
            step.run_id, step.step_key
        ));
    }
    let carries = |label: &str| step.labels.contains_key(label);
    if carries(labels::TAGS) && step.tags != stored.tags {
        let keys: BTreeSet<&String> = step.tags.keys().chain(stored.tags.keys()).collect();
        let differing: Vec<&str> = keys
            .into_iter()
            .filter(|k| step.tags.get(*k) != stored.tags.get(*k))
            .map(String::as_str)
            .take(8)
            .collect();
        return Some(format!(
            "the message's op tags are not the step's in run {}: {} differ",
            step.run_id,
            differing.join(", ")
        ));
    }
    let (launcher, priority, timeout) = launch_settings_of(&stored.tags);
    let differing: Vec<&str> = [
        (labels::LAUNCHER, step.launcher != launcher),
        (labels::PRIORITY, step.priority != priority),
        (labels::TIMEOUT, step.timeout_label() != timeout),
        (
            labels::JOB_NAME,
            step.job_name.as_deref() != Some(stored.job_name.as_str()),
        ),
    ]
    .into_iter()
    .filter(|(label, differs)| carries(label) && *differs)
    .map(|(label, _)| label)
    .collect();
    (!differing.is_empty()).then(|| {
        format!(
            "the message's labels {} do not follow from the step's op tags in run {}",
            differing.join(", "),
            step.run_id
        )
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::envelope::decode;

    fn message(labels: serde_json::Value) -> StepRequest {
        let body = json!({
            "task_id": "0123456789abcdef0123456789abcdef",
            "task_name": "execute_plan",
            "labels": labels,
            "labels_types": {},
            "args": [],
            "kwargs": {
                "execute_step_args_packed": {
                    "__class__": "ExecuteStepArgs",
                    "pipeline_run_id": "run-1",
                    "step_keys_to_execute": ["load[a]"],
                    "instance_ref": null,
                },
                "executable_dict": {},
            },
        });
        decode(&body.to_string()).expect("a valid message")
    }

    fn stored(tags: &[(&str, &str)]) -> StoredStep {
        StoredStep {
            found: true,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            job_name: "nightly".into(),
            location: None,
            ecs: Default::default(),
        }
    }

    const TAGS: [(&str, &str); 3] = [
        ("dagster-taskiq/launcher", "ecs"),
        ("dagster/priority", " 5"),
        ("ecs/task_overrides", r#"{"cpu": "1024"}"#),
    ];

    fn labels_for(tags: &[(&str, &str)]) -> serde_json::Value {
        let tags: BTreeMap<&str, &str> = tags.iter().copied().collect();
        json!({
            "dagster_launcher": "ecs",
            "dagster_priority": "5",
            "dagster_job_name": "nightly",
            "dagster_tags": serde_json::to_string(&tags).unwrap(),
        })
    }

    #[test]
    fn the_executors_labels_for_the_stored_tags_match() {
        assert_eq!(mismatch(&message(labels_for(&TAGS)), &stored(&TAGS)), None);
        // A step without tags, and a message without labels (another publisher).
        assert_eq!(mismatch(&message(json!({})), &stored(&[])), None);
    }

    #[test]
    fn a_tag_the_run_did_not_store_is_refused_and_named() {
        let mut forged = TAGS.to_vec();
        forged.push(("ecs/run_task_kwargs", r#"{"taskDefinition": "admin"}"#));
        let why = mismatch(&message(labels_for(&forged)), &stored(&TAGS)).unwrap();
        assert!(why.contains("ecs/run_task_kwargs differ"), "{why}");
        let mut changed = TAGS.to_vec();
        changed[2].1 = r#"{"taskRoleArn": "arn:aws:iam::1:role/admin"}"#;
        let why = mismatch(&message(labels_for(&changed)), &stored(&TAGS)).unwrap();
        assert!(why.contains("ecs/task_overrides differ"), "{why}");
    }

    #[test]
    fn a_label_that_does_not_follow_from_the_tags_is_refused() {
        for (label, value) in [
            ("dagster_launcher", "process"),
            ("dagster_priority", "100"),
            ("dagster_timeout", "1"),
            ("dagster_job_name", "other_job"),
        ] {
            let mut labels = labels_for(&TAGS);
            labels[label] = value.into();
            let why = mismatch(&message(labels), &stored(&TAGS)).unwrap();
            assert!(why.contains(label), "{label}: {why}");
        }
    }

    #[test]
    fn a_message_without_labels_claims_nothing_and_launches_with_the_stored_settings() {
        let bare = message(json!({}));
        assert_eq!(mismatch(&bare, &stored(&TAGS)), None);
        let default_timeout = Some(std::time::Duration::from_secs(600));
        let launched = bare.with_op_tags(&stored(&TAGS).tags, default_timeout);
        assert_eq!(launched.launcher, Some(crate::envelope::LauncherKind::Ecs));
        assert_eq!(launched.priority, 5);
        assert_eq!(launched.timeout, default_timeout);
        assert_eq!(launched.tags, stored(&TAGS).tags);
        // A launch label without the tags it follows from is still a claim, and checked.
        let why = mismatch(
            &message(json!({"dagster_launcher": "process"})),
            &stored(&TAGS),
        );
        assert!(why.unwrap().contains("dagster_launcher"));
    }

    #[test]
    fn a_step_the_run_does_not_have_is_refused() {
        let missing = StoredStep {
            found: false,
            ..stored(&[])
        };
        let why = mismatch(&message(json!({})), &missing).unwrap();
        assert!(why.contains("has no step \"load[a]\""), "{why}");
    }
}
