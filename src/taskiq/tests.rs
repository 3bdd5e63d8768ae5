//! The taskiq layer against an in-memory object store.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use super::args::DEFAULT_MAX_PAYLOAD_BYTES;
use super::extended::EXTENDED_MESSAGE_ATTRIBUTE;
use super::result::{error_result, result_key, success_result, ERROR_MODULE, ERROR_TYPE};
use super::*;
use crate::envelope::{self, StepRequest, MAX_BODY_BYTES};
use crate::fakes::{step_body, FakeObjectStore};
use crate::launcher::EventLines;
use crate::outcome::Skip;
use crate::outcome::{DeadLetterReason, Finish, Outcome};
use crate::queue::ReceivedMessage;

fn message(body: &str, extended: bool) -> ReceivedMessage {
    let mut attributes = HashMap::new();
    if extended {
        attributes.insert(EXTENDED_MESSAGE_ATTRIBUTE.to_owned(), "True".to_owned());
    }
    ReceivedMessage {
        message_id: "m-1".into(),
        receipt_handle: "h-1".into(),
        body: body.to_owned(),
        receive_count: 1,
        attributes,
        sent_at_ms: None,
    }
}

/// Reads extended payloads from the bucket `payloads` only.
fn compat(store: &FakeObjectStore) -> TaskiqCompat {
    TaskiqCompat::new(Arc::new(store.clone()), Some("results".into()), "")
        .with_payloads(vec!["payloads".into()], DEFAULT_MAX_PAYLOAD_BYTES)
}

const TASK: &str = "0123456789abcdef0123456789abcdef";

const SUCCEEDED: Outcome = Outcome::Finished(Finish::Succeeded);
const ALREADY_FINISHED: Outcome = Outcome::Skipped(Skip::AlreadyFinished);

fn result_json(store: &FakeObjectStore, key: &str) -> serde_json::Value {
    serde_json::from_slice(&store.object("results", key).expect("result written")).unwrap()
}

#[test]
fn results_have_taskiqs_shape() {
    let labels = BTreeMap::from([("dagster_run_id".to_owned(), "r".to_owned())]);
    let ok: serde_json::Value =
        serde_json::from_slice(&success_result(&["{}".into()], 1.5, &labels)).unwrap();
    assert_eq!(
        ok,
        serde_json::json!({"is_err": false, "log": null, "return_value": ["{}"],
            "execution_time": 1.5, "labels": {"dagster_run_id": "r"}, "error": null})
    );
    let err: serde_json::Value =
        serde_json::from_slice(&error_result("boom", 0.0, &labels)).unwrap();
    assert_eq!(
        err["error"],
        serde_json::json!({"exc_type": ERROR_TYPE, "exc_message": ["boom"],
            "exc_module": ERROR_MODULE, "exc_cause": null, "exc_context": null,
            "exc_suppress_context": false})
    );
    assert_eq!(
        (err["is_err"].clone(), err["return_value"].clone()),
        (true.into(), serde_json::Value::Null)
    );
}

#[test]
fn result_keys_follow_the_base_path() {
    assert_eq!(result_key("", "t"), "t");
    assert_eq!(result_key("results", "t"), "results/t");
    assert_eq!(result_key("results/", "t"), "results/t");
}

#[tokio::test]
async fn an_extended_body_is_resolved_beyond_the_sqs_limit() {
    let store = FakeObjectStore::default();
    let mut body: serde_json::Value =
        serde_json::from_str(&step_body(TASK, "run-1", "op_a", 0)).unwrap();
    body["kwargs"]["executable_dict"] =
        serde_json::json!({"padding": "x".repeat(MAX_BODY_BYTES + 10)});
    store.insert("payloads", "t.json", body.to_string().into_bytes());
    let pointer = r#"{"s3_bucket": "payloads", "s3_key": "t.json"}"#;
    let step = compat(&store)
        .decode(&message(pointer, true))
        .await
        .expect("resolved and decoded");
    assert_eq!(step.step_key, "op_a");
    assert!(step.collect_events);
    // Without the attribute the pointer is just a bad body.
    let err = compat(&store).decode(&message(pointer, false)).await;
    assert!(matches!(err, Err(DecodeError::Poison { .. })));
}

