//! The flags of the taskiq compatibility layer.

use clap::Args;

use crate::flags::{invalid, ConfigError};

/// Default of `--max-payload-bytes`.
pub(crate) const DEFAULT_MAX_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;
/// Range of `--max-payload-bytes`: no smaller than an SQS body, no larger than what one
/// message may reasonably hold in memory while its step runs.
const PAYLOAD_BYTES_RANGE: std::ops::RangeInclusive<usize> = 256 * 1024..=256 * 1024 * 1024;

/// dagster-taskiq compatibility: taskiq results and extended payloads ([`crate::taskiq`]).
#[derive(Debug, Clone, Args)]
pub struct TaskiqArgs {
    /// S3 bucket for taskiq results (taskiq-aio-sqs `S3Backend(bucket_name=...)`): each
    /// settled step gets its result object at `<task_id>`. Unset: no results are written.
    #[arg(long, env = "DAGSTER_TASKIQ_S3_BUCKET_NAME")]
    pub result_bucket: Option<String>,

    /// Key prefix of the result objects (`S3Backend(base_path=...)`).
    #[arg(long, env = "DAGSTER_TASKIQ_S3_BASE_PATH", default_value = "")]
    pub result_base_path: String,

    /// S3 bucket that extended (S3) payloads may be read from (repeatable, or
    /// comma-separated in the environment variable). None: extended payloads are refused.
    #[arg(
        long = "payload-bucket",
        env = "DAGSTER_TASKIQ_PAYLOAD_BUCKET",
        value_delimiter = ','
    )]
    pub payload_buckets: Vec<String>,

    /// Largest extended payload read, in bytes (256 KiB to 256 MiB).
    #[arg(long, env = "DAGSTER_TASKIQ_MAX_PAYLOAD_BYTES", default_value_t = DEFAULT_MAX_PAYLOAD_BYTES)]
    pub max_payload_bytes: usize,

    /// S3 endpoint for results and extended payloads. Default: the standard AWS configuration
    /// (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, else AWS itself).
    #[arg(long, env = "DAGSTER_TASKIQ_S3_ENDPOINT_URL")]
    pub s3_endpoint_url: Option<String>,
}

impl TaskiqArgs {
    /// Checks values clap cannot check alone; the error names the flag.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !PAYLOAD_BYTES_RANGE.contains(&self.max_payload_bytes) {
            return Err(invalid(
                "max-payload-bytes",
                format!(
                    "{} is out of range ({} to {} bytes)",
                    self.max_payload_bytes,
                    PAYLOAD_BYTES_RANGE.start(),
                    PAYLOAD_BYTES_RANGE.end()
                ),
            ));
        }
        if let Some(bad) = self.payload_buckets.iter().find(|b| !is_bucket_name(b)) {
            return Err(invalid(
                "payload-bucket",
                format!("{bad:?} is not an S3 bucket name"),
            ));
        }
        Ok(())
    }
}

/// The shape of an S3 bucket name (3 to 63 characters of `[a-z0-9.-]`), so that a typo such
/// as a URL is caught at start-up.
fn is_bucket_name(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}
