//! The wire contract: a TaskIQ broker message from SQS becomes a [`StepRequest`], or a
//! [`Poison`] error that says exactly why it can never run. See `docs/protocol.md`.
//!
//! Dagster's serdes objects are never deserialized here: the packed `ExecuteStepArgs` is kept
//! as the exact JSON text that arrived and handed to the step unchanged; only the few fields
//! the controller needs (run id, step key, attempt, instance ref) are read from it.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// SQS refuses larger bodies; anything bigger that reaches us is not ours.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Most characters of a message's own text that an error quotes: errors go to the log, the
/// dead-letter attribute, the taskiq result and Dagster, and a body is not theirs to copy.
const EXCERPT_CHARS: usize = 64;
/// Most characters of a JSON parser's message (which may quote the value it choked on).
const PARSER_MESSAGE_CHARS: usize = 160;
/// The only TaskIQ task the controller runs.
pub(crate) const TASK_NAME: &str = "execute_plan";

/// Label names our executor adds (see docs/protocol.md).
pub(crate) mod labels {
    pub(crate) const RUN_ID: &str = "dagster_run_id";
    pub(crate) const STEP_KEY: &str = "dagster_step_key";
    pub(crate) const ATTEMPT: &str = "dagster_attempt";
    pub(crate) const JOB_NAME: &str = "dagster_job_name";
    pub(crate) const LAUNCHER: &str = "dagster_launcher";
    pub(crate) const PRIORITY: &str = "dagster_priority";
    pub(crate) const TIMEOUT: &str = "dagster_timeout";
    pub(crate) const TAGS: &str = "dagster_tags";
}

/// Where a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LauncherKind {
    Process,
    Ecs,
}

impl std::str::FromStr for LauncherKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "process" => Ok(Self::Process),
            "ecs" => Ok(Self::Ecs),
            other => Err(format!(
                "unknown launcher {:?} (expected process or ecs)",
                excerpt(other)
            )),
        }
    }
}

/// The ECS settings a run stored: the image of its code location and its executor config's
/// `env_vars` and `secrets`, as written; read by the bridge from the stored run, never from
/// the message, and checked by the ECS launcher (src/launcher/ecs/request/run_ecs.rs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct StoredEcs {
    /// `job_code_origin.repository_origin.container_image`.
    #[serde(default)]
    pub image: Option<String>,
    /// `KEY=VALUE` (or a bare `KEY`, which the launcher refuses).
    #[serde(default)]
    pub env_vars: Vec<String>,
    #[serde(default)]
    pub secrets: Vec<StoredSecret>,
}

/// A container secret: an environment variable read by ECS from Secrets Manager or SSM.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StoredSecret {
    pub name: String,
    #[serde(rename = "valueFrom")]
    pub value_from: String,
}

/// One step attempt, decoded and validated.
#[derive(Debug, Clone)]
pub struct StepRequest {
    /// Idempotency key of the attempt (the TaskIQ task id).
    pub task_id: String,
    pub run_id: String,
    pub step_key: String,
    /// Dagster's retry attempt number, from 0.
    pub attempt: u32,
    pub job_name: Option<String>,
    /// `None`: the controller's default launcher.
    pub launcher: Option<LauncherKind>,
    /// Higher runs first.
    pub priority: i32,
    pub timeout: Option<Duration>,
    /// The op tags: some steer the launch (`ecs/*`, `dagster/priority`, `dagster-taskiq/*`);
    /// tag limits count any of them.
    pub tags: BTreeMap<String, String>,
    /// All TaskIQ labels, as sent.
    pub labels: BTreeMap<String, String>,
    /// The packed `InstanceRef` (or null), for the bridge.
    pub instance_ref: Value,
    /// `execute_step_args_packed` exactly as it arrived.
    pub step_args_json: Box<RawValue>,
    /// Deliveries of the message so far (SQS ApproximateReceiveCount), set by the
    /// controller; 0 when unknown. The ECS launcher adopts earlier tasks on redelivery.
    pub receive_count: u32,
    /// The packed args ask the step to print its serialized events on stdout (dagster-taskiq
    /// sets it); absent or not a boolean means false.
    pub print_serialized_events: bool,
    /// Keep the step's serialized event lines for a taskiq result (set when a result bucket
    /// is configured, see `crate::results`); launchers that cannot capture output ignore it.
    pub collect_events: bool,
    /// Set by the controller when an earlier execution of the attempt may have started (a
    /// redelivery, a claim taken over): the step then runs without Dagster's step
    /// verification (`should_verify_step`), which refuses an attempt that has started once.
    pub relaunch: bool,
    /// The run's code location as Dagster stored it (set by the controller from the stored
    /// run, never from the message; `None`: unknown, or the run has none). It picks the
    /// Python environment of a local step.
    pub location: Option<String>,
    /// The run's stored ECS settings (image, executor env_vars and secrets), set by the
    /// controller from the bridge; never read from the message.
    pub stored_ecs: Option<StoredEcs>,
}

