//! The one layer between the controller and the AWS SDKs:
//!
//! - the configuration and the clients ([`load`], [`sqs_client`], `ecs_client`,
//!   `s3_client`): every call bounded in time, one S3 addressing rule;
//! - what an SDK error means (`classify`): throttled, transient or permanent, from the
//!   service's error code and HTTP status; each caller maps that to its own typed error;
//! - the SQS SendMessage call (`send_message`) every send goes through, which is where a
//!   FIFO queue's group and deduplication ids are set.

mod error;
mod sqs;

use std::time::Duration;

// The ECS fake answers with classified errors.
#[cfg(any(test, feature = "testing"))]
pub(crate) use error::class_of;
pub(crate) use error::classify;
pub(crate) use error::ErrorClass;
pub(crate) use sqs::{send_message, Fifo};

/// The AWS configuration with bounded calls: a hung connection must fail (and be retried)
/// rather than stall a lease. `attempt_timeout` bounds one attempt of a call; it must exceed
/// the longest legitimate call (an SQS long poll).
pub async fn load(attempt_timeout: Duration) -> aws_config::SdkConfig {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_attempt_timeout(attempt_timeout)
        .build();
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(timeouts)
        .load()
        .await
}

pub fn sqs_client(aws: &aws_config::SdkConfig) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(aws)
}

pub(crate) fn ecs_client(aws: &aws_config::SdkConfig) -> aws_sdk_ecs::Client {
    aws_sdk_ecs::Client::new(aws)
}

/// An S3 client, on `endpoint` when given (else the configuration's).
pub(crate) fn s3_client(aws: &aws_config::SdkConfig, endpoint: Option<&str>) -> aws_sdk_s3::Client {
    let mut builder = aws_sdk_s3::config::Builder::from(aws);
    if let Some(url) = endpoint {
        builder = builder.endpoint_url(url);
    }
    // The one S3 addressing rule: on a custom endpoint (moto, MinIO, LocalStack) a bucket in
    // the host name (`bucket.localhost`) does not resolve, so the bucket goes in the path; on
    // AWS itself, the virtual-hosted style AWS recommends.
    let custom_endpoint = endpoint.is_some()
        || aws.endpoint_url().is_some()
        || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some();
    aws_sdk_s3::Client::from_conf(builder.force_path_style(custom_endpoint).build())
}
