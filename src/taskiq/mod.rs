//! Drop-in compatibility with the `dagster-taskiq` executor, which talks TaskIQ over SQS with
//! taskiq-aio-sqs and waits for a taskiq result in S3 (docs/protocol.md, "TaskIQ
//! compatibility"):
//!
//! - **Extended payloads.** A body of 1 MiB or more is sent the taskiq-aio-sqs way: the SQS
//!   body is `{"s3_bucket": ..., "s3_key": ...}` with the string message attribute
//!   `s3_extended_message` = `True`; the real body is that S3 object.
//!   [`TaskiqCompat::decode`] resolves it before decoding: only from the buckets named by
//!   `--payload-bucket` (none: refused; the object is never fetched), at most
//!   `--max-payload-bytes` (the 1 MiB limit applies to the SQS body only).
//! - **Results.** With a result bucket, every settled attempt gets a taskiq result object at
//!   `<base_path>/<task_id>`, in the JSON the taskiq-aio-sqs `S3Backend` reads with its default
//!   (orjson) serializer, written before the message is deleted:
//!   `{"is_err", "log", "return_value", "execution_time", "labels", "error"}`. A step that
//!   reached an outcome in Dagster returns the serialized `DagsterEvent` lines it printed on
//!   stdout (`print_serialized_events`); a crash, timeout, cancel or dead letter returns an
//!   error in taskiq's exception shape, so the executor never waits forever.
//!   The event lines come from the local launchers ([`crate::launcher::EventLines`]).
//!
//! S3 sits behind the [`ObjectStore`] trait: [`store::S3ObjectStore`] is the aws-sdk
//! implementation, `crate::fakes::FakeObjectStore` the in-memory one the unit tests use.
//!
//! One concept per file: `args.rs` the flags, `store.rs` the S3 boundary, `extended.rs` the
//! extended-payload marker, `result.rs` the result objects, `compat.rs` the layer the
//! controller calls.

mod args;
mod compat;
mod extended;
mod result;
mod store;

pub(crate) use args::TaskiqArgs;
pub use compat::{DecodeError, TaskiqCompat, TaskiqSetupError};
pub(crate) use extended::extended_marker;
pub(crate) use store::StoreError;
// Only the fakes implement the boundary outside this module.
#[cfg(any(test, feature = "testing"))]
pub(crate) use store::ObjectStore;

#[cfg(test)]
mod tests;