/// A step attempt as Dagster knows it: what the bridge needs to write about it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptId {
    pub task_id: String,
    pub run_id: String,
    pub step_key: String,
    pub attempt: u32,
    /// The packed `InstanceRef` (or null: the bridge's own instance).
    pub instance_ref: Value,
}

/// Whom a message that failed validation is for, as far as it says (see [`identify`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Identity {
    /// The body's own task id, when valid: its taskiq result goes there.
    pub task_id: Option<String>,
    /// The attempt, when the message names one completely: it gets a verdict.
    pub attempt: Option<AttemptId>,
}

impl Identity {
    /// Only a task id (an extended payload's pointer names nothing else).
    pub(crate) fn task(task_id: Option<String>) -> Self {
        Self {
            task_id,
            attempt: None,
        }
    }
}

/// Why a message can never run. `name()` is the stable short reason used in metrics, the
/// dead-letter attribute and the shared test vectors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Poison {
    #[error("body is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("message does not have the TaskIQ shape: {0}")]
    InvalidShape(String),
    #[error("invalid task_id {0:?}: expected 1 to 64 characters of [0-9A-Za-z_-]")]
    InvalidTaskId(String),
    #[error("unknown task_name {0:?}: this controller only runs {TASK_NAME:?}")]
    WrongTaskName(String),
    #[error("positional args must be empty, got {0} value(s)")]
    UnexpectedArgs(usize),
    #[error("execute_step_args_packed is invalid: {0}")]
    InvalidStepArgs(String),
    #[error("expected exactly one step in step_keys_to_execute, got {0}")]
    StepCount(usize),
    #[error("invalid step key {0:?}: expected 1 to 255 characters of [A-Za-z0-9_.[]-]")]
    InvalidStepKey(String),
    #[error("invalid run id {0:?}: expected 1 to 64 characters of [0-9A-Za-z_-]")]
    InvalidRunId(String),
    #[error("label {label} is invalid: {reason}")]
    InvalidLabel { label: &'static str, reason: String },
    #[error("label {label} says {label_value:?} but the step args say {args_value:?}")]
    LabelMismatch {
        label: &'static str,
        label_value: String,
        args_value: String,
    },
    /// An extended (S3) message whose pointer is malformed or whose object is gone.
    #[error("extended payload cannot be read: {0}")]
    InvalidExtendedPayload(String),
    /// An extended (S3) message that points outside the buckets this controller reads
    /// (`--payload-bucket`): the object is never fetched.
    #[error("extended payload refused: {0}")]
    ExtendedPayloadRefused(String),
    /// An extended (S3) payload over `--max-payload-bytes` (read no further than that).
    #[error("extended payload is at least {size} bytes, over the --max-payload-bytes limit of {limit} bytes")]
    PayloadTooLarge { size: u64, limit: usize },
}

impl Poison {
    /// Stable snake_case name of the reason.
    pub fn name(&self) -> &'static str {
        match self {
            Poison::TooLarge { .. } => "too_large",
            Poison::InvalidJson(_) => "invalid_json",
            Poison::InvalidShape(_) => "invalid_shape",
            Poison::InvalidTaskId(_) => "invalid_task_id",
            Poison::WrongTaskName(_) => "wrong_task_name",
            Poison::UnexpectedArgs(_) => "unexpected_args",
            Poison::InvalidStepArgs(_) => "invalid_step_args",
            Poison::StepCount(_) => "step_count",
            Poison::InvalidStepKey(_) => "invalid_step_key",
            Poison::InvalidRunId(_) => "invalid_run_id",
            Poison::InvalidLabel { .. } => "invalid_label",
            Poison::LabelMismatch { .. } => "label_mismatch",
            Poison::InvalidExtendedPayload(_) => "invalid_extended_payload",
            Poison::ExtendedPayloadRefused(_) => "extended_payload_refused",
            Poison::PayloadTooLarge { .. } => "too_large",
        }
    }
}

