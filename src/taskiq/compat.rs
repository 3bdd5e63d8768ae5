//! The layer the controller calls: decodes a message (resolving an extended payload first)
//! and writes each settled attempt's taskiq result.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::time::Instant;

use super::args::{TaskiqArgs, DEFAULT_MAX_PAYLOAD_BYTES};
use super::extended::{is_extended, MAX_S3_KEY_BYTES};
use super::result::{error_result, result_key, success_result};
use super::store::{ObjectStore, S3ObjectStore, StoreError};
use crate::envelope::{self, excerpt, Identity, Poison, StepRequest, MAX_BODY_BYTES};
use crate::launcher::child::MAX_EVENT_BYTES;
use crate::launcher::EventLines;
use crate::outcome::{Outcome, Skip};
use crate::queue::ReceivedMessage;
use crate::retry::{retry, Backoff, RetryBudget};

/// Outputs of finished steps kept for a result that could not be written yet (at most this
/// many, for at most [`KEPT_FOR`]): a redelivery to this controller can still write it.
const MAX_KEPT: usize = 256;
const KEPT_FOR: Duration = Duration::from_secs(3600);
/// Pauses between tries of a result write, within its retry budget.
const PUT_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(200),
    cap: Duration::from_secs(5),
};

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// It can never run; `identity` is whom it is for, as far as it says (an error result
    /// for its task id, a verdict for its attempt).
    #[error("{poison}")]
    Poison { poison: Poison, identity: Identity },
    /// Its extended payload cannot be read right now (S3 failing or refusing): try later.
    /// `task_id`: the one the pointer's key names, if any.
    #[error("extended payload unavailable: {error}")]
    Unavailable {
        error: StoreError,
        task_id: Option<String>,
    },
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

/// Which extended payloads are read: from these buckets only, up to this size.
#[derive(Debug, Clone)]
struct PayloadPolicy {
    /// None: every extended payload is refused.
    buckets: Vec<String>,
    max_bytes: usize,
}

