//! Drop-in compatibility with the `dagster-taskiq` executor, which talks TaskIQ over SQS with
//! taskiq-aio-sqs and waits for a taskiq result in S3 (docs/protocol.md, "TaskIQ
//! compatibility"):
//!
//! - **Extended payloads.** A body of 1 MiB or more is sent the taskiq-aio-sqs way: the SQS
//!   body is `{"s3_bucket": ..., "s3_key": ...}` with the string message attribute
//!   `s3_extended_message` = `True`; the real body is that S3 object. [`TaskiqCompat::decode`]
//!   resolves it before decoding, with [`MAX_EXTENDED_BODY_BYTES`] as the size limit (the
//!   1 MiB limit applies to the SQS body only).
//! - **Results.** With a result bucket, every settled attempt gets a taskiq result object at
//!   `<base_path>/<task_id>`, in the JSON the taskiq-aio-sqs `S3Backend` reads with its default
//!   (orjson) serializer, written before the message is deleted:
//!   `{"is_err", "log", "return_value", "execution_time", "labels", "error"}`. A step that
//!   reached an outcome in Dagster returns the serialized `DagsterEvent` lines it printed on
//!   stdout (`print_serialized_events`); a crash, timeout, cancel or dead letter returns an
//!   error in taskiq's exception shape, so the executor never waits forever.
//!   The event lines come from the local launchers ([`crate::launcher::EventLines`]).
//!
//! S3 sits behind the [`ObjectStore`] trait: [`S3ObjectStore`] is the aws-sdk implementation,
//! `crate::fakes::FakeObjectStore` the in-memory one the unit tests use.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use clap::Args;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::aws;
use crate::envelope::{self, Poison, StepRequest, MAX_BODY_BYTES};
use crate::launcher::child::MAX_EVENT_BYTES;
use crate::launcher::EventLines;
use crate::outcome::{Outcome, Skip};
use crate::queue::ReceivedMessage;
use crate::retry::{retry, Backoff, RetryBudget, Transient};

/// Message attribute that marks an extended (S3) message; taskiq-aio-sqs sets it to `True`.
pub const EXTENDED_MESSAGE_ATTRIBUTE: &str = "s3_extended_message";
/// Largest body resolved from S3. taskiq-aio-sqs sets no limit; this one bounds the memory a
/// single message can take (the body is held while its step runs).
pub const MAX_EXTENDED_BODY_BYTES: usize = 64 * 1024 * 1024;
/// The exception type of error results. taskiq rebuilds it from `sys.modules` when that module
/// is imported in the reading process, else as a dynamic `Exception` subclass of that name.
pub const ERROR_MODULE: &str = "dagster_taskiq_controller.contract";
pub const ERROR_TYPE: &str = "StepExecutionError";

/// Outputs of finished steps kept for a result that could not be written yet (at most this
/// many, for at most [`KEPT_FOR`]): a redelivery to this controller can still write it.
const MAX_KEPT: usize = 256;
const KEPT_FOR: Duration = Duration::from_secs(3600);
/// Pauses between tries of a result write, within its retry budget.
const PUT_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(200),
    cap: Duration::from_secs(5),
};

// ---- flags ---------------------------------------------------------------------------------

/// dagster-taskiq compatibility: taskiq results and extended payloads (this module).
#[derive(Debug, Clone, Default, Args)]
pub struct TaskiqArgs {
    /// S3 bucket for taskiq results (taskiq-aio-sqs `S3Backend(bucket_name=...)`): each
    /// settled step gets its result object at `<task_id>`. Unset: no results are written.
    #[arg(long, env = "DAGSTER_TASKIQ_S3_BUCKET_NAME")]
    pub result_bucket: Option<String>,

    /// Key prefix of the result objects (`S3Backend(base_path=...)`).
    #[arg(long, env = "DAGSTER_TASKIQ_S3_BASE_PATH", default_value = "")]
    pub result_base_path: String,

    /// S3 endpoint for results and extended payloads. Default: the standard AWS configuration
    /// (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, else AWS itself).
    #[arg(long, env = "DAGSTER_TASKIQ_S3_ENDPOINT_URL")]
    pub s3_endpoint_url: Option<String>,
}

// ---- the S3 boundary ---------------------------------------------------------------------

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("s3://{bucket}/{key} does not exist")]
    NotFound { bucket: String, key: String },
    #[error("s3://{bucket}/{key} is at least {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        bucket: String,
        key: String,
        size: u64,
        limit: usize,
    },
    #[error("{operation} s3://{bucket}/{key} failed, may pass: {message}")]
    Transient {
        operation: &'static str,
        bucket: String,
        key: String,
        message: String,
    },
    #[error("{operation} s3://{bucket}/{key} refused: {message}")]
    Rejected {
        operation: &'static str,
        bucket: String,
        key: String,
        message: String,
    },
}