#[derive(Deserialize)]
struct RawMessage {
    task_id: String,
    task_name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    // Read so that a wrong type is reported; TaskIQ's type codes are not needed.
    #[serde(default)]
    #[allow(dead_code)]
    labels_types: BTreeMap<String, i64>,
    #[serde(default)]
    args: Vec<Value>,
    kwargs: RawKwargs,
}

#[derive(Deserialize)]
struct RawKwargs {
    execute_step_args_packed: Box<RawValue>,
    // Required by the dagster-taskiq task signature; the step reloads code from the args.
    #[allow(dead_code)]
    executable_dict: Box<RawValue>,
}

/// The few fields of the packed `ExecuteStepArgs` the controller needs.
#[derive(Deserialize)]
struct PackedStepArgs {
    pipeline_run_id: String,
    step_keys_to_execute: Vec<String>,
    #[serde(default)]
    instance_ref: Value,
    #[serde(default)]
    known_state: Option<KnownState>,
    /// Only `true` counts; anything else (absent, null, another type) means false.
    #[serde(default)]
    print_serialized_events: Value,
}

#[derive(Deserialize)]
struct KnownState {
    #[serde(default)]
    previous_retry_attempts: BTreeMap<String, u32>,
}

/// Decodes and validates one SQS body.
pub fn decode(body: &str) -> Result<StepRequest, Poison> {
    decode_with_limit(body, MAX_BODY_BYTES)
}

/// Decodes and validates a body of at most `limit` bytes: [`MAX_BODY_BYTES`] for an SQS body,
/// more for a body resolved from S3 (`--max-payload-bytes`).
pub(crate) fn decode_with_limit(body: &str, limit: usize) -> Result<StepRequest, Poison> {
    if body.len() > limit {
        return Err(Poison::TooLarge {
            size: body.len(),
            limit,
        });
    }
    let raw: RawMessage = serde_json::from_str(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Poison::InvalidShape(json_error(&e)),
        _ => Poison::InvalidJson(json_error(&e)),
    })?;
    if !is_identifier(&raw.task_id, 64) {
        return Err(Poison::InvalidTaskId(excerpt(&raw.task_id)));
    }
    if raw.task_name != TASK_NAME {
        return Err(Poison::WrongTaskName(excerpt(&raw.task_name)));
    }
    if !raw.args.is_empty() {
        return Err(Poison::UnexpectedArgs(raw.args.len()));
    }
    let packed: PackedStepArgs = serde_json::from_str(raw.kwargs.execute_step_args_packed.get())
        .map_err(|e| Poison::InvalidStepArgs(json_error(&e)))?;
    let [args_step_key] = <[String; 1]>::try_from(packed.step_keys_to_execute)
        .map_err(|keys| Poison::StepCount(keys.len()))?;
    let args_attempt = packed
        .known_state
        .as_ref()
        .and_then(|k| k.previous_retry_attempts.get(&args_step_key).copied())
        .unwrap_or(0);
    if !packed.instance_ref.is_null() && !packed.instance_ref.is_object() {
        return Err(Poison::InvalidStepArgs(
            "instance_ref must be an object or null".into(),
        ));
    }

    let labels = raw.labels;
    let run_id = agree(&labels, labels::RUN_ID, packed.pipeline_run_id)?;
    let step_key = agree(&labels, labels::STEP_KEY, args_step_key)?;
    let attempt = match label(&labels, labels::ATTEMPT) {
        None => args_attempt,
        Some(text) => {
            let value: u32 = text.parse().map_err(|_| Poison::InvalidLabel {
                label: labels::ATTEMPT,
                reason: format!("{:?} is not a non-negative integer", excerpt(text)),
            })?;
            if value != args_attempt {
                return Err(Poison::LabelMismatch {
                    label: labels::ATTEMPT,
                    label_value: excerpt(text),
                    args_value: args_attempt.to_string(),
                });
            }
            value
        }
    };
    if !is_identifier(&run_id, 64) {
        return Err(Poison::InvalidRunId(excerpt(&run_id)));
    }
    if !is_step_key(&step_key) {
        return Err(Poison::InvalidStepKey(excerpt(&step_key)));
    }

    let launcher = parse_label(&labels, labels::LAUNCHER, |s| s.parse::<LauncherKind>())?;
    let priority = parse_label(&labels, labels::PRIORITY, |s| {
        s.parse::<i32>()
            .map_err(|_| format!("{:?} is not an integer", excerpt(s)))
    })?
    .unwrap_or(0);
    let timeout = parse_label(&labels, labels::TIMEOUT, parse_timeout)?;
    let tags = parse_label(&labels, labels::TAGS, |s| {
        serde_json::from_str::<BTreeMap<String, String>>(s)
            .map_err(|e| format!("not a JSON object of strings: {}", json_error(&e)))
    })?
    .unwrap_or_default();
    let job_name = parse_label(&labels, labels::JOB_NAME, |s| {
        if is_dagster_name(s) {
            Ok(s.to_owned())
        } else {
            Err(format!(
                "{:?} is not a Dagster name (1 to 255 characters of [A-Za-z0-9_])",
                excerpt(s)
            ))
        }
    })?;

    Ok(StepRequest {
        task_id: raw.task_id,
        run_id,
        step_key,
        attempt,
        job_name,
        launcher,
        priority,
        timeout,
        tags,
        labels,
        instance_ref: packed.instance_ref,
        step_args_json: raw.kwargs.execute_step_args_packed,
        receive_count: 0,
        print_serialized_events: packed.print_serialized_events == Value::Bool(true),
        collect_events: false,
        relaunch: false,
        location: None,
        stored_ecs: None,
    })
}

