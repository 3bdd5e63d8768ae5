//! The shared wire-contract vectors (tests/vectors/), also checked by the Python tests.

use std::path::PathBuf;

use dagster_taskiq_controller::envelope::{decode, MAX_BODY_BYTES};
use serde_json::Value;

fn vectors(kind: &str) -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(kind);
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, serde_json::from_str(&text).unwrap())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn valid_vectors_decode_to_their_expectations() {
    let valid = vectors("valid");
    assert!(valid.len() >= 3, "expected at least 3 valid vectors");
    for (name, vector) in valid {
        let body = vector["body"].as_str().unwrap();
        let expect = &vector["expect"];
        let step = decode(body).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(step.task_id, expect["task_id"], "{name}");
        assert_eq!(step.run_id, expect["run_id"], "{name}");
        assert_eq!(step.step_key, expect["step_key"], "{name}");
        assert_eq!(u64::from(step.attempt), expect["attempt"], "{name}");
        assert_eq!(
            step.job_name.as_deref(),
            expect["job_name"].as_str(),
            "{name}"
        );
        assert_eq!(
            step.launcher.map(|l| serde_json::to_value(l).unwrap()),
            expect.get("launcher").filter(|v| !v.is_null()).cloned(),
            "{name}"
        );
        assert_eq!(
            i64::from(step.priority),
            expect.get("priority").and_then(Value::as_i64).unwrap_or(0),
            "{name}"
        );
        assert_eq!(
            step.timeout.map(|t| t.as_secs_f64()),
            expect.get("timeout_seconds").and_then(Value::as_f64),
            "{name}"
        );
        if let Some(tags) = expect.get("tags") {
            assert_eq!(serde_json::to_value(&step.tags).unwrap(), *tags, "{name}");
        }
        // The packed args reach the step byte for byte.
        let original: Value = serde_json::from_str(body).unwrap();
        let passed: Value = serde_json::from_str(step.step_args_json.get()).unwrap();
        assert_eq!(
            passed, original["kwargs"]["execute_step_args_packed"],
            "{name}"
        );
    }
}

#[test]
fn invalid_vectors_are_poison_with_the_named_reason() {
    let invalid = vectors("invalid");
    assert!(invalid.len() >= 10, "expected at least 10 invalid vectors");
    for (name, vector) in invalid {
        let body = vector["body"].as_str().unwrap();
        match decode(body) {
            Ok(step) => panic!("{name}: decoded as {step:?}"),
            Err(poison) => assert_eq!(poison.name(), vector["error"], "{name}: {poison}"),
        }
    }
}

#[test]
fn a_body_over_one_mebibyte_is_too_large() {
    let body = format!("{{\"pad\": \"{}\"}}", "x".repeat(MAX_BODY_BYTES));
    assert_eq!(decode(&body).unwrap_err().name(), "too_large");
}
