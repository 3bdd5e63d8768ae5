//! taskiq result objects: the JSON the taskiq-aio-sqs `S3Backend` reads, and where it goes.

use std::collections::BTreeMap;

use serde::Serialize;

/// The exception type of error results. taskiq rebuilds it from `sys.modules` when that module
/// is imported in the reading process, else as a dynamic `Exception` subclass of that name.
pub(crate) const ERROR_MODULE: &str = "dagster_taskiq_controller.contract";
pub(crate) const ERROR_TYPE: &str = "StepExecutionError";

/// taskiq's `TaskiqResult`, as `S3Backend.set_result` writes it
/// (`result.model_dump(mode="json")`), field for field.
#[derive(Debug, Serialize)]
struct TaskiqResult<'a> {
    is_err: bool,
    log: Option<&'a str>,
    return_value: Option<&'a [String]>,
    execution_time: f64,
    labels: &'a BTreeMap<String, String>,
    error: Option<ExceptionRepr<'a>>,
}

/// taskiq's `ExceptionRepr` (`taskiq.serialization`), which `exception_to_python` turns back
/// into an exception that `TaskiqResult.raise_for_error` raises.
#[derive(Debug, Serialize)]
struct ExceptionRepr<'a> {
    exc_type: &'a str,
    exc_message: [&'a str; 1],
    exc_module: &'a str,
    exc_cause: Option<()>,
    exc_context: Option<()>,
    exc_suppress_context: bool,
}

/// The result object of an attempt that reached an outcome: its event lines.
pub(crate) fn success_result(
    events: &[String],
    execution_time: f64,
    labels: &BTreeMap<String, String>,
) -> Vec<u8> {
    encode(&TaskiqResult {
        is_err: false,
        log: None,
        return_value: Some(events),
        execution_time,
        labels,
        error: None,
    })
}

/// The result object of an attempt that failed outside Dagster's control, or never ran.
pub(crate) fn error_result(
    message: &str,
    execution_time: f64,
    labels: &BTreeMap<String, String>,
) -> Vec<u8> {
    encode(&TaskiqResult {
        is_err: true,
        log: None,
        return_value: None,
        execution_time,
        labels,
        error: Some(ExceptionRepr {
            exc_type: ERROR_TYPE,
            exc_message: [message],
            exc_module: ERROR_MODULE,
            exc_cause: None,
            exc_context: None,
            exc_suppress_context: false,
        }),
    })
}

fn encode(result: &TaskiqResult<'_>) -> Vec<u8> {
    // Plain data (strings, finite floats): serializing cannot fail.
    serde_json::to_vec(result).unwrap_or_default()
}

/// Where the result of `task_id` goes: `S3Backend`'s `str(Path(base_path) / task_id)`.
pub(crate) fn result_key(base_path: &str, task_id: &str) -> String {
    let base = base_path.trim_end_matches('/');
    if base.is_empty() {
        task_id.to_owned()
    } else {
        format!("{base}/{task_id}")
    }
}