impl StepRequest {
    /// This request with the launch settings these op tags make (the run's stored ones),
    /// the controller's default timeout where the tags set none.
    pub(crate) fn with_op_tags(
        &self,
        op_tags: &BTreeMap<String, String>,
        default_timeout: Option<Duration>,
    ) -> StepRequest {
        let (launcher, priority, timeout) = launch_settings_of(op_tags);
        StepRequest {
            tags: op_tags.clone(),
            launcher,
            priority,
            timeout: timeout.or(default_timeout),
            ..self.clone()
        }
    }

    /// The timeout the message's own label sets (the controller's default is not one).
    pub(crate) fn timeout_label(&self) -> Option<Duration> {
        self.labels
            .get(labels::TIMEOUT)
            .and_then(|v| parse_timeout(v).ok())
    }

    /// The attempt this request is for.
    pub fn id(&self) -> AttemptId {
        AttemptId {
            task_id: self.task_id.clone(),
            run_id: self.run_id.clone(),
            step_key: self.step_key.clone(),
            attempt: self.attempt,
            instance_ref: self.instance_ref.clone(),
        }
    }

    /// `DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS`: base64 of zlib of the packed args' JSON, the
    /// form Dagster's own step handlers pass.
    pub fn compressed_step_args(&self) -> String {
        let mut encoder =
            flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        encoder
            .write_all(self.step_args_text().as_bytes())
            .expect("writing to a Vec cannot fail");
        let compressed = encoder.finish().expect("writing to a Vec cannot fail");
        base64::engine::general_purpose::STANDARD.encode(compressed)
    }
}

/// Whom a body that failed [`decode`] is for, read as leniently as [`decode`] is strict:
/// the task id when it is valid, and the attempt when the packed args (or, for a field they
/// lack, the labels) name a valid run id, one valid step key and the attempt, and the args
/// carry an `instance_ref` that is an object or null. The args win over the labels, as they
/// are what the executor checks a verdict against (`contract.step_attempt`).
pub(crate) fn identify(body: &str) -> Identity {
    let Ok(message) = serde_json::from_str::<Value>(body) else {
        return Identity::default();
    };
    let task_id = message
        .get("task_id")
        .and_then(Value::as_str)
        .filter(|t| is_valid_task_id(t))
        .map(str::to_owned);
    let attempt = task_id
        .as_deref()
        .and_then(|task_id| attempt_named(&message, task_id));
    Identity { task_id, attempt }
}