#[tokio::test]
async fn missing_or_malformed_extended_payloads_are_poison_and_s3_outages_are_not() {
    let store = FakeObjectStore::default();
    let name = |r: Result<StepRequest, DecodeError>| match r {
        Err(DecodeError::Poison { poison, .. }) => poison.name().to_owned(),
        Err(DecodeError::Unavailable { .. }) => "unavailable".to_owned(),
        Ok(_) => "ok".to_owned(),
    };
    let c = compat(&store);
    let gone = message(r#"{"s3_bucket": "payloads", "s3_key": "gone"}"#, true);
    assert_eq!(name(c.decode(&gone).await), "invalid_extended_payload");
    assert_eq!(
        name(c.decode(&message("not a pointer", true)).await),
        "invalid_extended_payload"
    );
    store.insert(
        "payloads",
        "huge",
        vec![b' '; DEFAULT_MAX_PAYLOAD_BYTES + 1],
    );
    let huge = message(r#"{"s3_bucket": "payloads", "s3_key": "huge"}"#, true);
    assert_eq!(name(c.decode(&huge).await), "too_large");
    store.fail_next(3);
    assert_eq!(name(c.decode(&gone).await), "unavailable");
}

#[tokio::test]
async fn a_finished_step_returns_its_events_and_a_crash_an_error() {
    let store = FakeObjectStore::default();
    let c = compat(&store);
    let mut step = envelope::decode(&step_body(TASK, "run-1", "op_a", 0)).unwrap();
    step.print_serialized_events = true;
    let events = EventLines {
        lines: vec!["{\"__class__\": \"DagsterEvent\"}".into()],
        bytes: 10,
        dropped: 0,
    };
    c.keep_output(TASK, Some(events), Duration::from_millis(2500));
    c.write_result(&step, &SUCCEEDED).await.unwrap();
    let result = result_json(&store, TASK);
    assert_eq!(result["is_err"], false);
    assert_eq!(
        result["return_value"][0],
        "{\"__class__\": \"DagsterEvent\"}"
    );
    assert_eq!(result["execution_time"], 2.5);
    assert_eq!(result["labels"]["dagster_step_key"], "op_a");

    c.keep_output(TASK, Some(EventLines::default()), Duration::from_secs(1));
    c.write_result(
        &step,
        &Outcome::Verdict {
            cause: "process exited with code 3".into(),
            timed_out: false,
        },
    )
    .await
    .unwrap();
    let result = result_json(&store, TASK);
    assert_eq!(result["is_err"], true);
    let message = result["error"]["exc_message"][0].as_str().unwrap();
    assert!(message.contains("process exited with code 3"), "{message}");
}

#[tokio::test]
async fn nothing_is_written_without_a_bucket_or_for_a_released_message() {
    let store = FakeObjectStore::default();
    let step = envelope::decode(&step_body(TASK, "run-1", "op_a", 0)).unwrap();
    let off = TaskiqCompat::new(Arc::new(store.clone()), None, "");
    off.write_result(&step, &SUCCEEDED).await.unwrap();
    let on = compat(&store);
    let release = Outcome::shutdown();
    on.keep_output(TASK, Some(EventLines::default()), Duration::ZERO);
    on.write_result(&step, &release).await.unwrap();
    assert_eq!(store.puts(), 0);
    // The kept output survives the release for a later delivery.
    on.write_result(&step, &ALREADY_FINISHED).await.unwrap();
    assert_eq!(result_json(&store, TASK)["is_err"], false);
}

#[tokio::test]
async fn a_redelivered_finished_attempt_keeps_an_earlier_result() {
    let store = FakeObjectStore::default();
    let c = compat(&store);
    let step = envelope::decode(&step_body(TASK, "run-1", "op_a", 0)).unwrap();
    store.insert("results", TASK, b"earlier".to_vec());
    c.write_result(&step, &ALREADY_FINISHED).await.unwrap();
    assert_eq!(store.object("results", TASK).unwrap(), b"earlier");
    // No earlier result and no events: an error that says where the events are.
    let other = "fedcba9876543210fedcba9876543210";
    let step = envelope::decode(&step_body(other, "run-1", "op_b", 0)).unwrap();
    c.write_result(&step, &ALREADY_FINISHED).await.unwrap();
    assert_eq!(result_json(&store, other)["is_err"], true);
}

#[tokio::test(start_paused = true)]
async fn a_failing_put_keeps_the_output_and_asks_for_a_retry() {
    let store = FakeObjectStore::default();
    let c = compat(&store).with_retry_budget(Duration::from_secs(1));
    let step = envelope::decode(&step_body(TASK, "run-1", "op_a", 0)).unwrap();
    c.keep_output(TASK, Some(EventLines::default()), Duration::ZERO);
    store.fail_next(100);
    let err = c.write_result(&step, &SUCCEEDED).await;
    assert!(err.is_err());
    store.fail_next(0);
    c.write_result(&step, &ALREADY_FINISHED).await.unwrap();
    assert_eq!(result_json(&store, TASK)["is_err"], false);
}

#[tokio::test]
async fn dead_letters_and_poison_with_a_task_id_get_error_results() {
    let store = FakeObjectStore::default();
    let c = compat(&store);
    let step = envelope::decode(&step_body(TASK, "run-1", "op_a", 0)).unwrap();
    let dead = Outcome::dead_letter(DeadLetterReason::UnknownRun, "run run-1 does not exist");
    c.write_result(&step, &dead).await.unwrap();
    let message = result_json(&store, TASK)["error"]["exc_message"][0].clone();
    assert!(message.as_str().unwrap().contains("unknown_run"));

    let bad = r#"{"task_id": "abc", "task_name": "other", "kwargs": {}}"#;
    let Err(DecodeError::Poison { poison, identity }) = c.decode(&message_of(bad)).await else {
        panic!("poison expected");
    };
    assert_eq!(identity.task_id.as_deref(), Some("abc"));
    c.write_unrun_result(identity.task_id.as_deref(), &poison.to_string())
        .await;
    assert_eq!(result_json(&store, "abc")["is_err"], true);
}

#[tokio::test]
async fn an_unreadable_extended_payload_still_names_its_task() {
    let store = FakeObjectStore::default();
    let c = compat(&store);
    // taskiq-aio-sqs keeps the body of task t at t.json: the key names the task.
    let gone = message(
        &format!(r#"{{"s3_bucket": "payloads", "s3_key": "{TASK}.json"}}"#),
        true,
    );
    let Err(DecodeError::Poison { poison, identity }) = c.decode(&gone).await else {
        panic!("poison expected");
    };
    assert_eq!(poison.name(), "invalid_extended_payload");
    assert_eq!(identity.task_id.as_deref(), Some(TASK));
    assert!(identity.attempt.is_none(), "the run is in the missing body");
    store.fail_next(1);
    let Err(DecodeError::Unavailable { task_id, .. }) = c.decode(&gone).await else {
        panic!("unavailable expected");
    };
    assert_eq!(task_id.as_deref(), Some(TASK));
    // A key that is not <task id>.json names nothing.
    let other = message(r#"{"s3_bucket": "payloads", "s3_key": "a b.json"}"#, true);
    let Err(DecodeError::Poison { identity, .. }) = c.decode(&other).await else {
        panic!("poison expected");
    };
    assert_eq!(identity.task_id, None);
    // A resolved body that fails validation names its attempt like any body.
    let mut body: serde_json::Value =
        serde_json::from_str(&step_body(TASK, "run-1", "op_a", 1)).unwrap();
    body["labels"]["dagster_timeout"] = "soon".into();
    store.insert("payloads", "bad.json", body.to_string().into_bytes());
    let bad = message(r#"{"s3_bucket": "payloads", "s3_key": "bad.json"}"#, true);
    let Err(DecodeError::Poison { poison, identity }) = c.decode(&bad).await else {
        panic!("poison expected");
    };
    assert_eq!(poison.name(), "invalid_label");
    let attempt = identity.attempt.expect("an attempt");
    assert_eq!((attempt.run_id.as_str(), attempt.attempt), ("run-1", 1));
}

fn message_of(body: &str) -> ReceivedMessage {
    message(body, false)
}

#[tokio::test]
async fn extended_payloads_are_read_only_from_the_allowed_buckets() {
    let store = FakeObjectStore::default();
    let body = step_body(TASK, "run-1", "op_a", 0).into_bytes();
    let key = format!("{TASK}.json");
    store.insert("payloads", &key, body.clone());
    store.insert("elsewhere", &key, body);
    let pointer = |bucket: &str| {
        message(
            &format!(r#"{{"s3_bucket": "{bucket}", "s3_key": "{TASK}.json"}}"#),
            true,
        )
    };
    let refused = |r: Result<StepRequest, DecodeError>| match r {
        Err(DecodeError::Poison { poison, identity }) => {
            assert_eq!(poison.name(), "extended_payload_refused");
            // The key still names the task: its error result says why.
            assert_eq!(identity.task_id.as_deref(), Some(TASK));
            poison.to_string()
        }
        other => panic!("expected a refusal, got {other:?}"),
    };
    let c = compat(&store);
    let why = refused(c.decode(&pointer("elsewhere")).await);
    assert!(
        why.contains(r#"bucket "elsewhere" is not in --payload-bucket"#),
        "{why}"
    );
    assert_eq!(store.gets(), 0, "a foreign object is never fetched");
    c.decode(&pointer("payloads"))
        .await
        .expect("an allowed bucket");
    assert_eq!(store.gets(), 1);

    // No --payload-bucket: every extended payload is refused, unread.
    let none = TaskiqCompat::new(Arc::new(store.clone()), Some("results".into()), "");
    let why = refused(none.decode(&pointer("payloads")).await);
    assert!(why.contains("no --payload-bucket"), "{why}");
    assert_eq!(store.gets(), 1);
    // A bucket name that would flood the error is quoted in part.
    let long = "b".repeat(100_000);
    let why = refused(c.decode(&pointer(&long)).await);
    assert!(why.len() < 300, "{} bytes", why.len());
}

#[tokio::test]
async fn an_extended_payload_over_the_limit_is_refused_naming_the_limit() {
    let store = FakeObjectStore::default();
    let c = TaskiqCompat::new(Arc::new(store.clone()), Some("results".into()), "")
        .with_payloads(vec!["payloads".into()], 256 * 1024);
    let mut body: serde_json::Value =
        serde_json::from_str(&step_body(TASK, "run-1", "op_a", 0)).unwrap();
    body["kwargs"]["executable_dict"] = serde_json::json!({"pad": "x".repeat(256 * 1024)});
    store.insert("payloads", "big.json", body.to_string().into_bytes());
    let big = message(r#"{"s3_bucket": "payloads", "s3_key": "big.json"}"#, true);
    let Err(DecodeError::Poison { poison, .. }) = c.decode(&big).await else {
        panic!("poison expected");
    };
    assert_eq!(poison.name(), "too_large");
    let why = poison.to_string();
    assert!(
        why.contains("over the --max-payload-bytes limit of 262144 bytes"),
        "{why}"
    );
    // Keys longer than S3 allows are not even asked for.
    let gets = store.gets();
    let long_key = message(
        &format!(
            r#"{{"s3_bucket": "payloads", "s3_key": "{}"}}"#,
            "k".repeat(2000)
        ),
        true,
    );
    let Err(DecodeError::Poison { poison, .. }) = c.decode(&long_key).await else {
        panic!("poison expected");
    };
    assert_eq!(poison.name(), "invalid_extended_payload");
    assert_eq!(store.gets(), gets);
}

#[tokio::test]
async fn a_resolved_body_that_is_poison_is_quoted_only_in_part() {
    let store = FakeObjectStore::default();
    let c = compat(&store);
    let secret = "s3cr3t".repeat(200_000);
    let mut body: serde_json::Value =
        serde_json::from_str(&step_body(TASK, "run-1", "op_a", 0)).unwrap();
    body["task_name"] = secret.clone().into();
    store.insert("payloads", "p.json", body.to_string().into_bytes());
    store.insert("payloads", "q.json", format!("[\"{secret}\"").into_bytes());
    for key in ["p.json", "q.json"] {
        let m = message(
            &format!(r#"{{"s3_bucket": "payloads", "s3_key": "{key}"}}"#),
            true,
        );
        let Err(DecodeError::Poison { poison, .. }) = c.decode(&m).await else {
            panic!("poison expected");
        };
        let why = poison.to_string();
        assert!(
            why.len() < 400,
            "{key}: {} bytes: {}",
            why.len(),
            &why[..400]
        );
    }
    // Nor is a pointer that is not one.
    let m = message(&format!(r#"{{"s3_bucket": ["{secret}"]}}"#), true);
    let Err(DecodeError::Poison { poison, .. }) = c.decode(&m).await else {
        panic!("poison expected");
    };
    assert!(poison.to_string().len() < 400);
}