impl StoreError {
    /// Whether the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient { .. })
    }
}

impl Transient for StoreError {
    fn is_transient(&self) -> bool {
        StoreError::is_transient(self)
    }
}

/// The S3 calls of this module.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Reads an object of at most `limit` bytes.
    async fn get(&self, bucket: &str, key: &str, limit: usize) -> Result<Vec<u8>, StoreError>;
    /// Writes (or replaces) a JSON object.
    async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) -> Result<(), StoreError>;
    /// Whether the object exists.
    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, StoreError>;
}

/// [`ObjectStore`] on aws-sdk-s3.
pub struct S3ObjectStore {
    client: aws_sdk_s3::Client,
}

impl S3ObjectStore {
    /// A client from the standard AWS configuration, on `endpoint` when given.
    pub fn new(aws: &aws_config::SdkConfig, endpoint: Option<&str>) -> Self {
        Self {
            client: crate::aws::s3_client(aws, endpoint),
        }
    }

    /// Fails unless the bucket exists and is reachable (HeadBucket).
    pub async fn check_bucket(&self, bucket: &str) -> Result<(), StoreError> {
        self.client
            .head_bucket()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| s3_error("HeadBucket", bucket, "", e))?;
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for S3ObjectStore {
    async fn get(&self, bucket: &str, key: &str, limit: usize) -> Result<Vec<u8>, StoreError> {
        let out = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| s3_error("GetObject", bucket, key, e))?;
        let too_large = |size: u64| StoreError::TooLarge {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            size,
            limit,
        };
        let declared = out.content_length().and_then(|n| u64::try_from(n).ok());
        if let Some(size) = declared.filter(|&n| n > limit as u64) {
            return Err(too_large(size));
        }
        let mut body = out.body;
        let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
        loop {
            let chunk = body.try_next().await.map_err(|e| StoreError::Transient {
                operation: "GetObject",
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                message: e.to_string(),
            })?;
            let Some(chunk) = chunk else { break };
            if bytes.len() + chunk.len() > limit {
                return Err(too_large((bytes.len() + chunk.len()) as u64));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type("application/json")
            .body(body.into())
            .send()
            .await
            .map_err(|e| s3_error("PutObject", bucket, key, e))?;
        Ok(())
    }

    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, StoreError> {
        match self
            .client
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => match s3_error("HeadObject", bucket, key, e) {
                StoreError::NotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }
}

fn s3_error<E>(
    operation: &'static str,
    bucket: &str,
    key: &str,
    err: SdkError<E, HttpResponse>,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let failure = aws::classify(&err);
    let (bucket, key) = (bucket.to_owned(), key.to_owned());
    let code = failure.code.as_deref().unwrap_or_default();
    if matches!(code, "NoSuchKey" | "NotFound") || (failure.status == Some(404) && code.is_empty())
    {
        return StoreError::NotFound { bucket, key };
    }
    let message = failure.text;
    if failure.class.retryable() {
        StoreError::Transient {
            operation,
            bucket,
            key,
            message,
        }
    } else {
        StoreError::Rejected {
            operation,
            bucket,
            key,
            message,
        }
    }
}

// ---- result objects ----------------------------------------------------------------------

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
pub fn success_result(
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
pub fn error_result(
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
pub fn result_key(base_path: &str, task_id: &str) -> String {
    let base = base_path.trim_end_matches('/');
    if base.is_empty() {
        task_id.to_owned()
    } else {
        format!("{base}/{task_id}")
    }
}

// ---- the layer the controller calls -----------------------------------------------------

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// It can never run; `task_id` is the body's own when it had a valid one (for an error
    /// result).
    #[error("{poison}")]
    Poison {
        poison: Poison,
        task_id: Option<String>,
    },
    /// Its extended payload cannot be read right now (S3 failing or refusing): try later.
    #[error("extended payload unavailable: {0}")]
    Unavailable(StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum TaskiqSetupError {
    #[error("--result-bucket: {0}")]
    Bucket(String),
}

/// Where results go.
#[derive(Debug, Clone)]
struct ResultTarget {
    bucket: String,
    base_path: String,
}

/// What a finished execution left for its result.
struct KeptOutput {
    /// `None`: the launcher does not capture output (ECS).
    events: Option<EventLines>,
    ran_for: Duration,
    kept_at: Instant,
}

/// Extended payloads and taskiq results; [`TaskiqCompat::default`] does neither.
#[derive(Default)]
pub struct TaskiqCompat {
    store: Option<Arc<dyn ObjectStore>>,
    results: Option<ResultTarget>,
    kept: Mutex<HashMap<String, KeptOutput>>,
    /// How long a result write is retried before the message is released for later.
    retry_budget: Duration,
}

impl TaskiqCompat {
    /// Resolves extended payloads from `store`; writes results to `result_bucket` when given.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        result_bucket: Option<String>,
        result_base_path: &str,
    ) -> Self {
        Self {
            store: Some(store),
            results: result_bucket.map(|bucket| ResultTarget {
                bucket,
                base_path: result_base_path.to_owned(),
            }),
            kept: Mutex::default(),
            retry_budget: Duration::from_secs(10),
        }
    }

    /// How long a result write is retried before the message is released (default 10 s).
    pub fn with_retry_budget(mut self, budget: Duration) -> Self {
        self.retry_budget = budget;
        self
    }

    /// The S3 client from the standard AWS configuration; checks the result bucket.
    pub async fn connect(
        args: &TaskiqArgs,
        aws: &aws_config::SdkConfig,
    ) -> Result<Self, TaskiqSetupError> {
        let store = S3ObjectStore::new(aws, args.s3_endpoint_url.as_deref());
        let bucket = args.result_bucket.clone().filter(|b| !b.is_empty());
        if let Some(bucket) = &bucket {
            store
                .check_bucket(bucket)
                .await
                .map_err(|e| TaskiqSetupError::Bucket(format!("cannot use {bucket:?}: {e}")))?;
        }
        Ok(Self::new(Arc::new(store), bucket, &args.result_base_path))
    }

    /// Whether taskiq results are written.
    pub fn results_enabled(&self) -> bool {
        self.results.is_some()
    }

    /// Decodes a message, resolving an extended payload first.
    pub async fn decode(&self, message: &ReceivedMessage) -> Result<StepRequest, DecodeError> {
        let poison = |poison: Poison, body: &str| DecodeError::Poison {
            task_id: task_id_of(&poison, body),
            poison,
        };
        let mut step = if is_extended(message) {
            let body = self.fetch_extended(&message.body).await?;
            envelope::decode_with_limit(&body, MAX_EXTENDED_BODY_BYTES)
                .map_err(|p| poison(p, &body))?
        } else {
            envelope::decode(&message.body).map_err(|p| poison(p, &message.body))?
        };
        step.collect_events = self.results_enabled();
        Ok(step)
    }

    async fn fetch_extended(&self, pointer: &str) -> Result<String, DecodeError> {
        let poison = |poison| DecodeError::Poison {
            poison,
            task_id: None,
        };
        if pointer.len() > MAX_BODY_BYTES {
            return Err(poison(Poison::TooLarge {
                size: pointer.len(),
                limit: MAX_BODY_BYTES,
            }));
        }
        #[derive(Deserialize)]
        struct Pointer {
            s3_bucket: String,
            s3_key: String,
        }
        let Pointer { s3_bucket, s3_key } = serde_json::from_str(pointer).map_err(|e| {
            poison(Poison::InvalidExtendedPayload(format!(
                "the body is not an {{\"s3_bucket\", \"s3_key\"}} pointer: {e}"
            )))
        })?;
        let Some(store) = &self.store else {
            return Err(poison(Poison::InvalidExtendedPayload(
                "this controller has no S3 client".into(),
            )));
        };
        let span = tracing::info_span!("extended_payload", bucket = %s3_bucket, key = %s3_key);
        let fetched = tracing::Instrument::instrument(
            store.get(&s3_bucket, &s3_key, MAX_EXTENDED_BODY_BYTES),
            span,
        )
        .await;
        let bytes = match fetched {
            Ok(bytes) => bytes,
            Err(StoreError::TooLarge { size, limit, .. }) => {
                return Err(poison(Poison::TooLarge {
                    size: usize::try_from(size).unwrap_or(usize::MAX),
                    limit,
                }))
            }
            Err(e @ StoreError::NotFound { .. }) => {
                return Err(poison(Poison::InvalidExtendedPayload(e.to_string())))
            }
            Err(e) => return Err(DecodeError::Unavailable(e)),
        };
        tracing::debug!(bytes = bytes.len(), bucket = %s3_bucket, key = %s3_key, "extended payload resolved");
        String::from_utf8(bytes).map_err(|e| {
            poison(Poison::InvalidJson(format!(
                "the extended payload is not UTF-8: {e}"
            )))
        })
    }

    /// Keeps what a finished execution printed until its result is written (`events`: `None`
    /// when its launcher does not capture output).
    pub fn keep_output(&self, task_id: &str, events: Option<EventLines>, ran_for: Duration) {
        if !self.results_enabled() {
            return;
        }
        let mut kept = self.kept.lock();
        let now = Instant::now();
        kept.retain(|_, k| now.duration_since(k.kept_at) < KEPT_FOR);
        if kept.len() >= MAX_KEPT {
            if let Some(oldest) = kept
                .iter()
                .min_by_key(|(_, k)| k.kept_at)
                .map(|(id, _)| id.clone())
            {
                kept.remove(&oldest);
            }
        }
        kept.insert(
            task_id.to_owned(),
            KeptOutput {
                events,
                ran_for,
                kept_at: now,
            },
        );
    }

    /// Writes the taskiq result of an attempt about to be settled with `disposition`, before
    /// its message is deleted. `verdict`: the controller's verdict for the attempt, if any.
    /// Nothing is written for a message that is released or abandoned, or one whose earlier
    /// result already exists and whose events are gone.
    ///
    /// An `Err` means the result could not be written but may be later: keep the message
    /// (release it) so a redelivery writes it. A refused write (no such bucket, access
    /// denied) and any failure for a dead letter (the dead-letter queue keeps the message)
    /// are logged, not returned.
    pub async fn write_result(
        &self,
        step: &StepRequest,
        outcome: &Outcome,
    ) -> Result<(), StoreError> {
        let (Some(target), Some(store)) = (&self.results, &self.store) else {
            return Ok(());
        };
        let key = result_key(&target.base_path, &step.task_id);
        let span = tracing::info_span!("taskiq_result", bucket = %target.bucket, %key);
        tracing::Instrument::instrument(
            self.write_result_to(store.as_ref(), target, key, step, outcome),
            span,
        )
        .await
    }

    async fn write_result_to(
        &self,
        store: &dyn ObjectStore,
        target: &ResultTarget,
        key: String,
        step: &StepRequest,
        outcome: &Outcome,
    ) -> Result<(), StoreError> {
        let kept = self.kept.lock().remove(&step.task_id);
        let ran_for = kept.as_ref().map_or(0.0, |k| k.ran_for.as_secs_f64());
        let labels = &step.labels;
        let error = |message: String| (error_result(&message, ran_for, labels), true);
        if !outcome.ends_attempt() {
            // The attempt runs again (here or elsewhere): its result is written then.
            if let Some(kept) = kept {
                self.put_back(&step.task_id, kept);
            }
            return Ok(());
        }
        let (attempt, step_key) = (step.attempt, &step.step_key);
        let name = outcome.name();
        let (body, is_err) = match (outcome, kept.as_ref()) {
            (Outcome::DeadLettered { reason, detail }, _) => error(format!(
                "dagster-taskiq-controller dead-lettered step attempt {attempt} of {step_key} ({}): {detail}",
                reason.name()
            )),
            (Outcome::Verdict { cause, .. }, _) => error(format!(
                "step attempt {attempt} of {step_key} failed: {cause}"
            )),
            (Outcome::RunEnded | Outcome::Skipped(Skip::RunEnded), _) => error(format!(
                "step attempt {attempt} of {step_key} did not finish: its run is over (canceled or failed)"
            )),
            (_, Some(KeptOutput { events: None, .. })) => error(format!(
                "step attempt {attempt} of {step_key} ended ({name}), but its launcher does not capture \
                 the step's output (ECS): its events are in the run's event log only"
            )),
            (_, Some(KeptOutput {
                events: Some(events),
                ..
            })) if events.dropped > 0 => error(format!(
                "step attempt {attempt} of {step_key} ended ({name}), but printed more than {} bytes \
                 of events ({} lines dropped): its events are in the run's event log only",
                MAX_EVENT_BYTES, events.dropped
            )),
            (_, Some(KeptOutput {
                events: Some(events),
                ..
            })) => {
                if !step.print_serialized_events {
                    tracing::warn!("the step args do not set print_serialized_events: the result has no events");
                }
                (success_result(&events.lines, ran_for, labels), false)
            }
            (_, None) => {
                // Finished by an earlier delivery; its result may be written already.
                match store.exists(&target.bucket, &key).await {
                    Ok(true) => {
                        tracing::info!("taskiq result already written");
                        return Ok(());
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(%e, "cannot tell whether the taskiq result exists");
                        return Err(e);
                    }
                }
                error(format!(
                    "step attempt {attempt} of {step_key} finished in Dagster ({name}), but its events \
                     were lost with the execution that ran it: they are in the run's event log"
                ))
            }
        };
        let dead_letter = matches!(outcome, Outcome::DeadLettered { .. });
        match self.put_retrying(store, &target.bucket, &key, body).await {
            Ok(()) => {
                tracing::info!(is_err, "taskiq result written");
                Ok(())
            }
            Err(e) if e.is_transient() && !dead_letter => {
                if let Some(kept) = kept {
                    self.put_back(&step.task_id, kept);
                }
                Err(e)
            }
            Err(e) => {
                tracing::error!(%e, "could not write the taskiq result; the executor waiting for it gets none");
                Ok(())
            }
        }
    }

    /// Best effort: an error result for a poison message that named a valid task id.
    pub async fn write_poison_result(&self, task_id: Option<&str>, poison: &Poison) {
        let (Some(target), Some(store), Some(task_id)) = (&self.results, &self.store, task_id)
        else {
            return;
        };
        let key = result_key(&target.base_path, task_id);
        let message = format!(
            "dagster-taskiq-controller cannot run this message ({}): {poison}",
            poison.name()
        );
        let body = error_result(&message, 0.0, &BTreeMap::new());
        match self
            .put_retrying(store.as_ref(), &target.bucket, &key, body)
            .await
        {
            Ok(()) => tracing::info!(%key, "taskiq error result written for the poison message"),
            Err(e) => tracing::warn!(%e, "could not write the poison message's taskiq result"),
        }
    }

    fn put_back(&self, task_id: &str, kept: KeptOutput) {
        self.kept.lock().insert(task_id.to_owned(), kept);
    }

    async fn put_retrying(
        &self,
        store: &dyn ObjectStore,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
    ) -> Result<(), StoreError> {
        retry(
            RetryBudget::within(PUT_BACKOFF, self.retry_budget),
            || store.put(bucket, key, body.clone()),
            |e, _, pause| tracing::debug!(%e, ?pause, "result write failed; retrying"),
        )
        .await
    }
}

/// Whether the message's body is an S3 pointer (taskiq-aio-sqs tests the attribute's
/// presence; it always sends `True`).
pub fn is_extended(message: &ReceivedMessage) -> bool {
    message
        .attributes
        .get(EXTENDED_MESSAGE_ATTRIBUTE)
        .is_some_and(|v| !v.is_empty() && !v.eq_ignore_ascii_case("false"))
}

/// The extended-payload marker of a message, to carry over to a message with the same body
/// (a hand-off continuation).
pub fn extended_marker(message: &ReceivedMessage) -> Option<(String, String)> {
    message
        .attributes
        .get_key_value(EXTENDED_MESSAGE_ATTRIBUTE)
        .map(|(k, v)| (k.clone(), v.clone()))
}

/// The body's own task id, when it has a valid one and the body is JSON at all.
fn task_id_of(poison: &Poison, body: &str) -> Option<String> {
    if matches!(poison, Poison::TooLarge { .. } | Poison::InvalidJson(_)) {
        return None;
    }
    #[derive(Deserialize)]
    struct TaskId {
        task_id: String,
    }
    serde_json::from_str::<TaskId>(body)
        .ok()
        .map(|t| t.task_id)
        .filter(|t| envelope::is_valid_task_id(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::{step_body, FakeObjectStore};
    use crate::outcome::{DeadLetterReason, Finish};

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
        }
    }

    fn compat(store: &FakeObjectStore) -> TaskiqCompat {
        TaskiqCompat::new(Arc::new(store.clone()), Some("results".into()), "")
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
            Err(DecodeError::Unavailable(_)) => "unavailable".to_owned(),
            Ok(_) => "ok".to_owned(),
        };
        let c = compat(&store);
        let gone = message(r#"{"s3_bucket": "payloads", "s3_key": "gone"}"#, true);
        assert_eq!(name(c.decode(&gone).await), "invalid_extended_payload");
        assert_eq!(
            name(c.decode(&message("not a pointer", true)).await),
            "invalid_extended_payload"
        );
        store.insert("payloads", "huge", vec![b' '; MAX_EXTENDED_BODY_BYTES + 1]);
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
        let Err(DecodeError::Poison { poison, task_id }) = c.decode(&message_of(bad)).await else {
            panic!("poison expected");
        };
        assert_eq!(task_id.as_deref(), Some("abc"));
        c.write_poison_result(task_id.as_deref(), &poison).await;
        assert_eq!(result_json(&store, "abc")["is_err"], true);
    }

    fn message_of(body: &str) -> ReceivedMessage {
        message(body, false)
    }
}