fn attempt_named(message: &Value, task_id: &str) -> Option<AttemptId> {
    let label = |name: &str| {
        message
            .get("labels")?
            .get(name)?
            .as_str()
            .filter(|v| !v.is_empty())
    };
    let packed = message.pointer("/kwargs/execute_step_args_packed")?;
    let instance_ref = match packed.get("instance_ref") {
        None => Value::Null,
        Some(r) if r.is_null() || r.is_object() => r.clone(),
        Some(_) => return None,
    };
    let run_id = match packed.get("pipeline_run_id") {
        Some(run_id) => run_id.as_str()?,
        None => label(labels::RUN_ID)?,
    };
    let step_key = match packed.get("step_keys_to_execute") {
        Some(keys) => match keys.as_array()?.as_slice() {
            [key] => key.as_str()?,
            _ => return None,
        },
        None => label(labels::STEP_KEY)?,
    };
    let attempts = match packed.get("known_state") {
        None | Some(Value::Null) => None,
        Some(known) => match known.get("previous_retry_attempts") {
            None | Some(Value::Null) => None,
            Some(attempts) => Some(attempts.as_object()?),
        },
    };
    let attempt = match attempts.and_then(|a| a.get(step_key)) {
        Some(n) => u32::try_from(n.as_u64()?).ok()?,
        None => 0,
    };
    if !is_identifier(run_id, 64) || !is_step_key(step_key) {
        return None;
    }
    Some(AttemptId {
        task_id: task_id.to_owned(),
        run_id: run_id.to_owned(),
        step_key: step_key.to_owned(),
        attempt,
        instance_ref,
    })
}

impl StepRequest {
    /// The packed args the step runs with: as they arrived, except that they name the
    /// controller's instance (`instance_ref`, pinned by the controller) and that a relaunch
    /// turns Dagster's step verification off.
    pub(crate) fn step_args_text(&self) -> std::borrow::Cow<'_, str> {
        let text = self.step_args_json.get();
        let Ok(mut args) = serde_json::from_str::<serde_json::Map<String, Value>>(text) else {
            return text.into(); // decode checked it is an object
        };
        let mut changed = false;
        if args.get(INSTANCE_FIELD) != Some(&self.instance_ref) {
            args.insert(INSTANCE_FIELD.to_owned(), self.instance_ref.clone());
            changed = true;
        }
        if self.relaunch && args.get(VERIFY_FIELD) == Some(&Value::Bool(true)) {
            args.insert(VERIFY_FIELD.to_owned(), Value::Bool(false));
            changed = true;
        }
        if changed {
            Value::Object(args).to_string().into()
        } else {
            text.into()
        }
    }
}

/// `ExecuteStepArgs.instance_ref`: the instance the step opens.
const INSTANCE_FIELD: &str = "instance_ref";
/// `ExecuteStepArgs.should_verify_step`, which the executor sets.
const VERIFY_FIELD: &str = "should_verify_step";

/// A label's value, treating an empty string as absent.
fn label<'a>(labels: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    labels
        .get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

fn parse_label<T>(
    labels: &BTreeMap<String, String>,
    name: &'static str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, Poison> {
    label(labels, name)
        .map(|text| {
            parse(text).map_err(|reason| Poison::InvalidLabel {
                label: name,
                reason,
            })
        })
        .transpose()
}

/// The args' value, checked against the label when the label is present.
fn agree(
    labels: &BTreeMap<String, String>,
    name: &'static str,
    args_value: String,
) -> Result<String, Poison> {
    match label(labels, name) {
        Some(label_value) if label_value != args_value => Err(Poison::LabelMismatch {
            label: name,
            label_value: excerpt(label_value),
            args_value: excerpt(&args_value),
        }),
        _ => Ok(args_value),
    }
}

/// Op tags that the executor turns into the launcher, priority and timeout labels.
pub(crate) mod tags {
    pub(crate) const LAUNCHER: &str = "dagster-taskiq/launcher";
    pub(crate) const PRIORITY: &str = "dagster/priority";
    pub(crate) const TIMEOUT: &str = "dagster-taskiq/timeout";
}

