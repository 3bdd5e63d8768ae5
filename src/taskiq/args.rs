//! The flags of the taskiq compatibility layer.

use clap::Args;

/// dagster-taskiq compatibility: taskiq results and extended payloads ([`crate::taskiq`]).
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