impl Default for PayloadPolicy {
    fn default() -> Self {
        Self {
            buckets: Vec::new(),
            max_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

/// Extended payloads and taskiq results; [`TaskiqCompat::default`] does neither.
#[derive(Default)]
pub struct TaskiqCompat {
    store: Option<Arc<dyn ObjectStore>>,
    results: Option<ResultTarget>,
    payloads: PayloadPolicy,
    kept: Mutex<HashMap<String, KeptOutput>>,
    /// How long a result write is retried before the message is released for later.
    retry_budget: Duration,
}

impl TaskiqCompat {
    /// Writes results to `result_bucket` when given; reads no extended payloads until
    /// [`TaskiqCompat::with_payloads`].
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
            payloads: PayloadPolicy::default(),
            kept: Mutex::default(),
            retry_budget: Duration::from_secs(10),
        }
    }

    /// Reads extended payloads from `buckets` only (none: refuses them all), of at most
    /// `max_bytes`.
    pub fn with_payloads(mut self, buckets: Vec<String>, max_bytes: usize) -> Self {
        self.payloads = PayloadPolicy { buckets, max_bytes };
        self
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
        Ok(Self::new(Arc::new(store), bucket, &args.result_base_path)
            .with_payloads(args.payload_buckets.clone(), args.max_payload_bytes))
    }

    /// Whether taskiq results are written.
    pub(crate) fn results_enabled(&self) -> bool {
        self.results.is_some()
    }

    /// Decodes a message, resolving an extended payload first.
    pub(crate) async fn decode(
        &self,
        message: &ReceivedMessage,
    ) -> Result<StepRequest, DecodeError> {
        let poison = |poison: Poison, body: &str| DecodeError::Poison {
            identity: identity_of(&poison, body),
            poison,
        };
        let mut step = if is_extended(message) {
            let body = self.fetch_extended(&message.body).await?;
            envelope::decode_with_limit(&body, self.payloads.max_bytes)
                .map_err(|p| poison(p, &body))?
        } else {
            envelope::decode(&message.body).map_err(|p| poison(p, &message.body))?
        };
        step.collect_events = self.results_enabled();
        Ok(step)
    }

    async fn fetch_extended(&self, pointer: &str) -> Result<String, DecodeError> {
        if pointer.len() > MAX_BODY_BYTES {
            return Err(DecodeError::Poison {
                poison: Poison::TooLarge {
                    size: pointer.len(),
                    limit: MAX_BODY_BYTES,
                },
                identity: Identity::default(),
            });
        }
        #[derive(Deserialize)]
        struct Pointer {
            s3_bucket: String,
            s3_key: String,
        }
        let Pointer { s3_bucket, s3_key } =
            serde_json::from_str(pointer).map_err(|e| DecodeError::Poison {
                poison: Poison::InvalidExtendedPayload(format!(
                    "the body is not an {{\"s3_bucket\", \"s3_key\"}} pointer: {}",
                    envelope::json_error(&e)
                )),
                identity: Identity::default(),
            })?;
        // The body is out of reach, but the key names its task: its result can still say why.
        let task_id = pointer_task_id(&s3_key);
        let poison = |poison| DecodeError::Poison {
            poison,
            identity: Identity::task(task_id.clone()),
        };
        // A pointer is an instruction to read: only from our own buckets, checked before any
        // call to S3.
        if !self.payloads.buckets.contains(&s3_bucket) {
            return Err(poison(Poison::ExtendedPayloadRefused(
                if self.payloads.buckets.is_empty() {
                    format!(
                        "bucket {:?}: this controller reads no extended payloads (no --payload-bucket)",
                        excerpt(&s3_bucket)
                    )
                } else {
                    format!(
                        "bucket {:?} is not in --payload-bucket",
                        excerpt(&s3_bucket)
                    )
                },
            )));
        }
        if s3_key.is_empty() || s3_key.len() > MAX_S3_KEY_BYTES {
            return Err(poison(Poison::InvalidExtendedPayload(format!(
                "the key is {} bytes: S3 keys are 1 to {MAX_S3_KEY_BYTES}",
                s3_key.len()
            ))));
        }
        let Some(store) = &self.store else {
            return Err(poison(Poison::InvalidExtendedPayload(
                "this controller has no S3 client".into(),
            )));
        };
        let span = tracing::info_span!("extended_payload", bucket = %s3_bucket, key = %s3_key);
        let fetched = tracing::Instrument::instrument(
            store.get(&s3_bucket, &s3_key, self.payloads.max_bytes),
            span,
        )
        .await;
        let bytes = match fetched {
            Ok(bytes) => bytes,
            Err(StoreError::TooLarge { size, limit, .. }) => {
                return Err(poison(Poison::PayloadTooLarge { size, limit }))
            }
            Err(e @ StoreError::NotFound { .. }) => {
                return Err(poison(Poison::InvalidExtendedPayload(e.to_string())))
            }
            Err(error) => {
                return Err(DecodeError::Unavailable {
                    error,
                    task_id: task_id.clone(),
                })
            }
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
    pub(crate) fn keep_output(&self, task_id: &str, events: Option<EventLines>, ran_for: Duration) {
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
    pub(crate) async fn write_result(
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
            (Outcome::Verdict { cause, .. } | Outcome::ContinuationLost { cause }, _) => error(
                format!("step attempt {attempt} of {step_key} failed: {cause}"),
            ),
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

    /// Best effort: the error result of a message that cannot run (poison, or a payload that
    /// stayed unreadable) and named a valid task id, saying `why`.
    pub(crate) async fn write_unrun_result(&self, task_id: Option<&str>, why: &str) {
        let (Some(target), Some(store), Some(task_id)) = (&self.results, &self.store, task_id)
        else {
            return;
        };
        let key = result_key(&target.base_path, task_id);
        let message = format!("dagster-taskiq-controller cannot run this message: {why}");
        let body = error_result(&message, 0.0, &BTreeMap::new());
        match self
            .put_retrying(store.as_ref(), &target.bucket, &key, body)
            .await
        {
            Ok(()) => {
                tracing::info!(%key, "taskiq error result written for the unrunnable message")
            }
            Err(e) => tracing::warn!(%e, "could not write the unrunnable message's taskiq result"),
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

/// Whom a poison body is for, when the body is JSON at all.
fn identity_of(poison: &Poison, body: &str) -> Identity {
    if matches!(poison, Poison::TooLarge { .. } | Poison::InvalidJson(_)) {
        return Identity::default();
    }
    envelope::identify(body)
}

/// The task id an extended payload's key names: taskiq-aio-sqs stores the body of task `t`
/// at `t.json`.
fn pointer_task_id(s3_key: &str) -> Option<String> {
    s3_key
        .strip_suffix(".json")
        .filter(|t| envelope::is_valid_task_id(t))
        .map(str::to_owned)
}