/// The launcher, priority and timeout that op tags make (the executor's `contract.py` writes
/// them as labels the same way): what a message's labels must say for a step with these
/// tags. A tag that does not parse makes no setting (the executor refuses to publish it).
pub(crate) fn launch_settings_of(
    op_tags: &BTreeMap<String, String>,
) -> (Option<LauncherKind>, i32, Option<Duration>) {
    let tag = |name: &str| {
        op_tags
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    let launcher = tag(tags::LAUNCHER).and_then(|v| v.parse().ok());
    let priority = tag(tags::PRIORITY)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = tag(tags::TIMEOUT).and_then(|v| parse_timeout(v).ok());
    (launcher, priority, timeout)
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("{:?} is not a number of seconds", excerpt(text)))?;
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 7.0 * 24.0 * 3600.0) {
        return Err(format!(
            "{:?} must be between 0 and 604800 seconds",
            excerpt(text)
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// At most [`EXCERPT_CHARS`] characters of a message's own text, for an error to quote; a
/// longer text is cut and its size given.
pub(crate) fn excerpt(text: &str) -> String {
    excerpt_of(text, EXCERPT_CHARS)
}

fn excerpt_of(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}…[{} bytes]", &text[..cut], text.len()),
    }
}

/// A JSON parser's error, which quotes the value it choked on (`invalid type: string "…"`),
/// cut to [`PARSER_MESSAGE_CHARS`]; the position is kept.
pub(crate) fn json_error(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let position = format!(" at line {} column {}", error.line(), error.column());
    match text.strip_suffix(&position) {
        Some(message) if error.line() > 0 => {
            format!("{}{position}", excerpt_of(message, PARSER_MESSAGE_CHARS))
        }
        _ => excerpt_of(&text, PARSER_MESSAGE_CHARS),
    }
}

/// Whether `task_id` is a valid task id (1 to 64 characters of `[0-9A-Za-z_-]`).
pub(crate) fn is_valid_task_id(task_id: &str) -> bool {
    is_identifier(task_id, 64)
}

fn is_identifier(s: &str, max_len: usize) -> bool {
    (1..=max_len).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_dagster_name(s: &str) -> bool {
    (1..=255).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn is_step_key(s: &str) -> bool {
    (1..=255).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'[' | b']' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(labels: Value, packed: Value) -> String {
        serde_json::json!({
            "task_id": "0123456789abcdef0123456789abcdef",
            "task_name": "execute_plan",
            "labels": labels,
            "labels_types": {},
            "args": [],
            "kwargs": {"execute_step_args_packed": packed, "executable_dict": {}},
        })
        .to_string()
    }

    fn packed(run_id: &str, step_key: &str, attempt: u32) -> Value {
        serde_json::json!({
            "__class__": "ExecuteStepArgs",
            "pipeline_run_id": run_id,
            "step_keys_to_execute": [step_key],
            "instance_ref": null,
            "known_state": {"__class__": "KnownExecutionState",
                            "previous_retry_attempts": {step_key: attempt}},
        })
    }

    #[test]
    fn reads_fields_from_packed_args_without_labels() {
        let req = decode(&body(serde_json::json!({}), packed("run-1", "op_a", 2))).unwrap();
        assert_eq!(
            (req.run_id.as_str(), req.step_key.as_str(), req.attempt),
            ("run-1", "op_a", 2)
        );
        assert_eq!(req.launcher, None);
        assert_eq!(req.timeout, None);
    }

    #[test]
    fn labels_must_agree_with_args() {
        let labels = serde_json::json!({"dagster_attempt": "1"});
        let err = decode(&body(labels, packed("run-1", "op_a", 2))).unwrap_err();
        assert_eq!(err.name(), "label_mismatch");
    }

    #[test]
    fn steering_labels_are_parsed() {
        let labels = serde_json::json!({
            "dagster_timeout": "2.5", "dagster_priority": "-3", "dagster_launcher": "ecs",
            "dagster_tags": "{\"ecs/cpu\": \"256\"}",
        });
        let req = decode(&body(labels, packed("r", "s", 0))).unwrap();
        assert_eq!(req.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(req.priority, -3);
        assert_eq!(req.launcher, Some(LauncherKind::Ecs));
        assert_eq!(req.tags["ecs/cpu"], "256");
    }

    #[test]
    fn compressed_args_round_trip() {
        use std::io::Read;
        let req = decode(&body(serde_json::json!({}), packed("r", "s", 0))).unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(req.compressed_step_args())
            .unwrap();
        let mut text = String::new();
        flate2::read::ZlibDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, req.step_args_json.get());
    }

    #[test]
    fn a_relaunch_runs_without_dagsters_step_verification() {
        let mut args = packed("r", "s", 0);
        args["should_verify_step"] = true.into();
        let mut req = decode(&body(serde_json::json!({}), args)).unwrap();
        assert_eq!(
            req.step_args_text(),
            req.step_args_json.get(),
            "a first launch verifies"
        );
        req.relaunch = true;
        let relaunched: Value = serde_json::from_str(&req.step_args_text()).unwrap();
        assert_eq!(relaunched["should_verify_step"], Value::Bool(false));
        assert_eq!(
            relaunched["pipeline_run_id"], "r",
            "everything else as sent"
        );
    }

    #[test]
    fn oversized_body_is_poison() {
        let big = "x".repeat(MAX_BODY_BYTES + 1);
        assert_eq!(decode(&big).unwrap_err().name(), "too_large");
    }

    #[test]
    fn a_larger_limit_admits_a_resolved_body() {
        let mut packed = packed("r", "s", 0);
        packed["padding"] = Value::String("x".repeat(MAX_BODY_BYTES));
        let big = body(serde_json::json!({}), packed);
        assert_eq!(decode(&big).unwrap_err().name(), "too_large");
        let req = decode_with_limit(&big, 4 * MAX_BODY_BYTES).unwrap();
        assert_eq!(req.step_key, "s");
    }

    #[test]
    fn print_serialized_events_is_read_from_the_packed_args() {
        let mut args = packed("r", "s", 0);
        assert!(
            !decode(&body(serde_json::json!({}), args.clone()))
                .unwrap()
                .print_serialized_events
        );
        args["print_serialized_events"] = Value::Bool(true);
        assert!(
            decode(&body(serde_json::json!({}), args.clone()))
                .unwrap()
                .print_serialized_events
        );
        args["print_serialized_events"] = Value::String("yes".into());
        assert!(
            !decode(&body(serde_json::json!({}), args))
                .unwrap()
                .print_serialized_events
        );
    }

    #[test]
    fn a_poison_message_still_names_its_attempt_when_it_can() {
        let bad_priority = body(
            serde_json::json!({"dagster_priority": "high"}),
            packed("run-1", "op_a", 2),
        );
        assert_eq!(decode(&bad_priority).unwrap_err().name(), "invalid_label");
        let identity = identify(&bad_priority);
        let attempt = identity.attempt.expect("an attempt");
        assert_eq!(
            (
                identity.task_id.as_deref(),
                attempt.task_id.as_str(),
                attempt.run_id.as_str(),
                attempt.step_key.as_str(),
                attempt.attempt,
                attempt.instance_ref.clone()
            ),
            (
                Some("0123456789abcdef0123456789abcdef"),
                "0123456789abcdef0123456789abcdef",
                "run-1",
                "op_a",
                2,
                Value::Null
            )
        );
        // The args win over a label that disagrees: they are what the executor checks.
        let mismatch = body(
            serde_json::json!({"dagster_attempt": "5"}),
            packed("run-1", "op_a", 2),
        );
        assert_eq!(identify(&mismatch).attempt.unwrap().attempt, 2);
        // A field the args lack comes from its label.
        let mut no_run = packed("ignored", "op_a", 0);
        no_run.as_object_mut().unwrap().remove("pipeline_run_id");
        let from_label = body(serde_json::json!({"dagster_run_id": "run-9"}), no_run);
        assert_eq!(identify(&from_label).attempt.unwrap().run_id, "run-9");
    }

    #[test]
    fn a_message_that_does_not_name_one_valid_attempt_gets_no_verdict() {
        let no_attempt = |body: &str| identify(body).attempt.is_none();
        let mut two_steps = packed("run-1", "op_a", 0);
        two_steps["step_keys_to_execute"] = serde_json::json!(["op_a", "op_b"]);
        assert!(no_attempt(&body(serde_json::json!({}), two_steps)));
        assert!(no_attempt(&body(
            serde_json::json!({}),
            packed("r;m", "op_a", 0)
        )));
        assert!(no_attempt(&body(
            serde_json::json!({}),
            packed("r", "a b", 0)
        )));
        let mut bad_ref = packed("run-1", "op_a", 0);
        bad_ref["instance_ref"] = Value::String("somewhere".into());
        assert!(no_attempt(&body(serde_json::json!({}), bad_ref)));
        let mut bad_attempt = packed("run-1", "op_a", 0);
        bad_attempt["known_state"]["previous_retry_attempts"]["op_a"] = serde_json::json!(-1);
        assert!(no_attempt(&body(serde_json::json!({}), bad_attempt)));
        let no_args = serde_json::json!({"task_id": "abc", "task_name": "execute_plan",
            "labels": {"dagster_run_id": "r", "dagster_step_key": "s"}, "kwargs": {}});
        let identity = identify(&no_args.to_string());
        assert_eq!(identity.task_id.as_deref(), Some("abc"));
        assert!(
            identity.attempt.is_none(),
            "no args: no instance to write to"
        );
        assert_eq!(identify("{not json"), Identity::default());
        let bad_task = body(serde_json::json!({}), packed("r", "s", 0))
            .replace("0123456789abcdef0123456789abcdef", "a b");
        assert_eq!(identify(&bad_task), Identity::default());
    }

    #[test]
    fn no_error_quotes_more_than_an_excerpt_of_the_body() {
        let secret = "s3cr3t".repeat(100_000);
        let ok = || body(serde_json::json!({}), packed("r", "s", 0));
        let swap = |what: &str| ok().replacen(what, &secret, 1);
        let mut bodies = vec![
            swap("0123456789abcdef0123456789abcdef"), // task id
            swap("execute_plan"),                     // task name
            format!("{{\"task_id\": 7, \"x\": \"{secret}\"}}"),
            format!("{{\"task_id\": \"{secret}\""), // not JSON
            ok().replacen("[]", &format!("[\"{secret}\"]"), 1), // args: a count
        ];
        for (label, value) in [
            ("dagster_run_id", secret.clone()),
            ("dagster_attempt", secret.clone()),
            ("dagster_priority", secret.clone()),
            ("dagster_timeout", secret.clone()),
            ("dagster_launcher", secret.clone()),
            ("dagster_job_name", secret.clone()),
            ("dagster_tags", format!("{{\"a\": 1, \"b\": \"{secret}\"}}")),
            ("dagster_tags", format!("[\"{secret}\"]")),
        ] {
            bodies.push(body(
                serde_json::json!({ label: value }),
                packed("r", "s", 0),
            ));
        }
        bodies.push(body(serde_json::json!({}), packed(&secret, "s", 0)));
        bodies.push(body(serde_json::json!({}), packed("r", &secret, 0)));
        let mut args = packed("r", "s", 0);
        args["pipeline_run_id"] = Value::Array(vec![Value::String(secret.clone())]);
        bodies.push(body(serde_json::json!({}), args));
        for (i, b) in bodies.iter().enumerate() {
            let err = decode_with_limit(b, 8 * MAX_BODY_BYTES).expect_err("poison");
            let text = err.to_string();
            assert!(
                text.len() < 400,
                "body {i}: {} says {} bytes",
                err.name(),
                text.len()
            );
        }
        // The excerpt still shows the start of what was wrong, and how big it was.
        let err = decode(&swap("execute_plan")).unwrap_err().to_string();
        assert!(err.contains("s3cr3ts3cr3t"), "{err}");
        assert!(err.contains("…[600000 bytes]"), "{err}");
        assert_eq!(excerpt("ünïcödé"), "ünïcödé");
        assert_eq!(
            excerpt(&"é".repeat(100)),
            format!("{}…[200 bytes]", "é".repeat(64))
        );
    }

    #[test]
    fn shell_metacharacters_in_step_key_are_poison() {
        let err = decode(&body(serde_json::json!({}), packed("r", "a;rm -rf /", 0))).unwrap_err();
        assert_eq!(err.name(), "invalid_step_key");
    }
}
